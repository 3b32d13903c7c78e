//! `nn.TransformerEncoderLayer` and `nn.TransformerDecoderLayer`: inference (every forward walks
//! the residual blocks once, `super::walk`), loading, saving, and decoding caches.

use attn_core::kernels::Par;
use attn_core::{insert_prefixed, KvCache, MhaOptions, MultiHeadAttention, Precision, Sequence, StateDict};

use crate::layers::{FeedForward, Norm};
use crate::Result;

use super::{check_input, random_layer, reject_leftovers, seq, walk, BlockMasks, LayerConfig};

/// `nn.TransformerEncoderLayer`: self-attention and a feed-forward block, each with its residual
/// add and norm. State-dict names: `self_attn.*`, `linear1.*`, `linear2.*`, `norm1.*`, `norm2.*`.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    pub(super) config: LayerConfig,
    pub(super) self_attn: MultiHeadAttention,
    pub(super) ffn: FeedForward,
    pub(super) norm1: Norm,
    pub(super) norm2: Norm,
}

impl EncoderLayer {
    /// The precision of the layer's linear maps.
    pub fn precision(&self) -> Precision {
        self.self_attn.precision()
    }

    /// Bytes of weights held: every tensor (4 bytes per f32 value, 2 per bf16 value) and, in
    /// bf16, the packed copies.
    pub fn bytes_held(&self) -> usize {
        self.self_attn.bytes_held() + self.ffn.bytes_held() + self.norm1.bytes_held() + self.norm2.bytes_held()
    }

    /// Sets the precision of the layer's linear maps (its attention's projections and the
    /// feed-forward block; see [`Precision`]). Norms, softmax and the residual adds stay f32.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.self_attn.set_precision(precision)?;
        self.ffn.set_precision(precision)
    }

    /// A layer with deterministic pseudo-random weights (norms at weight 1, bias 0), for tests,
    /// examples and benchmarks.
    ///
    /// ```
    /// use attn_nn::{BlockMasks, EncoderLayer, LayerConfig};
    /// use attn_nn::core::{KeyPadding, Sequence};
    /// use attn_nn::core::kernels::Par;
    /// let mut config = LayerConfig::new(32, 4); // d_model 32, 4 heads, PyTorch's defaults
    /// config.dim_feedforward = 64;
    /// config.batch_first = true;
    /// let layer = EncoderLayer::with_seed(config, 1).unwrap();
    /// let src = vec![0.5f32; 2 * 5 * 32]; // [B=2, S=5, E=32]
    /// // The second sequence has 3 real tokens.
    /// let masks = BlockMasks { key_padding: KeyPadding::Lengths(&[5, 3]), ..Default::default() };
    /// let out = layer.forward(Sequence::batch_first(&src, 2, 5, 32), &masks, Par::Rayon).unwrap();
    /// assert_eq!(out.len(), 2 * 5 * 32);
    /// ```
    pub fn with_seed(config: LayerConfig, seed: u64) -> Result<Self> {
        let dict = random_layer(&config, &["self_attn."], &["norm1", "norm2"], seed)?;
        Self::from_state_dict(config, dict)
    }

    /// Builds the layer from its state dict; every tensor must be used.
    pub fn from_state_dict(config: LayerConfig, mut dict: StateDict) -> Result<Self> {
        let layer = Self::take(config, &mut dict)?;
        reject_leftovers(&dict)?;
        Ok(layer)
    }

    pub(super) fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
        config.validate()?;
        let self_attn = config.attention(dict, "self_attn.")?;
        let ffn = config.ffn(dict)?;
        let norm1 = config.norm(dict, "norm1.")?;
        let norm2 = config.norm(dict, "norm2.")?;
        Ok(EncoderLayer {
            config,
            self_attn,
            ffn,
            norm1,
            norm2,
        })
    }

    /// The tensors under their PyTorch names.
    pub fn state_dict(&self) -> StateDict {
        let mut dict = StateDict::new();
        insert_prefixed(&mut dict, "self_attn.", self.self_attn.state_dict());
        self.ffn.linear1.save(&mut dict, "linear1.");
        self.ffn.linear2.save(&mut dict, "linear2.");
        self.norm1.save(&mut dict, "norm1.");
        self.norm2.save(&mut dict, "norm2.");
        dict
    }

    /// The configuration.
    pub fn config(&self) -> &LayerConfig {
        &self.config
    }

    /// `src: [B, S, E]` -> `[B, S, E]` (in `src`'s layout).
    pub fn forward(&self, src: Sequence<'_>, masks: &BlockMasks<'_>, par: Par) -> Result<Vec<f32>> {
        check_input("transformer_encoder_layer", "src", &src, self.config.d_model)?;
        let options = masks.inference()?;
        let self_attend = |h: &[f32]| Ok(self.self_attn.forward_self(seq(h, &src), &options, par)?.output);
        self.residual_blocks(src.data, self_attend, par)
    }

    /// The two residual blocks around `attend` (self-attention over token rows) and the
    /// feed-forward block: [`walk`] with no tape.
    fn residual_blocks(
        &self,
        x: &[f32],
        attend: impl FnOnce(&[f32]) -> Result<Vec<f32>>,
        par: Par,
    ) -> Result<Vec<f32>> {
        let mut attend = Some(attend);
        let sub = |i: usize, h: &[f32]| match i {
            0 => attend.take().expect("the attention block runs once")(h),
            _ => self.ffn.forward(h, par),
        };
        walk(&[&self.norm1, &self.norm2], self.config.norm_first, x, sub, None, par)
    }
}

