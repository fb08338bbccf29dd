//! AVX2 versions of the gating hot loops, chosen at run time (see [`crate::simd`]). They
//! are exact replacements: selection is exact by construction, and the weights go through
//! the same IEEE operations in the same order as [`super::lane_weights`] ([`exp8_nonpositive`]
//! is `fast_exp_f32` lane by lane), so results are bitwise identical whichever path runs. The
//! tests compare both paths.

use super::{GatingConfig, ScoreFunction, TopK};
use crate::element::{Accumulator, Storage};
use crate::simd::avx2::{block_maxima, exp8_nonpositive, finite_lanes, one_plus_exp8, with_source, Source};
use crate::simd::avx512::Source16;
use std::arch::x86_64::*;

/// Logits as these kernels read them, when the AVX2 kernels may run on them.
pub(super) fn rows(storage: Option<Storage<'_>>) -> Option<Storage<'_>> {
    storage.filter(|_| crate::simd::avx2_enabled())
}

// ---- token-parallel routing: eight tokens, one per lane --------------------------------

/// [`super::route_lanes`] for eight tokens: the rows `first_row .. first_row + 8` of
/// `rows` ([T, E]), writing `weights` and `experts` ([8, k]). `scratch` holds at least
/// `8 * E` values (16-bit logits are widened into it first). Returns the mask of
/// lanes holding a NaN or an infinity (their outputs are then meaningless).
///
/// # Safety
/// AVX2 (and F16C for float16) is available; `rows` holds the eight rows; `1 <= k <= 8`.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn route_lanes(
    rows: Storage<'_>,
    first_row: usize,
    cfg: &GatingConfig,
    scratch: &mut [f32],
    weights: &mut [f32],
    experts: &mut [i64],
) -> u32 {
    // SAFETY: forwarded from the caller; `K` matches `cfg.k`.
    unsafe {
        with_source!(rows, |src| match cfg.k {
            1 => route_lanes_k::<_, 1>(src, first_row, cfg, scratch, weights, experts),
            2 => route_lanes_k::<_, 2>(src, first_row, cfg, scratch, weights, experts),
            3 => route_lanes_k::<_, 3>(src, first_row, cfg, scratch, weights, experts),
            4 => route_lanes_k::<_, 4>(src, first_row, cfg, scratch, weights, experts),
            5 => route_lanes_k::<_, 5>(src, first_row, cfg, scratch, weights, experts),
            6 => route_lanes_k::<_, 6>(src, first_row, cfg, scratch, weights, experts),
            7 => route_lanes_k::<_, 7>(src, first_row, cfg, scratch, weights, experts),
            8 => route_lanes_k::<_, 8>(src, first_row, cfg, scratch, weights, experts),
            k => unreachable!("route_lanes called with k = {k}"),
        })
    }
}

/// The eight rows from `first_row` as row-major f32: the logits themselves, or 16-bit ones
/// widened into `scratch` (at least `8 * e` values).
///
/// # Safety
/// The rows exist; the CPU features of [`crate::simd::avx2_enabled`] are available.
#[inline(always)]
unsafe fn eight_rows<'a, S: Source>(
    src: &'a S,
    first_row: usize,
    e: usize,
    scratch: &'a mut [f32],
) -> &'a [f32] {
    let (start, n) = (first_row * e, 8 * e);
    if let Some(rows) = src.as_f32() {
        return &rows[start..start + n];
    }
    let whole = n / 8 * 8;
    for at in (0..whole).step_by(8) {
        // SAFETY: at + 8 <= n values from `start`, inside the eight rows; at + 8 <= n
        // inside `scratch`.
        unsafe { _mm256_storeu_ps(scratch.as_mut_ptr().add(at), src.load8(start + at)) };
    }
    for (at, out) in scratch[..n].iter_mut().enumerate().skip(whole) {
        *out = src.load1(start + at);
    }
    &scratch[..n]
}

