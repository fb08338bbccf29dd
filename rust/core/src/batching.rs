//! Serving-side scheduling with lookahead routing: expert-aware batching of queued
//! requests, and prefetch plans for offloaded experts.
//!
//! When the router is decoupled from the backbone (pre-gating, as in Read-ME), the experts
//! every request will use at every layer are known before the request runs. A server can
//! then (1) batch together requests that use the same experts, so each batch touches fewer
//! distinct experts (fewer weights to read or load), and (2) load the experts of upcoming
//! layers while earlier layers compute.

use crate::error::{CoreError, Result};

/// The (layer, expert) pairs one request uses, as a bitset of `layers * experts` bits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ExpertSet {
    words: Vec<u64>,
}

impl ExpertSet {
    fn empty(num_layers: usize, num_experts: usize) -> Self {
        ExpertSet { words: vec![0; (num_layers * num_experts).div_ceil(64)] }
    }

    fn insert(&mut self, bit: usize) {
        self.words[bit / 64] |= 1 << (bit % 64);
    }

    fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// How many of `self`'s pairs `other` does not hold yet.
    fn new_to(&self, other: &ExpertSet) -> usize {
        self.words.iter().zip(&other.words).map(|(a, b)| (a & !b).count_ones() as usize).sum()
    }

    fn union_with(&mut self, other: &ExpertSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }
}

/// How a batch is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchPolicy {
    /// The oldest requests, in arrival order.
    Fifo,
    /// After the requests that reached the waiting bound and the oldest request, the request
    /// that adds the fewest new (layer, expert) pairs to the batch, repeatedly (ties: the
    /// older request).
    ExpertAware,
}

impl std::str::FromStr for BatchPolicy {
    type Err = CoreError;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "fifo" => Ok(BatchPolicy::Fifo),
            "expert_aware" => Ok(BatchPolicy::ExpertAware),
            other => Err(CoreError::invalid("policy", "\"fifo\" or \"expert_aware\"", format!("{other:?}"))),
        }
    }
}

/// How batches are formed: at most `max_batch` requests, a request waits at most
/// `max_wait` rounds (see [`Batcher`]), filled by `policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRules {
    pub max_batch: usize,
    pub max_wait: u64,
    pub policy: BatchPolicy,
}

/// A queued request.
#[derive(Clone, Debug)]
struct Pending {
    id: i64,
    arrival: u64,
    experts: ExpertSet,
}

/// One batch: its requests (in the order they were chosen), the distinct (layer, expert)
/// pairs they use together, and the round it runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub requests: Vec<i64>,
    pub distinct_experts: usize,
    pub round: u64,
}

/// Forms batches of at most `max_batch` queued requests, one per round.
///
/// Fairness: a request that has waited `max_wait` rounds (rounds that ran a batch without
/// it since it arrived) is taken before any other, oldest first. The bound holds unless more
/// than `max_batch` requests reach it in the same round (an overloaded queue); then the
/// oldest go first and the others wait longer.
#[derive(Clone, Debug)]
pub struct Batcher {
    num_layers: usize,
    num_experts: usize,
    max_batch: usize,
    max_wait: u64,
    policy: BatchPolicy,
    round: u64,
    /// In arrival order (ties: push order).
    queue: Vec<Pending>,
}

impl Batcher {
    pub fn new(num_layers: usize, num_experts: usize, rules: BatchRules) -> Result<Self> {
        let BatchRules { max_batch, max_wait, policy } = rules;
        if max_batch == 0 {
            return Err(CoreError::invalid("max_batch", "at least 1", "0"));
        }
        if num_experts == 0 {
            return Err(CoreError::invalid("num_experts", "at least 1", "0"));
        }
        Ok(Batcher { num_layers, num_experts, max_batch, max_wait, policy, round: 0, queue: Vec::new() })
    }

