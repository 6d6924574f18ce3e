//! Which vector instructions the CPU kernels use: detected once, and carried as a token
//! that only detection can make, so that a kernel compiled for an instruction set can
//! only be reached on a CPU that has it.

use std::fmt;
use std::str::FromStr;

/// An instruction set the blocked CPU kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Plain Rust on `[f32; 16]` arrays: any target, and the tests' oracle.
    Scalar,
    /// x86-64 AVX2 with FMA (256-bit vectors): most x86 laptops, desktops and VMs.
    Avx2,
    /// x86-64 AVX-512F (512-bit vectors).
    Avx512,
    /// aarch64 NEON (128-bit vectors): Apple Silicon, Graviton.
    Neon,
}

impl Isa {
    /// Every instruction set, fastest first (where available).
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar];

    /// The name `RESNET_CPU_ISA` and `--json` use: `scalar`, `avx2`, `avx512`, `neon`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU executes it.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)] // which arms remain depends on the target
            _ => false,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> candle_core::Result<Self> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "unknown CPU instruction set '{s}', expected scalar, avx2, avx512 or neon"
                ))
            })
    }
}

/// Proof that this CPU executes an [`Isa`]: made only by [`CpuIsa::best`],
/// [`CpuIsa::select`] and [`CpuIsa::from_env`], which check. The folded network carries
/// one; the unsafe kernels are reached only through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuIsa(Isa);

/// The environment variable that forces an instruction set (tests, benchmarks).
pub const ISA_ENV: &str = "RESNET_CPU_ISA";

impl CpuIsa {
    /// The fastest instruction set this CPU has.
    pub fn best() -> Self {
        let isa = Isa::ALL
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Isa::Scalar);
        Self(isa)
    }

    /// `isa`, or an error saying that this CPU lacks it and what it has.
    pub fn select(isa: Isa) -> candle_core::Result<Self> {
        if isa.is_available() {
            return Ok(Self(isa));
        }
        let available: Vec<&str> = Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_available())
            .map(Isa::name)
            .collect();
        candle_core::bail!(
            "this CPU cannot run the {isa} kernels; it has: {}",
            available.join(", ")
        )
    }

    /// The instruction set `RESNET_CPU_ISA` names (an error if unknown or unavailable),
    /// else the best one.
    pub fn from_env() -> candle_core::Result<Self> {
        match std::env::var(ISA_ENV) {
            Ok(name) if !name.trim().is_empty() => {
                let isa: Isa = name
                    .parse()
                    .map_err(|e| candle_core::Error::Msg(format!("{ISA_ENV}={name}: {e}")))?;
                Self::select(isa)
                    .map_err(|e| candle_core::Error::Msg(format!("{ISA_ENV}={name}: {e}")))
            }
            _ => Ok(Self::best()),
        }
    }

    /// The instruction set.
    pub fn isa(self) -> Isa {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unavailable_sets_are_refused() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().ok(), Some(isa));
            assert_eq!(CpuIsa::select(isa).is_ok(), isa.is_available());
        }
        assert!("AVX512".parse::<Isa>().is_ok());
        let error = "sse9".parse::<Isa>().err().map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("expected scalar, avx2, avx512 or neon")));
        assert!(Isa::Scalar.is_available());
        assert!(CpuIsa::best().isa().is_available());
        #[cfg(target_arch = "x86_64")]
        {
            let neon = CpuIsa::select(Isa::Neon).err().map(|e| e.to_string());
            assert!(neon.is_some_and(|e| e.contains("cannot run the neon kernels")));
        }
    }
}
