//! attn-core: attention that knows about heads.
//!
//! Legend: `B` batch, `H` query heads, `G` key/value heads, `S` query length, `T` key length,
//! `D` head dim, `E` model dim.
//!
//! Today this crate re-exports the kernels ([`kernels`]) so that higher layers reach them through
//! the one-way dependency chain kernels <- core <- nn <- cli. The validated `sdpa` entry point
//! with typed masks, single-head and multi-head attention, the KV cache and positions are the
//! next piece of work (see docs/ARCHITECTURE.md).

pub use attn_kernels as kernels;
