//! Training: each layer's forward keeps what its backward needs, and the backward adds into
//! gradients ([`Grads`](attn_core::Grads), through the [`Step`]); no general tape.
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
//! names and places) draws its masks from a counter-based generator seeded per step and keyed
//! by the site's place in the model ([`Step::dropout`]), so the backward re-derives them. Attention-weight dropout inside `self_attn` and `multihead_attn` is
//! not applied: the fused kernel never forms the weights.

use attn_core::kernels::arena;
use attn_core::{MhaInputs, MhaTape, MultiHeadAttention, ParamPath, Parameters, Sequence, Tensor};

use super::{check_input, seq, walk, BlockMasks, DecoderLayer, EncoderLayer, Kept, TransformerMasks};
use crate::layers::{add_in_place, FeedForward, FfnTape, Norm};
use crate::{Result, Step};

/// A residual block's sublayer, with what its call needs.
enum Sub<'a> {
    /// Attention at its state-dict place (`self_attn.` or `multihead_attn.`): over the
    /// block's input, or with `memory` over the memory (cross-attention).
    Attention {
        mha: &'a MultiHeadAttention,
        place: &'static str,
        memory: Option<Sequence<'a>>,
        masks: &'a BlockMasks<'a>,
    },
    FeedForward(&'a FeedForward),
}

/// What a sublayer's training forward kept.
#[derive(Debug)]
enum SubTape {
    Attention(MhaTape),
    FeedForward(FfnTape),
}

/// What a layer's training forward kept: the residual walk's block inputs and kept sums or
/// norm inputs, and each block's sublayer tape.
#[derive(Debug)]
pub struct LayerTape {
    kept: Kept,
    subs: Vec<SubTape>,
}

impl LayerTape {
    /// Hands every buffer the tape holds back to the activation arena for the next step.
    pub fn recycle(self) {
        let Kept { block_inputs, blocks } = self.kept;
        block_inputs.into_iter().chain(blocks).for_each(arena::give);
        for sub in self.subs {
            match sub {
                SubTape::Attention(t) => t.recycle(),
                SubTape::FeedForward(t) => t.recycle(),
            }
        }
    }

    /// Bytes the tape holds.
    pub fn bytes(&self) -> usize {
        let vecs: usize = self.kept.block_inputs.iter().map(Vec::len).sum::<usize>()
            + self.kept.blocks.iter().map(Vec::len).sum::<usize>();
        let subs: usize = self
            .subs
            .iter()
            .map(|sub| match sub {
                SubTape::Attention(t) => t.bytes(),
                SubTape::FeedForward(t) => 4 * t.len(),
            })
            .sum();
        4 * vecs + subs
    }
}

impl Sub<'_> {
    /// The attention call's inputs for query rows `x` laid out like `like`.
    fn inputs<'x>(
        x: &'x [f32],
        like: &Sequence<'_>,
        memory: Option<Sequence<'x>>,
        masks: &'x BlockMasks<'x>,
    ) -> MhaInputs<'x> {
        MhaInputs {
            query: seq(x, like),
            key_value: memory.map(|m| (m, m)),
            options: masks.mha(),
            packing: masks.packing,
        }
    }

    fn forward(&self, x: &[f32], like: &Sequence<'_>, step: &mut Step<'_>) -> Result<(Vec<f32>, SubTape)> {
        match self {
            Sub::Attention { mha, memory, masks, .. } => {
                let (out, tape) = mha.forward_train(&Self::inputs(x, like, *memory, masks), step.par)?;
                Ok((out.output, SubTape::Attention(tape)))
            }
            Sub::FeedForward(ffn) => {
                let (y, tape) = ffn.forward_train(x, step)?;
                Ok((y, SubTape::FeedForward(tape)))
            }
        }
    }

    /// `dx` of the sublayer at input `x`; cross-attention adds its memory's gradient to
    /// `d_memory`.
    fn backward(
        &self,
        x: &[f32],
        like: &Sequence<'_>,
        tape: &SubTape,
        dy: &[f32],
        step: &mut Step<'_>,
        d_memory: &mut Option<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        match (self, tape) {
            (
                Sub::Attention {
                    mha,
                    place,
                    memory,
                    masks,
                },
                SubTape::Attention(tape),
            ) => {
                let inputs = Self::inputs(x, like, *memory, masks);
                let path = step.path.join(place);
                let d = mha.backward(&inputs, tape, dy, step.grads, &path, step.par)?;
                if let Some(memory) = memory {
                    let acc = d_memory.get_or_insert_with(|| arena::zeroed(memory.data.len()));
                    for (a, (k, v)) in acc.iter_mut().zip(d.key.iter().flatten().zip(d.value.iter().flatten())) {
                        *a += k + v;
                    }
                    d.key.into_iter().chain(d.value).for_each(arena::give);
                }
                Ok(d.query)
            }
            (Sub::FeedForward(ffn), SubTape::FeedForward(tape)) => ffn.backward(x, tape, dy, step),
            _ => unreachable!("a block's tape comes from its own sublayer"),
        }
    }
}

