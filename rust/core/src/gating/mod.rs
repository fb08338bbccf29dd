//! Top-k gating: from router logits to the k experts of each token and their weights.
//!
//! Semantics (one token, logits `l` over `E` experts, all math in the accumulator type):
//! - score: softmax `s_e = exp(l_e - max l) / sum_e' exp(l_e' - max l)` or sigmoid
//!   `s_e = 1 / (1 + exp(-l_e))`.
//! - selection key: `s_e + bias_e` when a bias or group limit is given; otherwise the logit
//!   itself. Both score functions are strictly increasing, so ordering by logits is the exact
//!   order of the scores, free of the false ties that rounding the scores can create.
//! - group limit: experts form `num_groups` equal consecutive groups; a group's score is the
//!   sum of its `score_k` best keys (all of them when the group has fewer), added best first
//!   from zero; only the `topk_groups` best groups compete.
//! - the k best keys in descending order; equal keys: lower expert index first.
//! - weights are the unbiased scores at the chosen experts. Normalised softmax weights are
//!   `exp(l_j - m) / sum_i exp(l_i - m)` over the chosen experts (`m` their largest logit:
//!   the same value as `s_j / sum_i s_i`, one rounding fewer, and never 0/0); normalised
//!   sigmoid weights are `s_j / (sum_i s_i + 1e-20)`. Then multiplied by `scale`.
//! - `exp` is [`Accumulator::fast_exp`] throughout, so that the portable kernels here and
//!   the AVX2 ones in `avx2` (chosen at run time, see [`crate::simd`]) give the same bits.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use crate::element::{Accumulator, Element, Storage};
use crate::error::{check_len, CoreError, Result};
use crate::lanes::{BlockOps, LANES};
use crate::simd::multiversion;
use crate::threads::{for_each_block, for_each_block2, for_each_block2_with};
use num_traits::{Float, One, Zero};
use std::str::FromStr;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFunction {
    Softmax,
    Sigmoid,
}

impl FromStr for ScoreFunction {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "softmax" => Ok(ScoreFunction::Softmax),
            "sigmoid" => Ok(ScoreFunction::Sigmoid),
            other => Err(CoreError::invalid("score", "'softmax' or 'sigmoid'", format!("{other:?}"))),
        }
    }
}

/// Group-limited routing (DeepSeek-V3): only the best `topk_groups` of `num_groups` groups compete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimit {
    pub num_groups: usize,
    pub topk_groups: usize,
    /// How many of a group's best keys sum to its score: 2 for DeepSeek-V3, 1 (the best
    /// key) for DeepSeek-V2's group-limited greedy routing, `k / topk_groups` for
    /// Megatron-Core.
    pub score_k: usize,
}

/// Everything that defines a top-k gating call besides its tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GatingConfig {
    pub num_experts: usize,
    pub k: usize,
    pub score: ScoreFunction,
    pub normalize: bool,
    pub groups: Option<GroupLimit>,
    pub scale: f64,
}

impl GatingConfig {
    pub fn validate(&self) -> Result<()> {
        let e = self.num_experts;
        if e == 0 {
            return Err(CoreError::invalid("logits", "at least one expert (E >= 1)", "E = 0"));
        }
        if self.k == 0 || self.k > e {
            return Err(CoreError::invalid("k", format!("1 <= k <= E = {e}"), format!("k = {}", self.k)));
        }
        if !self.scale.is_finite() {
            return Err(CoreError::invalid("scale", "a finite number", format!("{}", self.scale)));
        }
        if let Some(GroupLimit { num_groups, topk_groups, score_k }) = self.groups {
            if num_groups == 0 || !e.is_multiple_of(num_groups) {
                return Err(CoreError::invalid(
                    "num_groups",
                    format!("a positive divisor of the number of experts E = {e}"),
                    format!("{num_groups}"),
                ));
            }
            if topk_groups == 0 || topk_groups > num_groups {
                return Err(CoreError::invalid(
                    "topk_groups",
                    format!("1 <= topk_groups <= num_groups = {num_groups}"),
                    format!("{topk_groups}"),
                ));
            }
            if score_k == 0 {
                return Err(CoreError::invalid("group_score_k", "at least 1", format!("{score_k}")));
            }
            let reachable = topk_groups * (e / num_groups);
            if self.k > reachable {
                return Err(CoreError::invalid(
                    "k",
                    format!("at most topk_groups * E / num_groups = {reachable} experts"),
                    format!("k = {}", self.k),
                ));
            }
        }
        Ok(())
    }
}

/// Tokens per parallel task: enough work per task to amortise scheduling.
fn tokens_per_task(num_experts: usize) -> usize {
    (16_384 / num_experts.max(1)).max(1)
}

/// Working memory of one block of tokens.
struct Scratch<A: Accumulator> {
    chosen: Vec<usize>,
    lane: SingleLane<A>,
    keys: Vec<A>,
    logits: Vec<A>,
    top: TopK<A>,
    group_top: TopK<A>,
    group_keys: Vec<A>,
    group_allowed: Vec<bool>,
    #[cfg(target_arch = "x86_64")]
    candidates: avx2::Candidates,
    /// 16-bit logits of eight tokens widened to f32 (the AVX2 token-parallel path).
    column: Vec<f32>,
    /// Selection on scores may use the AVX2 kernels (see [`select_on_scores`]).
    simd_keys: bool,
}

impl<A: Accumulator> Scratch<A> {
    /// Working memory for one thread; `avx512` and `simd_keys`: see [`topk_gating_on`].
    fn new(cfg: &GatingConfig, avx512: bool, simd_keys: bool) -> Self {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = avx512;
        let groups = cfg.groups.map_or(0, |g| g.num_groups);
        let group_top =
            cfg.groups.map_or(2, |g| g.topk_groups.max(g.score_k.min(cfg.num_experts / g.num_groups)));
        Scratch {
            chosen: Vec::with_capacity(cfg.k),
            lane: SingleLane { logits: Vec::with_capacity(cfg.k), weights: Vec::with_capacity(cfg.k) },
            keys: Vec::with_capacity(cfg.num_experts),
            logits: Vec::with_capacity(cfg.num_experts),
            top: TopK::new(cfg.k),
            group_top: TopK::new(group_top),
            group_keys: Vec::with_capacity(groups),
            group_allowed: Vec::with_capacity(groups),
            #[cfg(target_arch = "x86_64")]
            candidates: avx2::Candidates::new(cfg.num_experts, cfg.k, avx512),
            column: Vec::new(),
            simd_keys,
        }
    }
}

/// The `k` best (key, index) pairs offered so far, best first: higher key first, equal
/// keys lower index first. Pairs are packed into integers ordered that way (see
/// [`Accumulator::pack`]), so there are no ties and insertion is branch-free min/max.
///
/// Slots start at -inf and keys are finite (inputs are checked), so the first `k` offers
/// always enter and the hot path is one comparison against the current k-th pair.
struct TopK<A: Accumulator> {
    packed: Vec<A::Packed>,
}

impl<A: Accumulator> TopK<A> {
    fn new(k: usize) -> Self {
        let mut top = TopK { packed: Vec::with_capacity(k) };
        top.reset(k);
        top
    }

    /// Empties the selection and sets its size to `k`.
    fn reset(&mut self, k: usize) {
        self.packed.clear();
        // The lowest packed value: -inf with the largest index.
        self.packed.resize(k, A::neg_infinity().pack(u32::MAX as usize));
    }

    /// The k-th key (its value only).
    #[inline(always)]
    fn threshold(&self) -> A {
        A::unpack_key(self.packed[self.packed.len() - 1])
    }

    /// Offers a pair. Branch-free: with the slots sorted descending, slot p becomes
    /// max(slot p, min(slot p-1, new)); a pair below the k-th changes nothing.
    #[inline(always)]
    fn insert(&mut self, key: A, index: usize) {
        let new = key.pack(index);
        let slots = &mut self.packed;
        for p in (1..slots.len()).rev() {
            slots[p] = slots[p].max(slots[p - 1].min(new));
        }
        slots[0] = slots[0].max(new);
    }

    /// Selects among `keys`, considering only indices where `allowed` holds.
    fn select(&mut self, keys: &[A], k: usize, allowed: impl Fn(usize) -> bool) {
        self.reset(k);
        let mut threshold = self.threshold();
        for (index, &key) in keys.iter().enumerate() {
            if key > threshold && allowed(index) {
                self.insert(key, index);
                threshold = self.threshold();
            }
        }
    }

    fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.packed.iter().map(|&p| A::unpack_index(p))
    }

    fn sum(&self) -> A {
        self.packed.iter().fold(A::zero(), |a, &p| a + A::unpack_key(p))
    }
}

#[inline]
fn sigmoid<A: Accumulator>(x: A) -> A {
    A::one() / (A::one() + (-x).fast_exp())
}

/// The error for a row holding NaN or an infinity, naming the first such expert.
fn non_finite_error<L: Element>(row: &[L], token: usize) -> CoreError {
    let expert = row.iter().position(|v| !v.to_acc().is_finite()).unwrap_or(0);
    CoreError::invalid(
        "logits",
        "finite values",
        format!("{:?} at token {token}, expert {expert}", row[expert].to_acc()),
    )
}

/// Loads one token's logits into the accumulator type, refusing NaN and infinities.
fn load_logits<L: Element>(row: &[L], token: usize, out: &mut Vec<L::Acc>) -> Result<()> {
    out.clear();
    out.extend(row.iter().map(|v| v.to_acc()));
    if out.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(non_finite_error(row, token))
    }
}

/// The sum of `values` in eight lanes: value i into lane i % 8, then the lanes in order (the
/// order of [`softmax_row`]'s sum, and of the balance kernels' `lane_sum` over slices). One running sum rounds every addition at the scale of the
/// total, so a large term followed by many small ones drifts by up to n / 2 ulp; here by
/// n / 16. For up to eight values it is the running sum, bit for bit.
fn lane_sum<A: Accumulator>(values: impl IntoIterator<Item = A>) -> A {
    let mut lanes = [A::zero(); LANES];
    for (i, v) in values.into_iter().enumerate() {
        lanes[i % LANES] = lanes[i % LANES] + v;
    }
    lanes.iter().fold(A::zero(), |sum, &lane| sum + lane)
}

/// [`lane_sum`]'s last step for `N` tokens at once: each token's eight lane sums, added in
/// lane order.
fn lanes_total<A: Accumulator, const N: usize>(sums: &[[A; N]; LANES]) -> [A; N] {
    let mut total = [A::zero(); N];
    for lane in sums {
        for i in 0..N {
            total[i] = total[i] + lane[i];
        }
    }
    total
}

fn max_of<A: Accumulator>(values: impl Iterator<Item = A>) -> A {
    values.fold(A::neg_infinity(), |m, v| if v > m { v } else { m })
}

