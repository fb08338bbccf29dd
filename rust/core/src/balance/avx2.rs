//! AVX2 versions of the balancing kernels, chosen at run time (see [`crate::simd`]): the
//! same operations in the same order as the portable code of the parent module, eight
//! lanes at a time, so the same bits.

use crate::element::fma_ln_f32;
use crate::element::Storage;
use crate::lanes::LANES;
use crate::simd::avx2::{exp_shifted, ln8_fma, with_source};
use crate::simd::avx512::{self, Source16};
use std::arch::x86_64::*;

/// One token of the z-loss: writes `scale * 2 z softmax(row)` to `out` and returns
/// `z = logsumexp(row)` (not finite when the row holds NaN or `+inf`). The row is
/// `rows[start .. start + out.len()]`. Matches the portable kernel: the max over eight
/// lanes, `fma_exp(l - max)` summed in lane `i % 8`, the lanes folded in order, and
/// `z = max + fma_ln(sum)`.
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
            avx512::exp_shifted::<_, false, true>(src, start, out)
        } else {
            exp_shifted::<_, false, true>(src, start, out)
        }
    };
    let Some((m, sum)) = shifted else { return f32::NAN };
    let z = m + fma_ln_f32(sum);
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

/// [`z_loss_row_avx512`] on [`avx512::ROWS`] consecutive rows (`out` holds them back to
/// back), through [`avx512::exp_shifted_rows`] and one [`ln8_fma`] of the eight sums: the
/// same bits row by row. Writes each row's z to `zs`.
///
/// # Safety
/// The CPU features of [`crate::simd::avx512_enabled`] are available; the rows lie inside
/// `rows`; `out.len()` is `ROWS` times a positive row length.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(super) unsafe fn z_loss_rows_avx512(
    rows: Storage<'_>,
    start: usize,
    scale: f32,
    out: &mut [f32],
    zs: &mut [f32; avx512::ROWS],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        // The z-loss takes no finiteness mask: NaN and +inf make z NaN (the caller rejects
        // the row), and -inf counts as e^-87.3, as in the portable kernel.
        let (maxima, sums, _) =
            with_source!(rows, |src| avx512::exp_shifted_rows::<_, true>(src, start, &mut *out));
        // The eight rows' logarithms in one vector.
        let mut logs = [0f32; avx512::ROWS];
        _mm256_storeu_ps(logs.as_mut_ptr(), ln8_fma(_mm256_loadu_ps(sums.as_ptr())));
        let mut factors = [0f32; avx512::ROWS];
        for ((((&m, &sum), &ln), z), factor) in
            maxima.iter().zip(&sums).zip(&logs).zip(zs.iter_mut()).zip(&mut factors)
        {
            *z = m + ln;
            *factor = (1.0 + 1.0) * scale * *z / sum;
        }
        avx512::scale_rows::<false>(out, &factors);
    }
}
