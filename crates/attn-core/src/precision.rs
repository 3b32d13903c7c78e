//! The number format of a model's products ([`Precision`]) and the packing of its weights for
//! bf16 ([`pack_weight`]).

use std::ops::Range;

use attn_kernels::{bf16_level, Bf16Level, Bf16Panels, View2};

use crate::{AttnError, Result};

/// How a model computes its linear maps.
///
/// - `F32`: f32 weights, activations and sums (the default).
/// - `Bf16`: each weight matrix rounded to bf16 and packed once when the precision is set, the
///   activations rounded to bf16 as each product reads them, f32 sums and f32 outputs; biases,
///   norms, softmax and the residual stream stay f32. Attention's two products stay f32 for
///   now. Where the CPU has AVX512-BF16 ([`Precision::runs_natively`]) this is about twice the
///   f32 rate; elsewhere the same rounded values are multiplied by the f32 GEMM, which is
///   slower than `F32` (the `attn` commands run f32 there and say so).
///
/// bf16 is for inference: a training forward on a module in bf16 is refused
/// ([`training_needs_f32`]), since its backward is f32. Handing the weights out mutably
/// (`visit_params`, and with it a store's `flat_mut` and AdamW's update) drops the bf16 copies
/// and returns the module to `F32`, so they are never stale: set the precision again afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 weights and operands, f32 sums and outputs.
    Bf16,
}

impl Precision {
    /// Whether this CPU computes in this precision with its own instructions (always for
    /// `F32`; for `Bf16`, when [`bf16_level`] is not `None`).
    pub fn runs_natively(self) -> bool {
        match self {
            Precision::F32 => true,
            Precision::Bf16 => bf16_level() != Bf16Level::None,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = AttnError;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(AttnError::InvalidConfig {
                field: "precision",
                got: format!("{other:?}"),
                expected: "\"f32\" or \"bf16\"".into(),
            }),
        }
    }
}

/// The error of a training forward on a module in bf16: its backward is f32, so the forward
/// must be too (mixed-precision training, with f32 master weights, is not built yet).
pub fn training_needs_f32(module: &'static str) -> AttnError {
    AttnError::InvalidConfig {
        field: "precision",
        got: format!("bf16 on the {module} being trained"),
        expected: "f32 for training: call set_precision(Precision::F32) first (bf16 is for inference)".into(),
    }
}

/// Rows `rows` of a row-major weight `w: [out, in_dim]` rounded to bf16 and packed as the right
/// operand `Wᵀ: [in_dim, rows.len()]` of [`crate::linear_bf16`].
pub fn pack_weight(w: &[f32], rows: Range<usize>, in_dim: usize) -> Result<Bf16Panels> {
    let view = View2::new(
        &w[rows.start * in_dim..rows.end * in_dim],
        [in_dim, rows.len()],
        [1, in_dim],
    )?;
    Ok(Bf16Panels::pack(view))
}
