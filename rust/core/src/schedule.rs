//! Per-layer keep-ratio schedules under a global compute budget.
//!
//! A token-pruning or Mixture-of-Depths model keeps a fraction of its tokens in every layer.
//! Given, for each layer `l` and each keep-ratio `ratios[j]` of a grid, the cost
//! `cost[l, j]` of running the layer at that ratio and the loss increase
//! `sensitivity[l, j]` it causes, [`sparsity_schedule`] chooses one grid index `j_l` per
//! layer that minimises `sum_l sensitivity[l, j_l]` subject to `sum_l cost[l, j_l] <= budget`:
//! a multiple-choice knapsack.
//!
//! **Sums.** A schedule's cost and loss are float64 sums accumulated in layer order,
//! `((0 + v_0) + v_1) + ...`; feasibility (`cost <= budget`) and every comparison below use
//! exactly these sums, and they are the values returned.
//!
//! **Tie rule.** Among the feasible schedules of minimal loss, the one of lower cost; among
//! those equal in both, the lexicographically smallest choice vector (compared from layer 0).
//! The result is a single-threaded computation and does not depend on the thread count.
//!
//! **Exact method.** Dynamic programming over Pareto frontiers of `(cost, loss)` partial
//! schedules, layer by layer, with back-pointers. Costs stay real numbers (no
//! discretisation). A partial schedule is dropped when
//! - it cannot finish within the budget even at the cheapest allowed ratios of the remaining
//!   layers;
//! - a kept one is at least as cheap and at least as good and provably wins every completion
//!   under the tie rule (see `dominates` in the source);
//! - a Lagrangian lower bound on the loss of its best completion exceeds the loss of the
//!   greedy schedule, a feasible one (see `LossBound` in the source).
//!
//! Every rule allows for float64 rounding with a proved margin, so the result equals that of
//! enumerating all schedules. Time is `O(sum_l F_l * A_l * log A_l)` for frontier sizes
//! `F_l` and `A_l` allowed ratios, plus the greedy run; memory is 8 bytes per kept state per
//! layer for the back-pointers. A frontier of more than `max_states` states stops the method
//! (the Python API's default cap is `MAX_FRONTIER_STATES = 2**20`).
//!
//! **Greedy method.** A heuristic, not exact: start every layer at its cheapest allowed
//! ratio (equal costs: lower loss, then lower index), then repeatedly apply the single-layer
//! change to any allowed ratio that decreases the loss with the best loss decrease per unit
//! of cost increase and still fits the budget, until no loss-decreasing change fits.
//! Changes that do not increase the cost come first (larger decrease, then larger saving);
//! equal ratios go to the larger decrease; full ties to the lower layer, then the lower
//! index. `O(L R)` per step, at most `L (R - 1)` steps.

use crate::error::{check_len, CoreError, Result};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Range;
use std::str::FromStr;

/// The cost of every (layer, grid ratio) pair.
#[derive(Debug, Clone, Copy)]
pub enum LayerCosts<'a> {
    /// `[L]`: the cost of each layer when it keeps all its tokens; keeping ratio `r` costs
    /// `full[l] * r` (one float64 product).
    Scaled(&'a [f64]),
    /// `[L, R]` row-major: the measured cost of layer `l` at grid ratio `j`, used as given.
    Measured(&'a [f64]),
}

/// One scheduling problem. `min_keep` and `max_keep` are per layer (`[L]`): layer `l` may
/// choose grid index `j` only when `min_keep[l] <= ratios[j] <= max_keep[l]`.
#[derive(Debug, Clone, Copy)]
pub struct ScheduleProblem<'a> {
    pub num_layers: usize,
    /// `[R]`: the keep-ratio grid, strictly increasing, in `(0, 1]`.
    pub ratios: &'a [f64],
    pub layer_costs: LayerCosts<'a>,
    /// `[L, R]` row-major: the loss increase of layer `l` at grid ratio `j` (any finite value).
    pub layer_sensitivity: &'a [f64],
    pub min_keep: &'a [f64],
    pub max_keep: &'a [f64],
    /// The largest allowed total cost; `+inf` means unconstrained.
    pub budget: f64,
}

/// Which algorithm [`sparsity_schedule`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Exact while the frontier fits `max_states`, greedy beyond.
    Auto,
    /// Exact, or an error when the frontier outgrows `max_states`.
    Exact,
    /// The greedy heuristic.
    Greedy,
}

impl FromStr for Method {
    type Err = CoreError;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Method::Auto),
            "exact" => Ok(Method::Exact),
            "greedy" => Ok(Method::Greedy),
            other => {
                Err(CoreError::invalid("method", "\"auto\", \"exact\" or \"greedy\"", format!("{other:?}")))
            }
        }
    }
}

/// A chosen schedule: the grid index of every layer, with its total cost and loss (float64
/// sums in layer order), and whether the exact method produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub choice: Vec<usize>,
    pub cost: f64,
    pub loss: f64,
    pub exact: bool,
}

/// The relative error bound of one rounded float64 addition.
const UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;

/// The validated problem: costs expanded to `[L, R]`, allowed index ranges, and the bounds
/// on rounding drift that make the pruning rules safe.
struct Table<'a> {
    width: usize,
    cost: Vec<f64>,
    loss: &'a [f64],
    /// The contiguous grid indices each layer may choose (the grid is sorted).
    allowed: Vec<Range<usize>>,
    /// Each layer's cheapest allowed index (ties: lower loss, then lower index).
    cheapest: Vec<usize>,
    budget: f64,
    /// The cost of `cheapest`: the smallest total cost any schedule can have.
    min_cost: f64,
    /// Sums over layers of the largest allowed `|cost|` and `|loss|`: bounds on every
    /// partial sum, hence on rounding errors.
    cost_scale: f64,
    loss_scale: f64,
    /// How far rounding can move the difference of two partial sums over the remaining
    /// layers (twice the bound proved in [`dominates`]).
    cost_drift: f64,
    loss_drift: f64,
}

