//! Entry points for the coverage-guided fuzz targets (`fuzz/`) and the corpus replay test:
//! each feeds untrusted bytes through the same code as the command that reads them, and
//! returns what that command would report. Not a stable API.
//!
//! A target passes when every input gives `Ok` or an error, never a panic, an abort or an
//! allocation past the memory cap (`ATTN_MAX_MEMORY`, which the targets set low).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use attn_nn::core::kernels::{Causal, Par};

use crate::commands::embed::Embedder;
use crate::support::tensors::TensorFile;

/// Reads `bytes` as a safetensors file, as every command reads its tensor files.
pub fn tensor_file(bytes: &[u8]) -> Result<()> {
    TensorFile::parse(Path::new("fuzz.safetensors"), bytes, |_| false).map(drop)
}

/// `attn sdpa` on `bytes` as its input file (shapes, masks and their broadcasting, the memory
/// cap, the kernel), with the causal alignment chosen by `causal % 3`; nothing is written.
pub fn sdpa(bytes: &[u8], causal: u8) -> Result<()> {
    sdpa_with(bytes, causal, false)
}

/// [`sdpa`], and with `backward` the backward pass against the file's `grad.out` too, as
/// `attn sdpa --backward` runs it.
pub fn sdpa_with(bytes: &[u8], causal: u8, backward: bool) -> Result<()> {
    let file = TensorFile::parse(Path::new("fuzz.safetensors"), bytes, |_| false)?;
    let causal = [Causal::None, Causal::TopLeft, Causal::BottomRight][causal as usize % 3];
    crate::commands::sdpa::compute(&file, causal, None, backward).map(drop)
}

/// `attn run` on a config, a weights file and an input file given as bytes: config parsing
/// and validation, weights against the config, inputs, masks, the memory cap and the forward
/// pass. The three are written to a private temporary folder, as the command reads paths.
pub fn run(config: &[u8], weights: &[u8], input: &[u8]) -> Result<()> {
    run_with(config, weights, input, false, false)
}

/// [`run`] with `attn run`'s two flags: with `bf16`, BF16 weights accepted and kept as bits
/// (as `--dtype bf16` does) and the module's products in [`Precision::Bf16`] (on every CPU:
/// `--dtype bf16` asks for it only where the CPU has bf16 instructions, but the library runs it
/// everywhere, as f32 kernels on rounded operands where it has none); with `backward`, the
/// backward pass against the input file's `grad.output` (`--backward`).
///
/// [`Precision::Bf16`]: attn_nn::core::Precision::Bf16
pub fn run_with(config: &[u8], weights: &[u8], input: &[u8], bf16: bool, backward: bool) -> Result<()> {
    let dir = ScratchDir::new()?;
    let paths = ["config.json", "weights.safetensors", "in.safetensors"].map(|name| dir.0.join(name));
    for (path, bytes) in paths.iter().zip([config, weights, input]) {
        let mut file = std::fs::File::create(path).with_context(|| path.display().to_string())?;
        file.write_all(bytes)?;
    }
    let mut prepared = crate::commands::run::prepare(&paths[0], &paths[1], &paths[2], bf16)?;
    if bf16 {
        prepared.set_precision(attn_nn::core::Precision::Bf16)?;
    }
    if backward {
        prepared.execute_backward(Par::Seq).map(drop)
    } else {
        prepared.execute(Par::Seq).map(drop)
    }
}

/// Splits one fuzz input into the three files of [`run`]: two little-endian `u32` lengths,
/// then the config, the weights and (the rest) the input. Short inputs give empty files.
/// (`xtask/python/gen_fuzz_seeds.py` and `cargo xtask fuzz` write seeds in this format.)
pub fn split_run_input(bytes: &[u8]) -> [&[u8]; 3] {
    let len = |at: usize| {
        bytes
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let rest = bytes.get(8..).unwrap_or(&[]);
    let (config, rest) = rest.split_at(len(0).min(rest.len()));
    let (weights, input) = rest.split_at(len(4).min(rest.len()));
    [config, weights, input]
}

/// A Hugging Face BERT `config.json`, as `attn embed` and `attn demo` read it.
pub fn bert_config(bytes: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(bytes).context("config.json is not UTF-8")?;
    attn_nn::BertConfig::from_json(text).map(drop).map_err(Into::into)
}

/// `attn embed --input FILE` on `bytes` as the file: UTF-8 check, lines, tokenisation,
/// truncation and the model, loaded once per process from the default model folder. `None`
/// when the model is not installed (`cargo xtask fetch-model`).
pub fn embed_text(bytes: &[u8]) -> Option<Result<()>> {
    static EMBEDDER: OnceLock<Option<Embedder>> = OnceLock::new();
    let embedder = EMBEDDER
        .get_or_init(|| {
            Embedder::load_as(
                &crate::commands::embed::default_model_dir(),
                crate::support::dtype::Dtype::F32,
            )
            .ok()
        })
        .as_ref()?;
    Some((|| {
        let dir = ScratchDir::new()?;
        let path = dir.0.join("sentences.txt");
        std::fs::write(&path, bytes).with_context(|| path.display().to_string())?;
        let texts = crate::commands::embed::read_inputs(Some(&path), &[], true)?;
        embedder.embed(&texts.all(), 32, Par::Seq, |_| {}).map(drop)
    })())
}

/// A folder of one call's own for the files of [`run`] and [`embed_text`] (calls from several
/// threads must not share files), removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("attn-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