/// `out = softmax(row)`: the max, `fast_exp(l - max)`, their sum in eight lanes (element i
/// into lane i % 8, then the lanes in order) and one division per element. Written in
/// blocks of eight so that it vectorises; returns false if the row holds NaN or an
/// infinity (`out` is then meaningless).
#[inline(always)]
fn softmax_row<L: Element>(row: &[L], out: &mut [L::Acc]) -> bool {
    type A<L> = <L as Element>::Acc;
    let whole = row.len() / LANES * LANES;
    let (blocks, tail) = row.split_at(whole);
    let mut maxima = [A::<L>::neg_infinity(); LANES];
    let mut finite = [true; LANES];
    for block in blocks.chunks_exact(LANES) {
        for l in 0..LANES {
            let v = block[l].to_acc();
            finite[l] &= v.is_finite();
            maxima[l] = if v > maxima[l] { v } else { maxima[l] };
        }
    }
    for (l, v) in tail.iter().enumerate() {
        let v = v.to_acc();
        finite[l] &= v.is_finite();
        maxima[l] = if v > maxima[l] { v } else { maxima[l] };
    }
    if !finite.iter().all(|&f| f) {
        return false;
    }
    let m = maxima.iter().copied().fold(A::<L>::neg_infinity(), |m, v| if v > m { v } else { m });
    let mut sums = [A::<L>::zero(); LANES];
    for (o, block) in out.chunks_exact_mut(LANES).zip(blocks.chunks_exact(LANES)) {
        for l in 0..LANES {
            o[l] = (block[l].to_acc() - m).fast_exp();
            sums[l] = sums[l] + o[l];
        }
    }
    for (l, (o, v)) in out[whole..].iter_mut().zip(tail).enumerate() {
        *o = (v.to_acc() - m).fast_exp();
        sums[l] = sums[l] + *o;
    }
    let z = sums.iter().copied().fold(A::<L>::zero(), |a, b| a + b);
    for o in out.iter_mut() {
        *o = *o / z;
    }
    true
}

/// [`softmax_row`] with the AVX2 kernel when `avx2` (the caller checked
/// [`crate::simd::avx2_enabled`]) and the types allow, its AVX-512 form (sixteen
/// exponentials at a time) where the CPU has that too and the row holds sixteen values: the
/// same bits every way.
fn softmax_row_on<L: Element>(row: &[L], out: &mut [L::Acc], avx2: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        if let (Some(rows), Some(out)) = (L::storage(row), L::Acc::as_f32_mut(&mut *out)) {
            if out.len() >= 16 && crate::simd::avx512_enabled() {
                // SAFETY: AVX-512 and the rest are available (checked); the row is all of `rows`.
                return unsafe { crate::simd::avx512::softmax_row(rows, 0, out) };
            }
            // SAFETY: AVX2 and the rest are available (caller); the row is all of `rows`.
            return unsafe { crate::simd::avx2::softmax_row(rows, 0, out) };
        }
    }
    let _ = avx2;
    softmax_row(row, out)
}

/// [`softmax_row`] of each row of `width` values; returns the first row that is not finite.
fn softmax_rows<L: Element>(rows: &[L], width: usize, out: &mut [L::Acc], avx2: bool) -> Option<usize> {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx2 && width > 0 && crate::simd::avx512_enabled() {
        use crate::simd::avx512::{self, ROWS};
        if let (Some(storage), Some(out)) = (L::storage(rows), L::Acc::as_f32_mut(&mut *out)) {
            // Whole groups of eight rows together (the same bits as one at a time).
            for (g, group) in out.chunks_exact_mut(ROWS * width).enumerate() {
                // SAFETY: AVX-512 and the rest are available (checked); the group's rows lie
                // inside `rows` and `group` holds them.
                let not_finite = unsafe { avx512::softmax_rows(storage, g * ROWS * width, group) };
                if not_finite != 0 {
                    return Some(g * ROWS + not_finite.trailing_zeros() as usize);
                }
                done += ROWS;
            }
        }
    }
    rows.chunks_exact(width)
        .zip(out.chunks_exact_mut(width))
        .skip(done)
        .position(|(row, out)| !softmax_row_on(row, out, avx2))
        .map(|i| done + i)
}

/// [`softmax_rows`] of rows `first_token ..`, with the error naming the first row that is
/// not finite.
fn checked_softmax_rows<L: Element>(
    rows: &[L],
    width: usize,
    out: &mut [L::Acc],
    avx2: bool,
    first_token: usize,
) -> Result<()> {
    match softmax_rows(rows, width, out, avx2) {
        Some(r) => Err(non_finite_error(&rows[r * width..(r + 1) * width], first_token + r)),
        None => Ok(()),
    }
}

/// The weights of the chosen experts (see module docs) of `N` tokens at once, lane `i`
/// holding token `i`: `chosen[p][i]` is the logit of token i's p-th choice and `column(e)`
/// the logits of expert `e` (only unnormalised softmax reads them, for its normaliser).
/// The per-token path calls this with one lane, so every token gets the same arithmetic,
/// whichever path and batch it is routed in.
fn lane_weights<A: Accumulator, const N: usize>(
    chosen: &[[A; N]],
    num_experts: usize,
    column: impl Fn(usize) -> [A; N],
    cfg: &GatingConfig,
    out: &mut [[A; N]],
) {
    let scale = A::from_f64(cfg.scale);
    let max_into = |m: &mut [A; N], v: &[A; N]| {
        for (m, &v) in m.iter_mut().zip(v) {
            *m = if v > *m { v } else { *m };
        }
    };
    match (cfg.score, cfg.normalize) {
        (ScoreFunction::Softmax, true) => {
            let mut m = [A::neg_infinity(); N];
            for c in chosen {
                max_into(&mut m, c);
            }
            let mut sums = [[A::zero(); N]; LANES];
            for (j, (o, c)) in out.iter_mut().zip(chosen).enumerate() {
                for i in 0..N {
                    o[i] = (c[i] - m[i]).fast_exp();
                    sums[j % LANES][i] = sums[j % LANES][i] + o[i];
                }
            }
            let total = lanes_total(&sums);
            for o in out.iter_mut() {
                for i in 0..N {
                    o[i] = o[i] / total[i] * scale;
                }
            }
        }
        (ScoreFunction::Softmax, false) => {
            let mut m = [A::neg_infinity(); N];
            for e in 0..num_experts {
                max_into(&mut m, &column(e));
            }
            // The normaliser of `softmax_row`: expert e into lane e % 8, then the lanes in
            // order, so that the weights are the scores the keys and the backward use, and
            // its rounding error grows with E / 8, not with E (one running sum drifted 1e-5
            // from the exact value at E = 256).
            let mut sums = [[A::zero(); N]; LANES];
            for e in 0..num_experts {
                let l = column(e);
                let lane = &mut sums[e % LANES];
                for i in 0..N {
                    lane[i] = lane[i] + (l[i] - m[i]).fast_exp();
                }
            }
            let z = lanes_total(&sums);
            for (o, c) in out.iter_mut().zip(chosen) {
                for i in 0..N {
                    o[i] = (c[i] - m[i]).fast_exp() / z[i] * scale;
                }
            }
        }
        (ScoreFunction::Sigmoid, normalize) => {
            let mut sums = [[A::zero(); N]; LANES];
            for (j, (o, c)) in out.iter_mut().zip(chosen).enumerate() {
                for i in 0..N {
                    o[i] = sigmoid(c[i]);
                    sums[j % LANES][i] = sums[j % LANES][i] + o[i];
                }
            }
            let total = lanes_total(&sums);
            for o in out.iter_mut() {
                for i in 0..N {
                    if normalize {
                        o[i] = o[i] / (total[i] + A::SIGMOID_NORM_EPS);
                    }
                    o[i] = o[i] * scale;
                }
            }
        }
    }
}

/// Working memory of [`chosen_weights`]: one token as a single lane.
struct SingleLane<A> {
    logits: Vec<[A; 1]>,
    weights: Vec<[A; 1]>,
}

/// The weights of one token's chosen experts (one lane of [`lane_weights`]).
fn chosen_weights<L: Element>(
    row: &[L],
    chosen: &[usize],
    cfg: &GatingConfig,
    lane: &mut SingleLane<L::Acc>,
    out: &mut [L::Acc],
) {
    let SingleLane { logits, weights } = lane;
    logits.clear();
    logits.extend(chosen.iter().map(|&e| [row[e].to_acc()]));
    weights.clear();
    weights.resize(chosen.len(), [L::Acc::zero()]);
    lane_weights(logits, row.len(), |e| [row[e].to_acc()], cfg, weights);
    for (o, w) in out.iter_mut().zip(weights.iter()) {
        *o = w[0];
    }
}

/// The k-th largest of finite `values` (k <= 16): values only, no indices, so a plain
/// branch-free min/max insertion network.
fn kth_largest<A: Accumulator>(values: impl Iterator<Item = A>, k: usize) -> A {
    let mut top = [A::neg_infinity(); 16];
    for v in values {
        let mut carry = v;
        for slot in top[..k].iter_mut() {
            let (hi, lo) = if carry > *slot { (carry, *slot) } else { (*slot, carry) };
            *slot = hi;
            carry = lo;
        }
    }
    top[k - 1]
}

/// Up to this many (key x slot) steps, [`select_on_logits`] offers every key unconditionally.
const BRANCH_FREE_SELECTION_MAX_WORK: usize = 96;

/// Selection on the logits themselves (no bias, no group limit), converting on the fly and
/// folding the finiteness check into the same pass. Returns false if the row holds NaN or
/// an infinity.
///
/// Most keys lose to the current k-th key, and every insertion costs a mispredicted branch,
/// so the kernel first bounds the k-th key from below: the row, read in blocks of eight,
/// splits into sixteen disjoint groups (lane, block parity) whose maxima are sixteen
/// distinct elements, so for k <= 16 the k-th largest of them is at most the k-th largest
/// key of the row. The second pass offers only keys at or above that bound, testing each
/// block of eight with SIMD compares (see `lanes`) before looking at single keys. Rows with
/// few experts skip all this and offer every key to the branch-free insertion.
fn select_on_logits<L: Element>(row: &[L], k: usize, top: &mut TopK<L::Acc>) -> bool {
    type A<L> = <L as Element>::Acc;
    top.reset(k);
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let load = |block: &[L]| -> [A<L>; LANES] { std::array::from_fn(|lane| block[lane].to_acc()) };

    if row.len() * (k + 1) <= BRANCH_FREE_SELECTION_MAX_WORK {
        // Few experts: offering every key costs less than the branches that would skip some.
        let mut finite = true;
        for (index, v) in row.iter().enumerate() {
            let key = v.to_acc();
            finite &= key.is_finite();
            top.insert(key, index);
        }
        return finite;
    }

    let mut finite = true;
    let mut bound = A::<L>::neg_infinity();
    if k <= 2 * LANES && row.len() >= 4 * LANES {
        // Sixteen disjoint groups (lane x block parity), so sixteen distinct maxima.
        let mut lane_max = [[A::<L>::neg_infinity(); LANES]; 2];
        for (b, block) in blocks.clone().enumerate() {
            let keys = load(block);
            finite &= A::<L>::all_finite(&keys);
            A::<L>::lane_max(&mut lane_max[b % 2], &keys);
        }
        if !finite {
            return false;
        }
        bound = kth_largest(lane_max.iter().flatten().copied(), k);
    }
    // The first pass, when it ran, has checked every block already.
    let checked = bound > A::<L>::neg_infinity();

    let mut threshold = top.threshold();
    for (b, block) in blocks.enumerate() {
        let keys = load(block);
        if !checked {
            finite &= A::<L>::all_finite(&keys);
        }
        let mut candidates = A::<L>::candidates(&keys, bound, threshold);
        while candidates != 0 {
            let lane = candidates.trailing_zeros() as usize;
            candidates &= candidates - 1;
            top.insert(keys[lane], b * LANES + lane);
        }
        threshold = top.threshold();
    }
    let base = row.len() - tail.len();
    for (i, v) in tail.iter().enumerate() {
        let key = v.to_acc();
        finite &= key.is_finite();
        if key > threshold {
            top.insert(key, base + i);
            threshold = top.threshold();
        }
    }
    finite
}

