//! Per-layer keep-ratio schedules under a compute budget (see `sparseroute_core::schedule`).

use crate::arrays::{readonly, shape, slice};
use crate::errors::to_pyerr;
use crate::routing::run_kernel;
use numpy::{PyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use sparseroute_core::schedule::{self, LayerCosts, Method, ScheduleProblem};

/// One keep-ratio per layer minimising the summed `layer_sensitivity` [L, R] (float64)
/// within `budget`, for costs `layer_costs` [L] (scaled by the ratio) or [L, R] (measured),
/// the grid `ratios` [R] and per-layer bounds `min_keep`, `max_keep` [L]. Returns
/// `(choice [L] int64, cost, loss, exact)`.
#[pyfunction]
#[pyo3(signature = (layer_costs, layer_sensitivity, ratios, min_keep, max_keep, budget, method, max_states))]
pub fn sparsity_schedule<'py>(
    py: Python<'py>,
    layer_costs: &Bound<'py, PyAny>,
    layer_sensitivity: &Bound<'py, PyAny>,
    ratios: &Bound<'py, PyAny>,
    min_keep: &Bound<'py, PyAny>,
    max_keep: &Bound<'py, PyAny>,
    budget: f64,
    method: &str,
    max_states: usize,
) -> PyResult<(Bound<'py, PyArray1<i64>>, f64, f64, bool)> {
    let method: Method = method.parse().map_err(to_pyerr)?;
    let sensitivity = readonly::<f64>(layer_sensitivity, "layer_sensitivity")?;
    let [num_layers, _] = shape::<_, 2>(&sensitivity, "layer_sensitivity")?;
    let costs = readonly::<f64>(layer_costs, "layer_costs")?;
    // The core checks element counts only; a transposed [R, L] table has the right count.
    if costs.ndim() == 2 && costs.shape() != sensitivity.shape() {
        return Err(PyValueError::new_err(format!(
            "layer_costs: expected shape {:?} (that of layer_sensitivity), got {:?}",
            sensitivity.shape(),
            costs.shape()
        )));
    }
    let ratios = readonly::<f64>(ratios, "ratios")?;
    let min_keep = readonly::<f64>(min_keep, "min_keep")?;
    let max_keep = readonly::<f64>(max_keep, "max_keep")?;
    let costs_slice = slice::<f64>(&costs, "layer_costs")?;
    let layer_costs = match costs.ndim() {
        1 => LayerCosts::Scaled(costs_slice),
        2 => LayerCosts::Measured(costs_slice),
        _ => {
            return Err(PyValueError::new_err(format!(
                "layer_costs: expected [L] or [L, R] dimensions, got shape {:?}",
                costs.shape()
            )))
        }
    };
    let problem = ScheduleProblem {
        num_layers,
        ratios: slice::<f64>(&ratios, "ratios")?,
        layer_costs,
        layer_sensitivity: slice::<f64>(&sensitivity, "layer_sensitivity")?,
        min_keep: slice::<f64>(&min_keep, "min_keep")?,
        max_keep: slice::<f64>(&max_keep, "max_keep")?,
        budget,
    };
    let result = run_kernel(py, 1, 0, || schedule::sparsity_schedule(&problem, method, max_states))?;
    let choice: Vec<i64> = result.choice.into_iter().map(|index| index as i64).collect();
    Ok((PyArray1::from_vec(py, choice), result.cost, result.loss, result.exact))
}
