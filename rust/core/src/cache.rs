//! Expert caches for offloaded MoE serving, and replay of routing traces through them.
//!
//! When only some experts fit in accelerator memory, the others stay in host memory (or on
//! disk) and are loaded when a token routes to them. This module models that memory as a
//! cache and measures eviction policies on recorded routing.
//!
//! # The model
//!
//! - A **key** is a (layer, expert) pair; key `(l, e)` has index `l * num_experts + e`.
//!   Every key names one **object**, the weights that get loaded. By default each key is its
//!   own object; an alias map lets several keys share one object (an expert shared across
//!   layers): the object is loaded once, occupies capacity once, and a use of any of its keys
//!   is a use of the object. An object's id is the index of its *target* key (the key the
//!   aliases point to; aliases of aliases are refused).
//! - Every object has a size in bytes (1 unless given). Capacity is counted in objects
//!   ([`CapacityUnit::Experts`]) or in bytes ([`CapacityUnit::Bytes`]).
//! - A routing trace is a sequence of **steps**; a step visits layers `0..L` in order, and
//!   **visit** `v = step * L + layer` needs the objects of the experts that layer used. All
//!   of them must be resident at once while the layer runs. A **request** is one object
//!   needed by one visit (two keys of one visit that share an object make one request).
//! - A visit is processed thus: its objects are **pinned** (none of them may be evicted
//!   during the visit); then, in ascending object id, a resident object is a **hit** and is
//!   touched, and a missing one is a **miss**: the policy's victims (never pinned) are
//!   evicted until it fits, and it is loaded (`bytes_moved += size`). A visit with at least
//!   one miss is a **stall** (the layer waits for a load). Loads happen only on a miss: no
//!   prefetch, no eviction without need (demand paging). The cache starts empty.
//! - If the objects of one visit do not fit in the capacity together, the layer cannot run:
//!   [`Replay::new`] refuses the trace up front, naming the first such visit, and
//!   [`Cache::visit`] refuses the visit.
//!
//! # Policies
//!
//! A victim is chosen among the resident objects that are not pinned. Every rule ends in a
//! total order, so replays are deterministic.
//!
//! - [`Lru`]: the least recently used (the oldest last use; objects used in the same visit:
//!   the smaller id).
//! - [`Lfu`]: the least frequently used, counting every use since the replay began, including
//!   uses before an eviction ("perfect" LFU, which suits the stable popularity of experts);
//!   ties: least recently used, then the smaller id.
//! - [`Lifo`]: the most recently loaded (the latest load; objects loaded in the same visit:
//!   the larger id, which was loaded last).
//! - [`Belady`]: the object whose next use is farthest in the future, looking `window` steps
//!   ahead (`window * L` visits after the current one); objects not used within the window
//!   count as farthest. Ties (the same next use, or no use within the window): least
//!   recently used, then the smaller id. With the whole trace in view and uniform sizes this
//!   is optimal (fewest misses); with a window of 0 it sees nothing and is exactly LRU.
//! - [`Priority`]: the lowest priority `(score, decayed frequency)`, compared in that order:
//!   `score` is a caller-supplied number per key (for example a predictor's probability that
//!   the expert is used soon, or a profiled activation rate; 0 when not given), and the
//!   decayed frequency is `sum over past uses u of decay^(step - step_u)` with `decay` in
//!   (0, 1] per step (1 = plain frequency). Ties: least recently used, then the smaller id.

use crate::error::{CoreError, Result};
use std::cmp::Reverse;

/// The "next use" of an object that is not used again, or whose future is unknown.
pub const NEVER: u64 = u64::MAX;

/// The time of a visit: its index in the trace, and the step it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub visit: u64,
    pub step: u64,
}

/// What is counted in a capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapacityUnit {
    /// Resident objects (experts), whatever their size.
    Experts,
    /// Bytes of the resident objects.
    Bytes,
}

impl std::str::FromStr for CapacityUnit {
    type Err = CoreError;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "experts" => Ok(CapacityUnit::Experts),
            "bytes" => Ok(CapacityUnit::Bytes),
            other => {
                Err(CoreError::invalid("capacity_unit", "\"experts\" or \"bytes\"", format!("{other:?}")))
            }
        }
    }
}

/// The counters of a replay (or of an online cache so far).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Sum of the sizes of the objects loaded.
    pub bytes_moved: u64,
    /// Visits with at least one miss.
    pub stalls: u64,
    pub evictions: u64,
}

impl CacheStats {
    pub fn requests(&self) -> u64 {
        self.hits + self.misses
    }

    /// `hits / requests`, or 0 when nothing was requested.
    pub fn hit_ratio(&self) -> f64 {
        if self.requests() == 0 {
            0.0
        } else {
            self.hits as f64 / self.requests() as f64
        }
    }
}

/// A (layer, expert) pair as Python spells it.
pub type Key = (i64, i64);

/// The keys of a model, the object each key names, and each object's size.
#[derive(Clone, Debug)]
pub struct Layout {
    num_layers: usize,
    num_experts: usize,
    /// Per key index: the object (the index of its target key).
    object_of: Vec<u32>,
    /// Per object id (a key index; unused for keys that are aliases).
    bytes: Vec<u64>,
}

