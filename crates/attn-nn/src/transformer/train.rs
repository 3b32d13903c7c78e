//! Training: each layer's forward keeps what its backward needs, and the backward adds into
//! gradients named by the state-dict names ([`Grads`]); no general tape.
//!
//! A layer is a list of residual blocks, each a norm and a sublayer (self-attention,
//! cross-attention or the feed-forward block):
//! - post-norm: `h = x + dropout(sub(x))`, `x' = norm(h)`; the block keeps `h`;
//! - pre-norm: `n = norm(x)`, `x' = x + dropout(sub(n))`; the block keeps `n`.
//!
//! Each block's input is the layer's input or the previous block's output, kept once. The
//! backward walks the blocks in reverse:
//! - post-norm: `dh = norm'(dx')`, `dx = dh + sub'(dropout(dh))`;
//! - pre-norm: `dn = sub'(dropout(dx'))`, `dx = dx' + norm'(dn)`.
//!
//! Dropout (`dropout1..3` on the blocks, `dropout` inside the feed-forward block, PyTorch's
//! names and places) draws its masks from a counter-based generator seeded per step, so the
//! backward re-derives them. Attention-weight dropout inside `self_attn` and `multihead_attn` is
//! not applied: the fused kernel never forms the weights.

use attn_core::kernels::Par;
use attn_core::{Grads, MhaInputs, MhaTape, MultiHeadAttention, ParamPath, Parameters, Sequence, Tensor};

use super::{check_input, seq, BlockMasks, Decoder, DecoderLayer, Encoder, EncoderLayer, Stack, Transformer};
use crate::layers::{add_in_place, Dropout, FeedForward, FfnTape, Norm};
use crate::Result;

/// A residual block's sublayer, with what its call needs.
enum Sub<'a> {
    SelfAttention(&'a MultiHeadAttention, &'a BlockMasks<'a>),
    CrossAttention(&'a MultiHeadAttention, Sequence<'a>, &'a BlockMasks<'a>),
    FeedForward(&'a FeedForward),
}

/// What a sublayer's training forward kept.
#[derive(Debug)]
enum SubTape {
    Attention(MhaTape),
    FeedForward(FfnTape),
}

/// What a residual block kept: `h` (post-norm) or `n` (pre-norm), and its sublayer's tape.
#[derive(Debug)]
struct BlockTape {
    kept: Vec<f32>,
    sub: SubTape,
}

/// What a layer's training forward kept: the inputs of its blocks after the first, and each
/// block's tape.
#[derive(Debug)]
pub struct LayerTape {
    block_inputs: Vec<Vec<f32>>,
    blocks: Vec<BlockTape>,
}

impl LayerTape {
    /// Bytes the tape holds.
    pub fn bytes(&self) -> usize {
        let vecs: usize = self.block_inputs.iter().map(Vec::len).sum::<usize>()
            + self.blocks.iter().map(|b| b.kept.len()).sum::<usize>();
        let subs: usize = self
            .blocks
            .iter()
            .map(|b| match &b.sub {
                SubTape::Attention(t) => t.bytes(),
                SubTape::FeedForward(t) => 4 * t.len(),
            })
            .sum();
        4 * vecs + subs
    }
}

impl Sub<'_> {
    fn forward(
        &self,
        x: &[f32],
        like: &Sequence<'_>,
        dropout: &Dropout,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, SubTape)> {
        match self {
            Sub::SelfAttention(mha, masks) => {
                let inputs = MhaInputs {
                    query: seq(x, like),
                    key_value: None,
                    options: masks.mha(),
                    packing: masks.packing,
                };
                let (out, tape) = mha.forward_train(&inputs, par)?;
                Ok((out.output, SubTape::Attention(tape)))
            }
            Sub::CrossAttention(mha, memory, masks) => {
                let inputs = MhaInputs {
                    query: seq(x, like),
                    key_value: Some((*memory, *memory)),
                    options: masks.mha(),
                    packing: masks.packing,
                };
                let (out, tape) = mha.forward_train(&inputs, par)?;
                Ok((out.output, SubTape::Attention(tape)))
            }
            Sub::FeedForward(ffn) => {
                let (y, tape) = ffn.forward_train(x, dropout, prefix, par)?;
                Ok((y, SubTape::FeedForward(tape)))
            }
        }
    }

    /// `dx` of the sublayer at input `x`; cross-attention adds its memory's gradient to
    /// `d_memory`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        like: &Sequence<'_>,
        tape: &SubTape,
        dy: &[f32],
        dropout: &Dropout,
        grads: &mut Grads,
        prefix: &str,
        d_memory: &mut Option<Vec<f32>>,
        par: Par,
    ) -> Result<Vec<f32>> {
        match (self, tape) {
            (Sub::SelfAttention(mha, masks), SubTape::Attention(tape)) => {
                let inputs = MhaInputs {
                    query: seq(x, like),
                    key_value: None,
                    options: masks.mha(),
                    packing: masks.packing,
                };
                Ok(mha
                    .backward(&inputs, tape, dy, grads, &format!("{prefix}self_attn."), par)?
                    .query)
            }
            (Sub::CrossAttention(mha, memory, masks), SubTape::Attention(tape)) => {
                let inputs = MhaInputs {
                    query: seq(x, like),
                    key_value: Some((*memory, *memory)),
                    options: masks.mha(),
                    packing: masks.packing,
                };
                let d = mha.backward(&inputs, tape, dy, grads, &format!("{prefix}multihead_attn."), par)?;
                let acc = d_memory.get_or_insert_with(|| vec![0.0; memory.data.len()]);
                for (a, (k, v)) in acc.iter_mut().zip(d.key.iter().flatten().zip(d.value.iter().flatten())) {
                    *a += k + v;
                }
                Ok(d.query)
            }
            (Sub::FeedForward(ffn), SubTape::FeedForward(tape)) => {
                ffn.backward(x, tape, dy, dropout, grads, prefix, par)
            }
            _ => unreachable!("a block's tape comes from its own sublayer"),
        }
    }
}

