//! Expert replication and placement for expert-parallel MoE serving.
//!
//! A layer has `E` logical experts with a measured load each (tokens routed, or an EMA of
//! them) and `P >= E` physical slots spread evenly over `G = num_nodes * gpus_per_node`
//! GPUs (`P / G` slots per GPU). A placement gives every slot one logical expert, every
//! expert at least one slot, and splits an expert's load evenly over its `r_e` replicas,
//! so GPU `g` carries `sum over its slots s of load[e(s)] / r[e(s)]`. The goal is a small
//! maximum GPU load; `imbalance = max GPU load / mean GPU load` (1 when nothing is loaded).
//!
//! The methods follow the semantics of DeepSeek's EPLB:
//!
//! * **hierarchical**: expert groups (consecutive ranges of `E / num_groups` experts) are
//!   packed onto nodes by balanced packing of their summed loads, so that group-limited
//!   routing keeps its traffic on few nodes; each node then replicates its own experts into
//!   its `P / num_nodes` slots (`replicate`) and packs the replicas onto its GPUs.
//! * **global**: all experts are replicated into all `P` slots, then packed onto all GPUs.
//!
//! Tie rules (all deterministic, none depending on the thread count):
//! * `replicate`: each extra replica goes to the expert with the largest `load / replicas`;
//!   equal values -> the lower expert id.
//! * `pack`: items in order of weight descending, equal weights -> lower item index (for
//!   replicas: lower expert id, then lower replica number); each goes to the least-loaded
//!   bin that still has room, equal loads -> the lower bin index.
//! * Within a GPU, slots hold their experts in ascending id order; a node's GPUs and a
//!   GPU's slots are numbered consecutively (slot `s` is on GPU `s / (P / G)`, GPU `g` on
//!   node `g / gpus_per_node`).
//!
//! Layers are independent and planned in parallel with [`map_collect`]; each layer is
//! computed by one thread in a fixed order, so results are identical for any thread count.

use crate::error::{check_len, CoreError, Result};
use crate::threads::map_collect;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::str::FromStr;

/// How a plan is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Hierarchical when `num_groups` is given and `num_nodes` divides it, global otherwise
    /// (EPLB's rule).
    Auto,
    Hierarchical,
    Global,
}

impl FromStr for Method {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Method::Auto),
            "hierarchical" => Ok(Method::Hierarchical),
            "global" => Ok(Method::Global),
            other => {
                Err(CoreError::invalid("method", "'auto', 'hierarchical' or 'global'", format!("{other:?}")))
            }
        }
    }
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::Hierarchical => "hierarchical",
            Method::Global => "global",
        }
    }
}

/// How [`replica_map`] chooses among the replicas (physical slots) of a logical expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaPolicy {
    /// The n-th occurrence of expert `e` (row-major) goes to replica `n mod r_e`.
    RoundRobin,
    /// Each occurrence goes to the replica whose GPU has received the fewest tokens so far
    /// in this call; equal counts -> the replica that has itself received fewer (two
    /// replicas can share a GPU), then the lower replica number.
    Load,
}

impl FromStr for ReplicaPolicy {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "round_robin" => Ok(ReplicaPolicy::RoundRobin),
            "load" => Ok(ReplicaPolicy::Load),
            other => Err(CoreError::invalid("policy", "'round_robin' or 'load'", format!("{other:?}"))),
        }
    }
}

/// The cluster and model shape a placement is computed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub num_experts: usize,
    pub num_slots: usize,
    pub num_nodes: usize,
    pub gpus_per_node: usize,
    /// Expert groups for the hierarchical method; `None` = every expert is its own group.
    pub num_groups: Option<usize>,
}

impl Topology {
    pub fn num_gpus(&self) -> usize {
        self.num_nodes * self.gpus_per_node
    }

    pub fn slots_per_gpu(&self) -> usize {
        self.num_slots / self.num_gpus().max(1)
    }

    fn groups(&self) -> usize {
        self.num_groups.unwrap_or(self.num_experts)
    }

    fn group_size(&self) -> usize {
        self.num_experts / self.groups().max(1)
    }

    /// Checks the sizes, and the hierarchical method's constraint when `method` is it.
    pub fn validate(&self, method: Method) -> Result<()> {
        let (e, p) = (self.num_experts, self.num_slots);
        if e == 0 {
            return Err(CoreError::invalid("load", "at least one expert (E >= 1)", "E = 0"));
        }
        if self.num_nodes == 0 {
            return Err(CoreError::invalid("num_nodes", "at least 1", "0"));
        }
        if self.gpus_per_node == 0 {
            return Err(CoreError::invalid("gpus_per_node", "at least 1", "0"));
        }
        if self.num_nodes.checked_mul(self.gpus_per_node).is_none() {
            return Err(CoreError::invalid(
                "gpus_per_node",
                "num_nodes * gpus_per_node to fit in a machine word",
                format!("{} * {}", self.num_nodes, self.gpus_per_node),
            ));
        }
        if p < e {
            return Err(CoreError::invalid(
                "num_slots",
                format!("at least E = {e} (every expert needs a slot)"),
                format!("{p}"),
            ));
        }
        let gpus = self.num_gpus();
        if p % gpus != 0 {
            return Err(CoreError::invalid(
                "num_slots",
                format!("a multiple of the GPU count num_nodes * gpus_per_node = {gpus}"),
                format!("{p}"),
            ));
        }
        if let Some(groups) = self.num_groups {
            if groups == 0 || e % groups != 0 {
                return Err(CoreError::invalid(
                    "num_groups",
                    format!("a divisor of E = {e} (groups of equal size)"),
                    format!("{groups}"),
                ));
            }
        }
        if method == Method::Hierarchical && !self.groups().is_multiple_of(self.num_nodes) {
            // The hierarchical method puts equally many groups on every node.
            return Err(match self.num_groups {
                Some(groups) => CoreError::invalid(
                    "num_groups",
                    format!("a multiple of num_nodes = {} for the hierarchical method", self.num_nodes),
                    format!("{groups}"),
                ),
                None => CoreError::invalid(
                    "num_nodes",
                    format!(
                        "a divisor of E = {e} for the hierarchical method without num_groups \
                         (every expert its own group)"
                    ),
                    format!("{}", self.num_nodes),
                ),
            });
        }
        Ok(())
    }

    /// `Method::Auto` resolved by EPLB's rule.
    pub fn resolve(&self, method: Method) -> Method {
        match method {
            Method::Auto => match self.num_groups {
                Some(groups) if groups % self.num_nodes.max(1) == 0 => Method::Hierarchical,
                _ => Method::Global,
            },
            other => other,
        }
    }
}

/// Caller-allocated outputs of a placement of `L` layers.
pub struct PlanBuffers<'a> {
    /// `[L, P]` the logical expert of each physical slot.
    pub physical_to_logical: &'a mut [i64],
    /// `[L, E]` the replicas of each logical expert.
    pub replica_counts: &'a mut [i64],
    /// `[L, G]` each GPU's load, summed over its slots in slot order.
    pub gpu_load: &'a mut [f64],
    /// `[L]` max GPU load / mean GPU load (1 for a layer without load).
    pub imbalance: &'a mut [f64],
    /// `[L]` a lower bound on the imbalance of any placement (derived in `lower_bound` below).
    pub lower_bound: &'a mut [f64],
}

/// An f64 ordered by `total_cmp`; callers only build it from values >= +0.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Key(f64);

impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The integer image of a weight >= 0 that sorts like the weight: IEEE-754 bit patterns of
/// non-negative floats are ordered as the floats are (`-0.0` is mapped to `+0.0` first).
/// Integer keys make the sorts and heaps below a good deal faster than `total_cmp`.
fn bits(weight: f64) -> u64 {
    debug_assert!(weight >= 0.0, "weights are validated non-negative");
    (weight + 0.0).to_bits()
}

/// Replica counts (each >= 1, summing to `slots`) for `loads` (>= 0): starting from one
/// replica each, every extra replica goes to the expert with the largest
/// `load / replicas` (lower index on ties). This minimises `max_e load_e / replicas_e`
/// over all counts that sum to `slots` (it is Jefferson's / D'Hondt's apportionment),
/// which [`lower_bound`] relies on.
fn replicate(loads: &[f64], slots: usize) -> Vec<usize> {
    let mut counts = vec![1usize; loads.len()];
    if slots <= loads.len() {
        return counts;
    }
    let mut heap: BinaryHeap<(u64, Reverse<usize>)> =
        loads.iter().enumerate().map(|(e, &l)| (bits(l), Reverse(e))).collect();
    for _ in loads.len()..slots {
        let (_, Reverse(e)) = heap.pop().expect("at least one expert");
        counts[e] += 1;
        heap.push((bits(loads[e] / counts[e] as f64), Reverse(e)));
    }
    counts
}