/// Selection on `score + bias`, optionally group-limited: needs every expert's score.
/// Writes the chosen experts, best first, to `scratch.chosen`.
///
/// With `scratch.simd_keys` (AVX2, float32 keys, and no bias so negative that a key could
/// equal `f32::MIN`), sigmoid keys are computed eight at a time, the experts of excluded
/// groups get the key `f32::MIN` (below every other key, so never among the k best while k
/// experts remain), and the k best are chosen by the AVX2 selection of
/// [`select_on_logits`]'s kernel: the same experts in the same order as the portable path.
fn select_on_scores<L: Element>(
    row: &[L],
    token: usize,
    bias: Option<&[L::Acc]>,
    cfg: &GatingConfig,
    scratch: &mut Scratch<L::Acc>,
) -> Result<()> {
    let Scratch { keys, logits, top, group_top, group_keys, group_allowed, chosen, .. } = scratch;
    load_logits(row, token, logits)?;
    keys.clear();
    keys.resize(row.len(), L::Acc::zero());
    match cfg.score {
        ScoreFunction::Softmax => {
            softmax_row_on(row, keys, crate::simd::avx2_enabled());
            if let Some(bias) = bias {
                for (key, &b) in keys.iter_mut().zip(bias) {
                    *key = *key + b;
                }
            }
        }
        ScoreFunction::Sigmoid => sigmoid_keys_on(logits, bias, keys, scratch.simd_keys),
    }
    let group_size = cfg.groups.map_or(cfg.num_experts, |g| cfg.num_experts / g.num_groups);
    if let Some(GroupLimit { num_groups, topk_groups, score_k }) = cfg.groups {
        group_keys.clear();
        group_keys.resize(num_groups, L::Acc::zero());
        let mut scored = false;
        #[cfg(target_arch = "x86_64")]
        if scratch.simd_keys && group_size.is_multiple_of(LANES) && score_k <= 2 {
            if let (Some(keys), Some(out)) = (L::Acc::as_f32(keys), L::Acc::as_f32_mut(group_keys)) {
                // SAFETY: `simd_keys` implies AVX2 (see `topk_gating_on`); groups are whole
                // blocks of eight and `out` holds one score per group.
                unsafe { avx2::group_scores(keys, group_size, score_k == 2, out) };
                scored = true;
            }
        }
        if !scored {
            for (group, out) in keys.chunks_exact(group_size).zip(group_keys.iter_mut()) {
                *out = group_score(group, score_k, group_top);
            }
        }
        group_top.select(group_keys, topk_groups, |_| true);
        group_allowed.clear();
        group_allowed.resize(num_groups, false);
        for g in group_top.indices() {
            group_allowed[g] = true;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if scratch.simd_keys && cfg.num_experts >= 4 * LANES && cfg.k <= 2 * LANES {
        if let Some(keys) = L::Acc::as_f32_mut(keys) {
            if cfg.groups.is_some() {
                for (group, &allowed) in keys.chunks_exact_mut(group_size).zip(group_allowed.iter()) {
                    if !allowed {
                        group.fill(f32::MIN);
                    }
                }
            }
            let mut ids = [0u32; 16];
            // SAFETY: `simd_keys` implies the CPU features (see `topk_gating_on`); the keys
            // are one row of E >= 32 values, k <= 16, and `candidates` was made for E.
            let finite = unsafe {
                avx2::select_on_logits(
                    Storage::F32(keys),
                    0,
                    cfg.num_experts,
                    cfg.k,
                    &mut scratch.candidates,
                    &mut ids,
                )
            };
            if finite {
                chosen.clear();
                chosen.extend(ids[..cfg.k].iter().map(|&i| i as usize));
                return Ok(());
            }
        }
    }
    if cfg.groups.is_some() {
        top.select(keys, cfg.k, |e| group_allowed[e / group_size]);
    } else {
        top.select(keys, cfg.k, |_| true);
    }
    chosen.clear();
    chosen.extend(top.indices());
    Ok(())
}

/// `keys[e] = sigmoid(logits[e])`, plus `bias[e]` when given; eight at a time with `simd`
/// (the same bits).
fn sigmoid_keys_on<A: Accumulator>(logits: &[A], bias: Option<&[A]>, keys: &mut [A], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        let bias32 = match bias {
            None => Some(None),
            Some(bias) => A::as_f32(bias).map(Some),
        };
        if let (Some(logits), Some(bias), Some(keys)) = (A::as_f32(logits), bias32, A::as_f32_mut(&mut *keys))
        {
            // SAFETY: `simd` implies AVX2 (see `topk_gating_on`); the three slices hold E values.
            unsafe { avx2::sigmoid_keys(logits, bias, keys) };
            return;
        }
    }
    let _ = simd;
    for (e, (key, &l)) in keys.iter_mut().zip(logits).enumerate() {
        let score = sigmoid(l);
        *key = bias.map_or(score, |bias| score + bias[e]);
    }
}

/// A group's score: the sum of its `score_k` best keys (all of them when it has fewer),
/// added best first from zero. One pass for one or two keys, [`TopK`] above.
fn group_score<A: Accumulator>(group: &[A], score_k: usize, top: &mut TopK<A>) -> A {
    if score_k <= 2 {
        let (mut best, mut second) = (A::neg_infinity(), A::neg_infinity());
        for &key in group {
            if key > best {
                second = best;
                best = key;
            } else if key > second {
                second = key;
            }
        }
        let sum = A::zero() + best;
        return if score_k == 2 && group.len() >= 2 { sum + second } else { sum };
    }
    top.select(group, group.len().min(score_k), |_| true);
    top.sum()
}

/// The AVX2 kernels' view of the logits, when those kernels may run on them.
fn simd_rows<L: Element>(logits: &[L]) -> Option<Storage<'_>> {
    #[cfg(target_arch = "x86_64")]
    return avx2::rows(L::storage(logits));
    #[cfg(not(target_arch = "x86_64"))]
    return None;
}

/// Routes one token: `row` is its logits, `simd` (when given) all tokens' logits as the
/// AVX2 kernels read them.
#[allow(clippy::too_many_arguments)]
fn route_token<L: Element>(
    row: &[L],
    token: usize,
    simd: Option<Storage<'_>>,
    bias: Option<&[L::Acc]>,
    cfg: &GatingConfig,
    scratch: &mut Scratch<L::Acc>,
    weights: &mut [L::Acc],
    experts: &mut [i64],
) -> Result<()> {
    let on_logits = bias.is_none() && cfg.groups.is_none();
    let e = row.len();
    match simd {
        #[cfg(target_arch = "x86_64")]
        Some(rows) if on_logits && e >= 4 * LANES && cfg.k <= 2 * LANES => {
            // SAFETY: the row lies inside `rows` (token * e .. token * e + e), e >= 32, k <= 16,
            // and `avx2::rows` checked the CPU features; `candidates` was made for e experts.
            let mut chosen = [0u32; 16];
            let finite = unsafe {
                avx2::select_on_logits(rows, token * e, e, cfg.k, &mut scratch.candidates, &mut chosen)
            };
            if !finite {
                return Err(non_finite_error(row, token));
            }
            scratch.chosen.clear();
            scratch.chosen.extend(chosen[..cfg.k].iter().map(|&i| i as usize));
        }
        _ => {
            if on_logits {
                if !select_on_logits(row, cfg.k, &mut scratch.top) {
                    return Err(non_finite_error(row, token));
                }
                scratch.chosen.clear();
                scratch.chosen.extend(scratch.top.indices());
            } else {
                select_on_scores(row, token, bias, cfg, scratch)?;
            }
        }
    }
    let chosen = &scratch.chosen;
    for (slot, &e) in experts.iter_mut().zip(chosen.iter()) {
        *slot = e as i64;
    }
    chosen_weights(row, chosen, cfg, &mut scratch.lane, weights);
    Ok(())
}

/// Top-k gating forward over `num_tokens` rows of `logits` ([T, E] row-major).
///
/// Writes `weights` `[T, k]` and `experts` `[T, k]`. `bias` `[E]` shifts selection only.
pub fn topk_gating<L: Element>(
    logits: &[L],
    num_tokens: usize,
    bias: Option<&[L::Acc]>,
    cfg: &GatingConfig,
    weights: &mut [L::Acc],
    experts: &mut [i64],
) -> Result<()> {
    let avx512 = crate::simd::avx512_enabled();
    topk_gating_on(logits, simd_rows(logits), avx512, num_tokens, bias, cfg, weights, experts)
}

/// [`topk_gating`] with the SIMD kernels' view of the logits given (`None`: portable
/// kernels only) and whether selection may use AVX-512 (only with a view, and only where
/// [`crate::simd::avx512_enabled`]), so that tests can run every path in one process.
#[allow(clippy::too_many_arguments)]
fn topk_gating_on<L: Element>(
    logits: &[L],
    simd: Option<Storage<'_>>,
    avx512: bool,
    num_tokens: usize,
    bias: Option<&[L::Acc]>,
    cfg: &GatingConfig,
    weights: &mut [L::Acc],
    experts: &mut [i64],
) -> Result<()> {
    cfg.validate()?;
    let (e, k) = (cfg.num_experts, cfg.k);
    check_len("logits", logits, num_tokens * e)?;
    check_len("weights", weights, num_tokens * k)?;
    check_len("experts", experts, num_tokens * k)?;
    if let Some(bias) = bias {
        check_len("expert_bias", bias, e)?;
        if let Some(i) = bias.iter().position(|b| !b.is_finite()) {
            return Err(CoreError::invalid(
                "expert_bias",
                "finite values",
                format!("{:?} at expert {i}", bias[i]),
            ));
        }
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let block = tokens_per_task(e).next_multiple_of(TOKEN_LANES);
    let avx512 = avx512 && simd.is_some() && avx512_selects(e);
    let lanes = lane_kernel(cfg, simd.is_some(), avx512, bias.is_none());
    // Selection on scores by the AVX2 kernels: float32 keys, and (with groups, whose excluded
    // experts get the key f32::MIN) no bias that could make a key equal f32::MIN.
    let floor = <L::Acc as Float>::min_value() / (L::Acc::one() + L::Acc::one());
    let simd_keys =
        simd.is_some() && (cfg.groups.is_none() || bias.is_none_or(|b| b.iter().all(|&v| v > floor)));
    let init = || {
        let mut scratch = Scratch::new(cfg, avx512, simd_keys);
        if simd.is_some() && lanes != LaneKernel::None {
            scratch.column.resize(TOKEN_LANES * e, 0.0);
        }
        (scratch, LaneTopK::new(k))
    };
    for_each_block2_with((weights, k), (experts, k), block, init, |state, first, weights, experts| {
        let (scratch, lane_top) = state;
        let mut done = 0;
        if lanes != LaneKernel::None {
            let groups =
                weights.chunks_exact_mut(TOKEN_LANES * k).zip(experts.chunks_exact_mut(TOKEN_LANES * k));
            for (g, (w, ids)) in groups.enumerate() {
                let first_token = first + g * TOKEN_LANES;
                let rows = &logits[first_token * e..(first_token + TOKEN_LANES) * e];
                let bad = 'kernel: {
                    #[cfg(target_arch = "x86_64")]
                    if let (Some(storage), Some(w)) = (simd, L::Acc::as_f32_mut(&mut *w)) {
                        // SAFETY: `avx2::rows` checked the CPU features; the group's eight
                        // rows exist, and `lane_kernel` checked k and E for the kernel.
                        break 'kernel unsafe {
                            if lanes == LaneKernel::Insertion {
                                avx2::route_lanes(storage, first_token, cfg, &mut scratch.column, w, ids)
                            } else {
                                let (candidates, column) = (&mut scratch.candidates, &mut scratch.column);
                                avx2::route_rows(storage, first_token, cfg, candidates, column, w, ids)
                            }
                        };
                    }
                    route_lanes(rows, first_token, cfg, lane_top, w, ids)?;
                    0
                };
                if bad != 0 {
                    let lane = bad.trailing_zeros() as usize;
                    return Err(non_finite_error(&rows[lane * e..(lane + 1) * e], first_token + lane));
                }
                done += TOKEN_LANES;
            }
        }
        let rest = weights[done * k..].chunks_mut(k).zip(experts[done * k..].chunks_mut(k));
        for (i, (w, ids)) in rest.enumerate() {
            let token = first + done + i;
            let row = &logits[token * e..(token + 1) * e];
            route_token(row, token, simd, bias, cfg, scratch, w, ids)?;
        }
        Ok(())
    })
}