/// The training forward of residual blocks `(norm, norm name, sublayer)` over `x` (laid out
/// like `like`).
fn blocks_forward(
    blocks: &[(&Norm, &str, Sub<'_>)],
    norm_first: bool,
    x: &[f32],
    like: &Sequence<'_>,
    dropout: &Dropout,
    prefix: &str,
    par: Par,
) -> Result<(Vec<f32>, LayerTape)> {
    let mut tape = LayerTape {
        block_inputs: Vec::new(),
        blocks: Vec::new(),
    };
    let mut current: Option<Vec<f32>> = None;
    for (i, (norm, _, sub)) in blocks.iter().enumerate() {
        let x = current.as_deref().unwrap_or(x);
        let site = format!("{prefix}dropout{}", i + 1);
        let (out, kept, sub_tape) = if norm_first {
            let n = norm.forward(x, par)?;
            let (mut y, sub_tape) = sub.forward(&n, like, dropout, prefix, par)?;
            dropout.apply(&mut y, &site, par)?;
            add_in_place(&mut y, x, par)?;
            (y, n, sub_tape)
        } else {
            let (mut h, sub_tape) = sub.forward(x, like, dropout, prefix, par)?;
            dropout.apply(&mut h, &site, par)?;
            add_in_place(&mut h, x, par)?;
            (norm.forward(&h, par)?, h, sub_tape)
        };
        if let Some(previous) = current.take() {
            tape.block_inputs.push(previous);
        }
        tape.blocks.push(BlockTape { kept, sub: sub_tape });
        current = Some(out);
    }
    Ok((current.expect("at least one block"), tape))
}

/// The backward of [`blocks_forward`] with the same arguments: returns `dx`.
#[allow(clippy::too_many_arguments)]
fn blocks_backward(
    blocks: &[(&Norm, &str, Sub<'_>)],
    norm_first: bool,
    x: &[f32],
    like: &Sequence<'_>,
    tape: &LayerTape,
    d_output: &[f32],
    dropout: &Dropout,
    grads: &mut Grads,
    prefix: &str,
    d_memory: &mut Option<Vec<f32>>,
    par: Par,
) -> Result<Vec<f32>> {
    let mut d = d_output.to_vec();
    for (i, ((norm, norm_name, sub), block)) in blocks.iter().zip(&tape.blocks).enumerate().rev() {
        let x = if i == 0 { x } else { &tape.block_inputs[i - 1] };
        let site = format!("{prefix}dropout{}", i + 1);
        let norm_prefix = format!("{prefix}{norm_name}.");
        if norm_first {
            let mut d_sub = d.clone();
            dropout.apply(&mut d_sub, &site, par)?;
            let dn = sub.backward(
                &block.kept,
                like,
                &block.sub,
                &d_sub,
                dropout,
                grads,
                prefix,
                d_memory,
                par,
            )?;
            norm.backward(&mut d, &dn, x, grads, &norm_prefix, par)?;
        } else {
            let mut dh = vec![0.0f32; d.len()];
            norm.backward(&mut dh, &d, &block.kept, grads, &norm_prefix, par)?;
            let mut d_sub = dh.clone();
            dropout.apply(&mut d_sub, &site, par)?;
            let dx = sub.backward(x, like, &block.sub, &d_sub, dropout, grads, prefix, d_memory, par)?;
            add_in_place(&mut dh, &dx, par)?;
            d = dh;
        }
    }
    Ok(d)
}

impl EncoderLayer {
    fn blocks<'a>(&'a self, masks: &'a BlockMasks<'a>) -> [(&'a Norm, &'static str, Sub<'a>); 2] {
        [
            (&self.norm1, "norm1", Sub::SelfAttention(&self.self_attn, masks)),
            (&self.norm2, "norm2", Sub::FeedForward(&self.ffn)),
        ]
    }

    /// The training forward: the output of [`forward`](Self::forward) (with `dropout`
    /// applied) and what [`backward`](Self::backward) needs. `prefix` is the layer's place in
    /// the model's state dict (`""` alone, `layers.0.` in a stack), which also names its
    /// dropout sites.
    pub fn forward_train(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        dropout: &Dropout,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, LayerTape)> {
        check_input("transformer_encoder_layer", "src", &src, self.config.d_model)?;
        blocks_forward(
            &self.blocks(masks),
            self.config.norm_first,
            src.data,
            &src,
            dropout,
            prefix,
            par,
        )
    }

    /// The backward of [`forward_train`](Self::forward_train) called with the same `src`,
    /// `masks` and `dropout`: adds every parameter's gradient into `grads` under `prefix` +
    /// its state-dict name, and returns the gradient of `src`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        tape: &LayerTape,
        d_output: &[f32],
        dropout: &Dropout,
        grads: &mut Grads,
        prefix: &str,
        par: Par,
    ) -> Result<Vec<f32>> {
        check_input("transformer_encoder_layer", "src", &src, self.config.d_model)?;
        check_gradient("transformer_encoder_layer", d_output, src.data.len())?;
        let blocks = self.blocks(masks);
        let mut none = None;
        blocks_backward(
            &blocks,
            self.config.norm_first,
            src.data,
            &src,
            tape,
            d_output,
            dropout,
            grads,
            prefix,
            &mut none,
            par,
        )
    }
}

impl Parameters for EncoderLayer {
    /// `self_attn.*`, `linear1.*`, `linear2.*`, `norm1.*`, `norm2.*`.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.self_attn.visit_params(&path.join("self_attn."), f);
        self.ffn.visit_params(path, f);
        self.norm1.visit_params(&path.join("norm1."), f);
        self.norm2.visit_params(&path.join("norm2."), f);
    }
}

impl DecoderLayer {
    fn blocks<'a>(
        &'a self,
        memory: Sequence<'a>,
        tgt_masks: &'a BlockMasks<'a>,
        memory_masks: &'a BlockMasks<'a>,
    ) -> [(&'a Norm, &'static str, Sub<'a>); 3] {
        [
            (&self.norm1, "norm1", Sub::SelfAttention(&self.self_attn, tgt_masks)),
            (
                &self.norm2,
                "norm2",
                Sub::CrossAttention(&self.cross_attn, memory, memory_masks),
            ),
            (&self.norm3, "norm3", Sub::FeedForward(&self.ffn)),
        ]
    }

    /// The training forward (see [`EncoderLayer::forward_train`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        dropout: &Dropout,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, LayerTape)> {
        check_input("transformer_decoder_layer", "tgt", &tgt, self.config.d_model)?;
        check_input("transformer_decoder_layer", "memory", &memory, self.config.d_model)?;
        let blocks = self.blocks(memory, tgt_masks, memory_masks);
        blocks_forward(&blocks, self.config.norm_first, tgt.data, &tgt, dropout, prefix, par)
    }

    /// The backward of [`forward_train`](Self::forward_train) with the same arguments: adds
    /// the parameters' gradients into `grads` and returns the gradients of `tgt` and `memory`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        tape: &LayerTape,
        d_output: &[f32],
        dropout: &Dropout,
        grads: &mut Grads,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_input("transformer_decoder_layer", "tgt", &tgt, self.config.d_model)?;
        check_input("transformer_decoder_layer", "memory", &memory, self.config.d_model)?;
        check_gradient("transformer_decoder_layer", d_output, tgt.data.len())?;
        let blocks = self.blocks(memory, tgt_masks, memory_masks);
        let mut d_memory = None;
        let d_tgt = blocks_backward(
            &blocks,
            self.config.norm_first,
            tgt.data,
            &tgt,
            tape,
            d_output,
            dropout,
            grads,
            prefix,
            &mut d_memory,
            par,
        )?;
        Ok((d_tgt, d_memory.expect("the cross-attention block ran")))
    }
}