    /// Queues request `id`, arriving now, which uses experts `experts[l * k..(l + 1) * k]` at
    /// layer `l` (`-1` entries are empty).
    pub fn push(&mut self, id: i64, experts: &[i64]) -> Result<()> {
        let layers = self.num_layers;
        if layers == 0 && !experts.is_empty() || layers > 0 && !experts.len().is_multiple_of(layers) {
            return Err(CoreError::invalid(
                "experts",
                format!("[L, k] with L = {layers} layers"),
                format!("{} ids", experts.len()),
            ));
        }
        let k = experts.len().checked_div(layers).unwrap_or(0);
        let mut set = ExpertSet::empty(layers, self.num_experts);
        for (i, &e) in experts.iter().enumerate() {
            if e == -1 {
                continue;
            }
            if e < -1 || e as u64 >= self.num_experts as u64 {
                return Err(CoreError::invalid(
                    "experts",
                    format!("ids in [-1, {})", self.num_experts),
                    format!("{e} at layer {}", i / k),
                ));
            }
            set.insert((i / k) * self.num_experts + e as usize);
        }
        self.queue.push(Pending { id, arrival: self.round, experts: set });
        Ok(())
    }

    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    /// The next batch (empty when nothing is queued; the round advances only for a
    /// non-empty batch).
    pub fn next_batch(&mut self) -> Batch {
        let round = self.round;
        let queue = &self.queue;
        let mut taken = vec![false; queue.len()];
        let mut chosen: Vec<usize> = Vec::with_capacity(self.max_batch);
        let mut union = ExpertSet::empty(self.num_layers, self.num_experts);
        // Overdue requests first, oldest first; without any, the oldest request, which seeds
        // an expert-aware batch and is all a FIFO batch needs to start.
        let mut seeds: Vec<usize> = (0..queue.len())
            .filter(|&i| round - queue[i].arrival >= self.max_wait)
            .take(self.max_batch)
            .collect();
        if seeds.is_empty() && !queue.is_empty() {
            seeds.push(0);
        }
        let mut seeds = seeds.into_iter();
        while chosen.len() < self.max_batch {
            let next = seeds.next().or_else(|| {
                let mut free = (0..queue.len()).filter(|&i| !taken[i]);
                match self.policy {
                    BatchPolicy::Fifo => free.next(),
                    BatchPolicy::ExpertAware => free.min_by_key(|&i| (queue[i].experts.new_to(&union), i)),
                }
            });
            let Some(i) = next else { break };
            taken[i] = true;
            chosen.push(i);
            union.union_with(&queue[i].experts);
        }
        let requests = chosen.iter().map(|&i| queue[i].id).collect();
        let mut index = 0;
        self.queue.retain(|_| {
            index += 1;
            !taken[index - 1]
        });
        if !chosen.is_empty() {
            self.round += 1;
        }
        Batch { requests, distinct_experts: union.len(), round }
    }
}

/// Replays a queue: request `r` (using `experts[r]`, `[L, k]` flattened) arrives at round
/// `arrivals[r]` (requests arriving together are queued in index order), and one batch runs
/// per round while requests are queued (idle rounds are skipped). Returns the batches,
/// each with the round it ran in on the arrivals' clock (idle rounds counted).
pub fn replay_batching(
    experts: &[i64],
    num_requests: usize,
    num_layers: usize,
    num_experts: usize,
    arrivals: &[i64],
    rules: BatchRules,
) -> Result<Vec<Batch>> {
    crate::error::check_len("arrivals", arrivals, num_requests)?;
    if let Some(r) = arrivals.iter().position(|&a| a < 0) {
        return Err(CoreError::invalid(
            "arrivals",
            "rounds >= 0",
            format!("{} for request {r}", arrivals[r]),
        ));
    }
    let per_request = experts.len().checked_div(num_requests).unwrap_or(0);
    crate::error::check_len("experts", experts, num_requests * per_request)?;
    let mut order: Vec<usize> = (0..num_requests).collect();
    order.sort_by_key(|&r| (arrivals[r], r));
    let mut batcher = Batcher::new(num_layers, num_experts, rules)?;
    let mut batches = Vec::new();
    let mut next = 0;
    // Rounds advance only when a batch runs; the clock of arrivals is the round count plus
    // the idle rounds skipped while the queue was empty.
    let mut idle_offset: i64 = 0;
    while next < order.len() || batcher.pending() > 0 {
        let now = batcher.round() as i64 + idle_offset;
        if batcher.pending() == 0 && arrivals[order[next]] > now {
            idle_offset += arrivals[order[next]] - now;
            continue;
        }
        while next < order.len() && arrivals[order[next]] <= now {
            let r = order[next];
            batcher.push(r as i64, &experts[r * per_request..(r + 1) * per_request])?;
            next += 1;
        }
        let mut batch = batcher.next_batch();
        batch.round = now as u64;
        batches.push(batch);
    }
    Ok(batches)
}