/// Tokens routed together by [`route_lanes`], one per SIMD lane.
const TOKEN_LANES: usize = 8;
/// Up to this E * k, few-expert routing runs token-parallel ([`route_lanes`]).
const TOKEN_PARALLEL_MAX_WORK: usize = 32;
/// The same limits for the AVX2 token-parallel kernel, whose insertion is cheaper.
const SIMD_TOKEN_PARALLEL_MAX_WORK: usize = 256;
/// The AVX2 kernels that route groups of eight tokens keep up to this many slots per lane.
const SIMD_LANE_MAX_K: usize = 8;

/// How whole groups of [`TOKEN_LANES`] tokens are routed (the rest go token by token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LaneKernel {
    /// Token by token ([`route_token`]).
    None,
    /// Every expert offered to every lane's slots ([`route_lanes`]): few experts.
    Insertion,
    /// The AVX2 per-token filter for each token, then the weights of all eight at once.
    Filter,
}

/// Whether AVX-512 candidate collection beats the AVX2 kernels for E experts (measured on
/// an Emerald Rapids Xeon core): it saves per-expert work, but ranking costs about the same
/// per row, so it wins from 128 experts on (by 1.4x at 256 experts and k = 2, 1.4x at 512)
/// and loses a little below.
fn avx512_selects(num_experts: usize) -> bool {
    num_experts >= AVX512_SELECT_MIN_EXPERTS
}

/// See [`avx512_selects`].
const AVX512_SELECT_MIN_EXPERTS: usize = 128;

/// How [`topk_gating_on`] routes whole groups of tokens. `simd`: the AVX2 kernels may run;
/// `avx512`: AVX-512 selection will run (the CPU has it and [`avx512_selects`] these E).
fn lane_kernel(cfg: &GatingConfig, simd: bool, avx512: bool, unbiased: bool) -> LaneKernel {
    let (e, k) = (cfg.num_experts, cfg.k);
    if !unbiased || cfg.groups.is_some() {
        LaneKernel::None
    } else if !simd {
        if e * k <= TOKEN_PARALLEL_MAX_WORK {
            LaneKernel::Insertion
        } else {
            LaneKernel::None
        }
    } else if k > SIMD_LANE_MAX_K {
        LaneKernel::None
    } else if avx512 {
        LaneKernel::Filter
    } else if e * k <= SIMD_TOKEN_PARALLEL_MAX_WORK {
        LaneKernel::Insertion
    } else if e >= 4 * LANES {
        LaneKernel::Filter
    } else {
        LaneKernel::None
    }
}

/// The k best (key, expert) pairs of each of [`TOKEN_LANES`] tokens: slot p of lane i is
/// the p-th best of token i.
struct LaneTopK<A> {
    keys: Vec<[A; TOKEN_LANES]>,
    index: Vec<[u32; TOKEN_LANES]>,
    weights: Vec<[A; TOKEN_LANES]>,
}

impl<A: Accumulator> LaneTopK<A> {
    fn new(k: usize) -> Self {
        LaneTopK {
            keys: vec![[A::neg_infinity(); TOKEN_LANES]; k],
            index: vec![[0; TOKEN_LANES]; k],
            weights: vec![[A::zero(); TOKEN_LANES]; k],
        }
    }
}

/// Selection on the logits for eight tokens at once, each token in its own lane: every
/// expert's key is offered to every lane through the same branch-free insertion (selects
/// compile to SIMD blends), so there is no data-dependent branch at all. This beats the
/// per-token filter when E * k is small (Mixtral's 8 x 2, for instance). Offers come in
/// expert order and a key must be strictly greater to pass, so ties keep the lower index.
fn route_lanes<L: Element>(
    rows: &[L],
    first_token: usize,
    cfg: &GatingConfig,
    top: &mut LaneTopK<L::Acc>,
    weights: &mut [L::Acc],
    experts: &mut [i64],
) -> Result<()> {
    let (e, k) = (cfg.num_experts, cfg.k);
    for (keys, index) in top.keys.iter_mut().zip(top.index.iter_mut()) {
        *keys = [L::Acc::neg_infinity(); TOKEN_LANES];
        *index = [0; TOKEN_LANES];
    }
    let mut finite = [true; TOKEN_LANES];
    for expert in 0..e {
        let x: [L::Acc; TOKEN_LANES] = std::array::from_fn(|lane| rows[lane * e + expert].to_acc());
        for (ok, v) in finite.iter_mut().zip(&x) {
            *ok &= v.is_finite();
        }
        for p in (1..k).rev() {
            let (upper, lower) = top.keys.split_at_mut(p);
            let (upper_index, lower_index) = top.index.split_at_mut(p);
            let (above, here) = (&upper[p - 1], &mut lower[0]);
            let (above_index, here_index) = (&upper_index[p - 1], &mut lower_index[0]);
            for lane in 0..TOKEN_LANES {
                let shift = x[lane] > above[lane];
                let lands = x[lane] > here[lane];
                here_index[lane] = if shift {
                    above_index[lane]
                } else if lands {
                    expert as u32
                } else {
                    here_index[lane]
                };
                here[lane] = if shift {
                    above[lane]
                } else if lands {
                    x[lane]
                } else {
                    here[lane]
                };
            }
        }
        let lanes = top.keys[0].iter_mut().zip(top.index[0].iter_mut()).zip(&x);
        for ((key, index), &v) in lanes {
            let lands = v > *key;
            *index = if lands { expert as u32 } else { *index };
            *key = if lands { v } else { *key };
        }
    }
    if let Some(lane) = finite.iter().position(|ok| !ok) {
        return Err(non_finite_error(&rows[lane * e..(lane + 1) * e], first_token + lane));
    }
    // The keys are the chosen logits (this path selects on logits).
    let column = |expert: usize| std::array::from_fn(|lane| rows[lane * e + expert].to_acc());
    lane_weights(&top.keys, e, column, cfg, &mut top.weights);
    for lane in 0..TOKEN_LANES {
        for p in 0..k {
            experts[lane * k + p] = i64::from(top.index[p][lane]);
            weights[lane * k + p] = top.weights[p][lane];
        }
    }
    Ok(())
}

fn check_expert_id(id: i64, num_experts: usize, token: usize) -> Result<Option<usize>> {
    if id < 0 {
        return Ok(None);
    }
    if (id as u64) < num_experts as u64 {
        Ok(Some(id as usize))
    } else {
        Err(CoreError::invalid(
            "experts",
            format!("expert ids in [-1, {num_experts})"),
            format!("{id} at token {token}"),
        ))
    }
}

/// Working memory of the gating backward for one block of tokens.
struct BackwardScratch<A> {
    grad: Vec<A>,
    live: Vec<(usize, A, A)>,
}