impl Parameters for DecoderLayer {
    /// `self_attn.*`, `multihead_attn.*`, `linear1.*`, `linear2.*`, `norm1.*` to `norm3.*`.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.self_attn.visit_params(&path.join("self_attn."), f);
        self.cross_attn.visit_params(&path.join("multihead_attn."), f);
        self.ffn.visit_params(path, f);
        self.norm1.visit_params(&path.join("norm1."), f);
        self.norm2.visit_params(&path.join("norm2."), f);
        self.norm3.visit_params(&path.join("norm3."), f);
    }
}

fn check_gradient(op: &'static str, d_output: &[f32], len: usize) -> Result<()> {
    if d_output.len() != len {
        return Err(crate::NnError::ShapeMismatch {
            op,
            tensor: "d_output".into(),
            expected: format!("{len} elements (the output's shape)"),
            got: vec![d_output.len()],
        });
    }
    Ok(())
}

/// What a stack's training forward kept: each layer's output that a later step reads (the
/// next layer's input, the final norm's input) and each layer's tape.
#[derive(Debug)]
pub struct StackTape {
    outputs: Vec<Vec<f32>>,
    layers: Vec<LayerTape>,
}

impl StackTape {
    /// Bytes the tape holds.
    pub fn bytes(&self) -> usize {
        4 * self.outputs.iter().map(Vec::len).sum::<usize>() + self.layers.iter().map(LayerTape::bytes).sum::<usize>()
    }
}