/// Balanced packing of weights (>= 0): the bin (in `0..bins`) of each item, every bin
/// receiving exactly `capacity` items (`weights.len() == bins * capacity`). Items go in
/// order of weight descending (lower index first on ties), each to the least-loaded bin
/// with room (lower bin first on ties).
fn pack(weights: &[f64], bins: usize, capacity: usize) -> Vec<usize> {
    debug_assert_eq!(weights.len(), bins * capacity);
    // (inverted weight, index) ascending = weight descending, then index ascending.
    let mut order: Vec<(u64, usize)> = weights.iter().enumerate().map(|(i, &w)| (!bits(w), i)).collect();
    order.sort_unstable();
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = (0..bins).map(|b| Reverse((bits(0.0), b))).collect();
    let (mut load, mut filled) = (vec![0.0f64; bins], vec![0usize; bins]);
    let mut bin_of = vec![0usize; weights.len()];
    for (_, item) in order {
        let Reverse((_, bin)) = heap.pop().expect("a bin with room is left while items are");
        bin_of[item] = bin;
        filled[bin] += 1;
        load[bin] += weights[item];
        if filled[bin] < capacity {
            heap.push(Reverse((bits(load[bin]), bin)));
        }
    }
    bin_of
}

/// One layer's placement: the expert of each slot and the replicas of each expert.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    slots: Vec<usize>,
    counts: Vec<usize>,
}

/// A layer's loads with -0.0 turned into +0.0, so that ties compare equal.
fn layer_loads(row: &[f64]) -> Vec<f64> {
    row.iter().map(|&v| v + 0.0).collect()
}

fn check_loads(load: &[f64], num_experts: usize) -> Result<usize> {
    if !load.len().is_multiple_of(num_experts) {
        return Err(CoreError::invalid(
            "load",
            format!("[L, E] with E = {num_experts}"),
            format!("{} elements", load.len()),
        ));
    }
    if let Some(i) = load.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
        return Err(CoreError::invalid(
            "load",
            "finite values >= 0",
            format!("{} at layer {}, expert {}", load[i], i / num_experts, i % num_experts),
        ));
    }
    Ok(load.len() / num_experts)
}

/// Places `node_experts[n]` (ascending ids) on node `n`'s `slots_per_node` slots and
/// `gpus_per_node` GPUs: replicate within the node, then pack the replicas onto its GPUs.
fn place_nodes(loads: &[f64], node_experts: &[Vec<usize>], topo: &Topology, gpus_per_node: usize) -> Layout {
    let m = topo.slots_per_gpu();
    let slots_per_node = m * gpus_per_node;
    let mut layout = Layout { slots: vec![0; topo.num_slots], counts: vec![0; topo.num_experts] };
    let mut node_loads = Vec::new();
    let (mut replica_expert, mut replica_weight) = (Vec::new(), Vec::new());
    let mut gpu_experts: Vec<Vec<usize>> = vec![Vec::with_capacity(m); gpus_per_node];
    for (node, experts) in node_experts.iter().enumerate() {
        node_loads.clear();
        node_loads.extend(experts.iter().map(|&e| loads[e]));
        let counts = replicate(&node_loads, slots_per_node);
        replica_expert.clear();
        replica_weight.clear();
        for (&e, &c) in experts.iter().zip(&counts) {
            layout.counts[e] = c;
            let weight = loads[e] / c as f64;
            for _ in 0..c {
                replica_expert.push(e);
                replica_weight.push(weight);
            }
        }
        let bins = pack(&replica_weight, gpus_per_node, m);
        gpu_experts.iter_mut().for_each(Vec::clear);
        for (&e, &bin) in replica_expert.iter().zip(&bins) {
            gpu_experts[bin].push(e);
        }
        for (local, experts) in gpu_experts.iter_mut().enumerate() {
            experts.sort_unstable();
            let first = (node * gpus_per_node + local) * m;
            layout.slots[first..first + m].copy_from_slice(experts);
        }
    }
    layout
}

/// The experts of each node when groups are packed onto nodes by their summed load.
fn group_nodes(loads: &[f64], topo: &Topology) -> Vec<Vec<usize>> {
    let (groups, size) = (topo.groups(), topo.group_size());
    let group_loads: Vec<f64> = (0..groups).map(|g| loads[g * size..(g + 1) * size].iter().sum()).collect();
    let node_of = pack(&group_loads, topo.num_nodes, groups / topo.num_nodes);
    let mut node_experts = vec![Vec::new(); topo.num_nodes];
    for (g, &node) in node_of.iter().enumerate() {
        node_experts[node].extend(g * size..(g + 1) * size);
    }
    node_experts
}

/// One layer with the hierarchical or the global method.
fn plan_layer(loads: &[f64], topo: &Topology, method: Method) -> Layout {
    match method {
        Method::Hierarchical => place_nodes(loads, &group_nodes(loads, topo), topo, topo.gpus_per_node),
        Method::Global | Method::Auto => {
            place_nodes(loads, &[(0..topo.num_experts).collect()], topo, topo.num_gpus())
        }
    }
}

/// The straightforward baseline for one layer: one replica per expert, the extra `P - E`
/// replicas to the experts in order of load descending (lower id on ties; cycling when
/// `P - E > E`), and replica number `i` of the sequence "experts 0..E, then the extras" on
/// GPU `i mod G`, at position `i div G` within it.
fn greedy_layer(loads: &[f64], topo: &Topology) -> Layout {
    let (e, p, gpus, m) = (topo.num_experts, topo.num_slots, topo.num_gpus(), topo.slots_per_gpu());
    let mut order: Vec<(u64, usize)> = loads.iter().enumerate().map(|(i, &l)| (!bits(l), i)).collect();
    order.sort_unstable();
    let sequence: Vec<usize> = (0..e).chain((0..p - e).map(|i| order[i % e].1)).collect();
    let mut layout = Layout { slots: vec![0; p], counts: vec![0; e] };
    for (i, &expert) in sequence.iter().enumerate() {
        layout.slots[(i % gpus) * m + i / gpus] = expert;
        layout.counts[expert] += 1;
    }
    layout
}

/// Each GPU's load, summed over its slots in slot order.
fn gpu_loads(loads: &[f64], layout: &Layout, m: usize, out: &mut [f64]) {
    for (load, slots) in out.iter_mut().zip(layout.slots.chunks_exact(m)) {
        *load = slots.iter().map(|&e| loads[e] / layout.counts[e] as f64).sum();
    }
}

/// `max / mean` of GPU loads (1 when all are 0).
fn imbalance_of(gpu_load: &[f64]) -> f64 {
    let total: f64 = gpu_load.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    gpu_load.iter().copied().fold(0.0, f64::max) * gpu_load.len() as f64 / total
}

/// A lower bound on the imbalance of any placement of one layer (with or without the
/// group constraint):
///
/// * the hottest GPU carries at least the mean, so `max >= total / G`;
/// * it also carries at least one whole replica, and some replica weighs
///   `W* = min over replica counts r (r_e >= 1, sum r_e = P) of max_e load_e / r_e`, which
///   [`replicate`] attains; so `max >= W*`.
///
/// Divided by the mean: `max(1, W* * G / total)` (1 when nothing is loaded).
fn lower_bound(loads: &[f64], num_slots: usize, num_gpus: usize) -> f64 {
    let total: f64 = loads.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    let counts = replicate(loads, num_slots);
    let heaviest = loads.iter().zip(&counts).map(|(&l, &c)| l / c as f64).fold(0.0, f64::max);
    (heaviest * num_gpus as f64 / total).max(1.0)
}

/// One layer's placement with its statistics, computed on the thread that planned it.
struct Planned {
    layout: Layout,
    gpu_load: Vec<f64>,
    imbalance: f64,
    lower_bound: f64,
}

impl Planned {
    fn new(loads: &[f64], layout: Layout, topo: &Topology) -> Self {
        let mut gpu_load = vec![0.0; topo.num_gpus()];
        gpu_loads(loads, &layout, topo.slots_per_gpu(), &mut gpu_load);
        let imbalance = imbalance_of(&gpu_load);
        let lower_bound = lower_bound(loads, topo.num_slots, topo.num_gpus());
        Planned { layout, gpu_load, imbalance, lower_bound }
    }
}

