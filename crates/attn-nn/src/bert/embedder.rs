//! Sentence embeddings from a [`BertModel`] as sentence-transformers computes them: token states
//! pooled ([`Pooling`]) into one vector per sentence, optionally L2-normalised.

use std::path::Path;

use attn_core::kernels::Par;
use attn_core::{FromSafetensors, Precision, StateDict};

use super::{BertConfig, BertModel};
use crate::error::invalid;
use crate::{NnError, Result};

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over real tokens (sentence-transformers' `pooling_mode_mean_tokens`).
    Mean,
    /// The first token (`[CLS]`).
    Cls,
    /// The elementwise maximum over real tokens.
    Max,
}

/// A sentence-embedding pipeline: a BERT model, pooling, and optional L2 normalisation, as
/// sentence-transformers runs it.
///
/// [`SentenceEmbedder::from_dir`] reads a sentence-transformers model folder (all-MiniLM-L6-v2:
/// `cargo xtask fetch-model`); the caller tokenises with the folder's `tokenizer.json` (the
/// `tokenizers` crate) and hands over token ids:
///
/// ```no_run
/// use attn_nn::SentenceEmbedder;
/// use attn_nn::core::kernels::Par;
/// let embedder = SentenceEmbedder::from_dir("all-MiniLM-L6-v2".as_ref()).unwrap();
/// // Token ids with [CLS] = 101 and [SEP] = 102. Trailing [PAD] ids (MiniLM's tokenizer.json
/// // pads to 128) are stripped, so padded and unpadded ids give the same vector.
/// let sentences = vec![vec![101, 1037, 4937, 2938, 2006, 1996, 13523, 102]];
/// let vectors = embedder.embed(&sentences, 32, Par::Rayon, |_| {}).unwrap();
/// assert_eq!(vectors.len(), 384);
/// ```
#[derive(Debug, Clone)]
pub struct SentenceEmbedder {
    /// The encoder.
    pub model: BertModel,
    /// Pooling.
    pub pooling: Pooling,
    /// L2-normalise the pooled vectors (sentence-transformers' `Normalize` module).
    pub normalize: bool,
    /// Longest token sequence accepted (`max_seq_length`, at most the position table); longer
    /// ones are refused, since truncation belongs to the tokenizer (it keeps the `[SEP]`).
    pub max_seq_length: usize,
    /// The `[PAD]` id: trailing runs of it are stripped before embedding (`pad_token_id`).
    pub pad_token_id: u32,
}

impl SentenceEmbedder {
    /// A model and its pooling, with `max_seq_length` the position table's length and
    /// `pad_token_id` the config's.
    pub fn new(model: BertModel, pooling: Pooling, normalize: bool) -> Self {
        SentenceEmbedder {
            max_seq_length: model.config.max_position_embeddings,
            pad_token_id: model.config.pad_token_id,
            model,
            pooling,
            normalize,
        }
    }

