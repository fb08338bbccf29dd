//! The exception classes of sparseroute, and the one mapping from core errors to them.

use pyo3::exceptions::PyValueError;
use pyo3::PyErr;
use sparseroute_core::CoreError;

pyo3::create_exception!(
    sparseroute._core,
    InvalidInputError,
    PyValueError,
    "A tensor or argument was rejected by a routing kernel (wrong size, out-of-range id, non-finite value)."
);

/// Turns a core error into the Python exception users see. (A `From` impl is ruled out by
/// the orphan rule: neither type belongs to this crate.)
pub fn to_pyerr(err: CoreError) -> PyErr {
    match err {
        CoreError::InvalidArgument { .. } => InvalidInputError::new_err(err.to_string()),
    }
}
