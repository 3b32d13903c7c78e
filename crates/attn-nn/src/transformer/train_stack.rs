//! Training of the stacks and of the whole [`Transformer`]: each layer's training forward in
//! turn (see [`train`](super::train) for a layer's), each layer's output kept once as the next
//! one's input, and the backward through them in reverse.

use attn_core::kernels::arena;
use attn_core::{ParamPath, Parameters, Sequence, Tensor};

use super::train::{check_gradient, LayerTape};
use super::{check_input, seq, BlockMasks, Decoder, Encoder, Stack, Transformer, TransformerMasks};
use crate::layers::add_in_place;
use crate::{Result, Step};

/// What a stack's training forward kept: each layer's output that a later step reads (the
/// next layer's input, the final norm's input) and each layer's tape.
#[derive(Debug)]
pub struct StackTape {
    outputs: Vec<Vec<f32>>,
    layers: Vec<LayerTape>,
}

impl StackTape {
    /// Hands every buffer the tape holds back to the activation arena for the next step.
    pub fn recycle(self) {
        self.outputs.into_iter().for_each(arena::give);
        self.layers.into_iter().for_each(LayerTape::recycle);
    }

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

    /// Runs `layer_forward` over the layers (each at `layers.{i}.`) and the final norm.
    fn forward_train(
        &self,
        x: &[f32],
        step: &mut Step<'_>,
        mut layer_forward: impl FnMut(&L, &[f32], &mut Step<'_>) -> Result<(Vec<f32>, LayerTape)>,
    ) -> Result<(Vec<f32>, StackTape)> {
        let mut tape = StackTape {
            outputs: Vec::new(),
            layers: Vec::new(),
        };
        let layers_path = step.path.join("layers.");
        let mut current: Option<Vec<f32>> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let input = current.as_deref().unwrap_or(x);
            let (out, layer_tape) = layer_forward(layer, input, &mut step.at(&layers_path.index(i)))?;
            if let Some(previous) = current.take() {
                tape.outputs.push(previous);
            }
            tape.layers.push(layer_tape);
            current = Some(out);
        }
        let last = current.unwrap_or_else(|| x.to_vec());
        match &self.norm {
            Some(norm) => {
                let out = norm.forward(&last, step.par)?;
                if !self.layers.is_empty() {
                    tape.outputs.push(last);
                }
                Ok((out, tape))
            }
            None => Ok((last, tape)),
        }
    }

    /// The backward of [`Stack::forward_train`]: `layer_backward(layer, input, tape, dy,
    /// step)` returns the layer's `dx`.
    fn backward(
        &self,
        x: &[f32],
        tape: &StackTape,
        d_output: &[f32],
        step: &mut Step<'_>,
        mut layer_backward: impl FnMut(&L, &[f32], &LayerTape, &[f32], &mut Step<'_>) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let here = step.path;
        let n = self.layers.len();
        let mut d = match &self.norm {
            Some(norm) => {
                let mut dx = arena::zeroed(d_output.len());
                let norm_path = here.join("norm.");
                norm.backward(&mut dx, d_output, self.input_of(tape, x, n), &mut step.at(&norm_path))?;
                dx
            }
            None => arena::copied(d_output),
        };
        let layers_path = here.join("layers.");
        for i in (0..n).rev() {
            let input = self.input_of(tape, x, i);
            let dx = layer_backward(
                &self.layers[i],
                input,
                &tape.layers[i],
                &d,
                &mut step.at(&layers_path.index(i)),
            )?;
            arena::give(std::mem::replace(&mut d, dx));
        }
        Ok(d)
    }
}

impl Encoder {
    /// The training forward: layers `layers.{i}.`, the final norm `norm.` (under `step.path`).
    pub fn forward_train(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, StackTape)> {
        check_input("transformer_encoder", "src", &src, self.0.config.layer.d_model)?;
        self.0.forward_train(src.data, step, |layer, x, s| {
            layer.forward_train(seq(x, &src), masks, s)
        })
    }