/// `out = L::from_acc(s * factor)` over a row.
#[inline(always)]
fn scaled_row<L: Element>(s: &[L::Acc], factor: L::Acc, out: &mut [L]) {
    for (o, &v) in out.iter_mut().zip(s) {
        *o = L::from_acc(v * factor);
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_token<L: Element>(
    row: &[L],
    token: usize,
    chosen: &[i64],
    grad_weights: &[L::Acc],
    cfg: &GatingConfig,
    scratch: &mut BackwardScratch<L::Acc>,
    grad_row: &mut [L],
    avx2: bool,
) -> Result<()> {
    type A<L> = <L as Element>::Acc;
    let scale = A::<L>::from_f64(cfg.scale);
    let zero = A::<L>::zero();
    // The chosen slots as (expert, upstream gradient, logit); empty (-1) slots drop out.
    let live = &mut scratch.live;
    live.clear();
    for (&id, &g) in chosen.iter().zip(grad_weights) {
        if let Some(e) = check_expert_id(id, cfg.num_experts, token)? {
            live.push((e, g, row[e].to_acc()));
        }
    }
    if !live.iter().all(|&(_, _, l)| l.is_finite()) {
        return Err(non_finite_error(row, token));
    }
    if let (ScoreFunction::Softmax, false) = (cfg.score, cfg.normalize) {
        // w_j = scale * s_j with s the softmax over all experts:
        // dL/dl_n = s_n * (a_n - sum_j a_j s_j), a_n = scale * g_j where n is chosen slot j.
        // s: the softmax row kernel of the forward paths (AVX2 where enabled, same bits).
        let grad = &mut scratch.grad;
        grad.resize(row.len(), zero);
        if !softmax_row_on(row, grad, avx2) {
            return Err(non_finite_error(row, token));
        }
        let c = lane_sum(scratch.live.iter().map(|&(e, g, _)| scale * g * grad[e]));
        multiversion!(avx2, scaled_row(grad, zero - c, grad_row));
        for &(e, g, _) in scratch.live.iter() {
            grad_row[e] = L::from_acc(grad[e] * (scale * g - c));
        }
        return Ok(());
    }
    // The other cases only reach the chosen logits; every other logit's gradient is 0.
    grad_row.fill(L::from_acc(zero));
    match cfg.score {
        ScoreFunction::Softmax => {
            // w_j = scale * p_j with p the softmax over the chosen logits:
            // dL/dl_j = scale * p_j * (g_j - sum_i p_i g_i).
            let m = max_of(live.iter().map(|&(_, _, l)| l));
            for entry in live.iter_mut() {
                entry.2 = (entry.2 - m).fast_exp();
            }
            // The forward's sum over the chosen slots (lane_weights), then the same lanes.
            let total = lane_sum(live.iter().map(|&(_, _, v)| v));
            let mean_g = lane_sum(live.iter().map(|&(_, g, v)| v / total * g));
            for &(e, g, v) in live.iter() {
                grad_row[e] = L::from_acc(scale * (v / total) * (g - mean_g));
            }
        }
        ScoreFunction::Sigmoid => {
            for entry in live.iter_mut() {
                entry.2 = sigmoid(entry.2);
            }
            let (total, weighted) = if cfg.normalize {
                let total = lane_sum(live.iter().map(|&(_, _, s)| s)) + A::<L>::SIGMOID_NORM_EPS;
                (total, lane_sum(live.iter().map(|&(_, g, s)| g * s)))
            } else {
                (A::<L>::one(), zero)
            };
            for &(e, g, s) in live.iter() {
                let d_score =
                    if cfg.normalize { scale * (g / total - weighted / (total * total)) } else { scale * g };
                grad_row[e] = L::from_acc(d_score * s * (A::<L>::one() - s));
            }
        }
    }
    Ok(())
}

/// Gradient of [`topk_gating`]'s weights with respect to the logits.
///
/// `experts` and the config are those of the forward call; `grad_weights` is [T, k];
/// writes `grad_logits` [T, E] in the logits' dtype.
pub fn topk_gating_backward<L: Element>(
    logits: &[L],
    num_tokens: usize,
    experts: &[i64],
    grad_weights: &[L::Acc],
    cfg: &GatingConfig,
    grad_logits: &mut [L],
) -> Result<()> {
    cfg.validate()?;
    let (e, k) = (cfg.num_experts, cfg.k);
    check_len("logits", logits, num_tokens * e)?;
    check_len("experts", experts, num_tokens * k)?;
    check_len("grad_weights", grad_weights, num_tokens * k)?;
    check_len("grad_logits", grad_logits, num_tokens * e)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let avx2 = crate::simd::avx2_enabled();
    for_each_block(grad_logits, e, tokens_per_task(e), |first, block| {
        let mut scratch = BackwardScratch { grad: Vec::with_capacity(e), live: Vec::with_capacity(k) };
        for (i, out) in block.chunks_mut(e).enumerate() {
            let t = first + i;
            let (row, ids, g) = (
                &logits[t * e..(t + 1) * e],
                &experts[t * k..(t + 1) * k],
                &grad_weights[t * k..(t + 1) * k],
            );
            backward_token(row, t, ids, g, cfg, &mut scratch, out, avx2)?;
        }
        Ok(())
    })
}

/// Experts ranked in the first round of the top-p prefix search (each later round doubles).
const TOP_P_RANKS_PER_ROUND: usize = 24;

/// Dynamic-k (top-p) gating: each token keeps the most probable experts until their
/// cumulative softmax probability reaches `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopPConfig {
    pub num_experts: usize,
    /// Cumulative probability to reach, in (0, 1].
    pub p: f64,
    /// Experts kept at least (before `p` applies) and at most.
    pub min_k: usize,
    pub max_k: usize,
    /// true: keep the expert whose probability makes the sum reach `p` (the smallest prefix
    /// with sum >= p); false: keep only the prefix whose sum stays <= p.
    pub inclusive: bool,
    /// Renormalise the kept probabilities to sum to 1 (a softmax over the kept logits).
    pub normalize: bool,
}

impl TopPConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_experts == 0 {
            return Err(CoreError::invalid("logits", "at least one expert (E >= 1)", "E = 0"));
        }
        if !(self.p > 0.0 && self.p <= 1.0) {
            return Err(CoreError::invalid("p", "a probability in (0, 1]", format!("{}", self.p)));
        }
        if self.max_k == 0 || self.max_k > self.num_experts {
            return Err(CoreError::invalid(
                "max_k",
                format!("1 <= max_k <= E = {}", self.num_experts),
                format!("{}", self.max_k),
            ));
        }
        if self.min_k > self.max_k {
            return Err(CoreError::invalid(
                "min_k",
                format!("min_k <= max_k = {}", self.max_k),
                format!("{}", self.min_k),
            ));
        }
        Ok(())
    }
}

/// Top-p gating forward: `weights` and `experts` are `[T, max_k]`; slot `r` of a token holds
/// its `r`-th most probable expert (higher logit first, ties to the lower index) while kept,
/// then -1 with weight 0. Weights are the softmax probabilities over all experts, or, with
/// `normalize`, over the kept experts.
pub fn topp_gating<L: Element>(
    logits: &[L],
    num_tokens: usize,
    cfg: &TopPConfig,
    weights: &mut [L::Acc],
    experts: &mut [i64],
) -> Result<()> {
    cfg.validate()?;
    let (e, k) = (cfg.num_experts, cfg.max_k);
    check_len("logits", logits, num_tokens * e)?;
    check_len("weights", weights, num_tokens * k)?;
    check_len("experts", experts, num_tokens * k)?;
    let avx2 = crate::simd::avx2_enabled();
    let avx512 = crate::simd::avx512_enabled();
    let p = L::Acc::from_f64(cfg.p);
    for_each_block2((weights, k), (experts, k), tokens_per_task(e), |first, weight_block, expert_block| {
        // Softmax rows a tile at a time (the eight-row kernel takes whole groups of eight).
        const TILE: usize = 16;
        let mut order = Vec::with_capacity(e);
        let mut tile = vec![L::Acc::zero(); TILE * e];
        let block_tokens = weight_block.len() / k;
        for (i, (w_row, e_row)) in weight_block.chunks_mut(k).zip(expert_block.chunks_mut(k)).enumerate() {
            let t = first + i;
            let logits_row = &logits[t * e..(t + 1) * e];
            if i % TILE == 0 {
                let rows = TILE.min(block_tokens - i);
                let block_rows = &logits[t * e..(t + rows) * e];
                checked_softmax_rows(block_rows, e, &mut tile[..rows * e], avx2, t)?;
            }
            let probs = &tile[(i % TILE) * e..(i % TILE + 1) * e];
            // Descending logit, then ascending index: the packed keys sort in that order.
            order.clear();
            order.extend(logits_row.iter().enumerate().map(|(j, v)| v.to_acc().pack(j)));
            // Rows of up to 64 experts are sorted whole by a sorting network where the CPU
            // has AVX-512 (a tenth of the cost of a partial selection and sort).
            let (kept, cumulative) = if L::Acc::sort_packed_by_network(&mut order, avx512) {
                kept_prefix(&order[..k], probs, cfg, p, 0, L::Acc::zero())
            } else {
                // Only the kept prefix needs sorting: rank the next ranks a round at a time
                // (a partial selection, then a sort of those), 24, then 48, 96, ... ranks a
                // round, until the prefix stops. (Measured at E = 64 and 256: fewer, longer
                // rounds beat eight ranks a round unless only a few experts are kept.)
                let (mut kept, mut cumulative) = (0, L::Acc::zero());
                let mut step = TOP_P_RANKS_PER_ROUND;
                while kept < k {
                    let end = (kept + step).min(k);
                    // Longer prefixes get longer rounds: fewer partial selections over the rest.
                    step *= 2;
                    let rest = &mut order[kept..];
                    if end - kept < rest.len() {
                        rest.select_nth_unstable_by(end - kept - 1, |a, b| b.cmp(a));
                    }
                    rest[..end - kept].sort_unstable_by(|a, b| b.cmp(a));
                    let (count, sum) = kept_prefix(&order[kept..end], probs, cfg, p, kept, cumulative);
                    (kept, cumulative) = (kept + count, sum);
                    if kept < end {
                        break;
                    }
                }
                (kept, cumulative)
            };
            let (w_kept, w_rest) = w_row.split_at_mut(kept);
            let (e_kept, e_rest) = e_row.split_at_mut(kept);
            for ((w, id), &key) in w_kept.iter_mut().zip(e_kept.iter_mut()).zip(&order) {
                let expert = L::Acc::unpack_index(key);
                *id = expert as i64;
                // Unnormalised weights are the probabilities themselves (x / 1 is x).
                *w = if cfg.normalize { probs[expert] / cumulative } else { probs[expert] };
            }
            w_rest.fill(L::Acc::zero());
            e_rest.fill(-1);
        }
        Ok(())
    })
}

/// How many of `ranked` (the keys of ranks `first_rank ..`, in order) top-p keeps, given
/// the probability `cumulative` of the ranks before them; returns that count and the
/// probability of all kept ranks (added one rank at a time, in rank order).
#[inline(always)]
fn kept_prefix<A: Accumulator>(
    ranked: &[A::Packed],
    probs: &[A],
    cfg: &TopPConfig,
    p: A,
    first_rank: usize,
    mut cumulative: A,
) -> (usize, A) {
    let (min_k, inclusive) = (cfg.min_k, cfg.inclusive);
    for (i, &key) in ranked.iter().enumerate() {
        let prob = probs[A::unpack_index(key)];
        let keep = first_rank + i < min_k || if inclusive { cumulative < p } else { cumulative + prob <= p };
        if !keep {
            return (i, cumulative);
        }
        cumulative = cumulative + prob;
    }
    (ranked.len(), cumulative)
}

/// Expert-choice routing: every expert picks the `capacity` tokens with the highest softmax
/// probability (over experts, per token) for it; equal probabilities go to the lower token.
/// `indices` and `gates` are `[E, capacity]`: expert `e`'s tokens in ascending order and
/// their probabilities. `scores` (`[E, T]`, contents ignored) is working memory for the
/// probabilities, expert-major: the caller may hand in memory it reuses, which is faster
/// to write than fresh pages.
pub fn expert_choice<L: Element>(
    logits: &[L],
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    indices: &mut [i64],
    gates: &mut [L::Acc],
    scores: &mut [L::Acc],
) -> Result<()> {
    if num_experts == 0 {
        return Err(CoreError::invalid("logits", "at least one expert (E >= 1)", "E = 0"));
    }
    if capacity > num_tokens {
        return Err(CoreError::invalid(
            "capacity",
            format!("at most the number of tokens T = {num_tokens}"),
            format!("{capacity}"),
        ));
    }
    check_len("logits", logits, num_tokens * num_experts)?;
    check_len("indices", indices, num_experts * capacity)?;
    check_len("gates", gates, num_experts * capacity)?;
    check_len("scores", scores, num_tokens * num_experts)?;
    if capacity == 0 {
        return Ok(());
    }
    // The softmax of every token, written expert-major so that each expert then reads its
    // column contiguously. A task takes a range of tokens, BAND tokens at a time: their
    // softmax rows go to a small tile (in L1), then each expert gets its BAND values as one
    // contiguous run (about a cache line) of its column.
    const BAND: usize = 16;
    let columns = scores;
    let (avx2, avx512) = (crate::simd::avx2_enabled(), crate::simd::avx512_enabled());
    let per_task = tokens_per_task(num_experts).div_ceil(BAND) * BAND;
    let firsts: Vec<usize> = (0..num_tokens).step_by(per_task).collect();
    let shared = SharedColumns(columns.as_mut_ptr());
    crate::threads::map_collect(&firsts, |_, &first| {
        let shared = &shared;
        let last = (first + per_task).min(num_tokens);
        let mut tile = vec![L::Acc::zero(); BAND * num_experts];
        for t0 in (first..last).step_by(BAND) {
            let n = BAND.min(last - t0);
            let rows = &logits[t0 * num_experts..(t0 + n) * num_experts];
            checked_softmax_rows(rows, num_experts, &mut tile[..n * num_experts], avx2, t0)?;
            #[cfg(target_arch = "x86_64")]
            if n == BAND && avx512 {
                if let Some(tile) = L::Acc::as_f32(&tile) {
                    // SAFETY: AVX-512 is available (checked); tokens t0 .. t0 + 16 of every
                    // expert's column lie inside `columns` and belong to this task alone, and
                    // the accumulator is f32 (so is `columns`).
                    unsafe {
                        crate::simd::avx512::write_columns(
                            tile,
                            num_experts,
                            shared.0.add(t0).cast(),
                            num_tokens,
                        );
                    }
                    continue;
                }
            }
            for e in 0..num_experts {
                // SAFETY: tokens t0 .. t0 + n of expert e's column lie inside `columns` and
                // belong to this task alone (tasks cover disjoint token ranges).
                let out = unsafe { std::slice::from_raw_parts_mut(shared.0.add(e * num_tokens + t0), n) };
                for (o, row) in out.iter_mut().zip(tile.chunks_exact(num_experts)) {
                    *o = row[e];
                }
            }
        }
        Ok(())
    })?;
    let columns = &*columns;
    let experts: Vec<usize> = (0..num_experts).collect();
    let chosen = crate::threads::map_collect(&experts, |_, &e| {
        let column = &columns[e * num_tokens..(e + 1) * num_tokens];
        // The C best (probability, lower token first) pairs, in token order.
        Ok(best_indices(column, capacity))
    })?;
    for (e, tokens) in chosen.iter().enumerate() {
        for (c, &t) in tokens.iter().enumerate() {
            indices[e * capacity + c] = t as i64;
            gates[e * capacity + c] = columns[e * num_tokens + t];
        }
    }
    Ok(())
}

