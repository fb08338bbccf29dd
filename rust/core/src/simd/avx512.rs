//! Building blocks of the AVX-512 kernels: logits of each storage type read as sixteen
//! f32 lanes, whole or masked.
//!
//! Every function here requires the CPU features of [`super::avx512_enabled`]; callers run
//! inside `#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,...")]`
//! functions that also enable the AVX2 set.

use super::avx2::{Bf16Rows, F16Rows, F32Rows, Source};
use crate::element::{EXP_LOWEST, EXP_MAGIC, EXP_POLY, FMA_EXP_POLY, LN2_HI, LN2_LO};
use std::arch::x86_64::*;

/// Logits of one storage type, read as sixteen f32 lanes.
pub(crate) trait Source16: Source {
    /// Sixteen values from `at`.
    ///
    /// # Safety
    /// `at + 16 <= len`; the CPU features of [`super::avx512_enabled`] are available.
    unsafe fn load16(self, at: usize) -> __m512;

    /// The values from `at` in the lanes of `mask` (which must be the lowest lanes), `fill`
    /// in the others. Memory past the set lanes is not read.
    ///
    /// # Safety
    /// `at + mask.count_ones() <= len`; the features of [`super::avx512_enabled`] are
    /// available.
    unsafe fn load16_masked(self, at: usize, mask: __mmask16, fill: __m512) -> __m512;
}

impl Source16 for F32Rows<'_> {
    #[inline(always)]
    unsafe fn load16(self, at: usize) -> __m512 {
        debug_assert!(at + 16 <= self.0.len());
        // SAFETY: sixteen in-bounds values (caller), AVX-512 available (caller).
        unsafe { _mm512_loadu_ps(self.0.as_ptr().add(at)) }
    }
    #[inline(always)]
    unsafe fn load16_masked(self, at: usize, mask: __mmask16, fill: __m512) -> __m512 {
        debug_assert!(at + mask.count_ones() as usize <= self.0.len());
        // SAFETY: `at` lies inside the slice or one past it, and the masked load reads only
        // the set lanes, which are in bounds (caller).
        unsafe { _mm512_mask_loadu_ps(fill, mask, self.0.as_ptr().add(at)) }
    }
}

/// Sixteen bf16 bit patterns widened to f32: exact (bf16 is the high half of an f32).
#[inline(always)]
unsafe fn widen_bf16(bits: __m256i) -> __m512 {
    // SAFETY: register-only AVX-512 operations.
    unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits))) }
}

impl Source16 for Bf16Rows<'_> {
    #[inline(always)]
    unsafe fn load16(self, at: usize) -> __m512 {
        debug_assert!(at + 16 <= self.0.len());
        // SAFETY: sixteen in-bounds values (caller), AVX-512 available (caller).
        unsafe { widen_bf16(_mm256_loadu_si256(self.0.as_ptr().add(at).cast())) }
    }
    #[inline(always)]
    unsafe fn load16_masked(self, at: usize, mask: __mmask16, fill: __m512) -> __m512 {
        debug_assert!(at + mask.count_ones() as usize <= self.0.len());
        // SAFETY: as for f32: only the set lanes are read, and they are in bounds.
        unsafe {
            let bits = _mm256_maskz_loadu_epi16(mask, self.0.as_ptr().add(at).cast());
            _mm512_mask_blend_ps(mask, fill, widen_bf16(bits))
        }
    }
}

impl Source16 for F16Rows<'_> {
    #[inline(always)]
    unsafe fn load16(self, at: usize) -> __m512 {
        debug_assert!(at + 16 <= self.0.len());
        // SAFETY: sixteen in-bounds values (caller), AVX-512 available (caller).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(self.0.as_ptr().add(at).cast())) }
    }
    #[inline(always)]
    unsafe fn load16_masked(self, at: usize, mask: __mmask16, fill: __m512) -> __m512 {
        debug_assert!(at + mask.count_ones() as usize <= self.0.len());
        // SAFETY: as for f32: only the set lanes are read, and they are in bounds.
        unsafe {
            let bits = _mm256_maskz_loadu_epi16(mask, self.0.as_ptr().add(at).cast());
            _mm512_mask_blend_ps(mask, fill, _mm512_cvtph_ps(bits))
        }
    }
}