impl<L> Stack<L> {
    /// The input of layer `i` (or of the final norm when `i` is the layer count).
    fn input_of<'a>(&self, tape: &'a StackTape, first: &'a [f32], i: usize) -> &'a [f32] {
        if i == 0 {
            first
        } else {
            &tape.outputs[i - 1]
        }
    }

    /// Runs `layer_forward` over the layers and the final norm.
    fn forward_train(
        &self,
        x: &[f32],
        prefix: &str,
        par: Par,
        mut layer_forward: impl FnMut(&L, &[f32], &str) -> Result<(Vec<f32>, LayerTape)>,
    ) -> Result<(Vec<f32>, StackTape)> {
        let mut tape = StackTape {
            outputs: Vec::new(),
            layers: Vec::new(),
        };
        let mut current: Option<Vec<f32>> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let input = current.as_deref().unwrap_or(x);
            let (out, layer_tape) = layer_forward(layer, input, &format!("{prefix}layers.{i}."))?;
            if let Some(previous) = current.take() {
                tape.outputs.push(previous);
            }
            tape.layers.push(layer_tape);
            current = Some(out);
        }
        let last = current.unwrap_or_else(|| x.to_vec());
        match &self.norm {
            Some(norm) => {
                let out = norm.forward(&last, par)?;
                if !self.layers.is_empty() {
                    tape.outputs.push(last);
                }
                Ok((out, tape))
            }
            None => Ok((last, tape)),
        }
    }

    /// The backward of [`Stack::forward_train`]: `layer_backward(layer, input, tape, dy,
    /// prefix)` returns the layer's `dx`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        tape: &StackTape,
        d_output: &[f32],
        grads: &mut Grads,
        prefix: &str,
        par: Par,
        mut layer_backward: impl FnMut(&L, &[f32], &LayerTape, &[f32], &mut Grads, &str) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let n = self.layers.len();
        let mut d = match &self.norm {
            Some(norm) => {
                let mut dx = vec![0.0f32; d_output.len()];
                norm.backward(
                    &mut dx,
                    d_output,
                    self.input_of(tape, x, n),
                    grads,
                    &format!("{prefix}norm."),
                    par,
                )?;
                dx
            }
            None => d_output.to_vec(),
        };
        for i in (0..n).rev() {
            let input = self.input_of(tape, x, i);
            d = layer_backward(
                &self.layers[i],
                input,
                &tape.layers[i],
                &d,
                grads,
                &format!("{prefix}layers.{i}."),
            )?;
        }
        Ok(d)
    }
}

