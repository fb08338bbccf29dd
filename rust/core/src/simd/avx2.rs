//! Building blocks of the AVX2 kernels: logits of each storage type read as eight f32
//! lanes, and the lane-wise versions of the scalar helpers they must match bit for bit.
//!
//! Every function here requires the CPU features of [`super::avx2_enabled`]; callers run
//! inside `#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]` functions.

use super::avx512::Source16;
use crate::element::{
    fast_exp_f32, fma_exp_f32, EXP_HIGHEST, EXP_LOWEST, EXP_MAGIC, EXP_POLY, FMA_EXP_POLY, LN2_HI, LN2_LO,
    LN_POLY, SQRT_HALF_BITS,
};
use std::arch::x86_64::*;

/// Runs `$body` with `$src` bound to the [`Source`] of `$storage`, so that each storage
/// type gets its own copy of the kernel, with the conversion inside the loops.
macro_rules! with_source {
    ($storage:expr, |$src:ident| $body:expr) => {
        match $storage {
            $crate::element::Storage::F32(v) => {
                let $src = $crate::simd::avx2::F32Rows(v);
                $body
            }
            $crate::element::Storage::Bf16(v) => {
                let $src = $crate::simd::avx2::Bf16Rows(v);
                $body
            }
            $crate::element::Storage::F16(v) => {
                let $src = $crate::simd::avx2::F16Rows(v);
                $body
            }
        }
    };
}
pub(crate) use with_source;

/// Logits of one storage type, read as f32 lanes.
pub(crate) trait Source: Copy {
    /// Eight values from `at`.
    ///
    /// # Safety
    /// `at + 8 <= len`; the CPU features of [`super::avx2_enabled`] are available.
    unsafe fn load8(self, at: usize) -> __m256;
    /// One value (the scalar tails).
    fn load1(self, at: usize) -> f32;
    /// Asks for the cache lines of `len` values from `at` ahead of use (no effect on results).
    fn prefetch(self, at: usize, len: usize);
    /// The values themselves when they are f32 already.
    fn as_f32(&self) -> Option<&[f32]> {
        None
    }
}

/// Prefetches the cache lines of `values` into L1.
#[inline(always)]
pub(crate) fn prefetch_lines<T>(values: &[T]) {
    let bytes = std::mem::size_of_val(values);
    let base = values.as_ptr().cast::<i8>();
    for offset in (0..bytes).step_by(64) {
        // SAFETY: prefetching is a hint that cannot fault; the address lies in `values`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(offset)) };
    }
}

#[derive(Clone, Copy)]
pub(crate) struct F32Rows<'a>(pub(crate) &'a [f32]);
#[derive(Clone, Copy)]
pub(crate) struct Bf16Rows<'a>(pub(crate) &'a [u16]);
#[derive(Clone, Copy)]
pub(crate) struct F16Rows<'a>(pub(crate) &'a [u16]);

impl Source for F32Rows<'_> {
    #[inline(always)]
    fn prefetch(self, at: usize, len: usize) {
        prefetch_lines(&self.0[at.min(self.0.len())..(at + len).min(self.0.len())]);
    }
    #[inline(always)]
    unsafe fn load8(self, at: usize) -> __m256 {
        debug_assert!(at + 8 <= self.0.len());
        // SAFETY: eight in-bounds values (caller), AVX available (caller).
        unsafe { _mm256_loadu_ps(self.0.as_ptr().add(at)) }
    }
    #[inline(always)]
    fn load1(self, at: usize) -> f32 {
        self.0[at]
    }
    fn as_f32(&self) -> Option<&[f32]> {
        Some(self.0)
    }
}

impl Source for Bf16Rows<'_> {
    #[inline(always)]
    fn prefetch(self, at: usize, len: usize) {
        prefetch_lines(&self.0[at.min(self.0.len())..(at + len).min(self.0.len())]);
    }
    #[inline(always)]
    unsafe fn load8(self, at: usize) -> __m256 {
        debug_assert!(at + 8 <= self.0.len());
        // SAFETY: eight in-bounds values (caller), AVX2 available (caller). bf16 is the
        // high half of an f32: widen and shift, exact for every value.
        unsafe {
            let half = _mm_loadu_si128(self.0.as_ptr().add(at).cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
        }
    }
    #[inline(always)]
    fn load1(self, at: usize) -> f32 {
        f32::from_bits(u32::from(self.0[at]) << 16)
    }
}

