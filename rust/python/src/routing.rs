//! The routing kernels' Python face: each function converts its arguments, then runs the
//! core kernel through `run_kernel` (GIL released, thread count chosen, errors mapped).

use crate::arrays::{readonly, readwrite, shape, slice, slice_mut, with_float_type};
use crate::errors::to_pyerr;
use pyo3::prelude::*;
use sparseroute_core::dispatch::{self, Capacity, DropPolicy, PlanBuffers};
use sparseroute_core::gating::{self, GatingConfig, GroupLimit, TopPConfig};
use sparseroute_core::threads;

/// Releases the GIL, runs `kernel` (touching about `work` elements) with up to `threads`
/// threads, and maps its error.
pub(crate) fn run_kernel<R: Send>(
    py: Python<'_>,
    threads: usize,
    work: usize,
    kernel: impl FnOnce() -> sparseroute_core::Result<R> + Send,
) -> PyResult<R> {
    py.detach(|| threads::run(threads, work, kernel)).map_err(to_pyerr)
}

fn gating_config(
    num_experts: usize,
    k: usize,
    score: &str,
    normalize: bool,
    num_groups: Option<usize>,
    topk_groups: Option<usize>,
    group_score_k: usize,
    scale: f64,
) -> PyResult<GatingConfig> {
    let score_k = group_score_k;
    let groups = match (num_groups, topk_groups) {
        (None, None) => None,
        (Some(num_groups), Some(topk_groups)) => Some(GroupLimit { num_groups, topk_groups, score_k }),
        (Some(num_groups), None) => Some(GroupLimit { num_groups, topk_groups: num_groups, score_k }),
        (None, Some(_)) => {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "topk_groups: requires num_groups to be given as well",
            ))
        }
    };
    let cfg =
        GatingConfig { num_experts, k, score: score.parse().map_err(to_pyerr)?, normalize, groups, scale };
    cfg.validate().map_err(to_pyerr)?;
    Ok(cfg)
}

/// Top-k gating forward: fills `weights` [T, k] and `experts` [T, k] from `logits` [T, E].
#[pyfunction]
#[pyo3(signature = (logits, weights, experts, k, score, normalize, expert_bias, num_groups, topk_groups, group_score_k, scale, threads))]
pub fn topk_gating(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    experts: &Bound<'_, PyAny>,
    k: usize,
    score: &str,
    normalize: bool,
    expert_bias: Option<&Bound<'_, PyAny>>,
    num_groups: Option<usize>,
    topk_groups: Option<usize>,
    group_score_k: usize,
    scale: f64,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        let logits = readonly::<<L as crate::arrays::Carried>::Word>(logits, "logits")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let cfg = gating_config(num_experts, k, score, normalize, num_groups, topk_groups, group_score_k, scale)?;
        let bias = expert_bias.map(|b| readonly::<A>(b, "expert_bias")).transpose()?;
        let mut weights = readwrite::<A>(weights, "weights")?;
        let mut experts = readwrite::<i64>(experts, "experts")?;
        let logits = slice::<L>(&logits, "logits")?;
        let bias = bias.as_ref().map(|b| slice::<A>(b, "expert_bias")).transpose()?;
        let weights = slice_mut::<A>(&mut weights, "weights")?;
        let experts = slice_mut::<i64>(&mut experts, "experts")?;
        run_kernel(py, threads, logits.len(), || gating::topk_gating(logits, num_tokens, bias, &cfg, weights, experts))
    })
}

/// Top-k gating backward: fills `grad_logits` [T, E] from `grad_weights` [T, k].
#[pyfunction]
#[pyo3(signature = (logits, experts, grad_weights, grad_logits, score, normalize, scale, threads))]
pub fn topk_gating_backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    experts: &Bound<'_, PyAny>,
    grad_weights: &Bound<'_, PyAny>,
    grad_logits: &Bound<'_, PyAny>,
    score: &str,
    normalize: bool,
    scale: f64,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        let logits = readonly::<<L as crate::arrays::Carried>::Word>(logits, "logits")?;
        let experts = readonly::<i64>(experts, "experts")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let [_, k] = shape::<_, 2>(&experts, "experts")?;
        let cfg = gating_config(num_experts, k, score, normalize, None, None, 2, scale)?;
        let grad_weights = readonly::<A>(grad_weights, "grad_weights")?;
        let mut grad_logits = readwrite::<<L as crate::arrays::Carried>::Word>(grad_logits, "grad_logits")?;
        let logits = slice::<L>(&logits, "logits")?;
        let experts = slice::<i64>(&experts, "experts")?;
        let grad_weights = slice::<A>(&grad_weights, "grad_weights")?;
        let grad_logits = slice_mut::<L>(&mut grad_logits, "grad_logits")?;
        run_kernel(py, threads, logits.len(), || {
            gating::topk_gating_backward(logits, num_tokens, experts, grad_weights, &cfg, grad_logits)
        })
    })
}