impl Table<'_> {
    fn layers(&self) -> usize {
        self.allowed.len()
    }

    fn cost_at(&self, layer: usize, index: usize) -> f64 {
        self.cost[layer * self.width + index]
    }

    fn loss_at(&self, layer: usize, index: usize) -> f64 {
        self.loss[layer * self.width + index]
    }

    /// `(cost, loss)` of a full schedule, summed in layer order.
    fn totals(&self, choice: &[usize]) -> (f64, f64) {
        choice.iter().enumerate().fold((0.0, 0.0), |(cost, loss), (layer, &index)| {
            (cost + self.cost_at(layer, index), loss + self.loss_at(layer, index))
        })
    }
}

/// Chooses one keep-ratio per layer (see the module documentation for the exact semantics).
///
/// `max_states` caps the Pareto frontier of the exact method (at most `u32::MAX` is used).
/// Errors name the Python argument: shapes, non-finite or negative costs, non-finite
/// sensitivities, a bad grid, keep bounds outside `[0, 1]` or crossed, a layer with no
/// allowed ratio, a NaN or infeasible budget, and `method = Exact` beyond `max_states`.
pub fn sparsity_schedule(
    problem: &ScheduleProblem<'_>,
    method: Method,
    max_states: usize,
) -> Result<Schedule> {
    if max_states == 0 {
        return Err(CoreError::invalid("max_states", "at least 1", "0"));
    }
    let table = prepare(problem)?;
    let (choice, exact) = match method {
        Method::Greedy => (solve_greedy(&table), false),
        Method::Exact | Method::Auto => {
            // The greedy schedule is feasible, so its loss bounds the optimum from above.
            let greedy = solve_greedy(&table);
            let incumbent = table.totals(&greedy).1;
            match solve_exact(&table, max_states, incumbent)? {
                ExactOutcome::Solved(choice) => (choice, true),
                ExactOutcome::TooManyStates { layer } if method == Method::Exact => {
                    return Err(CoreError::invalid(
                        "method",
                        format!(
                            "a problem whose Pareto frontier stays within max_states = {max_states} states \
                         for method \"exact\" (use \"auto\" or \"greedy\", or raise max_states)"
                        ),
                        format!("more than {max_states} states after layer {layer}"),
                    ));
                }
                ExactOutcome::TooManyStates { .. } => (greedy, false),
            }
        }
    };
    let (cost, loss) = table.totals(&choice);
    Ok(Schedule { choice, cost, loss, exact })
}

/// Validates `problem` (shapes, then values, then feasibility) and expands its costs.
fn prepare<'a>(problem: &ScheduleProblem<'a>) -> Result<Table<'a>> {
    let ScheduleProblem {
        num_layers: layers,
        ratios,
        layer_costs,
        layer_sensitivity,
        min_keep,
        max_keep,
        budget,
    } = *problem;
    let width = ratios.len();
    if width == 0 {
        return Err(CoreError::invalid("ratios", "a grid of at least one keep-ratio", "an empty grid"));
    }
    for (j, &ratio) in ratios.iter().enumerate() {
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(CoreError::invalid(
                "ratios",
                "keep-ratios in (0, 1]",
                format!("{ratio:?} at index {j}"),
            ));
        }
        if j > 0 && ratio <= ratios[j - 1] {
            return Err(CoreError::invalid(
                "ratios",
                "a strictly increasing grid",
                format!("{:?} then {ratio:?} at indices {} and {j}", ratios[j - 1], j - 1),
            ));
        }
    }
    let cells = layers.checked_mul(width).ok_or_else(|| {
        CoreError::invalid("layer_sensitivity", "a size that fits in memory", "an overflow")
    })?;
    check_len("layer_sensitivity", layer_sensitivity, cells)?;
    check_len("min_keep", min_keep, layers)?;
    check_len("max_keep", max_keep, layers)?;

    let cost = match layer_costs {
        LayerCosts::Scaled(full) => {
            check_len("layer_costs", full, layers)?;
            if let Some((layer, value)) =
                full.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0))
            {
                return Err(CoreError::invalid(
                    "layer_costs",
                    "finite non-negative costs",
                    format!("{value:?} at layer {layer}"),
                ));
            }
            full.iter().flat_map(|&layer_cost| ratios.iter().map(move |&ratio| layer_cost * ratio)).collect()
        }
        LayerCosts::Measured(measured) => {
            check_len("layer_costs", measured, cells)?;
            if let Some((cell, value)) =
                measured.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0))
            {
                return Err(CoreError::invalid(
                    "layer_costs",
                    "finite non-negative costs",
                    format!("{value:?} at layer {}, ratio index {}", cell / width, cell % width),
                ));
            }
            measured.to_vec()
        }
    };
    if let Some((cell, value)) = layer_sensitivity.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(CoreError::invalid(
            "layer_sensitivity",
            "finite values",
            format!("{value:?} at layer {}, ratio index {}", cell / width, cell % width),
        ));
    }

    let mut allowed = Vec::with_capacity(layers);
    for layer in 0..layers {
        let (low, high) = (min_keep[layer], max_keep[layer]);
        for (name, bound) in [("min_keep", low), ("max_keep", high)] {
            if !(0.0..=1.0).contains(&bound) {
                return Err(CoreError::invalid(
                    name,
                    "values in [0, 1]",
                    format!("{bound:?} for layer {layer}"),
                ));
            }
        }
        if low > high {
            return Err(CoreError::invalid(
                "max_keep",
                "max_keep >= min_keep",
                format!("max_keep {high:?} < min_keep {low:?} for layer {layer}"),
            ));
        }
        let first = ratios.partition_point(|&ratio| ratio < low);
        let end = ratios.partition_point(|&ratio| ratio <= high);
        if first >= end {
            return Err(CoreError::invalid(
                "min_keep, max_keep",
                "at least one grid ratio r with min_keep <= r <= max_keep in every layer",
                format!("none in [{low:?}, {high:?}] for layer {layer}"),
            ));
        }
        allowed.push(first..end);
    }
    if budget.is_nan() {
        return Err(CoreError::invalid("budget", "a number", "NaN"));
    }

    // Every partial sum along any schedule is bounded by these totals of per-layer maxima,
    // which bound the rounding drift; keeping them (times 4) finite also rules out overflow.
    let max_abs_total = |values: &[f64]| -> f64 {
        (0..layers)
            .map(|layer| {
                values[layer * width..][allowed[layer].clone()].iter().fold(0.0, |m: f64, v| m.max(v.abs()))
            })
            .sum()
    };
    let (cost_bound, loss_bound) = (max_abs_total(&cost), max_abs_total(layer_sensitivity));
    for (name, bound) in [("layer_costs", cost_bound), ("layer_sensitivity", loss_bound)] {
        if !(4.0 * bound).is_finite() {
            return Err(CoreError::invalid(
                name,
                "magnitudes whose sum over layers stays far from float64 overflow",
                format!("per-layer maxima summing to {bound:?}"),
            ));
        }
    }
    let drift_per_unit = 4.0 * layers as f64 * UNIT_ROUNDOFF;

    let cheapest: Vec<usize> = allowed
        .iter()
        .enumerate()
        .map(|(layer, range)| {
            let at = |j: usize| (cost[layer * width + j], layer_sensitivity[layer * width + j]);
            range.clone().fold(range.start, |best, j| {
                let (cost_j, loss_j) = at(j);
                let (cost_best, loss_best) = at(best);
                if cost_j < cost_best || (cost_j == cost_best && loss_j < loss_best) {
                    j
                } else {
                    best
                }
            })
        })
        .collect();
    let min_cost =
        cheapest.iter().enumerate().fold(0.0, |total, (layer, &j)| total + cost[layer * width + j]);
    if min_cost > budget {
        return Err(CoreError::invalid(
            "budget",
            format!("at least the minimum achievable cost {min_cost:?} (every layer at its cheapest allowed ratio)"),
            format!("{budget:?}"),
        ));
    }
    Ok(Table {
        width,
        cost,
        loss: layer_sensitivity,
        allowed,
        cheapest,
        budget,
        min_cost,
        cost_scale: cost_bound,
        loss_scale: loss_bound,
        cost_drift: drift_per_unit * cost_bound,
        loss_drift: drift_per_unit * loss_bound,
    })
}

