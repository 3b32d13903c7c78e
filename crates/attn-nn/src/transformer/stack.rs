//! Stacks of layers (`nn.TransformerEncoder`, `nn.TransformerDecoder`) and the whole
//! `nn.Transformer`, with their configurations and decoding caches.

use attn_core::kernels::Par;
use attn_core::{insert_prefixed, Precision, Sequence, StateDict, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::Norm;
use crate::Result;

use super::layers::{DecoderLayer, DecoderLayerCache, EncoderLayer};
use super::{check_input, reject_leftovers, seq, sub_module, BlockMasks, LayerConfig};

/// Configuration of a stack: `num_layers` copies of `layer`, and an optional final norm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// The layer's constructor arguments.
    pub layer: LayerConfig,
    /// How many layers.
    pub num_layers: usize,
    /// A final LayerNorm (PyTorch's `norm=nn.LayerNorm(d_model, eps=layer_norm_eps)`).
    #[serde(default)]
    pub norm: bool,
    /// Accepted and ignored: attn never returns nested-tensor zeros for padding.
    #[serde(default)]
    pub enable_nested_tensor: Option<bool>,
    /// Accepted and ignored.
    #[serde(default)]
    pub mask_check: Option<bool>,
}

/// What a stack needs of its layers.
pub(super) trait StackLayer: Sized {
    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self>;
    fn state_dict(&self) -> StateDict;
    fn set_precision(&mut self, precision: Precision) -> Result<()>;
    fn bytes_held(&self) -> usize;
}

impl StackLayer for EncoderLayer {
    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
        EncoderLayer::take(config, dict)
    }
    fn state_dict(&self) -> StateDict {
        EncoderLayer::state_dict(self)
    }
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        EncoderLayer::set_precision(self, precision)
    }
    fn bytes_held(&self) -> usize {
        EncoderLayer::bytes_held(self)
    }
}

impl StackLayer for DecoderLayer {
    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
        DecoderLayer::take(config, dict)
    }
    fn state_dict(&self) -> StateDict {
        DecoderLayer::state_dict(self)
    }
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        DecoderLayer::set_precision(self, precision)
    }
    fn bytes_held(&self) -> usize {
        DecoderLayer::bytes_held(self)
    }
}

/// `num_layers` layers (`layers.{i}.*`) and an optional final norm (`norm.*`).
#[derive(Debug, Clone)]
pub(super) struct Stack<L> {
    pub(super) layers: Vec<L>,
    pub(super) norm: Option<Norm>,
    pub(super) config: StackConfig,
}

impl<L: StackLayer> Stack<L> {
    /// Bytes of weights held by the layers and the final norm.
    pub(super) fn bytes_held(&self) -> usize {
        self.layers.iter().map(L::bytes_held).sum::<usize>() + self.norm.as_ref().map_or(0, Norm::bytes_held)
    }

    /// Every layer's linear maps in `precision` (the final norm stays f32).
    pub(super) fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.set_precision(precision))
    }

    fn take(config: StackConfig, dict: &mut StateDict) -> Result<Self> {
        let layers = (0..config.num_layers)
            .map(|i| sub_module(dict, &format!("layers.{i}."), |d| L::take(config.layer.clone(), d)))
            .collect::<Result<Vec<_>>>()?;
        let norm = config.norm.then(|| config.layer.norm(dict, "norm.")).transpose()?;
        Ok(Stack { layers, norm, config })
    }

    fn from_state_dict(config: StackConfig, mut dict: StateDict) -> Result<Self> {
        let stack = Self::take(config, &mut dict)?;
        reject_leftovers(&dict)?;
        Ok(stack)
    }

    fn state_dict(&self) -> StateDict {
        let mut dict = StateDict::new();
        for (i, layer) in self.layers.iter().enumerate() {
            insert_prefixed(&mut dict, &format!("layers.{i}."), layer.state_dict());
        }
        if let Some(norm) = &self.norm {
            norm.save(&mut dict, "norm.");
        }
        dict
    }

    /// The final norm, if any.
    fn finish(&self, x: Vec<f32>, par: Par) -> Result<Vec<f32>> {
        match &self.norm {
            Some(norm) => norm.forward(&x, par),
            None => Ok(x),
        }
    }
}

/// `nn.TransformerEncoder`: layers `layers.{i}.*` and an optional `norm.*`.
#[derive(Debug, Clone)]
pub struct Encoder(pub(super) Stack<EncoderLayer>);

impl Encoder {
    /// Bytes of weights held ([`EncoderLayer::bytes_held`], and the final norm's).
    pub fn bytes_held(&self) -> usize {
        self.0.bytes_held()
    }

