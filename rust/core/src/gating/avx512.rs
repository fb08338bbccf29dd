//! AVX-512 candidate collection for top-k selection on the logits (see
//! [`super::avx2::select_on_logits`], which ranks what this collects). Sixteen lanes per
//! instruction, comparisons straight into mask registers, and candidate positions packed
//! with byte compression: about a third of the instructions of the AVX2 collection, which
//! bounds the speed of top-k over many experts once the logits stream from memory.
//! Selection is exact either way, so both collections give the same experts.

use crate::simd::avx512::Source16;
use std::arch::x86_64::*;

/// Writes the candidates of row `src[start .. start + len]` to `index`: the experts whose
/// value is at or above a lower bound of the row's k-th largest value, in expert order.
/// Returns how many, or `None` if the row holds NaN or an infinity.
///
/// 1. One streaming pass takes the sixteen lane maxima (over four independent chains) and
///    a sum of the row; the k-th largest lane maximum bounds the k-th largest value from
///    below (k lanes hold a value at least that large). A finite sum proves every value
///    finite; otherwise (a non-finite value, or an overflow of finite ones) each value is
///    checked.
/// 2. A second pass, from L1, compares sixteen values at a time with the bound into mask
///    registers, joins four masks into 64 bits and compresses the byte positions of the
///    set bits, which widen to expert indices.
///
/// # Safety
/// The CPU features of [`crate::simd::avx512_enabled`] are available; the row lies inside
/// `src`; `len >= 32`; `1 <= k <= 16`; `index` holds at least `len + 64` values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn collect<S: Source16>(
    src: S,
    start: usize,
    len: usize,
    k: usize,
    index: &mut [u32],
) -> Option<usize> {
    debug_assert!(len >= 32 && (1..=16).contains(&k) && index.len() >= len + 64);
    // SAFETY: forwarded from the caller.
    unsafe {
        let bound = bound(src, start, len, k)?;
        Some(candidates(src, start, len, bound, index))
    }
}

/// [`collect`] of two rows: the first passes of both, then the second passes of both, so
/// that the two rows' chains of dependent operations overlap.
///
/// # Safety
/// As [`collect`], for both rows and both index buffers.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn collect_pair<S: Source16>(
    src: S,
    starts: [usize; 2],
    len: usize,
    k: usize,
    index: [&mut [u32]; 2],
) -> [Option<usize>; 2] {
    debug_assert!(len >= 32 && (1..=16).contains(&k) && index.iter().all(|i| i.len() >= len + 64));
    // SAFETY: forwarded from the caller.
    #[allow(clippy::manual_map)]
    unsafe {
        let bounds = [bound(src, starts[0], len, k), bound(src, starts[1], len, k)];
        // (Matches rather than `Option::map`: a closure handed to a function compiled
        // without these target features would turn the intrinsics into calls.)
        let [first, second] = index;
        let first = match bounds[0] {
            Some(b) => Some(candidates(src, starts[0], len, b, first)),
            None => None,
        };
        let second = match bounds[1] {
            Some(b) => Some(candidates(src, starts[1], len, b, second)),
            None => None,
        };
        [first, second]
    }
}

/// Step 1 of [`collect`]: the bound, or `None` if the row holds NaN or an infinity.
#[inline(always)]
unsafe fn bound<S: Source16>(src: S, start: usize, len: usize, k: usize) -> Option<f32> {
    let vectors = len / 16;
    let rest = len % 16;
    // SAFETY: whole loads read 16 values at start + 16v with v < vectors (inside the row);
    // masked loads read the `rest` values after them.
    unsafe {
        let minus_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut maxima = [minus_inf; 4];
        let mut sums = [_mm512_setzero_ps(); 2];
        let quads = vectors / 4 * 4;
        for v in (0..quads).step_by(4) {
            for (r, m) in maxima.iter_mut().enumerate() {
                let x = src.load16(start + 16 * (v + r));
                sums[r % 2] = _mm512_add_ps(sums[r % 2], x);
                *m = _mm512_max_ps(*m, x);
            }
        }
        // The last vectors, with constant indices so that the arrays stay in registers.
        macro_rules! absorb {
            ($r:literal) => {
                if quads + $r < vectors {
                    let x = src.load16(start + 16 * (quads + $r));
                    sums[$r % 2] = _mm512_add_ps(sums[$r % 2], x);
                    maxima[$r] = _mm512_max_ps(maxima[$r], x);
                }
            };
        }
        absorb!(0);
        absorb!(1);
        absorb!(2);
        let tail_mask: __mmask16 = (1u16 << rest).wrapping_sub(1);
        if rest > 0 {
            let x = src.load16_masked(start + 16 * vectors, tail_mask, minus_inf);
            sums[1] = _mm512_mask_add_ps(sums[1], tail_mask, sums[1], x);
            maxima[3] = _mm512_max_ps(maxima[3], x);
        }
        // QNaN, +inf, -inf, SNaN.
        let sum = _mm512_add_ps(sums[0], sums[1]);
        if _mm512_fpclass_ps_mask::<0x99>(sum) != 0 && !(0..len).all(|i| src.load1(start + i).is_finite()) {
            return None;
        }
        let lanes = _mm512_max_ps(_mm512_max_ps(maxima[0], maxima[2]), _mm512_max_ps(maxima[1], maxima[3]));
        Some(kth_largest(lanes, k))
    }
}

