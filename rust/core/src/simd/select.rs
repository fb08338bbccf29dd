//! Exact selection of the `c` best of many probabilities with AVX-512: a threshold from a
//! sample, one compressing pass that keeps the positions at or above it, and an exact
//! selection over those few.
//!
//! Expert-choice routing picks, for each expert, its `c` best tokens out of `T` (with
//! `c = T / 32` typically). A radix histogram over all `T` values costs a scattered
//! increment per value; here the full pass is sixteen comparisons and one compression per
//! instruction, and the exact work runs on about twice `c` candidates.

use std::arch::x86_64::*;

thread_local! {
    /// The pass's output, kept between calls: as large as a column, and a fresh one each
    /// time costs page faults that serialise the threads.
    static POSITIONS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Below this many values, the caller's general selection is as fast.
pub(crate) const MIN_VALUES: usize = 1024;

/// Every how many values the threshold's sample takes one.
const SAMPLE_STRIDE: usize = 16;

/// The positions `t` of the `c` best pairs `(values[t], t)` (higher value first, then lower
/// position), in ascending order; `None` when the sampled threshold kept fewer than `c`
/// values (then the caller selects another way). `values` are non-negative and not NaN
/// (probabilities), so their bit patterns order as the values do; `0 < c <= values.len()`.
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(crate) unsafe fn best_positions(values: &[f32], c: usize) -> Option<Vec<usize>> {
    debug_assert!(c > 0 && c <= values.len() && values.len() <= u32::MAX as usize);
    let threshold = sampled_threshold(values, c);
    // Packed (value bits, inverted position): the selection order is the integer order.
    let key = |t: u32| (u64::from(values[t as usize].to_bits()) << 32) | u64::from(u32::MAX - t);
    POSITIONS.with_borrow_mut(|candidates| {
        // SAFETY: forwarded from the caller.
        unsafe { positions_at_least(values, threshold, candidates) };
        if candidates.len() < c {
            return None;
        }
        let mut keys: Vec<u64> = candidates.iter().map(|&t| key(t)).collect();
        let cth = *keys.select_nth_unstable_by(c - 1, |a, b| b.cmp(a)).1;
        // Exactly c keys are at least the c-th best (keys are distinct); in position order.
        let best: Vec<usize> = candidates.iter().filter(|&&t| key(t) >= cth).map(|&t| t as usize).collect();
        debug_assert_eq!(best.len(), c);
        Some(best)
    })
}

/// A bit pattern that about `1.25 c + 12 sqrt(c) + 64` values reach, judged from every
/// [`SAMPLE_STRIDE`]-th value: enough that fewer than `c` is rare, few enough that the exact
/// selection after it stays small.
fn sampled_threshold(values: &[f32], c: usize) -> u32 {
    let mut sample: Vec<u32> = values.iter().step_by(SAMPLE_STRIDE).map(|v| v.to_bits()).collect();
    let expected = c as f64 * sample.len() as f64 / values.len() as f64;
    let rank = (1.25 * expected + 3.0 * expected.sqrt() + 4.0).ceil() as usize;
    if rank >= sample.len() {
        return 0;
    }
    *sample.select_nth_unstable_by(rank - 1, |a, b| b.cmp(a)).1
}

/// The positions of the values whose bit pattern is at least `threshold`, in order.
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available.
#[inline(always)]
unsafe fn positions_at_least(values: &[f32], threshold: u32, out: &mut Vec<u32>) {
    // Room for a whole block of sixteen past the last kept position: each block stores all
    // sixteen lanes of its compressed positions and moves on by the number kept.
    out.clear();
    out.reserve(values.len() + 16);
    let mut kept = 0usize;
    // SAFETY: loads of sixteen values at b + 16 <= values.len() (the tail masked to what is
    // left); stores of sixteen at kept <= b < values.len(), inside the capacity; only the
    // first `kept` are marked initialised, and all of those were written.
    unsafe {
        let limit = _mm512_set1_epi32(threshold as i32);
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut b = 0;
        while b < values.len() {
            let left = values.len() - b;
            let valid: __mmask16 = if left >= 16 { 0xffff } else { (1u16 << left) - 1 };
            let bits = _mm512_maskz_loadu_epi32(valid, values.as_ptr().add(b).cast());
            let pass = _mm512_mask_cmpge_epu32_mask(valid, bits, limit);
            let positions = _mm512_add_epi32(lanes, _mm512_set1_epi32(b as i32));
            _mm512_storeu_si512(
                out.as_mut_ptr().add(kept).cast(),
                _mm512_maskz_compress_epi32(pass, positions),
            );
            kept += pass.count_ones() as usize;
            b += 16;
        }
        out.set_len(kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: sort every (value, position) pair.
    fn by_sorting(values: &[f32], c: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        let mut best = order[..c].to_vec();
        best.sort_unstable();
        best
    }

    #[test]
    fn matches_sorting() {
        if !super::super::avx512_enabled() {
            return;
        }
        let mut rng = crate::test_rng::TestRng::new(3);
        let mut next = || rng.unit_f32();
        for n in [1024usize, 1037, 5000] {
            for round in 0..6 {
                let values: Vec<f32> = (0..n)
                    .map(|_| match round {
                        0 => next() * next() * next(),
                        // Few distinct values: ties broken by position.
                        1 => (next() * 4.0).floor() / 8.0,
                        2 => 0.25,
                        // The best values all at the end (the sample sees none of some).
                        _ => next() * 1e-3,
                    })
                    .collect();
                let mut values = values;
                if round >= 3 {
                    for v in values.iter_mut().rev().take(round * 7) {
                        *v += 1.0;
                    }
                }
                for c in [1, 2, n / 32, n / 7, n / 2, n] {
                    let c = c.max(1);
                    // SAFETY: AVX-512 is available (checked above).
                    if let Some(best) = unsafe { best_positions(&values, c) } {
                        assert_eq!(best, by_sorting(&values, c), "n = {n}, round {round}, c = {c}");
                    }
                }
                // The usual expert-choice shape never falls back.
                // SAFETY: as above.
                assert!(round >= 3 || unsafe { best_positions(&values, n / 32) }.is_some());
            }
        }
    }
}