enum ExactOutcome {
    Solved(Vec<usize>),
    /// The frontier after `layer` grew past `max_states`.
    TooManyStates {
        layer: usize,
    },
}

/// A partial schedule of layers `0..=l`: state `parent` of layer `l - 1`'s frontier
/// extended with grid index `choice`. `parent_rank` is the parent's rank in lexicographic
/// order of choice vectors, so `(parent_rank, choice)` orders partial schedules
/// lexicographically.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    cost: f64,
    loss: f64,
    parent_rank: u32,
    choice: u32,
    parent: u32,
}

impl Candidate {
    fn lex_key(&self) -> (u32, u32) {
        (self.parent_rank, self.choice)
    }

    /// Merge order: cost, then loss, then lexicographic. (All values are finite.)
    fn merge_order(&self, other: &Self) -> Ordering {
        self.cost
            .total_cmp(&other.cost)
            .then(self.loss.total_cmp(&other.loss))
            .then(self.lex_key().cmp(&other.lex_key()))
    }
}

// `BinaryHeap` pops its maximum, so the heap order is the reverse of the merge order.
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        other.merge_order(self)
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}

/// Whether partial schedule `kept` makes `other` (over the same layers) useless: for every
/// completion by the remaining layers, `kept`'s schedule is feasible whenever `other`'s is
/// and wins under the tie rule.
///
/// `kept` must be at least as cheap and as good. Rounded addition is monotone, so the same
/// completion keeps `kept`'s final cost and loss no larger than `other`'s; the danger is a
/// strict difference that rounding absorbs into a final tie, which the lexicographic rule
/// could then decide for `other`. That cannot happen when `kept` is lexicographically
/// smaller, nor when a difference exceeds the drift bound: each of at most `L` additions
/// moves a partial sum by at most `u * P` (unit roundoff `u`, `P` the sum of per-layer
/// maxima of `|value|`), so two sums over the same completion move apart by at most
/// `2 L u P`; the drift used is twice that. A loss gap beyond it keeps the final loss
/// strictly smaller; a cost gap beyond it keeps the final cost strictly smaller, which wins
/// when the final losses tie.
fn dominates(kept: &Candidate, other: &Candidate, table: &Table<'_>) -> bool {
    kept.cost <= other.cost
        && kept.loss <= other.loss
        && (kept.lex_key() < other.lex_key()
            || other.loss - kept.loss > table.loss_drift
            || other.cost - kept.cost > table.cost_drift)
}

/// A lower bound on the final loss of every feasible completion of a partial schedule, by
/// Lagrangian relaxation of the budget: for any multiplier `m >= 0` and any completion over
/// layers `k..` that fits the budget,
///
/// `loss + sum_{i>=k} s_i >= loss + sum_{i>=k} (s_i + m c_i) - m (budget - cost)
///                       >= loss + m cost + H_k - m budget`,
///
/// with `H_k = sum_{i>=k} min_j (s[i, j] + m c[i, j])`. A state whose bound exceeds the loss
/// of a known feasible schedule (the greedy one) cannot be optimal, nor tie with the optimum.
/// The multiplier approximately maximises the bound of the empty schedule (the dual of the
/// linear relaxation); any `m >= 0` is valid, so its precision only affects pruning power.
struct LossBound {
    multiplier: f64,
    /// `H_k` for `k = 0..=L`.
    suffix: Vec<f64>,
    /// `multiplier * budget`.
    budget_term: f64,
    /// The loss of a feasible schedule plus the rounding margin.
    threshold: f64,
}

