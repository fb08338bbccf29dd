//! Which SIMD instruction set the CPU kernels may use, decided once per process.
//!
//! The wheel is built for the x86_64 baseline (SSE2) so that it installs on any x86_64
//! machine. Hot loops also exist compiled for AVX2 (`#[target_feature]`), hand-written
//! (the gating kernels) or as the same generic code compiled twice; they run where the CPU
//! has AVX2 and the environment does not set `SPARSEROUTE_SIMD=baseline`. Both versions
//! perform the same IEEE operations in the same order (Rust never fuses a multiply and an
//! add on its own, nor reorders a sum), so results are the same bits either way; tests
//! compare them.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

/// `$f(args)` compiled for AVX2 when `$avx2` (the caller checked [`avx2_enabled`]), else
/// as is: the same generic code twice, so the same bits. `$f` should be `#[inline(always)]`
/// so that its loops are compiled inside the AVX2 version.
macro_rules! multiversion {
    ($avx2:expr, $($f:ident)::+($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2_version<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if $avx2 {
                // SAFETY: the caller checked `crate::simd::avx2_enabled`.
                unsafe { avx2_version(#[inline(always)] || $($f)::+($($arg),*)) }
            } else {
                $($f)::+($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $avx2;
            $($f)::+($($arg),*)
        }
    }};
}
pub(crate) use multiversion;

/// Whether the AVX2 versions may run: the CPU has AVX2 with the FMA, F16C, POPCNT and BMI1
/// that every such processor also has, and `SPARSEROUTE_SIMD` is not `baseline`.
#[cfg(target_arch = "x86_64")]
pub fn avx2_enabled() -> bool {
    use std::sync::OnceLock;
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let baseline = std::env::var_os("SPARSEROUTE_SIMD").is_some_and(|v| v == "baseline");
        !baseline
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("popcnt")
            && is_x86_feature_detected!("bmi1")
    })
}

/// Never on other architectures: their kernels are the portable ones.
#[cfg(not(target_arch = "x86_64"))]
pub fn avx2_enabled() -> bool {
    false
}

/// The instruction set the CPU kernels use on this machine: `"avx2"` or `"baseline"`
/// (SSE2 on x86_64, portable code elsewhere). Results are the same bits either way.
pub fn level() -> &'static str {
    if avx2_enabled() {
        "avx2"
    } else {
        "baseline"
    }
}
