//! The number format of a model's products ([`Precision`], from `attn_kernels`) and the packing
//! of its weights for bf16 ([`pack_weight`]).
//!
//! A model in `Precision::Bf16` rounds each weight matrix to bf16 and packs it once when the
//! precision is set; the activations are rounded to bf16 as each product reads them, and the
//! sums and outputs are f32. Attention's two products take bf16 operands too (the scaled
//! queries, keys, values and probabilities); biases, norms, the softmax and the residual
//! stream stay f32. On a CPU without AVX512-BF16 the same rounded values are multiplied in f32,
//! which is slower than `F32` (the `attn` commands run f32 there and say so).
//!
//! A model set to `Precision::F32` on a machine where attn's own f32 GEMM runs (Intel at
//! AVX-512) packs each weight matrix that GEMM takes (256 outputs or more;
//! [`attn_kernels::F32Panels::worth_packing`]) once too, in f32 ([`pack_weight_f32`]): the
//! products read the packed copy in place instead of packing `Wᵀ` on every call, with the same
//! bits. Elsewhere nothing is packed. The copies are dropped as bf16's are (below).
//!
//! Training a module in bf16 is mixed-precision training: the forward's and the backward's
//! linear maps take bf16 operands (the backward's `dx = dy·W` on `W` packed as it is, at the
//! first backward; `dW += dyᵀ·x` on both rounded per call), attention and every gradient stay
//! f32, and the f32 weights are the master copy. Handing the weights out mutably
//! (`visit_params`, and with it a store's `flat_mut` and AdamW's update) drops the bf16 copies
//! and returns the module to `F32`, so they are never stale: set the precision again afterwards
//! (`Seq2Seq::update` does).

use std::ops::Range;

pub use attn_kernels::Precision;
use attn_kernels::{Bf16Panels, F32Panels, View2};

use crate::error::shape_error;
use crate::{Result, Tensor};

/// Rows `rows` of a row-major weight `w: [out, in_dim]` rounded to bf16 and packed as the right
/// operand `Wᵀ: [in_dim, rows.len()]` of [`crate::linear_bf16`].
pub fn pack_weight(w: &[f32], rows: Range<usize>, in_dim: usize) -> Result<Bf16Panels> {
    Ok(Bf16Panels::pack(transposed_rows(w, rows, in_dim)?))
}

/// Rows `rows` of a row-major `[_, in_dim]` matrix seen as their transpose `[in_dim, rows]`.
fn transposed_rows<T>(w: &[T], rows: Range<usize>, in_dim: usize) -> Result<View2<'_, T>> {
    Ok(View2::new(
        &w[rows.start * in_dim..rows.end * in_dim],
        [in_dim, rows.len()],
        [1, in_dim],
    )?)
}

/// Rows `rows` of the weight `w: [out, in_dim]` packed as [`pack_weight`] packs them, from the
/// bf16 bits when `w` holds bf16 values ([`Tensor::from_bf16_bits`]: no f32 copy is made, and
/// the words are those of packing the widened values), else from its f32 values.
pub fn pack_weight_of(w: &Tensor, rows: Range<usize>) -> Result<Bf16Panels> {
    let in_dim = weight_width(w, &rows)?;
    match w.bf16_bits() {
        Some(bits) => Ok(Bf16Panels::from_bits(transposed_rows(bits, rows, in_dim)?)),
        None => pack_weight(w.data(), rows, in_dim),
    }
}

/// Rows `rows` of the weight `w: [out, in_dim]` packed in f32 as the right operand
/// `Wᵀ: [in_dim, rows.len()]` of [`crate::linear_packed`] (from the values `w.data()` gives).
pub fn pack_weight_f32(w: &Tensor, rows: Range<usize>) -> Result<F32Panels> {
    let in_dim = weight_width(w, &rows)?;
    Ok(F32Panels::pack(transposed_rows(w.data(), rows, in_dim)?))
}

/// The input width of a weight `w: [out, in]` whose rows `rows` are packed, or the typed error
/// naming what was expected.
fn weight_width(w: &Tensor, rows: &Range<usize>) -> Result<usize> {
    let &[out, in_dim] = w.shape() else {
        return Err(shape_error("pack", "weight", "[out, in]".to_string(), w.shape()));
    };
    if rows.start > rows.end || rows.end > out {
        return Err(shape_error(
            "pack",
            "weight",
            format!("at least {} rows", rows.end),
            w.shape(),
        ));
    }
    Ok(in_dim)
}