/// One expert load of a prefetch plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Load {
    /// The (layer, expert) loaded.
    pub key: (i64, i64),
    /// The resident (layer, expert) it replaces, if memory was full.
    pub evict: Option<(i64, i64)>,
    /// The step (index into the upcoming layers) that first needs it.
    pub needed_by: usize,
    /// The step during which it is issued: `needed_by - depth`, or -1 for "before the
    /// first step" (it must be loaded before anything runs).
    pub issue_during: i64,
}

/// Which experts to load, in which order, and what to evict, to run upcoming layers.
///
/// `resident`: the (layer, expert) keys in memory now; `upcoming[j]`: the layer of step `j`
/// and the experts it needs. `capacity` experts fit in memory. With `depth` = 1 (double
/// buffering) the loads of step `j` are issued while step `j - 1` computes; with a larger
/// depth, that many steps ahead. Loads are ordered by the step that needs them, then by
/// expert. The experts of the steps that compute while a load is in flight (steps
/// `j - depth ..= j`) are pinned; the victim is the unpinned resident whose next use among
/// the upcoming steps is farthest (never used: first), ties to the smallest key.
pub fn prefetch_plan(
    resident: &[(i64, i64)],
    upcoming: &[(i64, Vec<i64>)],
    capacity: usize,
    depth: usize,
) -> Result<Vec<Load>> {
    let mut memory: Vec<(i64, i64)> = resident.to_vec();
    memory.sort_unstable();
    memory.dedup();
    if memory.len() > capacity {
        return Err(CoreError::invalid(
            "resident",
            format!("at most capacity = {capacity} experts"),
            memory.len().to_string(),
        ));
    }
    let needs: Vec<Vec<(i64, i64)>> = upcoming
        .iter()
        .map(|(layer, experts)| {
            let mut keys: Vec<(i64, i64)> =
                experts.iter().filter(|&&e| e >= 0).map(|&e| (*layer, e)).collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        })
        .collect();
    // The steps that use each key, ascending: next uses are binary searches.
    let mut uses: std::collections::HashMap<(i64, i64), Vec<usize>> = std::collections::HashMap::new();
    for (j, keys) in needs.iter().enumerate() {
        for &key in keys {
            uses.entry(key).or_default().push(j);
        }
    }
    let next_use = |key: (i64, i64), from: usize| -> usize {
        uses.get(&key)
            .and_then(|steps| steps.get(steps.partition_point(|&s| s < from)).copied())
            .unwrap_or(usize::MAX)
    };
    let mut plan = Vec::new();
    for (j, keys) in needs.iter().enumerate() {
        let first_pinned = j.saturating_sub(depth);
        let pinned = |key: &(i64, i64)| next_use(*key, first_pinned) <= j;
        let pinned_count = memory.iter().filter(|k| pinned(k)).count()
            + keys.iter().filter(|k| memory.binary_search(k).is_err()).count();
        if pinned_count > capacity {
            return Err(CoreError::invalid(
                "capacity",
                format!(
                    "room for the experts of steps {first_pinned}..={j} ({pinned_count} with depth {depth})"
                ),
                capacity.to_string(),
            ));
        }
        for &key in keys {
            if memory.binary_search(&key).is_ok() {
                continue;
            }
            let evict = if memory.len() < capacity {
                None
            } else {
                // Farthest next use first (never used again counts as farthest), then the
                // smallest key: `max_by_key` keeps the last maximum, so compare reversed keys.
                let victim = memory
                    .iter()
                    .copied()
                    .filter(|k| !pinned(k))
                    .max_by_key(|&k| (next_use(k, j), std::cmp::Reverse(k)))
                    .expect("pinned experts fit in capacity, so a victim exists");
                let at = memory.binary_search(&victim).expect("the victim is resident");
                memory.remove(at);
                Some(victim)
            };
            let at = memory.binary_search(&key).unwrap_err();
            memory.insert(at, key);
            plan.push(Load { key, evict, needed_by: j, issue_during: j as i64 - depth as i64 });
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batcher(policy: BatchPolicy, max_batch: usize, max_wait: u64) -> Batcher {
        Batcher::new(2, 4, BatchRules { max_batch, max_wait, policy }).unwrap()
    }

    #[test]
    fn expert_aware_batches_share_experts() {
        // Requests 0 and 2 use the same experts; 1 and 3 use others.
        let routing: [[i64; 2]; 4] = [[0, 1], [2, 3], [0, 1], [2, 3]];
        for (policy, expected) in [
            (BatchPolicy::Fifo, [vec![0, 1], vec![2, 3]]),
            (BatchPolicy::ExpertAware, [vec![0, 2], vec![1, 3]]),
        ] {
            let mut b = batcher(policy, 2, 10);
            for (id, r) in routing.iter().enumerate() {
                b.push(id as i64, r).unwrap();
            }
            let first = b.next_batch();
            let second = b.next_batch();
            assert_eq!([first.requests.clone(), second.requests.clone()], expected, "{policy:?}");
            if policy == BatchPolicy::ExpertAware {
                assert_eq!((first.distinct_experts, second.distinct_experts), (2, 2));
            }
            assert_eq!(b.next_batch(), Batch { requests: vec![], distinct_experts: 0, round: 2 });
        }
    }

    #[test]
    fn overdue_requests_go_first() {
        let mut b = batcher(BatchPolicy::ExpertAware, 1, 1);
        b.push(0, &[0, 0]).unwrap();
        b.push(1, &[1, 1]).unwrap();
        assert_eq!(b.next_batch().requests, [0]);
        b.push(2, &[1, 1]).unwrap();
        // Request 1 waited one round: it goes before 2 although both need the same experts.
        assert_eq!(b.next_batch().requests, [1]);
        assert_eq!(b.next_batch().requests, [2]);
    }

    #[test]
    fn replay_bounds_waits_and_serves_everyone() {
        let mut rng = crate::test_rng::TestRng::new(7);
        let mut random = |n: usize| rng.below(n) as i64;
        let (requests, layers, k) = (200, 4, 2);
        let experts: Vec<i64> = (0..requests * layers * k).map(|_| random(8)).collect();
        let arrivals: Vec<i64> = (0..requests).map(|r| r as i64 / 4).collect();
        for policy in [BatchPolicy::Fifo, BatchPolicy::ExpertAware] {
            let rules = BatchRules { max_batch: 6, max_wait: 3, policy };
            let batches = replay_batching(&experts, requests, layers, 8, &arrivals, rules).unwrap();
            let mut served: Vec<i64> = batches.iter().flat_map(|b| b.requests.clone()).collect();
            served.sort_unstable();
            assert_eq!(served, (0..requests as i64).collect::<Vec<_>>());
            for batch in &batches {
                assert!(batch.requests.len() <= 6);
                for &r in &batch.requests {
                    assert!(
                        batch.round as i64 - arrivals[r as usize] <= 3,
                        "{policy:?}: request {r} waited too long"
                    );
                }
            }
        }
        let no_room = BatchRules { max_batch: 0, max_wait: 3, policy: BatchPolicy::Fifo };
        assert!(replay_batching(&experts, requests, layers, 8, &arrivals, no_room).is_err());
    }

    #[test]
    fn bad_ids_are_errors() {
        let mut b = batcher(BatchPolicy::Fifo, 2, 1);
        assert_eq!(
            b.push(0, &[0, 4]).unwrap_err().to_string(),
            "experts: expected ids in [-1, 4), got 4 at layer 1"
        );
        assert!(b.push(0, &[0, 1, 2]).is_err());
        assert!(b.push(0, &[-1, -1]).is_ok());
    }

    #[test]
    fn prefetch_evicts_the_farthest_next_use_and_pins_in_flight_steps() {
        // Capacity 3; resident: (0,0), (0,1), (1,5). Steps: layer 1 needs 5 and 6, layer 2
        // needs 0, layer 3 needs 1.
        let resident = [(0, 0), (0, 1), (1, 5)];
        let upcoming = [(1, vec![5, 6]), (2, vec![0]), (3, vec![1])];
        let plan = prefetch_plan(&resident, &upcoming, 3, 1).unwrap();
        // (1,6) evicts a resident never used again: (0,0) and (0,1) are both unused (the
        // upcoming layers are 1..3), the smaller key goes first.
        assert_eq!(plan[0], Load { key: (1, 6), evict: Some((0, 0)), needed_by: 0, issue_during: -1 });
        // (2,0): steps 0 and 1 are pinned ((1,5), (1,6)); (0,1) goes.
        assert_eq!(plan[1], Load { key: (2, 0), evict: Some((0, 1)), needed_by: 1, issue_during: 0 });
        // (3,1): steps 1..=2 pinned ((2,0)); (1,5) and (1,6) are free, never used again.
        assert_eq!(plan[2], Load { key: (3, 1), evict: Some((1, 5)), needed_by: 2, issue_during: 1 });
        assert!(prefetch_plan(&resident, &upcoming, 2, 1).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Every request is served exactly once, batches hold at most `max_batch`, and
            /// with at most `max_batch` arrivals per round nobody waits beyond `max_wait`.
            #[test]
            fn replays_serve_everyone_within_the_bound(
                per_round in proptest::collection::vec(0usize..=4, 1..20),
                max_wait in 0u64..4,
                expert_aware in any::<bool>(),
                seed in any::<u64>(),
            ) {
                let max_batch = 4;
                let arrivals: Vec<i64> = per_round.iter().enumerate()
                    .flat_map(|(round, &n)| std::iter::repeat_n(round as i64, n)).collect();
                let requests = arrivals.len();
                let mut state = seed | 1;
                let experts: Vec<i64> = (0..requests * 3 * 2).map(|_| {
                    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                    (state % 9) as i64 - 1
                }).collect();
                let policy = if expert_aware { BatchPolicy::ExpertAware } else { BatchPolicy::Fifo };
                let rules = BatchRules { max_batch, max_wait, policy };
                let batches = replay_batching(&experts, requests, 3, 8, &arrivals, rules).unwrap();
                let mut served = vec![0; requests];
                for batch in &batches {
                    prop_assert!(!batch.requests.is_empty() && batch.requests.len() <= max_batch);
                    for &r in &batch.requests {
                        served[r as usize] += 1;
                        prop_assert!(batch.round as i64 >= arrivals[r as usize]);
                        prop_assert!(batch.round as i64 - arrivals[r as usize] <= max_wait as i64);
                    }
                }
                prop_assert!(served.iter().all(|&n| n == 1));
            }

            /// Replaying a prefetch plan: every step finds its experts resident, memory never
            /// exceeds capacity, and no load evicts an expert of a step in flight.
            #[test]
            fn prefetch_plans_keep_every_step_resident(
                steps in proptest::collection::vec((0i64..3, proptest::collection::vec(-1i64..5, 1..3)), 0..10),
                depth in 0usize..3,
                spare in 0usize..3,
            ) {
                let capacity = (depth + 1) * 2 + spare;
                let resident: Vec<(i64, i64)> = (0..capacity.min(4) as i64).map(|e| (0, e)).collect();
                let plan = prefetch_plan(&resident, &steps, capacity, depth).unwrap();
                let mut memory: std::collections::BTreeSet<(i64, i64)> = resident.iter().copied().collect();
                let mut loads = plan.iter().peekable();
                for (j, (layer, experts)) in steps.iter().enumerate() {
                    while let Some(load) = loads.next_if(|load| load.needed_by == j) {
                        if let Some(victim) = load.evict {
                            let in_flight = (j.saturating_sub(depth)..=j)
                                .any(|s| steps[s].1.contains(&victim.1) && steps[s].0 == victim.0);
                            prop_assert!(!in_flight, "evicted {victim:?} needed by a step in flight");
                            prop_assert!(memory.remove(&victim));
                        }
                        prop_assert!(memory.insert(load.key));
                        prop_assert!(memory.len() <= capacity);
                    }
                    for &e in experts.iter().filter(|&&e| e >= 0) {
                        prop_assert!(memory.contains(&(*layer, e)), "step {j} misses ({layer}, {e})");
                    }
                }
            }
        }
    }
}
