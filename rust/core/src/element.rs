//! Element types the kernels read and write, and the precision they compute in.
//!
//! Router math and every accumulation run in `f32` for 16- and 32-bit inputs
//! (DESIGN: "router math in fp32"); `f64` inputs compute in `f64` so that gradients can be
//! checked against finite differences.

use crate::lanes::BlockOps;
use half::slice::HalfFloatSliceExt;
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
    /// `e^x` as the routing math computes it: [`fast_exp_f32`] for `f32` (so that scalar and
    /// SIMD kernels round identically), `f64::exp` for `f64`.
    fn fast_exp(self) -> Self;
    /// The slice as `f32` when `Self` is `f32`, so that f32-only SIMD kernels can write
    /// accumulator-typed outputs; `None` for `f64`.
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
    /// The slice as `f32` when `Self` is `f32`; `None` for `f64`.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// Sorts packed keys in descending order with the AVX-512 sorting network when
    /// `avx512` (the caller checked [`crate::simd::avx512_enabled`]) and the network takes
    /// them (`f32` keys, at most 64); false, leaving them as they were, otherwise.
    #[inline(always)]
    fn sort_packed_by_network(keys: &mut [Self::Packed], avx512: bool) -> bool {
        let _ = (keys, avx512);
        false
    }
    /// `e^x` and `ln x` of the z-loss: [`fma_exp_f32`] and [`fma_ln_f32`] for `f32` (the
    /// loss is compared with the GPU's within a tolerance, so it takes the faster fused
    /// forms), `f64::exp` and `f64::ln` for `f64`.
    fn loss_exp(self) -> Self;
    fn loss_ln(self) -> Self;
    /// [`Accumulator::fast_exp`] of every value, in place, for bulk elementwise work.
    /// Inlined, so that callers compiled for AVX2 (see [`crate::simd`]) vectorise it.
    #[inline(always)]
    fn exp_in_place(values: &mut [Self]) {
        for v in values.iter_mut() {
            *v = v.fast_exp();
        }
    }
    /// Packs a non-NaN key with its index; -0.0 and 0.0 pack equal keys.
    fn pack(self, index: usize) -> Self::Packed;
    fn unpack_key(packed: Self::Packed) -> Self;
    fn unpack_index(packed: Self::Packed) -> usize;
    /// Bits of a non-negative value, ordered as the values (for radix steps over
    /// probabilities): the IEEE bits themselves, `PROBABILITY_KEY_BITS` wide.
    fn probability_key(self) -> u64;
    const PROBABILITY_KEY_BITS: u32;
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

/// `e^x`, within 2 ulp of the correctly rounded result where that is a normal float, and
/// within one step of the subnormals below (where `e^x` falls under 1.2e-38, from `x` about
/// -87.3 down to -103.97, under which it rounds to 0). `-inf` gives 0, `+inf` and every `x`
/// above `ln(f32::MAX)` (88.72) give `inf`, NaN gives NaN. Branch-free: range reduction
/// `x = n ln2 + r` with `n` rounded by the 1.5 * 2^23 trick, a degree-6 polynomial for
/// `e^r`, and `2^n` applied as two factors built from exponent bits (`exp_scale`), so
/// loops over slices vectorise.
#[inline(always)]
pub fn fast_exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(EXP_LOWEST, EXP_HIGHEST);
    let t = x * LOG2E + EXP_MAGIC;
    let n = t - EXP_MAGIC;
    let exponent = t.to_bits().wrapping_sub(EXP_MAGIC.to_bits()) as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    let y = p * r * r + r + 1.0;
    exp_scale(y, exponent)
}

/// The clamp of [`fast_exp_f32`] and [`fma_exp_f32`]: below `EXP_LOWEST`, `e^x` rounds to 0
/// (`n` = -150); above `EXP_HIGHEST` it overflows (`n` = 128). The clamp keeps `n` where
/// [`exp_scale`]'s two factors are normal floats.
pub(crate) const EXP_LOWEST: f32 = -104.0;
pub(crate) const EXP_HIGHEST: f32 = 89.0;