/// Copies per-layer results into `out`.
fn write_layouts(layers: &[Planned], topo: &Topology, out: PlanBuffers<'_>) {
    let (p, e, g) = (topo.num_slots, topo.num_experts, topo.num_gpus());
    for (l, planned) in layers.iter().enumerate() {
        for (o, &s) in out.physical_to_logical[l * p..(l + 1) * p].iter_mut().zip(&planned.layout.slots) {
            *o = s as i64;
        }
        for (o, &c) in out.replica_counts[l * e..(l + 1) * e].iter_mut().zip(&planned.layout.counts) {
            *o = c as i64;
        }
        out.gpu_load[l * g..(l + 1) * g].copy_from_slice(&planned.gpu_load);
        out.imbalance[l] = planned.imbalance;
        out.lower_bound[l] = planned.lower_bound;
    }
}

fn check_buffers(num_layers: usize, topo: &Topology, out: &PlanBuffers<'_>) -> Result<()> {
    check_len("physical_to_logical", out.physical_to_logical, num_layers * topo.num_slots)?;
    check_len("replica_counts", out.replica_counts, num_layers * topo.num_experts)?;
    check_len("gpu_load", out.gpu_load, num_layers * topo.num_gpus())?;
    check_len("imbalance", out.imbalance, num_layers)?;
    check_len("lower_bound", out.lower_bound, num_layers)
}

/// Plans every layer of `load` `[L, E]` (finite, >= 0) with `method`; returns the method
/// used (`Auto` resolved).
pub fn plan(load: &[f64], topo: &Topology, method: Method, out: PlanBuffers<'_>) -> Result<Method> {
    let method = topo.resolve(method);
    topo.validate(method)?;
    let num_layers = check_loads(load, topo.num_experts)?;
    check_buffers(num_layers, topo, &out)?;
    let layers: Vec<usize> = (0..num_layers).collect();
    let e = topo.num_experts;
    let layouts = map_collect(&layers, |_, &l| {
        let loads = layer_loads(&load[l * e..(l + 1) * e]);
        let layout = plan_layer(&loads, topo, method);
        Ok(Planned::new(&loads, layout, topo))
    })?;
    write_layouts(&layouts, topo, out);
    Ok(method)
}

/// The baseline of `greedy_layer` for every layer of `load` `[L, E]`.
pub fn greedy(load: &[f64], topo: &Topology, out: PlanBuffers<'_>) -> Result<()> {
    topo.validate(Method::Global)?;
    let num_layers = check_loads(load, topo.num_experts)?;
    check_buffers(num_layers, topo, &out)?;
    let layers: Vec<usize> = (0..num_layers).collect();
    let e = topo.num_experts;
    let layouts = map_collect(&layers, |_, &l| {
        let loads = layer_loads(&load[l * e..(l + 1) * e]);
        let layout = greedy_layer(&loads, topo);
        Ok(Planned::new(&loads, layout, topo))
    })?;
    write_layouts(&layouts, topo, out);
    Ok(())
}

// --- incremental rebalancing ---------------------------------------------------------------

/// What [`rebalance`] did to each layer, besides the new placement.
pub struct RebalanceBuffers<'a> {
    /// `[L]` slots whose logical expert differs from the current placement.
    pub moved_slots: &'a mut [i64],
    /// `[L]` 1 where the moves could not reach the target and a full re-plan was used.
    pub replanned: &'a mut [u8],
}

/// Settings of one [`rebalance`] call.
#[derive(Clone, Copy, Debug)]
pub struct RebalanceSettings {
    /// `Hierarchical` keeps every group on the node it is on; `Global` moves freely.
    pub method: Method,
    /// Stop once `max / mean <= target_imbalance`.
    pub target_imbalance: f64,
    /// At most this many moves (a swap or a reassignment each) per layer.
    pub max_moves: usize,
}

/// A candidate move and how good it is.
#[derive(Clone, Copy, Debug)]
enum Move {
    /// Exchange the experts of two slots on different GPUs.
    Swap(usize, usize),
    /// Give slot `.0` to expert `.1` (its old expert keeps at least one replica).
    Reassign(usize, usize),
}

impl Move {
    fn slots_changed(self) -> usize {
        match self {
            Move::Swap(..) => 2,
            Move::Reassign(..) => 1,
        }
    }
}

/// Ranking of candidates: one that reaches the target wins over one that does not; among
/// those that do, fewer changed slots first, then the lower resulting maximum; among those
/// that do not, the lower resulting maximum first, then fewer changed slots. `touched` (the
/// largest new load among the GPUs the move changes) breaks what remains, then the order
/// of discovery.
#[derive(Clone, Copy, Debug)]
struct Score {
    reaches: bool,
    max: f64,
    touched: f64,
    slots: usize,
}

impl Score {
    fn better_than(&self, other: &Score) -> bool {
        let (max, other_max) = (Key(self.max), Key(other.max));
        let ordering = match (self.reaches, other.reaches) {
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (true, true) => self.slots.cmp(&other.slots).then(max.cmp(&other_max)),
            (false, false) => max.cmp(&other_max).then(self.slots.cmp(&other.slots)),
        };
        ordering.then(Key(self.touched).cmp(&Key(other.touched))) == Ordering::Less
    }
}

/// The mutable state of one layer during incremental rebalancing.
struct Rebalancer<'a> {
    loads: &'a [f64],
    topo: &'a Topology,
    layout: Layout,
    /// The node each expert must stay on (hierarchical), or `None`.
    expert_node: Option<Vec<usize>>,
    gpu_load: Vec<f64>,
    /// GPUs by load descending (lower index first on ties).
    by_load: Vec<usize>,
    /// The slots of each expert, ascending: `expert_slots[start[e]..start[e + 1]]`.
    start: Vec<usize>,
    expert_slots: Vec<usize>,
}

/// New loads of the few GPUs a move touches: `(gpu, delta)` pairs.
#[derive(Default)]
struct Touched(Vec<(usize, f64)>);

impl Touched {
    fn add(&mut self, gpu: usize, delta: f64) {
        match self.0.iter_mut().find(|(g, _)| *g == gpu) {
            Some((_, d)) => *d += delta,
            None => self.0.push((gpu, delta)),
        }
    }
}

impl<'a> Rebalancer<'a> {
    fn new(loads: &'a [f64], topo: &'a Topology, layout: Layout, expert_node: Option<Vec<usize>>) -> Self {
        let g = topo.num_gpus();
        let mut r = Rebalancer {
            loads,
            topo,
            layout,
            expert_node,
            gpu_load: vec![0.0; g],
            by_load: (0..g).collect(),
            start: vec![0; topo.num_experts + 1],
            expert_slots: vec![0; topo.num_slots],
        };
        r.refresh();
        r
    }

    /// Recomputes loads, the load order and the slot lists from the layout (from scratch,
    /// so that rounding never accumulates over moves).
    fn refresh(&mut self) {
        let m = self.topo.slots_per_gpu();
        gpu_loads(self.loads, &self.layout, m, &mut self.gpu_load);
        let loads = &self.gpu_load;
        self.by_load.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
        self.start.fill(0);
        for &e in &self.layout.slots {
            self.start[e + 1] += 1;
        }
        for e in 0..self.topo.num_experts {
            self.start[e + 1] += self.start[e];
        }
        let mut next = self.start.clone();
        for (s, &e) in self.layout.slots.iter().enumerate() {
            self.expert_slots[next[e]] = s;
            next[e] += 1;
        }
    }

    fn weight(&self, e: usize) -> f64 {
        self.loads[e] / self.layout.counts[e] as f64
    }

    fn gpu(&self, slot: usize) -> usize {
        slot / self.topo.slots_per_gpu()
    }

    fn node(&self, gpu: usize) -> usize {
        gpu / self.topo.gpus_per_node
    }

    fn slots_of(&self, e: usize) -> &[usize] {
        &self.expert_slots[self.start[e]..self.start[e + 1]]
    }

    /// Whether expert `e` may have a replica on `gpu`.
    fn allowed(&self, e: usize, gpu: usize) -> bool {
        self.expert_node.as_ref().is_none_or(|nodes| nodes[e] == self.node(gpu))
    }

    /// The largest load among GPUs not in `touched`.
    fn max_untouched(&self, touched: &Touched) -> f64 {
        self.by_load
            .iter()
            .find(|g| !touched.0.iter().any(|(t, _)| t == *g))
            .map_or(0.0, |&g| self.gpu_load[g])
    }