    /// The backward of [`forward_train`](Self::forward_train) with the same arguments;
    /// returns the gradient of `src`.
    pub fn backward(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        tape: &StackTape,
        d_output: &[f32],
        step: &mut Step<'_>,
    ) -> Result<Vec<f32>> {
        check_input("transformer_encoder", "src", &src, self.0.config.layer.d_model)?;
        check_gradient("transformer_encoder", d_output, src.data.len())?;
        self.0.backward(src.data, tape, d_output, step, |layer, x, t, dy, s| {
            layer.backward(seq(x, &src), masks, t, dy, s)
        })
    }
}

impl Decoder {
    /// The training forward: layers `layers.{i}.`, the final norm `norm.` (under
    /// `step.path`); `masks` as for [`DecoderLayer::forward_train`](crate::DecoderLayer::forward_train).
    pub fn forward_train(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, StackTape)> {
        check_input("transformer_decoder", "tgt", &tgt, self.0.config.layer.d_model)?;
        self.0.forward_train(tgt.data, step, |layer, x, s| {
            layer.forward_train(seq(x, &tgt), memory, masks, s)
        })
    }

    /// The backward of [`forward_train`](Self::forward_train) with the same arguments;
    /// returns the gradients of `tgt` and `memory` (summed over the layers).
    pub fn backward(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        tape: &StackTape,
        d_output: &[f32],
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_input("transformer_decoder", "tgt", &tgt, self.0.config.layer.d_model)?;
        check_gradient("transformer_decoder", d_output, tgt.data.len())?;
        let par = step.par;
        let mut d_memory = arena::zeroed(memory.data.len());
        let d_tgt = self.0.backward(tgt.data, tape, d_output, step, |layer, x, t, dy, s| {
            let (dx, dm) = layer.backward(seq(x, &tgt), memory, masks, t, dy, s)?;
            add_in_place(&mut d_memory, &dm, par)?;
            arena::give(dm);
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
    /// Hands every buffer the tape holds back to the activation arena for the next step.
    pub fn recycle(self) {
        self.encoder.recycle();
        arena::give(self.memory);
        self.decoder.recycle();
    }

    /// The encoder's output (the decoder's memory), `[B, S, E]` in the source's layout.
    pub fn memory(&self) -> &[f32] {
        &self.memory
    }

    /// Bytes the tape holds.
    pub fn bytes(&self) -> usize {
        self.encoder.bytes() + 4 * self.memory.len() + self.decoder.bytes()
    }
}

impl Transformer {
    /// The training forward: `encoder.*` then `decoder.*` (under `step.path`), keeping what
    /// [`backward`](Self::backward) needs.
    pub fn forward_train(
        &self,
        src: Sequence<'_>,
        tgt: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, TransformerTape)> {
        let here = step.path;
        let (memory, encoder) = self
            .encoder
            .forward_train(src, &masks.src, &mut step.at(&here.join("encoder.")))?;
        let (out, decoder) =
            self.decoder
                .forward_train(tgt, seq(&memory, &src), masks, &mut step.at(&here.join("decoder.")))?;
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
    pub fn backward(
        &self,
        src: Sequence<'_>,
        tgt: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        tape: &TransformerTape,
        d_output: &[f32],
        step: &mut Step<'_>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let here = step.path;
        let memory = seq(&tape.memory, &src);
        let (d_tgt, d_memory) = self.decoder.backward(
            tgt,
            memory,
            masks,
            &tape.decoder,
            d_output,
            &mut step.at(&here.join("decoder.")),
        )?;
        let d_src = self.encoder.backward(
            src,
            &masks.src,
            &tape.encoder,
            &d_memory,
            &mut step.at(&here.join("encoder.")),
        )?;
        arena::give(d_memory);
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

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        let layers = path.join("layers.");
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.update_params(&layers.index(i), f)?;
        }
        match &mut self.norm {
            Some(norm) => norm.update_params(&path.join("norm."), f),
            None => Ok(()),
        }
    }
}

impl Parameters for Encoder {
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.0.visit_params(path, f);
    }

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        self.0.update_params(path, f)
    }
}

impl Parameters for Decoder {
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.0.visit_params(path, f);
    }

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        self.0.update_params(path, f)
    }
}

impl Parameters for Transformer {
    /// `encoder.*`, then `decoder.*`.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.encoder.visit_params(&path.join("encoder."), f);
        self.decoder.visit_params(&path.join("decoder."), f);
    }

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        self.encoder.update_params(&path.join("encoder."), f)?;
        self.decoder.update_params(&path.join("decoder."), f)
    }
}
