//! AVX2 versions of the balancing kernels, chosen at run time (see [`crate::simd`]): the
//! same operations in the same order as the portable code of the parent module, eight
//! lanes at a time, so the same bits.

use crate::element::{fma_exp_f32, fma_ln_f32, Storage};
use crate::lanes::LANES;
use crate::simd::avx2::{exp8_fma, exp_shifted, ln8_fma, with_source, Source};
use crate::simd::avx512::{self, Source16};
use std::arch::x86_64::*;

/// One token of the z-loss: `(max, sum, fma_ln(sum))` of the row `rows[start .. start +
/// scratch.len()]`, `sum = sum_e fma_exp(l_e - max)` (the exponentials go to `scratch`).
/// Matches the portable kernel: the max over eight lanes, the exponentials summed in lane
/// `i % 8` and the lanes folded in order. NaN or `+inf` in the row make the sum, and so z,
/// NaN.
///
/// # Safety
/// The CPU features of [`crate::simd::avx2_enabled`] are available; the row lies inside `rows`.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_row(rows: Storage<'_>, start: usize, scratch: &mut [f32]) -> (f32, f32, f32) {
    // SAFETY: forwarded from the caller.
    unsafe { with_source!(rows, |src| z_loss_row_in::<_, false>(src, start, scratch)) }
}

/// [`z_loss_row`] with the exponentials sixteen at a time (the same bits).
///
/// # Safety
/// The CPU features of [`crate::simd::avx512_enabled`] are available; the row lies inside `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_row_avx512(
    rows: Storage<'_>,
    start: usize,
    scratch: &mut [f32],
) -> (f32, f32, f32) {
    // SAFETY: forwarded from the caller.
    unsafe { with_source!(rows, |src| z_loss_row_in::<_, true>(src, start, scratch)) }
}

/// `WIDE`: AVX-512 exponentials (only inside [`z_loss_row_avx512`]).
#[inline(always)]
unsafe fn z_loss_row_in<S: Source16, const WIDE: bool>(
    src: S,
    start: usize,
    scratch: &mut [f32],
) -> (f32, f32, f32) {
    // SAFETY: forwarded from the caller (with WIDE, AVX-512 is available). Without the
    // finiteness check, the row always yields a maximum and a sum.
    let (m, sum) = unsafe {
        if WIDE {
            avx512::exp_shifted::<_, false, true>(src, start, scratch)
        } else {
            exp_shifted::<_, false, true>(src, start, scratch)
        }
    }
    .unwrap_or((f32::NAN, f32::NAN));
    (m, sum, fma_ln_f32(sum))
}

/// [`z_loss_row_avx512`] on [`avx512::ROWS`] consecutive rows of `len` values, through
/// [`avx512::exp_shifted_rows`] (which only sums the exponentials here) and one
/// [`ln8_fma`] of the eight sums: the same bits row by row. Returns the rows' maxima, sums
/// and logarithms of the sums.
///
/// # Safety
/// The CPU features of [`crate::simd::avx512_enabled`] are available; the rows lie inside
/// `rows`; `len > 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_rows_avx512(
    rows: Storage<'_>,
    start: usize,
    len: usize,
) -> ([f32; avx512::ROWS], [f32; avx512::ROWS], [f32; avx512::ROWS]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        // The z-loss takes no finiteness mask: NaN and +inf make z NaN (the caller rejects
        // the row), and -inf counts as e^-inf = 0, as in the portable kernel.
        let (maxima, sums, _) = with_source!(rows, |src| avx512::exp_shifted_rows::<_, false, false, true>(
            src,
            start,
            len,
            &mut []
        ));
        let mut logs = [0f32; avx512::ROWS];
        _mm256_storeu_ps(logs.as_mut_ptr(), ln8_fma(_mm256_loadu_ps(sums.as_ptr())));
        (maxima, sums, logs)
    }
}