/// `fast_exp_f32` on sixteen lanes at or below 88 (or NaN): the same bits in every lane.
/// `fast_exp_f32` applies `2^n` as two factors built from exponent bits (`exp_scale`: the
/// first product exact, the second rounding once, to a subnormal where the result is one);
/// `scalef` multiplies by `2^n` and rounds once, so the same bits in fewer operations. At or
/// below 88 the upper clamp has nothing to do. Used on softmax's shifted values (at most 0).
#[inline(always)]
pub(crate) unsafe fn exp16_at_most_88(x: __m512) -> __m512 {
    // SAFETY: register-only AVX-512 operations (caller: the features are available).
    unsafe {
        // `fast_exp_f32`'s order: the lower clamp, `t = x log2(e) + 1.5 * 2^23` (n in its low
        // bits), `n`, `r = x - n ln 2` in two parts, the polynomial for `e^r`. A NaN stays NaN.
        let x = _mm512_max_ps(_mm512_set1_ps(EXP_LOWEST), x);
        let magic = _mm512_set1_ps(EXP_MAGIC);
        let t = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)), magic);
        let n = _mm512_sub_ps(t, magic);
        let r = _mm512_sub_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(LN2_HI))),
            _mm512_mul_ps(n, _mm512_set1_ps(LN2_LO)),
        );
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(*c));
        }
        let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }
}

/// [`crate::element::fma_exp_f32`] of sixteen lanes at or below 88 (or NaN), with the
/// shortcuts of [`exp16_at_most_88`]: the same bits as `fma_exp_f32` on that range.
#[inline(always)]
pub(crate) unsafe fn exp16_fma_at_most_88(x: __m512) -> __m512 {
    // SAFETY: register-only AVX-512 operations (caller: the features are available).
    unsafe {
        let x = _mm512_max_ps(_mm512_set1_ps(EXP_LOWEST), x);
        let magic = _mm512_set1_ps(EXP_MAGIC);
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm512_sub_ps(t, magic);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(FMA_EXP_POLY[0]);
        for c in &FMA_EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let one = _mm512_set1_ps(1.0);
        _mm512_scalef_ps(_mm512_fmadd_ps(r, _mm512_fmadd_ps(p, r, one), one), n)
    }
}

/// [`exp16_at_most_88`], or with `FMA` [`exp16_fma_at_most_88`].
#[inline(always)]
unsafe fn exp16_shifted<const FMA: bool>(x: __m512) -> __m512 {
    // SAFETY: forwarded from the caller.
    unsafe {
        if FMA {
            exp16_fma_at_most_88(x)
        } else {
            exp16_at_most_88(x)
        }
    }
}

/// `out = fma_exp(x)` for every value, sixteen at a time (the same bits), and whether
/// every value is at most 88 and above `-inf` (NaN is not): Sinkhorn's cost pass. Values
/// above 88 make the call fail, so their (wrong) exponentials from
/// [`exp16_fma_at_most_88`] never reach a result.
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(crate) unsafe fn exp_checked(x: &[f32], out: &mut [f32]) -> bool {
    debug_assert_eq!(x.len(), out.len());
    // SAFETY: masked loads and stores touch only the lanes below x.len() (caller: out is as
    // long); the features are available (caller).
    unsafe {
        let (limit, minus_inf) = (_mm512_set1_ps(88.0), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut bad: __mmask16 = 0;
        for at in (0..x.len()).step_by(16) {
            let left = x.len() - at;
            let lanes: __mmask16 = if left >= 16 { 0xffff } else { (1u16 << left) - 1 };
            let v = _mm512_maskz_loadu_ps(lanes, x.as_ptr().add(at));
            // Ordered comparisons: NaN fails both.
            let ok =
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, limit) & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, minus_inf);
            bad |= lanes & !ok;
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(at), lanes, exp16_fma_at_most_88(v));
        }
        bad == 0
    }
}

/// [`super::avx2::exp_shifted`] with the exponentials sixteen at a time: the same maximum,
/// the same `fast_exp` (with `FMA`, `fma_exp`) bits, and the same eight-lane sums (each half of a sixteen-lane
/// block added in order), so the same results.
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available; the row lies inside `src`.
#[inline(always)]
pub(crate) unsafe fn exp_shifted<S: Source16, const CHECK_FINITE: bool, const FMA: bool>(
    src: S,
    start: usize,
    out: &mut [f32],
) -> Option<(f32, f32)> {
    let whole = out.len() / 8 * 8;
    let pairs = out.len() / 16 * 16;
    // SAFETY: loads of sixteen (eight) values at start + b with b + 16 <= pairs (b + 8 <=
    // whole), inside the row; stores likewise inside `out`.
    unsafe {
        let m = super::avx2::row_max::<_, CHECK_FINITE>(src, start, out.len())?;
        let shift = _mm512_set1_ps(m);
        let mut sums = _mm256_setzero_ps();
        for b in (0..pairs).step_by(16) {
            // At or below zero: the maximum was subtracted.
            let e = exp16_shifted::<FMA>(_mm512_sub_ps(src.load16(start + b), shift));
            sums = _mm256_add_ps(sums, _mm512_castps512_ps256(e));
            sums = _mm256_add_ps(sums, _mm512_extractf32x8_ps::<1>(e));
            _mm512_storeu_ps(out.as_mut_ptr().add(b), e);
        }
        if pairs < whole {
            let x = _mm256_sub_ps(src.load8(start + pairs), _mm256_set1_ps(m));
            let e = if FMA { super::avx2::exp8_fma_nonpositive(x) } else { super::avx2::exp8_nonpositive(x) };
            sums = _mm256_add_ps(sums, e);
            _mm256_storeu_ps(out.as_mut_ptr().add(pairs), e);
        }
        Some((m, super::avx2::tail_sum::<_, FMA>(src, start, out, m, sums)))
    }
}