impl Source for F16Rows<'_> {
    #[inline(always)]
    fn prefetch(self, at: usize, len: usize) {
        prefetch_lines(&self.0[at.min(self.0.len())..(at + len).min(self.0.len())]);
    }
    #[inline(always)]
    unsafe fn load8(self, at: usize) -> __m256 {
        debug_assert!(at + 8 <= self.0.len());
        // SAFETY: eight in-bounds values (caller), F16C available (caller).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(self.0.as_ptr().add(at).cast())) }
    }
    #[inline(always)]
    fn load1(self, at: usize) -> f32 {
        half::f16::from_bits(self.0[at]).to_f32()
    }
}

/// Copies `len` bytes from `src` to `dst` (which do not overlap), 32 at a time, then the
/// rest (see [`super::copy_row`]).
///
/// # Safety
/// AVX2 is available; `src` and `dst` are valid for `len` bytes and do not overlap.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    let whole = len / 32 * 32;
    // SAFETY: every access is below `len` bytes from its pointer (caller).
    unsafe {
        for i in (0..whole).step_by(32) {
            _mm256_storeu_si256(dst.add(i).cast(), _mm256_loadu_si256(src.add(i).cast()));
        }
        std::ptr::copy_nonoverlapping(src.add(whole), dst.add(whole), len - whole);
    }
}

/// All-ones lanes where `v` is finite (NaN and infinities give zero lanes).
#[inline(always)]
pub(crate) unsafe fn finite_lanes(v: __m256) -> __m256 {
    // SAFETY: register-only AVX operations; the caller runs with AVX2 enabled.
    unsafe {
        let magnitude = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)));
        _mm256_cmp_ps::<_CMP_LT_OQ>(magnitude, _mm256_set1_ps(f32::INFINITY))
    }
}

/// [`crate::element::exp_scale`] of eight lanes: `(y 2^(n - n/2)) 2^(n/2)`, for `n` in
/// `[-150, 128]`.
#[inline(always)]
unsafe fn exp_scale8(y: __m256, n: __m256i) -> __m256 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let low = _mm256_srai_epi32::<1>(n);
        let high = _mm256_sub_epi32(n, low);
        let bias = _mm256_set1_epi32(127);
        let factor = |e: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(e, bias)));
        _mm256_mul_ps(_mm256_mul_ps(y, factor(high)), factor(low))
    }
}

/// [`exp_scale8`] for `n` in `[-150, 103]` in four fewer operations: `(y 2^(n + 24))
/// 2^-24`, the second factor a constant. The first product is exact as in `exp_scale8`, so
/// the second rounds the same exact `y 2^n` once: the same bits. (At `n = -150` with `y <
/// 1` the first product is subnormal and rounds, to at most 2^-126, which the second takes
/// to 0, as `y 2^-150` rounds.)
#[inline(always)]
unsafe fn exp_scale8_up_to_103(y: __m256, n: __m256i) -> __m256 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let high = _mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127 + 24)));
        _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(high)), _mm256_set1_ps(2f32.powi(-24)))
    }
}

/// `fast_exp_f32`'s range reduction and polynomial on eight lanes already clamped: `(e^r,
/// n)` with `x = n ln 2 + r`.
#[inline(always)]
unsafe fn exp8_parts(x: __m256) -> (__m256, __m256i) {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let magic = _mm256_set1_ps(EXP_MAGIC);
        let t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), magic);
        let n = _mm256_sub_ps(t, magic);
        let exponent = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0));
        (y, exponent)
    }
}

/// [`exp8_parts`] as `fma_exp_f32` computes them, in fused multiply-adds.
#[inline(always)]
unsafe fn exp8_fma_parts(x: __m256) -> (__m256, __m256i) {
    // SAFETY: register-only AVX2 and FMA operations.
    unsafe {
        let magic = _mm256_set1_ps(EXP_MAGIC);
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm256_sub_ps(t, magic);
        let exponent = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(FMA_EXP_POLY[0]);
        for c in &FMA_EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let one = _mm256_set1_ps(1.0);
        (_mm256_fmadd_ps(r, _mm256_fmadd_ps(p, r, one), one), exponent)
    }
}

