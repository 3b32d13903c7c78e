//! Sequence-to-sequence checkpoints: one safetensors file, the model's tensors under their
//! state-dict names and its configuration in the `attn.seq2seq` metadata (docs/CLI.md),
//! written atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use attn_nn::core::{FromSafetensors, StateDict};
use attn_nn::{Seq2Seq, Seq2SeqConfig};
use safetensors::SafeTensors;

use crate::support::tensors::write_f32_atomic;

/// The metadata key of the configuration.
pub const METADATA_KEY: &str = "attn.seq2seq";

/// A model from the bytes of a checkpoint; `what` names the file in errors.
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Seq2Seq> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| anyhow::anyhow!("{what}: not a valid safetensors file: {e}"))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .with_context(|| format!("{what}: no `{METADATA_KEY}` metadata: not a sequence-to-sequence checkpoint"))?;
    let config = Seq2SeqConfig::from_json(json).with_context(|| format!("{what}: `{METADATA_KEY}` metadata"))?;
    let dict = StateDict::from_safetensors(bytes).with_context(|| what.to_string())?;
    Seq2Seq::from_state_dict(config, dict).with_context(|| what.to_string())
}

/// A model from a checkpoint file.
pub fn load(path: &Path) -> Result<Seq2Seq> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    from_bytes(&bytes, &path.display().to_string())
}

/// Writes `model` to `path` atomically, with `extra` metadata beside its configuration.
pub fn save(path: &Path, model: &Seq2Seq, extra: &[(&str, String)]) -> Result<()> {
    let dict = model.state_dict();
    let tensors: Vec<(&str, &[usize], &[f32])> = dict.iter().map(|(n, t)| (n.as_str(), t.shape(), t.data())).collect();
    let mut metadata = HashMap::from([(METADATA_KEY.to_string(), model.config().to_json())]);
    for (k, v) in extra {
        metadata.insert(k.to_string(), v.clone());
    }
    write_f32_atomic(path, &tensors, Some(metadata))
}
