//! Encoder and decoder layers with the residual add, their stacks, and the encoder-decoder
//! `Transformer`: PyTorch's `nn.TransformerEncoderLayer`, `nn.TransformerDecoderLayer`,
//! `nn.TransformerEncoder`, `nn.TransformerDecoder` and `nn.Transformer` (inference), with their
//! constructor arguments and state-dict names.
//!
//! Shapes: `src: [B, S, E]`, `tgt: [B, T, E]`, `memory: [B, S, E]` (or sequence-first, by
//! `batch_first`) -> the same shape as the layer's first input. Every layer works on token rows
//! in storage order; only attention cares about the layout.
//!
//! The residual structure reads as in the papers (post-norm, `norm_first = false`):
//! `x = norm1(x + self_attn(x))`, `x = norm2(x + ff(x))`; pre-norm: `x = x + self_attn(norm1(x))`,
//! `x = x + ff(norm2(x))`. The residual add and the norm after it run as one pass.

use attn_core::kernels::{arena, Par};
use attn_core::{
    expect_empty, insert_prefixed, take_prefixed, AttnError, KeyPadding, KvCache, MhaConfig, MhaOptions,
    MultiHeadAttention, ScoreMask, Sequence, StateDict,
};
use serde::{Deserialize, Serialize};

mod train;

pub use train::{LayerTape, StackTape, TransformerMasks, TransformerTape};

use crate::error::invalid;
use crate::layers::{add_in_place, Activation, FeedForward, Linear, Norm, NormKind};
use crate::{NnError, Result};

fn default_ff() -> usize {
    2048
}
fn default_dropout() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// Constructor arguments of `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer`, with
/// PyTorch's names and defaults. Unknown fields are rejected by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    /// E.
    pub d_model: usize,
    /// H.
    pub nhead: usize,
    /// F, the feed-forward width.
    #[serde(default = "default_ff")]
    pub dim_feedforward: usize,
    /// Accepted and ignored (inference).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// `"relu"` or `"gelu"` (exact); attn also takes `"gelu_tanh"`.
    #[serde(default)]
    pub activation: Activation,
    /// The norms' epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `[B, L, E]` inputs when true, `[L, B, E]` when false: every input `Sequence` must be laid
    /// out so (`Layout::from_batch_first`), or the call fails (`B = 1` and `L = 1` either way).
    #[serde(default)]
    pub batch_first: bool,
    /// Pre-norm when true, post-norm (the original Transformer, BERT) when false.
    #[serde(default)]
    pub norm_first: bool,
    /// Biases in the linear layers, attention and norms.
    #[serde(default = "yes")]
    pub bias: bool,
}

impl LayerConfig {
    /// `d_model` and `nhead` with PyTorch's defaults for the rest.
    pub fn new(d_model: usize, nhead: usize) -> Self {
        LayerConfig {
            d_model,
            nhead,
            dim_feedforward: 2048,
            dropout: 0.1,
            activation: Activation::Relu,
            layer_norm_eps: 1e-5,
            batch_first: false,
            norm_first: false,
            bias: true,
        }
    }

