//! Conditional computation (see `sparseroute_core::tokens` and `sparseroute_core::layers`):
//! token selection, gathering and scattering kept tokens, layer plans and plan buckets.

use crate::arrays::{readonly, readwrite, shape, slice, slice_mut, with_float_type};
use crate::errors::to_pyerr;
use crate::routing::run_kernel;
use numpy::{PyArray1, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use sparseroute_core::layers;
use sparseroute_core::tokens::{self, KeepRule, KeptRows, TokenShape};

/// The token shape of `indices` `[B, C]` over sequences of `seq_len` positions.
fn token_shape(indices: &PyReadonlyArrayDyn<'_, i64>, seq_len: usize) -> PyResult<TokenShape> {
    let [batch, capacity] = shape::<_, 2>(indices, "indices")?;
    Ok(TokenShape { batch, seq_len, capacity })
}

/// Fills `indices` `[B, C]` and `mask` `[B, S]` (uint8) with the positions of `scores`
/// `[B, S]` that `rule` ("top", "fraction" or "threshold", with its `value`) keeps.
#[pyfunction]
#[pyo3(signature = (scores, lengths, rule, value, indices, mask, threads))]
pub fn select_tokens(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    lengths: Option<&Bound<'_, PyAny>>,
    rule: &str,
    value: f64,
    indices: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let rule = match rule {
        "top" => KeepRule::Top,
        "fraction" => KeepRule::Fraction(value),
        "threshold" => KeepRule::Threshold(value),
        other => {
            return Err(PyValueError::new_err(format!(
                "rule: expected \"top\", \"fraction\" or \"threshold\", got {other:?}"
            )))
        }
    };
    let lengths = lengths.map(|l| readonly::<i64>(l, "lengths")).transpose()?;
    let lengths = lengths.as_ref().map(|l| slice::<i64>(l, "lengths")).transpose()?;
    let mut indices = readwrite::<i64>(indices, "indices")?;
    let [_, capacity] = shape::<_, 2>(&indices, "indices")?;
    let indices = slice_mut::<i64>(&mut indices, "indices")?;
    let mut mask = readwrite::<u8>(mask, "mask")?;
    let mask = slice_mut::<u8>(&mut mask, "mask")?;
    with_float_type!(scores, "scores", X => {
        type W = <X as crate::arrays::Carried>::Word;
        let scores = readonly::<W>(scores, "scores")?;
        let [batch, seq_len] = shape::<_, 2>(&scores, "scores")?;
        let scores = slice::<X>(&scores, "scores")?;
        let token_shape = TokenShape { batch, seq_len, capacity };
        run_kernel(py, threads, scores.len() * 8, || {
            tokens::select_tokens(scores, token_shape, lengths, rule, indices, mask)
        })
    })
}

/// `out[b, c] = scale[b, p] * x[b, p]` for `p = indices[b, c]` (a copy without `scale`),
/// zeros for -1 entries. `x` `[B, S, d]`, `scale` `[B, S]` (accumulator dtype).
#[pyfunction]
#[pyo3(signature = (x, indices, scale, out, threads))]
pub fn gather_tokens(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    scale: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let indices = readonly::<i64>(indices, "indices")?;
    with_float_type!(x, "x", X => {
        type A = <X as sparseroute_core::Element>::Acc;
        type W = <X as crate::arrays::Carried>::Word;
        let x = readonly::<W>(x, "x")?;
        let [_, seq_len, row_len] = shape::<_, 3>(&x, "x")?;
        let token_shape = token_shape(&indices, seq_len)?;
        let scale = scale.map(|s| readonly::<A>(s, "gate")).transpose()?;
        let mut out = readwrite::<W>(out, "out")?;
        let x = slice::<X>(&x, "x")?;
        let indices = slice::<i64>(&indices, "indices")?;
        let scale = scale.as_ref().map(|s| slice::<A>(s, "gate")).transpose()?;
        let out = slice_mut::<X>(&mut out, "out")?;
        run_kernel(py, threads, out.len(), || tokens::gather_tokens(x, token_shape, row_len, indices, scale, out))
    })
}

/// Writes `out` `[B, S, d]`: `base` (zeros when None) at positions no entry of `indices`
/// keeps; at kept positions the entry's row of `rows` `[B, C, d]` (zeros when None), or,
/// with `gate` `[B, S]` (accumulator dtype), `base + gate * row`.
#[pyfunction]
#[pyo3(signature = (base, rows, indices, gate, out, threads))]
pub fn scatter_tokens(
    py: Python<'_>,
    base: Option<&Bound<'_, PyAny>>,
    rows: Option<&Bound<'_, PyAny>>,
    indices: &Bound<'_, PyAny>,
    gate: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let indices = readonly::<i64>(indices, "indices")?;
    with_float_type!(out, "out", X => {
        type A = <X as sparseroute_core::Element>::Acc;
        type W = <X as crate::arrays::Carried>::Word;
        let mut out = readwrite::<W>(out, "out")?;
        let [_, seq_len, row_len] = shape::<_, 3>(&out, "out")?;
        let token_shape = token_shape(&indices, seq_len)?;
        let base = base.map(|b| readonly::<W>(b, "x")).transpose()?;
        let rows = rows.map(|r| readonly::<W>(r, "y")).transpose()?;
        let gate = gate.map(|g| readonly::<A>(g, "gate")).transpose()?;
        let base = base.as_ref().map(|b| slice::<X>(b, "x")).transpose()?;
        let rows = rows.as_ref().map(|r| slice::<X>(r, "y")).transpose()?;
        let gate = gate.as_ref().map(|g| slice::<A>(g, "gate")).transpose()?;
        let kept = match (rows, gate) {
            (rows, None) => KeptRows::Replace(rows),
            (Some(rows), Some(gate)) => KeptRows::AddGated { rows, gate },
            (None, Some(_)) => return Err(PyValueError::new_err("gate: needs the rows y to scale")),
        };
        let indices = slice::<i64>(&indices, "indices")?;
        let out = slice_mut::<X>(&mut out, "out")?;
        run_kernel(py, threads, out.len(), || tokens::scatter_tokens(base, token_shape, row_len, indices, kept, out))
    })
}

/// `out[b, p] = dot(grad[b, p], rows[b, c])` at kept positions `p = indices[b, c]`, 0
/// elsewhere (accumulator dtype): the gate's gradient of a gated scatter.
#[pyfunction]
#[pyo3(signature = (grad, rows, indices, out, threads))]
pub fn token_dots(
    py: Python<'_>,
    grad: &Bound<'_, PyAny>,
    rows: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let indices = readonly::<i64>(indices, "indices")?;
    with_float_type!(grad, "grad", X => {
        type A = <X as sparseroute_core::Element>::Acc;
        type W = <X as crate::arrays::Carried>::Word;
        let grad = readonly::<W>(grad, "grad")?;
        let [_, seq_len, row_len] = shape::<_, 3>(&grad, "grad")?;
        let token_shape = token_shape(&indices, seq_len)?;
        let rows = readonly::<W>(rows, "y")?;
        let mut out = readwrite::<A>(out, "out")?;
        let grad = slice::<X>(&grad, "grad")?;
        let rows = slice::<X>(&rows, "y")?;
        let indices = slice::<i64>(&indices, "indices")?;
        let out = slice_mut::<A>(&mut out, "out")?;
        run_kernel(py, threads, grad.len(), || tokens::token_dots(grad, rows, token_shape, row_len, indices, out))
    })
}

/// The decision (0 skip, 1 execute, 2 repeat) of every row of `logits` `[..., 3]`.
#[pyfunction]
#[pyo3(signature = (logits, out))]
pub fn layer_plan(py: Python<'_>, logits: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let mut out = readwrite::<i64>(out, "out")?;
    let out = slice_mut::<i64>(&mut out, "out")?;
    with_float_type!(logits, "logits", X => {
        type W = <X as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let logits = slice::<X>(&logits, "logits")?;
        run_kernel(py, 1, 0, || layers::layer_plan(logits, out))
    })
}

/// Requests of `plans` `[B, L]` grouped by identical plan and cut into batches of at most
/// `max_batch`: `(order [B], offsets [batches + 1], group [batches])`.
#[pyfunction]
#[pyo3(signature = (plans, max_batch))]
pub fn bucket_by_plan<'py>(
    py: Python<'py>,
    plans: &Bound<'py, PyAny>,
    max_batch: Option<usize>,
) -> PyResult<[Bound<'py, PyArray1<i64>>; 3]> {
    let plans = readonly::<i64>(plans, "plans")?;
    let [num_requests, num_layers] = shape::<_, 2>(&plans, "plans")?;
    let plans = slice::<i64>(&plans, "plans")?;
    let batches =
        py.detach(|| layers::bucket_by_plan(plans, num_requests, num_layers, max_batch)).map_err(to_pyerr)?;
    Ok([batches.order, batches.offsets, batches.group].map(|v| PyArray1::from_vec(py, v)))
}