    /// Scores a move from its touched GPUs, or `None` if some touched GPU would not end
    /// below the current maximum `max` (the move would not make progress).
    fn score(&self, touched: &Touched, mov: Move, max: f64, target: f64) -> Option<Score> {
        // A relative margin keeps rounding from passing for progress.
        let limit = max * (1.0 - 1e-12);
        let mut highest = 0.0f64;
        for &(g, delta) in &touched.0 {
            let new = self.gpu_load[g] + delta;
            if new >= limit {
                return None;
            }
            highest = highest.max(new);
        }
        let result = highest.max(self.max_untouched(touched));
        Some(Score { reaches: result <= target, max: result, touched: highest, slots: mov.slots_changed() })
    }

    /// The touched GPUs of "slot `s` changes from its expert to `y`".
    fn reassign_touched(&self, s: usize, y: usize) -> Touched {
        let x = self.layout.slots[s];
        let (cx, cy) = (self.layout.counts[x] as f64, self.layout.counts[y] as f64);
        let (wx, wy) = (self.loads[x] / cx, self.loads[y] / cy);
        let (wx_new, wy_new) = (self.loads[x] / (cx - 1.0), self.loads[y] / (cy + 1.0));
        let mut touched = Touched::default();
        for &t in self.slots_of(x) {
            touched.add(self.gpu(t), wx_new - wx);
        }
        for &t in self.slots_of(y) {
            touched.add(self.gpu(t), wy_new - wy);
        }
        touched.add(self.gpu(s), wy_new - wx_new);
        touched
    }

    /// The best progress-making move from the hottest GPU, if any.
    fn best_move(&self, max: f64, target: f64) -> Option<Move> {
        let m = self.topo.slots_per_gpu();
        let hot = self.by_load[0];
        let hot_slots = hot * m..(hot + 1) * m;
        let mut best: Option<(Score, Move)> = None;
        let mut consider = |score: Option<Score>, mov: Move| {
            if let Some(score) = score {
                if best.as_ref().is_none_or(|(b, _)| score.better_than(b)) {
                    best = Some((score, mov));
                }
            }
        };
        // Reassign a slot of the hot GPU to another expert allowed there.
        for s in hot_slots.clone() {
            let x = self.layout.slots[s];
            if self.layout.counts[x] < 2 {
                continue;
            }
            for y in 0..self.topo.num_experts {
                if y != x && self.allowed(y, hot) {
                    let mov = Move::Reassign(s, y);
                    consider(self.score(&self.reassign_touched(s, y), mov, max, target), mov);
                }
            }
        }
        // Give an expert of the hot GPU one more replica, in a slot elsewhere.
        let mut hot_experts: Vec<usize> = self.layout.slots[hot_slots.clone()].to_vec();
        hot_experts.sort_unstable();
        hot_experts.dedup();
        for s in 0..self.topo.num_slots {
            let (g, x) = (self.gpu(s), self.layout.slots[s]);
            if g == hot || self.layout.counts[x] < 2 {
                continue;
            }
            for &y in &hot_experts {
                if y != x && self.allowed(y, g) {
                    let mov = Move::Reassign(s, y);
                    consider(self.score(&self.reassign_touched(s, y), mov, max, target), mov);
                }
            }
        }
        // Swap a slot of the hot GPU with a lighter replica elsewhere.
        for s in hot_slots {
            let x = self.layout.slots[s];
            let wx = self.weight(x);
            for t in 0..self.topo.num_slots {
                let (g, y) = (self.gpu(t), self.layout.slots[t]);
                if g == hot || y == x || !self.allowed(x, g) || !self.allowed(y, hot) {
                    continue;
                }
                let wy = self.weight(y);
                if wy >= wx {
                    continue;
                }
                let mut touched = Touched::default();
                touched.add(hot, wy - wx);
                touched.add(g, wx - wy);
                let mov = Move::Swap(s, t);
                consider(self.score(&touched, mov, max, target), mov);
            }
        }
        best.map(|(_, mov)| mov)
    }

    fn apply(&mut self, mov: Move) {
        match mov {
            Move::Swap(s, t) => self.layout.slots.swap(s, t),
            Move::Reassign(s, y) => {
                let x = self.layout.slots[s];
                self.layout.counts[x] -= 1;
                self.layout.counts[y] += 1;
                self.layout.slots[s] = y;
            }
        }
        self.refresh();
    }

    fn max_load(&self) -> f64 {
        self.gpu_load[self.by_load[0]]
    }

    /// Greedy moves until the target is met, no move makes progress, or the budget is spent.
    /// A move can lower the hottest GPU without lowering the maximum (another GPU is as hot);
    /// if the search then stops short of the target, the moves after the last one that
    /// lowered the maximum bought nothing, and are undone.
    fn run(&mut self, target_imbalance: f64, max_moves: usize) {
        let total: f64 = self.gpu_load.iter().sum();
        let target = target_imbalance * total / self.topo.num_gpus() as f64;
        let (mut best_max, mut best_layout, mut since_best) = (self.max_load(), self.layout.clone(), 0);
        for _ in 0..max_moves {
            let max = self.max_load();
            if total <= 0.0 || max <= target {
                break;
            }
            match self.best_move(max, target) {
                Some(mov) => self.apply(mov),
                None => break,
            }
            since_best += 1;
            if self.max_load() < best_max {
                (best_max, since_best) = (self.max_load(), 0);
                best_layout.clone_from(&self.layout);
            }
        }
        if since_best > 0 {
            self.layout = best_layout;
            self.refresh();
        }
    }
}

/// The node of every expert in `slots`, when each group sits on one node; an error naming
/// the first group found on two nodes otherwise.
fn expert_nodes(layer: usize, slots: &[usize], topo: &Topology) -> Result<Vec<usize>> {
    let slots_per_node = topo.slots_per_gpu() * topo.gpus_per_node;
    let size = topo.group_size();
    let mut group_node: Vec<Option<usize>> = vec![None; topo.groups()];
    for (s, &e) in slots.iter().enumerate() {
        let node = s / slots_per_node;
        let group = e / size;
        match group_node[group] {
            None => group_node[group] = Some(node),
            Some(other) if other != node => {
                return Err(CoreError::invalid(
                    "plan",
                    "a hierarchical placement (each expert group on one node)",
                    format!("group {group} on nodes {other} and {node} in layer {layer}"),
                ))
            }
            Some(_) => {}
        }
    }
    Ok((0..topo.num_experts).map(|e| group_node[e / size].expect("every expert has a slot")).collect())
}

/// Reads layer `layer` of a current placement, checking ids and that every expert has a slot.
fn read_layout(layer: usize, row: &[i64], num_experts: usize) -> Result<Layout> {
    let mut layout = Layout { slots: Vec::with_capacity(row.len()), counts: vec![0; num_experts] };
    for (s, &e) in row.iter().enumerate() {
        if e < 0 || e as u64 >= num_experts as u64 {
            return Err(CoreError::invalid(
                "plan",
                format!("physical_to_logical ids in [0, {num_experts})"),
                format!("{e} at layer {layer}, slot {s}"),
            ));
        }
        layout.slots.push(e as usize);
        layout.counts[e as usize] += 1;
    }
    if let Some(e) = layout.counts.iter().position(|&c| c == 0) {
        return Err(CoreError::invalid(
            "plan",
            "every logical expert on at least one slot",
            format!("expert {e} has none in layer {layer}"),
        ));
    }
    Ok(layout)
}