/// `fast_exp_f32`'s clamp of eight lanes, in `f32::clamp` order, NaN included: maxps and
/// minps return their second operand when either is NaN, so the bound goes first and a NaN
/// stays NaN.
#[inline(always)]
unsafe fn exp_clamp8(x: __m256) -> __m256 {
    // SAFETY: register-only AVX operations.
    unsafe { _mm256_min_ps(_mm256_set1_ps(EXP_HIGHEST), _mm256_max_ps(_mm256_set1_ps(EXP_LOWEST), x)) }
}

/// [`crate::element::fma_exp_f32`] of eight lanes: the same operations in the same order,
/// so the same bits.
#[inline(always)]
pub(crate) unsafe fn exp8_fma(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2 and FMA operations.
    unsafe {
        let (y, n) = exp8_fma_parts(exp_clamp8(x));
        exp_scale8(y, n)
    }
}

/// `fast_exp_f32` of eight lanes at most 0 (or NaN): softmax's shifted values. The same
/// operations in the same order, so the same bits, except that only the lower clamp applies
/// and `2^n` (`n <= 0`) goes through [`exp_scale8_up_to_103`]: five operations fewer than
/// the general form, as many as one factor `2^n` with both clamps took (which could not
/// reach the subnormals).
#[inline(always)]
pub(crate) unsafe fn exp8_nonpositive(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let (y, n) = exp8_parts(_mm256_max_ps(_mm256_set1_ps(EXP_LOWEST), x));
        exp_scale8_up_to_103(y, n)
    }
}

/// [`exp8_fma`] on lanes at most 0 (or NaN), with the shortcuts of [`exp8_nonpositive`]:
/// the same bits as `fma_exp_f32`.
#[inline(always)]
pub(crate) unsafe fn exp8_fma_nonpositive(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2 and FMA operations.
    unsafe {
        let (y, n) = exp8_fma_parts(_mm256_max_ps(_mm256_set1_ps(EXP_LOWEST), x));
        exp_scale8_up_to_103(y, n)
    }
}

/// `1 + fast_exp_f32(x)` of eight lanes (the sigmoid's denominator), the same bits in four
/// operations fewer than the general form. Below -86.6, `e^x` is under 2^-124 and `1 + e^x`
/// rounds to 1 whatever `fast_exp_f32` gives there (a subnormal or 0), so the input is
/// clamped at -86.6 instead: then `n >= -125` and `2^n` fits one variable factor, as `(y
/// 2^(n - 1)) 2` (the first product exact where `e^x` is normal, the second rounding once,
/// to `inf` where `e^x` overflows).
#[inline(always)]
pub(crate) unsafe fn one_plus_exp8(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        // The bound first, as in `exp_clamp8`: a NaN stays NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_HIGHEST), _mm256_max_ps(_mm256_set1_ps(-86.6), x));
        let (y, n) = exp8_parts(x);
        let half = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(126))));
        let one = _mm256_set1_ps(1.0);
        _mm256_add_ps(one, _mm256_mul_ps(_mm256_mul_ps(y, half), _mm256_set1_ps(2.0)))
    }
}