    /// Checks every field against its domain, naming the field (`nhead` must divide
    /// `d_model`, and so on). Loading weights checks this first.
    pub fn validate(&self) -> Result<()> {
        if self.d_model == 0 {
            return Err(invalid("d_model", self.d_model, "at least 1"));
        }
        if self.nhead == 0 || !self.d_model.is_multiple_of(self.nhead) {
            return Err(invalid(
                "nhead",
                self.nhead,
                format!("a divisor of d_model = {}", self.d_model),
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(invalid("layer_norm_eps", self.layer_norm_eps, "a positive number"));
        }
        if self.dim_feedforward == 0 {
            return Err(invalid("dim_feedforward", self.dim_feedforward, "at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", self.dropout, "a probability in [0, 1)"));
        }
        Ok(())
    }

    /// An upper bound of the bytes a layer's forward holds at once on `tokens` token rows: the
    /// feed-forward hidden layer (`dim_feedforward` wide) and at most eight `d_model`-wide
    /// buffers (the fused q|k|v projection, attention output, residual sums, norms). Callers
    /// that cap memory check this first.
    pub fn forward_bytes(&self, tokens: usize) -> u128 {
        let width = 8usize.saturating_mul(self.d_model).saturating_add(self.dim_feedforward);
        attn_core::f32_bytes(&[tokens, width])
    }

    fn mha(&self) -> MhaConfig {
        let mut config = MhaConfig::new(self.d_model, self.nhead);
        config.bias = self.bias;
        config.batch_first = self.batch_first;
        config
    }

    fn norm(&self, dict: &mut StateDict, prefix: &str) -> Result<Norm> {
        Norm::load(
            dict,
            prefix,
            self.d_model,
            self.layer_norm_eps,
            NormKind::LayerNorm,
            self.bias,
        )
    }

    /// The attention block under `prefix` (`self_attn.`, `multihead_attn.`), its errors naming
    /// the full tensor names.
    fn attention(&self, dict: &mut StateDict, prefix: &str) -> Result<MultiHeadAttention> {
        sub_module(dict, prefix, |d| {
            Ok(MultiHeadAttention::from_state_dict(self.mha(), std::mem::take(d))?)
        })
    }

    fn ffn(&self, dict: &mut StateDict) -> Result<FeedForward> {
        Ok(FeedForward {
            linear1: Linear::load(dict, "linear1.", self.d_model, self.dim_feedforward, self.bias)?,
            linear2: Linear::load(dict, "linear2.", self.dim_feedforward, self.d_model, self.bias)?,
            activation: self.activation,
        })
    }
}

/// The masks of one attention block, in PyTorch's module conventions.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockMasks<'a> {
    /// `[L, S]` or `[B·H, L, S]`; boolean `true` = masked out, or additive.
    pub mask: ScoreMask<'a>,
    /// `[B, S]`; boolean `true` = padding, additive, or lengths.
    pub key_padding: KeyPadding<'a>,
    /// Top-left causal masking.
    pub is_causal: bool,
    /// Training only: sequences packed without padding (the inputs are then `[1, N, E]`);
    /// with packing no other mask than `is_causal` applies. The inference passes refuse it.
    pub packing: Option<attn_core::Packing<'a>>,
}

impl BlockMasks<'_> {
    /// The options of an inference pass, which does not take packed sequences.
    fn inference(&self) -> Result<MhaOptions<'_>> {
        if self.packing.is_some() {
            return Err(invalid("packing", "set", "no packing outside training (forward_train)"));
        }
        Ok(self.mha())
    }

    fn mha(&self) -> MhaOptions<'_> {
        MhaOptions {
            attn_mask: self.mask,
            key_padding: self.key_padding,
            is_causal: self.is_causal,
            ..Default::default()
        }
    }
}

/// Fails, naming the first tensor nothing took.
fn reject_leftovers(dict: &StateDict) -> Result<()> {
    Ok(expect_empty(dict, &["no tensor of that name".to_string()])?)
}

/// Builds a submodule from the tensors under `prefix`; errors name tensors with the prefix, and
/// a tensor under the prefix that the submodule does not use is an error.
pub(crate) fn sub_module<T>(
    dict: &mut StateDict,
    prefix: &str,
    build: impl FnOnce(&mut StateDict) -> Result<T>,
) -> Result<T> {
    let mut sub = take_prefixed(dict, prefix);
    let built = build(&mut sub).and_then(|value| reject_leftovers(&sub).map(|()| value));
    built.map_err(|e| match e {
        NnError::Attention(AttnError::MissingTensor { name, expected }) => AttnError::MissingTensor {
            name: format!("{prefix}{name}"),
            expected,
        }
        .into(),
        NnError::Attention(AttnError::UnexpectedTensor { name, known }) => AttnError::UnexpectedTensor {
            name: format!("{prefix}{name}"),
            known,
        }
        .into(),
        NnError::Attention(AttnError::ShapeMismatch {
            op,
            tensor,
            expected,
            got,
        }) if op == "load" => AttnError::ShapeMismatch {
            op,
            tensor: format!("{prefix}{tensor}"),
            expected,
            got,
        }
        .into(),
        other => other,
    })
}