impl LossBound {
    /// `None` when the bound would be useless or not finite (an unconstrained budget, or
    /// magnitudes where the multiplier overflows).
    fn new(table: &Table<'_>, incumbent: f64) -> Option<LossBound> {
        let layers = table.layers();
        let multiplier = lagrange_multiplier(table);
        let relaxed = |layer: usize| {
            table.allowed[layer]
                .clone()
                .map(|j| table.loss_at(layer, j) + multiplier * table.cost_at(layer, j))
                .fold(f64::INFINITY, f64::min)
        };
        let mut suffix = vec![0.0; layers + 1];
        for layer in (0..layers).rev() {
            suffix[layer] = suffix[layer + 1] + relaxed(layer);
        }
        let budget_term = if multiplier > 0.0 { multiplier * table.budget } else { 0.0 };
        // Rounding: H_k carries at most 3L roundings of magnitude <= scale, the bound's own
        // evaluation a few more, and the final sums of a completion drift by L u P each;
        // 8 (L + 4) u scale covers all of them.
        let scale = table.loss_scale
            + if multiplier > 0.0 { multiplier * (table.cost_scale + table.budget.abs()) } else { 0.0 };
        let margin = 8.0 * (layers as f64 + 4.0) * UNIT_ROUNDOFF * scale;
        let threshold = incumbent + margin;
        let finite = [suffix[0], budget_term, threshold].iter().all(|v| v.is_finite());
        finite.then_some(LossBound { multiplier, suffix, budget_term, threshold })
    }

    /// Whether no completion by layers `next_layer..` of a partial schedule of cost `cost`
    /// and loss `loss` can reach the incumbent's loss.
    fn excludes(&self, next_layer: usize, cost: f64, loss: f64) -> bool {
        loss + self.multiplier * cost + self.suffix[next_layer] - self.budget_term > self.threshold
    }
}

/// A multiplier near the maximiser of the Lagrangian dual `D(m) = sum_l min_j (s + m c) - m
/// budget`: concave in `m`, with a supergradient `cost(m) - budget`, where `cost(m)` is the
/// total cost of the per-layer minimisers (cheaper on ties), non-increasing in `m`. Bisection
/// on the sign of the supergradient.
fn lagrange_multiplier(table: &Table<'_>) -> f64 {
    let cost_at = |multiplier: f64| -> f64 {
        (0..table.layers())
            .map(|layer| {
                let key = |j: usize| {
                    (table.loss_at(layer, j) + multiplier * table.cost_at(layer, j), table.cost_at(layer, j))
                };
                table.allowed[layer]
                    .clone()
                    .map(key)
                    .reduce(|a, b| if b.0 < a.0 || (b.0 == a.0 && b.1 < a.1) { b } else { a })
                    .map_or(0.0, |(_, cost)| cost)
            })
            .sum()
    };
    if !table.budget.is_finite() || cost_at(0.0) <= table.budget {
        return 0.0;
    }
    let mut high = 1.0;
    while cost_at(high) > table.budget {
        if high > f64::MAX / 4.0 {
            return 0.0;
        }
        high *= 2.0;
    }
    let mut low = 0.0;
    for _ in 0..128 {
        let middle = 0.5 * (low + high);
        if middle <= low || middle >= high {
            break;
        }
        if cost_at(middle) > table.budget {
            low = middle;
        } else {
            high = middle;
        }
    }
    let dual = |multiplier: f64| -> f64 {
        (0..table.layers())
            .map(|layer| {
                table.allowed[layer]
                    .clone()
                    .map(|j| table.loss_at(layer, j) + multiplier * table.cost_at(layer, j))
                    .fold(f64::INFINITY, f64::min)
            })
            .sum::<f64>()
            - multiplier * table.budget
    };
    if dual(low) >= dual(high) {
        low
    } else {
        high
    }
}

/// The frontier of one layer, in merge order (cost non-decreasing).
#[derive(Default)]
struct Frontier {
    cost: Vec<f64>,
    loss: Vec<f64>,
    rank: Vec<u32>,
}

/// How each state of a layer's frontier was reached.
#[derive(Default)]
struct BackPointers {
    parent: Vec<u32>,
    choice: Vec<u32>,
}