/// `expert_choice`'s expert-major probabilities, written by several tasks at once, each to
/// its own token range of every column.
struct SharedColumns<A>(*mut A);
// SAFETY: the tasks that share it write disjoint elements (see its use).
unsafe impl<A: Send> Send for SharedColumns<A> {}
// SAFETY: as above.
unsafe impl<A: Send> Sync for SharedColumns<A> {}

/// Checks the `[E, C]` token lists of an expert-choice decision against `num_tokens`.
fn check_choice_indices(indices: &[i64], num_tokens: usize) -> Result<()> {
    match indices.iter().position(|&t| t < 0 || t as u64 >= num_tokens as u64) {
        None => Ok(()),
        Some(i) => Err(CoreError::invalid(
            "indices",
            format!("token indices in [0, {num_tokens})"),
            format!("{} at position {i}", indices[i]),
        )),
    }
}

/// The `[T, E]` slot layout of an expert-choice decision: `experts[t, e] = e` and
/// `weights[t, e] = gates[e, c]` where expert `e` chose token `t` (as its `c`-th), else -1
/// and 0. `indices` and `gates` are `[E, C]`.
pub fn expert_choice_slots<A: Accumulator>(
    indices: &[i64],
    gates: &[A],
    num_tokens: usize,
    num_experts: usize,
    experts: &mut [i64],
    weights: &mut [A],
) -> Result<()> {
    if num_experts == 0 {
        return Err(CoreError::invalid("indices", "at least one expert (E >= 1)", "E = 0"));
    }
    check_len("gates", gates, indices.len())?;
    check_len("experts", experts, num_tokens * num_experts)?;
    check_len("weights", weights, num_tokens * num_experts)?;
    check_choice_indices(indices, num_tokens)?;
    // Row by row, each written whole while in cache (a scatter into rows filled before
    // would miss the cache once per choice, on one thread).
    let by_token = ChoicesByToken::new(indices, gates, num_tokens, num_experts);
    for_each_block2((experts, num_experts), (weights, num_experts), 4096, |first, experts, weights| {
        experts.fill(-1);
        weights.fill(A::zero());
        for (i, (experts, weights)) in
            experts.chunks_exact_mut(num_experts).zip(weights.chunks_exact_mut(num_experts)).enumerate()
        {
            for &(e, g) in by_token.of(first + i) {
                experts[e as usize] = i64::from(e);
                weights[e as usize] = g;
            }
        }
        Ok(())
    })
}

/// The choices of an expert-choice decision grouped by token: each token's (expert, value)
/// pairs in expert order (a counting sort of the `[E, C]` choices; C * E entries, where a
/// dense `[T, E]` layout would be mostly empty). For one expert listing a token twice, the
/// later entry comes later, as if written over the earlier.
struct ChoicesByToken<A> {
    /// Where each token's pairs start in `pairs` (u32: the lists are rebuilt on every call,
    /// and half the bytes of usize are fewer fresh pages to fault in).
    starts: Vec<u32>,
    pairs: Vec<(u32, A)>,
}

impl<A: Accumulator> ChoicesByToken<A> {
    /// `indices` and `values` are `[E, C]` (at most 2^32 choices); token ids are checked to
    /// lie in `0..num_tokens`.
    fn new(indices: &[i64], values: &[A], num_tokens: usize, num_experts: usize) -> Self {
        let capacity = indices.len() / num_experts;
        let mut starts = vec![0u32; num_tokens + 1];
        for &t in indices {
            starts[t as usize + 1] += 1;
        }
        for t in 0..num_tokens {
            starts[t + 1] += starts[t];
        }
        let mut pairs = vec![(0u32, A::zero()); indices.len()];
        let mut cursors = starts[..num_tokens].to_vec();
        for (e, (tokens, values)) in
            indices.chunks_exact(capacity.max(1)).zip(values.chunks_exact(capacity.max(1))).enumerate()
        {
            for (&t, &v) in tokens.iter().zip(values) {
                let cursor = &mut cursors[t as usize];
                pairs[*cursor as usize] = (e as u32, v);
                *cursor += 1;
            }
        }
        ChoicesByToken { starts, pairs }
    }

    /// Token `t`'s pairs.
    fn of(&self, t: usize) -> &[(u32, A)] {
        &self.pairs[self.starts[t] as usize..self.starts[t + 1] as usize]
    }
}

/// Gradient of [`expert_choice`]'s gates with respect to the logits. With `p_t` the softmax
/// of token t and `G` the gates' gradient placed at `[indices[e, c], e]` (0 elsewhere):
/// `grad[t] = p_t * (G_t - <p_t, G_t>)`, the dot product in eight lanes.
pub fn expert_choice_backward<L: Element>(
    logits: &[L],
    num_tokens: usize,
    num_experts: usize,
    indices: &[i64],
    grad_gates: &[L::Acc],
    grad_logits: &mut [L],
) -> Result<()> {
    if num_experts == 0 {
        return Err(CoreError::invalid("logits", "at least one expert (E >= 1)", "E = 0"));
    }
    check_len("logits", logits, num_tokens * num_experts)?;
    check_len("grad_gates", grad_gates, indices.len())?;
    check_len("grad_logits", grad_logits, logits.len())?;
    check_choice_indices(indices, num_tokens)?;
    let by_token = ChoicesByToken::new(indices, grad_gates, num_tokens, num_experts);
    let (by_token, avx2) = (&by_token, crate::simd::avx2_enabled());
    // Rows a tile of softmax rows holds (two groups of the eight-row kernel).
    const TILE: usize = 16;
    for_each_block(grad_logits, num_experts, tokens_per_task(num_experts), |first, block| {
        let mut probs = vec![L::Acc::zero(); TILE * num_experts];
        let mut g = vec![L::Acc::zero(); num_experts];
        for (i, outs) in block.chunks_mut(TILE * num_experts).enumerate() {
            let t0 = first + i * TILE;
            let rows = &logits[t0 * num_experts..t0 * num_experts + outs.len()];
            let probs = &mut probs[..outs.len()];
            checked_softmax_rows(rows, num_experts, probs, avx2, t0)?;
            for (r, (out, p)) in
                outs.chunks_exact_mut(num_experts).zip(probs.chunks_exact(num_experts)).enumerate()
            {
                let t = t0 + r;
                g.fill(L::Acc::zero());
                for &(e, grad) in by_token.of(t) {
                    g[e as usize] = grad;
                }
                multiversion!(avx2, choice_gradient_row(p, &g, out));
            }
        }
        Ok(())
    })
}

/// One token of the expert-choice gradient: `out = p * (g - <p, g>)`, the dot product in
/// eight lanes (element j into lane j % 8, then the lanes in order).
#[inline(always)]
fn choice_gradient_row<L: Element>(probs: &[L::Acc], g: &[L::Acc], out: &mut [L]) {
    let mut lanes = [L::Acc::zero(); LANES];
    let whole = probs.len() / LANES * LANES;
    for (p8, g8) in probs[..whole].chunks_exact(LANES).zip(g[..whole].chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] = lanes[l] + p8[l] * g8[l];
        }
    }
    for (l, (&p, &g)) in probs[whole..].iter().zip(&g[whole..]).enumerate() {
        lanes[l] = lanes[l] + p * g;
    }
    let dot = lanes.iter().fold(L::Acc::zero(), |a, &b| a + b);
    for ((o, &p), &g) in out.iter_mut().zip(probs).zip(g) {
        *o = L::from_acc(p * (g - dot));
    }
}

/// The indices t of the `c` best pairs `(values[t], t)` in selection order (higher value
/// first, then lower index), in ascending order of t, for non-negative finite values and
/// `1 <= c <= values.len()`: with AVX-512, by a sampled threshold and one compressing pass
/// ([`crate::simd::select`]); otherwise, or when the sample misjudged, [`best_indices_radix`].
fn best_indices<A: Accumulator>(values: &[A], c: usize) -> Vec<usize> {
    #[cfg(target_arch = "x86_64")]
    if values.len() >= crate::simd::select::MIN_VALUES && crate::simd::avx512_enabled() {
        if let Some(values) = A::as_f32(values) {
            // SAFETY: AVX-512 is available (checked); probabilities are non-negative and
            // finite, and 0 < c <= T (the caller).
            if let Some(best) = unsafe { crate::simd::select::best_positions(values, c) } {
                return best;
            }
        }
    }
    best_indices_radix(values, c)
}