/// A batch of sequences as token rows, with the layer's layout.
fn seq<'a>(data: &'a [f32], like: &Sequence<'_>) -> Sequence<'a> {
    Sequence { data, ..*like }
}

fn check_input(op: &'static str, name: &str, x: &Sequence<'_>, d_model: usize) -> Result<()> {
    if x.dim != d_model || x.batch * x.len * x.dim != x.data.len() {
        return Err(NnError::ShapeMismatch {
            op,
            tensor: name.to_string(),
            expected: format!("{} rows of E = {d_model}", x.batch * x.len),
            got: vec![x.batch, x.len, x.dim],
        });
    }
    Ok(())
}

/// The state dict of a layer with attention blocks `attentions` (prefixes) and norms `norms`,
/// uniform in `±1/sqrt(fan_in)` (norms at weight 1, bias 0).
fn random_layer(config: &LayerConfig, attentions: &[&str], norms: &[&str], seed: u64) -> Result<StateDict> {
    let (e, f) = (config.d_model, config.dim_feedforward);
    let mut dict = StateDict::new();
    for (i, prefix) in attentions.iter().enumerate() {
        let mha = MultiHeadAttention::with_seed(config.mha(), seed.wrapping_add(1000 * i as u64))?;
        insert_prefixed(&mut dict, prefix, mha.state_dict());
    }
    let mut init = attn_core::WeightInit::new(seed.wrapping_add(1));
    let mut next = |n: usize, fan_in: usize| init.uniform(vec![n], fan_in).into_data();
    let mut put = |name: &str, shape: Vec<usize>, data: Vec<f32>| {
        dict.insert(
            name.to_string(),
            attn_core::Tensor::new(name, shape, data).expect("sizes agree"),
        );
    };
    put("linear1.weight", vec![f, e], next(f * e, e));
    put("linear2.weight", vec![e, f], next(e * f, f));
    if config.bias {
        put("linear1.bias", vec![f], next(f, e));
        put("linear2.bias", vec![e], next(e, f));
    }
    for norm in norms {
        put(&format!("{norm}.weight"), vec![e], vec![1.0; e]);
        if config.bias {
            put(&format!("{norm}.bias"), vec![e], vec![0.0; e]);
        }
    }
    Ok(dict)
}

/// What a training walk keeps for the backward: each block's input after the first, and each
/// block's `h = x + dropout(sub(x))` (post-norm) or `n = norm(x)` (pre-norm).
#[derive(Debug, Default)]
pub(crate) struct Kept {
    pub(crate) block_inputs: Vec<Vec<f32>>,
    pub(crate) blocks: Vec<Vec<f32>>,
}