/// Top-p (dynamic-k) gating forward: fills `weights` and `experts` [T, max_k] (-1 past
/// the kept experts) from `logits` [T, E].
#[pyfunction]
#[pyo3(signature = (logits, weights, experts, p, min_k, max_k, inclusive, normalize, threads))]
pub fn topp_gating(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    experts: &Bound<'_, PyAny>,
    p: f64,
    min_k: usize,
    max_k: usize,
    inclusive: bool,
    normalize: bool,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        type W = <L as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let mut weights = readwrite::<A>(weights, "weights")?;
        let mut experts = readwrite::<i64>(experts, "experts")?;
        let logits = slice::<L>(&logits, "logits")?;
        let weights = slice_mut::<A>(&mut weights, "weights")?;
        let experts = slice_mut::<i64>(&mut experts, "experts")?;
        let cfg = TopPConfig { num_experts, p, min_k, max_k, inclusive, normalize };
        run_kernel(py, threads, logits.len(), || gating::topp_gating(logits, num_tokens, &cfg, weights, experts))
    })
}

/// Expert-choice routing: fills `indices` and `gates` [E, capacity] from `logits` [T, E],
/// with `scores` [E, T] as working memory.
#[pyfunction]
#[pyo3(signature = (logits, capacity, indices, gates, scores, threads))]
pub fn expert_choice(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    capacity: usize,
    indices: &Bound<'_, PyAny>,
    gates: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        type W = <L as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let mut indices = readwrite::<i64>(indices, "indices")?;
        let mut gates = readwrite::<A>(gates, "gates")?;
        let mut scores = readwrite::<A>(scores, "scores")?;
        let logits = slice::<L>(&logits, "logits")?;
        let indices = slice_mut::<i64>(&mut indices, "indices")?;
        let gates = slice_mut::<A>(&mut gates, "gates")?;
        let scores = slice_mut::<A>(&mut scores, "scores")?;
        run_kernel(py, threads, logits.len(), || {
            gating::expert_choice(logits, num_tokens, num_experts, capacity, indices, gates, scores)
        })
    })
}

/// The [T, E] slot layout (`experts`, `weights`) of an expert-choice decision
/// (`indices`, `gates` [E, C]).
#[pyfunction]
#[pyo3(signature = (indices, gates, experts, weights, threads))]
pub fn expert_choice_slots(
    py: Python<'_>,
    indices: &Bound<'_, PyAny>,
    gates: &Bound<'_, PyAny>,
    experts: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    fn run<A: sparseroute_core::Accumulator + numpy::Element + crate::arrays::Carried<Word = A>>(
        py: Python<'_>,
        indices: &Bound<'_, PyAny>,
        gates: &Bound<'_, PyAny>,
        experts: &Bound<'_, PyAny>,
        weights: &Bound<'_, PyAny>,
        threads: usize,
    ) -> PyResult<()> {
        let indices = readonly::<i64>(indices, "indices")?;
        let [num_experts, _] = shape::<_, 2>(&indices, "indices")?;
        let gates = readonly::<A>(gates, "gates")?;
        let mut experts = readwrite::<i64>(experts, "experts")?;
        let [num_tokens, _] = shape::<_, 2>(&experts, "experts")?;
        let mut weights = readwrite::<A>(weights, "weights")?;
        let (indices, gates) = (slice::<i64>(&indices, "indices")?, slice::<A>(&gates, "gates")?);
        let experts = slice_mut::<i64>(&mut experts, "experts")?;
        let weights = slice_mut::<A>(&mut weights, "weights")?;
        run_kernel(py, threads, experts.len(), || {
            gating::expert_choice_slots(indices, gates, num_tokens, num_experts, experts, weights)
        })
    }
    match crate::arrays::float_kind(gates, "gates")? {
        crate::arrays::FloatKind::F64 => run::<f64>(py, indices, gates, experts, weights, threads),
        crate::arrays::FloatKind::F32 => run::<f32>(py, indices, gates, experts, weights, threads),
        _ => Err(pyo3::exceptions::PyTypeError::new_err("gates: expected float32 or float64")),
    }
}

