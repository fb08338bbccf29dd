//! Element types the kernels read and write, and the precision they compute in.
//!
//! Router math and every accumulation run in `f32` for 16- and 32-bit inputs
//! (DESIGN: "router math in fp32"); `f64` inputs compute in `f64` so that gradients can be
//! checked against finite differences.

use crate::lanes::BlockOps;
use half::{bf16, f16};
use num_traits::Float;

/// The type arithmetic is carried out in: `f32` or `f64`.
pub trait Accumulator: Float + BlockOps + Send + Sync + std::iter::Sum + std::fmt::Debug + 'static {
    /// The epsilon added to the sum of sigmoid scores before normalising.
    const SIGMOID_NORM_EPS: Self;
    /// A (key, index) pair packed into one integer whose order is the selection order:
    /// higher key first, then lower index first.
    type Packed: Ord + Copy + Send + Sync;
    fn from_f64(v: f64) -> Self;
    /// Packs a non-NaN key with its index; -0.0 and 0.0 pack equal keys.
    fn pack(self, index: usize) -> Self::Packed;
    fn unpack_key(packed: Self::Packed) -> Self;
    fn unpack_index(packed: Self::Packed) -> usize;
}

/// Maps float bits to unsigned integers of the same order (for non-NaN floats), without
/// branches: negative floats have all bits flipped, positive ones only the sign bit.
macro_rules! ordered_bits {
    ($bits:expr, $signed:ty, $unsigned:ty) => {{
        let bits = $bits;
        let sign = <$unsigned>::MAX ^ (<$unsigned>::MAX >> 1);
        bits ^ ((((bits as $signed) >> (<$unsigned>::BITS - 1)) as $unsigned) | sign)
    }};
}

/// The inverse of `ordered_bits!`.
macro_rules! float_bits {
    ($key:expr, $signed:ty, $unsigned:ty) => {{
        let key = $key;
        let sign = <$unsigned>::MAX ^ (<$unsigned>::MAX >> 1);
        // Top bit set: a non-negative float, only the sign bit was flipped.
        key ^ ((!(((key as $signed) >> (<$unsigned>::BITS - 1)) as $unsigned)) | sign)
    }};
}

impl Accumulator for f32 {
    const SIGMOID_NORM_EPS: f32 = 1e-20;
    type Packed = u64;
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn pack(self, index: usize) -> u64 {
        let key = ordered_bits!((self + 0.0).to_bits(), i32, u32);
        (u64::from(key) << 32) | u64::from(u32::MAX - index as u32)
    }
    #[inline(always)]
    fn unpack_key(packed: u64) -> f32 {
        f32::from_bits(float_bits!((packed >> 32) as u32, i32, u32))
    }
    #[inline(always)]
    fn unpack_index(packed: u64) -> usize {
        (u32::MAX - packed as u32) as usize
    }
}

impl Accumulator for f64 {
    const SIGMOID_NORM_EPS: f64 = 1e-20;
    type Packed = u128;
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn pack(self, index: usize) -> u128 {
        let key = ordered_bits!((self + 0.0).to_bits(), i64, u64);
        (u128::from(key) << 64) | u128::from(u64::MAX - index as u64)
    }
    #[inline(always)]
    fn unpack_key(packed: u128) -> f64 {
        f64::from_bits(float_bits!((packed >> 64) as u64, i64, u64))
    }
    #[inline(always)]
    fn unpack_index(packed: u128) -> usize {
        (u64::MAX - packed as u64) as usize
    }
}

/// A floating-point storage type of tensors: `f64`, `f32`, `bf16` or `f16`.
pub trait Element: Copy + Send + Sync + Default + 'static {
    type Acc: Accumulator;
    /// The dtype name used in error messages.
    const NAME: &'static str;
    fn to_acc(self) -> Self::Acc;
    /// Rounds to nearest even (the conversion torch uses).
    fn from_acc(v: Self::Acc) -> Self;
}

impl Element for f64 {
    type Acc = f64;
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f64) -> f64 {
        v
    }
}

impl Element for f32 {
    type Acc = f32;
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f32) -> f32 {
        v
    }
}

impl Element for bf16 {
    type Acc = f32;
    const NAME: &'static str = "bfloat16";
    /// The bits shifted into the high half: exact for every value, NaN payloads included
    /// (as torch converts), and vectorisable.
    #[inline(always)]
    fn to_acc(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    /// Round to nearest even, NaN stays a (quiet) NaN: the same bits as
    /// `half::bf16::from_f32` and torch, written without branches so that loops over it
    /// vectorise.
    #[inline(always)]
    fn from_acc(v: f32) -> bf16 {
        let bits = v.to_bits();
        let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
        let quiet_nan = ((bits >> 16) | 0x40) as u16;
        bf16::from_bits(if bits & 0x7fff_ffff > 0x7f80_0000 { quiet_nan } else { rounded })
    }
}

impl Element for f16 {
    type Acc = f32;
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_is_exact() {
        for bits in [0u16, 0x3f80, 0xbf80, 0x7f7f, 0x0001] {
            let v = bf16::from_bits(bits);
            assert_eq!(bf16::from_acc(v.to_acc()).to_bits(), bits);
        }
    }

    #[test]
    fn packed_order_is_selection_order() {
        let keys = [-3.5f32, -0.0, 0.0, 1e-30, 2.0, f32::NEG_INFINITY, f32::MAX];
        for &a in &keys {
            for &b in &keys {
                for (i, j) in [(0usize, 1usize), (1, 0), (4, 4)] {
                    let expected = a.partial_cmp(&b).unwrap().then(j.cmp(&i));
                    assert_eq!(a.pack(i).cmp(&b.pack(j)), expected, "{a} @ {i} vs {b} @ {j}");
                    assert_eq!(f32::unpack_index(a.pack(i)), i);
                    assert_eq!(f64::unpack_index(f64::from(a).pack(i)), i);
                    assert_eq!(f64::from(a).pack(i).cmp(&f64::from(b).pack(j)), expected);
                }
                assert_eq!(f32::unpack_key(a.pack(3)), a + 0.0);
                assert_eq!(f64::unpack_key(f64::from(a).pack(3)), f64::from(a) + 0.0);
            }
        }
    }

    #[test]
    fn bf16_conversion_matches_half() {
        let mut state = 1u64;
        let specials =
            [0u32, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x7f80_0001, 0x7f7f_ffff, 0x3f80_8000];
        let random = (0..1_000_000).map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 32) as u32
        });
        for bits in specials.into_iter().chain(random) {
            let v = f32::from_bits(bits);
            assert_eq!(bf16::from_acc(v).to_bits(), bf16::from_f32(v).to_bits(), "{bits:#x}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
        assert_eq!(bf16::from_acc(1.0 + 2f32.powi(-8)).to_bits(), 0x3f80);
        assert_eq!(f16::from_acc(1.0 + 2f32.powi(-11)).to_bits(), 0x3c00);
    }
}