/// Column `x` of eight row-major rows of `e` values: `block[lane * e + x]` in lane `lane`.
///
/// # Safety
/// AVX2 is available; `block` holds eight rows of `e` values and `x < e`.
#[inline(always)]
unsafe fn column(block: &[f32], e: usize, x: usize) -> __m256 {
    debug_assert!(block.len() >= 8 * e && x < e);
    // SAFETY: lane * e + x < 8 * e <= block.len() for every lane.
    unsafe {
        let stride =
            _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(e as i32));
        _mm256_i32gather_ps::<4>(block.as_ptr().add(x), stride)
    }
}

#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
unsafe fn route_lanes_k<S: Source, const K: usize>(
    src: S,
    first_row: usize,
    cfg: &GatingConfig,
    scratch: &mut [f32],
    weights: &mut [f32],
    experts: &mut [i64],
) -> u32 {
    let e = cfg.num_experts;
    // SAFETY: the caller guarantees the features and the eight rows; every column read
    // has x < e.
    unsafe {
        let block = eight_rows(&src, first_row, e, scratch);
        let mut keys = [_mm256_set1_ps(f32::NEG_INFINITY); K];
        let mut index = [_mm256_setzero_ps(); K];
        let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for x in 0..e {
            let v = column(block, e, x);
            let id = _mm256_castsi256_ps(_mm256_set1_epi32(x as i32));
            finite = _mm256_and_ps(finite, finite_lanes(v));
            // The branch-free insertion of `super::route_lanes`: slot p takes the slot above
            // when v beats it, else v when v beats slot p, else keeps its own.
            for p in (1..K).rev() {
                let shift = _mm256_cmp_ps::<_CMP_GT_OQ>(v, keys[p - 1]);
                let lands = _mm256_cmp_ps::<_CMP_GT_OQ>(v, keys[p]);
                keys[p] = _mm256_blendv_ps(_mm256_blendv_ps(keys[p], v, lands), keys[p - 1], shift);
                index[p] = _mm256_blendv_ps(_mm256_blendv_ps(index[p], id, lands), index[p - 1], shift);
            }
            let lands = _mm256_cmp_ps::<_CMP_GT_OQ>(v, keys[0]);
            keys[0] = _mm256_blendv_ps(keys[0], v, lands);
            index[0] = _mm256_blendv_ps(index[0], id, lands);
        }
        let bad = !(_mm256_movemask_ps(finite) as u32) & 0xff;
        if bad != 0 {
            return bad;
        }
        let out = lane_weights(&keys, e, |x| column(block, e, x), cfg);
        write_lanes(&out, &index, weights, experts);
        0
    }
}

/// Writes eight tokens' weights and experts ([8, K] each) from slot-major lanes.
#[inline(always)]
unsafe fn write_lanes<const K: usize>(
    out: &[__m256; K],
    index: &[__m256; K],
    weights: &mut [f32],
    experts: &mut [i64],
) {
    let mut w = [[0f32; 8]; K];
    let mut ids = [[0i32; 8]; K];
    for p in 0..K {
        // SAFETY: stores into local arrays of eight lanes.
        unsafe {
            _mm256_storeu_ps(w[p].as_mut_ptr(), out[p]);
            _mm256_storeu_si256(ids[p].as_mut_ptr().cast(), _mm256_castps_si256(index[p]));
        }
    }
    for lane in 0..8 {
        for p in 0..K {
            experts[lane * K + p] = i64::from(ids[p][lane]);
            weights[lane * K + p] = w[p][lane];
        }
    }
}