/// Gradient of expert choice's gates (`grad_gates` [E, C]) into `grad_logits` [T, E].
#[pyfunction]
#[pyo3(signature = (logits, indices, grad_gates, grad_logits, threads))]
pub fn expert_choice_backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    grad_gates: &Bound<'_, PyAny>,
    grad_logits: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(logits, "logits", L => {
        type A = <L as sparseroute_core::Element>::Acc;
        type W = <L as crate::arrays::Carried>::Word;
        let logits = readonly::<W>(logits, "logits")?;
        let [num_tokens, num_experts] = shape::<_, 2>(&logits, "logits")?;
        let indices = readonly::<i64>(indices, "indices")?;
        let grad_gates = readonly::<A>(grad_gates, "grad_gates")?;
        let mut grad_logits = readwrite::<W>(grad_logits, "grad_logits")?;
        let logits = slice::<L>(&logits, "logits")?;
        let indices = slice::<i64>(&indices, "indices")?;
        let grad_gates = slice::<A>(&grad_gates, "grad_gates")?;
        let grad_logits = slice_mut::<L>(&mut grad_logits, "grad_logits")?;
        run_kernel(py, threads, logits.len(), || {
            gating::expert_choice_backward(logits, num_tokens, num_experts, indices, grad_gates, grad_logits)
        })
    })
}

