//! The `attn` command: attention kernels and layers from the command line, with PyTorch's
//! semantics and safetensors files. See `attn --help` and docs/CLI.md.
//!
//! Exit codes: 0 success, 1 runtime error (bad file, bad tensor), 2 usage error (bad flags).
//! Only this crate does file and terminal IO and uses anyhow. It is a library only so that the
//! binary (`src/main.rs`) and the fuzz targets (`fuzz/`, through [`fuzzing`]) share one input
//! path; nothing here is a stable API.

mod attend;
mod bench;
mod check;
mod checkpoint;
mod cli;
mod dates;
mod demo;
mod demo_dates;
mod embed;
mod flags;
pub mod fuzzing;
mod heatmap;
mod memory;
mod plot;
mod run;
mod sdpa;
mod seq2seq_html;
mod sweep;
mod tensors;
mod text;
mod threads;
mod timing;
mod train;
mod translate;

pub use cli::main;