/// One row of the z-loss gradient: `out[i] = (fma_exp(row[i] - max) * factor) * grad` for
/// the row `rows[start .. start + out.len()]`, eight values at a time (the portable
/// kernel's operations in its order, so the same bits).
///
/// # Safety
/// The CPU features of [`crate::simd::avx2_enabled`] are available; the row lies inside `rows`.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_gradient_row(
    rows: Storage<'_>,
    start: usize,
    max: f32,
    factor: f32,
    grad: f32,
    out: &mut [f32],
) {
    let whole = out.len() / LANES * LANES;
    // SAFETY: loads of eight values at start + b with b + 8 <= whole (inside the row,
    // caller); stores likewise inside `out`.
    unsafe {
        with_source!(rows, |src| {
            let (m, f, g) = (_mm256_set1_ps(max), _mm256_set1_ps(factor), _mm256_set1_ps(grad));
            for b in (0..whole).step_by(LANES) {
                let e = exp8_fma(_mm256_sub_ps(src.load8(start + b), m));
                _mm256_storeu_ps(out.as_mut_ptr().add(b), _mm256_mul_ps(_mm256_mul_ps(e, f), g));
            }
            for (i, o) in out.iter_mut().enumerate().skip(whole) {
                *o = (fma_exp_f32(src.load1(start + i) - max) * factor) * grad;
            }
        })
    }
}

/// [`z_loss_gradient_row`] sixteen values at a time, with a masked last block (the same bits).
///
/// # Safety
/// The CPU features of [`crate::simd::avx512_enabled`] are available; the row lies inside `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_gradient_row_avx512(
    rows: Storage<'_>,
    start: usize,
    max: f32,
    factor: f32,
    grad: f32,
    out: &mut [f32],
) {
    let whole = out.len() / 16 * 16;
    let tail = ((1u32 << (out.len() - whole)) - 1) as __mmask16;
    // SAFETY: loads of sixteen values at start + b with b + 16 <= whole, and of the `tail`
    // lanes after them (inside the row, caller); stores likewise inside `out`.
    unsafe {
        with_source!(rows, |src| {
            let (m, f, g) = (_mm512_set1_ps(max), _mm512_set1_ps(factor), _mm512_set1_ps(grad));
            // Every input is at or below the row's maximum.
            for b in (0..whole).step_by(16) {
                let e = avx512::exp16_fma_at_most_88(_mm512_sub_ps(src.load16(start + b), m));
                _mm512_storeu_ps(out.as_mut_ptr().add(b), _mm512_mul_ps(_mm512_mul_ps(e, f), g));
            }
            if tail != 0 {
                // The masked-off lanes load the maximum itself: e^0, not stored.
                let x = src.load16_masked(start + whole, tail, m);
                let e = avx512::exp16_fma_at_most_88(_mm512_sub_ps(x, m));
                _mm512_mask_storeu_ps(
                    out.as_mut_ptr().add(whole),
                    tail,
                    _mm512_mul_ps(_mm512_mul_ps(e, f), g),
                );
            }
        })
    }
}

