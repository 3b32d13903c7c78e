//! Sequence-to-sequence checkpoints, through attn-nn's format ([`Seq2Seq::to_checkpoint`],
//! [`Seq2Seq::from_checkpoint`]): this module only names the file in errors.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use attn_nn::core::{write_safetensors, Precision};
use attn_nn::Seq2Seq;

/// A model from the bytes of a checkpoint; `what` names the file in errors.
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Seq2Seq> {
    Seq2Seq::from_checkpoint(bytes).with_context(|| what.to_string())
}

/// A model from a checkpoint file.
pub fn load(path: &Path) -> Result<Seq2Seq> {
    load_in(path, Precision::F32)
}

/// A model from a checkpoint file, computing in `precision`: in bf16 a BF16 file is not
/// widened ([`Seq2Seq::from_checkpoint_in`]).
pub fn load_in(path: &Path, precision: Precision) -> Result<Seq2Seq> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Seq2Seq::from_checkpoint_in(&bytes, precision).with_context(|| path.display().to_string())
}

/// Writes `model` to `path` atomically, with `extra` metadata beside its configuration.
pub fn save(path: &Path, model: &Seq2Seq, extra: &[(&str, String)]) -> Result<()> {
    let extra: BTreeMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let bytes = model.to_checkpoint(&extra)?;
    Ok(write_safetensors(path, &bytes)?)
}
