//! Expert placement for expert-parallel serving (see `sparseroute_core::placement`):
//! EPLB-style plans, the round-robin baseline, incremental rebalancing and replica maps.

use crate::arrays::{readonly, readwrite, shape, slice, slice_mut};
use crate::errors::to_pyerr;
use crate::routing::run_kernel;
use numpy::PyReadwriteArrayDyn;
use pyo3::prelude::*;
use sparseroute_core::placement::{
    self, Method, PlanBuffers, RebalanceBuffers, RebalanceSettings, ReplicaPolicy, ReplicaTable, Topology,
};

/// Rough element-operations of planning `layers` layers, for the inline-or-pool choice:
/// each layer sorts and heap-packs its `P + E` items.
fn plan_work(layers: usize, topo: &Topology) -> usize {
    layers * (topo.num_slots + topo.num_experts) * 16
}

/// The five output arrays of a plan, held while their slices are lent to the kernel.
struct PlanArrays<'py> {
    physical_to_logical: PyReadwriteArrayDyn<'py, i64>,
    replica_counts: PyReadwriteArrayDyn<'py, i64>,
    gpu_load: PyReadwriteArrayDyn<'py, f64>,
    imbalance: PyReadwriteArrayDyn<'py, f64>,
    lower_bound: PyReadwriteArrayDyn<'py, f64>,
}

impl<'py> PlanArrays<'py> {
    fn new(
        physical_to_logical: &Bound<'py, PyAny>,
        replica_counts: &Bound<'py, PyAny>,
        gpu_load: &Bound<'py, PyAny>,
        imbalance: &Bound<'py, PyAny>,
        lower_bound: &Bound<'py, PyAny>,
    ) -> PyResult<Self> {
        Ok(PlanArrays {
            physical_to_logical: readwrite(physical_to_logical, "physical_to_logical")?,
            replica_counts: readwrite(replica_counts, "replica_counts")?,
            gpu_load: readwrite(gpu_load, "gpu_load")?,
            imbalance: readwrite(imbalance, "imbalance")?,
            lower_bound: readwrite(lower_bound, "lower_bound")?,
        })
    }

    fn buffers(&mut self) -> PyResult<PlanBuffers<'_>> {
        Ok(PlanBuffers {
            physical_to_logical: slice_mut(&mut self.physical_to_logical, "physical_to_logical")?,
            replica_counts: slice_mut(&mut self.replica_counts, "replica_counts")?,
            gpu_load: slice_mut(&mut self.gpu_load, "gpu_load")?,
            imbalance: slice_mut(&mut self.imbalance, "imbalance")?,
            lower_bound: slice_mut(&mut self.lower_bound, "lower_bound")?,
        })
    }
}

/// Fills the plan outputs of `load` [L, E] (float64); returns the method used.
#[pyfunction]
#[pyo3(signature = (load, num_slots, num_nodes, gpus_per_node, num_groups, method, physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound, threads))]
pub fn plan_placement(
    py: Python<'_>,
    load: &Bound<'_, PyAny>,
    num_slots: usize,
    num_nodes: usize,
    gpus_per_node: usize,
    num_groups: Option<usize>,
    method: &str,
    physical_to_logical: &Bound<'_, PyAny>,
    replica_counts: &Bound<'_, PyAny>,
    gpu_load: &Bound<'_, PyAny>,
    imbalance: &Bound<'_, PyAny>,
    lower_bound: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<&'static str> {
    let method: Method = method.parse().map_err(to_pyerr)?;
    let load = readonly::<f64>(load, "load")?;
    let [layers, num_experts] = shape::<_, 2>(&load, "load")?;
    let load = slice::<f64>(&load, "load")?;
    let topo = Topology { num_experts, num_slots, num_nodes, gpus_per_node, num_groups };
    let mut arrays = PlanArrays::new(physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound)?;
    let out = arrays.buffers()?;
    let used =
        run_kernel(py, threads, plan_work(layers, &topo), || placement::plan(load, &topo, method, out))?;
    Ok(used.name())
}

/// Fills the plan outputs of the round-robin baseline for `load` [L, E] (float64).
#[pyfunction]
#[pyo3(signature = (load, num_slots, num_nodes, gpus_per_node, physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound, threads))]
pub fn greedy_placement(
    py: Python<'_>,
    load: &Bound<'_, PyAny>,
    num_slots: usize,
    num_nodes: usize,
    gpus_per_node: usize,
    physical_to_logical: &Bound<'_, PyAny>,
    replica_counts: &Bound<'_, PyAny>,
    gpu_load: &Bound<'_, PyAny>,
    imbalance: &Bound<'_, PyAny>,
    lower_bound: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let load = readonly::<f64>(load, "load")?;
    let [layers, num_experts] = shape::<_, 2>(&load, "load")?;
    let load = slice::<f64>(&load, "load")?;
    let topo = Topology { num_experts, num_slots, num_nodes, gpus_per_node, num_groups: None };
    let mut arrays = PlanArrays::new(physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound)?;
    let out = arrays.buffers()?;
    run_kernel(py, threads, plan_work(layers, &topo), || placement::greedy(load, &topo, out))
}