impl Encoder {
    /// The training forward: layers `{prefix}layers.{i}.`, the final norm `{prefix}norm.`.
    pub fn forward_train(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        dropout: &Dropout,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, StackTape)> {
        check_input("transformer_encoder", "src", &src, self.0.config.layer.d_model)?;
        self.0.forward_train(src.data, prefix, par, |layer, x, p| {
            layer.forward_train(seq(x, &src), masks, dropout, p, par)
        })
    }

    /// The backward of [`forward_train`](Self::forward_train) with the same arguments;
    /// returns the gradient of `src`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        tape: &StackTape,
        d_output: &[f32],
        dropout: &Dropout,
        grads: &mut Grads,
        prefix: &str,
        par: Par,
    ) -> Result<Vec<f32>> {
        check_input("transformer_encoder", "src", &src, self.0.config.layer.d_model)?;
        check_gradient("transformer_encoder", d_output, src.data.len())?;
        self.0
            .backward(src.data, tape, d_output, grads, prefix, par, |layer, x, t, dy, g, p| {
                layer.backward(seq(x, &src), masks, t, dy, dropout, g, p, par)
            })
    }
}

impl Decoder {
    /// The training forward: layers `{prefix}layers.{i}.`, the final norm `{prefix}norm.`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        dropout: &Dropout,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, StackTape)> {
        check_input("transformer_decoder", "tgt", &tgt, self.0.config.layer.d_model)?;
        self.0.forward_train(tgt.data, prefix, par, |layer, x, p| {
            layer.forward_train(seq(x, &tgt), memory, tgt_masks, memory_masks, dropout, p, par)
        })
    }

    /// The backward of [`forward_train`](Self::forward_train) with the same arguments;
    /// returns the gradients of `tgt` and `memory` (summed over the layers).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        tgt_masks: &BlockMasks<'_>,
        memory_masks: &BlockMasks<'_>,
        tape: &StackTape,
        d_output: &[f32],
        dropout: &Dropout,
        grads: &mut Grads,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_input("transformer_decoder", "tgt", &tgt, self.0.config.layer.d_model)?;
        check_gradient("transformer_decoder", d_output, tgt.data.len())?;
        let mut d_memory = vec![0.0f32; memory.data.len()];
        let d_tgt = self
            .0
            .backward(tgt.data, tape, d_output, grads, prefix, par, |layer, x, t, dy, g, p| {
                let (dx, dm) =
                    layer.backward(seq(x, &tgt), memory, tgt_masks, memory_masks, t, dy, dropout, g, p, par)?;
                add_in_place(&mut d_memory, &dm, par)?;
                Ok(dx)
            })?;
        Ok((d_tgt, d_memory))
    }
}

