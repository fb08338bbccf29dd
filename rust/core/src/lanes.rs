//! Eight-lane block operations used by the selection loops, with SSE2 versions for `f32`
//! on x86_64 (SSE2 is part of the x86_64 baseline, so no runtime detection is needed) and
//! portable scalar versions everywhere else. Both give identical results.

/// Lanes per block.
pub const LANES: usize = 8;

pub trait BlockOps: Copy + PartialOrd {
    /// Bit `i` set where `block[i] >= bound && block[i] > threshold`.
    fn candidates(block: &[Self; LANES], bound: Self, threshold: Self) -> u32 {
        let mut mask = 0;
        for (lane, &v) in block.iter().enumerate() {
            mask |= u32::from(v >= bound && v > threshold) << lane;
        }
        mask
    }

    /// `acc[i] = max(acc[i], block[i])`, lane by lane.
    fn lane_max(acc: &mut [Self; LANES], block: &[Self; LANES]) {
        for (a, &v) in acc.iter_mut().zip(block) {
            if v > *a {
                *a = v;
            }
        }
    }

    /// Whether every lane is finite (not NaN, not infinite).
    fn all_finite(block: &[Self; LANES]) -> bool;
}

impl BlockOps for f64 {
    fn all_finite(block: &[f64; LANES]) -> bool {
        block.iter().all(|v| v.is_finite())
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl BlockOps for f32 {
    fn all_finite(block: &[f32; LANES]) -> bool {
        block.iter().all(|v| v.is_finite())
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use super::{BlockOps, LANES};
    use std::arch::x86_64::*;

    #[inline(always)]
    fn halves(block: &[f32; LANES]) -> (__m128, __m128) {
        // SAFETY: SSE2 is always available on x86_64; the loads read 2 x 4 in-bounds floats.
        unsafe { (_mm_loadu_ps(block.as_ptr()), _mm_loadu_ps(block.as_ptr().add(4))) }
    }

    impl BlockOps for f32 {
        #[inline(always)]
        fn candidates(block: &[f32; LANES], bound: f32, threshold: f32) -> u32 {
            let (lo, hi) = halves(block);
            // SAFETY: SSE2 is part of the x86_64 baseline.
            unsafe {
                let b = _mm_set1_ps(bound);
                let t = _mm_set1_ps(threshold);
                let m_lo = _mm_and_ps(_mm_cmpge_ps(lo, b), _mm_cmpgt_ps(lo, t));
                let m_hi = _mm_and_ps(_mm_cmpge_ps(hi, b), _mm_cmpgt_ps(hi, t));
                (_mm_movemask_ps(m_lo) | (_mm_movemask_ps(m_hi) << 4)) as u32
            }
        }

        #[inline(always)]
        fn lane_max(acc: &mut [f32; LANES], block: &[f32; LANES]) {
            let (lo, hi) = halves(block);
            let (a_lo, a_hi) = halves(acc);
            // SAFETY: SSE2 is part of the x86_64 baseline; stores are in bounds. Inputs are
            // finite when this runs on a valid row, so maxps matches `if v > a`; on a row
            // with NaN the result is discarded (the row is rejected).
            unsafe {
                _mm_storeu_ps(acc.as_mut_ptr(), _mm_max_ps(a_lo, lo));
                _mm_storeu_ps(acc.as_mut_ptr().add(4), _mm_max_ps(a_hi, hi));
            }
        }

        #[inline(always)]
        fn all_finite(block: &[f32; LANES]) -> bool {
            let (lo, hi) = halves(block);
            // SAFETY: SSE2 is part of the x86_64 baseline.
            unsafe {
                let abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fff_ffff));
                let inf = _mm_set1_ps(f32::INFINITY);
                // NaN compares false, so it fails like an infinity.
                let ok_lo = _mm_cmplt_ps(_mm_and_ps(lo, abs_mask), inf);
                let ok_hi = _mm_cmplt_ps(_mm_and_ps(hi, abs_mask), inf);
                (_mm_movemask_ps(ok_lo) & _mm_movemask_ps(ok_hi)) == 0xf
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_candidates(block: &[f32; LANES], bound: f32, threshold: f32) -> u32 {
        let mut mask = 0;
        for (lane, &v) in block.iter().enumerate() {
            mask |= u32::from(v >= bound && v > threshold) << lane;
        }
        mask
    }

    #[test]
    fn f32_block_ops_match_scalar_semantics() {
        let block = [0.5f32, -1.0, 2.0, 2.0, -0.0, 0.0, 7.5, -3.25];
        for (bound, threshold) in [(0.0, -1.0), (2.0, 1.0), (f32::NEG_INFINITY, 2.0), (9.0, 0.0)] {
            assert_eq!(
                f32::candidates(&block, bound, threshold),
                scalar_candidates(&block, bound, threshold)
            );
        }
        let mut acc = [1.0f32; LANES];
        f32::lane_max(&mut acc, &block);
        assert_eq!(acc, [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 7.5, 1.0]);
        assert!(f32::all_finite(&block));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut b = block;
            b[5] = bad;
            assert!(!f32::all_finite(&b));
        }
    }
}
