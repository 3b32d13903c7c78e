//! Sequence-to-sequence checkpoints: one safetensors file, the model's tensors under their
//! state-dict names and its configuration in the `attn.seq2seq` metadata (docs/CLI.md), the
//! format `attn train` writes and `attn translate --model` reads.

use std::collections::BTreeMap;
use std::path::Path;

use attn_core::{write_safetensors, FromSafetensors, Precision, StateDict, Tensor, ToSafetensors};

use super::{Seq2Seq, Seq2SeqConfig};
use crate::{NnError, Result};

/// The metadata key of the configuration (JSON: [`Seq2SeqConfig::to_json`]).
pub const CHECKPOINT_METADATA_KEY: &str = "attn.seq2seq";

impl Seq2Seq {
    /// The bytes of the model's checkpoint, with `extra` metadata beside its configuration.
    /// The same model gives the same bytes.
    pub fn to_checkpoint(&self, extra: &BTreeMap<String, String>) -> Result<Vec<u8>> {
        let mut metadata = extra.clone();
        metadata.insert(CHECKPOINT_METADATA_KEY.to_string(), self.config.to_json());
        Ok(self.state_dict().to_safetensors(&metadata)?)
    }

    /// A model from the bytes of a checkpoint ([`to_checkpoint`](Self::to_checkpoint), `attn
    /// train`'s output): the configuration from its metadata, the weights under their names.
    pub fn from_checkpoint(bytes: &[u8]) -> Result<Self> {
        let config = checkpoint_config(bytes)?;
        Seq2Seq::from_state_dict(config, finite(StateDict::from_safetensors(bytes)?)?)
    }

    /// A model from the bytes of a checkpoint, computing in `precision`
    /// ([`Seq2Seq::set_precision`]). In `Bf16`, BF16 tensors of the file are not widened:
    /// the weight matrices go from the file's bits to their packed form, and the embedding
    /// tables stay bits, each row widened as it is looked up. The model then computes the bits
    /// that the same file read in f32 and set to bf16 computes, holding about half the bytes
    /// ([`Seq2Seq::bytes_held`]), but it cannot train ([`Seq2Seq::holds_bf16_bits`]; training
    /// is a [`NnError::NotTrainable`] error): training updates f32 weights. An F32 file, or
    /// `F32`, gives the model of [`Seq2Seq::from_checkpoint`] set to `precision`.
    pub fn from_checkpoint_in(bytes: &[u8], precision: Precision) -> Result<Self> {
        let config = checkpoint_config(bytes)?;
        let mut model = match precision {
            Precision::F32 => Seq2Seq::from_state_dict(config, finite(StateDict::from_safetensors(bytes)?)?)?,
            Precision::Bf16 => {
                let dict = finite(StateDict::from_safetensors_keeping_bf16(bytes, |_| false)?)?;
                if dict.values().any(Tensor::is_bf16) {
                    Seq2Seq {
                        bits: true,
                        ..Seq2Seq::from_parts(config, dict)?
                    }
                } else {
                    Seq2Seq::from_state_dict(config, dict)?
                }
            }
        };
        model.set_precision(precision)?;
        Ok(model)
    }

    /// Reads a checkpoint from `path` as [`Seq2Seq::from_checkpoint_in`] does; errors name
    /// the file.
    pub fn load_in(path: &Path, precision: Precision) -> Result<Self> {
        let file = |what: String| NnError::File {
            path: path.display().to_string(),
            what,
        };
        let bytes = std::fs::read(path).map_err(|e| file(format!("cannot read: {e}")))?;
        Seq2Seq::from_checkpoint_in(&bytes, precision).map_err(|e| file(e.to_string()))
    }
}

/// The configuration in a checkpoint's metadata.
fn checkpoint_config(bytes: &[u8]) -> Result<Seq2SeqConfig> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| NnError::Checkpoint {
        what: format!("not a valid safetensors file: {e}"),
    })?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CHECKPOINT_METADATA_KEY))
        .ok_or_else(|| NnError::Checkpoint {
            what: format!("no `{CHECKPOINT_METADATA_KEY}` metadata: not a sequence-to-sequence checkpoint"),
        })?;
    Seq2SeqConfig::from_json(json).map_err(|e| NnError::Checkpoint {
        what: format!("`{CHECKPOINT_METADATA_KEY}` metadata: {e}"),
    })
}

impl Seq2Seq {
    /// Writes the checkpoint to `path`, atomically (a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_checkpoint(&BTreeMap::new())?;
        Ok(write_safetensors(path, &bytes)?)
    }

    /// Reads a checkpoint from `path`; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        Seq2Seq::load_in(path, Precision::F32)
    }
}

/// `dict`, unless a weight in it is not finite: a model with a NaN weight gives NaN logits
/// wherever it reaches, so the checkpoint is refused, naming the tensor and the index
/// ([`attn_core::first_non_finite`]); `attn train` never writes one.
fn finite(dict: StateDict) -> Result<StateDict> {
    match attn_core::first_non_finite(&dict) {
        Some(what) => Err(NnError::Checkpoint {
            what: format!("{what}; a model whose weights are not finite has no answers to give"),
        }),
        None => Ok(dict),
    }
}