    /// Sets every layer's precision ([`EncoderLayer::set_precision`]).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.0.set_precision(precision)
    }

    /// Builds the stack from its state dict; every tensor must be used.
    pub fn from_state_dict(config: StackConfig, dict: StateDict) -> Result<Self> {
        Stack::from_state_dict(config, dict).map(Encoder)
    }

    /// The configuration.
    pub fn config(&self) -> &StackConfig {
        &self.0.config
    }

    /// The tensors under their PyTorch names (`layers.{i}.*`, `norm.*`).
    pub fn state_dict(&self) -> StateDict {
        self.0.state_dict()
    }

    /// `src: [B, S, E]` -> `[B, S, E]`, the same masks for every layer.
    pub fn forward(&self, src: Sequence<'_>, masks: &BlockMasks<'_>, par: Par) -> Result<Vec<f32>> {
        check_input("transformer_encoder", "src", &src, self.0.config.layer.d_model)?;
        let mut x = src.data.to_vec();
        for layer in &self.0.layers {
            x = layer.forward(seq(&x, &src), masks, par)?;
        }
        self.0.finish(x, par)
    }
}

/// `nn.TransformerDecoder`: layers `layers.{i}.*` and an optional `norm.*`.
#[derive(Debug, Clone)]
pub struct Decoder(pub(super) Stack<DecoderLayer>);

/// Cached state of a decoder stack during incremental decoding.
#[derive(Debug, Clone)]
pub struct DecoderCache {
    pub(super) layers: Vec<DecoderLayerCache>,
}

impl DecoderCache {
    /// Target positions decoded so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.self_attn.len())
    }
    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch row `i` continues from the old row `rows[i]` (beam search); the cross-attention
    /// caches, one memory for every row, are left as they are.
    pub fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        for layer in &mut self.layers {
            layer.self_attn.reorder(rows)?;
        }
        Ok(())
    }
}

impl Decoder {
    /// Bytes of weights held ([`DecoderLayer::bytes_held`], and the final norm's).
    pub fn bytes_held(&self) -> usize {
        self.0.bytes_held()
    }

    /// Sets every layer's precision ([`DecoderLayer::set_precision`]).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.0.set_precision(precision)
    }

    /// Builds the stack from its state dict; every tensor must be used.
    pub fn from_state_dict(config: StackConfig, dict: StateDict) -> Result<Self> {
        Stack::from_state_dict(config, dict).map(Decoder)
    }

    /// The configuration.
    pub fn config(&self) -> &StackConfig {
        &self.0.config
    }

    /// The tensors under their PyTorch names (`layers.{i}.*`, `norm.*`).
    pub fn state_dict(&self) -> StateDict {
        self.0.state_dict()
    }

    /// `tgt: [B, T, E]`, `memory: [B, S, E]` -> `[B, T, E]`.
    pub fn forward(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        par: Par,
    ) -> Result<Vec<f32>> {
        check_input("transformer_decoder", "tgt", &tgt, self.0.config.layer.d_model)?;
        let mut x = tgt.data.to_vec();
        for layer in &self.0.layers {
            x = layer.forward(seq(&x, &tgt), memory, tgt_masks, memory_masks, par)?;
        }
        self.0.finish(x, par)
    }

    /// [`forward`](Self::forward), and each layer's cross-attention weights `[B, H, T, S]`.
    pub fn forward_with_cross_weights(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        check_input("transformer_decoder", "tgt", &tgt, self.0.config.layer.d_model)?;
        let mut x = tgt.data.to_vec();
        let mut weights = Vec::with_capacity(self.0.layers.len());
        for layer in &self.0.layers {
            let (out, w) = layer.forward_with_cross_weights(seq(&x, &tgt), memory, tgt_masks, memory_masks, par)?;
            x = out;
            weights.push(w);
        }
        Ok((self.0.finish(x, par)?, weights))
    }

    /// Starts incremental decoding of `memory`: cross-attention keys and values are computed
    /// once here for every layer.
    pub fn start_decoding(&self, memory: Sequence<'_>, capacity: usize, par: Par) -> Result<DecoderCache> {
        let layers = self
            .0
            .layers
            .iter()
            .map(|l| l.start_decoding(memory, capacity, par))
            .collect::<Result<_>>()?;
        Ok(DecoderCache { layers })
    }

    /// The next `n` target positions `x: [B, n, E]` -> `[B, n, E]`. Decoding N tokens one at a
    /// time equals one `forward` over them with `tgt_is_causal`.
    pub fn decode_step(
        &self,
        x: Sequence<'_>,
        cache: &mut DecoderCache,
        memory_masks: &BlockMasks<'_>,
        par: Par,
    ) -> Result<Vec<f32>> {
        check_input("transformer_decoder", "tgt", &x, self.0.config.layer.d_model)?;
        let mut h = x.data.to_vec();
        for (layer, layer_cache) in self.0.layers.iter().zip(&mut cache.layers) {
            h = layer.decode_step(seq(&h, &x), layer_cache, memory_masks, par)?;
        }
        self.0.finish(h, par)
    }
}

/// Configuration of [`Transformer`]: `nn.Transformer`'s constructor arguments. The per-layer
/// fields are one [`LayerConfig`] (written flat in JSON, as PyTorch's keyword arguments), with
/// `nn.Transformer`'s defaults `d_model = 512` and `nhead = 8` when absent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransformerConfig {
    /// The fields every encoder and decoder layer shares.
    #[serde(flatten)]
    pub layer: LayerConfig,
    /// Encoder layers.
    pub num_encoder_layers: usize,
    /// Decoder layers.
    pub num_decoder_layers: usize,
}