    /// Reads a sentence-transformers model folder: `config.json` and `model.safetensors` (F32,
    /// F16, BF16 or F64), and where present `modules.json` (a `Normalize` module turns on L2
    /// normalisation), `1_Pooling/config.json` (mean, CLS or max pooling; mean when absent) and
    /// `sentence_bert_config.json` (`max_seq_length`). Errors name the file and the field.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_in(dir, Precision::F32)
    }

    /// [`SentenceEmbedder::from_dir`] for a model computing in `precision`
    /// ([`BertModel::set_precision`]). In `Bf16`, a BF16 `model.safetensors` is not widened: its
    /// weight matrices go from the file's bits to their packed form, and the embedding tables
    /// stay bits, widened a row at a time. The weights then take 2 bytes per value plus the
    /// packed copies ([`BertModel::bytes_held`]; all-MiniLM-L6-v2: 66.5 MB, against 111.5 MB
    /// from an F32 file in bf16 and 90.3 MB in f32, 132.7 MB on Intel at AVX-512, where f32
    /// weight matrices are packed too: [`crate::layers::Linear::set_precision`]), and the model computes
    /// the same bits as the widened file would in bf16.
    pub fn from_dir_in(dir: &Path, precision: Precision) -> Result<Self> {
        let file_error = |path: &Path, what: String| NnError::File {
            path: path.display().to_string(),
            what,
        };
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(file_error(&path, format!("cannot read: {e}"))),
            }
        };
        let json = |name: &str| -> Result<Option<serde_json::Value>> {
            read(name)?
                .map(|bytes| {
                    serde_json::from_slice(&bytes)
                        .map_err(|e| file_error(&dir.join(name), format!("not valid JSON: {e}")))
                })
                .transpose()
        };
        let required = |name: &str| -> Result<Vec<u8>> {
            read(name)?.ok_or_else(|| file_error(&dir.join(name), "missing from the model folder".into()))
        };
        let config_text = String::from_utf8(required("config.json")?)
            .map_err(|_| file_error(&dir.join("config.json"), "not UTF-8".into()))?;
        let config =
            BertConfig::from_json(&config_text).map_err(|e| file_error(&dir.join("config.json"), e.to_string()))?;
        // `embeddings.position_ids` is an integer buffer, not a weight.
        let bytes = required("model.safetensors")?;
        let skip = |name: &str| name.ends_with("position_ids");
        let dict = match precision {
            Precision::F32 => StateDict::from_safetensors_skipping(&bytes, skip),
            Precision::Bf16 => StateDict::from_safetensors_keeping_bf16(&bytes, skip),
        }
        .map_err(|e| file_error(&dir.join("model.safetensors"), e.to_string()))?;
        drop(bytes);
        // Every embedding a NaN weight reaches is NaN: such a file is refused, naming the weight.
        if let Some(what) = attn_core::first_non_finite(&dict) {
            return Err(file_error(
                &dir.join("model.safetensors"),
                format!("{what}; a model whose weights are not finite has no embeddings to give"),
            ));
        }
        let mut model = BertModel::from_state_dict(config, dict)
            .map_err(|e| file_error(&dir.join("model.safetensors"), e.to_string()))?;
        model.set_precision(precision)?;
        let mut embedder = SentenceEmbedder::new(model, Pooling::Mean, false);

        if let Some(st) = json("sentence_bert_config.json")? {
            if let Some(n) = st.get("max_seq_length").and_then(serde_json::Value::as_u64) {
                if n == 0 {
                    let path = dir.join("sentence_bert_config.json");
                    return Err(file_error(&path, "`max_seq_length` is 0, expected at least 1".into()));
                }
                embedder.max_seq_length = embedder.max_seq_length.min(usize::try_from(n).unwrap_or(usize::MAX));
            }
        }
        if let Some(v) = json("1_Pooling/config.json")? {
            let on = |key: &str| v.get(key).and_then(serde_json::Value::as_bool).unwrap_or(false);
            embedder.pooling = if on("pooling_mode_cls_token") {
                Pooling::Cls
            } else if on("pooling_mode_max_tokens") {
                Pooling::Max
            } else if on("pooling_mode_mean_tokens") {
                Pooling::Mean
            } else {
                let path = dir.join("1_Pooling/config.json");
                return Err(file_error(
                    &path,
                    "no pooling mode this version supports (mean, cls, max)".into(),
                ));
            };
        }
        embedder.normalize = json("modules.json")?.is_some_and(|modules| {
            modules.as_array().is_some_and(|list| {
                list.iter().any(|m| {
                    m.get("type")
                        .and_then(serde_json::Value::as_str)
                        .is_some_and(|t| t.ends_with("Normalize"))
                })
            })
        });
        Ok(embedder)
    }

    /// Embeds token-id sequences (each with its `[CLS]` and `[SEP]`) -> `[N, E]` rows, in input
    /// order. Trailing `[PAD]` ids are stripped first, so ids padded by a tokenizer give the
    /// vectors of the unpadded sequence; a sequence longer than `max_seq_length` is refused. Up
    /// to `batch_size` sequences at a time are packed back to back (no padding), so the work
    /// follows the real token count, and at most [`MAX_BATCH_TOKENS`] tokens (a sequence longer
    /// than that alone): the activations of a forward pass grow with its tokens, and a batch
    /// size of 2^32 over 20,000 sentences of 200 words asked for 6 GiB at once and aborted.
    /// The rows are the same bits in any batch size.
    pub fn embed(
        &self,
        sequences: &[Vec<u32>],
        batch_size: usize,
        par: Par,
        progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        self.embed_within(sequences, batch_size, MAX_BATCH_TOKENS, par, progress)
    }

    /// [`SentenceEmbedder::embed`] with at most `max_tokens` tokens a forward pass instead of
    /// [`MAX_BATCH_TOKENS`] (at least one sequence each).
    pub fn embed_within(
        &self,
        sequences: &[Vec<u32>],
        batch_size: usize,
        max_tokens: usize,
        par: Par,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        if batch_size == 0 {
            return Err(invalid("batch_size", 0, "at least 1"));
        }
        let e = self.model.config.hidden_size;
        let unpadded: Vec<&[u32]> = sequences
            .iter()
            .map(|ids| {
                let real = ids
                    .iter()
                    .rposition(|&id| id != self.pad_token_id)
                    .map_or(0, |last| last + 1);
                &ids[..real]
            })
            .collect();
        if let Some((i, ids)) = unpadded
            .iter()
            .enumerate()
            .find(|(_, ids)| ids.len() > self.max_seq_length)
        {
            return Err(invalid(
                "token ids",
                format!("{} ids in sequence {i}", ids.len()),
                format!(
                    "at most max_seq_length = {} (truncate when tokenising)",
                    self.max_seq_length
                ),
            ));
        }
        let mut out = vec![0.0f32; sequences.len() * e];
        // Sequences are packed back to back, `batch_size` (and `max_tokens`) at a time: no
        // padding at all.
        for range in batches(&unpadded, batch_size, max_tokens) {
            let chunk = &unpadded[range.clone()];
            let mut starts = Vec::with_capacity(chunk.len() + 1);
            starts.push(0);
            for seq in chunk {
                starts.push(starts.last().expect("non-empty") + seq.len());
            }
            let ids: Vec<u32> = chunk.iter().flat_map(|ids| ids.iter()).copied().collect();
            let hidden = self.model.hidden_states_packed(&ids, &starts, par)?;
            for (k, w) in starts.windows(2).enumerate() {
                let i = range.start + k;
                let dst = &mut out[i * e..(i + 1) * e];
                pool(&hidden[w[0] * e..w[1] * e], e, self.pooling, dst);
                if self.normalize {
                    // torch.nn.functional.normalize: x / max(||x||, 1e-12)
                    let norm = dst
                        .iter()
                        .map(|&v| (v as f64) * (v as f64))
                        .sum::<f64>()
                        .sqrt()
                        .max(1e-12);
                    dst.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
                }
                if let Some(j) = dst.iter().position(|v| !v.is_finite()) {
                    return Err(NnError::NonFinite {
                        index: i,
                        what: format!(
                            "its embedding holds {} at position {j}: the model's activations overflowed, so it has no embedding to give",
                            dst[j]
                        ),
                    });
                }
            }
            progress(chunk.len());
        }
        Ok(out)
    }
}

