//! Sequence-to-sequence checkpoints: one safetensors file, the model's tensors under their
//! state-dict names and its configuration in the `attn.seq2seq` metadata (docs/CLI.md), the
//! format `attn train` writes and `attn translate --model` reads.

use std::collections::BTreeMap;
use std::path::Path;

use attn_core::{write_safetensors, FromSafetensors, StateDict, ToSafetensors};

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
        let config = Seq2SeqConfig::from_json(json).map_err(|e| NnError::Checkpoint {
            what: format!("`{CHECKPOINT_METADATA_KEY}` metadata: {e}"),
        })?;
        Seq2Seq::from_state_dict(config, StateDict::from_safetensors(bytes)?)
    }

    /// Writes the checkpoint to `path`, atomically (a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_checkpoint(&BTreeMap::new())?;
        Ok(write_safetensors(path, &bytes)?)
    }

    /// Reads a checkpoint from `path`; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let file = |what: String| NnError::File {
            path: path.display().to_string(),
            what,
        };
        let bytes = std::fs::read(path).map_err(|e| file(format!("cannot read: {e}")))?;
        Seq2Seq::from_checkpoint(&bytes).map_err(|e| file(e.to_string()))
    }
}