/// [`crate::element::fma_ln_f32`] of eight lanes (the z-loss's logarithm of eight row sums
/// at once): the same operations in the same order, so the same bits, and NaN where it
/// gives NaN.
#[inline(always)]
pub(crate) unsafe fn ln8_fma(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2 and FMA operations.
    unsafe {
        // Ordered comparisons: NaN fails both.
        let valid = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(f32::MIN_POSITIVE)),
            _mm256_cmp_ps::<_CMP_LE_OQ>(x, _mm256_set1_ps(f32::MAX)),
        );
        let sqrt_half = _mm256_set1_epi32(SQRT_HALF_BITS);
        let offset = _mm256_sub_epi32(_mm256_castps_si256(x), sqrt_half);
        let k = _mm256_cvtepi32_ps(_mm256_srai_epi32::<23>(offset));
        let m = _mm256_add_epi32(_mm256_and_si256(offset, _mm256_set1_epi32(0x007f_ffff)), sqrt_half);
        let f = _mm256_sub_ps(_mm256_castsi256_ps(m), _mm256_set1_ps(1.0));
        let mut p = _mm256_set1_ps(LN_POLY[0]);
        for c in &LN_POLY[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
        }
        let f2 = _mm256_mul_ps(f, f);
        let y = _mm256_mul_ps(_mm256_mul_ps(f2, f), p);
        let y = _mm256_fmadd_ps(k, _mm256_set1_ps(LN2_LO), y);
        let y = _mm256_fmadd_ps(f2, _mm256_set1_ps(-0.5), y);
        let ln = _mm256_fmadd_ps(k, _mm256_set1_ps(LN2_HI), _mm256_add_ps(f, y));
        _mm256_blendv_ps(_mm256_set1_ps(f32::NAN), ln, valid)
    }
}

/// Lane maxima of `blocks` blocks of eight values from `start`, over four independent
/// chains (one would bound the loop by its latency): block b goes to chain b % 4, the blocks
/// after the last whole four to chain 0. With `CHECK_FINITE`, also whether every value is
/// finite: the OR of v * 0, which is +-0 for finite v and NaN for NaN and the infinities,
/// keeps its exponent bits clear while every value is (without it, true).
///
/// # Safety
/// The CPU features of [`super::avx2_enabled`] are available; the blocks lie inside `src`.
#[inline(always)]
pub(crate) unsafe fn block_maxima<S: Source, const CHECK_FINITE: bool>(
    src: S,
    start: usize,
    blocks: usize,
) -> ([__m256; 4], bool) {
    const LANES: usize = 8;
    // SAFETY: loads of eight values at start + 8b with b < blocks (caller).
    unsafe {
        let zero = _mm256_setzero_ps();
        let mut odd_bits = [zero; 2];
        let mut maxima = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let quads = blocks / 4 * 4;
        for b in (0..quads).step_by(4) {
            for (r, m) in maxima.iter_mut().enumerate() {
                let v = src.load8(start + (b + r) * LANES);
                if CHECK_FINITE {
                    odd_bits[r % 2] = _mm256_or_ps(odd_bits[r % 2], _mm256_mul_ps(v, zero));
                }
                *m = _mm256_max_ps(*m, v);
            }
        }
        for b in quads..blocks {
            let v = src.load8(start + b * LANES);
            if CHECK_FINITE {
                odd_bits[0] = _mm256_or_ps(odd_bits[0], _mm256_mul_ps(v, zero));
            }
            maxima[0] = _mm256_max_ps(maxima[0], v);
        }
        let exponents = _mm256_and_ps(_mm256_or_ps(odd_bits[0], odd_bits[1]), _mm256_set1_ps(f32::INFINITY));
        let exponents = _mm256_castps_si256(exponents);
        (maxima, _mm256_testz_si256(exponents, exponents) == 1)
    }
}

/// The maximum of the row `src[start .. start + len]` (eight lane maxima over the whole
/// blocks of eight, then the tail into lanes 0.., then the lanes in order); with
/// `CHECK_FINITE`, `None` when the row holds NaN or an infinity.
///
/// # Safety
/// The CPU features of [`super::avx2_enabled`] are available; the row lies inside `src`.
#[inline(always)]
pub(crate) unsafe fn row_max<S: Source, const CHECK_FINITE: bool>(
    src: S,
    start: usize,
    len: usize,
) -> Option<f32> {
    const LANES: usize = 8;
    let whole = len / LANES * LANES;
    // SAFETY: whole / 8 blocks of eight inside the row (caller).
    unsafe {
        let (maxima, mut finite) = block_maxima::<_, CHECK_FINITE>(src, start, whole / LANES);
        // The maximum is the same value in any order.
        let maxima = _mm256_max_ps(_mm256_max_ps(maxima[0], maxima[1]), _mm256_max_ps(maxima[2], maxima[3]));
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), maxima);
        for (lane, i) in lanes.iter_mut().zip(whole..len) {
            let v = src.load1(start + i);
            finite &= v.is_finite();
            *lane = if v > *lane { v } else { *lane };
        }
        if CHECK_FINITE && !finite {
            return None;
        }
        Some(lanes.iter().copied().fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m }))
    }
}