/// The dynamic program; `incumbent` is the loss of a feasible schedule.
fn solve_exact(table: &Table<'_>, max_states: usize, incumbent: f64) -> Result<ExactOutcome> {
    let cap = max_states.min(u32::MAX as usize);
    let layers = table.layers();
    // suffix_min[l]: the cheapest total of layers l.. (the pruning bound adds the drift).
    let mut suffix_min = vec![0.0; layers + 1];
    for layer in (0..layers).rev() {
        suffix_min[layer] = suffix_min[layer + 1] + table.cost_at(layer, table.cheapest[layer]);
    }
    // The budget enters a rounded subtraction too, so its own rounding joins the margin.
    let budget_margin = table.cost_drift + 4.0 * UNIT_ROUNDOFF * table.budget.abs();
    let loss_bound = LossBound::new(table, incumbent);

    let mut frontier = Frontier { cost: vec![0.0], loss: vec![0.0], rank: vec![0] };
    let mut history: Vec<BackPointers> = Vec::with_capacity(layers);
    let mut heap = BinaryHeap::new();
    for layer in 0..layers {
        // A state costing more than this cannot finish within the budget even at the
        // cheapest ratios of the later layers.
        let limit = (table.budget - suffix_min[layer + 1] + budget_margin).min(table.budget);
        // The first state of stream `choice` from frontier state `start` on that is within
        // the limit and not excluded by the loss bound. Streams are in cost order, so the
        // first state over the limit ends the stream.
        let next_in_stream = |start: usize, choice: usize| -> Option<Candidate> {
            for parent in start..frontier.cost.len() {
                let cost = frontier.cost[parent] + table.cost_at(layer, choice);
                if cost > limit {
                    return None;
                }
                let loss = frontier.loss[parent] + table.loss_at(layer, choice);
                if loss_bound.as_ref().is_some_and(|bound| bound.excludes(layer + 1, cost, loss)) {
                    continue;
                }
                let parent_rank = frontier.rank[parent];
                return Some(Candidate {
                    cost,
                    loss,
                    parent_rank,
                    choice: choice as u32,
                    parent: parent as u32,
                });
            }
            None
        };
        // One stream per allowed ratio: the previous frontier shifted by that ratio's
        // (cost, loss), which keeps its cost order, so a heap merges the streams in cost
        // order.
        heap.clear();
        heap.extend(table.allowed[layer].clone().filter_map(|choice| next_in_stream(0, choice)));

        let mut next = Frontier::default();
        let mut back = BackPointers::default();
        let mut lex_keys: Vec<(u32, u32)> = Vec::new();
        // The kept state of least loss so far (earliest on ties): cheaper than everything
        // still to come, so the one to test dominance against.
        let mut best: Option<Candidate> = None;
        while let Some(candidate) = heap.pop() {
            if let Some(successor) = next_in_stream(candidate.parent as usize + 1, candidate.choice as usize)
            {
                heap.push(successor);
            }
            if best.is_some_and(|kept| dominates(&kept, &candidate, table)) {
                continue;
            }
            if best.is_none_or(|kept| candidate.loss < kept.loss) {
                best = Some(candidate);
            }
            if next.cost.len() == cap {
                return Ok(ExactOutcome::TooManyStates { layer });
            }
            next.cost.push(candidate.cost);
            next.loss.push(candidate.loss);
            lex_keys.push(candidate.lex_key());
            back.parent.push(candidate.parent);
            back.choice.push(candidate.choice);
        }
        let mut order: Vec<u32> = (0..next.cost.len() as u32).collect();
        order.sort_unstable_by_key(|&state| lex_keys[state as usize]);
        next.rank = vec![0; order.len()];
        for (rank, &state) in order.iter().enumerate() {
            next.rank[state as usize] = rank as u32;
        }
        history.push(back);
        frontier = next;
    }

    let final_pick =
        (0..frontier.cost.len()).filter(|&state| frontier.cost[state] <= table.budget).min_by(|&a, &b| {
            let key = |s: usize| (frontier.loss[s], frontier.cost[s]);
            let ((loss_a, cost_a), (loss_b, cost_b)) = (key(a), key(b));
            loss_a
                .total_cmp(&loss_b)
                .then(cost_a.total_cmp(&cost_b))
                .then(frontier.rank[a].cmp(&frontier.rank[b]))
        });
    // The all-cheapest schedule fits (checked in `prepare`) and pruning never loses the
    // optimum, so a feasible state remains; the error only guards the invariant.
    let Some(mut state) = final_pick else {
        return Err(CoreError::invalid("budget", "a feasible schedule", "none found (internal error)"));
    };
    let mut choice = vec![0; layers];
    for layer in (0..layers).rev() {
        choice[layer] = history[layer].choice[state] as usize;
        state = history[layer].parent[state] as usize;
    }
    Ok(ExactOutcome::Solved(choice))
}

/// Changing one layer's ratio: `gain` is the loss decrease (> 0), `extra` the cost increase
/// (may be <= 0).
#[derive(Debug, Clone, Copy)]
struct Upgrade {
    layer: usize,
    target: usize,
    gain: f64,
    extra: f64,
}

impl Upgrade {
    /// Whether `self` is strictly preferred to `other`: changes that cost nothing first
    /// (larger gain, then larger saving), then the best gain per unit of extra cost, then the
    /// larger gain. Equal candidates keep the earlier (layer, target) found.
    fn beats(&self, other: &Upgrade) -> bool {
        match (self.extra <= 0.0, other.extra <= 0.0) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => self.gain > other.gain || (self.gain == other.gain && self.extra < other.extra),
            (false, false) => {
                let (mine, theirs) = (self.gain / self.extra, other.gain / other.extra);
                mine > theirs || (mine == theirs && self.gain > other.gain)
            }
        }
    }
}

