//! Zero-copy views of the numpy arrays Python hands over (torch tensors seen through
//! `Tensor.numpy()`), and dispatch on their element type.
//!
//! bfloat16 has no numpy dtype: Python passes bfloat16 tensors as int16 views of the same
//! bits, and this module reinterprets them as `half::bf16`.

use half::{bf16, f16};
use numpy::npyffi::NPY_TYPES;
use numpy::{
    PyArrayDescrMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A tensor element type together with the numpy dtype that carries its bits.
pub trait Carried: bytemuck::Pod {
    type Word: numpy::Element + bytemuck::Pod;
}

impl Carried for i64 {
    type Word = i64;
}

impl Carried for u8 {
    type Word = u8;
}

impl Carried for f64 {
    type Word = f64;
}
impl Carried for f32 {
    type Word = f32;
}
impl Carried for f16 {
    type Word = f16;
}
impl Carried for bf16 {
    type Word = i16;
}

/// The floating element types kernels accept, by the numpy dtype name they arrive with.
pub enum FloatKind {
    F64,
    F32,
    Bf16,
    F16,
}

/// The element type of a numpy array, read from its descriptor's type number (a field, where
/// the dtype's name is a Python property that builds a string: about a microsecond a call).
pub fn float_kind(array: &Bound<'_, PyAny>, name: &str) -> PyResult<FloatKind> {
    let array = array
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected a numpy array")))?;
    let dtype = array.dtype();
    let num = dtype.num();
    let is = |t: NPY_TYPES| num == t as std::ffi::c_int;
    if is(NPY_TYPES::NPY_DOUBLE) {
        Ok(FloatKind::F64)
    } else if is(NPY_TYPES::NPY_FLOAT) {
        Ok(FloatKind::F32)
    } else if is(NPY_TYPES::NPY_SHORT) {
        Ok(FloatKind::Bf16)
    } else if is(NPY_TYPES::NPY_HALF) {
        Ok(FloatKind::F16)
    } else {
        Err(PyTypeError::new_err(format!(
            "{name}: expected float64, float32, float16 or bfloat16 (as int16 words), got {dtype}"
        )))
    }
}

/// Binds `$X` to the element type of `$array` and evaluates `$body` for it.
macro_rules! with_float_type {
    ($array:expr, $name:expr, $X:ident => $body:expr) => {
        match $crate::arrays::float_kind($array, $name)? {
            $crate::arrays::FloatKind::F64 => {
                type $X = f64;
                $body
            }
            $crate::arrays::FloatKind::F32 => {
                type $X = f32;
                $body
            }
            $crate::arrays::FloatKind::Bf16 => {
                type $X = half::bf16;
                $body
            }
            $crate::arrays::FloatKind::F16 => {
                type $X = half::f16;
                $body
            }
        }
    };
}
pub(crate) use with_float_type;

pub fn readonly<'py, W: numpy::Element>(
    array: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, W>> {
    array.extract::<PyReadonlyArrayDyn<'py, W>>().map_err(|err| {
        PyTypeError::new_err(format!("{name}: expected an array of {}: {err}", std::any::type_name::<W>()))
    })
}

pub fn readwrite<'py, W: numpy::Element>(
    array: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, W>> {
    array.extract::<PyReadwriteArrayDyn<'py, W>>().map_err(|err| {
        PyTypeError::new_err(format!(
            "{name}: expected a writable array of {}: {err}",
            std::any::type_name::<W>()
        ))
    })
}

/// The elements of a C-contiguous array, reinterpreted as `X`.
pub fn slice<'a, X: Carried>(array: &'a PyReadonlyArrayDyn<'_, X::Word>, name: &str) -> PyResult<&'a [X]> {
    let words = array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name}: expected a contiguous array")))?;
    Ok(bytemuck::cast_slice(words))
}

pub fn slice_mut<'a, X: Carried>(
    array: &'a mut PyReadwriteArrayDyn<'_, X::Word>,
    name: &str,
) -> PyResult<&'a mut [X]> {
    let words = array
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{name}: expected a contiguous array")))?;
    Ok(bytemuck::cast_slice_mut(words))
}

/// The shape of an array that must have exactly `N` dimensions.
pub fn shape<W: numpy::Element, const N: usize>(
    array: &PyReadonlyArrayDyn<'_, W>,
    name: &str,
) -> PyResult<[usize; N]> {
    array.shape().try_into().map_err(|_| {
        PyValueError::new_err(format!("{name}: expected {N} dimensions, got shape {:?}", array.shape()))
    })
}
