//! AVX2 versions of the balancing kernels, chosen at run time (see [`crate::simd`]): the
//! same operations in the same order as the portable code of the parent module, eight
//! lanes at a time, so the same bits.

use crate::element::Storage;
use crate::lanes::LANES;
use crate::simd::avx2::{exp8, with_source, Source};
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
    unsafe { with_source!(rows, |src| z_loss_row_in(src, start, scale, out)) }
}

#[inline(always)]
unsafe fn z_loss_row_in<S: Source>(src: S, start: usize, scale: f32, out: &mut [f32]) -> f32 {
    let len = out.len();
    let whole = len / LANES * LANES;
    // SAFETY: loads of eight values at start + b with b + 8 <= whole <= len, inside the row;
    // stores of eight at b + 8 <= whole inside `out`.
    unsafe {
        let mut maxima = _mm256_set1_ps(f32::NEG_INFINITY);
        for b in (0..whole).step_by(LANES) {
            maxima = _mm256_max_ps(maxima, src.load8(start + b));
        }
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), maxima);
        for (lane, i) in lanes.iter_mut().zip(whole..len) {
            let v = src.load1(start + i);
            *lane = if v > *lane { v } else { *lane };
        }
        let m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);

        let shift = _mm256_set1_ps(m);
        let mut sums = _mm256_setzero_ps();
        for b in (0..whole).step_by(LANES) {
            let e = exp8(_mm256_sub_ps(src.load8(start + b), shift));
            sums = _mm256_add_ps(sums, e);
            _mm256_storeu_ps(out.as_mut_ptr().add(b), e);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
        for (lane, i) in lanes.iter_mut().zip(whole..len) {
            out[i] = crate::element::fast_exp_f32(src.load1(start + i) - m);
            *lane += out[i];
        }
        let sum = lanes.iter().copied().fold(0.0, |a, b| a + b);
        let z = m + sum.ln();
        let factor = _mm256_set1_ps((1.0 + 1.0) * scale * z / sum);
        for b in (0..whole).step_by(LANES) {
            let p = out.as_mut_ptr().add(b);
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), factor));
        }
        let factor = (1.0 + 1.0) * scale * z / sum;
        for v in &mut out[whole..] {
            *v *= factor;
        }
        z
    }
}