/// Step 2 of [`collect`]: writes the experts at or above `bound` to `index`, in order, and
/// returns how many.
#[inline(always)]
unsafe fn candidates<S: Source16>(src: S, start: usize, len: usize, bound: f32, index: &mut [u32]) -> usize {
    let vectors = len / 16;
    let rest = len % 16;
    let tail_mask: __mmask16 = (1u16 << rest).wrapping_sub(1);
    // SAFETY: loads inside the row as in `bound`; `append` writes at most 64 indices from
    // n <= len, inside `index` (len + 64 values).
    unsafe {
        let minus_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let bound = _mm512_set1_ps(bound);
        let positions = _mm512_set_epi8(
            63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40,
            39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
            15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
        );
        let index = index.as_mut_ptr();
        let mut n = 0;
        let words = len / 64;
        for w in 0..words {
            let at = start + 64 * w;
            let bits = mask(bound, src.load16(at))
                | mask(bound, src.load16(at + 16)) << 16
                | mask(bound, src.load16(at + 32)) << 32
                | mask(bound, src.load16(at + 48)) << 48;
            n = append(index, positions, bits, 64 * w, n);
        }
        if !len.is_multiple_of(64) {
            let mut bits = 0;
            for v in 4 * words..vectors {
                bits |= mask(bound, src.load16(start + 16 * v)) << (16 * (v - 4 * words));
            }
            if rest > 0 {
                // -inf fill never reaches the finite bound.
                let x = src.load16_masked(start + 16 * vectors, tail_mask, minus_inf);
                bits |= mask(bound, x) << (16 * (vectors - 4 * words));
            }
            n = append(index, positions, bits, 64 * words, n);
        }
        n
    }
}

/// Ranks up to sixteen candidates (`index[..n]`, experts of the row at `start`, in expert
/// order) and writes the best k, best first, to `chosen[..k]`: higher value first, then
/// lower expert. The keys are read from the row (in L1) into one register: a buffer of
/// keys just written with scalar stores would stall the vector loads on store forwarding.
///
/// # Safety
/// AVX-512 is available; `k <= n <= 16`; `index` holds at least n values, and every
/// `start + index[c]` (c < n) lies inside `src`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn choose<S: Source16>(
    src: S,
    start: usize,
    index: &[u32],
    n: usize,
    k: usize,
    chosen: &mut [u32; 16],
) {
    debug_assert!(k <= n && n <= 16 && index.len() >= n);
    // SAFETY: register operations, reads of index[..n] and of the row (caller), and local
    // arrays.
    unsafe {
        // Whole groups of four, eight or sixteen candidates, so that the loop trip counts
        // are predictable; the padding lanes hold -inf, which beats nobody and ranks last.
        let lanes = if n <= 4 {
            4
        } else if n <= 8 {
            8
        } else {
            16
        };
        let mut keys = _mm512_set1_ps(f32::NEG_INFINITY);
        for (c, &id) in index[..n].iter().enumerate() {
            keys = _mm512_mask_mov_ps(keys, 1 << c, _mm512_set1_ps(src.load1(start + id as usize)));
        }
        let mut values = [0f32; 16];
        _mm512_storeu_ps(values.as_mut_ptr(), keys);
        // rank[i]: candidates with a greater key, or an equal key and a lower expert.
        let (mut rank, one) = (_mm512_setzero_si512(), _mm512_set1_epi32(1));
        for (c, &value) in values[..lanes].iter().enumerate() {
            let other = _mm512_set1_ps(value);
            let later = !((2u16 << c).wrapping_sub(1));
            let beaten = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(other, keys)
                | (_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(other, keys) & later);
            rank = _mm512_mask_add_epi32(rank, beaten, rank, one);
        }
        // Ranks are distinct, and the k best are real candidates (k <= n).
        for (r, slot) in chosen[..k].iter_mut().enumerate() {
            let lane = _mm512_cmpeq_epi32_mask(rank, _mm512_set1_epi32(r as i32)).trailing_zeros();
            *slot = *index.get_unchecked(lane as usize);
        }
    }
}