/// [`best_indices`] by a radix step: a histogram of the top bits of the keys finds the
/// bucket holding the c-th best. One more pass keeps the pairs in that bucket or above, in
/// index order (the c best and the rest of that bucket, usually a small share of the
/// values); the exact selection and the final choice then run over those alone.
fn best_indices_radix<A: Accumulator>(values: &[A], c: usize) -> Vec<usize> {
    const BITS: u32 = 11;
    let shift = A::PROBABILITY_KEY_BITS - BITS;
    // Four interleaved histograms, so that runs of equal buckets do not wait on each other.
    let mut histograms = vec![[0u32; 4]; 1 << BITS];
    for (i, v) in values.iter().enumerate() {
        histograms[(v.probability_key() >> shift) as usize][i % 4] += 1;
    }
    let (mut above, mut target, mut in_bucket) = (0, 0, 0);
    for (b, counts) in histograms.iter().enumerate().rev() {
        let count = counts.iter().map(|&n| n as usize).sum::<usize>();
        if above + count >= c {
            (target, in_bucket) = (b as u64, count);
            break;
        }
        above += count;
    }
    // Branch-free (about one value in twenty passes, at random): every pair is written,
    // and the count moves on past those that pass; the histogram sized the buffer.
    let mut near = vec![(0u64, 0usize); above + in_bucket + 1];
    let mut n = 0;
    for (t, v) in values.iter().enumerate() {
        let key = v.probability_key();
        near[n] = (key, t);
        n += usize::from(key >> shift >= target);
    }
    near.truncate(n);
    // The c-th best is the (c - above)-th best of the target bucket.
    let mut bucket: Vec<(u64, std::cmp::Reverse<usize>)> = near
        .iter()
        .filter(|&&(key, _)| key >> shift == target)
        .map(|&(key, t)| (key, std::cmp::Reverse(t)))
        .collect();
    let (key, std::cmp::Reverse(last)) = *bucket.select_nth_unstable_by(c - above - 1, |a, b| b.cmp(a)).1;
    near.iter().filter(|&&(k, t)| k > key || (k == key && t <= last)).map(|&(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(e: usize, k: usize, score: ScoreFunction, normalize: bool) -> GatingConfig {
        GatingConfig { num_experts: e, k, score, normalize, groups: None, scale: 1.0 }
    }

    fn run(logits: &[f32], bias: Option<&[f32]>, c: &GatingConfig) -> (Vec<f32>, Vec<i64>) {
        let t = logits.len() / c.num_experts;
        let mut w = vec![0.0; t * c.k];
        let mut ids = vec![0; t * c.k];
        topk_gating(logits, t, bias, c, &mut w, &mut ids).unwrap();
        (w, ids)
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let (_, ids) = run(&[1.0, 3.0, 3.0, 1.0, 3.0], None, &cfg(5, 3, ScoreFunction::Softmax, true));
        assert_eq!(ids, vec![1, 2, 4]);
        let (_, ids) = run(&[0.0; 6], None, &cfg(6, 4, ScoreFunction::Sigmoid, false));
        assert_eq!(ids, vec![0, 1, 2, 3]);
    }

    #[test]
    fn normalised_softmax_weights_sum_to_scale() {
        let mut c = cfg(4, 2, ScoreFunction::Softmax, true);
        c.scale = 2.5;
        let (w, ids) = run(&[0.5, -1.0, 2.0, 0.25], None, &c);
        assert_eq!(ids, vec![2, 0]);
        assert!((w[0] + w[1] - 2.5).abs() < 1e-6);
        let expected = 2.5 / (1.0 + (-1.5f32).exp());
        assert!((w[0] - expected).abs() < 1e-6);
    }

    #[test]
    fn unnormalised_softmax_weights_are_the_full_softmax() {
        let logits = [0.5f32, -1.0, 2.0, 0.25];
        let (w, _) = run(&logits, None, &cfg(4, 2, ScoreFunction::Softmax, false));
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((w[0] - 2f32.exp() / z).abs() < 1e-6);
        assert!((w[1] - 0.5f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn unnormalised_softmax_weights_are_the_scores_of_softmax_row() {
        // One large logit among many equal ones: summing the small terms one by one into a
        // single running total rounded each addition at the large term's scale, and the
        // top weight drifted 9.6e-6 (80 ulp) from the exact softmax at E = 256.
        for (e, k) in [(9, 2), (9, 8), (60, 2), (64, 8), (64, 12), (256, 2), (256, 8), (300, 12)] {
            // Eight tokens in lanes and the per-token path after them; k <= 8 takes the
            // SIMD lane kernels, k = 12 the per-token one.
            let tokens = 11;
            let mut logits = tricky_logits(tokens * e, e as u64);
            logits[0] = 7.25;
            logits[e..2 * e].fill(0.0);
            logits[e] = 7.25;
            let cfg = cfg(e, k, ScoreFunction::Softmax, false);
            compare_paths(&logits, tokens, &cfg);
            let (w, ids) = run(&logits, None, &cfg);
            let mut scores = vec![0.0f32; e];
            for t in 0..tokens {
                let row = &logits[t * e..(t + 1) * e];
                assert!(softmax_row(row, &mut scores));
                for j in 0..k {
                    let chosen = ids[t * k + j] as usize;
                    assert_eq!(w[t * k + j].to_bits(), scores[chosen].to_bits(), "E = {e}, token {t}");
                }
            }
            let exact = 1.0 / (1.0 + (e - 1) as f64 * (-7.25f64).exp());
            assert!((f64::from(w[k]) - exact).abs() <= 2e-6 * exact, "E = {e}: {} against {exact}", w[k]);
        }
    }

    #[test]
    fn normalised_weights_of_many_chosen_experts_stay_accurate() {
        // k = E: the sum over the chosen experts has as many terms as the softmax's.
        for e in [64, 256, 300] {
            let mut logits = vec![0.0f32; e];
            logits[0] = 7.25;
            let (w, _) = run(&logits, None, &cfg(e, e, ScoreFunction::Softmax, true));
            let exact = 1.0 / (1.0 + (e - 1) as f64 * (-7.25f64).exp());
            assert!((f64::from(w[0]) - exact).abs() <= 2e-6 * exact, "softmax, E = {e}: {}", w[0]);
            let mut logits = vec![-7.25f32; e];
            logits[0] = 30.0;
            let (w, _) = run(&logits, None, &cfg(e, e, ScoreFunction::Sigmoid, true));
            let (big, small) = (1.0 / (1.0 + (-30.0f64).exp()), 1.0 / (1.0 + 7.25f64.exp()));
            let exact = big / (big + (e - 1) as f64 * small);
            assert!((f64::from(w[0]) - exact).abs() <= 2e-6 * exact, "sigmoid, E = {e}: {}", w[0]);
        }
    }

    #[test]
    fn bias_changes_selection_but_not_weights() {
        let c = cfg(3, 1, ScoreFunction::Sigmoid, false);
        let (w, ids) = run(&[1.0, 0.0, -1.0], Some(&[0.0, 0.0, 1.0]), &c);
        assert_eq!(ids, vec![2]);
        assert!((w[0] - 1.0 / (1.0 + 1f32.exp())).abs() < 1e-7);
    }

    #[test]
    fn group_limit_masks_losing_groups() {
        // Groups {0,1}: top-2 sum 0.9+0.8; {2,3}: 0.99+0.01. The best single expert (2) is in
        // the losing group when only one group is kept.
        let mut c = cfg(4, 2, ScoreFunction::Sigmoid, true);
        c.groups = Some(GroupLimit { num_groups: 2, topk_groups: 1, score_k: 2 });
        let logits: Vec<f32> = [0.9f32, 0.8, 0.99, 0.01].iter().map(|p| (p / (1.0 - p)).ln()).collect();
        let (_, ids) = run(&logits, None, &c);
        assert_eq!(ids, vec![0, 1]);
        // Scored by their best key alone (score_k = 1), {2,3} wins: 0.99 > 0.9.
        c.groups = Some(GroupLimit { num_groups: 2, topk_groups: 1, score_k: 1 });
        let (_, ids) = run(&logits, None, &c);
        assert_eq!(ids, vec![2, 3]);
        // Scored by more keys than a group has: all of them, 0.9+0.8 against 0.99+0.01.
        c.groups = Some(GroupLimit { num_groups: 2, topk_groups: 1, score_k: 5 });
        let (_, ids) = run(&logits, None, &c);
        assert_eq!(ids, vec![0, 1]);
    }

    #[test]
    fn invalid_configs_name_the_argument() {
        let err = cfg(4, 5, ScoreFunction::Softmax, true).validate().unwrap_err();
        assert!(err.to_string().starts_with("k:"), "{err}");
        let mut c = cfg(6, 2, ScoreFunction::Softmax, true);
        c.groups = Some(GroupLimit { num_groups: 4, topk_groups: 1, score_k: 2 });
        assert!(c.validate().unwrap_err().to_string().starts_with("num_groups:"));
        c.groups = Some(GroupLimit { num_groups: 2, topk_groups: 1, score_k: 0 });
        assert!(c.validate().unwrap_err().to_string().starts_with("group_score_k:"));
        let err = "relu".parse::<ScoreFunction>().unwrap_err();
        assert!(err.to_string().starts_with("score:"));
    }

    #[test]
    fn non_finite_logits_are_refused() {
        let c = cfg(2, 1, ScoreFunction::Softmax, true);
        let mut w = vec![0.0; 2];
        let mut ids = vec![0; 2];
        let err = topk_gating(&[0.0f32, 1.0, f32::NAN, 0.0], 2, None, &c, &mut w, &mut ids).unwrap_err();
        assert!(err.to_string().contains("token 1, expert 0"), "{err}");
    }

    /// Central differences of sum(w * g) against the analytic backward, in f64.
    #[test]
    fn backward_matches_finite_differences() {
        let logits = [0.3f64, -0.7, 1.1, 0.2, -0.4, 0.9];
        let g = [0.7f64, -1.3, 0.4];
        for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
            for normalize in [true, false] {
                let mut c = cfg(6, 3, score, normalize);
                c.scale = 1.7;
                let forward = |l: &[f64]| {
                    let mut w = vec![0.0; 3];
                    let mut ids = vec![0; 3];
                    topk_gating(l, 1, None, &c, &mut w, &mut ids).unwrap();
                    (w.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>(), ids)
                };
                let (_, ids) = forward(&logits);
                let mut grad = vec![0.0; 6];
                topk_gating_backward(&logits, 1, &ids, &g, &c, &mut grad).unwrap();
                for n in 0..6 {
                    let h = 1e-6;
                    let mut plus = logits;
                    plus[n] += h;
                    let mut minus = logits;
                    minus[n] -= h;
                    let numeric = (forward(&plus).0 - forward(&minus).0) / (2.0 * h);
                    assert!(
                        (numeric - grad[n]).abs() < 1e-7,
                        "{score:?} {normalize} expert {n}: {numeric} vs {}",
                        grad[n]
                    );
                }
            }
        }
    }

    fn topp(
        logits: &[f64],
        e: usize,
        p: f64,
        min_k: usize,
        max_k: usize,
        inclusive: bool,
    ) -> (Vec<f64>, Vec<i64>) {
        let t = logits.len() / e;
        let (mut w, mut ids) = (vec![0.0; t * max_k], vec![0; t * max_k]);
        let cfg = TopPConfig { num_experts: e, p, min_k, max_k, inclusive, normalize: false };
        topp_gating(logits, t, &cfg, &mut w, &mut ids).unwrap();
        (w, ids)
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2 (as logits ln p).
        let logits: Vec<f64> = [0.2f64, 0.5, 0.3].iter().map(|p| p.ln()).collect();
        assert_eq!(topp(&logits, 3, 0.6, 1, 3, true).1, vec![1, 2, -1]);
        assert_eq!(topp(&logits, 3, 0.6, 1, 3, false).1, vec![1, -1, -1]);
        assert_eq!(topp(&logits, 3, 0.1, 2, 3, true).1, vec![1, 2, -1]);
        assert_eq!(topp(&logits, 3, 1.0, 1, 2, true).1, vec![1, 2]);
        let (w, _) = topp(&logits, 3, 0.6, 1, 3, true);
        assert!((w[0] - 0.5).abs() < 1e-12 && (w[1] - 0.3).abs() < 1e-12 && w[2] == 0.0);
    }

    #[test]
    fn top_p_rejects_bad_settings() {
        let cfg = TopPConfig { num_experts: 4, p: 0.0, min_k: 1, max_k: 2, inclusive: true, normalize: true };
        assert!(cfg.validate().is_err());
        assert!(TopPConfig { p: 0.5, min_k: 3, ..cfg }.validate().is_err());
        assert!(TopPConfig { p: 0.5, max_k: 5, ..cfg }.validate().is_err());
    }

    #[test]
    fn expert_choice_picks_each_experts_best_tokens_in_token_order() {
        // Token t prefers expert t % 2 strongly.
        let logits = [2.0f64, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 2.0];
        let (mut idx, mut gates) = (vec![0; 4], vec![0.0; 4]);
        expert_choice(&logits, 4, 2, 2, &mut idx, &mut gates, &mut [0.0; 8]).unwrap();
        assert_eq!(idx, vec![0, 2, 1, 3]);
        let p = 2.0f64.exp() / (2.0f64.exp() + 1.0);
        assert!(gates.iter().all(|g| (g - p).abs() < 1e-12));
        // Equal probabilities: the lower tokens win.
        let (mut idx, mut gates) = (vec![0; 2], vec![0.0; 2]);
        expert_choice(&[0.0f64; 8], 4, 2, 1, &mut idx, &mut gates, &mut [0.0; 8]).unwrap();
        assert_eq!(idx, vec![0, 0]);
        assert!(expert_choice(&[0.0f64; 8], 4, 2, 5, &mut [0; 10], &mut [0.0; 10], &mut [0.0; 8]).is_err());
    }

    /// Logits with ties, signed zeros and a wide range, from a small generator.
    fn tricky_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let r = (state >> 40) as f32 / (1u64 << 24) as f32;
                match state % 7 {
                    0 => (r * 4.0).floor() - 2.0, // ties
                    1 => -0.0,
                    2 => r * 60.0 - 30.0,
                    _ => r * 6.0 - 3.0,
                }
            })
            .collect()
    }

    /// Runs the portable kernels, the AVX2 ones and (where the CPU has it) AVX-512
    /// selection on the same logits: the same error or the same bits.
    fn compare_paths<L: Element>(logits: &[L], tokens: usize, cfg: &GatingConfig) {
        compare_paths_with_bias(logits, tokens, None, cfg);
    }

    /// [`compare_paths`] with a selection bias.
    fn compare_paths_with_bias<L: Element>(
        logits: &[L],
        tokens: usize,
        bias: Option<&[L::Acc]>,
        cfg: &GatingConfig,
    ) {
        let Some(simd) = simd_rows(logits) else { return };
        let k = cfg.k;
        let run = |view: Option<Storage<'_>>, avx512: bool| {
            let mut w = vec![L::Acc::zero(); tokens * k];
            let mut ids = vec![0i64; tokens * k];
            let result = topk_gating_on(logits, view, avx512, tokens, bias, cfg, &mut w, &mut ids);
            (result.map_err(|e| e.to_string()), w, ids)
        };
        let portable = run(None, false);
        let bits = |w: &[L::Acc]| {
            w.iter().map(|v| num_traits::ToPrimitive::to_f64(v).map(f64::to_bits)).collect::<Vec<_>>()
        };
        let mut paths = vec![("avx2", run(Some(simd), false))];
        if crate::simd::avx512_enabled() {
            paths.push(("avx512", run(Some(simd), true)));
        }
        for (name, simd) in paths {
            assert_eq!(portable.0, simd.0, "{name}: {cfg:?}");
            if portable.0.is_err() {
                continue; // outputs are unspecified after an error
            }
            assert_eq!(portable.2, simd.2, "{name}: experts differ: {cfg:?}");
            assert_eq!(bits(&portable.1), bits(&simd.1), "{name}: weights differ: {cfg:?}");
        }
    }

    #[test]
    fn simd_kernels_match_the_portable_ones_bit_for_bit() {
        let tokens = 37; // whole groups of eight and a remainder
        let mut seed = 1;
        for e in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 60, 64, 65, 100, 128, 160, 256, 300] {
            for k in (1..=e.min(16)).filter(|&k| k <= 9 || k % 4 == 0 || k == e) {
                for (score, normalize, scale) in [
                    (ScoreFunction::Softmax, true, 1.0),
                    (ScoreFunction::Softmax, false, 2.5),
                    (ScoreFunction::Sigmoid, true, 1.0),
                    (ScoreFunction::Sigmoid, false, 2.5),
                ] {
                    let cfg = GatingConfig { num_experts: e, k, score, normalize, groups: None, scale };
                    seed += 1;
                    let logits = tricky_logits(tokens * e, seed);
                    compare_paths(&logits, tokens, &cfg);
                    let bf: Vec<half::bf16> = logits.iter().map(|&v| half::bf16::from_f32(v)).collect();
                    compare_paths(&bf, tokens, &cfg);
                    let hf: Vec<half::f16> = logits.iter().map(|&v| half::f16::from_f32(v)).collect();
                    compare_paths(&hf, tokens, &cfg);
                    // Every logit equal: all candidates tie at the bound.
                    compare_paths(&vec![0.5f32; tokens * e], tokens, &cfg);
                    // Finite logits so large that their sum overflows.
                    let huge: Vec<f32> = logits.iter().map(|&v| v.signum() * 3e38).collect();
                    compare_paths(&huge, tokens, &cfg);
                    // A non-finite logit in the middle of a group of eight.
                    let mut bad = logits.clone();
                    bad[(tokens / 2) * e + e / 2] = if seed % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY };
                    compare_paths(&bad, tokens, &cfg);
                }
            }
        }
    }

    /// Selection on scores (a bias, a group limit or both): the AVX2 keys and selection
    /// against the portable kernels, with groups scored by one to three keys, biases with
    /// ties between groups, and a bias so negative that the kernels must not mask with
    /// f32::MIN (the portable path then runs).
    #[test]
    fn simd_selection_on_scores_matches_the_portable_one_bit_for_bit() {
        let tokens = 21;
        let mut seed = 1000;
        for (e, num_groups, topk_groups, k) in
            [(32, 4, 2, 3), (64, 8, 3, 8), (256, 8, 4, 8), (60, 6, 2, 16), (33, 3, 1, 2)]
        {
            for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
                for score_k in [1, 2, 3] {
                    seed += 1;
                    let logits = tricky_logits(tokens * e, seed);
                    let bf: Vec<half::bf16> = logits.iter().map(|&v| half::bf16::from_f32(v)).collect();
                    let classes: Vec<f32> =
                        (0..e).map(|x| ((x / (e / num_groups) * 7) % 3) as f32 * 10.0).collect();
                    let small: Vec<f32> = tricky_logits(e, seed + 1).iter().map(|v| v * 0.01).collect();
                    let mut floor = small.clone();
                    floor[e / 2] = f32::MIN;
                    let groups = Some(GroupLimit { num_groups, topk_groups, score_k });
                    for (groups, bias) in [
                        (None, Some(&small)),
                        (groups, None),
                        (groups, Some(&classes)),
                        (groups, Some(&small)),
                        (groups, Some(&floor)),
                    ] {
                        let cfg =
                            GatingConfig { num_experts: e, k, score, normalize: true, groups, scale: 1.5 };
                        compare_paths_with_bias(&logits, tokens, bias.map(|b| b.as_slice()), &cfg);
                        compare_paths_with_bias(&bf, tokens, bias.map(|b| b.as_slice()), &cfg);
                    }
                }
            }
        }
    }

    #[test]
    fn best_indices_match_sorting() {
        let mut rng = crate::test_rng::TestRng::new(11);
        for n in [1usize, 2, 7, 100, 2049] {
            for round in 0..20 {
                let values: Vec<f32> = (0..n)
                    .map(|_| {
                        let r = rng.unit_f32();
                        // Probabilities: many ties in some rounds, a wide range in others.
                        if round % 2 == 0 {
                            (r * 5.0).floor() / 8.0
                        } else {
                            r * r * r
                        }
                    })
                    .collect();
                let mut sorted: Vec<u64> = values.iter().enumerate().map(|(t, v)| v.pack(t)).collect();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                for c in [1, n / 3 + 1, n / 2 + 1, n] {
                    let mut expected: Vec<usize> =
                        sorted[..c].iter().map(|&p| f32::unpack_index(p)).collect();
                    expected.sort_unstable();
                    assert_eq!(best_indices(&values, c), expected, "n = {n}, c = {c}");
                    assert_eq!(best_indices_radix(&values, c), expected, "radix, n = {n}, c = {c}");
                    let as_f64: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
                    assert_eq!(best_indices(&as_f64, c), expected, "f64, n = {n}, c = {c}");
                }
            }
        }
    }

    #[test]
    fn softmax_kernels_agree_bit_for_bit() {
        if !crate::simd::avx2_enabled() {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (e, seed) in [(1, 1), (7, 2), (8, 3), (16, 7), (24, 8), (47, 9), (60, 4), (64, 5), (161, 6)] {
            let row = tricky_logits(e, seed);
            let (mut portable, mut simd) = (vec![0f32; e], vec![0f32; e]);
            assert_eq!(softmax_row(&row, &mut portable), softmax_row_on(&row, &mut simd, true));
            assert_eq!(bits(&portable), bits(&simd));
            // Each SIMD level directly (softmax_row_on takes the widest the CPU has).
            let rows = f32::storage(&row).unwrap();
            let mut narrow = vec![0f32; e];
            // SAFETY: AVX2 is available (checked above); the row is all of `rows`.
            assert!(unsafe { crate::simd::avx2::softmax_row(rows, 0, &mut narrow) });
            assert_eq!(bits(&portable), bits(&narrow), "AVX2, E = {e}");
            if crate::simd::avx512_enabled() {
                let mut wide = vec![0f32; e];
                // SAFETY: AVX-512 is available (checked); the row is all of `rows`.
                assert!(unsafe { crate::simd::avx512::softmax_row(rows, 0, &mut wide) });
                assert_eq!(bits(&portable), bits(&wide), "AVX-512, E = {e}");
            }
            let half: Vec<half::f16> = row.iter().map(|&v| half::f16::from_f32(v)).collect();
            assert!(softmax_row(&half, &mut portable) && softmax_row_on(&half, &mut simd, true));
            assert_eq!(portable, simd);
            let mut bad = row.clone();
            bad[e / 2] = f32::NEG_INFINITY;
            assert!(!softmax_row(&bad, &mut portable) && !softmax_row_on(&bad, &mut simd, true));
            // Nine rows through softmax_rows: a group of eight in the multi-row kernel (with
            // masked last blocks where E is not a multiple of sixteen), then one row.
            let many: Vec<f32> = (0..9).flat_map(|r| tricky_logits(e, seed * 10 + r)).collect();
            let mut expected = vec![0f32; 9 * e];
            for (row, out) in many.chunks_exact(e).zip(expected.chunks_exact_mut(e)) {
                assert!(softmax_row(row, out));
            }
            let mut got = vec![0f32; 9 * e];
            assert_eq!(softmax_rows(&many, e, &mut got, true), None, "E = {e}");
            assert_eq!(bits(&expected), bits(&got), "nine rows, E = {e}");
            let mut bad_rows = many.clone();
            bad_rows[3 * e + e / 2] = f32::NAN;
            assert_eq!(softmax_rows(&bad_rows, e, &mut got, true), Some(3), "E = {e}");
        }
    }
}
