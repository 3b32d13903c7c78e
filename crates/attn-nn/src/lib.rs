//! attn-nn: layers and models around attention.
//!
//! Legend: `B` batch, `H` query heads, `G` key/value heads, `S` query length, `T` key length,
//! `D` head dim, `E` model dim, `F` feed-forward width.
//!
//! - [`layers`]: `Linear`, `Norm` (LayerNorm and RMSNorm, with the residual add fused), the
//!   activations and the feed-forward block.
//! - [`EncoderLayer`], [`DecoderLayer`], [`Encoder`], [`Decoder`], [`Transformer`]: PyTorch's
//!   `nn.Transformer*` modules with their state-dict names, and incremental decoding with cached
//!   self- and cross-attention keys and values.
//! - [`Seq2Seq`], [`AdamW`], [`Step`]: a translator trained here, with exact, deterministic
//!   backward passes; [`parallel`]: data-parallel training with the same bytes on any number of
//!   processes (over MPI with the `mpi` feature).
//! - [`BertModel`] and [`SentenceEmbedder`]: a Hugging Face BERT checkpoint (all-MiniLM-L6-v2)
//!   and sentence embeddings with sentence-transformers' pooling and normalisation.
//!
//! attn-core is re-exported as [`core`], so the CLI depends on this crate alone. What this crate
//! leaves out: file IO and tokenisation (the CLI's).

mod bert;
mod error;
pub mod layers;
mod optim;
pub mod parallel;
pub mod seq2seq;
mod step;
mod transformer;

pub use attn_core as core;
/// The training state every model here shares: gradients and the parameter store.
pub use attn_core::{Grads, ParamStore, Parameters};
#[cfg(feature = "tokenizers")]
pub use bert::{cache_dir, default_model_dir, EmbedOptions, Embeddings, TextEmbedder};
pub use bert::{BertConfig, BertModel, Pooling, SentenceEmbedder};
pub use error::{NnError, Result};
pub use optim::{clip_grad_norm, AdamW, Param, Schedule};
pub use seq2seq::{Batch, Decoded, Seq2Seq, Seq2SeqConfig, StepLoss, TrainStep, Vocab};
pub use step::Step;
pub use transformer::{
    BlockMasks, Decoder, DecoderCache, DecoderLayer, DecoderLayerCache, Encoder, EncoderLayer, LayerConfig, LayerTape,
    StackConfig, StackTape, Transformer, TransformerConfig, TransformerMasks, TransformerTape,
};

/// docs/GUIDE.md, whose examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/GUIDE.md")]
pub struct GuideExamples;