/// Rows taken together by [`exp_shifted_rows`].
pub(crate) const ROWS: usize = 8;

/// [`exp_shifted`] of [`ROWS`] consecutive rows of `len` values from `start` (with `STORE`,
/// into `out`, the rows back to back): the same maximum, `fast_exp` (with `FMA`, `fma_exp`) bits and
/// lane sums row by row, but the rows' chains of dependent operations (the maximum, the
/// lane sums and their fold) overlap instead of running one after another. A row's last
/// `len % 16` values go through masked loads and stores; its masked-off lanes add `+0.0` to
/// the lane sums, which changes no sum. Returns each row's `(max, sum)` and, with
/// `CHECK_FINITE`, a mask of the rows that hold NaN or an infinity (bit `r` for row `r`;
/// 0 without). Without `STORE` the exponentials are only summed and `out` may be empty: the
/// z-loss needs neither the mask (NaN and `+inf` make its sum NaN, which it reports) nor
/// the values, and leaving them out saves a class test, a mask OR and a store per sixteen
/// values.
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available; the rows lie inside `src`;
/// `len > 0`; with `STORE`, `out.len() == ROWS * len`.
#[inline(always)]
pub(crate) unsafe fn exp_shifted_rows<
    S: Source16,
    const CHECK_FINITE: bool,
    const STORE: bool,
    const FMA: bool,
>(
    src: S,
    start: usize,
    len: usize,
    out: &mut [f32],
) -> ([f32; ROWS], [f32; ROWS], u8) {
    debug_assert!(len > 0 && (!STORE || out.len() == ROWS * len));
    let (whole, tail) = blocks_of_sixteen(len);
    // QNaN, SNaN, +inf and -inf.
    const NOT_FINITE: i32 = 0x01 | 0x80 | 0x08 | 0x10;
    // SAFETY: loads of sixteen values at start + r * len + b with b + 16 <= whole, and
    // masked loads of the `tail` lanes from whole (inside the rows, caller); stores likewise
    // inside `out`.
    unsafe {
        let minus_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut maxima = [0f32; ROWS];
        let mut not_finite = 0u8;
        for (r, m) in maxima.iter_mut().enumerate() {
            let base = start + r * len;
            let mut v = minus_inf;
            let mut bad: __mmask16 = 0;
            for b in (0..whole).step_by(16) {
                let w = src.load16(base + b);
                if CHECK_FINITE {
                    bad |= _mm512_fpclass_ps_mask::<NOT_FINITE>(w);
                }
                v = _mm512_max_ps(v, w);
            }
            if tail != 0 {
                let w = src.load16_masked(base + whole, tail, minus_inf);
                if CHECK_FINITE {
                    bad |= tail & _mm512_fpclass_ps_mask::<NOT_FINITE>(w);
                }
                v = _mm512_max_ps(v, w);
            }
            // The maximum of finite values is the same in any order.
            *m = _mm512_reduce_max_ps(v);
            not_finite |= u8::from(bad != 0) << r;
        }
        // (Loops rather than closures: a closure does not inherit the target features, and
        // its intrinsics would become calls.)
        let mut sums = [_mm256_setzero_ps(); ROWS];
        let mut shifts = [_mm512_setzero_ps(); ROWS];
        for (shift, &m) in shifts.iter_mut().zip(&maxima) {
            *shift = _mm512_set1_ps(m);
        }
        for b in (0..whole).step_by(16) {
            for (r, (sum, &shift)) in sums.iter_mut().zip(&shifts).enumerate() {
                // At or below zero: the maximum was subtracted.
                let e = exp16_shifted::<FMA>(_mm512_sub_ps(src.load16(start + r * len + b), shift));
                *sum = _mm256_add_ps(*sum, _mm512_castps512_ps256(e));
                *sum = _mm256_add_ps(*sum, _mm512_extractf32x8_ps::<1>(e));
                if STORE {
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * len + b), e);
                }
            }
        }
        if tail != 0 {
            for (r, (sum, &shift)) in sums.iter_mut().zip(&shifts).enumerate() {
                // The masked-off lanes load the shift itself: e^0, then zeroed.
                let x = src.load16_masked(start + r * len + whole, tail, shift);
                let e = _mm512_maskz_mov_ps(tail, exp16_shifted::<FMA>(_mm512_sub_ps(x, shift)));
                *sum = _mm256_add_ps(*sum, _mm512_castps512_ps256(e));
                *sum = _mm256_add_ps(*sum, _mm512_extractf32x8_ps::<1>(e));
                if STORE {
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(r * len + whole), tail, e);
                }
            }
        }
        let mut totals = [0f32; ROWS];
        for (total, &sum) in totals.iter_mut().zip(&sums) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
            *total = lanes.iter().copied().fold(0.0, |a, b| a + b);
        }
        (maxima, totals, not_finite)
    }
}