impl EncoderLayer {
    /// The self-attention weights of every head this layer computes for `src: [B, S, E]` ->
    /// `[B, H, S, S]` (the attention's input is `src`, or `norm1(src)` for pre-norm layers).
    pub fn attention_weights(&self, src: Sequence<'_>, masks: &BlockMasks<'_>, par: Par) -> Result<Vec<f32>> {
        check_input("transformer_encoder_layer", "src", &src, self.config.d_model)?;
        let normed;
        let input = if self.config.norm_first {
            normed = self.norm1.forward(src.data, par)?;
            seq(&normed, &src)
        } else {
            src
        };
        let mut options = masks.inference()?;
        options.need_weights = attn_core::NeedWeights::PerHead;
        let out = self.self_attn.forward_self(input, &options, par)?;
        Ok(out.weights.expect("asked for weights"))
    }

    /// The layer over packed sequences of different lengths (no padding): `x: [N, E]` token rows,
    /// sequence `i` being rows `starts[i]..starts[i + 1]` -> `[N, E]`. Attention stays within
    /// each sequence; everything else is per token.
    pub fn forward_packed(&self, x: &[f32], starts: &[usize], is_causal: bool, par: Par) -> Result<Vec<f32>> {
        let self_attend = |h: &[f32]| Ok(self.self_attn.forward_self_packed(h, starts, is_causal, par)?);
        self.residual_blocks(x, self_attend, par)
    }
}

/// `nn.TransformerDecoderLayer`: masked self-attention, cross-attention over the encoder's
/// memory, and a feed-forward block, each with its residual add and norm. State-dict names:
/// `self_attn.*`, `multihead_attn.*`, `linear1.*`, `linear2.*`, `norm1.*`, `norm2.*`, `norm3.*`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub(super) config: LayerConfig,
    pub(super) self_attn: MultiHeadAttention,
    pub(super) cross_attn: MultiHeadAttention,
    pub(super) ffn: FeedForward,
    pub(super) norm1: Norm,
    pub(super) norm2: Norm,
    pub(super) norm3: Norm,
}

/// Cached state of one decoder layer during incremental decoding.
#[derive(Debug, Clone)]
pub struct DecoderLayerCache {
    /// Keys and values of the target positions decoded so far.
    pub self_attn: KvCache,
    /// Keys and values of the memory, computed once per source.
    pub cross_attn: KvCache,
}

impl DecoderLayer {
    /// Bytes of weights held: every tensor (4 bytes per f32 value, 2 per bf16 value) and, in
    /// bf16, the packed copies.
    pub fn bytes_held(&self) -> usize {
        self.self_attn.bytes_held()
            + self.cross_attn.bytes_held()
            + self.ffn.bytes_held()
            + [&self.norm1, &self.norm2, &self.norm3]
                .map(|n| n.bytes_held())
                .iter()
                .sum::<usize>()
    }

