//! AVX2 versions of the balancing kernels, chosen at run time (see [`crate::simd`]): the
//! same operations in the same order as the portable code of the parent module, eight
//! lanes at a time, so the same bits.

use crate::element::Storage;
use crate::lanes::LANES;
use crate::simd::avx2::{exp_shifted, with_source};
use crate::simd::avx512::{self, Source16};
use std::arch::x86_64::*;

/// One token of the z-loss: writes `scale * 2 z softmax(row)` to `out` and returns
/// `z = logsumexp(row)` (not finite when the row holds NaN or `+inf`). The row is
/// `rows[start .. start + out.len()]`. Matches the portable kernel: the max over eight
/// lanes, `fast_exp(l - max)` summed in lane `i % 8` and the lanes folded in order.
///
/// # Safety
/// The CPU features of [`crate::simd::avx2_enabled`] are available; the row lies inside `rows`.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_row(rows: Storage<'_>, start: usize, scale: f32, out: &mut [f32]) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe { with_source!(rows, |src| z_loss_row_in::<_, false>(src, start, scale, out)) }
}

/// [`z_loss_row`] with the exponentials sixteen at a time (the same bits).
///
/// # Safety
/// The CPU features of [`crate::simd::avx512_enabled`] are available; the row lies inside `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_row_avx512(rows: Storage<'_>, start: usize, scale: f32, out: &mut [f32]) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe { with_source!(rows, |src| z_loss_row_in::<_, true>(src, start, scale, out)) }
}

/// `WIDE`: AVX-512 exponentials (only inside [`z_loss_row_avx512`]).
#[inline(always)]
unsafe fn z_loss_row_in<S: Source16, const WIDE: bool>(
    src: S,
    start: usize,
    scale: f32,
    out: &mut [f32],
) -> f32 {
    // SAFETY: forwarded from the caller (with WIDE, AVX-512 is available).
    let shifted = unsafe {
        if WIDE {
            avx512::exp_shifted::<_, false>(src, start, out)
        } else {
            exp_shifted::<_, false>(src, start, out)
        }
    };
    let Some((m, sum)) = shifted else { return f32::NAN };
    let z = m + sum.ln();
    let factor = (1.0 + 1.0) * scale * z / sum;
    let whole = out.len() / LANES * LANES;
    // SAFETY: eight values at b + 8 <= whole, inside `out`.
    unsafe {
        let factor8 = _mm256_set1_ps(factor);
        for b in (0..whole).step_by(LANES) {
            let p = out.as_mut_ptr().add(b);
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), factor8));
        }
    }
    for v in &mut out[whole..] {
        *v *= factor;
    }
    z
}

/// Rows processed together by [`z_loss_rows_avx512`].
pub(super) const ROWS: usize = 8;

/// [`z_loss_row_avx512`] on [`ROWS`] consecutive rows whose length is a multiple of sixteen
/// (`out` holds them back to back): the same bits row by row, but the rows' chains of
/// dependent operations (the maximum, the lane sums, their fold, the logarithm) interleave
/// instead of running one after another. Writes each row's z to `zs`.
///
/// # Safety
/// The CPU features of [`crate::simd::avx512_enabled`] are available; the rows lie inside
/// `rows`; `out.len()` is `ROWS` times a multiple of sixteen.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_rows_avx512(
    rows: Storage<'_>,
    start: usize,
    scale: f32,
    out: &mut [f32],
    zs: &mut [f32; ROWS],
) {
    // SAFETY: forwarded from the caller.
    unsafe { with_source!(rows, |src| z_loss_rows_in(src, start, scale, out, zs)) }
}

#[inline(always)]
unsafe fn z_loss_rows_in<S: Source16>(
    src: S,
    start: usize,
    scale: f32,
    out: &mut [f32],
    zs: &mut [f32; ROWS],
) {
    let len = out.len() / ROWS;
    debug_assert!(len.is_multiple_of(16) && len > 0);
    // SAFETY: loads of sixteen values at start + r * len + b with b + 16 <= len (inside the
    // rows, caller); stores likewise inside `out`.
    unsafe {
        let mut maxima = [0f32; ROWS];
        for (r, m) in maxima.iter_mut().enumerate() {
            let base = start + r * len;
            let mut v = src.load16(base);
            for b in (16..len).step_by(16) {
                v = _mm512_max_ps(v, src.load16(base + b));
            }
            // The maximum is the same value in any order.
            *m = _mm512_reduce_max_ps(v);
        }
        let mut lanes = [[0f32; LANES]; ROWS];
        let mut sums = [_mm256_setzero_ps(); ROWS];
        let shifts = maxima.map(|m| _mm512_set1_ps(m));
        for b in (0..len).step_by(16) {
            for r in 0..ROWS {
                let e = avx512::exp16(_mm512_sub_ps(src.load16(start + r * len + b), shifts[r]));
                sums[r] = _mm256_add_ps(sums[r], _mm512_castps512_ps256(e));
                sums[r] = _mm256_add_ps(sums[r], _mm512_extractf32x8_ps::<1>(e));
                _mm512_storeu_ps(out.as_mut_ptr().add(r * len + b), e);
            }
        }
        for (lane, s) in lanes.iter_mut().zip(sums) {
            _mm256_storeu_ps(lane.as_mut_ptr(), s);
        }
        for (r, ((&m, lane), z)) in maxima.iter().zip(&lanes).zip(zs.iter_mut()).enumerate() {
            let sum = lane.iter().copied().fold(0.0, |a, b| a + b);
            *z = m + sum.ln();
            let factor = _mm512_set1_ps((1.0 + 1.0) * scale * *z / sum);
            let row = out.as_mut_ptr().add(r * len);
            for b in (0..len).step_by(16) {
                _mm512_storeu_ps(row.add(b), _mm512_mul_ps(_mm512_loadu_ps(row.add(b)), factor));
            }
        }
    }
}
