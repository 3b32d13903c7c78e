//! attn-nn: layers and models around attention.
//!
//! Legend: `B` batch, `H` query heads, `G` key/value heads, `S` query length, `T` key length,
//! `D` head dim, `E` model dim.
//!
//! Today this crate re-exports attn-core ([`core`]) so that the CLI depends on this layer only.
//! Linear, LayerNorm, the feed-forward block, encoder and decoder layers and the BERT model are
//! the next pieces of work (see docs/ARCHITECTURE.md).

pub use attn_core as core;