/// Eight tokens of at least 32 experts each, `k <= 8`: each token's experts come from
/// [`select_on_logits`], then the weights of all eight are computed at once, one token per
/// lane, so that the exponentials of different tokens overlap instead of waiting on each
/// other. Writes `weights` and `experts` ([8, k]); returns the mask of tokens holding a NaN
/// or an infinity.
///
/// # Safety
/// As [`select_on_logits`] for each of the rows `first_row .. first_row + 8`; `1 <= k <= 8`;
/// `scratch` holds at least `8 * E` values.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn route_rows(
    rows: Storage<'_>,
    first_row: usize,
    cfg: &GatingConfig,
    candidates: &mut Candidates,
    scratch: &mut [f32],
    weights: &mut [f32],
    experts: &mut [i64],
) -> u32 {
    // SAFETY: forwarded from the caller; `K` matches `cfg.k`.
    unsafe {
        with_source!(rows, |src| match cfg.k {
            1 => route_rows_k::<_, 1>(src, first_row, cfg, candidates, scratch, weights, experts),
            2 => route_rows_k::<_, 2>(src, first_row, cfg, candidates, scratch, weights, experts),
            3 => route_rows_k::<_, 3>(src, first_row, cfg, candidates, scratch, weights, experts),
            4 => route_rows_k::<_, 4>(src, first_row, cfg, candidates, scratch, weights, experts),
            5 => route_rows_k::<_, 5>(src, first_row, cfg, candidates, scratch, weights, experts),
            6 => route_rows_k::<_, 6>(src, first_row, cfg, candidates, scratch, weights, experts),
            7 => route_rows_k::<_, 7>(src, first_row, cfg, candidates, scratch, weights, experts),
            8 => route_rows_k::<_, 8>(src, first_row, cfg, candidates, scratch, weights, experts),
            k => unreachable!("route_rows called with k = {k}"),
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
unsafe fn route_rows_k<S: Source16, const K: usize>(
    src: S,
    first_row: usize,
    cfg: &GatingConfig,
    candidates: &mut Candidates,
    scratch: &mut [f32],
    weights: &mut [f32],
    experts: &mut [i64],
) -> u32 {
    let e = cfg.num_experts;
    let mut keys = [[0f32; 8]; K];
    let mut index = [[0i32; 8]; K];
    let mut bad = 0;
    // Two rows at a time: with AVX-512 their selections run together, so that their chains
    // of dependent operations overlap; the two rows after them are fetched meanwhile (the
    // selection is short enough that waiting on memory shows).
    for lane in (0..8).step_by(2) {
        let starts = [(first_row + lane) * e, (first_row + lane + 1) * e];
        src.prefetch(starts[0] + 2 * e, 2 * e);
        let mut chosen = [[0u32; 16]; 2];
        // SAFETY: forwarded from the caller.
        let selected = unsafe {
            if candidates.avx512 {
                select_pair::<S>(src, starts, e, K, candidates, &mut chosen)
            } else {
                let [first, second] = &mut chosen;
                [
                    select::<S>(src, starts[0], e, K, candidates, first),
                    select::<S>(src, starts[1], e, K, candidates, second),
                ]
            }
        };
        for (j, (ok, chosen)) in selected.into_iter().zip(&chosen).enumerate() {
            if !ok {
                bad |= 1 << (lane + j);
                continue;
            }
            for p in 0..K {
                keys[p][lane + j] = src.load1(starts[j] + chosen[p] as usize);
                index[p][lane + j] = chosen[p] as i32;
            }
        }
    }
    if bad != 0 {
        return bad;
    }
    // SAFETY: loads from local arrays of eight lanes; the column reads stay inside the
    // eight rows (see `column`), and only unnormalised softmax makes them.
    unsafe {
        let keys: [__m256; K] = std::array::from_fn(|p| _mm256_loadu_ps(keys[p].as_ptr()));
        let index: [__m256; K] = std::array::from_fn(|p| _mm256_loadu_ps(index[p].as_ptr().cast()));
        let whole_row = cfg.score == ScoreFunction::Softmax && !cfg.normalize;
        let block: &[f32] = if whole_row { eight_rows(&src, first_row, e, scratch) } else { &[] };
        let out = lane_weights(&keys, e, |x| column(block, e, x), cfg);
        write_lanes(&out, &index, weights, experts);
    }
    0
}

/// [`super::lane_weights`] with eight f32 lanes: the same arithmetic, lane by lane. The
/// sums over the chosen experts run one after another: with at most eight of them
/// (`SIMD_LANE_MAX_K`) that is the portable kernel's eight-lane sum, bit for bit.
#[inline(always)]
unsafe fn lane_weights<const K: usize>(
    chosen: &[__m256; K],
    num_experts: usize,
    column: impl Fn(usize) -> __m256,
    cfg: &GatingConfig,
) -> [__m256; K] {
    const { assert!(K <= super::SIMD_LANE_MAX_K && super::SIMD_LANE_MAX_K <= 8) };
    // SAFETY: register-only AVX2 operations (and `column`, which the caller vouches for).
    unsafe {
        let scale = _mm256_set1_ps(f32::from_f64(cfg.scale));
        let mut out = [_mm256_setzero_ps(); K];
        // `if v > m { v } else { m }` is exactly maxps(v, m), ties and signed zeros included.
        match (cfg.score, cfg.normalize) {
            (ScoreFunction::Softmax, true) => {
                let m = chosen.iter().fold(_mm256_set1_ps(f32::NEG_INFINITY), |m, &c| _mm256_max_ps(c, m));
                let mut total = _mm256_setzero_ps();
                for (o, &c) in out.iter_mut().zip(chosen) {
                    *o = exp8_nonpositive(_mm256_sub_ps(c, m));
                    total = _mm256_add_ps(total, *o);
                }
                for o in out.iter_mut() {
                    *o = _mm256_mul_ps(_mm256_div_ps(*o, total), scale);
                }
            }
            (ScoreFunction::Softmax, false) => {
                let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
                for x in 0..num_experts {
                    m = _mm256_max_ps(column(x), m);
                }
                // Eight sums per token, expert x into sum x % 8, added in order at the end.
                let mut sums = [_mm256_setzero_ps(); 8];
                for x in 0..num_experts {
                    sums[x % 8] = _mm256_add_ps(sums[x % 8], exp8_nonpositive(_mm256_sub_ps(column(x), m)));
                }
                let z = sums.iter().fold(_mm256_setzero_ps(), |z, &s| _mm256_add_ps(z, s));
                for (o, &c) in out.iter_mut().zip(chosen) {
                    *o = _mm256_mul_ps(_mm256_div_ps(exp8_nonpositive(_mm256_sub_ps(c, m)), z), scale);
                }
            }
            (ScoreFunction::Sigmoid, normalize) => {
                let one = _mm256_set1_ps(1.0);
                let mut total = _mm256_setzero_ps();
                for (o, &c) in out.iter_mut().zip(chosen) {
                    let minus = _mm256_xor_ps(c, _mm256_set1_ps(-0.0));
                    *o = _mm256_div_ps(one, one_plus_exp8(minus));
                    total = _mm256_add_ps(total, *o);
                }
                let denominator = _mm256_add_ps(total, _mm256_set1_ps(f32::SIGMOID_NORM_EPS));
                for o in out.iter_mut() {
                    if normalize {
                        *o = _mm256_div_ps(*o, denominator);
                    }
                    *o = _mm256_mul_ps(*o, scale);
                }
            }
        }
        out
    }
}

// ---- per-token selection on the logits: bound, filter, rank ------------------------------

/// Lanes of the compress table entry for an 8-bit mask: the set lanes' positions in order.
const fn compress_table() -> [[u32; 8]; 256] {
    let mut table = [[0u32; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut lane, mut n) = (0, 0);
        while lane < 8 {
            if mask >> lane & 1 == 1 {
                table[mask][n] = lane as u32;
                n += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
}

static COMPRESS: [[u32; 8]; 256] = compress_table();

/// Candidates up to which the final selection ranks them pairwise (above that, which only
/// rows with many equal logits reach, they go through the insertion of [`TopK`]).
const RANK_MAX: usize = 32;

/// Working memory of [`select_on_logits`]: candidate buffers sized for a whole row.
pub(super) struct Candidates {
    keys: Vec<f32>,
    index: Vec<u32>,
    /// The second row's candidates when two rows are collected together.
    second_index: Vec<u32>,
    top: TopK<f32>,
    /// Collect with [`super::avx512::collect`] (the caller checked the CPU features).
    avx512: bool,
}

impl Candidates {
    /// Buffers for rows of `num_experts`; `avx512` collects candidates with the AVX-512
    /// kernel, which the caller must have checked ([`crate::simd::avx512_enabled`]).
    pub(super) fn new(num_experts: usize, k: usize, avx512: bool) -> Self {
        // Room for the last compressed stores (8 lanes, or 64 with AVX-512) or the -inf
        // padding (24 lanes).
        let room = num_experts + 64;
        let second_index = if avx512 { vec![0; room] } else { Vec::new() };
        Candidates { keys: vec![0.0; room], index: vec![0; room], second_index, top: TopK::new(k), avx512 }
    }
}

/// One compare-exchange stage of a bitonic network on eight lanes: lane i meets lane
/// `i ^ J` and keeps the larger value where bit i of `MAX_LANES` is set, else the smaller.
#[inline(always)]
unsafe fn exchange<const J: i32, const MAX_LANES: i32>(v: __m256) -> __m256 {
    // SAFETY: register-only AVX operations.
    unsafe {
        let partner = match J {
            1 => _mm256_permute_ps::<0b1011_0001>(v),
            2 => _mm256_permute_ps::<0b0100_1110>(v),
            _ => _mm256_permute2f128_ps::<0x01>(v, v),
        };
        _mm256_blend_ps::<MAX_LANES>(_mm256_min_ps(v, partner), _mm256_max_ps(v, partner))
    }
}

/// Sorts the eight lanes of a bitonic sequence descending (the last merge of the network).
#[inline(always)]
unsafe fn merge_descending(v: __m256) -> __m256 {
    // SAFETY: register-only AVX operations.
    unsafe { exchange::<1, 0b0101_0101>(exchange::<2, 0b0011_0011>(exchange::<4, 0b0000_1111>(v))) }
}

/// Sorts eight finite lanes descending (bitonic network).
#[inline(always)]
unsafe fn sort_descending(v: __m256) -> __m256 {
    // SAFETY: register-only AVX operations.
    unsafe {
        let v = exchange::<1, 0b1001_1001>(v);
        let v = exchange::<1, 0b1010_0101>(exchange::<2, 0b1100_0011>(v));
        merge_descending(v)
    }
}

/// The k-th largest (1 <= k <= 16) of the sixteen finite lanes of `a` and `b`.
#[inline(always)]
pub(super) unsafe fn kth_largest16(a: __m256, b: __m256, k: usize) -> f32 {
    // SAFETY: register-only AVX2 operations and an in-bounds stack store.
    unsafe {
        let a = sort_descending(a);
        let b = sort_descending(b);
        // a descending against b reversed: lane-wise max holds the eight largest of the
        // sixteen, lane-wise min the eight smallest, each a bitonic sequence.
        let reversed = _mm256_permutevar8x32_ps(b, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0));
        let (half, rank) =
            if k <= 8 { (_mm256_max_ps(a, reversed), k - 1) } else { (_mm256_min_ps(a, reversed), k - 9) };
        let mut sorted = [0f32; 8];
        _mm256_storeu_ps(sorted.as_mut_ptr(), merge_descending(half));
        sorted[rank]
    }
}

/// Sigmoid selection keys of one row, eight experts at a time: `keys[e] = 1 / (1 +
/// fast_exp(-logits[e]))`, plus `bias[e]` when given. The portable kernel's operations in
/// the same order (`one_plus_exp8` is `1 + fast_exp` lane by lane), so the same bits.
///
/// # Safety
/// AVX2 is available; `keys`, `logits` and `bias` (when given) have the same length.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn sigmoid_keys(logits: &[f32], bias: Option<&[f32]>, keys: &mut [f32]) {
    let whole = logits.len() / 8 * 8;
    // SAFETY: every load and store covers 8 values at i < whole <= len of each slice.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        for i in (0..whole).step_by(8) {
            let x = _mm256_loadu_ps(logits.as_ptr().add(i));
            let mut key = _mm256_div_ps(one, one_plus_exp8(_mm256_xor_ps(x, sign)));
            if let Some(bias) = bias {
                key = _mm256_add_ps(key, _mm256_loadu_ps(bias.as_ptr().add(i)));
            }
            _mm256_storeu_ps(keys.as_mut_ptr().add(i), key);
        }
    }
    for i in whole..logits.len() {
        let key = 1.0 / (1.0 + crate::element::fast_exp_f32(-logits[i]));
        keys[i] = bias.map_or(key, |bias| key + bias[i]);
    }
}

/// [`super::group_score`] of each group of `group_size` keys with one or two keys per score
/// (`two`): each lane keeps the two best of its share of a group (max and min, no
/// branches), then three exchanges between lanes merge the lanes' pairs (the best of two
/// pairs, and the best of the rest). The same values, added in the same order, so the same
/// bits.
///
/// # Safety
/// AVX2 is available; `group_size` is a multiple of 8 and `out` holds `keys.len() /
/// group_size` values.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn group_scores(keys: &[f32], group_size: usize, two: bool, out: &mut [f32]) {
    /// Merges each lane's (best, second) with that of the lane `swap` puts there.
    #[inline(always)]
    unsafe fn merge(best: __m256, second: __m256, swap: impl Fn(__m256) -> __m256) -> (__m256, __m256) {
        let (other_best, other_second) = (swap(best), swap(second));
        // SAFETY: register-only AVX operations.
        unsafe {
            let second = _mm256_max_ps(_mm256_max_ps(second, other_second), _mm256_min_ps(best, other_best));
            (_mm256_max_ps(best, other_best), second)
        }
    }
    for (group, score) in keys.chunks_exact(group_size).zip(out.iter_mut()) {
        // SAFETY: each load reads one whole block of eight keys; the rest is register-only.
        let (best, second) = unsafe {
            let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut second = best;
            for block in group.chunks_exact(8) {
                let x = _mm256_loadu_ps(block.as_ptr());
                second = _mm256_max_ps(second, _mm256_min_ps(best, x));
                best = _mm256_max_ps(best, x);
            }
            let (best, second) = merge(best, second, |v| _mm256_permute2f128_ps::<0x01>(v, v));
            let (best, second) = merge(best, second, |v| _mm256_permute_ps::<0x4e>(v));
            let (best, second) = merge(best, second, |v| _mm256_permute_ps::<0xb1>(v));
            (_mm256_cvtss_f32(best), _mm256_cvtss_f32(second))
        };
        let sum = 0.0 + best;
        *score = if two { sum + second } else { sum };
    }
}

/// [`super::select_on_logits`] for one row of at least 32 experts and `k <= 16`: the row
/// `rows[start .. start + len]`, writing the chosen experts, best first, to `chosen[..k]`.
/// Returns false if the row holds NaN or an infinity.
///
/// Three steps, none with a data-dependent branch in the common case:
/// 1. the sixteen group maxima (lane x block parity), whose k-th largest bounds the row's
///    k-th largest key from below (the same bound as the portable kernel);
/// 2. every key at or above the bound is appended to a candidate list with a compressing
///    permutation (about k + 2 candidates for typical logits);
/// 3. each candidate's rank is the number of candidates before it in selection order
///    (higher key first, then lower index); ranks below k are the answer.
///
/// # Safety
/// AVX2 (and F16C for float16) is available; `start + len <= rows.len()`, `len >= 32`,
/// `1 <= k <= 16`, and `candidates` was made for at least `len` experts.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn select_on_logits(
    rows: Storage<'_>,
    start: usize,
    len: usize,
    k: usize,
    candidates: &mut Candidates,
    chosen: &mut [u32; 16],
) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe { with_source!(rows, |src| select(src, start, len, k, candidates, chosen)) }
}

