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
        // the row), and -inf counts as e^-87.3, as in the portable kernel.
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
                let e = avx512::exp16_fma_nonpositive(_mm512_sub_ps(src.load16(start + b), m));
                _mm512_storeu_ps(out.as_mut_ptr().add(b), _mm512_mul_ps(_mm512_mul_ps(e, f), g));
            }
            if tail != 0 {
                // The masked-off lanes load the maximum itself: e^0, not stored.
                let x = src.load16_masked(start + whole, tail, m);
                let e = avx512::exp16_fma_nonpositive(_mm512_sub_ps(x, m));
                _mm512_mask_storeu_ps(
                    out.as_mut_ptr().add(whole),
                    tail,
                    _mm512_mul_ps(_mm512_mul_ps(e, f), g),
                );
            }
        })
    }
}