fn solve_greedy(table: &Table<'_>) -> Vec<usize> {
    let mut choice = table.cheapest.clone();
    let mut total = table.min_cost;
    // Changes whose estimated total fit but whose total in layer order did not (rounding):
    // skipped until some other change is applied.
    let mut rejected: Vec<(usize, usize)> = Vec::new();
    loop {
        let mut best: Option<Upgrade> = None;
        for (layer, range) in table.allowed.iter().enumerate() {
            let current = choice[layer];
            for target in range.clone() {
                let gain = table.loss_at(layer, current) - table.loss_at(layer, target);
                let extra = table.cost_at(layer, target) - table.cost_at(layer, current);
                // The estimate may be off by rounding; the drift keeps near-fits in play
                // and the exact check below settles them.
                if gain <= 0.0 || total + extra > table.budget + table.cost_drift {
                    continue;
                }
                if rejected.contains(&(layer, target)) {
                    continue;
                }
                let upgrade = Upgrade { layer, target, gain, extra };
                if best.is_none_or(|kept| upgrade.beats(&kept)) {
                    best = Some(upgrade);
                }
            }
        }
        let Some(upgrade) = best else { return choice };
        let previous = choice[upgrade.layer];
        choice[upgrade.layer] = upgrade.target;
        let (cost, _) = table.totals(&choice);
        if cost <= table.budget {
            total = cost;
            rejected.clear();
        } else {
            choice[upgrade.layer] = previous;
            rejected.push((upgrade.layer, upgrade.target));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::TestRng;

    /// Owned inputs of one problem.
    struct Case {
        layers: usize,
        ratios: Vec<f64>,
        costs: Vec<f64>,
        scaled: bool,
        sensitivity: Vec<f64>,
        min_keep: Vec<f64>,
        max_keep: Vec<f64>,
        budget: f64,
    }

    impl Case {
        fn problem(&self) -> ScheduleProblem<'_> {
            ScheduleProblem {
                num_layers: self.layers,
                ratios: &self.ratios,
                layer_costs: if self.scaled {
                    LayerCosts::Scaled(&self.costs)
                } else {
                    LayerCosts::Measured(&self.costs)
                },
                layer_sensitivity: &self.sensitivity,
                min_keep: &self.min_keep,
                max_keep: &self.max_keep,
                budget: self.budget,
            }
        }

        fn solve(&self, method: Method) -> Result<Schedule> {
            sparsity_schedule(&self.problem(), method, 1 << 20)
        }

        fn simple(
            layers: usize,
            ratios: Vec<f64>,
            costs: Vec<f64>,
            sensitivity: Vec<f64>,
            budget: f64,
        ) -> Case {
            let scaled = costs.len() == layers;
            Case {
                layers,
                ratios,
                costs,
                scaled,
                sensitivity,
                min_keep: vec![0.0; layers],
                max_keep: vec![1.0; layers],
                budget,
            }
        }
    }

    /// Every allowed schedule in lexicographic order; keeps the first of least (loss, cost)
    /// among those within the budget, which is the tie rule.
    fn brute_force(case: &Case) -> Option<Schedule> {
        let width = case.ratios.len();
        let cost_at = |layer: usize, j: usize| {
            if case.scaled {
                case.costs[layer] * case.ratios[j]
            } else {
                case.costs[layer * width + j]
            }
        };
        let ranges: Vec<Range<usize>> = (0..case.layers)
            .map(|layer| {
                let first = case.ratios.iter().position(|&r| r >= case.min_keep[layer]).unwrap();
                let end = case.ratios.iter().rposition(|&r| r <= case.max_keep[layer]).unwrap() + 1;
                first..end
            })
            .collect();
        let mut choice: Vec<usize> = ranges.iter().map(|r| r.start).collect();
        let mut best: Option<Schedule> = None;
        loop {
            let (mut cost, mut loss) = (0.0, 0.0);
            for (layer, &j) in choice.iter().enumerate() {
                cost += cost_at(layer, j);
                loss += case.sensitivity[layer * width + j];
            }
            let better = best.as_ref().is_none_or(|b| loss < b.loss || (loss == b.loss && cost < b.cost));
            if cost <= case.budget && better {
                best = Some(Schedule { choice: choice.clone(), cost, loss, exact: true });
            }
            // Odometer over the allowed ranges, last layer fastest: lexicographic order.
            let mut layer = case.layers;
            loop {
                if layer == 0 {
                    return best;
                }
                layer -= 1;
                choice[layer] += 1;
                if choice[layer] < ranges[layer].end {
                    break;
                }
                choice[layer] = ranges[layer].start;
            }
        }
    }

    /// How the values of a random case are drawn.
    #[derive(Clone, Copy, PartialEq)]
    enum Values {
        /// Uniform reals.
        Real,
        /// Small integers: exact sums, many exact ties.
        Integers,
        /// Ones and twos mixed with values far below their rounding unit: sums that differ
        /// before rounding and tie after it.
        Absorbed,
    }

    /// A random case of at most 5 layers and 4 ratios.
    fn random_case(rng: &mut TestRng, values: Values) -> Case {
        let layers = rng.below(6);
        let width = 1 + rng.below(4);
        let mut ratios: Vec<f64> = (1..=width).map(|j| j as f64 / width as f64).collect();
        if rng.below(2) == 0 {
            // An irregular grid: random increasing values in (0, 1].
            let mut points: Vec<f64> = (0..width).map(|_| 1.0 - rng.unit()).collect();
            points.sort_by(f64::total_cmp);
            points.dedup();
            ratios = points;
        }
        let width = ratios.len();
        let value = |rng: &mut TestRng, scale: f64| match values {
            Values::Real => rng.unit() * scale,
            Values::Integers => rng.below(4) as f64,
            Values::Absorbed => [0.0, 1e-17, 2e-17, 1.0, 2.0][rng.below(5)],
        };
        let scaled = rng.below(2) == 0;
        let costs: Vec<f64> =
            (0..if scaled { layers } else { layers * width }).map(|_| value(rng, 10.0)).collect();
        let sensitivity: Vec<f64> = (0..layers * width)
            .map(|_| {
                let v = value(rng, 5.0);
                if rng.below(4) == 0 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        let (mut min_keep, mut max_keep) = (vec![0.0; layers], vec![1.0; layers]);
        for layer in 0..layers {
            if rng.below(3) == 0 {
                let (a, b) = (rng.below(width), rng.below(width));
                min_keep[layer] = ratios[a.min(b)];
                max_keep[layer] = ratios[a.max(b)];
            }
        }
        let mut case =
            Case { layers, ratios, costs, scaled, sensitivity, min_keep, max_keep, budget: f64::INFINITY };
        let min_cost = prepare(&case.problem()).map(|t| t.min_cost).unwrap();
        let max_cost = case.costs.iter().sum::<f64>() + 1.0;
        case.budget = match rng.below(5) {
            0 => min_cost,
            1 => f64::INFINITY,
            _ => min_cost + rng.unit() * (max_cost - min_cost),
        };
        if values != Values::Real && rng.below(2) == 0 {
            case.budget = case.budget.floor().max(min_cost);
        }
        case
    }

    #[test]
    fn exact_matches_brute_force_and_greedy_fits() {
        let mut rng = TestRng::new(7);
        for trial in 0..6000 {
            let values = [Values::Real, Values::Integers, Values::Absorbed][trial % 3];
            let case = random_case(&mut rng, values);
            let expected = brute_force(&case).expect("budget is at least the minimum cost");
            let exact = case.solve(Method::Exact).unwrap();
            assert_eq!(exact, expected, "trial {trial}");
            assert_eq!(case.solve(Method::Auto).unwrap(), expected, "trial {trial}");
            let greedy = case.solve(Method::Greedy).unwrap();
            assert!(!greedy.exact);
            assert!(greedy.cost <= case.budget, "trial {trial}: greedy over budget");
            assert!(greedy.loss >= exact.loss, "trial {trial}: greedy beat exact");
            assert_eq!(greedy.choice.len(), case.layers);
        }
    }

    #[test]
    fn ties_prefer_lower_cost_then_lexicographic() {
        // Layer 0: index 0 and 1 have equal loss; index 1 is cheaper.
        // Layer 1: indices 0 and 1 are identical; lexicographic picks 0.
        let case = Case::simple(2, vec![0.5, 1.0], vec![2.0, 1.0, 1.0, 1.0], vec![3.0, 3.0, 1.0, 1.0], 10.0);
        let schedule = case.solve(Method::Exact).unwrap();
        assert_eq!(schedule, Schedule { choice: vec![1, 0], cost: 2.0, loss: 4.0, exact: true });
    }

    #[test]
    fn rounding_ties_still_follow_the_lexicographic_rule() {
        // Layer 0: index 1 is strictly better (loss 0 < 1e-20) at equal cost, but adding
        // layer 1's loss of 1.0 rounds both totals to 1.0. The tie then goes to the
        // lexicographically smaller [0, 0], so index 0 must survive the pruning.
        let case = Case::simple(2, vec![0.5, 1.0], vec![1.0, 1.0, 1.0, 1.0], vec![1e-20, 0.0, 1.0, 1.0], 2.0);
        let schedule = case.solve(Method::Exact).unwrap();
        assert_eq!(schedule.choice, vec![0, 0]);
        assert_eq!(Some(schedule), brute_force(&case));
    }

    #[test]
    fn scaled_costs_multiply_by_the_ratio() {
        // Full costs 4 and 8 on the grid (0.25, 0.5, 1): per-ratio costs (1, 2, 4) and
        // (2, 4, 8). Within 6, [1, 1] (cost 2 + 4, loss 1 + 3) beats [0, 1] (5, 7) and
        // [2, 0] (6, 9).
        let sensitivity = vec![4.0, 1.0, 0.0, 9.0, 3.0, 0.0];
        let case = Case::simple(2, vec![0.25, 0.5, 1.0], vec![4.0, 8.0], sensitivity, 6.0);
        let schedule = case.solve(Method::Exact).unwrap();
        assert_eq!(schedule, Schedule { choice: vec![1, 1], cost: 6.0, loss: 4.0, exact: true });
    }

    #[test]
    fn keep_bounds_restrict_the_choice_per_layer() {
        // Per-ratio costs (0.25, 0.5, 1) in both layers; layer 0 may not exceed 0.5, layer 1
        // may not go below 0.5.
        let sensitivity = vec![5.0, 1.0, 0.0, 5.0, 1.0, 0.0];
        let mut case = Case::simple(2, vec![0.25, 0.5, 1.0], vec![1.0, 1.0], sensitivity, 2.0);
        case.max_keep = vec![0.5, 1.0];
        case.min_keep = vec![0.0, 0.5];
        // Everything is affordable: unbounded, [2, 2] would win.
        assert_eq!(case.solve(Method::Exact).unwrap().choice, vec![1, 2]);
        // The least the bounds allow: 0.25 + 0.5.
        case.budget = 0.75;
        assert_eq!(case.solve(Method::Exact).unwrap().choice, vec![0, 1]);
        case.budget = 0.7;
        assert!(case.solve(Method::Exact).unwrap_err().to_string().contains("minimum achievable cost 0.75"));
    }

    #[test]
    fn no_layers_is_an_empty_schedule() {
        let case = Case::simple(0, vec![0.5, 1.0], vec![], vec![], 0.0);
        let expected = Schedule { choice: vec![], cost: 0.0, loss: 0.0, exact: true };
        assert_eq!(case.solve(Method::Exact).unwrap(), expected);
        assert_eq!(case.solve(Method::Greedy).unwrap(), Schedule { exact: false, ..expected });
    }

    #[test]
    fn the_state_cap_stops_exact_and_auto_falls_back_to_greedy() {
        // Layer l either pays w = l + 1 or loses w: every partial schedule has cost + loss =
        // the sum of its weights, so none dominates another, and the Lagrangian bound equals
        // the optimum for all of them. The frontier holds every reachable cost.
        let layers = 12;
        let mut costs = Vec::new();
        let mut sensitivity = Vec::new();
        for layer in 0..layers {
            let weight = (layer + 1) as f64;
            costs.extend([0.0, weight]);
            sensitivity.extend([weight, 0.0]);
        }
        let case = Case::simple(layers, vec![0.5, 1.0], costs, sensitivity, 39.0);
        let err = sparsity_schedule(&case.problem(), Method::Exact, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "method: expected a problem whose Pareto frontier stays within max_states = 4 states for \
             method \"exact\" (use \"auto\" or \"greedy\", or raise max_states), got more than 4 states \
             after layer 2"
        );
        let auto = sparsity_schedule(&case.problem(), Method::Auto, 4).unwrap();
        assert_eq!(auto, case.solve(Method::Greedy).unwrap());
        let exact = case.solve(Method::Auto).unwrap();
        assert!(exact.exact);
        assert_eq!((exact.cost, exact.loss), (39.0, 39.0));
        assert_eq!(Some(exact), brute_force(&case));
    }

    #[test]
    fn greedy_jumps_to_any_ratio_by_best_gain_per_cost() {
        // One layer whose next ratio gains nothing: greedy still reaches the last one.
        let case = Case::simple(1, vec![0.25, 0.5, 0.75], vec![1.0, 2.0, 3.0], vec![10.0, 10.0, 1.0], 3.0);
        assert_eq!(case.solve(Method::Greedy).unwrap().choice, vec![2]);
        // Layer 1's change (2 per unit of cost) goes before layer 0's (1.5 per unit), and then
        // layer 0's no longer fits: greedy ends at loss 3 where the optimum is 2.
        let case = Case::simple(2, vec![0.5, 1.0], vec![0.0, 2.0, 0.0, 1.0], vec![3.0, 0.0, 2.0, 0.0], 2.0);
        let greedy = case.solve(Method::Greedy).unwrap();
        assert_eq!((greedy.choice, greedy.loss), (vec![0, 1], 3.0));
        let exact = case.solve(Method::Exact).unwrap();
        assert_eq!((exact.choice, exact.loss), (vec![1, 0], 2.0));
    }

    #[test]
    fn errors_name_the_argument() {
        let base = || Case::simple(2, vec![0.5, 1.0], vec![1.0, 1.0], vec![1.0, 0.0, 1.0, 0.0], 2.0);
        let message = |case: &Case| case.solve(Method::Auto).unwrap_err().to_string();
        let mut case = base();
        case.ratios = vec![];
        case.sensitivity = vec![];
        case.layers = 0;
        case.costs = vec![];
        assert_eq!(message(&case), "ratios: expected a grid of at least one keep-ratio, got an empty grid");
        let mut case = base();
        case.ratios = vec![0.0, 1.0];
        assert_eq!(message(&case), "ratios: expected keep-ratios in (0, 1], got 0.0 at index 0");
        case.ratios = vec![0.5, 0.5];
        assert_eq!(
            message(&case),
            "ratios: expected a strictly increasing grid, got 0.5 then 0.5 at indices 0 and 1"
        );
        case.ratios = vec![0.5, f64::NAN];
        assert!(message(&case).starts_with("ratios: expected keep-ratios in (0, 1], got NaN"));
        let mut case = base();
        case.sensitivity.pop();
        assert_eq!(message(&case), "layer_sensitivity: expected 4 elements, got 3");
        let mut case = base();
        case.costs[1] = -1.0;
        assert_eq!(message(&case), "layer_costs: expected finite non-negative costs, got -1.0 at layer 1");
        let mut case = base();
        case.costs = vec![1.0, 1.0, f64::INFINITY, 1.0];
        case.scaled = false;
        assert_eq!(
            message(&case),
            "layer_costs: expected finite non-negative costs, got inf at layer 1, ratio index 0"
        );
        let mut case = base();
        case.sensitivity[3] = f64::NAN;
        assert_eq!(
            message(&case),
            "layer_sensitivity: expected finite values, got NaN at layer 1, ratio index 1"
        );
        let mut case = base();
        case.min_keep[0] = -0.5;
        assert_eq!(message(&case), "min_keep: expected values in [0, 1], got -0.5 for layer 0");
        case.min_keep[0] = 0.9;
        case.max_keep[0] = 0.8;
        assert_eq!(
            message(&case),
            "max_keep: expected max_keep >= min_keep, got max_keep 0.8 < min_keep 0.9 for layer 0"
        );
        case.max_keep[0] = 0.95;
        assert_eq!(
            message(&case),
            "min_keep, max_keep: expected at least one grid ratio r with min_keep <= r <= max_keep in every \
             layer, got none in [0.9, 0.95] for layer 0"
        );
        let mut case = base();
        case.budget = f64::NAN;
        assert_eq!(message(&case), "budget: expected a number, got NaN");
        case.budget = 0.5;
        assert_eq!(
            message(&case),
            "budget: expected at least the minimum achievable cost 1.0 (every layer at its cheapest \
             allowed ratio), got 0.5"
        );
        let mut case = base();
        case.sensitivity[0] = f64::MAX;
        assert!(message(&case).starts_with("layer_sensitivity: expected magnitudes whose sum"));
        assert_eq!(
            "fastest".parse::<Method>().unwrap_err().to_string(),
            "method: expected \"auto\", \"exact\" or \"greedy\", got \"fastest\""
        );
        let case = base();
        assert_eq!(
            sparsity_schedule(&case.problem(), Method::Exact, 0).unwrap_err().to_string(),
            "max_states: expected at least 1, got 0"
        );
    }

    #[test]
    fn a_large_problem_solves_exactly() {
        // 61 layers, 8 ratios, convex sensitivities: the shape of a real model's schedule.
        let mut rng = TestRng::new(11);
        let (layers, width) = (61, 8);
        let ratios: Vec<f64> = (1..=width).map(|j| j as f64 / width as f64).collect();
        let costs: Vec<f64> = (0..layers).map(|_| 1.0 + rng.unit()).collect();
        let sensitivity: Vec<f64> = (0..layers)
            .flat_map(|_| {
                let weight = rng.unit();
                ratios.iter().map(move |r| weight * (1.0 - r) * (1.0 - r)).collect::<Vec<_>>()
            })
            .collect();
        let budget = 0.5 * costs.iter().sum::<f64>();
        let case = Case::simple(layers, ratios, costs, sensitivity, budget);
        let exact = case.solve(Method::Exact).unwrap();
        let greedy = case.solve(Method::Greedy).unwrap();
        assert!(exact.cost <= budget && greedy.cost <= budget);
        assert!(exact.loss <= greedy.loss);
    }
}