/// The candidates of one row for [`select_on_logits`] (steps 1 and 2), keys to `keys` and
/// expert indices to `index`: how many, or `None` if the row holds NaN or an infinity.
///
/// # Safety
/// As [`select_on_logits`]; `keys` and `index` hold at least `len + 24` values.
#[inline(always)]
unsafe fn collect<S: Source>(
    src: S,
    start: usize,
    len: usize,
    k: usize,
    keys: &mut [f32],
    index: &mut [u32],
) -> Option<usize> {
    let blocks = len / 8;
    // SAFETY: every load8 reads start + 8b .. start + 8b + 8 with b < blocks, inside the
    // row; every candidate store writes at most 24 lanes from n <= len, inside the buffers
    // of len + 24.
    unsafe {
        // Maxima of sixteen disjoint groups of values: lane x the parity of the block's
        // chain in `block_maxima`.
        let (maxima, all_finite) = block_maxima::<_, true>(src, start, blocks);
        let even = _mm256_max_ps(maxima[0], maxima[2]);
        let odd = _mm256_max_ps(maxima[1], maxima[3]);
        let tail = (blocks * 8..len).map(|i| src.load1(start + i));
        if !all_finite || !tail.clone().all(f32::is_finite) {
            return None;
        }
        let bound = kth_largest16(even, odd, k);

        let keys = keys.as_mut_ptr();
        let index = index.as_mut_ptr();
        let bound8 = _mm256_set1_ps(bound);
        let mut n = 0;
        for b in 0..blocks {
            let v = src.load8(start + 8 * b);
            let mask = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(v, bound8)) as usize;
            let order = _mm256_loadu_si256(COMPRESS[mask].as_ptr().cast());
            _mm256_storeu_ps(keys.add(n), _mm256_permutevar8x32_ps(v, order));
            _mm256_storeu_si256(
                index.add(n).cast(),
                _mm256_add_epi32(order, _mm256_set1_epi32((8 * b) as i32)),
            );
            n += mask.count_ones() as usize;
        }
        for (i, key) in tail.enumerate() {
            if key >= bound {
                *keys.add(n) = key;
                *index.add(n) = (blocks * 8 + i) as u32;
                n += 1;
            }
        }
        Some(n)
    }
}