/// [`super::sinkhorn_rows`] on eight consecutive rows (`rows` holds them, each `d1.len()`
/// long), with the same operations in the same order, so the same bits: each row's sum of
/// `d1[e] * row[e]` in eight lanes (lane `i % 8` takes element `i`), the lanes folded in
/// order from 0, `d0 = t_inv / (sum + eps)`, then `columns += d0 * row` row by row. Eight
/// rows at once let their chains of dependent additions overlap (one row at a time waited
/// on each chain in turn), and the folds of the eight rows run as one vector after a
/// transpose of their lanes, with one division.
///
/// # Safety
/// The CPU features of [`crate::simd::avx2_enabled`] are available; `rows.len() == 8 *
/// d1.len()` and `columns.len() == d1.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn sinkhorn_rows8(
    rows: &[f32],
    d1: &[f32],
    t_inv: f32,
    eps: f32,
    d0: &mut [f32; 8],
    columns: &mut [f32],
) {
    let len = d1.len();
    debug_assert!(rows.len() == 8 * len && columns.len() == len);
    let whole = len / LANES * LANES;
    // The lanes of a row's last, partial block of eight (none when `len` is a multiple).
    let tail = _mm256_cmpgt_epi32(
        _mm256_set1_epi32((len - whole) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    // SAFETY: loads of eight values at b < whole (b + 8 <= len) of a row, of `d1` and of
    // `columns`, and masked loads and stores of the lanes below len - whole after them: all
    // inside their slices (caller).
    unsafe {
        let row = |i: usize| rows.as_ptr().add(i * len);
        let mut sums = [_mm256_setzero_ps(); 8];
        for b in (0..whole).step_by(LANES) {
            let w = _mm256_loadu_ps(d1.as_ptr().add(b));
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = _mm256_add_ps(*sum, _mm256_mul_ps(w, _mm256_loadu_ps(row(i).add(b))));
            }
        }
        if whole < len {
            // Lanes past the row add 0 * 0 = +0, which leaves their sums as they are (sums
            // of products of positive costs and weights, never -0).
            let w = _mm256_maskload_ps(d1.as_ptr().add(whole), tail);
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = _mm256_add_ps(*sum, _mm256_mul_ps(w, _mm256_maskload_ps(row(i).add(whole), tail)));
            }
        }
        // lanes[l] holds lane l of each row's sums: fold them in order, as the row by row
        // code folds a row's eight lanes.
        let lanes = transpose8(sums);
        let mut total = _mm256_setzero_ps();
        for lane in lanes {
            total = _mm256_add_ps(total, lane);
        }
        let d = _mm256_div_ps(_mm256_set1_ps(t_inv), _mm256_add_ps(total, _mm256_set1_ps(eps)));
        _mm256_storeu_ps(d0.as_mut_ptr(), d);
        let weights: [__m256; 8] = std::array::from_fn(|i| _mm256_set1_ps(d0[i]));
        for b in (0..whole).step_by(LANES) {
            let mut column = _mm256_loadu_ps(columns.as_ptr().add(b));
            for (i, weight) in weights.iter().enumerate() {
                column = _mm256_add_ps(column, _mm256_mul_ps(*weight, _mm256_loadu_ps(row(i).add(b))));
            }
            _mm256_storeu_ps(columns.as_mut_ptr().add(b), column);
        }
        if whole < len {
            let mut column = _mm256_maskload_ps(columns.as_ptr().add(whole), tail);
            for (i, weight) in weights.iter().enumerate() {
                column = _mm256_add_ps(
                    column,
                    _mm256_mul_ps(*weight, _mm256_maskload_ps(row(i).add(whole), tail)),
                );
            }
            _mm256_maskstore_ps(columns.as_mut_ptr().add(whole), tail, column);
        }
    }
}

/// The 8 x 8 transpose: lane `r` of output `l` is lane `l` of input `r`.
#[inline(always)]
unsafe fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register-only AVX operations (caller: the features are available).
    unsafe {
        // Pairs of rows interleaved: (r0 l0, r1 l0, r0 l1, r1 l1 | the same for l4, l5) ...
        let t0 = _mm256_unpacklo_ps(v[0], v[1]);
        let t1 = _mm256_unpackhi_ps(v[0], v[1]);
        let t2 = _mm256_unpacklo_ps(v[2], v[3]);
        let t3 = _mm256_unpackhi_ps(v[2], v[3]);
        let t4 = _mm256_unpacklo_ps(v[4], v[5]);
        let t5 = _mm256_unpackhi_ps(v[4], v[5]);
        let t6 = _mm256_unpacklo_ps(v[6], v[7]);
        let t7 = _mm256_unpackhi_ps(v[6], v[7]);
        // ... then quadruples: rows 0-3 of lanes (0 | 4), (1 | 5), (2 | 6), (3 | 7) ...
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        // ... and the halves of rows 0-3 and 4-7 joined.
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }
}
