//! The CPU's instruction-set features, detected once per process and shared by every kernel, so that one
//! binary runs on any x86-64 (and non-x86) CPU and picks its widest code at run time.
//!
//! `BEIT_CPU=portable` (or `avx2`, `avx512`, or `avx512_vnni`: everything but AVX512_BF16) caps what is used
//! below what the CPU has: the way to run the portable kernels on a machine that has AVX-512, for tests and
//! comparisons. It is read once, at first use.

use std::sync::OnceLock;

use crate::error::{BeitError, Result};

/// What the kernels may use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    /// AVX2 and FMA (Haswell, Zen 1 and later).
    pub avx2_fma: bool,
    /// AVX-512 F, BW, DQ and VL (Skylake-SP, Zen 4 and later).
    pub avx512: bool,
    /// AVX-512 VNNI (`vpdpbusd`): the int8 kernels.
    pub avx512_vnni: bool,
    /// AVX-512 BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`): the bf16 kernels.
    pub avx512_bf16: bool,
}

impl CpuFeatures {
    /// No SIMD beyond the target's baseline: the portable kernels everywhere.
    pub const PORTABLE: CpuFeatures = CpuFeatures { avx2_fma: false, avx512: false, avx512_vnni: false, avx512_bf16: false };

    /// What this CPU has, without the `BEIT_CPU` cap.
    pub fn detect_hardware() -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = avx2_fma
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            CpuFeatures {
                avx2_fma,
                avx512,
                avx512_vnni: avx512 && is_x86_feature_detected!("avx512vnni"),
                avx512_bf16: avx512 && is_x86_feature_detected!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::PORTABLE
        }
    }

    /// Whether every feature in `self` is also in `other`.
    pub fn within(self, other: CpuFeatures) -> bool {
        (!self.avx2_fma || other.avx2_fma)
            && (!self.avx512 || other.avx512)
            && (!self.avx512_vnni || other.avx512_vnni)
            && (!self.avx512_bf16 || other.avx512_bf16)
    }

    /// An error naming `kernel` unless this CPU has every feature in `self`: what a kernel called with
    /// chosen features checks before running their code.
    pub(crate) fn check(self, kernel: &str) -> Result<()> {
        if self.within(hardware()) {
            return Ok(());
        }
        Err(BeitError::unsupported(
            kernel,
            format!("asked to run with {self:?}, but this CPU has {:?}", hardware()),
        ))
    }

    /// These features less what `level` (`portable`, `avx2`, `avx512`, `avx512_vnni`; anything else: no cap)
    /// excludes.
    pub fn capped(self, level: &str) -> CpuFeatures {
        match level.trim().to_ascii_lowercase().as_str() {
            "portable" | "none" => CpuFeatures::PORTABLE,
            "avx2" => CpuFeatures { avx2_fma: self.avx2_fma, ..CpuFeatures::PORTABLE },
            "avx512" => CpuFeatures { avx512_vnni: false, avx512_bf16: false, ..self },
            "avx512_vnni" | "avx512vnni" => CpuFeatures { avx512_bf16: false, ..self },
            _ => self,
        }
    }
}

/// What this CPU has, detected on first call: the most a kernel may be asked to use.
pub fn hardware() -> CpuFeatures {
    static HARDWARE: OnceLock<CpuFeatures> = OnceLock::new();
    *HARDWARE.get_or_init(CpuFeatures::detect_hardware)
}

/// The features every kernel uses: the hardware's, capped by `BEIT_CPU`; detected on first call.
pub fn features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| match std::env::var("BEIT_CPU") {
        Ok(level) => hardware().capped(&level),
        Err(_) => hardware(),
    })
}

/// The versions of a kernel worth comparing in tests and benchmarks: the portable code, then what this
/// process uses when that is wider.
pub fn variants() -> Vec<CpuFeatures> {
    let mut v = vec![CpuFeatures::PORTABLE];
    if features() != CpuFeatures::PORTABLE {
        v.push(features());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_only_remove_features() {
        let all = CpuFeatures { avx2_fma: true, avx512: true, avx512_vnni: true, avx512_bf16: true };
        assert_eq!(all.capped("portable"), CpuFeatures::PORTABLE);
        assert_eq!(all.capped("avx2"), CpuFeatures { avx2_fma: true, ..CpuFeatures::PORTABLE });
        assert!(!all.capped("avx512").avx512_vnni && all.capped("avx512").avx512);
        assert_eq!(CpuFeatures::PORTABLE.capped("avx512"), CpuFeatures::PORTABLE);
        assert_eq!(all.capped("anything else"), all);
        assert!(CpuFeatures::PORTABLE.within(all) && all.capped("avx2").within(all) && !all.within(all.capped("avx512")));
        assert!(CpuFeatures::PORTABLE.check("test").is_ok());
    }
}