/// `y 2^n` for `y` in `[0.7, 1.42]` (`e^r`) and `n` in `[-150, 128]`, rounded once: as `(y
/// 2^(n - n/2)) 2^(n/2)` (`n/2` rounded down), both factors built from their exponent bits.
/// The first product is exact (a normal float), so the second rounds the exact `y 2^n`,
/// to a subnormal, 0 or `inf` where it leaves the normal range. (One factor `2^n` cannot
/// reach below 2^-126.) The SIMD copies do the same in the same order.
#[inline(always)]
pub(crate) fn exp_scale(y: f32, n: i32) -> f32 {
    let low = n >> 1;
    let high = n - low;
    (y * f32::from_bits(((high + 127) as u32) << 23)) * f32::from_bits(((low + 127) as u32) << 23)
}

/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an integer, held
/// in the low bits (the range reduction of [`fast_exp_f32`] and [`fma_exp_f32`]).
pub(crate) const EXP_MAGIC: f32 = 12_582_912.0;

/// The polynomial coefficients of [`fast_exp_f32`] for `e^r - 1 - r` over `r^2`, highest
/// degree first (Cephes' `expf`; the GPU's `fast_exp` uses the same).
pub(crate) const EXP_POLY: [f32; 6] =
    [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// The coefficients of [`fma_exp_f32`] for the same function: one degree lower, fitted for
/// the least maximum relative error of `e^r` on `|r| <= ln(2) / 2`: 3.1e-9, against 2.7e-9
/// for Cephes' polynomial with its float32 coefficients, both far below float32's 6e-8
/// (its last degree buys nothing once rounded). Evaluated in fused multiply-adds, it stays
/// within 0.7 ulp on that range, with one operation fewer per value.
pub(crate) const FMA_EXP_POLY: [f32; 5] =
    [1.381_454e-3, 8.368_745e-3, 4.166_839e-2, 0.166_665_21, 0.499_999_94];

/// `e^x` as [`fast_exp_f32`] computes it (the same clamp, range reduction and scaling),
/// in fused multiply-adds: 13 operations instead of 21, within 2 ulp of the correctly
/// rounded result. For kernels whose bits need not match the GPU's `fast_exp` (the
/// z-loss); every CPU version of such a kernel uses this function or a SIMD copy of it,
/// so they agree with each other bit for bit. `f32::mul_add` is a fused operation on every
/// target (a library call where the processor has no FMA instruction).
#[inline(always)]
pub fn fma_exp_f32(x: f32) -> f32 {
    let x = x.clamp(EXP_LOWEST, EXP_HIGHEST);
    let t = x.mul_add(std::f32::consts::LOG2_E, EXP_MAGIC);
    let n = t - EXP_MAGIC;
    let exponent = t.to_bits().wrapping_sub(EXP_MAGIC.to_bits()) as i32;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let p = FMA_EXP_POLY[1..].iter().fold(FMA_EXP_POLY[0], |p, &c| p.mul_add(r, c));
    // 1 + r + p r^2 as 1 + r (1 + p r): two roundings, each of a value near 1.
    let y = r.mul_add(p.mul_add(r, 1.0), 1.0);
    exp_scale(y, exponent)
}

/// `ln x` for positive normal `x`, within 1 ulp of the correctly rounded result, in fused
/// multiply-adds (the z-loss's `logsumexp`; `ln8_fma` in `simd::avx2` computes the same bits
/// eight at a time); NaN for every other input (zero, negatives, subnormals, infinities,
/// NaN). `x = 2^k m` with `m` in `[sqrt(1/2), sqrt(2))`, taken from the bits, and
/// `ln(1 + f)`, `f = m - 1`, as `f - f^2/2 + f^3 P(f)`.
#[inline(always)]
pub fn fma_ln_f32(x: f32) -> f32 {
    if !(f32::MIN_POSITIVE..=f32::MAX).contains(&x) {
        return f32::NAN;
    }
    let (k, f) = ln_reduce(x.to_bits() as i32);
    let f = f32::from_bits(f as u32) - 1.0;
    let k = k as f32;
    let p = LN_POLY[1..].iter().fold(LN_POLY[0], |p, &c| p.mul_add(f, c));
    let f2 = f * f;
    let y = (f2 * f) * p;
    let y = k.mul_add(LN2_LO, y);
    let y = f2.mul_add(-0.5, y);
    k.mul_add(LN2_HI, f + y)
}

/// `ln 2` split in two so that `n LN2_HI` is exact for every exponent `n` of `f32` (the
/// range reductions of the exponentials and of [`fma_ln_f32`]).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;

/// The coefficients of `P` in [`fma_ln_f32`] (Cephes' `logf`), highest degree first.
pub(crate) const LN_POLY: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_4e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];