/// [`select`] of two rows with the AVX-512 collection ([`super::avx512::collect_pair`]);
/// a row with more than sixteen candidates, or with NaN or an infinity, goes through
/// [`select`] again on its own (rare: many logits tie at the bound).
///
/// # Safety
/// As [`select`], for both rows, with `candidates.avx512`.
#[inline(always)]
unsafe fn select_pair<S: Source16>(
    src: S,
    starts: [usize; 2],
    len: usize,
    k: usize,
    candidates: &mut Candidates,
    chosen: &mut [[u32; 16]; 2],
) -> [bool; 2] {
    // SAFETY: the buffers hold len + 64 values; the rest is forwarded from the caller.
    unsafe {
        let buffers = [&mut candidates.index[..], &mut candidates.second_index[..]];
        let collected = super::avx512::collect_pair(src, starts, len, k, buffers);
        let mut selected = [false; 2];
        for (j, (collected, chosen)) in collected.into_iter().zip(chosen.iter_mut()).enumerate() {
            selected[j] = match collected {
                Some(n) if n <= 16 => {
                    let index = if j == 0 { &candidates.index } else { &candidates.second_index };
                    super::avx512::choose(src, starts[j], index, n, k, chosen);
                    true
                }
                _ => select(src, starts[j], len, k, candidates, chosen),
            };
        }
        selected
    }
}