/// Moves slots of `current` [L, P] (int64) towards `target_imbalance` under `load` [L, E]
/// (float64); fills the plan outputs, `moved_slots` [L] (int64) and `replanned` [L] (uint8).
#[pyfunction]
#[pyo3(signature = (current, load, num_nodes, gpus_per_node, num_groups, method, target_imbalance, max_moves, physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound, moved_slots, replanned, threads))]
pub fn rebalance_placement(
    py: Python<'_>,
    current: &Bound<'_, PyAny>,
    load: &Bound<'_, PyAny>,
    num_nodes: usize,
    gpus_per_node: usize,
    num_groups: Option<usize>,
    method: &str,
    target_imbalance: f64,
    max_moves: usize,
    physical_to_logical: &Bound<'_, PyAny>,
    replica_counts: &Bound<'_, PyAny>,
    gpu_load: &Bound<'_, PyAny>,
    imbalance: &Bound<'_, PyAny>,
    lower_bound: &Bound<'_, PyAny>,
    moved_slots: &Bound<'_, PyAny>,
    replanned: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let method: Method = method.parse().map_err(to_pyerr)?;
    let current = readonly::<i64>(current, "plan")?;
    let [_, num_slots] = shape::<_, 2>(&current, "plan")?;
    let current = slice::<i64>(&current, "plan")?;
    let load = readonly::<f64>(load, "load")?;
    let [layers, num_experts] = shape::<_, 2>(&load, "load")?;
    let load = slice::<f64>(&load, "load")?;
    let topo = Topology { num_experts, num_slots, num_nodes, gpus_per_node, num_groups };
    let mut arrays = PlanArrays::new(physical_to_logical, replica_counts, gpu_load, imbalance, lower_bound)?;
    let out = arrays.buffers()?;
    let mut moved = readwrite::<i64>(moved_slots, "moved_slots")?;
    let mut fell_back = readwrite::<u8>(replanned, "replanned")?;
    let stats = RebalanceBuffers {
        moved_slots: slice_mut(&mut moved, "moved_slots")?,
        replanned: slice_mut(&mut fell_back, "replanned")?,
    };
    let settings = RebalanceSettings { method, target_imbalance, max_moves };
    // Each move scans about P * (E + 2 * P / G) candidates: far more work per layer than a plan.
    let work = plan_work(layers, &topo) * 64;
    run_kernel(py, threads, work, || placement::rebalance(current, load, &topo, settings, out, stats))
}

/// Fills `out` [L, E, R] (int64) with each expert's slots (ascending, -1 padded) from
/// `physical_to_logical` [L, P] (int64).
#[pyfunction]
#[pyo3(signature = (physical_to_logical, out))]
pub fn logical_to_physical(
    py: Python<'_>,
    physical_to_logical: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let p2l = readonly::<i64>(physical_to_logical, "physical_to_logical")?;
    let [_, num_slots] = shape::<_, 2>(&p2l, "physical_to_logical")?;
    let p2l = slice::<i64>(&p2l, "physical_to_logical")?;
    let mut out = readwrite::<i64>(out, "out")?;
    let [_, num_experts, max_replicas] = shape::<_, 3>(&out, "out")?;
    let out = slice_mut::<i64>(&mut out, "out")?;
    run_kernel(py, 1, 0, || placement::logical_to_physical(p2l, num_slots, num_experts, max_replicas, out))
}

/// Maps logical expert ids `experts` [T, k] (int64, -1 = empty) to physical slots in `out`
/// with one layer's `logical_to_physical` [E, R] and `replica_counts` [E] (int64).
#[pyfunction]
#[pyo3(signature = (experts, logical_to_physical, replica_counts, num_slots, slots_per_gpu, policy, out))]
pub fn replica_map(
    py: Python<'_>,
    experts: &Bound<'_, PyAny>,
    logical_to_physical: &Bound<'_, PyAny>,
    replica_counts: &Bound<'_, PyAny>,
    num_slots: usize,
    slots_per_gpu: usize,
    policy: &str,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let policy: ReplicaPolicy = policy.parse().map_err(to_pyerr)?;
    let experts = readonly::<i64>(experts, "experts")?;
    let experts = slice::<i64>(&experts, "experts")?;
    let l2p = readonly::<i64>(logical_to_physical, "logical_to_physical")?;
    let l2p = slice::<i64>(&l2p, "logical_to_physical")?;
    let counts = readonly::<i64>(replica_counts, "replica_counts")?;
    let counts = slice::<i64>(&counts, "replica_counts")?;
    let mut out = readwrite::<i64>(out, "out")?;
    let out = slice_mut::<i64>(&mut out, "out")?;
    let table = ReplicaTable { logical_to_physical: l2p, replica_counts: counts, num_slots, slots_per_gpu };
    run_kernel(py, 1, 0, || placement::replica_map(experts, table, policy, out))
}
