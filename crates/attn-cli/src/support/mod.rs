//! What the subcommands share, below all of them (no module here imports a subcommand): tensor
//! files, hashing, timing, pictures, memory, threads, MPI ranks, flags' value parsers, line files, checkpoints.

pub mod allocations;
pub mod checkpoint;
pub mod dtype;
pub mod flags;
pub mod fnv;
pub mod heatmap;
pub mod memory;
pub mod numerics;
pub mod plot;
pub mod ranks;
pub mod seq2seq_html;
pub mod tensors;
pub mod text;
pub mod threads;
pub mod timing;
