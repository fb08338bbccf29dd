//! Expert caches and trace replay (see `sparseroute_core::cache`): a replay function that
//! runs in chunks of steps (GIL released, progress reported between chunks) and a
//! thread-safe online cache.

use crate::arrays::{readonly, shape, slice};
use crate::errors::to_pyerr;
use crate::routing::run_kernel;
use pyo3::prelude::*;
use sparseroute_core::cache::{
    self, CacheStats, CapacityUnit, Key, Layout, OnlineCache, PolicyKind, PolicyOptions, Replay, Trace,
};
use std::sync::Mutex;

/// `(hits, misses, bytes_moved, stalls, evictions)`.
type StatsTuple = (u64, u64, u64, u64, u64);

fn stats_tuple(s: CacheStats) -> StatsTuple {
    (s.hits, s.misses, s.bytes_moved, s.stalls, s.evictions)
}

/// The layout from its optional arrays: `expert_bytes` int64 `[L * E]`, `aliases` int64
/// `[A, 4]` rows `(layer, expert, target layer, target expert)`.
fn layout(
    num_layers: usize,
    num_experts: usize,
    expert_bytes: Option<&Bound<'_, PyAny>>,
    aliases: Option<&Bound<'_, PyAny>>,
) -> PyResult<Layout> {
    let bytes = expert_bytes.map(|b| readonly::<i64>(b, "expert_bytes")).transpose()?;
    let bytes = bytes.as_ref().map(|b| slice::<i64>(b, "expert_bytes")).transpose()?;
    let pairs: Vec<(Key, Key)> = match aliases {
        None => Vec::new(),
        Some(aliases) => {
            let aliases = readonly::<i64>(aliases, "aliases")?;
            let [_, columns] = shape::<_, 2>(&aliases, "aliases")?;
            if columns != 4 {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "aliases: expected rows (layer, expert, target layer, target expert), got {columns} columns"
                )));
            }
            slice::<i64>(&aliases, "aliases")?.chunks_exact(4).map(|r| ((r[0], r[1]), (r[2], r[3]))).collect()
        }
    };
    Layout::new(num_layers, num_experts, bytes, &pairs).map_err(to_pyerr)
}

fn parse<T: std::str::FromStr<Err = sparseroute_core::CoreError>>(name: &str) -> PyResult<T> {
    name.parse().map_err(to_pyerr)
}

/// Replays the trace `experts` (int64 ids of visit `v` = step * L + layer at
/// `offsets[v]..offsets[v + 1]`) through a cache; calls `progress(steps_done)` after every
/// `chunk_steps` steps. Returns `(hits, misses, bytes_moved, stalls, evictions)`.
#[pyfunction]
#[pyo3(signature = (experts, offsets, num_layers, num_experts, capacity, capacity_unit, policy, window, expert_bytes, aliases, scores, decay, progress, chunk_steps))]
pub fn simulate_cache(
    py: Python<'_>,
    experts: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    num_layers: usize,
    num_experts: usize,
    capacity: u64,
    capacity_unit: &str,
    policy: &str,
    window: Option<u64>,
    expert_bytes: Option<&Bound<'_, PyAny>>,
    aliases: Option<&Bound<'_, PyAny>>,
    scores: Option<&Bound<'_, PyAny>>,
    decay: f64,
    progress: Option<&Bound<'_, PyAny>>,
    chunk_steps: usize,
) -> PyResult<StatsTuple> {
    let unit: CapacityUnit = parse(capacity_unit)?;
    let kind: PolicyKind = parse(policy)?;
    let layout = layout(num_layers, num_experts, expert_bytes, aliases)?;
    let scores = scores.map(|s| readonly::<f64>(s, "scores")).transpose()?;
    let scores = scores.as_ref().map(|s| slice::<f64>(s, "scores")).transpose()?;
    let options = PolicyOptions { window, scores, decay };
    let experts = readonly::<i64>(experts, "experts")?;
    let experts = slice::<i64>(&experts, "experts")?;
    let offsets = readonly::<i64>(offsets, "offsets")?;
    let offsets = slice::<i64>(&offsets, "offsets")?;
    let trace = run_kernel(py, 1, 0, || Trace::new(&layout, experts, offsets))?;
    let mut replay = run_kernel(py, 1, 0, || Replay::new(&trace, &layout, capacity, unit, kind, &options))?;
    loop {
        let done = run_kernel(py, 1, 0, || replay.run_steps(chunk_steps.max(1)))?;
        if let Some(progress) = progress {
            progress.call1((done,))?;
        }
        // Between chunks, let Ctrl-C stop a long replay.
        py.check_signals()?;
        if replay.is_done() {
            return Ok(stats_tuple(replay.stats()));
        }
    }
}

/// An expert cache driven one layer at a time (thread-safe: every method locks it).
#[pyclass(frozen, name = "ExpertCache", module = "sparseroute._core")]
pub struct PyExpertCache {
    inner: Mutex<OnlineCache>,
}

impl PyExpertCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, OnlineCache> {
        // Every method validates before it mutates, so a panic cannot leave half a visit.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl PyExpertCache {
    #[new]
    #[pyo3(signature = (num_layers, num_experts, capacity, capacity_unit, policy, expert_bytes, aliases, scores, decay))]
    fn new(
        num_layers: usize,
        num_experts: usize,
        capacity: u64,
        capacity_unit: &str,
        policy: &str,
        expert_bytes: Option<&Bound<'_, PyAny>>,
        aliases: Option<&Bound<'_, PyAny>>,
        scores: Option<&Bound<'_, PyAny>>,
        decay: f64,
    ) -> PyResult<Self> {
        let unit: CapacityUnit = parse(capacity_unit)?;
        let kind: PolicyKind = parse(policy)?;
        let layout = layout(num_layers, num_experts, expert_bytes, aliases)?;
        let scores = scores.map(|s| readonly::<f64>(s, "scores")).transpose()?;
        let scores = scores.as_ref().map(|s| slice::<f64>(s, "scores")).transpose()?;
        let options = PolicyOptions { window: None, scores, decay };
        let cache = OnlineCache::new(layout, capacity, unit, kind, &options).map_err(to_pyerr)?;
        Ok(PyExpertCache { inner: Mutex::new(cache) })
    }

    /// Runs `layer` needing `experts`; returns the (layer, expert) keys loaded and evicted.
    fn access(&self, py: Python<'_>, layer: i64, experts: Vec<i64>) -> PyResult<(Vec<Key>, Vec<Key>)> {
        let access: cache::Access = py.detach(|| self.lock().access(layer, &experts)).map_err(to_pyerr)?;
        Ok((access.loaded, access.evicted))
    }

    fn lookup(&self, layer: i64, expert: i64) -> PyResult<bool> {
        self.lock().lookup(layer, expert).map_err(to_pyerr)
    }

    fn evict_candidate(&self) -> Option<Key> {
        self.lock().evict_candidate()
    }

    fn resident(&self) -> Vec<Key> {
        self.lock().resident()
    }

    fn used(&self) -> u64 {
        self.lock().used()
    }

    /// `(hits, misses, bytes_moved, stalls, evictions)` so far.
    fn stats(&self) -> StatsTuple {
        stats_tuple(self.lock().stats())
    }
}
