//! attn-kernels: the numerical kernels of attn, on rows, columns and strides.
//!
//! Legend used in every doc comment: `B` batch, `H` query heads, `G` key/value heads, `S` query
//! length, `T` key length, `D` head dim (`Dv` for values), `E` model dim.
//!
//! - [`gemm`]: faer's matmul on strided f32 views, parallelism passed explicitly.
//! - [`masked_softmax`]: scale, mask and a stable softmax over rows in one pass.
//! - [`flash_attention`]: tiled attention with an online softmax, never forming `S×T`.
//! - [`attention_unfused`]: the textbook path, for comparison.
//! - [`attention_reference`], [`gemm_reference`]: naive f64 definitions the tests compare with.
//!
//! This crate knows nothing about heads as learned projections, layers or files: it sees
//! strided views and returns typed [`KernelError`]s. SIMD is chosen at run time
//! ([`simd_level`]).

mod error;
mod flash;
mod gemm;
mod mask;
mod reference;
mod simd;
mod softmax;
mod tile;
mod view;

#[cfg(test)]
mod testing;

pub use error::KernelError;
pub use flash::{flash_attention, BLOCK_KEYS, BLOCK_ROWS, MIN_TASKS};
pub use gemm::{gemm, gemm_reference, Accum, Par};
pub use mask::{broadcast_to, AttentionOptions, Causal, Mask};
pub use reference::{attention_reference, ReferenceAttention};
pub use simd::{exp_scalar, exp_slice, simd_level, SimdLevel};
pub use softmax::{attention_unfused, masked_softmax};
pub use view::{contiguous_strides, View, View2, View4, ViewMut, ViewMut2, ViewMut4};