/// [`select_on_logits`] for one storage type.
#[inline(always)]
unsafe fn select<S: Source16>(
    src: S,
    start: usize,
    len: usize,
    k: usize,
    candidates: &mut Candidates,
    chosen: &mut [u32; 16],
) -> bool {
    // SAFETY: the buffers hold len + 64 values; the rest is forwarded from the caller,
    // including the AVX-512 features when `candidates.avx512`.
    let collected = unsafe {
        if candidates.avx512 {
            match super::avx512::collect(src, start, len, k, &mut candidates.index) {
                Some(n) if n <= 16 => {
                    super::avx512::choose(src, start, &candidates.index, n, k, chosen);
                    return true;
                }
                Some(n) => {
                    for (key, &c) in candidates.keys.iter_mut().zip(&candidates.index[..n]) {
                        *key = src.load1(start + c as usize);
                    }
                    Some(n)
                }
                None => None,
            }
        } else {
            collect(src, start, len, k, &mut candidates.keys, &mut candidates.index)
        }
    };
    let Some(n) = collected else { return false };
    let keys = candidates.keys.as_mut_ptr();
    let index = candidates.index.as_ptr();
    // SAFETY: the buffers hold len + 64 values and n <= len.
    unsafe {
        if n > RANK_MAX {
            // Many keys tie at the bound: insertion is linear in the candidates.
            let top = &mut candidates.top;
            top.reset(k);
            let mut threshold = top.threshold();
            for c in 0..n {
                let key = *keys.add(c);
                if key > threshold {
                    top.insert(key, *index.add(c) as usize);
                    threshold = top.threshold();
                }
            }
            for (slot, index) in chosen.iter_mut().zip(top.indices()) {
                *slot = index as u32;
            }
            return true;
        }
        // Pad to whole groups of eight with -inf, which outranks nobody.
        _mm256_storeu_ps(keys.add(n), _mm256_set1_ps(f32::NEG_INFINITY));
        _mm256_storeu_ps(keys.add(n + 8), _mm256_set1_ps(f32::NEG_INFINITY));
        _mm256_storeu_ps(keys.add(n + 16), _mm256_set1_ps(f32::NEG_INFINITY));
        // One slot past k takes the candidates that rank k or lower.
        let mut slots = [0u32; 17];
        match n {
            0..=8 => rank_candidates::<1>(keys, index, k, &mut slots),
            9..=16 => rank_candidates::<2>(keys, index, k, &mut slots),
            _ => rank_candidates::<4>(keys, index, k, &mut slots),
        }
        chosen[..k].copy_from_slice(&slots[..k]);
        true
    }
}