impl Layout {
    /// `expert_bytes`: the size of every key, `num_layers * num_experts` values, layer-major
    /// (`None`: 1 byte each). `aliases`: `(key, target)` pairs; `key` then uses `target`'s
    /// object. A target may not itself be an alias, a key may be aliased once, and a key and
    /// its target must have the same size.
    pub fn new(
        num_layers: usize,
        num_experts: usize,
        expert_bytes: Option<&[i64]>,
        aliases: &[(Key, Key)],
    ) -> Result<Self> {
        if num_layers == 0 {
            return Err(CoreError::invalid("num_layers", "at least 1", "0"));
        }
        if num_experts == 0 {
            return Err(CoreError::invalid("num_experts", "at least 1", "0"));
        }
        // Object ids are u32, and the largest id is reserved for the recency list's sentinel.
        let num_keys =
            num_layers.checked_mul(num_experts).filter(|&n| n < u32::MAX as usize).ok_or_else(|| {
                CoreError::invalid(
                    "num_experts",
                    format!("num_layers * num_experts < {}", u32::MAX),
                    format!("{num_layers} * {num_experts}"),
                )
            })?;
        let bytes: Vec<u64> = match expert_bytes {
            None => vec![1; num_keys],
            Some(sizes) => {
                crate::error::check_len("expert_bytes", sizes, num_keys)?;
                if let Some(i) = sizes.iter().position(|&b| b <= 0) {
                    return Err(CoreError::invalid(
                        "expert_bytes",
                        "sizes >= 1",
                        format!("{} for (layer {}, expert {})", sizes[i], i / num_experts, i % num_experts),
                    ));
                }
                sizes.iter().map(|&b| b as u64).collect()
            }
        };
        let index = |key: Key| -> Result<usize> {
            let (layer, expert) = key;
            if layer < 0
                || layer as u64 >= num_layers as u64
                || expert < 0
                || expert as u64 >= num_experts as u64
            {
                return Err(CoreError::invalid(
                    "aliases",
                    format!("keys (layer, expert) in [0, {num_layers}) x [0, {num_experts})"),
                    format!("{key:?}"),
                ));
            }
            Ok(layer as usize * num_experts + expert as usize)
        };
        let mut object_of: Vec<u32> = (0..num_keys as u32).collect();
        let mut aliased = vec![false; num_keys];
        for &(key, target) in aliases {
            let (k, t) = (index(key)?, index(target)?);
            if k == t {
                return Err(CoreError::invalid(
                    "aliases",
                    "a key aliased to another key",
                    format!("{key:?} -> itself"),
                ));
            }
            if aliased[k] {
                return Err(CoreError::invalid(
                    "aliases",
                    "each key aliased at most once",
                    format!("{key:?} twice"),
                ));
            }
            if bytes[k] != bytes[t] {
                return Err(CoreError::invalid(
                    "aliases",
                    "a key and its target of the same size (expert_bytes)",
                    format!("{key:?} of {} bytes -> {target:?} of {} bytes", bytes[k], bytes[t]),
                ));
            }
            aliased[k] = true;
            object_of[k] = t as u32;
        }
        // Refuse chains only after all pairs are in: the order of the pairs must not matter.
        for &(key, target) in aliases {
            if aliased[index(target)?] {
                return Err(CoreError::invalid(
                    "aliases",
                    "targets that are not aliases themselves",
                    format!("{key:?} -> {target:?}, which is an alias"),
                ));
            }
        }
        Ok(Layout { num_layers, num_experts, object_of, bytes })
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Object ids range over `0..num_objects()` (the key indices; ids of alias keys are
    /// never used).
    pub fn num_objects(&self) -> usize {
        self.object_of.len()
    }

    /// The object that `(layer, expert)` names; `argument` names the source of the key in
    /// errors.
    pub fn object(&self, layer: i64, expert: i64, argument: &'static str) -> Result<u32> {
        if layer < 0 || layer as u64 >= self.num_layers as u64 {
            return Err(CoreError::invalid(
                argument,
                format!("layers in [0, {})", self.num_layers),
                layer.to_string(),
            ));
        }
        if expert < 0 || expert as u64 >= self.num_experts as u64 {
            return Err(CoreError::invalid(
                argument,
                format!("expert ids in [0, {})", self.num_experts),
                format!("{expert} at layer {layer}"),
            ));
        }
        Ok(self.object_of[layer as usize * self.num_experts + expert as usize])
    }

    /// The target key of an object.
    pub fn key(&self, object: u32) -> Key {
        let i = object as usize;
        ((i / self.num_experts) as i64, (i % self.num_experts) as i64)
    }

    /// The size in bytes of an object.
    pub fn bytes(&self, object: u32) -> u64 {
        self.bytes[object as usize]
    }

    /// What an object counts against the capacity.
    fn cost(&self, object: u32, unit: CapacityUnit) -> u64 {
        match unit {
            CapacityUnit::Experts => 1,
            CapacityUnit::Bytes => self.bytes[object as usize],
        }
    }
}

/// An eviction policy: it is told about every use, load and eviction, and names victims.
///
/// `next_use` is the visit of the object's next request after `now` ([`NEVER`] if it is not
/// requested again or the future is unknown); only [`Belady`] reads it.
pub trait Policy {
    /// `object` was loaded at `now` (a miss).
    fn insert(&mut self, object: u32, now: Clock, next_use: u64);
    /// Resident `object` was used at `now` (a hit).
    fn touch(&mut self, object: u32, now: Clock, next_use: u64);
    /// Resident `object` was evicted.
    fn remove(&mut self, object: u32);
    /// The resident object to evict next among those for which `pinned` is false, or `None`
    /// when every resident object is pinned.
    fn victim(&mut self, now: Clock, pinned: &dyn Fn(u32) -> bool) -> Option<u32>;
}

/// Resident objects in order of last use, oldest first, as a doubly linked list over object
/// ids (O(1) touch and removal). The objects of a visit are touched in ascending id, so the
/// list is sorted by (last use, id).
#[derive(Clone, Debug)]
struct Recency {
    prev: Vec<u32>,
    next: Vec<u32>,
}

impl Recency {
    /// A list over ids `0..n`; index `n` is the sentinel (head and tail).
    fn new(n: usize) -> Self {
        Recency { prev: vec![n as u32; n + 1], next: vec![n as u32; n + 1] }
    }

    fn sentinel(&self) -> u32 {
        (self.next.len() - 1) as u32
    }

    fn unlink(&mut self, o: u32) {
        let (p, n) = (self.prev[o as usize], self.next[o as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
    }

    fn push_back(&mut self, o: u32) {
        let s = self.sentinel();
        let last = self.prev[s as usize];
        self.next[last as usize] = o;
        self.prev[o as usize] = last;
        self.next[o as usize] = s;
        self.prev[s as usize] = o;
    }

    fn oldest_first(&self) -> impl Iterator<Item = u32> + '_ {
        let s = self.sentinel();
        std::iter::successors(Some(self.next[s as usize]), move |&o| Some(self.next[o as usize]))
            .take_while(move |&o| o != s)
    }
}

/// Least recently used; see the module documentation.
#[derive(Clone, Debug)]
pub struct Lru {
    order: Recency,
}

impl Lru {
    pub fn new(num_objects: usize) -> Self {
        Lru { order: Recency::new(num_objects) }
    }
}

impl Policy for Lru {
    fn insert(&mut self, object: u32, _now: Clock, _next_use: u64) {
        self.order.push_back(object);
    }
    fn touch(&mut self, object: u32, _now: Clock, _next_use: u64) {
        self.order.unlink(object);
        self.order.push_back(object);
    }
    fn remove(&mut self, object: u32) {
        self.order.unlink(object);
    }
    fn victim(&mut self, _now: Clock, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
        self.order.oldest_first().find(|&o| !pinned(o))
    }
}

/// Resident objects in a binary max-heap by a key that changes as they are used. Updates
/// push a new entry and leave the old one in place; an entry counts only while its object
/// is resident and the entry holds the object's current key (stale entries are dropped
/// when they surface, and swept out when they outnumber the live ones). This is several
/// times faster than an ordered tree for the replay's mix of many updates and few
/// victim queries.
#[derive(Clone, Debug)]
struct LazyHeap<K: Ord + Copy> {
    heap: std::collections::BinaryHeap<(K, u32)>,
    key: Vec<Option<K>>,
    live: usize,
    /// Entries taken off the heap because visit `parked_visit` pins their objects.
    parked: Vec<(K, u32)>,
    parked_visit: u64,
}

impl<K: Ord + Copy> LazyHeap<K> {
    fn new(num_objects: usize) -> Self {
        LazyHeap {
            heap: std::collections::BinaryHeap::new(),
            key: vec![None; num_objects],
            live: 0,
            parked: Vec::new(),
            parked_visit: 0,
        }
    }

    /// Inserts `o` or changes its key.
    fn set(&mut self, o: u32, key: K) {
        if self.key[o as usize].replace(key).is_none() {
            self.live += 1;
        }
        self.heap.push((key, o));
        if self.heap.len() > 2 * self.live + 64 {
            let key = &self.key;
            self.heap.retain(|&(k, o)| key[o as usize] == Some(k));
        }
    }

    fn remove(&mut self, o: u32) {
        if self.key[o as usize].take().is_some() {
            self.live -= 1;
        }
    }

    fn current(&self, o: u32) -> Option<K> {
        self.key[o as usize]
    }

    /// The live object with the largest key for which `pinned` is false, during visit
    /// `visit`. Stale entries on the way are dropped; the entry found stays (the caller
    /// usually evicts its object next, which makes it stale). Pinned entries are parked
    /// until the visit ends: a visit pins the same objects in all its queries, and its own
    /// loads, often the top entries, would otherwise be popped and pushed back by each one.
    fn top(&mut self, visit: u64, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
        if self.parked_visit != visit {
            self.heap.extend(self.parked.drain(..));
            self.parked_visit = visit;
        }
        loop {
            let &(k, o) = self.heap.peek()?;
            if self.key[o as usize] != Some(k) {
                self.heap.pop();
            } else if pinned(o) {
                self.parked.extend(self.heap.pop());
            } else {
                return Some(o);
            }
        }
    }

    fn live_objects(&self) -> Vec<u32> {
        (0..self.key.len() as u32).filter(|&o| self.key[o as usize].is_some()).collect()
    }
}

/// Least frequently used over the whole history; see the module documentation.
#[derive(Clone, Debug)]
pub struct Lfu {
    /// Uses of every object so far, resident or not.
    count: Vec<u64>,
    /// Resident objects by (uses, last use, id), the victim on top.
    order: LazyHeap<Reverse<(u64, u64, u32)>>,
}

impl Lfu {
    pub fn new(num_objects: usize) -> Self {
        Lfu { count: vec![0; num_objects], order: LazyHeap::new(num_objects) }
    }

    fn record(&mut self, o: u32, now: Clock) {
        self.count[o as usize] += 1;
        self.order.set(o, Reverse((self.count[o as usize], now.visit, o)));
    }
}

impl Policy for Lfu {
    fn insert(&mut self, object: u32, now: Clock, _next_use: u64) {
        self.record(object, now);
    }
    fn touch(&mut self, object: u32, now: Clock, _next_use: u64) {
        self.record(object, now);
    }
    fn remove(&mut self, object: u32) {
        self.order.remove(object);
    }
    fn victim(&mut self, now: Clock, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
        self.order.top(now.visit, pinned)
    }
}

/// Last in, first out; see the module documentation.
#[derive(Clone, Debug)]
pub struct Lifo {
    loaded: Vec<u64>,
    /// Resident objects by (load visit, id), the victim last. Keys change only on loads,
    /// so an ordered tree costs little here, and it skips the pinned objects (the latest
    /// loads, at the victim's end) without moving them.
    order: std::collections::BTreeSet<(u64, u32)>,
}

impl Lifo {
    pub fn new(num_objects: usize) -> Self {
        Lifo { loaded: vec![0; num_objects], order: std::collections::BTreeSet::new() }
    }
}

impl Policy for Lifo {
    fn insert(&mut self, object: u32, now: Clock, _next_use: u64) {
        self.loaded[object as usize] = now.visit;
        self.order.insert((now.visit, object));
    }
    fn touch(&mut self, _object: u32, _now: Clock, _next_use: u64) {}
    fn remove(&mut self, object: u32) {
        self.order.remove(&(self.loaded[object as usize], object));
    }
    fn victim(&mut self, _now: Clock, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
        self.order.iter().rev().map(|&(_, o)| o).find(|&o| !pinned(o))
    }
}

/// Belady's farthest-next-use rule with a lookahead window; see the module documentation.
#[derive(Clone, Debug)]
pub struct Belady {
    /// Visits seen ahead of the current one; `None`: the whole trace.
    window: Option<u64>,
    /// Resident objects by (next use, older last use, smaller id): the top is the victim
    /// when its next use is within the window, or when the window is unbounded.
    by_next: LazyHeap<(u64, Reverse<u64>, Reverse<u32>)>,
    /// Resident objects by (last use, id): the tie order among objects beyond the window.
    recency: Recency,
}

impl Belady {
    /// `window`: how many visits ahead of the current one the policy sees (`None`: all).
    pub fn new(num_objects: usize, window: Option<u64>) -> Self {
        Belady { window, by_next: LazyHeap::new(num_objects), recency: Recency::new(num_objects) }
    }

    fn next_use(&self, o: u32) -> u64 {
        self.by_next.current(o).map_or(NEVER, |(next, _, _)| next)
    }

    fn within_window(&self, next_use: u64, now: Clock) -> bool {
        next_use != NEVER && self.window.is_none_or(|w| next_use <= now.visit.saturating_add(w))
    }
}

impl Policy for Belady {
    fn insert(&mut self, object: u32, now: Clock, next_use: u64) {
        self.by_next.set(object, (next_use, Reverse(now.visit), Reverse(object)));
        self.recency.push_back(object);
    }
    fn touch(&mut self, object: u32, now: Clock, next_use: u64) {
        self.recency.unlink(object);
        self.insert(object, now, next_use);
    }
    fn remove(&mut self, object: u32) {
        self.by_next.remove(object);
        self.recency.unlink(object);
    }
    fn victim(&mut self, now: Clock, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
        let farthest = self.by_next.top(now.visit, pinned)?;
        // Within the window, or with no window at all, the order of `by_next` is the rule.
        // Beyond a finite window every object ties, and the tie order is recency; scanning
        // from the oldest stops at the first object beyond the window (`farthest` is one).
        if self.window.is_none() || self.within_window(self.next_use(farthest), now) {
            return Some(farthest);
        }
        self.recency.oldest_first().find(|&o| !pinned(o) && !self.within_window(self.next_use(o), now))
    }
}

/// The priority policy: (caller score, decayed frequency); see the module documentation.
#[derive(Clone, Debug)]
pub struct Priority {
    decay: f64,
    /// Per object, the score as order-preserving bits.
    score: Vec<u64>,
    /// Per object, the decayed frequency times `decay^-(base step)`: scaling every object by
    /// the same factor keeps their order, so only the object used changes on a use.
    weight: Vec<f64>,
    base: u64,
    /// `decay^-(gain_step - base)`, what a use during step `gain_step` adds.
    gain: f64,
    gain_step: u64,
    /// Resident objects by (score, weight, last use, id), the victim on top.
    order: LazyHeap<Reverse<(u64, u64, u64, u32)>>,
}

/// Weights are rescaled to `base = now` before a use would add more than this.
const PRIORITY_RESCALE: f64 = 1e150;

/// Maps an f64 (not NaN) to u64 bits with the same order (-0.0 and 0.0 equal).
fn ordered_bits(x: f64) -> u64 {
    let bits = (x + 0.0).to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

impl Priority {
    /// `scores`: one per object (0 when `None`), finite; `decay` in (0, 1].
    pub fn new(num_objects: usize, scores: Option<&[f64]>, decay: f64) -> Result<Self> {
        if !(decay > 0.0 && decay <= 1.0) {
            return Err(CoreError::invalid("decay", "0 < decay <= 1", decay.to_string()));
        }
        let score = match scores {
            None => vec![ordered_bits(0.0); num_objects],
            Some(scores) => {
                crate::error::check_len("scores", scores, num_objects)?;
                if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
                    return Err(CoreError::invalid(
                        "scores",
                        "finite values",
                        format!("{} at {i}", scores[i]),
                    ));
                }
                scores.iter().map(|&s| ordered_bits(s)).collect()
            }
        };
        Ok(Priority {
            decay,
            score,
            weight: vec![0.0; num_objects],
            base: 0,
            gain: 1.0,
            gain_step: u64::MAX,
            order: LazyHeap::new(num_objects),
        })
    }

    fn key(&self, o: u32, last: u64) -> Reverse<(u64, u64, u64, u32)> {
        let i = o as usize;
        Reverse((self.score[i], self.weight[i].to_bits(), last, o))
    }

    fn record(&mut self, o: u32, now: Clock) {
        // The gain depends on the step only: compute it once per step.
        if now.step != self.gain_step {
            self.gain_step = now.step;
            self.gain = self.decay.powf(-((now.step - self.base) as f64));
            if self.gain > PRIORITY_RESCALE {
                let factor = self.decay.powf((now.step - self.base) as f64);
                for w in &mut self.weight {
                    *w *= factor;
                }
                self.base = now.step;
                // Every weight changed: re-key the resident objects (their last uses stay).
                for r in self.order.live_objects() {
                    let Some(Reverse((_, _, last, _))) = self.order.current(r) else { continue };
                    self.order.set(r, self.key(r, last));
                }
                self.gain = 1.0;
            }
        }
        self.weight[o as usize] += self.gain;
        self.order.set(o, self.key(o, now.visit));
    }
}

impl Policy for Priority {
    fn insert(&mut self, object: u32, now: Clock, _next_use: u64) {
        self.record(object, now);
    }
    fn touch(&mut self, object: u32, now: Clock, _next_use: u64) {
        self.record(object, now);
    }
    fn remove(&mut self, object: u32) {
        self.order.remove(object);
    }
    fn victim(&mut self, now: Clock, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
        self.order.top(now.visit, pinned)
    }
}

/// The policies by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Lru,
    Lfu,
    Lifo,
    Belady,
    Priority,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] =
        [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Lifo, PolicyKind::Belady, PolicyKind::Priority];
}

impl std::str::FromStr for PolicyKind {
    type Err = CoreError;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "lru" => Ok(PolicyKind::Lru),
            "lfu" => Ok(PolicyKind::Lfu),
            "lifo" => Ok(PolicyKind::Lifo),
            "belady" => Ok(PolicyKind::Belady),
            "priority" => Ok(PolicyKind::Priority),
            other => Err(CoreError::invalid(
                "policy",
                "\"lru\", \"lfu\", \"lifo\", \"belady\" or \"priority\"",
                format!("{other:?}"),
            )),
        }
    }
}