/// Multiset intersection size of two ascending lists.
fn overlap(a: &[usize], b: &[usize]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
            Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Greedy matching of `units` new units to old ones by largest overlap (then lower new
/// index, then lower old index): `result[new] = old`.
fn match_units(old: &[Vec<usize>], new: &[Vec<usize>]) -> Vec<usize> {
    let n = old.len();
    let mut pairs: Vec<(usize, usize, usize)> = (0..n).flat_map(|j| (0..n).map(move |i| (j, i, 0))).collect();
    for pair in &mut pairs {
        pair.2 = overlap(&new[pair.0], &old[pair.1]);
    }
    pairs.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    let (mut result, mut old_used) = (vec![usize::MAX; n], vec![false; n]);
    for (j, i, _) in pairs {
        if result[j] == usize::MAX && !old_used[i] {
            result[j] = i;
            old_used[i] = true;
        }
    }
    result
}

/// Renumbers the nodes and GPUs of a fresh plan `new` (which the method leaves free) and
/// orders the slots within each GPU so that as many slots as possible keep the expert they
/// have in `old`: nodes (hierarchical) and then GPUs (within a node, or across all for the
/// global method) are matched greedily by shared experts.
fn align(old: &[usize], new: &Layout, topo: &Topology, method: Method) -> Layout {
    let m = topo.slots_per_gpu();
    let sorted = |slots: &[usize], unit: usize| -> Vec<Vec<usize>> {
        slots
            .chunks_exact(unit)
            .map(|c| {
                let mut v = c.to_vec();
                v.sort_unstable();
                v
            })
            .collect()
    };
    // GPU `g` of the result takes the slots of GPU `source[g]` of `new`.
    let gpus = topo.num_gpus();
    let mut source: Vec<usize> = (0..gpus).collect();
    let (unit_gpus, units) = match method {
        Method::Hierarchical => (topo.gpus_per_node, topo.num_nodes),
        _ => (gpus, 1),
    };
    if units > 1 {
        let node_map = match_units(&sorted(old, m * unit_gpus), &sorted(&new.slots, m * unit_gpus));
        for (new_node, &old_node) in node_map.iter().enumerate() {
            for k in 0..unit_gpus {
                source[old_node * unit_gpus + k] = new_node * unit_gpus + k;
            }
        }
    }
    let old_gpus = sorted(old, m);
    let new_gpus = sorted(&new.slots, m);
    let mut matched = source.clone();
    for unit in 0..units {
        let range = unit * unit_gpus..(unit + 1) * unit_gpus;
        let candidates: Vec<Vec<usize>> = range.clone().map(|g| new_gpus[source[g]].clone()).collect();
        let gpu_map = match_units(&old_gpus[range.clone()], &candidates);
        for (k, &old_k) in gpu_map.iter().enumerate() {
            matched[range.start + old_k] = source[range.start + k];
        }
    }
    let mut slots = vec![0; topo.num_slots];
    for (g, &from) in matched.iter().enumerate() {
        let mut remaining = new_gpus[from].clone();
        let old_row = &old[g * m..(g + 1) * m];
        let row = &mut slots[g * m..(g + 1) * m];
        let mut free = vec![true; m];
        for (p, &e) in old_row.iter().enumerate() {
            if let Ok(i) = remaining.binary_search(&e) {
                row[p] = e;
                free[p] = false;
                remaining.remove(i);
            }
        }
        for (p, e) in free.iter().enumerate().filter(|(_, &f)| f).map(|(p, _)| p).zip(remaining) {
            row[p] = e;
        }
    }
    Layout { slots, counts: new.counts.clone() }
}

/// Moves as few slots of the current placement `current` `[L, P]` as the greedy search
/// finds to bring every layer of `load` `[L, E]` to `max / mean <= target_imbalance`.
///
/// Per layer, while above the target: take the hottest GPU (lower index on ties) and
/// apply the best of these moves (see `Score`), each of which must leave every GPU it
/// touches below the current maximum: reassign one of its slots whose expert has another
/// replica to another expert (one slot changed); give one of its experts an extra replica
/// in a slot elsewhere whose expert has another replica (one slot); swap one of its slots
/// with a lighter replica on another GPU (two slots). The hierarchical method keeps every
/// expert on its node (the current placement must have each group on one node). When the
/// moves stop short of the target, the layer is re-planned from scratch with `method`,
/// renumbered to keep as many slots as possible (`align`), and the re-plan is used if its
/// maximum is lower (`replanned = 1`).
pub fn rebalance(
    current: &[i64],
    load: &[f64],
    topo: &Topology,
    settings: RebalanceSettings,
    out: PlanBuffers<'_>,
    stats: RebalanceBuffers<'_>,
) -> Result<()> {
    let method = match settings.method {
        Method::Hierarchical => Method::Hierarchical,
        _ => Method::Global,
    };
    topo.validate(method)?;
    let target = settings.target_imbalance;
    if !(target.is_finite() && target >= 1.0) {
        return Err(CoreError::invalid(
            "target_imbalance",
            "a finite value >= 1 (max GPU load / mean GPU load)",
            format!("{target}"),
        ));
    }
    let num_layers = check_loads(load, topo.num_experts)?;
    check_len("plan", current, num_layers * topo.num_slots)?;
    check_buffers(num_layers, topo, &out)?;
    check_len("moved_slots", stats.moved_slots, num_layers)?;
    check_len("replanned", stats.replanned, num_layers)?;
    let (e, p) = (topo.num_experts, topo.num_slots);
    let layers: Vec<usize> = (0..num_layers).collect();
    let results = map_collect(&layers, |_, &l| {
        let loads = layer_loads(&load[l * e..(l + 1) * e]);
        let old = read_layout(l, &current[l * p..(l + 1) * p], e)?;
        let nodes = match method {
            Method::Hierarchical => Some(expert_nodes(l, &old.slots, topo)?),
            _ => None,
        };
        let mut search = Rebalancer::new(&loads, topo, old.clone(), nodes);
        search.run(target, settings.max_moves);
        let total: f64 = search.gpu_load.iter().sum();
        let mut layout = search.layout;
        let mut replanned = false;
        if total > 0.0 && search.gpu_load[search.by_load[0]] > target * total / topo.num_gpus() as f64 {
            let fresh = align(&old.slots, &plan_layer(&loads, topo, method), topo, method);
            let mut fresh_load = vec![0.0; topo.num_gpus()];
            gpu_loads(&loads, &fresh, topo.slots_per_gpu(), &mut fresh_load);
            let fresh_max = fresh_load.iter().copied().fold(0.0, f64::max);
            if fresh_max < search.gpu_load[search.by_load[0]] {
                layout = fresh;
                replanned = true;
            }
        }
        let moved = layout.slots.iter().zip(&old.slots).filter(|(a, b)| a != b).count();
        Ok((Planned::new(&loads, layout, topo), moved, replanned))
    })?;
    for (l, (_, moved, replanned)) in results.iter().enumerate() {
        stats.moved_slots[l] = *moved as i64;
        stats.replanned[l] = u8::from(*replanned);
    }
    let layouts: Vec<Planned> = results.into_iter().map(|(planned, _, _)| planned).collect();
    write_layouts(&layouts, topo, out);
    Ok(())
}

// --- maps ------------------------------------------------------------------------------------

/// `out` `[L, E, R]`: the slots of each logical expert in ascending slot order, -1 past its
/// replicas, from `physical_to_logical` `[L, P]`. Returns an error if an expert has more
/// than `R` replicas or an id is out of range.
pub fn logical_to_physical(
    physical_to_logical: &[i64],
    num_slots: usize,
    num_experts: usize,
    max_replicas: usize,
    out: &mut [i64],
) -> Result<()> {
    if num_slots == 0 || !physical_to_logical.len().is_multiple_of(num_slots) {
        return Err(CoreError::invalid(
            "physical_to_logical",
            format!("[L, P] with P = {num_slots} >= 1"),
            format!("{} elements", physical_to_logical.len()),
        ));
    }
    let num_layers = physical_to_logical.len() / num_slots;
    check_len("out", out, num_layers * num_experts * max_replicas)?;
    out.fill(-1);
    let mut filled = vec![0usize; num_experts];
    for (l, row) in physical_to_logical.chunks_exact(num_slots).enumerate() {
        filled.fill(0);
        let table = &mut out[l * num_experts * max_replicas..(l + 1) * num_experts * max_replicas];
        for (s, &e) in row.iter().enumerate() {
            if e < 0 || e as u64 >= num_experts as u64 {
                return Err(CoreError::invalid(
                    "physical_to_logical",
                    format!("ids in [0, {num_experts})"),
                    format!("{e} at layer {l}, slot {s}"),
                ));
            }
            let e = e as usize;
            if filled[e] == max_replicas {
                return Err(CoreError::invalid(
                    "out",
                    format!("room for every replica (R = {max_replicas})"),
                    format!("more replicas of expert {e} in layer {l}"),
                ));
            }
            table[e * max_replicas + filled[e]] = s as i64;
            filled[e] += 1;
        }
    }
    Ok(())
}

/// One layer's replica table, as `replica_map` reads it.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaTable<'a> {
    /// `[E, R]` slots of each expert, -1 past its replicas.
    pub logical_to_physical: &'a [i64],
    /// `[E]` replicas of each expert, in `[1, R]`.
    pub replica_counts: &'a [i64],
    pub num_slots: usize,
    pub slots_per_gpu: usize,
}

/// Maps logical expert ids `experts` (row-major `[T, k]`, -1 = empty) to physical slot
/// ids in `out` (-1 stays -1) with `policy`.
pub fn replica_map(
    experts: &[i64],
    table: ReplicaTable<'_>,
    policy: ReplicaPolicy,
    out: &mut [i64],
) -> Result<()> {
    let e_count = table.replica_counts.len();
    check_len("out", out, experts.len())?;
    if e_count == 0 || !table.logical_to_physical.len().is_multiple_of(e_count) {
        return Err(CoreError::invalid(
            "logical_to_physical",
            format!("[E, R] with E = {e_count} (the length of replica_counts) >= 1"),
            format!("{} elements", table.logical_to_physical.len()),
        ));
    }
    let r = table.logical_to_physical.len() / e_count;
    if table.slots_per_gpu == 0 || !table.num_slots.is_multiple_of(table.slots_per_gpu) {
        return Err(CoreError::invalid(
            "slots_per_gpu",
            format!("a divisor of num_slots = {} (>= 1)", table.num_slots),
            format!("{}", table.slots_per_gpu),
        ));
    }
    for (e, &c) in table.replica_counts.iter().enumerate() {
        if c < 1 || c as u64 > r as u64 {
            return Err(CoreError::invalid(
                "replica_counts",
                format!("values in [1, R = {r}]"),
                format!("{c} for expert {e}"),
            ));
        }
        let row = &table.logical_to_physical[e * r..e * r + c as usize];
        if let Some(&s) = row.iter().find(|&&s| s < 0 || s as u64 >= table.num_slots as u64) {
            return Err(CoreError::invalid(
                "logical_to_physical",
                format!("slot ids in [0, {}) for each expert's replicas", table.num_slots),
                format!("{s} for expert {e}"),
            ));
        }
    }
    let mut seen = vec![0usize; e_count];
    let mut gpu_tokens = vec![0u64; table.num_slots / table.slots_per_gpu];
    let mut slot_tokens = vec![0u64; table.num_slots];
    for (i, (&id, o)) in experts.iter().zip(out.iter_mut()).enumerate() {
        if id == -1 {
            *o = -1;
            continue;
        }
        if id < 0 || id as u64 >= e_count as u64 {
            return Err(CoreError::invalid(
                "experts",
                format!("expert ids in [0, {e_count}) or -1 for an empty slot"),
                format!("{id} at position {i} (row-major)"),
            ));
        }
        let e = id as usize;
        let replicas = &table.logical_to_physical[e * r..e * r + table.replica_counts[e] as usize];
        let slot = match policy {
            ReplicaPolicy::RoundRobin => {
                let slot = replicas[seen[e] % replicas.len()];
                seen[e] += 1;
                slot
            }
            ReplicaPolicy::Load => {
                // `min_by_key` keeps the first of equal minima: the lower replica number.
                let slot = *replicas
                    .iter()
                    .min_by_key(|&&s| (gpu_tokens[s as usize / table.slots_per_gpu], slot_tokens[s as usize]))
                    .expect("at least one replica");
                gpu_tokens[slot as usize / table.slots_per_gpu] += 1;
                slot_tokens[slot as usize] += 1;
                slot
            }
        };
        *o = slot;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads;
    use proptest::prelude::*;

    fn topo(e: usize, p: usize, nodes: usize, gpn: usize, groups: Option<usize>) -> Topology {
        Topology { num_experts: e, num_slots: p, num_nodes: nodes, gpus_per_node: gpn, num_groups: groups }
    }

    /// Everything a plan call writes, owned.
    #[derive(Debug, Clone, PartialEq)]
    struct Owned {
        p2l: Vec<i64>,
        counts: Vec<i64>,
        gpu_load: Vec<f64>,
        imbalance: Vec<f64>,
        lower_bound: Vec<f64>,
    }

    impl Owned {
        fn new(layers: usize, t: &Topology) -> Self {
            Owned {
                p2l: vec![0; layers * t.num_slots],
                counts: vec![0; layers * t.num_experts],
                gpu_load: vec![0.0; layers * t.num_gpus()],
                imbalance: vec![0.0; layers],
                lower_bound: vec![0.0; layers],
            }
        }
        fn buffers(&mut self) -> PlanBuffers<'_> {
            PlanBuffers {
                physical_to_logical: &mut self.p2l,
                replica_counts: &mut self.counts,
                gpu_load: &mut self.gpu_load,
                imbalance: &mut self.imbalance,
                lower_bound: &mut self.lower_bound,
            }
        }
    }

    fn run_plan(load: &[f64], t: &Topology, method: Method, threads: usize) -> Result<(Method, Owned)> {
        let mut o = Owned::new(load.len() / t.num_experts, t);
        let used = threads::run(threads, usize::MAX, || plan(load, t, method, o.buffers()))?;
        Ok((used, o))
    }

    fn run_greedy(load: &[f64], t: &Topology) -> Owned {
        let mut o = Owned::new(load.len() / t.num_experts, t);
        greedy(load, t, o.buffers()).unwrap();
        o
    }

    fn run_rebalance(
        current: &[i64],
        load: &[f64],
        t: &Topology,
        s: RebalanceSettings,
    ) -> (Owned, Vec<i64>, Vec<u8>) {
        let layers = load.len() / t.num_experts;
        let mut o = Owned::new(layers, t);
        let (mut moved, mut replanned) = (vec![0; layers], vec![0; layers]);
        let stats = RebalanceBuffers { moved_slots: &mut moved, replanned: &mut replanned };
        rebalance(current, load, t, s, o.buffers(), stats).unwrap();
        (o, moved, replanned)
    }

    /// The invariants every placement satisfies, checked layer by layer.
    fn check_invariants(load: &[f64], t: &Topology, o: &Owned, groups_on_nodes: bool) {
        let (e, p, g, m) = (t.num_experts, t.num_slots, t.num_gpus(), t.slots_per_gpu());
        for l in 0..load.len() / e {
            let slots = &o.p2l[l * p..(l + 1) * p];
            let counts = &o.counts[l * e..(l + 1) * e];
            let mut seen = vec![0i64; e];
            for &s in slots {
                assert!((0..e as i64).contains(&s), "slot holds {s}");
                seen[s as usize] += 1;
            }
            assert_eq!(seen, counts, "counts match the slots");
            assert!(counts.iter().all(|&c| c >= 1));
            assert_eq!(counts.iter().sum::<i64>(), p as i64);
            let loads = &load[l * e..(l + 1) * e];
            for gpu in 0..g {
                let expected: f64 = slots[gpu * m..(gpu + 1) * m]
                    .iter()
                    .map(|&x| loads[x as usize] / counts[x as usize] as f64)
                    .sum();
                assert_eq!(o.gpu_load[l * g + gpu], expected);
            }
            assert!(
                o.imbalance[l] >= o.lower_bound[l] * (1.0 - 1e-12),
                "{} < {}",
                o.imbalance[l],
                o.lower_bound[l]
            );
            if groups_on_nodes {
                expert_nodes(l, &slots.iter().map(|&x| x as usize).collect::<Vec<_>>(), t).unwrap();
            }
        }
    }

    #[test]
    fn replicate_gives_extra_replicas_to_the_heaviest_per_replica() {
        assert_eq!(replicate(&[10.0, 4.0, 3.0], 5), vec![3, 1, 1]);
        assert_eq!(replicate(&[6.0, 6.0, 1.0], 5), vec![2, 2, 1]);
        // Ties go to the lower index.
        assert_eq!(replicate(&[2.0, 2.0], 3), vec![2, 1]);
        assert_eq!(replicate(&[0.0, 0.0, 0.0], 4), vec![2, 1, 1]);
    }

    #[test]
    fn pack_is_balanced_with_equal_cardinality() {
        let bins = pack(&[5.0, 4.0, 3.0, 3.0, 2.0, 1.0], 2, 3);
        assert_eq!(bins, vec![0, 1, 1, 0, 1, 0]);
        // Equal weights fill bins in index order.
        assert_eq!(pack(&[1.0; 4], 2, 2), vec![0, 1, 0, 1]);
    }

    #[test]
    fn hierarchical_example_keeps_groups_on_nodes() {
        // 4 experts in 2 groups, 6 slots, 2 nodes x 1 GPU.
        let load = [9.0, 1.0, 3.0, 3.0];
        let t = topo(4, 6, 2, 1, Some(2));
        let (method, o) = run_plan(&load, &t, Method::Auto, 1).unwrap();
        assert_eq!(method, Method::Hierarchical);
        // Group 0 (load 10) on node 0, group 1 (6) on node 1; node 0 gives its extra slot to
        // expert 0, node 1 to expert 2 (a tie with expert 3, lower id).
        assert_eq!(o.p2l, vec![0, 0, 1, 2, 2, 3]);
        assert_eq!(o.counts, vec![2, 1, 2, 1]);
        assert_eq!(o.gpu_load, vec![10.0, 6.0]);
        check_invariants(&load, &t, &o, true);
        // The global method may split experts across nodes and balance better.
        let (method, o) = run_plan(&load, &t, Method::Global, 1).unwrap();
        assert_eq!(method, Method::Global);
        assert_eq!(o.counts, vec![3, 1, 1, 1]);
        assert_eq!(o.gpu_load, vec![9.0, 7.0]);
        assert!(o.imbalance[0] < 10.0 / 8.0);
    }

    #[test]
    fn auto_follows_eplb_rule() {
        assert_eq!(topo(8, 8, 2, 1, Some(2)).resolve(Method::Auto), Method::Hierarchical);
        assert_eq!(topo(8, 8, 4, 1, Some(2)).resolve(Method::Auto), Method::Global);
        assert_eq!(topo(8, 8, 2, 1, None).resolve(Method::Auto), Method::Global);
    }

    #[test]
    fn bad_input_names_the_argument() {
        let err = |load: &[f64], t: Topology, m: Method| run_plan(load, &t, m, 1).unwrap_err().to_string();
        assert!(err(&[1.0, -1.0], topo(2, 2, 1, 1, None), Method::Auto).starts_with("load:"));
        assert!(err(&[1.0, f64::NAN], topo(2, 2, 1, 1, None), Method::Auto).starts_with("load:"));
        assert!(err(&[1.0; 4], topo(4, 3, 1, 1, None), Method::Auto).starts_with("num_slots:"));
        assert!(err(&[1.0; 4], topo(4, 6, 2, 2, None), Method::Auto).starts_with("num_slots:"));
        assert!(err(&[1.0; 4], topo(4, 4, 1, 1, Some(3)), Method::Auto).starts_with("num_groups:"));
        assert!(err(&[1.0; 4], topo(4, 4, 2, 1, Some(1)), Method::Hierarchical).starts_with("num_groups:"));
        assert!(err(&[1.0; 6], topo(6, 8, 4, 1, None), Method::Hierarchical).starts_with("num_nodes:"));
        assert!(err(&[1.0; 5], topo(4, 4, 1, 1, None), Method::Auto).starts_with("load:"));
        assert!("fast".parse::<Method>().unwrap_err().to_string().starts_with("method:"));
        assert!("best".parse::<ReplicaPolicy>().unwrap_err().to_string().starts_with("policy:"));
    }

    #[test]
    fn lower_bound_is_attained_by_a_perfect_split() {
        // Two experts, four slots, two GPUs: a 3:1 load splits 3 replicas vs 1, each 1.0.
        assert_eq!(lower_bound(&[3.0, 1.0], 4, 2), 1.0);
        // One dominating expert with a single extra slot: its half is the bound.
        assert_eq!(lower_bound(&[8.0, 1.0, 1.0, 0.0], 5, 5), 4.0 * 5.0 / 10.0);
        assert_eq!(lower_bound(&[0.0, 0.0], 4, 2), 1.0);
    }

    #[test]
    fn greedy_baseline_is_round_robin() {
        let t = topo(4, 6, 1, 2, None);
        let o = run_greedy(&[1.0, 5.0, 3.0, 0.0], &t);
        // Sequence 0 1 2 3 | 1 2 -> GPU 0 gets items 0, 2, 4 and GPU 1 items 1, 3, 5.
        assert_eq!(o.p2l, vec![0, 2, 1, 1, 3, 2]);
        assert_eq!(o.counts, vec![1, 2, 2, 1]);
    }

    #[test]
    fn maps_invert_and_route() {
        let p2l = [0i64, 0, 1, 2, 2, 3];
        let mut l2p = vec![0; 4 * 2];
        logical_to_physical(&p2l, 6, 4, 2, &mut l2p).unwrap();
        assert_eq!(l2p, vec![0, 1, 2, -1, 3, 4, 5, -1]);
        assert!(logical_to_physical(&p2l, 6, 4, 1, &mut [0; 4]).is_err());
        let counts = [2i64, 1, 2, 1];
        let table = ReplicaTable {
            logical_to_physical: &l2p,
            replica_counts: &counts,
            num_slots: 6,
            slots_per_gpu: 1,
        };
        let experts = [0i64, 0, 0, -1, 2, 3, 2, 0];
        let mut out = vec![0; 8];
        replica_map(&experts, table, ReplicaPolicy::RoundRobin, &mut out).unwrap();
        assert_eq!(out, vec![0, 1, 0, -1, 3, 5, 4, 1]);
        // Load policy with 3 slots per GPU: slots 0,1,2 on GPU 0 and 3,4,5 on GPU 1.
        let table = ReplicaTable { slots_per_gpu: 3, ..table };
        let l2p_split = [0i64, 3, 2, -1, 4, 5, 1, -1];
        let counts_split = [2i64, 1, 2, 1];
        let table = ReplicaTable { logical_to_physical: &l2p_split, replica_counts: &counts_split, ..table };
        replica_map(&[0, 0, 0, 1], table, ReplicaPolicy::Load, &mut out[..4]).unwrap();
        // GPU 0 (0 tokens) first, then GPU 1 (0 < 1), then GPU 0 again (tie -> replica 0).
        assert_eq!(&out[..4], &[0, 3, 0, 2]);
        // Expert 2's replicas share GPU 1: the less used replica breaks the tie.
        replica_map(&[2, 2, 2], table, ReplicaPolicy::Load, &mut out[..3]).unwrap();
        assert_eq!(&out[..3], &[4, 5, 4]);
        let err = replica_map(&[4], table, ReplicaPolicy::Load, &mut out[..1]).unwrap_err();
        assert!(err.to_string().starts_with("experts:"));
    }

    #[test]
    fn rebalance_moves_few_slots_and_keeps_groups() {
        let t = topo(16, 24, 2, 2, Some(4));
        let old_load: Vec<f64> = (0..16).map(|e| 1.0 + e as f64).collect();
        let (_, plan_old) = run_plan(&old_load, &t, Method::Auto, 1).unwrap();
        // The load shifts inside group 3 (node totals stay, GPU totals do not).
        let mut new_load = old_load.clone();
        new_load[1] += 12.0;
        new_load[14] -= 12.0;
        let settings =
            RebalanceSettings { method: Method::Hierarchical, target_imbalance: 1.05, max_moves: 24 };
        let (o, moved, replanned) = run_rebalance(&plan_old.p2l, &new_load, &t, settings);
        check_invariants(&new_load, &t, &o, true);
        let (_, fresh) = run_plan(&new_load, &t, Method::Hierarchical, 1).unwrap();
        let fresh_moved = fresh.p2l.iter().zip(&plan_old.p2l).filter(|(a, b)| a != b).count() as i64;
        assert_eq!(replanned, vec![0]);
        assert!(o.imbalance[0] <= 1.05, "imbalance {}", o.imbalance[0]);
        assert!(moved[0] > 0 && moved[0] < fresh_moved, "moved {} vs {}", moved[0], fresh_moved);
        assert_eq!(moved[0], o.p2l.iter().zip(&plan_old.p2l).filter(|(a, b)| a != b).count() as i64);
    }

    #[test]
    fn rebalance_undoes_moves_that_do_not_lower_the_maximum() {
        // GPU loads under the new load are 65, 45, 95, 35; two moves bring them to 65, 45,
        // 65, 65, and a third would only trade GPU 0's 65 for 55, leaving the maximum at 65
        // with GPUs 2 and 3 stuck there. The target 1.05 is out of reach, so it is undone.
        let t = topo(8, 12, 2, 2, Some(4));
        let (_, old) =
            run_plan(&[90.0, 10.0, 30.0, 30.0, 5.0, 5.0, 20.0, 50.0], &t, Method::Auto, 1).unwrap();
        let new_load = [90.0, 10.0, 30.0, 30.0, 5.0, 5.0, 50.0, 20.0];
        let settings =
            RebalanceSettings { method: Method::Hierarchical, target_imbalance: 1.05, max_moves: 12 };
        let (o, moved, replanned) = run_rebalance(&old.p2l, &new_load, &t, settings);
        assert_eq!(o.gpu_load, vec![65.0, 45.0, 65.0, 65.0]);
        assert_eq!((moved, replanned), (vec![2], vec![0]));
    }

    #[test]
    fn rebalance_falls_back_to_a_replan() {
        // Both hot experts on GPU 0 (loads 20 vs 2), and no moves allowed.
        let t = topo(4, 8, 1, 2, None);
        let current = [0i64, 1, 0, 1, 2, 3, 2, 3];
        let load = [10.0, 10.0, 1.0, 1.0];
        let settings = RebalanceSettings { method: Method::Global, target_imbalance: 1.0, max_moves: 0 };
        let (o, moved, replanned) = run_rebalance(&current, &load, &t, settings);
        assert_eq!(replanned, vec![1]);
        check_invariants(&load, &t, &o, false);
        // The re-plan gives experts 0 and 1 three replicas each and balances exactly.
        assert_eq!(o.counts, vec![3, 3, 1, 1]);
        assert!((o.imbalance[0] - 1.0).abs() < 1e-12);
        assert_eq!(moved[0], o.p2l.iter().zip(&current).filter(|(a, b)| a != b).count() as i64);
        // Already balanced: nothing moves.
        let settings = RebalanceSettings { method: Method::Global, target_imbalance: 1.0, max_moves: 8 };
        let (o, moved, replanned) = run_rebalance(&current, &[1.0; 4], &t, settings);
        assert_eq!((moved, replanned), (vec![0], vec![0]));
        assert_eq!(o.p2l, current.to_vec());
    }

    #[test]
    fn rebalance_rejects_bad_plans() {
        let t = topo(4, 4, 2, 1, Some(2));
        let mut o = Owned::new(1, &t);
        let (mut moved, mut replanned) = (vec![0; 1], vec![0; 1]);
        let settings =
            RebalanceSettings { method: Method::Hierarchical, target_imbalance: 1.0, max_moves: 4 };
        let mut call = |current: &[i64], target: f64| {
            let stats = RebalanceBuffers { moved_slots: &mut moved, replanned: &mut replanned };
            let s = RebalanceSettings { target_imbalance: target, ..settings };
            rebalance(current, &[1.0; 4], &t, s, o.buffers(), stats).unwrap_err().to_string()
        };
        assert!(call(&[0, 1, 2, 2], 1.0).contains("expert 3 has none"));
        assert!(call(&[0, 2, 1, 3], 1.0).contains("group 0 on nodes 0 and 1"));
        assert!(call(&[0, 1, 2, 9], 1.0).starts_with("plan:"));
        assert!(call(&[0, 1, 2, 3], 0.5).starts_with("target_imbalance:"));
    }

    fn layer_imbalance(loads: &[f64], t: &Topology, layout: &Layout) -> f64 {
        let mut gpu = vec![0.0; t.num_gpus()];
        gpu_loads(loads, layout, t.slots_per_gpu(), &mut gpu);
        imbalance_of(&gpu)
    }

    /// EPLB-style placement is not better than the round-robin baseline on *every* load:
    /// greedy packing with a fixed number of items per bin can be unlucky where a blind
    /// round-robin is not, and the hierarchical method pays for keeping groups on nodes. On
    /// small clusters either happens in up to a fifth (global) or a third (hierarchical)
    /// of random loads. What holds, and is tested here over 400 seeded draws per shape and
    /// load style: the mean imbalance is lower for both methods, the global method is at
    /// least as good in 3 of 4 draws, and at DeepSeek-V3's serving shape (256 experts in 8
    /// groups, 288 slots, 4 nodes x 8 GPUs) both are at least as good in every draw.
    #[test]
    fn eplb_methods_beat_the_greedy_baseline_statistically() {
        let mut rng = crate::test_rng::TestRng::new(0x5eed);
        let mut next = || rng.unit();
        let shapes =
            [(8, 12, 2, 2, 4), (16, 24, 2, 2, 4), (6, 8, 1, 2, 3), (12, 12, 2, 2, 4), (256, 288, 4, 8, 8)];
        for (e, p, n, gpn, groups) in shapes {
            let t = topo(e, p, n, gpn, Some(groups));
            let production = e == 256;
            for style in 0..3 {
                let (mut sums, mut global_ok, draws) = ([0.0f64; 3], 0, 400);
                for _ in 0..draws {
                    let loads: Vec<f64> = (0..e)
                        .map(|_| match style {
                            0 => (next() * 4.0).floor(),
                            1 => (8.0 * next()).exp(),
                            _ => next() * 100.0,
                        })
                        .collect();
                    let hier = layer_imbalance(&loads, &t, &plan_layer(&loads, &t, Method::Hierarchical));
                    let global = layer_imbalance(&loads, &t, &plan_layer(&loads, &t, Method::Global));
                    let base = layer_imbalance(&loads, &t, &greedy_layer(&loads, &t));
                    sums[0] += hier;
                    sums[1] += global;
                    sums[2] += base;
                    global_ok += usize::from(global <= base * (1.0 + 1e-12));
                    if production {
                        assert!(
                            hier <= base && global <= base,
                            "{e} experts, style {style}: {hier} {global} {base}"
                        );
                    }
                }
                assert!(
                    sums[0] < sums[2] && sums[1] < sums[2],
                    "shape {e}/{p}, style {style}: means {sums:?}"
                );
                assert!(global_ok * 4 >= draws * 3, "shape {e}/{p}, style {style}: {global_ok} of {draws}");
            }
        }
    }

    fn case() -> impl Strategy<Value = (Topology, Vec<f64>)> {
        (1usize..4, 1usize..4, 1usize..5, 1usize..4, 0usize..3, 1usize..4, 0u8..3).prop_flat_map(
            |(nodes, gpn, groups_per_node, group_size, extra_per_gpu, layers, style)| {
                let groups = nodes * groups_per_node;
                let e = groups * group_size;
                let gpus = nodes * gpn;
                // The smallest multiple of G that holds E, plus some extra rows of slots.
                let p = e.div_ceil(gpus) * gpus + extra_per_gpu * gpus;
                let t = topo(e, p, nodes, gpn, Some(groups));
                let values = match style {
                    // Small integers: many ties.
                    0 => proptest::collection::vec((0u32..4).prop_map(f64::from).boxed(), layers * e).boxed(),
                    // Skewed continuous loads.
                    1 => proptest::collection::vec((0.0f64..1.0).prop_map(|u| (8.0 * u).exp()), layers * e)
                        .boxed(),
                    _ => proptest::collection::vec(0.0f64..100.0, layers * e).boxed(),
                };
                (Just(t), values)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn plans_satisfy_the_invariants((t, load) in case(), threads in 1usize..4) {
            let (_, hier) = run_plan(&load, &t, Method::Hierarchical, threads).unwrap();
            check_invariants(&load, &t, &hier, true);
            let (_, global) = run_plan(&load, &t, Method::Global, threads).unwrap();
            check_invariants(&load, &t, &global, false);
            check_invariants(&load, &t, &run_greedy(&load, &t), false);
            // Identical on one thread.
            prop_assert_eq!(&run_plan(&load, &t, Method::Hierarchical, 1).unwrap().1, &hier);
            prop_assert_eq!(&run_plan(&load, &t, Method::Global, 1).unwrap().1, &global);
        }

        #[test]
        fn rebalance_reaches_reachable_targets((t, load) in case(), shift in 0usize..64, target in 1.0f64..1.5) {
            let (_, old) = run_plan(&load, &t, Method::Hierarchical, 1).unwrap();
            // A new load: the old one rotated among experts.
            let e = t.num_experts;
            let new_load: Vec<f64> = (0..load.len()).map(|i| load[(i / e) * e + (i % e + shift) % e]).collect();
            let settings = RebalanceSettings { method: Method::Hierarchical, target_imbalance: target, max_moves: t.num_slots };
            let (o, moved, replanned) = run_rebalance(&old.p2l, &new_load, &t, settings);
            check_invariants(&new_load, &t, &o, true);
            let (_, fresh) = run_plan(&new_load, &t, Method::Hierarchical, 1).unwrap();
            let p = t.num_slots;
            for l in 0..load.len() / e {
                let diff = o.p2l[l * p..(l + 1) * p].iter().zip(&old.p2l[l * p..(l + 1) * p]).filter(|(a, b)| a != b).count();
                prop_assert_eq!(moved[l], diff as i64);
                // Reached, or no worse than a re-plan from scratch.
                prop_assert!(o.imbalance[l] <= target || o.imbalance[l] <= fresh.imbalance[l] * (1.0 + 1e-12),
                    "layer {}: {} vs target {} and re-plan {}", l, o.imbalance[l], target, fresh.imbalance[l]);
                // A layer that fell back holds the re-plan (renumbered, same balance).
                if replanned[l] == 1 {
                    prop_assert!((o.imbalance[l] - fresh.imbalance[l]).abs() <= 1e-12 * fresh.imbalance[l]);
                }
                // A layer already within the target is left alone.
                let old_layout = Layout {
                    slots: old.p2l[l * p..(l + 1) * p].iter().map(|&x| x as usize).collect(),
                    counts: old.counts[l * e..(l + 1) * e].iter().map(|&c| c as usize).collect(),
                };
                let mut before = vec![0.0; t.num_gpus()];
                gpu_loads(&new_load[l * e..(l + 1) * e], &old_layout, t.slots_per_gpu(), &mut before);
                if imbalance_of(&before) <= target {
                    prop_assert_eq!(moved[l], 0);
                }
            }
        }
    }
}