/// Places the candidates of `G` groups of eight (`keys` padded with -inf) by rank: the
/// number of greater keys plus the number of equal keys earlier in the list (lower expert
/// indices go first). `slots[rank]` takes the candidate's index, `slots[k]` every rank
/// from k on.
///
/// # Safety
/// `keys` and `index` hold `8 * G` values; AVX2, POPCNT available.
#[inline(always)]
unsafe fn rank_candidates<const G: usize>(
    keys: *const f32,
    index: *const u32,
    k: usize,
    slots: &mut [u32; 17],
) {
    // SAFETY: reads inside the 8 * G values (caller).
    unsafe {
        let held: [__m256; G] = std::array::from_fn(|g| _mm256_loadu_ps(keys.add(8 * g)));
        for (g, &group) in held.iter().enumerate() {
            for lane in 0..8 {
                let c = 8 * g + lane;
                let key = _mm256_permutevar8x32_ps(group, _mm256_set1_epi32(lane as i32));
                // Bit j: candidate j's key is greater than / equal to this one.
                let (mut above, mut equal) = (0u32, 0u32);
                for (h, &other) in held.iter().enumerate() {
                    above |= (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(other, key)) as u32) << (8 * h);
                    equal |= (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(other, key)) as u32) << (8 * h);
                }
                let earlier = ((1u64 << c) - 1) as u32;
                let rank = (above | (equal & earlier)).count_ones() as usize;
                slots[rank.min(k)] = *index.add(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kth_largest16_matches_sorting() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = crate::test_rng::TestRng::new(7);
        for round in 0..2000 {
            let values: [f32; 16] = std::array::from_fn(|_| {
                // Few distinct values in some rounds, so that ties occur.
                let r = rng.unit_f32();
                if round % 3 == 0 {
                    (r * 4.0).floor()
                } else {
                    r * 10.0 - 5.0
                }
            });
            let mut sorted = values;
            sorted.sort_by(|a, b| b.total_cmp(a));
            for k in 1..=16 {
                // SAFETY: AVX2 is available (checked above).
                let got = unsafe {
                    kth_largest16(
                        _mm256_loadu_ps(values.as_ptr()),
                        _mm256_loadu_ps(values.as_ptr().add(8)),
                        k,
                    )
                };
                assert_eq!(got, sorted[k - 1], "k = {k}, values {values:?}");
            }
        }
    }

    #[test]
    fn compress_table_lists_set_lanes_in_order() {
        assert_eq!(COMPRESS[0b1010_0110][..4], [1, 2, 5, 7]);
        assert_eq!(COMPRESS[0xff], [0, 1, 2, 3, 4, 5, 6, 7]);
    }
}