/// The end of [`exp_shifted`]: `out[i] = fast_exp(row[i] - m)` (with `FMA`, `fma_exp`) for
/// the tail past the whole blocks of eight, added into the lanes of `sums` (tail element j
/// into lane j), then the lanes folded in order: the row's sum.
///
/// # Safety
/// As [`row_max`].
#[inline(always)]
pub(crate) unsafe fn tail_sum<S: Source, const FMA: bool>(
    src: S,
    start: usize,
    out: &mut [f32],
    m: f32,
    sums: __m256,
) -> f32 {
    const LANES: usize = 8;
    let (len, whole) = (out.len(), out.len() / LANES * LANES);
    let mut lanes = [0f32; LANES];
    // SAFETY: a store into a local array of eight; loads inside the row (caller).
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
        for (lane, i) in lanes.iter_mut().zip(whole..len) {
            let x = src.load1(start + i) - m;
            out[i] = if FMA { fma_exp_f32(x) } else { fast_exp_f32(x) };
            *lane += out[i];
        }
    }
    lanes.iter().copied().fold(0.0, |a, b| a + b)
}

/// `out = fast_exp(row - max(row))` (with `FMA`, `fma_exp`) for the row `src[start ..
/// start + out.len()]`, with the sum of `out` in eight lanes (element i into lane i % 8, then
/// the lanes in order). Returns `(max, sum)`, or, with `CHECK_FINITE`, `None` when the row
/// holds NaN or an infinity (without it, NaN and `+inf` come out as a NaN sum and `-inf` as
/// an `exp` of 0).
///
/// # Safety
/// The CPU features of [`super::avx2_enabled`] are available; the row lies inside `src`.
#[inline(always)]
pub(crate) unsafe fn exp_shifted<S: Source, const CHECK_FINITE: bool, const FMA: bool>(
    src: S,
    start: usize,
    out: &mut [f32],
) -> Option<(f32, f32)> {
    const LANES: usize = 8;
    let whole = out.len() / LANES * LANES;
    // SAFETY: loads of eight values at start + b with b + 8 <= whole <= len (inside the
    // row); stores of eight at b + 8 <= whole (inside `out`).
    unsafe {
        let m = row_max::<_, CHECK_FINITE>(src, start, out.len())?;
        let shift = _mm256_set1_ps(m);
        let mut sums = _mm256_setzero_ps();
        for b in (0..whole).step_by(LANES) {
            let x = _mm256_sub_ps(src.load8(start + b), shift);
            let e = if FMA { exp8_fma_nonpositive(x) } else { exp8_nonpositive(x) };
            sums = _mm256_add_ps(sums, e);
            _mm256_storeu_ps(out.as_mut_ptr().add(b), e);
        }
        Some((m, tail_sum::<_, FMA>(src, start, out, m, sums)))
    }
}

/// `out = softmax(row)` as [`exp_shifted`] then one division per element; false when the
/// row holds NaN or an infinity.
///
/// # Safety
/// As [`exp_shifted`].
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi1")]
pub(crate) unsafe fn softmax_row(rows: crate::element::Storage<'_>, start: usize, out: &mut [f32]) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe { with_source!(rows, |src| softmax_row_in::<_, false>(src, start, out)) }
}