/// The dropout site after residual block `i`'s sublayer (PyTorch's names).
const BLOCK_DROPOUT: [&str; 3] = ["dropout1", "dropout2", "dropout3"];

/// A layer's residual blocks `(norm, norm name, sublayer)` and their order.
struct Blocks<'a, const N: usize> {
    list: [(&'a Norm, &'static str, Sub<'a>); N],
    norm_first: bool,
}

impl<const N: usize> Blocks<'_, N> {
    /// The training forward over `input` (its data and layout): the layer's output and tape.
    fn forward(&self, input: &Sequence<'_>, step: &mut Step<'_>) -> Result<(Vec<f32>, LayerTape)> {
        let par = step.par;
        let mut kept = Kept::default();
        let mut subs = Vec::with_capacity(N);
        let sub = |i: usize, h: &[f32]| -> Result<Vec<f32>> {
            let (mut y, tape) = self.list[i].2.forward(h, input, step)?;
            step.dropout(&mut y, BLOCK_DROPOUT[i])?;
            subs.push(tape);
            Ok(y)
        };
        let norms = self.list.each_ref().map(|(norm, _, _)| *norm);
        let out = walk(&norms, self.norm_first, input.data, sub, Some(&mut kept), par)?;
        Ok((out, LayerTape { kept, subs }))
    }

    /// The backward of [`Blocks::forward`] on the same `input`: returns `dx`.
    fn backward(
        &self,
        input: &Sequence<'_>,
        tape: &LayerTape,
        d_output: &[f32],
        step: &mut Step<'_>,
        d_memory: &mut Option<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let (par, here) = (step.par, step.path);
        let mut d = arena::copied(d_output);
        for (i, ((norm, norm_name, sub), (kept, sub_tape))) in self
            .list
            .iter()
            .zip(tape.kept.blocks.iter().zip(&tape.subs))
            .enumerate()
            .rev()
        {
            let x = if i == 0 {
                input.data
            } else {
                &tape.kept.block_inputs[i - 1]
            };
            let norm_path = here.join(norm_name);
            if self.norm_first {
                let mut d_sub = arena::copied(&d);
                step.dropout(&mut d_sub, BLOCK_DROPOUT[i])?;
                let dn = sub.backward(kept, input, sub_tape, &d_sub, step, d_memory)?;
                norm.backward(&mut d, &dn, x, &mut step.at(&norm_path))?;
                [d_sub, dn].into_iter().for_each(arena::give);
            } else {
                let mut dh = arena::zeroed(d.len());
                norm.backward(&mut dh, &d, kept, &mut step.at(&norm_path))?;
                let mut d_sub = arena::copied(&dh);
                step.dropout(&mut d_sub, BLOCK_DROPOUT[i])?;
                let dx = sub.backward(x, input, sub_tape, &d_sub, step, d_memory)?;
                add_in_place(&mut dh, &dx, par)?;
                [d_sub, dx, std::mem::replace(&mut d, dh)]
                    .into_iter()
                    .for_each(arena::give);
            }
        }
        Ok(d)
    }
}

