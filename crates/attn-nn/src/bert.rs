//! A BERT-family encoder (BERT, MiniLM, all-MiniLM-L6-v2) from a Hugging Face checkpoint, and
//! sentence embeddings as sentence-transformers computes them (pooling, L2 normalisation).
//!
//! Shapes: token ids `[B, L]` (right-padded, with per-sequence lengths) -> hidden states
//! `[B, L, E]` -> pooled embeddings `[B, E]`. The model takes token ids; tokenisation is the
//! caller's (attn-cli uses the `tokenizers` crate with the checkpoint's `tokenizer.json`).
//!
//! Each layer is an [`EncoderLayer`](crate::EncoderLayer) (post-norm, exact GELU): the
//! checkpoint's separate query, key and value weights are stacked into one `[3E, E]` projection
//! at load time, so self-attention runs one fused GEMM. Padding is key padding by lengths, so the
//! kernels skip padded keys.

use std::path::Path;

use attn_core::kernels::Par;
use attn_core::{take, FromSafetensors, KeyPadding, Sequence, StateDict, Tensor};
use serde::Deserialize;

use crate::error::invalid;
use crate::layers::{Activation, Norm, NormKind};
use crate::{BlockMasks, EncoderLayer, LayerConfig, NnError, Result};

/// The fields of a Hugging Face BERT `config.json` that the model uses. Other fields of the
/// file (`architectures`, dropout rates, ...) are ignored; `model_type` and
/// `position_embedding_type`, when present, must be `"bert"` and `"absolute"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// E.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// H.
    pub num_attention_heads: usize,
    /// F.
    pub intermediate_size: usize,
    /// `"gelu"` (exact), `"gelu_new"` or `"relu"`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// Token types.
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// The norms' epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `"bert"` expected.
    #[serde(default)]
    pub model_type: Option<String>,
    /// `"absolute"` expected.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// The `[PAD]` token id (0 in BERT's vocabulary).
    #[serde(default)]
    pub pad_token_id: u32,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: BertConfig = serde_json::from_str(text).map_err(|e| invalid("config.json", e, "a BERT config"))?;
        if let Some(kind) = &config.model_type {
            if kind != "bert" {
                return Err(invalid("model_type", kind, "\"bert\""));
            }
        }
        if let Some(kind) = &config.position_embedding_type {
            if kind != "absolute" {
                return Err(invalid("position_embedding_type", kind, "\"absolute\""));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the sizes and the activation: every error names the field.
    fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if value == 0 {
                return Err(invalid(field, value, "at least 1"));
            }
        }
        let (e, h) = (self.hidden_size, self.num_attention_heads);
        if e % h != 0 {
            return Err(invalid(
                "num_attention_heads",
                h,
                format!("a divisor of hidden_size = {e}"),
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(invalid(
                "layer_norm_eps",
                self.layer_norm_eps,
                "a positive finite number",
            ));
        }
        self.activation().map(drop)
    }

    fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(invalid("hidden_act", other, "\"gelu\", \"gelu_new\" or \"relu\"")),
        }
    }
}

/// A BERT encoder with its embeddings.
#[derive(Debug, Clone)]
pub struct BertModel {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: Norm,
    layers: Vec<EncoderLayer>,
}

/// Moves the tensor `from` of `dict` to `to` in `out`.
fn rename(dict: &mut StateDict, out: &mut StateDict, from: &str, to: &str, shape: &[usize]) -> Result<()> {
    out.insert(to.to_string(), take(dict, from, shape)?);
    Ok(())
}