    /// Sets the precision of the layer's linear maps (both attentions' projections and the
    /// feed-forward block; see [`Precision`]).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.self_attn.set_precision(precision)?;
        self.cross_attn.set_precision(precision)?;
        self.ffn.set_precision(precision)
    }

    /// A layer with deterministic pseudo-random weights (norms at weight 1, bias 0), for tests,
    /// examples and benchmarks.
    pub fn with_seed(config: LayerConfig, seed: u64) -> Result<Self> {
        let dict = random_layer(
            &config,
            &["self_attn.", "multihead_attn."],
            &["norm1", "norm2", "norm3"],
            seed,
        )?;
        Self::from_state_dict(config, dict)
    }

    /// Builds the layer from its state dict; every tensor must be used.
    pub fn from_state_dict(config: LayerConfig, mut dict: StateDict) -> Result<Self> {
        let layer = Self::take(config, &mut dict)?;
        reject_leftovers(&dict)?;
        Ok(layer)
    }

    pub(super) fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
        config.validate()?;
        let self_attn = config.attention(dict, "self_attn.")?;
        let cross_attn = config.attention(dict, "multihead_attn.")?;
        let ffn = config.ffn(dict)?;
        let norm1 = config.norm(dict, "norm1.")?;
        let norm2 = config.norm(dict, "norm2.")?;
        let norm3 = config.norm(dict, "norm3.")?;
        Ok(DecoderLayer {
            config,
            self_attn,
            cross_attn,
            ffn,
            norm1,
            norm2,
            norm3,
        })
    }

    /// The tensors under their PyTorch names.
    pub fn state_dict(&self) -> StateDict {
        let mut dict = StateDict::new();
        insert_prefixed(&mut dict, "self_attn.", self.self_attn.state_dict());
        insert_prefixed(&mut dict, "multihead_attn.", self.cross_attn.state_dict());
        self.ffn.linear1.save(&mut dict, "linear1.");
        self.ffn.linear2.save(&mut dict, "linear2.");
        self.norm1.save(&mut dict, "norm1.");
        self.norm2.save(&mut dict, "norm2.");
        self.norm3.save(&mut dict, "norm3.");
        dict
    }

    /// The configuration.
    pub fn config(&self) -> &LayerConfig {
        &self.config
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
        Ok(self
            .forward_weights(tgt, memory, tgt_masks, memory_masks, false, par)?
            .0)
    }

    /// [`forward`](Self::forward), and the cross-attention weights of every head `[B, H, T, S]`
    /// (which memory positions each target position looked at).
    pub fn forward_with_cross_weights(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.forward_weights(tgt, memory, tgt_masks, memory_masks, true, par)
    }

    /// The forward, with the cross-attention weights `[B, H, T, S]` when `weights` (else empty).
    fn forward_weights(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        weights: bool,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_input("transformer_decoder_layer", "tgt", &tgt, self.config.d_model)?;
        check_input("transformer_decoder_layer", "memory", &memory, self.config.d_model)?;
        let kept = std::cell::RefCell::new(Vec::new());
        let cross = |x: &[f32]| -> Result<Vec<f32>> {
            let mut options = memory_masks.inference()?;
            if weights {
                options.need_weights = attn_core::NeedWeights::PerHead;
            }
            let out = self.cross_attn.forward(seq(x, &tgt), memory, memory, &options, par)?;
            *kept.borrow_mut() = out.weights.unwrap_or_default();
            Ok(out.output)
        };
        let self_attend = |x: &[f32]| -> Result<Vec<f32>> {
            Ok(self
                .self_attn
                .forward_self(seq(x, &tgt), &tgt_masks.inference()?, par)?
                .output)
        };
        let out = self.residual_blocks(tgt.data, self_attend, cross, par)?;
        Ok((out, kept.into_inner()))
    }

    /// The three blocks with their residual adds and norms, around the two attention calls:
    /// [`walk`] with no tape.
    fn residual_blocks(
        &self,
        x: &[f32],
        self_attend: impl Fn(&[f32]) -> Result<Vec<f32>>,
        cross: impl Fn(&[f32]) -> Result<Vec<f32>>,
        par: Par,
    ) -> Result<Vec<f32>> {
        let sub = |i: usize, h: &[f32]| match i {
            0 => self_attend(h),
            1 => cross(h),
            _ => self.ffn.forward(h, par),
        };
        let norms = [&self.norm1, &self.norm2, &self.norm3];
        walk(&norms, self.config.norm_first, x, sub, None, par)
    }

    /// An empty cache for decoding `memory` (`[B, S, E]`): the cross-attention keys and values
    /// are computed here, once.
    pub fn start_decoding(&self, memory: Sequence<'_>, capacity: usize, par: Par) -> Result<DecoderLayerCache> {
        check_input("transformer_decoder_layer", "memory", &memory, self.config.d_model)?;
        let mut cross_attn = self.cross_attn.new_cache(memory.batch, memory.len);
        self.cross_attn.append_to_cache(memory, memory, &mut cross_attn, par)?;
        Ok(DecoderLayerCache {
            self_attn: self.self_attn.new_cache(memory.batch, capacity),
            cross_attn,
        })
    }

    /// The next `n` target positions `x: [B, n, E]` -> `[B, n, E]`, attending causally to every
    /// position decoded so far and to the cached memory. `memory_masks` refer to the memory's
    /// positions (`mask` is then `[n, S]`).
    pub fn decode_step(
        &self,
        x: Sequence<'_>,
        cache: &mut DecoderLayerCache,
        memory_masks: &BlockMasks<'_>,
        par: Par,
    ) -> Result<Vec<f32>> {
        check_input("transformer_decoder_layer", "tgt", &x, self.config.d_model)?;
        let self_cache = std::cell::RefCell::new(&mut cache.self_attn);
        let cross_cache = &cache.cross_attn;
        let self_attend = |h: &[f32]| -> Result<Vec<f32>> {
            let mut c = self_cache.borrow_mut();
            Ok(self
                .self_attn
                .forward_append(seq(h, &x), &mut c, &MhaOptions::default(), par)?
                .output)
        };
        let cross = |h: &[f32]| -> Result<Vec<f32>> {
            Ok(self
                .cross_attn
                .forward_over_cache(seq(h, &x), cross_cache, &memory_masks.inference()?, par)?
                .output)
        };
        self.residual_blocks(x.data, self_attend, cross, par)
    }
}