/// The bits of `sqrt(1/2)`: [`ln_reduce`] moves mantissas into `[sqrt(1/2), sqrt(2))`.
pub(crate) const SQRT_HALF_BITS: i32 = 0x3f35_04f3;

/// `(k, bits of m)` with `x = 2^k m`, `m` in `[sqrt(1/2), sqrt(2))`, for the bits of a
/// positive normal `x`: the exponent is counted from `sqrt(1/2)`, so a mantissa above
/// `sqrt(2)` carries into `k` and lands in `[sqrt(1/2), 1)`.
#[inline(always)]
fn ln_reduce(bits: i32) -> (i32, i32) {
    let offset = bits.wrapping_sub(SQRT_HALF_BITS);
    (offset >> 23, (offset & 0x007f_ffff) + SQRT_HALF_BITS)
}

impl Accumulator for f32 {
    const SIGMOID_NORM_EPS: f32 = 1e-20;
    type Packed = u64;
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        fast_exp_f32(self)
    }
    #[inline(always)]
    fn loss_exp(self) -> f32 {
        fma_exp_f32(self)
    }
    #[inline(always)]
    fn loss_ln(self) -> f32 {
        fma_ln_f32(self)
    }
    fn as_f32_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }
    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    #[inline(always)]
    fn sort_packed_by_network(keys: &mut [u64], avx512: bool) -> bool {
        #[cfg(target_arch = "x86_64")]
        if avx512 && keys.len() <= crate::simd::sort::MAX_KEYS {
            // SAFETY: the caller checked the CPU features (`avx512`); packed keys are
            // distinct (they hold the index) and never zero (the index half is at least
            // u32::MAX - index).
            unsafe { crate::simd::sort::sort_descending(keys) };
            return true;
        }
        let _ = (keys, avx512);
        false
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
    const PROBABILITY_KEY_BITS: u32 = 32;
    #[inline(always)]
    fn probability_key(self) -> u64 {
        u64::from(self.to_bits())
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
    fn fast_exp(self) -> f64 {
        self.exp()
    }
    #[inline(always)]
    fn loss_exp(self) -> f64 {
        self.exp()
    }
    #[inline(always)]
    fn loss_ln(self) -> f64 {
        self.ln()
    }
    fn as_f32(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
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
    const PROBABILITY_KEY_BITS: u32 = 64;
    #[inline(always)]
    fn probability_key(self) -> u64 {
        self.to_bits()
    }
}

/// The raw storage of a slice of 32- or 16-bit floats, for kernels that load and convert
/// several values at once with SIMD instructions.
#[derive(Clone, Copy, Debug)]
pub enum Storage<'a> {
    F32(&'a [f32]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half-precision bit patterns.
    F16(&'a [u16]),
}

/// A floating-point storage type of tensors: `f64`, `f32`, `bf16` or `f16`.
pub trait Element: Copy + Send + Sync + Default + 'static {
    type Acc: Accumulator;
    /// The dtype name used in error messages.
    const NAME: &'static str;
    fn to_acc(self) -> Self::Acc;
    /// Rounds to nearest even (the conversion torch uses).
    fn from_acc(v: Self::Acc) -> Self;
    /// The slice's storage, for types whose accumulator is `f32` (`None` for `f64`).
    fn storage(values: &[Self]) -> Option<Storage<'_>> {
        let _ = values;
        None
    }
    /// The slice itself when `Self` is `f32`, so that f32 SIMD kernels can write it
    /// directly; `None` for the other types.
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]> {
        let _ = values;
        None
    }
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
    fn storage(values: &[f32]) -> Option<Storage<'_>> {
        Some(Storage::F32(values))
    }
    fn as_f32_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
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
    fn storage(values: &[bf16]) -> Option<Storage<'_>> {
        Some(Storage::Bf16(values.reinterpret_cast()))
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
    fn storage(values: &[f16]) -> Option<Storage<'_>> {
        Some(Storage::F16(values.reinterpret_cast()))
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
        let mut rng = crate::test_rng::TestRng::new(1);
        let specials =
            [0u32, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x7f80_0001, 0x7f7f_ffff, 0x3f80_8000];
        let random = (0..1_000_000).map(|_| (rng.next_u64() >> 32) as u32);
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

    /// Ulps between two finite floats of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// Checks `exp` against the correctly rounded `e^x`: within 2 ulp where that is a normal
    /// float, within one step (2^-149) below, 0 under -103.98, `inf` above ln(f32::MAX), and
    /// the special values.
    fn check_exp(exp: fn(f32) -> f32) {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
            x += 0.000_731;
        }
        assert!(worst <= 2, "{worst} ulp from exp");
        // Every float from -103.98 to -87.3 (the subnormal results) and a stride on each side.
        let mut x = -110.0f32;
        while x < -86.0 {
            let (got, exact) = (exp(x), (x as f64).exp() as f32);
            if exact < f32::MIN_POSITIVE {
                assert!(ulps(got, exact) <= 1, "exp({x}) = {got:e}, e^x = {exact:e}");
            } else {
                assert!(ulps(got, exact) <= 2, "exp({x}) = {got:e}, e^x = {exact:e}");
            }
            x = if (-104.0..-87.3).contains(&x) { f32::from_bits(x.to_bits() - 1) } else { x + 0.001 };
        }
        // The top of the range: finite up to ln(f32::MAX), then inf.
        let top = f32::MAX.ln();
        assert!(exp(f32::from_bits(top.to_bits() - 1)).is_finite());
        for x in [88.75, 89.0, 89.5, 1e30, f32::INFINITY] {
            assert_eq!(exp(x), f32::INFINITY, "exp({x})");
        }
        for x in [-104.0, -200.0, -1e30, f32::NEG_INFINITY] {
            assert_eq!(exp(x).to_bits(), 0, "exp({x})");
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn fast_exp_is_within_two_ulp() {
        check_exp(fast_exp_f32);
    }

    #[test]
    fn fma_exp_is_within_two_ulp() {
        check_exp(fma_exp_f32);
    }

    #[test]
    fn fma_ln_is_within_one_ulp() {
        let mut worst = 0u32;
        let mut check = |x: f32| worst = worst.max(ulps(fma_ln_f32(x), (x as f64).ln() as f32));
        // Every mantissa step near 1 (where ln is smallest), then a sweep of the whole range.
        (0..200_000).for_each(|i| check(f32::from_bits(1.0f32.to_bits() - 100_000 + i)));
        let mut x = f32::MIN_POSITIVE;
        while x < f32::MAX / 1.001 {
            check(x);
            x *= 1.000_37;
        }
        for x in [1.0, 2.0, 0.5, std::f32::consts::SQRT_2, 64.0, 1e-30, 3e38] {
            check(x);
        }
        assert!(worst <= 1, "fma_ln_f32 is {worst} ulp from ln");
        assert_eq!(fma_ln_f32(1.0), 0.0);
        for x in [0.0, -0.0, -1.0, 1e-40, f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            assert!(fma_ln_f32(x).is_nan(), "ln({x})");
        }
    }
}