/// The values of a row of `len` taken in whole blocks of sixteen (`len / 16 * 16`), and the
/// mask of the lanes of the last, partial block (0 when there is none).
#[inline(always)]
fn blocks_of_sixteen(len: usize) -> (usize, __mmask16) {
    let whole = len / 16 * 16;
    (whole, ((1u32 << (len - whole)) - 1) as __mmask16)
}

/// Row `r` of the [`ROWS`] rows held back to back in `out`, times `by[r]` (or divided by it,
/// with `DIVIDE`), sixteen values at a time with a masked last block.
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available; `out.len()` is a multiple
/// of `ROWS`.
#[inline(always)]
pub(crate) unsafe fn scale_rows<const DIVIDE: bool>(out: &mut [f32], by: &[f32; ROWS]) {
    let len = out.len() / ROWS;
    let (whole, tail) = blocks_of_sixteen(len);
    // SAFETY: sixteen values at r * len + b with b + 16 <= whole, and the `tail` lanes from
    // r * len + whole: inside `out`.
    unsafe {
        for (r, &value) in by.iter().enumerate() {
            let by = _mm512_set1_ps(value);
            let row = out.as_mut_ptr().add(r * len);
            for b in (0..whole).step_by(16) {
                let v = _mm512_loadu_ps(row.add(b));
                let v = if DIVIDE { _mm512_div_ps(v, by) } else { _mm512_mul_ps(v, by) };
                _mm512_storeu_ps(row.add(b), v);
            }
            if tail != 0 {
                // The masked-off lanes load zeros and are not stored.
                let v = _mm512_maskz_loadu_ps(tail, row.add(whole));
                let v = if DIVIDE { _mm512_div_ps(v, by) } else { _mm512_mul_ps(v, by) };
                _mm512_mask_storeu_ps(row.add(whole), tail, v);
            }
        }
    }
}

/// `out = softmax(row)` of [`ROWS`] consecutive rows of `len` values from `start`, as
/// [`softmax_row`] computes each: the same bits. Returns the mask of rows that hold NaN or
/// an infinity (their `out` is garbage).
///
/// # Safety
/// As [`exp_shifted_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(crate) unsafe fn softmax_rows(rows: crate::element::Storage<'_>, start: usize, out: &mut [f32]) -> u8 {
    // SAFETY: forwarded from the caller.
    unsafe {
        let (_, sums, not_finite) =
            super::avx2::with_source!(rows, |src| exp_shifted_rows::<_, true, true, false>(
                src,
                start,
                out.len() / ROWS,
                &mut *out
            ));
        scale_rows::<true>(out, &sums);
        not_finite
    }
}

/// A tile of sixteen rows of `width` values, written column by column: value `(i, e)` of
/// `tile` goes to `out[e * stride + i]` (sixteen gathered values, one store per column).
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available; `tile.len() == 16 * width`;
/// `out + e * stride .. + 16` is valid for writes for every `e < width`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(crate) unsafe fn write_columns(tile: &[f32], width: usize, out: *mut f32, stride: usize) {
    debug_assert_eq!(tile.len(), 16 * width);
    // SAFETY: gathers read tile[i * width + e] for i < 16, e < width (inside `tile`); the
    // stores are valid (caller).
    unsafe {
        let rows = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(width as i32),
        );
        for e in 0..width {
            let column = _mm512_i32gather_ps::<4>(rows, tile.as_ptr().add(e));
            _mm512_storeu_ps(out.add(e * stride), column);
        }
    }
}

/// [`super::avx2::softmax_row`] with [`exp_shifted`]: the same bits.
///
/// # Safety
/// As [`exp_shifted`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(crate) unsafe fn softmax_row(rows: crate::element::Storage<'_>, start: usize, out: &mut [f32]) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe { super::avx2::with_source!(rows, |src| super::avx2::softmax_row_in::<_, true>(src, start, out)) }
}