impl EncoderLayer {
    fn blocks<'a>(&'a self, masks: &'a BlockMasks<'a>) -> Blocks<'a, 2> {
        Blocks {
            list: [
                (
                    &self.norm1,
                    "norm1.",
                    Sub::Attention {
                        mha: &self.self_attn,
                        place: "self_attn.",
                        memory: None,
                        masks,
                    },
                ),
                (&self.norm2, "norm2.", Sub::FeedForward(&self.ffn)),
            ],
            norm_first: self.config.norm_first,
        }
    }

    /// The training forward: the output of [`forward`](Self::forward) (with `step.dropout`
    /// applied) and what [`backward`](Self::backward) needs. `step.path` is the layer's place
    /// in the model (the root alone, `layers.0.` in a stack), which keys its dropout sites.
    pub fn forward_train(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, LayerTape)> {
        check_input("transformer_encoder_layer", "src", &src, self.config.d_model)?;
        self.blocks(masks).forward(&src, step)
    }

    /// The backward of [`forward_train`](Self::forward_train) called with the same `src`,
    /// `masks` and step: adds every parameter's gradient into `step.grads`, and returns the
    /// gradient of `src`.
    pub fn backward(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        tape: &LayerTape,
        d_output: &[f32],
        step: &mut Step<'_>,
    ) -> Result<Vec<f32>> {
        check_input("transformer_encoder_layer", "src", &src, self.config.d_model)?;
        check_gradient("transformer_encoder_layer", d_output, src.data.len())?;
        self.blocks(masks).backward(&src, tape, d_output, step, &mut None)
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

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        self.self_attn.update_params(&path.join("self_attn."), f)?;
        self.ffn.update_params(path, f)?;
        self.norm1.update_params(&path.join("norm1."), f)?;
        self.norm2.update_params(&path.join("norm2."), f)
    }
}

impl DecoderLayer {
    fn blocks<'a>(&'a self, memory: Sequence<'a>, masks: &'a TransformerMasks<'a>) -> Blocks<'a, 3> {
        Blocks {
            list: [
                (
                    &self.norm1,
                    "norm1.",
                    Sub::Attention {
                        mha: &self.self_attn,
                        place: "self_attn.",
                        memory: None,
                        masks: &masks.tgt,
                    },
                ),
                (
                    &self.norm2,
                    "norm2.",
                    Sub::Attention {
                        mha: &self.cross_attn,
                        place: "multihead_attn.",
                        memory: Some(memory),
                        masks: &masks.memory,
                    },
                ),
                (&self.norm3, "norm3.", Sub::FeedForward(&self.ffn)),
            ],
            norm_first: self.config.norm_first,
        }
    }

    /// The training forward (see [`EncoderLayer::forward_train`]): self-attention under
    /// `masks.tgt`, cross-attention over `memory` under `masks.memory` (`masks.src` is not
    /// read).
    pub fn forward_train(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, LayerTape)> {
        check_input("transformer_decoder_layer", "tgt", &tgt, self.config.d_model)?;
        check_input("transformer_decoder_layer", "memory", &memory, self.config.d_model)?;
        self.blocks(memory, masks).forward(&tgt, step)
    }

    /// The backward of [`forward_train`](Self::forward_train) with the same arguments: adds
    /// the parameters' gradients into `step.grads` and returns the gradients of `tgt` and
    /// `memory`.
    pub fn backward(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        tape: &LayerTape,
        d_output: &[f32],
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_input("transformer_decoder_layer", "tgt", &tgt, self.config.d_model)?;
        check_input("transformer_decoder_layer", "memory", &memory, self.config.d_model)?;
        check_gradient("transformer_decoder_layer", d_output, tgt.data.len())?;
        let mut d_memory = None;
        let d_tgt = self
            .blocks(memory, masks)
            .backward(&tgt, tape, d_output, step, &mut d_memory)?;
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

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        self.self_attn.update_params(&path.join("self_attn."), f)?;
        self.cross_attn.update_params(&path.join("multihead_attn."), f)?;
        self.ffn.update_params(path, f)?;
        self.norm1.update_params(&path.join("norm1."), f)?;
        self.norm2.update_params(&path.join("norm2."), f)?;
        self.norm3.update_params(&path.join("norm3."), f)
    }
}

pub(super) fn check_gradient(op: &'static str, d_output: &[f32], len: usize) -> Result<()> {
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