/// The one description of a layer's residual blocks, for inference and training alike: block
/// `i` is `norms[i]` around sublayer `sub(i, ·)` (whose output, in training, already has its
/// dropout applied):
/// - pre-norm: `x = x + sub(norm(x))`;
/// - post-norm: `x = norm(x + sub(x))`.
///
/// Without `kept` (inference) the residual add and the next norm run fused in one pass
/// (`add_then_forward`, `add_forward_in_place`) and nothing is kept; with it (training) the
/// sums and the norms' inputs are kept for the backward (`train::Blocks`).
pub(crate) fn walk(
    norms: &[&Norm],
    norm_first: bool,
    input: &[f32],
    mut sub: impl FnMut(usize, &[f32]) -> Result<Vec<f32>>,
    kept: Option<&mut Kept>,
    par: Par,
) -> Result<Vec<f32>> {
    let Some(kept) = kept else {
        // Inference hands nothing to the arena: buffers freed here go back to the allocator,
        // which returns them cache-warm to the next call (giving them to the arena instead made
        // `attn embed` 35% slower: docs/PERFORMANCE.md).
        let mut x = input.to_vec();
        if norm_first {
            let mut normed = norms[0].forward(&x, par)?;
            for i in 0..norms.len() {
                let y = sub(i, &normed)?;
                match norms.get(i + 1) {
                    Some(next) => normed = next.add_then_forward(&mut x, &y, par)?,
                    None => add_in_place(&mut x, &y, par)?,
                }
            }
        } else {
            for (i, norm) in norms.iter().enumerate() {
                let y = sub(i, &x)?;
                norm.add_forward_in_place(&mut x, &y, par)?;
            }
        }
        return Ok(x);
    };
    let mut current: Option<Vec<f32>> = None;
    for (i, norm) in norms.iter().enumerate() {
        let x = current.as_deref().unwrap_or(input);
        let (out, keep) = if norm_first {
            let n = norm.forward(x, par)?;
            let mut y = sub(i, &n)?;
            add_in_place(&mut y, x, par)?;
            (y, n)
        } else {
            let mut h = sub(i, x)?;
            add_in_place(&mut h, x, par)?;
            (norm.forward(&h, par)?, h)
        };
        if let Some(previous) = current.take() {
            kept.block_inputs.push(previous);
        }
        kept.blocks.push(keep);
        current = Some(out);
    }
    Ok(current.unwrap_or_else(|| arena::copied(input)))
}

/// `nn.TransformerEncoderLayer`: self-attention and a feed-forward block, each with its residual
/// add and norm. State-dict names: `self_attn.*`, `linear1.*`, `linear2.*`, `norm1.*`, `norm2.*`.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    config: LayerConfig,
    self_attn: MultiHeadAttention,
    ffn: FeedForward,
    norm1: Norm,
    norm2: Norm,
}

impl EncoderLayer {
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

    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
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
    config: LayerConfig,
    self_attn: MultiHeadAttention,
    cross_attn: MultiHeadAttention,
    ffn: FeedForward,
    norm1: Norm,
    norm2: Norm,
    norm3: Norm,
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

    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
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
        self.cross_attn.fill_cache(memory, memory, &mut cross_attn, par)?;
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
                .forward_cached(seq(h, &x), &mut c, &MhaOptions::default(), par)?
                .output)
        };
        let cross = |h: &[f32]| -> Result<Vec<f32>> {
            Ok(self
                .cross_attn
                .forward_with_cache(seq(h, &x), cross_cache, &memory_masks.inference()?, par)?
                .output)
        };
        self.residual_blocks(x.data, self_attend, cross, par)
    }
}

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
trait StackLayer: Sized {
    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self>;
    fn state_dict(&self) -> StateDict;
}

impl StackLayer for EncoderLayer {
    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
        EncoderLayer::take(config, dict)
    }
    fn state_dict(&self) -> StateDict {
        EncoderLayer::state_dict(self)
    }
}

impl StackLayer for DecoderLayer {
    fn take(config: LayerConfig, dict: &mut StateDict) -> Result<Self> {
        DecoderLayer::take(config, dict)
    }
    fn state_dict(&self) -> StateDict {
        DecoderLayer::state_dict(self)
    }
}

/// `num_layers` layers (`layers.{i}.*`) and an optional final norm (`norm.*`).
#[derive(Debug, Clone)]
struct Stack<L> {
    layers: Vec<L>,
    norm: Option<Norm>,
    config: StackConfig,
}

impl<L: StackLayer> Stack<L> {
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
pub struct Encoder(Stack<EncoderLayer>);

impl Encoder {
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
pub struct Decoder(Stack<DecoderLayer>);

/// Cached state of a decoder stack during incremental decoding.
#[derive(Debug, Clone)]
pub struct DecoderCache {
    layers: Vec<DecoderLayerCache>,
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