/// The body of [`softmax_row`] and of its AVX-512 form (`WIDE`: the exponentials sixteen at
/// a time, only inside [`super::avx512::softmax_row`]); the same bits either way.
///
/// # Safety
/// As [`exp_shifted`]; with `WIDE`, the features of [`super::avx512_enabled`] too.
#[inline(always)]
pub(crate) unsafe fn softmax_row_in<S: Source16, const WIDE: bool>(
    src: S,
    start: usize,
    out: &mut [f32],
) -> bool {
    // SAFETY: forwarded from the caller; eight values at b + 8 <= whole, inside `out`.
    unsafe {
        let shifted = if WIDE {
            super::avx512::exp_shifted::<_, true, false>(src, start, out)
        } else {
            exp_shifted::<_, true, false>(src, start, out)
        };
        let Some((_, z)) = shifted else { return false };
        let whole = out.len() / 8 * 8;
        let divisor = _mm256_set1_ps(z);
        for b in (0..whole).step_by(8) {
            let p = out.as_mut_ptr().add(b);
            _mm256_storeu_ps(p, _mm256_div_ps(_mm256_loadu_ps(p), divisor));
        }
        for v in &mut out[whole..] {
            *v /= z;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::fma_ln_f32;

    #[test]
    fn one_plus_exp8_is_one_plus_fast_exp_lane_by_lane() {
        if !super::super::avx2_enabled() {
            return;
        }
        let one_plus_exp = |x: f32| 1.0 + fast_exp_f32(x);
        let mut x = -110.0f32;
        while x < 100.0 {
            let lanes: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.013_7);
            // SAFETY: AVX2 and FMA are available (checked above).
            unsafe { assert_lanes8(|x| one_plus_exp8(x), one_plus_exp, &lanes) };
            x += 0.0117;
        }
        // Every float around the clamp at -86.6 and the overflow at 88.72.
        for start in [-86.7f32, 88.6] {
            let mut x = start;
            for _ in 0..40_000 {
                let lanes: [f32; 8] = std::array::from_fn(|i| f32::from_bits(x.to_bits() + i as u32));
                // SAFETY: as above.
                unsafe { assert_lanes8(|x| one_plus_exp8(x), one_plus_exp, &lanes) };
                x = f32::from_bits(x.to_bits() + 8);
            }
        }
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, -f32::NAN, 1e30, -1e30];
        // SAFETY: as above.
        unsafe { assert_lanes8(|x| one_plus_exp8(x), one_plus_exp, &specials) };
    }

    #[test]
    fn exp8_nonpositive_forms_are_their_scalar_exp_at_or_below_zero() {
        if !super::super::avx2_enabled() {
            return;
        }
        // A stride from -110 (past -103.97, where e^x rounds to 0) through the subnormal
        // results (below -87.3) to 0, then every float from -104 to -102 (the smallest
        // subnormals and the rounding to 0).
        let mut x = -110.0f32;
        while x <= 0.0 {
            let lanes: [f32; 8] = std::array::from_fn(|i| (x + i as f32 * 0.013_7).min(0.0));
            // SAFETY: AVX2 and FMA are available (checked above).
            unsafe {
                assert_lanes8(|x| exp8_nonpositive(x), fast_exp_f32, &lanes);
                assert_lanes8(|x| exp8_fma_nonpositive(x), fma_exp_f32, &lanes);
            }
            x += 0.0117;
        }
        let mut x = -104.0f32;
        while x < -102.0 {
            let lanes: [f32; 8] = std::array::from_fn(|i| f32::from_bits(x.to_bits() - i as u32));
            // SAFETY: as above.
            unsafe {
                assert_lanes8(|x| exp8_nonpositive(x), fast_exp_f32, &lanes);
                assert_lanes8(|x| exp8_fma_nonpositive(x), fma_exp_f32, &lanes);
            }
            x = f32::from_bits(x.to_bits() - 8);
        }
        let specials = [f32::NAN, f32::NEG_INFINITY, -0.0, 0.0, -f32::NAN, -1e30, -87.3, -103.97];
        // SAFETY: as above.
        unsafe {
            assert_lanes8(|x| exp8_nonpositive(x), fast_exp_f32, &specials);
            assert_lanes8(|x| exp8_fma_nonpositive(x), fma_exp_f32, &specials);
        }
    }

    #[test]
    fn exp16_nonpositive_forms_are_their_scalar_exp_at_or_below_zero() {
        if !crate::simd::avx512_enabled() {
            return;
        }
        let mut x = -110.0f32;
        while x <= 0.0 {
            let mut lanes: [f32; 16] = std::array::from_fn(|i| (x + i as f32 * 0.013_7).min(0.0));
            if x < -109.0 {
                lanes[..5].copy_from_slice(&[f32::NAN, f32::NEG_INFINITY, -0.0, 0.0, -f32::NAN]);
            }
            // SAFETY: AVX-512 is available (checked above).
            unsafe {
                assert_lanes(|x| super::super::avx512::exp16_at_most_88(x), fast_exp_f32, &lanes);
                assert_lanes(|x| super::super::avx512::exp16_fma_at_most_88(x), fma_exp_f32, &lanes);
            }
            x += 0.0117;
        }
    }

    #[test]
    fn exp16_forms_are_their_scalar_exp_up_to_88() {
        if !crate::simd::avx512_enabled() {
            return;
        }
        // Every float from 80 to 88 (where 2^n reaches 2^127), and a stride below.
        let mut x = 0.0f32;
        while x <= 88.0 {
            let lanes: [f32; 16] = std::array::from_fn(|i| {
                let lane =
                    if x >= 80.0 { f32::from_bits(x.to_bits() + i as u32) } else { x + i as f32 * 0.0137 };
                lane.min(88.0)
            });
            // SAFETY: AVX-512 is available (checked above).
            unsafe {
                assert_lanes(|x| super::super::avx512::exp16_at_most_88(x), fast_exp_f32, &lanes);
                assert_lanes(|x| super::super::avx512::exp16_fma_at_most_88(x), fma_exp_f32, &lanes);
            }
            x = if x >= 80.0 { f32::from_bits(x.to_bits() + 16) } else { x + 0.0117 };
        }
    }

    #[test]
    fn exp8_fma_and_ln8_fma_are_their_scalar_forms_lane_by_lane() {
        if !super::super::avx2_enabled() {
            return;
        }
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, -f32::NAN, 1e30, -1e30];
        let mut x = -110.0f32;
        while x < 100.0 {
            let lanes: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.013_7);
            // SAFETY: AVX2 and FMA are available (checked above).
            unsafe { assert_lanes8(|x| exp8_fma(x), fma_exp_f32, &lanes) };
            x += 0.117;
        }
        // SAFETY: as above.
        unsafe { assert_lanes8(|x| exp8_fma(x), fma_exp_f32, &specials) };
        // Logarithms: row sums (1 to a few thousand) and the whole positive range.
        let mut x = 1e-37f32;
        while x < 3e38 {
            let lanes: [f32; 8] = std::array::from_fn(|i| x * (1.0 + i as f32 * 0.031));
            // SAFETY: as above.
            unsafe { assert_lanes8(|x| ln8_fma(x), fma_ln_f32, &lanes) };
            x *= 1.001_3;
        }
        let invalid = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, -1.0, 1e-40, f32::MIN_POSITIVE];
        // SAFETY: as above.
        unsafe { assert_lanes8(|x| ln8_fma(x), fma_ln_f32, &invalid) };
    }

    /// Asserts that `f` gives `scalar`'s bits (NaN where it gives NaN) on eight lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn assert_lanes8(f: impl Fn(__m256) -> __m256, scalar: fn(f32) -> f32, lanes: &[f32; 8]) {
        let mut out = [0f32; 8];
        // SAFETY: eight values each; the caller checked the CPU features.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), f(_mm256_loadu_ps(lanes.as_ptr()))) };
        for (o, &l) in out.iter().zip(lanes) {
            let expected = scalar(l);
            assert!(o.to_bits() == expected.to_bits() || (o.is_nan() && expected.is_nan()), "f({l})");
        }
    }

    /// Asserts that `f` gives `scalar`'s bits (NaN where it gives NaN) on sixteen lanes.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    unsafe fn assert_lanes(f: impl Fn(__m512) -> __m512, scalar: fn(f32) -> f32, lanes: &[f32; 16]) {
        let mut out = [0f32; 16];
        // SAFETY: sixteen values each; the caller checked the CPU features.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), f(_mm512_loadu_ps(lanes.as_ptr()))) };
        for (o, &l) in out.iter().zip(lanes) {
            let expected = scalar(l);
            assert!(o.to_bits() == expected.to_bits() || (o.is_nan() && expected.is_nan()), "f({l})");
        }
    }
}