/// Builds the dropless permutation plan of `experts` [T, k], each expert's rows in whole
/// blocks of `block_size`; returns the plan's row count.
#[pyfunction]
#[pyo3(signature = (experts, num_experts, block_size, tokens_per_expert, offsets, row_to_slot, slot_to_row, threads))]
#[allow(clippy::too_many_arguments)]
pub fn build_plan(
    py: Python<'_>,
    experts: &Bound<'_, PyAny>,
    num_experts: usize,
    block_size: usize,
    tokens_per_expert: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    row_to_slot: &Bound<'_, PyAny>,
    slot_to_row: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<usize> {
    let experts = readonly::<i64>(experts, "experts")?;
    let [_, k] = shape::<_, 2>(&experts, "experts")?;
    let mut tokens_per_expert = readwrite::<i64>(tokens_per_expert, "tokens_per_expert")?;
    let mut offsets = readwrite::<i64>(offsets, "offsets")?;
    let mut row_to_slot = readwrite::<i64>(row_to_slot, "row_to_slot")?;
    let mut slot_to_row = readwrite::<i64>(slot_to_row, "slot_to_row")?;
    let experts = slice::<i64>(&experts, "experts")?;
    let buffers = PlanBuffers {
        tokens_per_expert: slice_mut(&mut tokens_per_expert, "tokens_per_expert")?,
        offsets: slice_mut(&mut offsets, "offsets")?,
        row_to_slot: slice_mut(&mut row_to_slot, "row_to_slot")?,
        slot_to_row: slice_mut(&mut slot_to_row, "slot_to_row")?,
    };
    run_kernel(py, threads, experts.len() * 4, || {
        dispatch::build_plan(experts, k, num_experts, block_size, buffers)
    })
}

/// The capacity-constrained plan: each expert keeps at most `capacity` slots, by position or
/// by `weights` (float32 `[T, k]`); `pad` lays rows out as `[E, capacity]`, else each
/// expert's rows take whole blocks of `block_size`. Returns the plan's row count.
#[pyfunction]
#[pyo3(signature = (experts, num_experts, capacity, weights, pad, block_size, tokens_per_expert, offsets, row_to_slot, slot_to_row, dropped, threads))]
#[allow(clippy::too_many_arguments)]
pub fn build_capacity_plan(
    py: Python<'_>,
    experts: &Bound<'_, PyAny>,
    num_experts: usize,
    capacity: usize,
    weights: Option<&Bound<'_, PyAny>>,
    pad: bool,
    block_size: usize,
    tokens_per_expert: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    row_to_slot: &Bound<'_, PyAny>,
    slot_to_row: &Bound<'_, PyAny>,
    dropped: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<usize> {
    let experts = readonly::<i64>(experts, "experts")?;
    let [_, k] = shape::<_, 2>(&experts, "experts")?;
    let weights = weights.map(|w| readonly::<f32>(w, "weights")).transpose()?;
    let mut tokens_per_expert = readwrite::<i64>(tokens_per_expert, "tokens_per_expert")?;
    let mut offsets = readwrite::<i64>(offsets, "offsets")?;
    let mut row_to_slot = readwrite::<i64>(row_to_slot, "row_to_slot")?;
    let mut slot_to_row = readwrite::<i64>(slot_to_row, "slot_to_row")?;
    let mut dropped = readwrite::<i64>(dropped, "dropped")?;
    let experts = slice::<i64>(&experts, "experts")?;
    let weights = weights.as_ref().map(|w| slice::<f32>(w, "weights")).transpose()?;
    let policy = weights.map_or(DropPolicy::Position, DropPolicy::Weights);
    let buffers = PlanBuffers {
        tokens_per_expert: slice_mut(&mut tokens_per_expert, "tokens_per_expert")?,
        offsets: slice_mut(&mut offsets, "offsets")?,
        row_to_slot: slice_mut(&mut row_to_slot, "row_to_slot")?,
        slot_to_row: slice_mut(&mut slot_to_row, "slot_to_row")?,
    };
    let dropped = slice_mut(&mut dropped, "dropped")?;
    let settings = Capacity { capacity, policy, pad, block_size };
    run_kernel(py, threads, experts.len() * 4, || {
        dispatch::build_capacity_plan(experts, k, num_experts, settings, buffers, dropped)
    })
}

/// `out[r] = scale[s] * x[s / k]` for `s = row_to_slot[r]`; zero rows where `s = -1`.
#[pyfunction]
#[pyo3(signature = (x, row_to_slot, k, slot_scale, out, threads))]
pub fn gather_rows(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    row_to_slot: &Bound<'_, PyAny>,
    k: usize,
    slot_scale: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(x, "x", X => {
        type A = <X as sparseroute_core::Element>::Acc;
        type W = <X as crate::arrays::Carried>::Word;
        let x = readonly::<W>(x, "x")?;
        let [_, row_len] = shape::<_, 2>(&x, "x")?;
        let row_to_slot = readonly::<i64>(row_to_slot, "row_to_slot")?;
        let slot_scale = slot_scale.map(|s| readonly::<A>(s, "weights")).transpose()?;
        let mut out = readwrite::<W>(out, "out")?;
        let x = slice::<X>(&x, "x")?;
        let row_to_slot = slice::<i64>(&row_to_slot, "row_to_slot")?;
        let slot_scale = slot_scale.as_ref().map(|s| slice::<A>(s, "weights")).transpose()?;
        let out = slice_mut::<X>(&mut out, "out")?;
        run_kernel(py, threads, out.len(), || dispatch::gather_rows(x, row_len, row_to_slot, k, slot_scale, out))
    })
}

/// `out[t] = sum_j weights[t, j] * rows[slot_to_row[t, j]]`, fp32 accumulation in slot order.
#[pyfunction]
#[pyo3(signature = (rows, slot_to_row, weights, out, threads))]
pub fn combine_rows(
    py: Python<'_>,
    rows: &Bound<'_, PyAny>,
    slot_to_row: &Bound<'_, PyAny>,
    weights: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(rows, "y_sorted", X => {
        type A = <X as sparseroute_core::Element>::Acc;
        type W = <X as crate::arrays::Carried>::Word;
        let rows = readonly::<W>(rows, "y_sorted")?;
        let [_, row_len] = shape::<_, 2>(&rows, "y_sorted")?;
        let slot_to_row = readonly::<i64>(slot_to_row, "slot_to_row")?;
        let [_, k] = shape::<_, 2>(&slot_to_row, "slot_to_row")?;
        let weights = weights.map(|w| readonly::<A>(w, "weights")).transpose()?;
        let mut out = readwrite::<W>(out, "out")?;
        let rows = slice::<X>(&rows, "y_sorted")?;
        let slot_to_row = slice::<i64>(&slot_to_row, "slot_to_row")?;
        let weights = weights.as_ref().map(|w| slice::<A>(w, "weights")).transpose()?;
        let out = slice_mut::<X>(&mut out, "out")?;
        run_kernel(py, threads, out.len() * k, || dispatch::combine_rows(rows, row_len, slot_to_row, k, weights, out))
    })
}

/// `out[t, j] = dot(grad_y[t], rows[slot_to_row[t, j]])`: the weights' gradient of a combine.
#[pyfunction]
#[pyo3(signature = (grad_y, rows, slot_to_row, out, threads))]
pub fn slot_dots(
    py: Python<'_>,
    grad_y: &Bound<'_, PyAny>,
    rows: &Bound<'_, PyAny>,
    slot_to_row: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    with_float_type!(rows, "y_sorted", X => {
        type A = <X as sparseroute_core::Element>::Acc;
        type W = <X as crate::arrays::Carried>::Word;
        let rows = readonly::<W>(rows, "y_sorted")?;
        let [_, row_len] = shape::<_, 2>(&rows, "y_sorted")?;
        let grad_y = readonly::<W>(grad_y, "grad_y")?;
        let slot_to_row = readonly::<i64>(slot_to_row, "slot_to_row")?;
        let [_, k] = shape::<_, 2>(&slot_to_row, "slot_to_row")?;
        let mut out = readwrite::<A>(out, "out")?;
        let rows = slice::<X>(&rows, "y_sorted")?;
        let grad_y = slice::<X>(&grad_y, "grad_y")?;
        let slot_to_row = slice::<i64>(&slot_to_row, "slot_to_row")?;
        let out = slice_mut::<A>(&mut out, "out")?;
        run_kernel(py, threads, grad_y.len() * k, || dispatch::slot_dots(grad_y, rows, row_len, slot_to_row, k, out))
    })
}