/// Bit i set where lane i of `x` is at or above `bound`.
#[inline(always)]
unsafe fn mask(bound: __m512, x: __m512) -> u64 {
    // SAFETY: a register-only AVX-512 comparison (caller's features).
    u64::from(unsafe { _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, bound) })
}

/// Writes the experts `base + b` for the set bits b of `bits` to `index[n..]`, in order,
/// and returns n plus their number. `positions` holds the bytes 0 to 63.
///
/// # Safety
/// AVX-512 with VBMI2 is available; `index[n .. n + 64]` is writable.
#[inline(always)]
unsafe fn append(index: *mut u32, positions: __m512i, bits: u64, base: usize, n: usize) -> usize {
    // SAFETY: register operations and stores inside index[n .. n + 64] (caller).
    unsafe {
        let packed = _mm512_maskz_compress_epi8(bits, positions);
        let count = bits.count_ones() as usize;
        let base = _mm512_set1_epi32(base as i32);
        let experts = _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(packed)), base);
        _mm512_storeu_si512(index.add(n).cast(), experts);
        if count > 16 {
            // Many values tie at the bound: rare, and predictable when it happens.
            store_widened(index.add(n + 16), _mm512_extracti32x4_epi32::<1>(packed), base);
            store_widened(index.add(n + 32), _mm512_extracti32x4_epi32::<2>(packed), base);
            store_widened(index.add(n + 48), _mm512_extracti32x4_epi32::<3>(packed), base);
        }
        n + count
    }
}

/// Stores the sixteen bytes of `bytes`, widened to u32 and plus `first`, at `index`.
///
/// # Safety
/// AVX-512 is available; `index[..16]` is writable.
#[inline(always)]
unsafe fn store_widened(index: *mut u32, bytes: __m128i, first: __m512i) {
    // SAFETY: a 64-byte store inside index[..16] (caller).
    unsafe { _mm512_storeu_si512(index.cast(), _mm512_add_epi32(_mm512_cvtepu8_epi32(bytes), first)) }
}

/// The k-th largest (1 <= k <= 16) of the sixteen finite lanes of `lanes`. k = 1 and 2 (the
/// most common routing) take a two-slot tournament, a quarter of the latency of sorting.
#[inline(always)]
unsafe fn kth_largest(lanes: __m512, k: usize) -> f32 {
    // SAFETY: register-only AVX-512 operations (caller's features).
    unsafe {
        if k > 2 {
            let high = _mm512_extractf32x8_ps::<1>(lanes);
            return super::avx2::kth_largest16(_mm512_castps512_ps256(lanes), high, k);
        }
        // Each lane holds the best two of a growing set of lanes: merging two sorted pairs
        // (a1 >= a2, b1 >= b2) keeps max(a1, b1) and max(min(a1, b1), a2, b2).
        let (mut first, mut second) = (lanes, _mm512_set1_ps(f32::NEG_INFINITY));
        macro_rules! merge_with_partner {
            ($v:ident => $partner:expr) => {{
                let (other_first, other_second) = (
                    {
                        let $v = first;
                        $partner
                    },
                    {
                        let $v = second;
                        $partner
                    },
                );
                second =
                    _mm512_max_ps(_mm512_min_ps(first, other_first), _mm512_max_ps(second, other_second));
                first = _mm512_max_ps(first, other_first);
            }};
        }
        merge_with_partner!(v => _mm512_shuffle_f32x4::<0b0100_1110>(v, v));
        merge_with_partner!(v => _mm512_shuffle_f32x4::<0b1011_0001>(v, v));
        merge_with_partner!(v => _mm512_permute_ps::<0b0100_1110>(v));
        merge_with_partner!(v => _mm512_permute_ps::<0b1011_0001>(v));
        _mm512_cvtss_f32(if k == 1 { first } else { second })
    }
}
