//! Run-time SIMD dispatch for Kiln's CPU kernels: each kernel body is written
//! once as plain (auto-vectorising) Rust and compiled three times, for
//! AVX-512, for AVX2+FMA and portably; the best level this CPU has is picked
//! when the kernel is called, so one binary is fast on Zen 3 and on AVX-512
//! Xeons and Zen 4/5 alike, with no build flag.
//!
//! `KILN_SIMD=avx2` (or `portable`) caps the level, for benchmarks that
//! compare the paths on one machine and for tests of the lower paths.

use std::sync::OnceLock;

/// The instruction-set levels Kiln compiles its kernels for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// No vector extensions beyond the target's baseline (SSE2 on x86-64).
    Portable,
    /// AVX2 with FMA (Haswell, Zen 1–3).
    Avx2,
    /// AVX-512 F/BW/DQ/VL with AVX2 and FMA (Skylake-SP and later Xeons, Zen 4/5).
    Avx512,
}

impl Level {
    /// The name `KILN_SIMD` takes and benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// The highest level this CPU supports, capped by `KILN_SIMD` when set.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detect();
        match std::env::var("KILN_SIMD").ok().as_deref() {
            Some("portable") => Level::Portable,
            Some("avx2") => detected.min(Level::Avx2),
            _ => detected,
        }
    })
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// Defines `fn NAME(args) -> R` that runs the `#[inline(always)]` function
/// `BODY` compiled for the best [`Level`] this CPU has. `BODY` must be
/// `#[inline(always)]` so each copy is compiled with its level's features.
///
/// ```ignore
/// kiln_engine::simd_dispatch!(pub fn scale(x: &mut [f32], by: f32) => scale_body);
/// ```
#[macro_export]
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$($gen:ident : $bound:path),+>)?
        ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$meta])*
        $vis fn $name $(<$($gen: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512 $(<$($gen: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body $(::<$($gen),+>)? ($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$($gen: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body $(::<$($gen),+>)? ($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: `level()` reports only features this CPU has.
                    $crate::simd::Level::Avx512 => {
                        return unsafe { avx512 $(::<$($gen),+>)? ($($arg),*) };
                    }
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => {
                        return unsafe { avx2 $(::<$($gen),+>)? ($($arg),*) };
                    }
                    $crate::simd::Level::Portable => {}
                }
            }
            $body $(::<$($gen),+>)? ($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(always)]
    fn sum_of_squares_body(x: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += v * v;
            }
        }
        lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>()
    }

    crate::simd_dispatch!(fn sum_of_squares(x: &[f32]) -> f32 => sum_of_squares_body);

    #[test]
    fn dispatched_kernel_matches_its_body() {
        let x: Vec<f32> = (0..1000).map(|i| (i % 7) as f32 - 3.0).collect();
        assert_eq!(sum_of_squares(&x), sum_of_squares_body(&x));
    }

    #[test]
    fn level_is_at_most_what_the_cpu_has() {
        assert!(level() <= detect());
        #[cfg(target_arch = "x86_64")]
        if level() >= Level::Avx2 {
            assert!(std::arch::is_x86_feature_detected!("avx2"));
        }
    }
}