/// The parameters of the policies (each policy reads only its own).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyOptions<'a> {
    /// Belady: steps seen ahead (`None`: the whole trace).
    pub window: Option<u64>,
    /// Priority: a score per key, `num_layers * num_experts` values, layer-major; an alias
    /// key must have its target's score.
    pub scores: Option<&'a [f64]>,
    /// Priority: the weight a use keeps per step, in (0, 1].
    pub decay: f64,
}

impl Default for PolicyOptions<'_> {
    fn default() -> Self {
        PolicyOptions { window: None, scores: None, decay: 0.9 }
    }
}

/// One of the built-in policies, chosen at run time.
#[derive(Clone, Debug)]
pub enum AnyPolicy {
    Lru(Lru),
    Lfu(Lfu),
    Lifo(Lifo),
    Belady(Belady),
    Priority(Priority),
}

impl AnyPolicy {
    pub fn new(kind: PolicyKind, options: &PolicyOptions<'_>, layout: &Layout) -> Result<Self> {
        let n = layout.num_objects();
        Ok(match kind {
            PolicyKind::Lru => AnyPolicy::Lru(Lru::new(n)),
            PolicyKind::Lfu => AnyPolicy::Lfu(Lfu::new(n)),
            PolicyKind::Lifo => AnyPolicy::Lifo(Lifo::new(n)),
            PolicyKind::Belady => {
                let window = options.window.map(|w| w.saturating_mul(layout.num_layers() as u64));
                AnyPolicy::Belady(Belady::new(n, window))
            }
            PolicyKind::Priority => {
                if let Some(scores) = options.scores {
                    crate::error::check_len("scores", scores, n)?;
                    for (key, &object) in layout.object_of.iter().enumerate() {
                        let target = object as usize;
                        // NaN never equals itself; Priority::new reports it more clearly.
                        if scores[key] != scores[target] && !scores[key].is_nan() && !scores[target].is_nan()
                        {
                            return Err(CoreError::invalid(
                                "scores",
                                "an alias key with the score of its target",
                                format!(
                                    "{:?} scored {} -> {:?} scored {}",
                                    layout.key(key as u32),
                                    scores[key],
                                    layout.key(object),
                                    scores[target]
                                ),
                            ));
                        }
                    }
                }
                AnyPolicy::Priority(Priority::new(n, options.scores, options.decay)?)
            }
        })
    }

    fn inner(&mut self) -> &mut dyn Policy {
        match self {
            AnyPolicy::Lru(p) => p,
            AnyPolicy::Lfu(p) => p,
            AnyPolicy::Lifo(p) => p,
            AnyPolicy::Belady(p) => p,
            AnyPolicy::Priority(p) => p,
        }
    }
}

impl Policy for AnyPolicy {
    fn insert(&mut self, object: u32, now: Clock, next_use: u64) {
        self.inner().insert(object, now, next_use)
    }
    fn touch(&mut self, object: u32, now: Clock, next_use: u64) {
        self.inner().touch(object, now, next_use)
    }
    fn remove(&mut self, object: u32) {
        self.inner().remove(object)
    }
    fn victim(&mut self, now: Clock, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
        self.inner().victim(now, pinned)
    }
}

/// The objects loaded and evicted by one visit, in the order it happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events {
    pub loaded: Vec<u32>,
    pub evicted: Vec<u32>,
}

