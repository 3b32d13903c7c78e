//! The `attn` command: attention kernels and layers from the command line, with PyTorch's
//! semantics and safetensors files. See `attn --help` and docs/CLI.md.
//!
//! Exit codes: 0 success, 1 runtime error (bad file, bad tensor), 2 usage error (bad flags).
//! Only this crate does file and terminal IO and uses anyhow. It is a library only so that the
//! binary (`src/main.rs`) and the fuzz targets (`fuzz/`, through [`fuzzing`]) share one input
//! path; nothing here is a stable API.

mod cli;
mod commands;
pub mod fuzzing;
mod support;

pub use cli::main;
pub use support::allocations;
