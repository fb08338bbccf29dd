//! Building blocks of the AVX-512 kernels: logits of each storage type read as sixteen
//! f32 lanes, whole or masked.
//!
//! Every function here requires the CPU features of [`super::avx512_enabled`]; callers run
//! inside `#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,...")]`
//! functions that also enable the AVX2 set.

use super::avx2::{Bf16Rows, F16Rows, F32Rows, Source};
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
