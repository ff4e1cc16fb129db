//! Which instruction set the image kernels (JPEG decoding, resampling) are compiled for, chosen once from
//! [`crate::kernels::cpu::features`] (so `BEIT_CPU` caps it). The kernels are written once as portable code
//! over fixed-size arrays and slices; [`simd_variants!`] compiles each again inside `#[target_feature]`
//! functions, where LLVM vectorizes the same integer arithmetic for AVX2 or AVX-512, so every level gives
//! bit-identical results by construction (the tests still compare them).

use crate::kernels::cpu::{self, CpuFeatures};

/// An instruction-set level the CPU is known to have: only made from detected features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Portable,
    Avx2,
    Avx512,
}

impl Level {
    /// The widest level `f` allows; `f` must come from [`cpu::features`] or [`cpu::hardware`] (or be
    /// within them), which is what makes calling the `#[target_feature]` variants sound.
    fn from_features(f: CpuFeatures) -> Level {
        if !f.within(cpu::hardware()) {
            return Level::Portable;
        }
        if f.avx512 {
            Level::Avx512
        } else if f.avx2_fma {
            Level::Avx2
        } else {
            Level::Portable
        }
    }

    /// The level this process uses (decided once, with the CPU features).
    pub(crate) fn current() -> Level {
        Level::from_features(cpu::features())
    }

    /// Every level this CPU runs, portable first: what the tests compare.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Level> {
        let hw = cpu::hardware();
        let mut v = vec![Level::Portable];
        if hw.avx2_fma {
            v.push(Level::Avx2);
        }
        if hw.avx512 {
            v.push(Level::Avx512);
        }
        v
    }
}

/// `fn NAME(level: Level, args...) -> R` calling the portable `GENERIC(args...)`, compiled as is and again
/// for AVX2 and AVX-512 (x86-64 only), dispatched on `level`.
macro_rules! simd_variants {
    ($vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $generic:path;) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::processor::simd::Level, $($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    $generic($($a),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    $generic($($a),*)
                }
                match level {
                    // SAFETY: a Level above Portable is only made from features this CPU has.
                    $crate::processor::simd::Level::Avx512 => return unsafe { avx512($($a),*) },
                    // SAFETY: as above.
                    $crate::processor::simd::Level::Avx2 => return unsafe { avx2($($a),*) },
                    $crate::processor::simd::Level::Portable => {}
                }
            }
            let _ = level;
            $generic($($a),*)
        }
    };
}
pub(crate) use simd_variants;