/// A cache of objects under a policy, counting what happens (see the module documentation).
#[derive(Clone, Debug)]
pub struct Cache<P: Policy> {
    policy: P,
    /// Per object: what it counts against the capacity, and its size.
    cost: Vec<u64>,
    bytes: Vec<u64>,
    capacity: u64,
    used: u64,
    resident: Vec<bool>,
    /// Per object: `visit + 1` of the visit that pinned it last (0: never).
    pinned: Vec<u64>,
    last_visit: Option<u64>,
    stats: CacheStats,
}

impl<P: Policy> Cache<P> {
    /// An empty cache of `capacity` units (at least 1).
    pub fn new(layout: &Layout, capacity: u64, unit: CapacityUnit, policy: P) -> Result<Self> {
        if capacity == 0 {
            return Err(CoreError::invalid("capacity", "at least 1", "0"));
        }
        let n = layout.num_objects();
        Ok(Cache {
            policy,
            cost: (0..n as u32).map(|o| layout.cost(o, unit)).collect(),
            bytes: layout.bytes.clone(),
            capacity,
            used: 0,
            resident: vec![false; n],
            pinned: vec![0; n],
            last_visit: None,
            stats: CacheStats::default(),
        })
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Capacity units taken by the resident objects.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn is_resident(&self, object: u32) -> bool {
        self.resident.get(object as usize).copied().unwrap_or(false)
    }

    /// The resident objects, ascending.
    pub fn resident(&self) -> Vec<u32> {
        (0..self.resident.len() as u32).filter(|&o| self.resident[o as usize]).collect()
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The object the policy would evict now if nothing were pinned.
    pub fn victim(&mut self, now: Clock) -> Option<u32> {
        self.policy.victim(now, &|_| false)
    }

    /// What `objects` together count against the capacity.
    pub fn need(&self, objects: &[u32]) -> u64 {
        // Saturating: a sum past 2^64 bytes exceeds any capacity all the same.
        objects.iter().fold(0u64, |sum, &o| sum.saturating_add(self.cost[o as usize]))
    }

    /// Runs one visit needing `objects` (distinct, ascending, below `num_objects`) at
    /// `now` (`now.visit` increasing from call to call: pins and policies tell visits apart
    /// by it); `next_use[i]` is the visit of `objects[i]`'s next request (`None`: unknown).
    /// Records loads and evictions in `events` when given.
    pub fn visit(
        &mut self,
        objects: &[u32],
        next_use: Option<&[u64]>,
        now: Clock,
        mut events: Option<&mut Events>,
    ) -> Result<()> {
        if let Some(w) = objects.windows(2).find(|w| w[0] >= w[1]) {
            return Err(CoreError::invalid("objects", "distinct ids in ascending order", format!("{w:?}")));
        }
        if let Some(&o) = objects.iter().find(|&&o| o as usize >= self.resident.len()) {
            return Err(CoreError::invalid(
                "objects",
                format!("ids below {}", self.resident.len()),
                o.to_string(),
            ));
        }
        if let Some(next) = next_use {
            crate::error::check_len("next_use", next, objects.len())?;
        }
        if self.last_visit.is_some_and(|last| now.visit <= last) {
            return Err(CoreError::invalid(
                "now",
                format!("a visit after visit {}", self.last_visit.unwrap_or(0)),
                now.visit.to_string(),
            ));
        }
        let need = self.need(objects);
        if need > self.capacity {
            return Err(CoreError::invalid(
                "capacity",
                format!("at least {need}, what the experts of one layer need at once"),
                self.capacity.to_string(),
            ));
        }
        self.last_visit = Some(now.visit);
        let stamp = now.visit + 1;
        for &o in objects {
            self.pinned[o as usize] = stamp;
        }
        let mut missed = false;
        for (i, &o) in objects.iter().enumerate() {
            let next = next_use.map_or(NEVER, |n| n[i]);
            if self.resident[o as usize] {
                self.stats.hits += 1;
                self.policy.touch(o, now, next);
                continue;
            }
            missed = true;
            let cost = self.cost[o as usize];
            while self.used + cost > self.capacity {
                let pinned = &self.pinned;
                // The pinned objects need at most `need <= capacity`, so while `o` does not
                // fit some resident object is unpinned.
                let victim = self.policy.victim(now, &|x| pinned[x as usize] == stamp).ok_or_else(|| {
                    CoreError::invalid("capacity", format!("room for {need}"), self.capacity.to_string())
                })?;
                self.evict(victim);
                if let Some(events) = events.as_deref_mut() {
                    events.evicted.push(victim);
                }
            }
            self.resident[o as usize] = true;
            self.used += cost;
            self.stats.misses += 1;
            self.stats.bytes_moved =
                self.stats.bytes_moved.checked_add(self.bytes[o as usize]).ok_or_else(|| {
                    CoreError::invalid("expert_bytes", "sizes whose loads sum below 2^64", "an overflow")
                })?;
            self.policy.insert(o, now, next);
            if let Some(events) = events.as_deref_mut() {
                events.loaded.push(o);
            }
        }
        if missed {
            self.stats.stalls += 1;
        }
        debug_assert!(self.used <= self.capacity);
        Ok(())
    }

    fn evict(&mut self, o: u32) {
        debug_assert!(self.resident[o as usize]);
        self.policy.remove(o);
        self.resident[o as usize] = false;
        self.used -= self.cost[o as usize];
        self.stats.evictions += 1;
    }
}

/// A routing trace resolved to objects: per visit, the distinct objects it needs
/// (ascending), and for each request the visit of the same object's next request.
#[derive(Clone, Debug)]
pub struct Trace {
    num_layers: usize,
    objects: Vec<u32>,
    /// `num_visits + 1` offsets into `objects`.
    offsets: Vec<usize>,
    next_use: Vec<u64>,
}

impl Trace {
    /// `experts[offsets[v]..offsets[v + 1]]` are the experts visit `v = step * L + layer`
    /// used (duplicates count once); `offsets` holds `num_steps * L + 1` values from 0 to
    /// `experts.len()`, and `num_steps >= 1`.
    pub fn new(layout: &Layout, experts: &[i64], offsets: &[i64]) -> Result<Self> {
        let num_layers = layout.num_layers();
        let num_visits = offsets.len().saturating_sub(1);
        if num_visits == 0 || !num_visits.is_multiple_of(num_layers) {
            return Err(CoreError::invalid(
                "offsets",
                format!(
                    "num_steps * {num_layers} + 1 values with num_steps >= 1 (num_layers = {num_layers})"
                ),
                format!("{} values", offsets.len()),
            ));
        }
        if offsets[0] != 0 || offsets[num_visits] as u64 != experts.len() as u64 {
            return Err(CoreError::invalid(
                "offsets",
                format!("values from 0 to {} (the number of expert ids)", experts.len()),
                format!("{} to {}", offsets[0], offsets[num_visits]),
            ));
        }
        if let Some(v) = (0..num_visits).find(|&v| offsets[v] > offsets[v + 1]) {
            return Err(CoreError::invalid(
                "offsets",
                "non-decreasing values",
                format!("{} then {} at visit {v}", offsets[v], offsets[v + 1]),
            ));
        }
        let mut objects = Vec::with_capacity(experts.len());
        let mut bounds = Vec::with_capacity(num_visits + 1);
        bounds.push(0);
        for v in 0..num_visits {
            let start = objects.len();
            let layer = (v % num_layers) as i64;
            for &e in &experts[offsets[v] as usize..offsets[v + 1] as usize] {
                objects.push(layout.object(layer, e, "experts").map_err(|err| match err {
                    CoreError::InvalidArgument { argument, expected, got } => CoreError::InvalidArgument {
                        argument,
                        expected,
                        got: format!("{got}, step {}", v / num_layers),
                    },
                })?);
            }
            objects[start..].sort_unstable();
            let mut kept = start;
            for i in start..objects.len() {
                if i == start || objects[i] != objects[kept - 1] {
                    objects[kept] = objects[i];
                    kept += 1;
                }
            }
            objects.truncate(kept);
            bounds.push(objects.len());
        }
        // Backwards: the visit of each object's next request.
        let mut seen = vec![NEVER; layout.num_objects()];
        let mut next_use = vec![NEVER; objects.len()];
        for v in (0..num_visits).rev() {
            for i in bounds[v]..bounds[v + 1] {
                let o = objects[i] as usize;
                next_use[i] = seen[o];
                seen[o] = v as u64;
            }
        }
        Ok(Trace { num_layers, objects, offsets: bounds, next_use })
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    pub fn num_visits(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn num_steps(&self) -> usize {
        self.num_visits() / self.num_layers
    }

    /// Requests in the whole trace.
    pub fn num_requests(&self) -> usize {
        self.objects.len()
    }

    /// The objects visit `v` needs, and the visit of each one's next request.
    pub fn visit(&self, v: usize) -> (&[u32], &[u64]) {
        let range = self.offsets[v]..self.offsets[v + 1];
        (&self.objects[range.clone()], &self.next_use[range])
    }
}

/// A replay of a trace through a cache, run in chunks of steps (so that a caller can report
/// progress or stop between chunks).
#[derive(Clone, Debug)]
pub struct Replay<'t> {
    trace: &'t Trace,
    cache: Cache<AnyPolicy>,
    visits_done: usize,
}

impl<'t> Replay<'t> {
    /// Refuses a capacity that cannot hold the objects of some visit, naming the first.
    pub fn new(
        trace: &'t Trace,
        layout: &Layout,
        capacity: u64,
        unit: CapacityUnit,
        kind: PolicyKind,
        options: &PolicyOptions<'_>,
    ) -> Result<Self> {
        if layout.num_layers() != trace.num_layers() {
            return Err(CoreError::invalid(
                "num_layers",
                format!("the trace's {} layers", trace.num_layers()),
                layout.num_layers().to_string(),
            ));
        }
        let cache = Cache::new(layout, capacity, unit, AnyPolicy::new(kind, options, layout)?)?;
        for v in 0..trace.num_visits() {
            let need = cache.need(trace.visit(v).0);
            if need > capacity {
                let what = match unit {
                    CapacityUnit::Experts => "experts",
                    CapacityUnit::Bytes => "bytes",
                };
                return Err(CoreError::invalid(
                    "capacity",
                    format!(
                        "at least {need} {what}, what step {} layer {} needs at once",
                        v / trace.num_layers(),
                        v % trace.num_layers()
                    ),
                    capacity.to_string(),
                ));
            }
        }
        Ok(Replay { trace, cache, visits_done: 0 })
    }

    /// Replays the next `steps` steps (fewer at the end); returns the steps done so far.
    pub fn run_steps(&mut self, steps: usize) -> Result<usize> {
        let end = self
            .visits_done
            .saturating_add(steps.saturating_mul(self.trace.num_layers))
            .min(self.trace.num_visits());
        self.run_visits_to(end)?;
        Ok(self.steps_done())
    }

    fn run_visits_to(&mut self, end: usize) -> Result<()> {
        let layers = self.trace.num_layers as u64;
        while self.visits_done < end {
            let v = self.visits_done;
            let (objects, next_use) = self.trace.visit(v);
            let now = Clock { visit: v as u64, step: v as u64 / layers };
            self.cache.visit(objects, Some(next_use), now, None)?;
            self.visits_done += 1;
        }
        Ok(())
    }

    pub fn steps_done(&self) -> usize {
        self.visits_done / self.trace.num_layers
    }

    pub fn is_done(&self) -> bool {
        self.visits_done == self.trace.num_visits()
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    pub fn cache(&self) -> &Cache<AnyPolicy> {
        &self.cache
    }
}

/// Replays the whole trace; see [`Replay`].
pub fn replay(
    trace: &Trace,
    layout: &Layout,
    capacity: u64,
    unit: CapacityUnit,
    kind: PolicyKind,
    options: &PolicyOptions<'_>,
) -> Result<CacheStats> {
    let mut replay = Replay::new(trace, layout, capacity, unit, kind, options)?;
    replay.run_steps(usize::MAX)?;
    Ok(replay.stats())
}

/// What one [`OnlineCache::access`] loaded and evicted, as target keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub loaded: Vec<Key>,
    pub evicted: Vec<Key>,
}

/// A cache driven one layer at a time, for online use. Its clock counts the way a replay
/// does: call `i` of [`OnlineCache::access`] is visit `i` of step `i / num_layers`, so
/// accessing layers `0..L` in order each step reproduces [`replay`]. Belady needs the
/// future and is refused.
#[derive(Clone, Debug)]
pub struct OnlineCache {
    layout: Layout,
    cache: Cache<AnyPolicy>,
    visits: u64,
    events: Events,
}

impl OnlineCache {
    pub fn new(
        layout: Layout,
        capacity: u64,
        unit: CapacityUnit,
        kind: PolicyKind,
        options: &PolicyOptions<'_>,
    ) -> Result<Self> {
        if kind == PolicyKind::Belady {
            return Err(CoreError::invalid(
                "policy",
                "an online policy (\"lru\", \"lfu\", \"lifo\" or \"priority\"); \"belady\" needs the future, replay a trace instead",
                "\"belady\"",
            ));
        }
        let cache = Cache::new(&layout, capacity, unit, AnyPolicy::new(kind, options, &layout)?)?;
        Ok(OnlineCache { layout, cache, visits: 0, events: Events::default() })
    }

    fn now(&self) -> Clock {
        Clock { visit: self.visits, step: self.visits / self.layout.num_layers() as u64 }
    }

    /// Runs layer `layer` needing `experts` (duplicates count once): one visit.
    pub fn access(&mut self, layer: i64, experts: &[i64]) -> Result<Access> {
        let mut objects =
            experts.iter().map(|&e| self.layout.object(layer, e, "experts")).collect::<Result<Vec<u32>>>()?;
        objects.sort_unstable();
        objects.dedup();
        self.events.loaded.clear();
        self.events.evicted.clear();
        let now = self.now();
        self.cache.visit(&objects, None, now, Some(&mut self.events))?;
        self.visits += 1;
        let keys = |objects: &[u32]| -> Vec<Key> { objects.iter().map(|&o| self.layout.key(o)).collect() };
        Ok(Access { loaded: keys(&self.events.loaded), evicted: keys(&self.events.evicted) })
    }

    /// Whether the object of `(layer, expert)` is resident (no effect on the policy).
    pub fn lookup(&self, layer: i64, expert: i64) -> Result<bool> {
        Ok(self.cache.is_resident(self.layout.object(layer, expert, "expert")?))
    }

    /// The key the policy would evict next.
    pub fn evict_candidate(&mut self) -> Option<Key> {
        self.cache.victim(self.now()).map(|o| self.layout.key(o))
    }

    /// The target keys of the resident objects, ascending.
    pub fn resident(&self) -> Vec<Key> {
        self.cache.resident().into_iter().map(|o| self.layout.key(o)).collect()
    }

    pub fn used(&self) -> u64 {
        self.cache.used()
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A trace from per-step lists of per-layer expert ids.
    fn flat(steps: &[Vec<Vec<i64>>]) -> (Vec<i64>, Vec<i64>) {
        let mut experts = Vec::new();
        let mut offsets = vec![0i64];
        for step in steps {
            for layer in step {
                experts.extend_from_slice(layer);
                offsets.push(experts.len() as i64);
            }
        }
        (experts, offsets)
    }

    fn run(
        steps: &[Vec<Vec<i64>>],
        num_experts: usize,
        capacity: u64,
        kind: PolicyKind,
        options: PolicyOptions<'_>,
    ) -> CacheStats {
        let layout = Layout::new(steps[0].len(), num_experts, None, &[]).unwrap();
        let (experts, offsets) = flat(steps);
        let trace = Trace::new(&layout, &experts, &offsets).unwrap();
        replay(&trace, &layout, capacity, CapacityUnit::Experts, kind, &options).unwrap()
    }

    fn one_layer(ids: &[&[i64]]) -> Vec<Vec<Vec<i64>>> {
        ids.iter().map(|s| vec![s.to_vec()]).collect()
    }

    fn stats(hits: u64, misses: u64, stalls: u64, evictions: u64) -> CacheStats {
        CacheStats { hits, misses, bytes_moved: misses, stalls, evictions }
    }

    #[test]
    fn lru_and_belady_on_a_classic_example() {
        let trace = one_layer(&[&[0], &[1], &[2], &[0], &[1]]);
        // LRU: 2 evicts 0, 0 evicts 1, 1 evicts 2.
        assert_eq!(run(&trace, 3, 2, PolicyKind::Lru, PolicyOptions::default()), stats(0, 5, 5, 3));
        // Belady: 2 evicts 1 (its next use comes after 0's); 0 hits; 1 then evicts 0 or 2,
        // neither used again: the tie goes to the least recently used, 2.
        assert_eq!(run(&trace, 3, 2, PolicyKind::Belady, PolicyOptions::default()), stats(1, 4, 4, 2));
    }

    #[test]
    fn the_experts_of_a_layer_are_pinned() {
        // Capacity 2. Visit 2 needs {1, 2}: 1 is the least recently used resident, but the
        // visit needs it, so loading 2 evicts 0.
        let trace = one_layer(&[&[0, 1], &[0], &[1, 2]]);
        let layout = Layout::new(1, 3, None, &[]).unwrap();
        let (experts, offsets) = flat(&trace);
        let trace = Trace::new(&layout, &experts, &offsets).unwrap();
        let mut r =
            Replay::new(&trace, &layout, 2, CapacityUnit::Experts, PolicyKind::Lru, &Default::default())
                .unwrap();
        r.run_steps(3).unwrap();
        assert_eq!(r.cache().resident(), vec![1, 2]);
        assert_eq!(r.stats(), stats(2, 3, 2, 1));
    }

    #[test]
    fn a_layer_that_does_not_fit_is_refused_up_front() {
        let layout = Layout::new(2, 4, None, &[]).unwrap();
        let (experts, offsets) = flat(&[vec![vec![0], vec![1]], vec![vec![0], vec![1, 2, 3]]]);
        let trace = Trace::new(&layout, &experts, &offsets).unwrap();
        let err =
            Replay::new(&trace, &layout, 2, CapacityUnit::Experts, PolicyKind::Lru, &Default::default())
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "capacity: expected at least 3 experts, what step 1 layer 1 needs at once, got 2"
        );
        let err =
            Replay::new(&trace, &layout, 0, CapacityUnit::Experts, PolicyKind::Lru, &Default::default())
                .unwrap_err();
        assert_eq!(err.to_string(), "capacity: expected at least 1, got 0");
    }

    #[test]
    fn lfu_counts_uses_before_evictions_and_breaks_ties_by_recency() {
        // Capacity 2. 0 is used twice, 1 once, then 2 evicts 1 (fewer uses); 1 comes back
        // with its earlier use counted (2 uses) and evicts 2 (1 use); then 3 finds 0 and 1
        // tied at 2 uses, and 0, used less recently, goes.
        let trace = one_layer(&[&[0], &[0], &[1], &[2], &[1], &[3]]);
        let layout = Layout::new(1, 4, None, &[]).unwrap();
        let (experts, offsets) = flat(&trace);
        let trace = Trace::new(&layout, &experts, &offsets).unwrap();
        let mut r =
            Replay::new(&trace, &layout, 2, CapacityUnit::Experts, PolicyKind::Lfu, &Default::default())
                .unwrap();
        r.run_steps(4).unwrap();
        assert_eq!(r.cache().resident(), vec![0, 2]);
        r.run_steps(1).unwrap();
        assert_eq!(r.cache().resident(), vec![0, 1]);
        r.run_steps(1).unwrap();
        assert_eq!(r.cache().resident(), vec![1, 3]);
    }

    #[test]
    fn lifo_evicts_the_latest_load() {
        // Capacity 3: {0, 1} loaded together, then 2; 3 evicts 2, 4 evicts 3; 0 and 1 stay.
        let trace = one_layer(&[&[0, 1], &[2], &[3], &[4], &[0, 1]]);
        assert_eq!(run(&trace, 5, 3, PolicyKind::Lifo, PolicyOptions::default()), stats(2, 5, 4, 2));
        // Loaded in the same visit: the larger id was loaded last and goes first.
        let trace = one_layer(&[&[0, 1], &[2], &[0]]);
        let layout = Layout::new(1, 3, None, &[]).unwrap();
        let (experts, offsets) = flat(&trace);
        let trace = Trace::new(&layout, &experts, &offsets).unwrap();
        let mut r =
            Replay::new(&trace, &layout, 2, CapacityUnit::Experts, PolicyKind::Lifo, &Default::default())
                .unwrap();
        r.run_steps(2).unwrap();
        assert_eq!(r.cache().resident(), vec![0, 2]);
    }

    #[test]
    fn priority_orders_by_score_then_decayed_frequency() {
        let layout = Layout::new(1, 3, None, &[]).unwrap();
        // Scores keep expert 2 over the more frequent expert 0.
        let scores = [0.0, 0.0, 1.0];
        let options = PolicyOptions { scores: Some(&scores), ..Default::default() };
        let mut cache =
            OnlineCache::new(layout.clone(), 2, CapacityUnit::Experts, PolicyKind::Priority, &options)
                .unwrap();
        for ids in [[0], [0], [2]] {
            cache.access(0, &ids).unwrap();
        }
        assert_eq!(cache.access(0, &[1]).unwrap(), Access { loaded: vec![(0, 1)], evicted: vec![(0, 0)] });
        // Without scores, decay 0.5 (one layer: a step per access): 0 used at steps 0 and 1
        // weighs 0.125 + 0.25 at step 3; 1 used at steps 2 and 3 weighs 0.5 + 1. 2 evicts 0.
        let options = PolicyOptions { decay: 0.5, ..Default::default() };
        let mut cache =
            OnlineCache::new(layout, 2, CapacityUnit::Experts, PolicyKind::Priority, &options).unwrap();
        for ids in [[0], [0], [1], [1]] {
            cache.access(0, &ids).unwrap();
        }
        assert_eq!(cache.evict_candidate(), Some((0, 0)));
        cache.access(0, &[2]).unwrap();
        assert_eq!(cache.resident(), vec![(0, 1), (0, 2)]);
        // With decay 1 (plain frequency) three old uses of 0 outweigh two recent uses of 1.
        let mut cache = OnlineCache::new(
            Layout::new(1, 3, None, &[]).unwrap(),
            2,
            CapacityUnit::Experts,
            PolicyKind::Priority,
            &PolicyOptions { decay: 1.0, ..Default::default() },
        )
        .unwrap();
        for ids in [[0], [0], [0], [1], [1]] {
            cache.access(0, &ids).unwrap();
        }
        assert_eq!(cache.evict_candidate(), Some((0, 1)));
    }

    #[test]
    fn priority_rescaling_keeps_the_order() {
        // With decay 0.5 and one expert per step, a use at step s adds 2^s (relative to step
        // 0), more than all uses before s together: the priority order is the LRU order. Over
        // 1200 steps the weights are rescaled twice; the order must survive it.
        let steps: Vec<Vec<Vec<i64>>> =
            (0..1200u64).map(|s| vec![vec![((s * 2654435761) >> 7) as i64 % 5]]).collect();
        let opts = PolicyOptions { decay: 0.5, ..Default::default() };
        let got = run(&steps, 5, 3, PolicyKind::Priority, opts);
        let lru = run(&steps, 5, 3, PolicyKind::Lru, PolicyOptions::default());
        assert_eq!(got, lru);
    }

    #[test]
    fn bytes_capacity_evicts_until_the_load_fits() {
        // Sizes 3, 1, 1, 2 bytes; capacity 4 bytes, LRU. 1 and 2 load (2 bytes); 0 (3 bytes)
        // evicts 1; 3 (2 bytes) evicts 2, then 0 as well; 1 loads into the free room.
        let sizes = [3, 1, 1, 2];
        let layout = Layout::new(1, 4, Some(&sizes), &[]).unwrap();
        let (experts, offsets) = flat(&one_layer(&[&[1, 2], &[0], &[3], &[1]]));
        let trace = Trace::new(&layout, &experts, &offsets).unwrap();
        let got =
            replay(&trace, &layout, 4, CapacityUnit::Bytes, PolicyKind::Lru, &Default::default()).unwrap();
        assert_eq!(
            got,
            CacheStats { hits: 0, misses: 5, bytes_moved: 1 + 1 + 3 + 2 + 1, stalls: 4, evictions: 3 }
        );
        // Counted in experts, the same cache holds 4 of them: only compulsory misses.
        let got =
            replay(&trace, &layout, 4, CapacityUnit::Experts, PolicyKind::Lru, &Default::default()).unwrap();
        assert_eq!(got, CacheStats { hits: 1, misses: 4, bytes_moved: 7, stalls: 3, evictions: 0 });
        let err = Replay::new(&trace, &layout, 2, CapacityUnit::Bytes, PolicyKind::Lru, &Default::default())
            .unwrap_err();
        assert!(
            err.to_string().starts_with("capacity: expected at least 3 bytes, what step 1 layer 0"),
            "{err}"
        );
    }

    #[test]
    fn aliases_share_one_object() {
        // Expert 0 is shared by layers 0 and 1: one load, one unit of capacity.
        let layout = Layout::new(2, 2, None, &[((1, 0), (0, 0))]).unwrap();
        let (experts, offsets) = flat(&[vec![vec![0], vec![0, 1]], vec![vec![0, 1], vec![1]]]);
        let trace = Trace::new(&layout, &experts, &offsets).unwrap();
        let got =
            replay(&trace, &layout, 3, CapacityUnit::Experts, PolicyKind::Lru, &Default::default()).unwrap();
        assert_eq!(got, stats(3, 3, 3, 0));
        let mut online =
            OnlineCache::new(layout, 2, CapacityUnit::Experts, PolicyKind::Lru, &Default::default()).unwrap();
        online.access(1, &[0]).unwrap();
        assert!(online.lookup(0, 0).unwrap());
        assert_eq!(online.resident(), vec![(0, 0)]);
    }

    #[test]
    fn bad_aliases_are_refused() {
        let sizes = [1, 1, 1, 2];
        let cases: [(&[(Key, Key)], &str); 5] = [
            (&[((0, 0), (2, 0))], "aliases: expected keys (layer, expert) in [0, 2) x [0, 2), got (2, 0)"),
            (&[((0, 1), (0, 1))], "aliases: expected a key aliased to another key, got (0, 1) -> itself"),
            (&[((1, 0), (0, 0)), ((1, 0), (0, 1))], "aliases: expected each key aliased at most once, got (1, 0) twice"),
            (
                &[((1, 0), (0, 0)), ((0, 0), (0, 1))],
                "aliases: expected targets that are not aliases themselves, got (1, 0) -> (0, 0), which is an alias",
            ),
            (
                &[((1, 1), (0, 0))],
                "aliases: expected a key and its target of the same size (expert_bytes), got (1, 1) of 2 bytes -> (0, 0) of 1 bytes",
            ),
        ];
        for (aliases, message) in cases {
            let err = Layout::new(2, 2, Some(&sizes), aliases).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn bad_traces_and_options_are_refused() {
        let layout = Layout::new(2, 3, None, &[]).unwrap();
        let msg =
            |experts: &[i64], offsets: &[i64]| Trace::new(&layout, experts, offsets).unwrap_err().to_string();
        assert!(msg(&[], &[0]).starts_with("offsets: expected num_steps * 2 + 1 values"));
        assert!(msg(&[0], &[0, 1]).starts_with("offsets: expected num_steps * 2 + 1 values"));
        assert_eq!(
            msg(&[0], &[0, 1, 2]),
            "offsets: expected values from 0 to 1 (the number of expert ids), got 0 to 2"
        );
        assert_eq!(
            msg(&[0, 1], &[0, 2, 1, 2, 2]),
            "offsets: expected non-decreasing values, got 2 then 1 at visit 1"
        );
        assert_eq!(
            msg(&[0, 3], &[0, 1, 2]),
            "experts: expected expert ids in [0, 3), got 3 at layer 1, step 0"
        );
        assert_eq!(
            msg(&[-1], &[0, 1, 1]),
            "experts: expected expert ids in [0, 3), got -1 at layer 0, step 0"
        );
        assert_eq!(
            "bogus".parse::<PolicyKind>().unwrap_err().to_string(),
            "policy: expected \"lru\", \"lfu\", \"lifo\", \"belady\" or \"priority\", got \"bogus\""
        );
        assert!("pages".parse::<CapacityUnit>().is_err());
        let bad = |options: PolicyOptions<'_>| {
            AnyPolicy::new(PolicyKind::Priority, &options, &layout).unwrap_err().to_string()
        };
        assert_eq!(
            bad(PolicyOptions { decay: 0.0, ..Default::default() }),
            "decay: expected 0 < decay <= 1, got 0"
        );
        assert_eq!(
            bad(PolicyOptions { scores: Some(&[0.0; 5]), ..Default::default() }).split(',').next(),
            Some("scores: expected 6 elements")
        );
        let nan = [0.0, 0.0, 0.0, f64::NAN, 0.0, 0.0];
        assert_eq!(
            bad(PolicyOptions { scores: Some(&nan), ..Default::default() }),
            "scores: expected finite values, got NaN at 3"
        );
        assert!(OnlineCache::new(
            layout.clone(),
            2,
            CapacityUnit::Experts,
            PolicyKind::Belady,
            &Default::default()
        )
        .unwrap_err()
        .to_string()
        .contains("needs the future"));
        assert!(Layout::new(0, 3, None, &[]).is_err());
        assert!(Layout::new(1, 0, None, &[]).is_err());
        assert!(Layout::new(1, 2, Some(&[1, 0]), &[]).is_err());
    }

    #[test]
    fn visits_must_move_forward() {
        let layout = Layout::new(1, 3, None, &[]).unwrap();
        let mut cache = Cache::new(&layout, 2, CapacityUnit::Experts, Lru::new(3)).unwrap();
        cache.visit(&[0], None, Clock { visit: 4, step: 4 }, None).unwrap();
        let err = cache.visit(&[1], None, Clock { visit: 4, step: 4 }, None).unwrap_err();
        assert_eq!(err.to_string(), "now: expected a visit after visit 4, got 4");
        let err = cache.visit(&[2, 1], None, Clock { visit: 5, step: 5 }, None).unwrap_err();
        assert_eq!(err.to_string(), "objects: expected distinct ids in ascending order, got [2, 1]");
        assert_eq!(cache.stats(), CacheStats { hits: 0, misses: 1, bytes_moved: 1, stalls: 1, evictions: 0 });
    }

    // ---- property tests ----

    /// A random trace: (num_layers, num_experts, steps as per-layer expert sets).
    fn trace_case(max_objects: usize) -> impl Strategy<Value = (usize, usize, Vec<Vec<Vec<i64>>>)> {
        (1usize..=3, 1usize..=5)
            .prop_filter("few objects", move |(l, e)| l * e <= max_objects)
            .prop_flat_map(|(layers, experts)| {
                // Each layer's set as a bitmask over the experts.
                let visit = proptest::collection::vec(0u32..(1 << experts), layers);
                (Just(layers), Just(experts), proptest::collection::vec(visit, 1..=8))
            })
            .prop_map(|(layers, experts, masks)| {
                let steps = masks
                    .into_iter()
                    .map(|step| {
                        step.into_iter()
                            .map(|mask| (0..experts as i64).filter(|&e| mask >> e & 1 == 1).collect())
                            .collect()
                    })
                    .collect();
                (layers, experts, steps)
            })
    }

    fn max_need(steps: &[Vec<Vec<i64>>]) -> u64 {
        steps.iter().flatten().map(|s| s.len() as u64).max().unwrap_or(0).max(1)
    }

    /// Fewest misses of any demand-paging schedule under the same model as [`Cache::visit`]:
    /// at each visit, every choice of evictions (among resident objects the visit does not
    /// need) that makes room for its misses.
    fn brute_force_misses(visits: &[u32], capacity: u32) -> u64 {
        fn go(
            v: usize,
            resident: u32,
            visits: &[u32],
            cap: u32,
            memo: &mut HashMap<(usize, u32), u64>,
        ) -> u64 {
            if v == visits.len() {
                return 0;
            }
            if let Some(&m) = memo.get(&(v, resident)) {
                return m;
            }
            let need = visits[v];
            let misses = (need & !resident).count_ones();
            let over = (resident.count_ones() + misses).saturating_sub(cap);
            let evictable = resident & !need;
            let mut best = u64::MAX;
            let mut subset = evictable;
            loop {
                if subset.count_ones() == over {
                    let rest = go(v + 1, (resident & !subset) | need, visits, cap, memo);
                    best = best.min(misses as u64 + rest);
                }
                if subset == 0 {
                    break;
                }
                subset = (subset - 1) & evictable;
            }
            memo.insert((v, resident), best);
            best
        }
        go(0, 0, visits, capacity, &mut HashMap::new())
    }

    /// A straightforward LRU: a list ordered by last use, scanned from the front.
    fn reference_lru(visits: &[Vec<u32>], capacity: usize) -> (u64, u64) {
        let mut order: Vec<u32> = Vec::new();
        let (mut hits, mut misses) = (0, 0);
        for need in visits {
            for &o in need {
                if let Some(i) = order.iter().position(|&x| x == o) {
                    hits += 1;
                    order.remove(i);
                } else {
                    misses += 1;
                    if order.len() == capacity {
                        let i = order.iter().position(|x| !need.contains(x)).unwrap();
                        order.remove(i);
                    }
                }
                order.push(o);
            }
        }
        (hits, misses)
    }

    fn build(layers: usize, experts: usize, steps: &[Vec<Vec<i64>>]) -> (Layout, Trace) {
        let layout = Layout::new(layers, experts, None, &[]).unwrap();
        let (ids, offsets) = flat(steps);
        let trace = Trace::new(&layout, &ids, &offsets).unwrap();
        (layout, trace)
    }

    /// Every policy's rule written as a scan over the resident objects (uniform sizes): the
    /// reference for the heaps and lists of the real policies.
    fn naive_replay(
        trace: &Trace,
        capacity: u64,
        kind: PolicyKind,
        options: &PolicyOptions<'_>,
    ) -> CacheStats {
        let n = trace.objects.iter().map(|&o| o as usize + 1).max().unwrap_or(0);
        let (mut resident, mut count, mut last, mut loaded) =
            (vec![false; n], vec![0u64; n], vec![0u64; n], vec![0u64; n]);
        let (mut weight, mut next) = (vec![0.0f64; n], vec![NEVER; n]);
        let window = options.window.map(|w| w * trace.num_layers() as u64);
        let mut stats = CacheStats::default();
        let mut used = 0;
        for v in 0..trace.num_visits() {
            let (objects, next_uses) = trace.visit(v);
            let step = (v / trace.num_layers()) as u64;
            let mut missed = false;
            for (i, &o) in objects.iter().enumerate() {
                let oi = o as usize;
                if resident[oi] {
                    stats.hits += 1;
                } else {
                    missed = true;
                    stats.misses += 1;
                    stats.bytes_moved += 1;
                    if used == capacity {
                        let candidates =
                            (0..n as u32).filter(|&x| resident[x as usize] && !objects.contains(&x));
                        let xi = |x: u32| x as usize;
                        let victim = match kind {
                            PolicyKind::Lru => candidates.min_by_key(|&x| (last[xi(x)], x)),
                            PolicyKind::Lfu => candidates.min_by_key(|&x| (count[xi(x)], last[xi(x)], x)),
                            PolicyKind::Lifo => candidates.max_by_key(|&x| (loaded[xi(x)], x)),
                            PolicyKind::Priority => {
                                let score = |x: u32| options.scores.map_or(0.0, |s| s[xi(x)]);
                                candidates.min_by(|&a, &b| {
                                    (score(a), weight[xi(a)], last[xi(a)], a)
                                        .partial_cmp(&(score(b), weight[xi(b)], last[xi(b)], b))
                                        .unwrap()
                                })
                            }
                            PolicyKind::Belady => {
                                let within = |x: u32| {
                                    next[xi(x)] != NEVER && window.is_none_or(|w| next[xi(x)] <= v as u64 + w)
                                };
                                let all: Vec<u32> = candidates.collect();
                                let beyond = all
                                    .iter()
                                    .copied()
                                    .filter(|&x| !within(x))
                                    .min_by_key(|&x| (last[xi(x)], x));
                                beyond.or_else(|| {
                                    all.iter()
                                        .copied()
                                        .max_by_key(|&x| (next[xi(x)], Reverse(last[xi(x)]), Reverse(x)))
                                })
                            }
                        }
                        .unwrap();
                        resident[victim as usize] = false;
                        stats.evictions += 1;
                        used -= 1;
                    }
                    resident[oi] = true;
                    used += 1;
                    loaded[oi] = v as u64;
                }
                count[oi] += 1;
                last[oi] = v as u64;
                weight[oi] += options.decay.powf(-(step as f64));
                next[oi] = next_uses[i];
            }
            stats.stalls += missed as u64;
        }
        stats
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn belady_with_full_knowledge_is_optimal((layers, experts, steps) in trace_case(12), extra in 0u64..6) {
            let (layout, trace) = build(layers, experts, &steps);
            let capacity = max_need(&steps) + extra;
            let belady = replay(&trace, &layout, capacity, CapacityUnit::Experts, PolicyKind::Belady, &Default::default()).unwrap();
            let masks: Vec<u32> = (0..trace.num_visits())
                .map(|v| trace.visit(v).0.iter().fold(0, |m, &o| m | 1 << o))
                .collect();
            prop_assert_eq!(belady.misses, brute_force_misses(&masks, capacity as u32));
            // A window covering the whole trace is the same policy.
            let whole = PolicyOptions { window: Some(steps.len() as u64), ..Default::default() };
            prop_assert_eq!(replay(&trace, &layout, capacity, CapacityUnit::Experts, PolicyKind::Belady, &whole).unwrap(), belady);
        }

        #[test]
        fn belady_misses_no_more_than_any_policy((layers, experts, steps) in trace_case(15), extra in 0u64..8, window in 0u64..4) {
            let (layout, trace) = build(layers, experts, &steps);
            let capacity = max_need(&steps) + extra;
            let best = replay(&trace, &layout, capacity, CapacityUnit::Experts, PolicyKind::Belady, &Default::default()).unwrap();
            let scores: Vec<f64> = (0..layers * experts).map(|i| (i * 7 % 5) as f64).collect();
            for kind in PolicyKind::ALL {
                for options in [
                    PolicyOptions { window: Some(window), ..Default::default() },
                    PolicyOptions { scores: Some(&scores), decay: 0.5, ..Default::default() },
                ] {
                    let got = replay(&trace, &layout, capacity, CapacityUnit::Experts, kind, &options).unwrap();
                    prop_assert!(best.misses <= got.misses, "{:?}: {} < {}", kind, got.misses, best.misses);
                    prop_assert_eq!(got.requests() as usize, trace.num_requests());
                    prop_assert_eq!(got.bytes_moved, got.misses);
                    prop_assert!(got.stalls <= got.misses && got.evictions <= got.misses);
                }
            }
        }

        #[test]
        fn capacity_is_never_exceeded((layers, experts, steps) in trace_case(15), extra in 0u64..10, sizes in proptest::collection::vec(1i64..5, 15)) {
            let sizes = &sizes[..layers * experts];
            let layout = Layout::new(layers, experts, Some(sizes), &[]).unwrap();
            let (ids, offsets) = flat(&steps);
            let trace = Trace::new(&layout, &ids, &offsets).unwrap();
            for unit in [CapacityUnit::Experts, CapacityUnit::Bytes] {
                let need = (0..trace.num_visits())
                    .map(|v| trace.visit(v).0.iter().map(|&o| layout.cost(o, unit)).sum::<u64>())
                    .max()
                    .unwrap()
                    .max(1);
                for kind in PolicyKind::ALL {
                    let mut r = Replay::new(&trace, &layout, need + extra, unit, kind, &PolicyOptions { window: Some(1), ..Default::default() }).unwrap();
                    let mut requests = 0;
                    for v in 0..trace.num_visits() {
                        r.run_visits_to(v + 1).unwrap();
                        prop_assert!(r.cache().used() <= need + extra);
                        let resident = r.cache().resident();
                        prop_assert_eq!(r.cache().used(), resident.iter().map(|&o| layout.cost(o, unit)).sum::<u64>());
                        // The objects of the visit just run are all resident.
                        prop_assert!(trace.visit(v).0.iter().all(|&o| r.cache().is_resident(o)));
                        requests += trace.visit(v).0.len();
                    }
                    let s = r.stats();
                    prop_assert_eq!(s.requests() as usize, requests);
                    prop_assert_eq!(s.misses - s.evictions, r.cache().resident().len() as u64);
                }
            }
        }

        #[test]
        fn lru_matches_a_simple_reference((layers, experts, steps) in trace_case(15), extra in 0u64..8) {
            let (layout, trace) = build(layers, experts, &steps);
            let capacity = max_need(&steps) + extra;
            let visits: Vec<Vec<u32>> = (0..trace.num_visits()).map(|v| trace.visit(v).0.to_vec()).collect();
            let got = replay(&trace, &layout, capacity, CapacityUnit::Experts, PolicyKind::Lru, &Default::default()).unwrap();
            prop_assert_eq!((got.hits, got.misses), reference_lru(&visits, capacity as usize));
            // Belady that sees nothing ahead ties everything and falls back to recency.
            let blind = PolicyOptions { window: Some(0), ..Default::default() };
            prop_assert_eq!(replay(&trace, &layout, capacity, CapacityUnit::Experts, PolicyKind::Belady, &blind).unwrap(), got);
        }

        #[test]
        fn online_cache_and_chunked_replay_equal_a_full_replay((layers, experts, steps) in trace_case(15), extra in 0u64..8, chunk in 1usize..4) {
            let (layout, trace) = build(layers, experts, &steps);
            let capacity = max_need(&steps) + extra;
            for kind in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Lifo, PolicyKind::Priority] {
                let full = replay(&trace, &layout, capacity, CapacityUnit::Experts, kind, &Default::default()).unwrap();
                let mut online = OnlineCache::new(layout.clone(), capacity, CapacityUnit::Experts, kind, &Default::default()).unwrap();
                for step in &steps {
                    for (layer, ids) in step.iter().enumerate() {
                        online.access(layer as i64, ids).unwrap();
                    }
                }
                prop_assert_eq!(online.stats(), full);
                let mut chunked = Replay::new(&trace, &layout, capacity, CapacityUnit::Experts, kind, &Default::default()).unwrap();
                while !chunked.is_done() {
                    chunked.run_steps(chunk).unwrap();
                }
                prop_assert_eq!(chunked.stats(), full);
            }
        }

        #[test]
        fn aliases_act_as_renamed_keys((layers, experts, steps) in trace_case(15), extra in 0u64..8, pick in 0usize..100) {
            // Aliasing key (layer, a) to (layer, 0) must count exactly as the trace with a
            // rewritten to 0 at that layer.
            if experts < 2 {
                return Ok(()); // nothing to alias within a layer
            }
            let layer = pick % layers;
            let (a, t) = (1 + (pick / layers % (experts - 1)) as i64, 0i64);
            let aliased = Layout::new(layers, experts, None, &[((layer as i64, a), (layer as i64, t))]).unwrap();
            let (ids, offsets) = flat(&steps);
            let trace = Trace::new(&aliased, &ids, &offsets).unwrap();
            let renamed: Vec<Vec<Vec<i64>>> = steps.iter().map(|step| step.iter().enumerate().map(|(l, set)| {
                set.iter().map(|&e| if l == layer && e == a { t } else { e }).collect()
            }).collect()).collect();
            let (plain, renamed_trace) = build(layers, experts, &renamed);
            let capacity = max_need(&renamed) + extra;
            for kind in PolicyKind::ALL {
                let x = replay(&trace, &aliased, capacity, CapacityUnit::Experts, kind, &Default::default()).unwrap();
                let y = replay(&renamed_trace, &plain, capacity, CapacityUnit::Experts, kind, &Default::default()).unwrap();
                prop_assert_eq!(x, y, "{:?}", kind);
            }
        }
        #[test]
        fn policies_match_their_rules_on_long_traces(
            experts in 1usize..=6,
            steps in proptest::collection::vec(proptest::collection::vec(0u32..64, 2), 1..150),
            extra in 0u64..8,
            window in proptest::option::of(0u64..4),
            scores in proptest::collection::vec(0i32..3, 12),
            decay in prop_oneof![Just(0.5), Just(0.9), Just(1.0)],
        ) {
            // Long traces with high hit rates: many updates per victim query, so the lazy
            // heaps go through their sweeps.
            let steps: Vec<Vec<Vec<i64>>> = steps
                .iter()
                .map(|step| step.iter().map(|&m| (0..experts as i64).filter(|&e| m >> e & 1 == 1).collect()).collect())
                .collect();
            let (layout, trace) = build(2, experts, &steps);
            let capacity = max_need(&steps) + extra;
            let scores: Vec<f64> = scores[..2 * experts].iter().map(|&s| s as f64).collect();
            for kind in PolicyKind::ALL {
                for options in [
                    PolicyOptions { window, decay, ..Default::default() },
                    PolicyOptions { scores: Some(&scores), decay, ..Default::default() },
                ] {
                    let got = replay(&trace, &layout, capacity, CapacityUnit::Experts, kind, &options).unwrap();
                    prop_assert_eq!(got, naive_replay(&trace, capacity, kind, &options), "{:?} {:?}", kind, options);
                }
            }
        }
    }
}