/// The most tokens [`SentenceEmbedder::embed`] packs into one forward pass: 64 sequences of
/// 256 tokens, or 32 of 512, so the batches of sentence-transformers' defaults are never split.
pub const MAX_BATCH_TOKENS: usize = 16_384;

/// Consecutive ranges of `sequences`, each of at most `batch_size` sequences and `max_tokens`
/// tokens (a longer sequence alone).
fn batches(sequences: &[&[u32]], batch_size: usize, max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < sequences.len() {
        let (mut end, mut tokens) = (start, 0usize);
        while end < sequences.len()
            && end - start < batch_size
            && (end == start || tokens + sequences[end].len() <= max_tokens)
        {
            tokens += sequences[end].len();
            end += 1;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// Pools `states: [n, E]` into `dst: [E]` (zeros when `n = 0`).
fn pool(states: &[f32], e: usize, pooling: Pooling, dst: &mut [f32]) {
    let n = states.len() / e;
    if n == 0 {
        dst.fill(0.0);
        return;
    }
    match pooling {
        Pooling::Cls => dst.copy_from_slice(&states[..e]),
        Pooling::Mean => {
            let mut acc = vec![0.0f64; e];
            for row in states.chunks(e) {
                acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
            }
            dst.iter_mut().zip(&acc).for_each(|(d, &a)| *d = (a / n as f64) as f32);
        }
        Pooling::Max => {
            dst.fill(f32::NEG_INFINITY);
            for row in states.chunks(e) {
                dst.iter_mut().zip(row).for_each(|(d, &x)| *d = d.max(x));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches hold at most `batch_size` sequences and `max_tokens` tokens, a longer sequence
    /// alone, in order, covering every sequence once.
    #[test]
    fn batches_bound_sequences_and_tokens() {
        let ids: Vec<Vec<u32>> = [3, 4, 10, 2, 2, 2, 7].iter().map(|&n| vec![1; n]).collect();
        let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        assert_eq!(batches(&seqs, 32, 8), [0..2, 2..3, 3..6, 6..7]);
        assert_eq!(batches(&seqs, 2, 100), [0..2, 2..4, 4..6, 6..7]);
        assert_eq!(
            batches(&seqs, usize::MAX, usize::MAX),
            vec![std::ops::Range { start: 0, end: 7 }]
        );
        assert_eq!(batches(&seqs, 1, 0), (0..7).map(|i| i..i + 1).collect::<Vec<_>>());
        assert!(batches(&[], 4, 4).is_empty());
    }

    /// Each pooling by its definition on three rows of width 2 (values chosen so every mode
    /// gives a different answer, and a scaled mean would show), and zeros for no rows.
    #[test]
    fn pooling_follows_its_definition() {
        let states = [1.0f32, -4.0, 3.0, 2.0, -1.0, 5.0];
        let pooled = |pooling| {
            let mut dst = [9.0f32; 2];
            pool(&states, 2, pooling, &mut dst);
            dst
        };
        assert_eq!(pooled(Pooling::Cls), [1.0, -4.0]);
        assert_eq!(pooled(Pooling::Mean), [1.0, 1.0]);
        assert_eq!(pooled(Pooling::Max), [3.0, 5.0]);
        let mut dst = [9.0f32; 2];
        pool(&[], 2, Pooling::Mean, &mut dst);
        assert_eq!(dst, [0.0, 0.0]);
    }
}
