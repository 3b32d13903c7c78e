//! `--dtype f32|bf16`: the number format a command computes in, and the rule for a CPU without
//! bf16 instructions (run f32, and say so once on stderr).

use attn_nn::core::kernels::{bf16_level, Bf16Level};
use attn_nn::core::Precision;

/// The number format of a command's products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Dtype {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Weights and operands rounded to bf16, f32 sums and outputs (bf16 instructions where the
    /// CPU has them; f32 otherwise, said once on stderr).
    Bf16,
}

impl Dtype {
    /// What this CPU will run: `Bf16` only with bf16 instructions; otherwise `F32`, with one
    /// line on stderr when `warn` (rank 0 of a job, or a single process).
    pub fn effective(self, warn: bool) -> Dtype {
        self.effective_for("--dtype", warn)
    }

    /// [`Dtype::effective`] for a flag of another name, which the stderr line names (`attn
    /// train`'s `--precision`).
    pub fn effective_for(self, flag: &str, warn: bool) -> Dtype {
        if self == Dtype::Bf16 && bf16_level() == Bf16Level::None {
            if warn {
                eprintln!(
                    "attn: {flag} bf16: this CPU has no bf16 instructions (AVX512-BF16), or ATTN_SIMD turned them off; running f32"
                );
            }
            return Dtype::F32;
        }
        self
    }

    /// The library's precision for this dtype.
    pub fn precision(self) -> Precision {
        match self {
            Dtype::F32 => Precision::F32,
            Dtype::Bf16 => Precision::Bf16,
        }
    }

    /// `f32` or `bf16`, as JSON reports it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}