impl BertModel {
    /// Builds the model from a Hugging Face BERT state dict (`embeddings.*`, `encoder.layer.{i}.*`,
    /// with or without a `bert.` prefix). `pooler.*` and `embeddings.position_ids` are ignored;
    /// any other unknown tensor is an error naming it.
    pub fn from_state_dict(config: BertConfig, mut dict: StateDict) -> Result<Self> {
        config.validate()?;
        let (e, f, h) = (config.hidden_size, config.intermediate_size, config.num_attention_heads);
        // Strip a `bert.` prefix; drop what sentence embeddings do not use.
        let names: Vec<String> = dict.keys().cloned().collect();
        for name in names {
            let tensor = dict.remove(&name).expect("listed");
            let short = name.strip_prefix("bert.").unwrap_or(&name).to_string();
            if short.starts_with("pooler.") || short == "embeddings.position_ids" {
                continue;
            }
            dict.insert(short, tensor);
        }
        let word = take(&mut dict, "embeddings.word_embeddings.weight", &[config.vocab_size, e])?;
        let position = take(
            &mut dict,
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, e],
        )?;
        let token_type = take(
            &mut dict,
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, e],
        )?;
        let embedding_norm = Norm::load(
            &mut dict,
            "embeddings.LayerNorm.",
            e,
            config.layer_norm_eps,
            NormKind::LayerNorm,
            true,
        )?;
        let layer_config = LayerConfig {
            d_model: e,
            nhead: h,
            dim_feedforward: f,
            dropout: 0.0,
            activation: config.activation()?,
            layer_norm_eps: config.layer_norm_eps,
            batch_first: true,
            norm_first: false,
            bias: true,
        };
        // Sized by what the weights hold, never by a number in the config.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}.");
            let mut layer = StateDict::new();
            // Stack query, key and value into PyTorch's fused in_proj.
            let (mut weight, mut bias) = (Vec::new(), Vec::new());
            for part in ["query", "key", "value"] {
                weight.extend_from_slice(take(&mut dict, &format!("{p}attention.self.{part}.weight"), &[e, e])?.data());
                bias.extend_from_slice(take(&mut dict, &format!("{p}attention.self.{part}.bias"), &[e])?.data());
            }
            layer.insert(
                "self_attn.in_proj_weight".into(),
                Tensor::new("in_proj_weight", vec![3 * e, e], weight)?,
            );
            layer.insert(
                "self_attn.in_proj_bias".into(),
                Tensor::new("in_proj_bias", vec![3 * e], bias)?,
            );
            for (from, to, shape) in [
                ("attention.output.dense.weight", "self_attn.out_proj.weight", vec![e, e]),
                ("attention.output.dense.bias", "self_attn.out_proj.bias", vec![e]),
                ("attention.output.LayerNorm.weight", "norm1.weight", vec![e]),
                ("attention.output.LayerNorm.bias", "norm1.bias", vec![e]),
                ("intermediate.dense.weight", "linear1.weight", vec![f, e]),
                ("intermediate.dense.bias", "linear1.bias", vec![f]),
                ("output.dense.weight", "linear2.weight", vec![e, f]),
                ("output.dense.bias", "linear2.bias", vec![e]),
                ("output.LayerNorm.weight", "norm2.weight", vec![e]),
                ("output.LayerNorm.bias", "norm2.bias", vec![e]),
            ] {
                rename(&mut dict, &mut layer, &format!("{p}{from}"), to, &shape)?;
            }
            layers.push(EncoderLayer::from_state_dict(layer_config.clone(), layer)?);
        }
        attn_core::expect_empty(&dict, &["embeddings.*, encoder.layer.*, pooler.*".to_string()])?;
        Ok(BertModel {
            config,
            word,
            position,
            token_type,
            embedding_norm,
            layers,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Hidden states of the last layer: `ids: [B, L]` (row-major, right-padded; `lengths[b]`
    /// real tokens each, token type 0) -> `[B, L, E]`. Rows past a sequence's length hold
    /// values nothing should read.
    pub fn hidden_states(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
        lengths: &[usize],
        par: Par,
    ) -> Result<Vec<f32>> {
        let e = self.config.hidden_size;
        if ids.len() != batch * len || lengths.len() != batch {
            return Err(NnError::ShapeMismatch {
                op: "bert",
                tensor: "input_ids".into(),
                expected: format!("[B, L] = [{batch}, {len}] with {batch} lengths"),
                got: vec![ids.len(), lengths.len()],
            });
        }
        if len > self.config.max_position_embeddings {
            return Err(invalid(
                "sequence length",
                len,
                format!(
                    "at most max_position_embeddings = {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        if let Some(&bad) = lengths.iter().find(|&&l| l > len) {
            return Err(invalid("length", bad, format!("at most L = {len}")));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(invalid(
                "token id",
                bad,
                format!("below vocab_size = {}", self.config.vocab_size),
            ));
        }
        // Embeddings: word + position + token type 0, then LayerNorm.
        let mut x = vec![0.0f32; batch * len * e];
        let (word, position, token_type) = (self.word.data(), self.position.data(), &self.token_type.data()[..e]);
        for (row, (&id, out)) in ids.iter().zip(x.chunks_mut(e)).enumerate() {
            let p = row % len;
            let w = &word[id as usize * e..(id as usize + 1) * e];
            let pe = &position[p * e..(p + 1) * e];
            for (((o, &a), &b), &c) in out.iter_mut().zip(w).zip(pe).zip(token_type) {
                *o = a + b + c;
            }
        }
        let mut x = self.embedding_norm.forward(&x, par)?;
        let masks = BlockMasks {
            key_padding: KeyPadding::Lengths(lengths),
            ..Default::default()
        };
        for layer in &self.layers {
            x = layer.forward(Sequence::batch_first(&x, batch, len, e), &masks, par)?;
        }
        Ok(x)
    }
}

impl BertModel {
    /// Hidden states of packed sequences, without padding: `ids: [N]` holds the token ids of
    /// every sequence back to back, sequence `i` being `starts[i]..starts[i + 1]` -> `[N, E]`.
    /// The cost follows the real token count.
    pub fn hidden_states_packed(&self, ids: &[u32], starts: &[usize], par: Par) -> Result<Vec<f32>> {
        self.hidden_states_packed_until(ids, starts, self.layers.len(), par)
    }

    /// The states entering layer `until` (all layers when `until` is their count).
    fn hidden_states_packed_until(&self, ids: &[u32], starts: &[usize], until: usize, par: Par) -> Result<Vec<f32>> {
        let e = self.config.hidden_size;
        if starts.first() != Some(&0) || starts.last() != Some(&ids.len()) || starts.windows(2).any(|w| w[0] > w[1]) {
            return Err(NnError::ShapeMismatch {
                op: "bert",
                tensor: "starts".into(),
                expected: format!("0 = starts[0] <= ... <= starts[last] = N = {}", ids.len()),
                got: starts.to_vec(),
            });
        }
        if let Some(w) = starts
            .windows(2)
            .find(|w| w[1] - w[0] > self.config.max_position_embeddings)
        {
            return Err(invalid(
                "sequence length",
                w[1] - w[0],
                format!(
                    "at most max_position_embeddings = {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(invalid(
                "token id",
                bad,
                format!("below vocab_size = {}", self.config.vocab_size),
            ));
        }
        let mut x = vec![0.0f32; ids.len() * e];
        let (word, position, token_type) = (self.word.data(), self.position.data(), &self.token_type.data()[..e]);
        for w in starts.windows(2) {
            for (p, row) in (w[0]..w[1]).enumerate() {
                let id = ids[row] as usize;
                let out = &mut x[row * e..(row + 1) * e];
                let (word_row, pos_row) = (&word[id * e..(id + 1) * e], &position[p * e..(p + 1) * e]);
                for (((o, &a), &b), &c) in out.iter_mut().zip(word_row).zip(pos_row).zip(token_type) {
                    *o = a + b + c;
                }
            }
        }
        let mut x = self.embedding_norm.forward(&x, par)?;
        for layer in &self.layers[..until] {
            x = layer.forward_packed(&x, starts, false, par)?;
        }
        Ok(x)
    }
}

impl BertModel {
    /// Layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The attention of layer `layer` over one sequence: `ids: [L]` -> `[H, L, L]` weights
    /// (row: query token, column: key token).
    pub fn attention_map(&self, ids: &[u32], layer: usize, par: Par) -> Result<Vec<f32>> {
        if layer >= self.layers.len() {
            return Err(invalid(
                "layer",
                layer,
                format!("below the {} layers", self.layers.len()),
            ));
        }
        let e = self.config.hidden_size;
        let starts = [0, ids.len()];
        // Hidden states entering `layer`: embeddings, then the layers before it.
        let x = self.hidden_states_packed_until(ids, &starts, layer, par)?;
        let masks = BlockMasks::default();
        self.layers[layer].attention_weights(Sequence::batch_first(&x, 1, ids.len(), e), &masks, par)
    }
}

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
        let dict = StateDict::from_safetensors_skipping(&required("model.safetensors")?, |name| {
            name.ends_with("position_ids")
        })
        .map_err(|e| file_error(&dir.join("model.safetensors"), e.to_string()))?;
        let model = BertModel::from_state_dict(config, dict)
            .map_err(|e| file_error(&dir.join("model.safetensors"), e.to_string()))?;
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
    /// follows the real token count.
    pub fn embed(
        &self,
        sequences: &[Vec<u32>],
        batch_size: usize,
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
        // Sequences are packed back to back, `batch_size` at a time: no padding at all.
        for (chunk_index, chunk) in unpadded.chunks(batch_size).enumerate() {
            let mut starts = Vec::with_capacity(chunk.len() + 1);
            starts.push(0);
            for seq in chunk {
                starts.push(starts.last().expect("non-empty") + seq.len());
            }
            let ids: Vec<u32> = chunk.iter().flat_map(|ids| ids.iter()).copied().collect();
            let hidden = self.model.hidden_states_packed(&ids, &starts, par)?;
            for (k, w) in starts.windows(2).enumerate() {
                let i = chunk_index * batch_size + k;
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
            }
            progress(chunk.len());
        }
        Ok(out)
    }
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