impl<'de> Deserialize<'de> for TransformerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        use serde_json::Value;
        let mut map = serde_json::Map::deserialize(deserializer)?;
        let mut layers = |name: &str| -> std::result::Result<usize, D::Error> {
            match map.remove(name) {
                None => Ok(6),
                Some(v) => serde_json::from_value(v).map_err(|e| D::Error::custom(format!("`{name}`: {e}"))),
            }
        };
        let (num_encoder_layers, num_decoder_layers) = (layers("num_encoder_layers")?, layers("num_decoder_layers")?);
        map.entry("d_model").or_insert(Value::from(512));
        map.entry("nhead").or_insert(Value::from(8));
        let layer = serde_json::from_value(Value::Object(map)).map_err(D::Error::custom)?;
        Ok(TransformerConfig {
            layer,
            num_encoder_layers,
            num_decoder_layers,
        })
    }
}

/// `nn.Transformer`: `encoder.*` (with its final norm) and `decoder.*` (with its final norm).
#[derive(Debug, Clone)]
pub struct Transformer {
    /// The encoder stack.
    pub encoder: Encoder,
    /// The decoder stack.
    pub decoder: Decoder,
}

impl Transformer {
    /// Bytes of weights held by both stacks ([`Encoder::bytes_held`], [`Decoder::bytes_held`]).
    pub fn bytes_held(&self) -> usize {
        self.encoder.bytes_held() + self.decoder.bytes_held()
    }

    /// Sets both stacks' precision ([`Precision`]).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.encoder.set_precision(precision)?;
        self.decoder.set_precision(precision)
    }

    /// A model with deterministic pseudo-random weights: encoder layer `i` as
    /// [`EncoderLayer::with_seed`] at `seed + 10 + i`, decoder layer `i` as
    /// [`DecoderLayer::with_seed`] at `seed + 100 + i`, the final norms at weight 1 and bias 0
    /// (for tests, examples, benchmarks, and the start of a model trained from scratch).
    pub fn with_seed(config: TransformerConfig, seed: u64) -> Result<Self> {
        let e = config.layer.d_model;
        let mut dict = StateDict::new();
        for i in 0..config.num_encoder_layers {
            let l = EncoderLayer::with_seed(config.layer.clone(), seed.wrapping_add(10 + i as u64))?;
            insert_prefixed(&mut dict, &format!("encoder.layers.{i}."), l.state_dict());
        }
        for i in 0..config.num_decoder_layers {
            let l = DecoderLayer::with_seed(config.layer.clone(), seed.wrapping_add(100 + i as u64))?;
            insert_prefixed(&mut dict, &format!("decoder.layers.{i}."), l.state_dict());
        }
        for stack in ["encoder", "decoder"] {
            dict.insert(format!("{stack}.norm.weight"), Tensor::new("w", vec![e], vec![1.0; e])?);
            if config.layer.bias {
                dict.insert(format!("{stack}.norm.bias"), Tensor::zeros(vec![e]));
            }
        }
        Self::from_state_dict(config, dict)
    }

    /// Builds the model from `nn.Transformer.state_dict()`.
    pub fn from_state_dict(config: TransformerConfig, mut dict: StateDict) -> Result<Self> {
        let stack = |num_layers| StackConfig {
            layer: config.layer.clone(),
            num_layers,
            norm: true,
            enable_nested_tensor: None,
            mask_check: None,
        };
        let encoder = sub_module(&mut dict, "encoder.", |d| {
            Stack::take(stack(config.num_encoder_layers), d).map(Encoder)
        })?;
        let decoder = sub_module(&mut dict, "decoder.", |d| {
            Stack::take(stack(config.num_decoder_layers), d).map(Decoder)
        })?;
        reject_leftovers(&dict)?;
        Ok(Transformer { encoder, decoder })
    }

    /// The tensors under their PyTorch names (`encoder.*`, `decoder.*`).
    pub fn state_dict(&self) -> StateDict {
        let mut dict = StateDict::new();
        insert_prefixed(&mut dict, "encoder.", self.encoder.state_dict());
        insert_prefixed(&mut dict, "decoder.", self.decoder.state_dict());
        dict
    }

    /// `src: [B, S, E]`, `tgt: [B, T, E]` -> `[B, T, E]`: the encoder's output is the decoder's
    /// memory. `memory_masks.key_padding` is usually the source's padding.
    pub fn forward(
        &self,
        src: Sequence<'_>,
        tgt: Sequence<'_>,
        src_masks: &BlockMasks<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        par: Par,
    ) -> Result<Vec<f32>> {
        let memory = self.encoder.forward(src, src_masks, par)?;
        self.decoder
            .forward(tgt, seq(&memory, &src), tgt_masks, memory_masks, par)
    }
}
