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

use attn_core::kernels::Par;
use attn_core::{concat_rows, take, KeyPadding, Precision, Sequence, StateDict, Tensor};
use serde::Deserialize;

use crate::error::invalid;
use crate::layers::{Activation, Norm, NormKind};
use crate::{BlockMasks, EncoderLayer, LayerConfig, NnError, Result};

mod embedder;
#[cfg(feature = "tokenizers")]
mod text;

pub use embedder::{Pooling, SentenceEmbedder, MAX_BATCH_TOKENS};
#[cfg(feature = "tokenizers")]
pub use text::{cache_dir, default_model_dir, EmbedOptions, Embeddings, TextEmbedder};

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
    /// `"gelu"` (exact), `"gelu_new"` or `"gelu_pytorch_tanh"` (the tanh form), or `"relu"`.
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
            other => Err(invalid(
                "hidden_act",
                other,
                "\"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\" or \"relu\"",
            )),
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
            // Stack query, key and value into PyTorch's fused in_proj (bf16 bits stay bits).
            let (mut weights, mut biases) = (Vec::new(), Vec::new());
            for part in ["query", "key", "value"] {
                weights.push(take(&mut dict, &format!("{p}attention.self.{part}.weight"), &[e, e])?);
                biases.push(take(&mut dict, &format!("{p}attention.self.{part}.bias"), &[e])?);
            }
            let stack = |name: &str, parts: &[Tensor]| concat_rows(name, &parts.iter().collect::<Vec<_>>());
            layer.insert("self_attn.in_proj_weight".into(), stack("in_proj_weight", &weights)?);
            layer.insert("self_attn.in_proj_bias".into(), stack("in_proj_bias", &biases)?);
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

    /// Bytes of weights held: every tensor (4 bytes per f32 value, 2 per bf16 value kept from a
    /// BF16 file) and, in bf16, the packed copies of the linear maps.
    pub fn bytes_held(&self) -> usize {
        let tables = [&self.word, &self.position, &self.token_type].map(Tensor::bytes_held);
        tables.iter().sum::<usize>()
            + self.embedding_norm.bytes_held()
            + self.layers.iter().map(EncoderLayer::bytes_held).sum::<usize>()
    }

    /// The precision of the layers' linear maps.
    pub fn precision(&self) -> Precision {
        self.layers.first().map_or(Precision::F32, |layer| layer.precision())
    }

    /// Sets the precision of every layer's linear maps ([`Precision`]; the embeddings, norms
    /// and attention stay f32).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.set_precision(precision))
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
        for (row, (&id, out)) in ids.iter().zip(x.chunks_mut(e)).enumerate() {
            self.embed_token(id, row % len, out);
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
        for w in starts.windows(2) {
            for (p, row) in (w[0]..w[1]).enumerate() {
                self.embed_token(ids[row], p, &mut x[row * e..(row + 1) * e]);
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
    /// `out` = the word embedding of `id` + the position embedding of `position` + token type
    /// 0's (ids and positions checked by the caller). Rows are read one at a time, so tables
    /// loaded as bf16 bits are widened a row at a time and never whole.
    fn embed_token(&self, id: u32, position: usize, out: &mut [f32]) {
        let (word, pos, token_type) = (
            self.word.row(id as usize),
            self.position.row(position),
            self.token_type.row(0),
        );
        for (((o, &a), &b), &c) in out.iter_mut().zip(&*word).zip(&*pos).zip(&*token_type) {
            *o = a + b + c;
        }
    }

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
