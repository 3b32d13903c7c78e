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
    expect_empty, insert_prefixed, take_prefixed, AttnError, KeyPadding, MhaConfig, MhaOptions, MultiHeadAttention,
    ScoreMask, Sequence, StateDict,
};
use serde::{Deserialize, Serialize};

mod layers;
mod stack;
mod train;
mod train_stack;

pub use layers::{DecoderLayer, DecoderLayerCache, EncoderLayer};
use stack::Stack;
pub use stack::{Decoder, DecoderCache, Encoder, StackConfig, Transformer, TransformerConfig};

pub use train::LayerTape;
pub use train_stack::{StackTape, TransformerTape};

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
    /// `d_model` and `nhead` with PyTorch's defaults for the rest, except `batch_first`, which is
    /// `true`: inputs built with `Sequence::batch_first`, the layout attn's models use. (A
    /// configuration read from JSON without the field gets PyTorch's `false`.)
    pub fn new(d_model: usize, nhead: usize) -> Self {
        LayerConfig {
            d_model,
            nhead,
            dim_feedforward: 2048,
            dropout: 0.1,
            activation: Activation::Relu,
            layer_norm_eps: 1e-5,
            batch_first: true,
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
    /// feed-forward hidden layer (`dim_feedforward` wide), at most eight `d_model`-wide
    /// buffers (the fused q|k|v projection, attention output, residual sums, norms), and the
    /// flash kernel's packed keys and values (`d_model` and, each head's values rounded up to
    /// 16 columns, at most `d_model + 16·nhead`; not the rounding of each sequence's keys up to
    /// a block of 512). Callers that cap memory check this first.
    pub fn forward_bytes(&self, tokens: usize) -> u128 {
        let width = 10usize
            .saturating_mul(self.d_model)
            .saturating_add(16usize.saturating_mul(self.nhead))
            .saturating_add(self.dim_feedforward);
        attn_core::f32_size_in_bytes(&[tokens, width])
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

/// The masks of a [`Transformer`] call: the source's, the target's and the memory's.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransformerMasks<'a> {
    /// The encoder's self-attention.
    pub src: BlockMasks<'a>,
    /// The decoder's self-attention.
    pub tgt: BlockMasks<'a>,
    /// The decoder's cross-attention over the memory.
    pub memory: BlockMasks<'a>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration read from JSON gets PyTorch's defaults for what it leaves out.
    #[test]
    fn json_defaults_are_pytorchs() {
        let config: LayerConfig = serde_json::from_str(r#"{"d_model": 8, "nhead": 2}"#).unwrap();
        assert_eq!(config.dim_feedforward, 2048);
        assert_eq!(config.dropout, 0.1);
        assert_eq!(config.layer_norm_eps, 1e-5);
        assert!(config.bias && !config.batch_first && !config.norm_first);
        assert_eq!(config.activation, Activation::Relu);
    }

    /// `validate` refuses each field outside its domain, naming it, and accepts its edges.
    #[test]
    fn validate_names_each_field_out_of_its_domain() {
        let ok = LayerConfig::new(8, 2);
        ok.validate().unwrap();
        let with = |f: &dyn Fn(&mut LayerConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate()
        };
        for (field, bad) in [
            ("d_model", with(&|c| c.d_model = 0)),
            ("nhead", with(&|c| c.nhead = 0)),
            ("nhead", with(&|c| c.nhead = 3)),
            ("layer_norm_eps", with(&|c| c.layer_norm_eps = 0.0)),
            ("layer_norm_eps", with(&|c| c.layer_norm_eps = -1e-5)),
            ("layer_norm_eps", with(&|c| c.layer_norm_eps = f64::INFINITY)),
            ("layer_norm_eps", with(&|c| c.layer_norm_eps = f64::NAN)),
            ("dim_feedforward", with(&|c| c.dim_feedforward = 0)),
            ("dropout", with(&|c| c.dropout = 1.0)),
            ("dropout", with(&|c| c.dropout = -0.1)),
        ] {
            let err = bad.unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
        with(&|c| c.dropout = 0.0).unwrap();
        with(&|c| c.layer_norm_eps = f64::MIN_POSITIVE).unwrap();
    }

    /// The memory bound: `tokens` rows of eight `d_model`-wide buffers and the hidden layer, in
    /// f32, saturating instead of overflowing.
    #[test]
    fn forward_bytes_counts_the_widest_moment() {
        let mut config = LayerConfig::new(64, 4);
        config.dim_feedforward = 100;
        assert_eq!(config.forward_bytes(10), 10 * (10 * 64 + 16 * 4 + 100) * 4);
        assert_eq!(config.forward_bytes(0), 0);
        config.d_model = usize::MAX;
        assert!(config.forward_bytes(2) >= u128::from(u64::MAX));
    }

    /// A submodule's errors name tensors with its prefix (a tensor nothing took, a tensor of
    /// the wrong shape when loading); a shape error of another operation is the submodule's
    /// own and keeps its name.
    #[test]
    fn submodule_errors_carry_the_prefix() {
        let shape = |op: &'static str| -> Result<()> {
            Err(AttnError::ShapeMismatch {
                op,
                tensor: "weight".into(),
                expected: "[2]".into(),
                got: vec![3],
            }
            .into())
        };
        let mut dict = StateDict::new();
        let err = sub_module(&mut dict, "norm1.", |_| shape("load"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("norm1.weight"), "{err}");
        let err = sub_module(&mut dict, "norm1.", |_| shape("forward"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`weight`") && !err.contains("norm1."), "{err}");
        dict.insert(
            "norm1.extra".into(),
            attn_core::Tensor::new("extra", vec![1], vec![0.0]).unwrap(),
        );
        let err = sub_module(&mut dict, "norm1.", |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("norm1.extra"), "{err}");
    }

    /// `Transformer::with_seed` is its documented layers: encoder layer `i` is
    /// `EncoderLayer::with_seed` at `seed + 10 + i`, decoder layer `i` `DecoderLayer::with_seed`
    /// at `seed + 100 + i`. A decoder's cache is empty until a step has run.
    #[test]
    fn a_seeded_transformer_is_its_seeded_layers_and_its_cache_fills() {
        let mut layer = LayerConfig::new(8, 2);
        layer.dim_feedforward = 16;
        let config = TransformerConfig {
            layer,
            num_encoder_layers: 2,
            num_decoder_layers: 2,
        };
        let seed = 40;
        let model = Transformer::with_seed(config.clone(), seed).unwrap();
        let dict = model.state_dict();
        for i in 0..2u64 {
            let want = [
                (
                    "encoder",
                    EncoderLayer::with_seed(config.layer.clone(), seed + 10 + i)
                        .unwrap()
                        .state_dict(),
                ),
                (
                    "decoder",
                    DecoderLayer::with_seed(config.layer.clone(), seed + 100 + i)
                        .unwrap()
                        .state_dict(),
                ),
            ];
            for (stack, layer) in want {
                for (name, tensor) in layer.iter() {
                    let full = format!("{stack}.layers.{i}.{name}");
                    assert_eq!(dict.get(&full).map(|t| t.data()), Some(tensor.data()), "{full}");
                }
            }
        }
        let memory = vec![0.25f32; 3 * 8];
        let mut cache = model
            .decoder
            .start_decoding(Sequence::batch_first(&memory, 1, 3, 8), 4, Par::Seq)
            .unwrap();
        assert!(cache.is_empty());
        assert_eq!(cache.len(), 0);
        let x = vec![0.5f32; 8];
        let none = BlockMasks::default();
        model
            .decoder
            .decode_step(Sequence::batch_first(&x, 1, 1, 8), &mut cache, &none, Par::Seq)
            .unwrap();
        assert!(!cache.is_empty() && cache.len() == 1);
    }

    /// A layer refuses an input whose width is not `d_model`, or whose data does not fill its
    /// shape, naming the operation and the tensor.
    #[test]
    fn inputs_of_another_width_or_length_are_refused() {
        let layer = EncoderLayer::with_seed(LayerConfig::new(8, 2), 1).unwrap();
        let x = vec![0.5f32; 2 * 3 * 8];
        let masks = BlockMasks::default();
        layer
            .forward(Sequence::batch_first(&x, 2, 3, 8), &masks, Par::Seq)
            .unwrap();
        // Each check alone: the width (the data fits the shape), then the length.
        for (data, dim) in [(&x[..24], 4), (&x[..47], 8)] {
            let bad = Sequence::batch_first(data, 2, 3, dim);
            let err = layer.forward(bad, &masks, Par::Seq).unwrap_err().to_string();
            assert!(
                err.contains("transformer_encoder_layer") && err.contains("src"),
                "{err}"
            );
        }
    }
}
