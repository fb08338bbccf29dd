//! An AVX-512 sorting network for up to 64 distinct 64-bit keys (packed `(logit, index)`
//! pairs), descending: the ranking of a whole row of experts in registers.
//!
//! Top-p gating needs a row's experts in descending order as far as its kept prefix goes.
//! A comparison sort of a 64-expert row costs about 500 ns; this bitonic network sorts the
//! row held in eight registers in a fixed sequence of about 500 register operations, with
//! no branches. Keys are distinct (the index is part of the key), so the order, and with it
//! every result, is the one a comparison sort gives.

use std::arch::x86_64::*;

/// The most keys [`sort_descending`] takes: eight registers of eight.
pub(crate) const MAX_KEYS: usize = 64;

/// Sorts `keys` (at most [`MAX_KEYS`], distinct, none zero) in descending order.
///
/// # Safety
/// The CPU features of [`super::avx512_enabled`] are available.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi1")]
pub(crate) unsafe fn sort_descending(keys: &mut [u64]) {
    debug_assert!(keys.len() <= MAX_KEYS);
    // Fewer registers for short rows: the network's cost grows with its width.
    // SAFETY: forwarded from the caller.
    unsafe {
        match keys.len() {
            0..=8 => sort_registers::<1>(keys),
            9..=16 => sort_registers::<2>(keys),
            17..=32 => sort_registers::<4>(keys),
            _ => sort_registers::<8>(keys),
        }
    }
}

/// Loads `keys` into `R` registers (zero in the unused lanes: smaller than every key, so they
/// sort to the end), sorts the `8 R` lanes, and stores the first `keys.len()` back.
#[inline(always)]
unsafe fn sort_registers<const R: usize>(keys: &mut [u64]) {
    debug_assert!(keys.len() <= 8 * R);
    // SAFETY: masked loads and stores touch only the lanes below `keys.len()`; the CPU
    // features are available (caller).
    unsafe {
        let mut v = [_mm512_setzero_si512(); R];
        for (r, reg) in v.iter_mut().enumerate() {
            let (at, mask) = lanes_from(keys.len(), r);
            *reg = _mm512_maskz_loadu_epi64(mask, keys.as_ptr().add(at).cast());
        }
        // Bitonic sort: merges of runs of `SIZE` elements, each a sequence of compare-
        // exchanges at halving distances. Element i = 8 r + lane. A pair (i, i ^ d) is put
        // in descending order when `i & SIZE == 0`, ascending otherwise; the last merge
        // (`SIZE` the whole width) leaves everything descending. Every step is its own
        // monomorphised call so that the masks and shuffles are constants and the
        // registers stay registers.
        merge!(v, R; 2: 1);
        merge!(v, R; 4: 2, 1);
        merge!(v, R; 8: 4, 2, 1);
        if R >= 2 {
            merge!(v, R; 16: 8, 4, 2, 1);
        }
        if R >= 4 {
            merge!(v, R; 32: 16, 8, 4, 2, 1);
        }
        if R >= 8 {
            merge!(v, R; 64: 32, 16, 8, 4, 2, 1);
        }
        for (r, reg) in v.iter().enumerate() {
            let (at, mask) = lanes_from(keys.len(), r);
            _mm512_mask_storeu_epi64(keys.as_mut_ptr().add(at).cast(), mask, *reg);
        }
    }
}

/// Where register `r`'s lanes start in a row of `len` keys, and the mask of its lanes that
/// hold keys (the start is clamped to `len` when none does, so the pointer stays in bounds).
#[inline(always)]
fn lanes_from(len: usize, r: usize) -> (usize, __mmask8) {
    let at = (8 * r).min(len);
    let count = len - at;
    (at, if count >= 8 { 0xff } else { ((1u16 << count) - 1) as __mmask8 })
}

/// The compare-exchange steps of one bitonic merge of runs of `$size`, at the distances
/// listed.
macro_rules! merge {
    ($v:ident, $r:ident; $size:literal: $($distance:literal),+) => {
        $(step::<$r, $size, $distance>(&mut $v);)+
    };
}
use merge;

/// One compare-exchange step of a merge of runs of `SIZE` at element distance `DISTANCE`.
#[inline(always)]
unsafe fn step<const R: usize, const SIZE: usize, const DISTANCE: usize>(v: &mut [__m512i; R]) {
    // SAFETY: register-only AVX-512 F operations (caller: the features are available).
    unsafe {
        if DISTANCE >= 8 {
            let apart = DISTANCE / 8;
            for r in 0..R {
                if r & apart != 0 || r + apart >= R {
                    continue;
                }
                let (low, high) = (v[r], v[r + apart]);
                let (larger, smaller) = (_mm512_max_epu64(low, high), _mm512_min_epu64(low, high));
                (v[r], v[r + apart]) =
                    if (8 * r) & SIZE == 0 { (larger, smaller) } else { (smaller, larger) };
            }
        } else {
            let masks = const { larger_lanes(SIZE, DISTANCE) };
            for (reg, &mask) in v.iter_mut().zip(&masks) {
                let partner = match DISTANCE {
                    // Swap neighbouring 64-bit lanes (dwords 2, 3, 0, 1 of each 128 bits).
                    1 => _mm512_shuffle_epi32::<0x4E>(*reg),
                    // Swap pairs of lanes within each 256 bits.
                    2 => _mm512_permutex_epi64::<0x4E>(*reg),
                    // Swap the quadruples (128-bit blocks 2, 3, 0, 1).
                    _ => _mm512_shuffle_i64x2::<0x4E>(*reg, *reg),
                };
                *reg = _mm512_mask_blend_epi64(
                    mask,
                    _mm512_min_epu64(*reg, partner),
                    _mm512_max_epu64(*reg, partner),
                );
            }
        }
    }
}

/// For each of eight registers, the lanes that keep the larger key of their pair at
/// `distance` (< 8) within a merge of runs of `size`: the lower element of a descending
/// pair, the upper of an ascending one.
const fn larger_lanes(size: usize, distance: usize) -> [__mmask8; 8] {
    let mut masks = [0u8; 8];
    let mut i = 0;
    while i < 64 {
        let lower = i & distance == 0;
        let descending = i & size == 0;
        if lower == descending {
            masks[i / 8] |= 1 << (i % 8);
        }
        i += 1;
    }
    masks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_like_a_comparison_sort() {
        if !super::super::avx512_enabled() {
            return;
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in 0..=MAX_KEYS {
            for round in 0..20 {
                // Distinct, non-zero keys; some rounds with few distinct high halves (ties in
                // the logit, broken by the index in the low half).
                let mut keys: Vec<u64> = (0..len)
                    .map(|j| {
                        let high = if round % 2 == 0 { next() >> 32 } else { next() % 3 };
                        (high << 32) | (u64::from(u32::MAX) - j as u64)
                    })
                    .collect();
                let mut expected = keys.clone();
                expected.sort_unstable_by(|a, b| b.cmp(a));
                // SAFETY: AVX-512 is available (checked above).
                unsafe { sort_descending(&mut keys) };
                assert_eq!(keys, expected, "{len} keys, round {round}");
            }
        }
    }
}
