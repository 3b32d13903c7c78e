//! attn-core: attention that knows about heads.
//!
//! ```
//! use attn_core::prelude::*;
//! let (b, s, e) = (2, 5, 16);
//! let mha = MultiHeadAttention::with_seed(MhaConfig::new(e, 4), 0).unwrap(); // nn.MultiheadAttention
//! let x: Vec<f32> = (0..b * s * e).map(|i| (i as f32 * 0.3).sin()).collect();
//! let options = MhaOptions { key_padding: KeyPadding::Lengths(&[5, 3]), ..Default::default() };
//! let out = mha.forward_self(Sequence::batch_first(&x, b, s, e), &options, Par::Rayon).unwrap();
//! assert_eq!(out.output.len(), b * s * e);
//! // Weights load from and save to PyTorch's state-dict names.
//! let again = MultiHeadAttention::from_state_dict(MhaConfig::new(e, 4), mha.state_dict()).unwrap();
//! assert_eq!(again.state_dict(), mha.state_dict());
//! ```
//!
//! Legend: `B` batch, `H` query heads, `G` key/value heads, `S` query length, `T` key length,
//! `D` head dim, `E` model dim.
//!
//! - [`sdpa`]: the validated entry point to the kernels, with typed masks ([`ScoreMask`],
//!   [`KeyPadding`], [`BoolMeaning`]).
//! - [`MultiHeadAttention`]: PyTorch's `nn.MultiheadAttention` with its state-dict names,
//!   grouped-query heads, fused QKV for self-attention, weights from the attention kernel's own
//!   scores, a [`KvCache`] for decoding, RoPE ([`Rope`]) and ALiBi ([`alibi_slopes`]).
//! - [`Attention`]: one head with its own projections.
//!
//! - [`FromSafetensors`]: a [`StateDict`] from the bytes of a safetensors file (F32, F16, BF16,
//!   F64); [`ToSafetensors`] and [`write_safetensors`]: back to a file (F32, with metadata,
//!   written atomically).
//!
//! The kernels are re-exported as [`kernels`], so higher layers reach them through this crate.
//! What this crate leaves out: file IO (callers hand over bytes or a [`StateDict`]) and layers
//! around attention (attn-nn).

mod cache;
mod error;
mod grads;
mod mha;
mod params;
mod positions;
mod precision;
mod safetensors_io;
mod sdpa;
mod tensor;

pub use attn_kernels as kernels;
pub mod prelude;
pub use cache::{KvCache, KvView};
pub use error::{AttnError, Result};
pub use grads::{clip_grad_norm, GradRef, Grads};
pub use mha::{
    linear, linear_bf16, linear_packed, Attention, AttentionConfig, Layout, MhaConfig, MhaInputGrads, MhaInputs,
    MhaOptions, MhaOutput, MhaTape, MultiHeadAttention, NeedWeights, Packing, Sequence,
};
pub use params::{
    flat_fill, flat_zip_mut, AlignedBuf, ParamEntry, ParamLayout, ParamPath, ParamStore, Parameters, FLAT_CHUNK,
};
pub use positions::{alibi_slopes, Rope, RopeStyle};
pub use precision::{pack_weight, pack_weight_f32, pack_weight_of, Precision};
pub use safetensors_io::{
    atomic_destination, f32_safetensors, floats_to_f32, write_safetensors, AtomicFile, FromSafetensors, ToSafetensors,
};
#[allow(deprecated)]
pub use sdpa::f32_bytes;
pub use sdpa::{
    f32_size_in_bytes, sdpa, sdpa_backward, sdpa_into, BoolMeaning, KeyPadding, ScoreMask, SdpaGradients, SdpaOptions,
    SdpaOutput, SdpaShape,
};
pub use tensor::{
    concat_rows, expect_empty, first_non_finite, insert_prefixed, take, take_prefixed, StateDict, Tensor, WeightInit,
};
