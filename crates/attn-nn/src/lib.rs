//! attn-nn: layers and models around attention.
//!
//! ```
//! use attn_nn::prelude::*;
//! let pairs = [("abc", "cba"), ("ab", "ba"), ("bca", "acb")]; // learn to reverse
//! let mut config = Seq2SeqConfig::for_pairs(&pairs); // attn train's defaults
//! config.transformer.layer.d_model = 32;
//! let mut model = Seq2Seq::with_seed(config, 0).unwrap();
//! let (mut adam, mut grads) = (AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap(), model.grads());
//! for number in 1..=3 {
//!     let step = TrainStep { number, ..Default::default() };
//!     model.train_step(&pairs, &step, &mut adam, &mut grads, 1e-3).unwrap();
//! }
//! let bytes = model.to_checkpoint(&Default::default()).unwrap(); // `attn translate --model` reads it
//! assert_eq!(Seq2Seq::from_checkpoint(&bytes).unwrap().state_dict(), model.state_dict());
//! ```
//!
//! [`guide`] walks through the crates from the kernel up, with examples that run as tests.
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
pub mod prelude;
pub mod seq2seq;
mod step;
mod transformer;

pub use attn_core as core;
/// The training state every model here shares: gradients and the parameter store.
pub use attn_core::{Grads, ParamStore, Parameters};
#[cfg(feature = "tokenizers")]
pub use bert::{cache_dir, default_model_dir, EmbedOptions, Embeddings, TextEmbedder};
pub use bert::{BertConfig, BertModel, Pooling, SentenceEmbedder, MAX_BATCH_TOKENS};
pub use error::{NnError, Result};
pub use optim::{clip_grad_norm, AdamW, Param, Schedule};
pub use seq2seq::{Batch, Decoded, Seq2Seq, Seq2SeqConfig, StepLoss, TrainStep, Vocab};
pub use step::Step;
pub use transformer::{
    BlockMasks, Decoder, DecoderCache, DecoderLayer, DecoderLayerCache, Encoder, EncoderLayer, LayerConfig, LayerTape,
    StackConfig, StackTape, Transformer, TransformerConfig, TransformerMasks, TransformerTape,
};

/// The guide (docs/GUIDE.md): the crates from the kernel up, each step a program that runs as a
/// doc test. Nothing to import here; it is documentation.
#[doc = include_str!("../../../docs/GUIDE.md")]
pub mod guide {}
