//! Load-balancing statistics (see `sparseroute_core::balance`): score sums, expert counts
//! and the z-loss, with their gradients.

use crate::arrays::{readonly, readwrite, shape, slice, slice_mut, with_float_type};
use crate::errors::to_pyerr;
use crate::routing::run_kernel;
use pyo3::prelude::*;
use sparseroute_core::balance::{self, Groups};
use sparseroute_core::gating::ScoreFunction;

/// `[T]` uint8 mask (0 = ignore) as a slice, if given.
macro_rules! mask_slice {
    ($mask:expr, $holder:ident) => {{
        $holder = $mask.map(|m| readonly::<u8>(m, "attention_mask")).transpose()?;
        $holder.as_ref().map(|m| slice::<u8>(m, "attention_mask")).transpose()?
    }};
}

fn parse_score(score: &str) -> PyResult<ScoreFunction> {
    score.parse().map_err(to_pyerr)
}

/// `out[g, e]` (float64) = sum of normalised scores of the valid tokens of group `g`.
#[pyfunction]
#[pyo3(signature = (logits, score, group_size, mask, out, threads))]
pub fn score_sums(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    score: &str,
    group_size: usize,
    mask: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let score = parse_score(score)?;
    let holder;
    let mask = mask_slice!(mask, holder);
    let mut out = readwrite::<f64>(out, "out")?;
    let out = slice_mut::<f64>(&mut out, "out")?;
    with_float_type!(logits, "logits", L => {
        type W = <L as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let logits = slice::<L>(&logits, "logits")?;
        let groups = Groups { num_tokens, group_size, mask };
        run_kernel(py, threads, logits.len(), || balance::score_sums(logits, num_experts, score, groups, out))
    })
}

/// The gradient of `score_sums` with respect to the logits.
#[pyfunction]
#[pyo3(signature = (logits, score, group_size, mask, grad_sums, grad_logits, threads))]
pub fn score_sums_backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    score: &str,
    group_size: usize,
    mask: Option<&Bound<'_, PyAny>>,
    grad_sums: &Bound<'_, PyAny>,
    grad_logits: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let score = parse_score(score)?;
    let holder;
    let mask = mask_slice!(mask, holder);
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        type W = <L as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let grad_sums = readonly::<A>(grad_sums, "grad_sums")?;
        let mut grad_logits = readwrite::<W>(grad_logits, "grad_logits")?;
        let logits = slice::<L>(&logits, "logits")?;
        let grad_sums = slice::<A>(&grad_sums, "grad_sums")?;
        let grad_logits = slice_mut::<L>(&mut grad_logits, "grad_logits")?;
        let groups = Groups { num_tokens, group_size, mask };
        run_kernel(py, threads, logits.len(), || {
            balance::score_sums_backward(logits, num_experts, score, groups, grad_sums, grad_logits)
        })
    })
}

/// `out[g, e]` (int64) = slots of the valid tokens of group `g` routed to expert `e`.
#[pyfunction]
#[pyo3(signature = (experts, num_experts, group_size, mask, out, threads))]
pub fn expert_counts(
    py: Python<'_>,
    experts: &Bound<'_, PyAny>,
    num_experts: usize,
    group_size: usize,
    mask: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let holder;
    let mask = mask_slice!(mask, holder);
    let experts = readonly::<i64>(experts, "experts")?;
    let [num_tokens, k] = shape::<_, 2>(&experts, "experts")?;
    let experts = slice::<i64>(&experts, "experts")?;
    let mut out = readwrite::<i64>(out, "out")?;
    let out = slice_mut::<i64>(&mut out, "out")?;
    let groups = Groups { num_tokens, group_size, mask };
    run_kernel(py, threads, 0, || balance::expert_counts(experts, k, num_experts, groups, out))
}

/// The z-loss sum over valid tokens of `logsumexp(logits[t])^2` (float64), writing each
/// token's (max, gradient factor) into `stats` (`[T, 2]`, accumulator dtype), from which
/// `z_loss_backward` recomputes the gradient.
#[pyfunction]
#[pyo3(signature = (logits, mask, scale, stats, threads))]
pub fn z_loss(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    scale: f64,
    stats: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<f64> {
    let holder;
    let mask = mask_slice!(mask, holder);
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        type W = <L as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let mut stats = readwrite::<A>(stats, "stats")?;
        let logits = slice::<L>(&logits, "logits")?;
        let stats = slice_mut::<A>(&mut stats, "stats")?;
        let groups = Groups { num_tokens, group_size: num_tokens.max(1), mask };
        let scale = <A as sparseroute_core::Accumulator>::from_f64(scale);
        run_kernel(py, threads, logits.len(), || balance::z_loss(logits, num_experts, groups, scale, stats))
    })
}

/// The z-loss gradient `grad * (dz-loss / dlogits)` from the logits and the forward's
/// `stats`, in the logits' dtype, into `out`.
#[pyfunction]
#[pyo3(signature = (logits, stats, grad, out, threads))]
pub fn z_loss_backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
    grad: f64,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        type W = <L as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let [_, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let logits = slice::<L>(&logits, "logits")?;
        let stats = readonly::<A>(stats, "stats")?;
        let stats = slice::<A>(&stats, "stats")?;
        let mut out = readwrite::<W>(out, "out")?;
        let out = slice_mut::<L>(&mut out, "out")?;
        run_kernel(py, threads, out.len(), || balance::z_loss_backward(logits, num_experts, stats, grad, out))
    })
}

/// Megatron-Core's Sinkhorn balancing of float32 `logits` [T, E] into `out`; returns the
/// number of iterations run.
#[pyfunction]
#[pyo3(signature = (logits, tol, max_iters, out, threads))]
pub fn sinkhorn(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    tol: f32,
    max_iters: Option<usize>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<usize> {
    let logits = readonly::<f32>(logits, "logits")?;
    let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
    let logits = slice::<f32>(&logits, "logits")?;
    let mut out = readwrite::<f32>(out, "out")?;
    let out = slice_mut::<f32>(&mut out, "out")?;
    run_kernel(py, threads, logits.len(), || {
        balance::sinkhorn(logits, num_tokens, num_experts, tol, max_iters, out)
    })
}
