//! Which SIMD instruction set the CPU kernels may use, decided once per process.
//!
//! The wheel is built for the x86_64 baseline (SSE2) so that it installs on any x86_64
//! machine. Hot loops also exist compiled for AVX2 (`#[target_feature]`), hand-written
//! (the gating kernels) or as the same generic code compiled twice; they run where the CPU
//! has AVX2. Top-k selection over many experts also has an AVX-512 version (mask
//! registers and byte compression: Ice Lake, Zen 4 and later), and so have the softmax and
//! z-loss row kernels (their exponentials sixteen at a time); these run where the CPU has
//! those features. `SPARSEROUTE_SIMD=avx2` stops at AVX2, `SPARSEROUTE_SIMD=baseline`
//! turns both off. Every version performs the same IEEE operations in the same order (Rust
//! never fuses a multiply and an add on its own, nor reorders a sum), and selection is
//! exact, so results are the same bits whichever runs; tests compare them.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod select;
#[cfg(target_arch = "x86_64")]
pub(crate) mod sort;

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

/// The most a process may use, from `SPARSEROUTE_SIMD` (unset: whatever the CPU has).
#[cfg(target_arch = "x86_64")]
fn requested() -> &'static str {
    use std::sync::OnceLock;
    static REQUESTED: OnceLock<String> = OnceLock::new();
    REQUESTED.get_or_init(|| std::env::var("SPARSEROUTE_SIMD").unwrap_or_default())
}

/// Whether the AVX2 versions may run: the CPU has AVX2 with the FMA, F16C, POPCNT and BMI1
/// that every such processor also has, and `SPARSEROUTE_SIMD` is not `baseline`.
#[cfg(target_arch = "x86_64")]
pub fn avx2_enabled() -> bool {
    use std::sync::OnceLock;
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        requested() != "baseline"
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("popcnt")
            && is_x86_feature_detected!("bmi1")
    })
}

/// Whether the AVX-512 versions may run: the AVX2 ones may, the CPU has AVX-512 F, BW, DQ,
/// VL and VBMI2 (byte compression), and `SPARSEROUTE_SIMD` is neither `baseline` nor `avx2`.
#[cfg(target_arch = "x86_64")]
pub fn avx512_enabled() -> bool {
    use std::sync::OnceLock;
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        avx2_enabled()
            && requested() != "avx2"
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vbmi2")
    })
}

/// Never on other architectures: their kernels are the portable ones.
#[cfg(not(target_arch = "x86_64"))]
pub fn avx2_enabled() -> bool {
    false
}

/// Never on other architectures: their kernels are the portable ones.
#[cfg(not(target_arch = "x86_64"))]
pub fn avx512_enabled() -> bool {
    false
}

/// Rows at least this long (in bytes) are copied by [`copy_row`]'s vector loop.
const ROW_COPY_MIN_BYTES: usize = 1024;

/// `dst.copy_from_slice(src)` for a token's row (permute, token gathers): with AVX2, rows of
/// a kilobyte or more go through a loop of 32-byte loads and stores. For such sizes memmove
/// picks `rep movsb`, which on some processors copies far slower than the loop: on an AMD
/// EPYC (Zen 4), gathering 32768 rows of 2 KB took 19-20 ms with memmove and 9-12 with the
/// loop (one thread); from 3 KB on the two are equal.
#[inline]
pub fn copy_row<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "copy_row: rows of different lengths");
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(src);
        if bytes >= ROW_COPY_MIN_BYTES && avx2_enabled() {
            // SAFETY: AVX2 is available (checked); both slices hold `bytes` bytes, and a
            // `&mut` slice cannot overlap a shared one.
            unsafe { avx2::copy_bytes(dst.as_mut_ptr().cast(), src.as_ptr().cast(), bytes) };
            return;
        }
    }
    dst.copy_from_slice(src);
}

/// The instruction set the CPU kernels use on this machine: `"avx512"` (AVX2 kernels with
/// AVX-512 top-k selection and exponentials), `"avx2"` or `"baseline"` (SSE2 on x86_64, portable code
/// elsewhere). Results are the same bits at every level.
pub fn level() -> &'static str {
    if avx512_enabled() {
        "avx512"
    } else if avx2_enabled() {
        "avx2"
    } else {
        "baseline"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copy_row_copies_rows_of_every_length() {
        // Below the vector loop's kilobyte, at it, and whole and partial 32-byte blocks past
        // it, for 2- and 4-byte elements; the loop reads and writes inside the rows alone.
        for len in [0usize, 1, 7, 511, 512, 513, 1000, 1024, 1031, 2048, 4099] {
            let source: Vec<u16> = (0..len + 2).map(|i| (i * 7919 % 65521) as u16).collect();
            let mut row = vec![0xffffu16; len + 2];
            super::copy_row(&mut row[1..len + 1], &source[1..len + 1]);
            assert_eq!(row[1..len + 1], source[1..len + 1], "u16 x {len}");
            assert_eq!((row[0], row[len + 1]), (0xffff, 0xffff), "u16 x {len}: outside the row");
            let source: Vec<f32> = source.iter().map(|&v| f32::from(v) + 0.5).collect();
            let mut row = vec![-1.0f32; len + 2];
            super::copy_row(&mut row[1..len + 1], &source[1..len + 1]);
            assert_eq!(row[1..len + 1], source[1..len + 1], "f32 x {len}");
            assert_eq!((row[0], row[len + 1]), (-1.0, -1.0), "f32 x {len}: outside the row");
        }
    }
}