/// What [`Transformer::forward_train`] kept.
#[derive(Debug)]
pub struct TransformerTape {
    encoder: StackTape,
    /// The encoder's output: the decoder's memory.
    memory: Vec<f32>,
    decoder: StackTape,
}

impl TransformerTape {
    /// The encoder's output (the decoder's memory), `[B, S, E]` in the source's layout.
    pub fn memory(&self) -> &[f32] {
        &self.memory
    }

    /// Bytes the tape holds.
    pub fn bytes(&self) -> usize {
        self.encoder.bytes() + 4 * self.memory.len() + self.decoder.bytes()
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

impl Transformer {
    /// The training forward: `encoder.*` then `decoder.*` (prefixed by `prefix`), keeping
    /// what [`backward`](Self::backward) needs.
    pub fn forward_train(
        &self,
        src: Sequence<'_>,
        tgt: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        dropout: &Dropout,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, TransformerTape)> {
        let (memory, encoder) =
            self.encoder
                .forward_train(src, &masks.src, dropout, &format!("{prefix}encoder."), par)?;
        let (out, decoder) = self.decoder.forward_train(
            tgt,
            seq(&memory, &src),
            &masks.tgt,
            &masks.memory,
            dropout,
            &format!("{prefix}decoder."),
            par,
        )?;
        Ok((
            out,
            TransformerTape {
                encoder,
                memory,
                decoder,
            },
        ))
    }

    /// The backward of [`forward_train`](Self::forward_train) with the same arguments:
    /// returns the gradients of `src` and `tgt`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        src: Sequence<'_>,
        tgt: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        tape: &TransformerTape,
        d_output: &[f32],
        dropout: &Dropout,
        grads: &mut Grads,
        prefix: &str,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let memory = seq(&tape.memory, &src);
        let (d_tgt, d_memory) = self.decoder.backward(
            tgt,
            memory,
            &masks.tgt,
            &masks.memory,
            &tape.decoder,
            d_output,
            dropout,
            grads,
            &format!("{prefix}decoder."),
            par,
        )?;
        let d_src = self.encoder.backward(
            src,
            &masks.src,
            &tape.encoder,
            &d_memory,
            dropout,
            grads,
            &format!("{prefix}encoder."),
            par,
        )?;
        Ok((d_src, d_tgt))
    }
}

impl<L: Parameters> Parameters for Stack<L> {
    /// The layers' parameters (`layers.{i}.`), then the final norm's (`norm.`).
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        let layers = path.join("layers.");
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_params(&layers.index(i), f);
        }
        if let Some(norm) = &mut self.norm {
            norm.visit_params(&path.join("norm."), f);
        }
    }
}

impl Parameters for Encoder {
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.0.visit_params(path, f);
    }
}

impl Parameters for Decoder {
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.0.visit_params(path, f);
    }
}

impl Parameters for Transformer {
    /// `encoder.*`, then `decoder.*`.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.encoder.visit_params(&path.join("encoder."), f);
        self.decoder.visit_params(&path.join("decoder."), f);
    }
}
