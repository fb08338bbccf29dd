//! Serving-side scheduling (see `sparseroute_core::batching`): a stateful lookahead
//! batcher, batching replays and prefetch plans.

use crate::arrays::{readonly, shape, slice};
use crate::errors::to_pyerr;
use numpy::{PyArray1, PyArray2};
use pyo3::prelude::*;
use sparseroute_core::batching::{self, BatchPolicy, BatchRules, Batcher};
use std::sync::Mutex;

fn rules(max_batch: usize, max_wait: u64, policy: &str) -> PyResult<BatchRules> {
    Ok(BatchRules { max_batch, max_wait, policy: policy.parse::<BatchPolicy>().map_err(to_pyerr)? })
}

/// A queue of requests with known routing that hands out batches (thread-safe: every
/// method locks the queue).
#[pyclass(frozen, name = "Batcher", module = "sparseroute._core")]
pub struct PyBatcher {
    inner: Mutex<Batcher>,
}

impl PyBatcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, Batcher> {
        // A panic while locked leaves the queue consistent (every method mutates it last).
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl PyBatcher {
    #[new]
    #[pyo3(signature = (num_layers, num_experts, max_batch, max_wait, policy))]
    fn new(
        num_layers: usize,
        num_experts: usize,
        max_batch: usize,
        max_wait: u64,
        policy: &str,
    ) -> PyResult<Self> {
        let batcher =
            Batcher::new(num_layers, num_experts, rules(max_batch, max_wait, policy)?).map_err(to_pyerr)?;
        Ok(PyBatcher { inner: Mutex::new(batcher) })
    }

    /// Queues request `request_id` with experts `[L, k]` (int64, -1 = none).
    fn push(&self, request_id: i64, experts: &Bound<'_, PyAny>) -> PyResult<()> {
        let experts = readonly::<i64>(experts, "experts")?;
        let experts = slice::<i64>(&experts, "experts")?;
        self.lock().push(request_id, experts).map_err(to_pyerr)
    }

    /// `(request ids, distinct (layer, expert) pairs, round)` of the next batch.
    fn next_batch(&self, py: Python<'_>) -> (Vec<i64>, usize, u64) {
        let batch = py.detach(|| self.lock().next_batch());
        (batch.requests, batch.distinct_experts, batch.round)
    }

    fn pending(&self) -> usize {
        self.lock().pending()
    }

    fn round(&self) -> u64 {
        self.lock().round()
    }
}

/// Replays arrivals through a batcher: `(requests [R] by batch, offsets [N + 1],
/// distinct [N], rounds [N])`.
#[pyfunction]
#[pyo3(signature = (experts, num_experts, arrivals, max_batch, max_wait, policy))]
pub fn replay_batching<'py>(
    py: Python<'py>,
    experts: &Bound<'py, PyAny>,
    num_experts: usize,
    arrivals: &Bound<'py, PyAny>,
    max_batch: usize,
    max_wait: u64,
    policy: &str,
) -> PyResult<[Bound<'py, PyArray1<i64>>; 4]> {
    let rules = rules(max_batch, max_wait, policy)?;
    let experts = readonly::<i64>(experts, "experts")?;
    let [num_requests, num_layers, _] = shape::<_, 3>(&experts, "experts")?;
    let experts = slice::<i64>(&experts, "experts")?;
    let arrivals = readonly::<i64>(arrivals, "arrivals")?;
    let arrivals = slice::<i64>(&arrivals, "arrivals")?;
    let batches = py
        .detach(|| batching::replay_batching(experts, num_requests, num_layers, num_experts, arrivals, rules))
        .map_err(to_pyerr)?;
    let mut requests = Vec::with_capacity(num_requests);
    let mut offsets = vec![0i64];
    for batch in &batches {
        requests.extend_from_slice(&batch.requests);
        offsets.push(requests.len() as i64);
    }
    let distinct = batches.iter().map(|b| b.distinct_experts as i64).collect();
    let rounds = batches.iter().map(|b| b.round as i64).collect();
    Ok([requests, offsets, distinct, rounds].map(|v| PyArray1::from_vec(py, v)))
}

/// The loads of a prefetch plan as rows `[layer, expert, evict layer, evict expert,
/// needed_by, issue_during]` (-1, -1 for no eviction).
#[pyfunction]
#[pyo3(signature = (resident, layers, experts, offsets, capacity, depth))]
pub fn prefetch_plan<'py>(
    py: Python<'py>,
    resident: &Bound<'py, PyAny>,
    layers: &Bound<'py, PyAny>,
    experts: &Bound<'py, PyAny>,
    offsets: &Bound<'py, PyAny>,
    capacity: usize,
    depth: usize,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let resident = readonly::<i64>(resident, "resident")?;
    let resident: Vec<(i64, i64)> =
        slice::<i64>(&resident, "resident")?.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    let layers = readonly::<i64>(layers, "layers")?;
    let layers = slice::<i64>(&layers, "layers")?;
    let experts = readonly::<i64>(experts, "experts")?;
    let experts = slice::<i64>(&experts, "experts")?;
    let offsets = readonly::<i64>(offsets, "offsets")?;
    let offsets = slice::<i64>(&offsets, "offsets")?;
    let upcoming: Vec<(i64, Vec<i64>)> = layers
        .iter()
        .enumerate()
        .map(|(j, &layer)| (layer, experts[offsets[j] as usize..offsets[j + 1] as usize].to_vec()))
        .collect();
    let plan =
        py.detach(|| batching::prefetch_plan(&resident, &upcoming, capacity, depth)).map_err(to_pyerr)?;
    let rows: Vec<Vec<i64>> = plan
        .iter()
        .map(|load| {
            let (evict_layer, evict_expert) = load.evict.unwrap_or((-1, -1));
            vec![load.key.0, load.key.1, evict_layer, evict_expert, load.needed_by as i64, load.issue_during]
        })
        .collect();
    if rows.is_empty() {
        return Ok(PyArray2::zeros(py, [0, 6], false));
    }
    PyArray2::from_vec2(py, &rows).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
}
