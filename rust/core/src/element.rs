//! Element types the kernels read and write, and the precision they compute in.
//!
//! Router math and every accumulation run in `f32` for 16- and 32-bit inputs
//! (DESIGN: "router math in fp32"); `f64` inputs compute in `f64` so that gradients can be
//! checked against finite differences.

use half::{bf16, f16};
use num_traits::Float;

/// The type arithmetic is carried out in: `f32` or `f64`.
pub trait Accumulator: Float + Send + Sync + std::iter::Sum + std::fmt::Debug + 'static {
    /// The epsilon added to the sum of sigmoid scores before normalising.
    const SIGMOID_NORM_EPS: Self;
    fn from_f64(v: f64) -> Self;
}

impl Accumulator for f32 {
    const SIGMOID_NORM_EPS: f32 = 1e-20;
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
}

impl Accumulator for f64 {
    const SIGMOID_NORM_EPS: f64 = 1e-20;
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
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
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(v: f32) -> bf16 {
        bf16::from_f32(v)
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
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
        assert_eq!(bf16::from_acc(1.0 + 2f32.powi(-8)).to_bits(), 0x3f80);
        assert_eq!(f16::from_acc(1.0 + 2f32.powi(-11)).to_bits(), 0x3c00);
    }
}
