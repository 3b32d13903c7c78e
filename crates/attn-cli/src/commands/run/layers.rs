//! Encoder and decoder layers, stacks and the Transformer under `attn run`: one trait per side,
//! so a layer and a stack run through the same code.

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;
use attn_nn::core::{Grads, Layout, Sequence};
use attn_nn::layers::Dropout;
use attn_nn::{
    BlockMasks, Decoder, DecoderLayer, Encoder, EncoderLayer, LayerConfig, LayerTape, StackTape, Step, Transformer,
    TransformerMasks,
};

use crate::support::tensors::TensorFile;

use super::inputs::{
    allowed, check_backward_memory, decoder_masks, grad_output, key_padding, layer_input, outputs, score_mask,
};
use super::{DecoderFlags, Outputs, Ran};

/// An encoder layer or stack, as `attn run` drives it.
pub(super) trait EncoderModule {
    /// What the training forward keeps.
    type Tape;
    fn layer(&self) -> &LayerConfig;
    fn layers(&self) -> usize;
    fn forward(&self, src: Sequence<'_>, masks: &BlockMasks<'_>, par: Par) -> attn_nn::Result<Vec<f32>>;
    fn forward_train(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        step: &mut Step<'_>,
    ) -> attn_nn::Result<(Vec<f32>, Self::Tape)>;
    fn backward(
        &self,
        src: Sequence<'_>,
        masks: &BlockMasks<'_>,
        tape: &Self::Tape,
        d_output: &[f32],
        step: &mut Step<'_>,
    ) -> attn_nn::Result<Vec<f32>>;
}

/// A decoder layer or stack, as `attn run` drives it.
pub(super) trait DecoderModule {
    /// What the training forward keeps.
    type Tape;
    fn layer(&self) -> &LayerConfig;
    fn layers(&self) -> usize;
    fn forward(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        par: Par,
    ) -> attn_nn::Result<Vec<f32>>;
    fn forward_train(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        step: &mut Step<'_>,
    ) -> attn_nn::Result<(Vec<f32>, Self::Tape)>;
    fn backward(
        &self,
        tgt: Sequence<'_>,
        memory: Sequence<'_>,
        masks: &TransformerMasks<'_>,
        tape: &Self::Tape,
        d_output: &[f32],
        step: &mut Step<'_>,
    ) -> attn_nn::Result<(Vec<f32>, Vec<f32>)>;
}

/// The trait's methods of a layer or a stack, delegated to its own.
macro_rules! encoder_module {
    ($module:ty, $tape:ty, |$m:ident| $layer:expr, |$n:ident| $layers:expr) => {
        impl EncoderModule for $module {
            type Tape = $tape;
            fn layer(&self) -> &LayerConfig {
                let $m = self;
                $layer
            }
            fn layers(&self) -> usize {
                let $n = self;
                $layers
            }
            fn forward(&self, src: Sequence<'_>, masks: &BlockMasks<'_>, par: Par) -> attn_nn::Result<Vec<f32>> {
                <$module>::forward(self, src, masks, par)
            }
            fn forward_train(
                &self,
                src: Sequence<'_>,
                masks: &BlockMasks<'_>,
                step: &mut Step<'_>,
            ) -> attn_nn::Result<(Vec<f32>, $tape)> {
                <$module>::forward_train(self, src, masks, step)
            }
            fn backward(
                &self,
                src: Sequence<'_>,
                masks: &BlockMasks<'_>,
                tape: &$tape,
                d_output: &[f32],
                step: &mut Step<'_>,
            ) -> attn_nn::Result<Vec<f32>> {
                <$module>::backward(self, src, masks, tape, d_output, step)
            }
        }
    };
}

macro_rules! decoder_module {
    ($module:ty, $tape:ty, |$m:ident| $layer:expr, |$n:ident| $layers:expr) => {
        impl DecoderModule for $module {
            type Tape = $tape;
            fn layer(&self) -> &LayerConfig {
                let $m = self;
                $layer
            }
            fn layers(&self) -> usize {
                let $n = self;
                $layers
            }
            fn forward(
                &self,
                tgt: Sequence<'_>,
                memory: Sequence<'_>,
                masks: &TransformerMasks<'_>,
                par: Par,
            ) -> attn_nn::Result<Vec<f32>> {
                <$module>::forward(self, tgt, memory, &masks.tgt, &masks.memory, par)
            }
            fn forward_train(
                &self,
                tgt: Sequence<'_>,
                memory: Sequence<'_>,
                masks: &TransformerMasks<'_>,
                step: &mut Step<'_>,
            ) -> attn_nn::Result<(Vec<f32>, $tape)> {
                <$module>::forward_train(self, tgt, memory, masks, step)
            }
            fn backward(
                &self,
                tgt: Sequence<'_>,
                memory: Sequence<'_>,
                masks: &TransformerMasks<'_>,
                tape: &$tape,
                d_output: &[f32],
                step: &mut Step<'_>,
            ) -> attn_nn::Result<(Vec<f32>, Vec<f32>)> {
                <$module>::backward(self, tgt, memory, masks, tape, d_output, step)
            }
        }
    };
}

encoder_module!(EncoderLayer, LayerTape, |m| m.config(), |_one_layer| 1);
encoder_module!(Encoder, StackTape, |m| &m.config().layer, |m| m.config().num_layers);
decoder_module!(DecoderLayer, LayerTape, |m| m.config(), |_one_layer| 1);
decoder_module!(Decoder, StackTape, |m| &m.config().layer, |m| m.config().num_layers);

/// An encoder layer or stack on the file's `src`: the forward, or with `backward` the training
/// forward and backward (no dropout: PyTorch's training mode with dropout 0).
pub(super) fn run_encoder(
    module: &impl EncoderModule,
    is_causal: bool,
    file: &TensorFile,
    backward: bool,
    par: Par,
) -> Result<Outputs> {
    let config = module.layer();
    file.only(&allowed(&["src", "src_mask", "src_key_padding_mask"], backward))?;
    let (src, shape, unbatched) = layer_input(file, "src", Layout::from_batch_first(config.batch_first), config)?;
    check_backward_memory(config, src.batch * src.len, module.layers(), backward)?;
    let d_output = grad_output(file, backward, &shape)?;
    let masks = BlockMasks {
        mask: score_mask(file, "src_mask", src.len, src.len, src.batch * config.nhead)?,
        key_padding: key_padding(file, "src_key_padding_mask", src.batch, src.len, unbatched)?,
        is_causal,
        packing: None,
    };
    let run = || -> attn_nn::Result<Ran> {
        let Some(d) = d_output else {
            return Ok(Ran::forward(module.forward(src, &masks, par)?));
        };
        let mut grads = Grads::new();
        let mut step = Step::new(Dropout::NONE, par, &mut grads);
        let (output, tape) = module.forward_train(src, &masks, &mut step)?;
        let d_src = module.backward(src, &masks, &tape, d, &mut step)?;
        Ok(Ran {
            output,
            inputs: vec![("src", d_src)],
            grads,
        })
    };
    let ran = run().with_context(|| file.path().display().to_string())?;
    Ok(outputs(file, shape, ran))
}

/// A decoder layer or stack on the file's `tgt` and `memory`: see [`run_encoder`].
pub(super) fn run_decoder(
    module: &impl DecoderModule,
    flags: DecoderFlags,
    file: &TensorFile,
    backward: bool,
    par: Par,
) -> Result<Outputs> {
    let config = module.layer();
    let names = [
        "tgt",
        "memory",
        "tgt_mask",
        "memory_mask",
        "tgt_key_padding_mask",
        "memory_key_padding_mask",
    ];
    file.only(&allowed(&names, backward))?;
    let layout = Layout::from_batch_first(config.batch_first);
    let (tgt, shape, unbatched) = layer_input(file, "tgt", layout, config)?;
    let (memory, _, memory_unbatched) = layer_input(file, "memory", layout, config)?;
    if unbatched != memory_unbatched || memory.batch != tgt.batch {
        bail!(
            "{}: `memory` must have the batch size of `tgt` ({})",
            file.path().display(),
            tgt.batch
        );
    }
    let (tgt_masks, memory_masks) = decoder_masks(config, flags, file, &tgt, &memory, unbatched)?;
    let masks = TransformerMasks {
        src: BlockMasks::default(),
        tgt: tgt_masks,
        memory: memory_masks,
    };
    check_backward_memory(config, tgt.batch * (tgt.len + memory.len), module.layers(), backward)?;
    let d_output = grad_output(file, backward, &shape)?;
    let run = || -> attn_nn::Result<Ran> {
        let Some(d) = d_output else {
            return Ok(Ran::forward(module.forward(tgt, memory, &masks, par)?));
        };
        let mut grads = Grads::new();
        let mut step = Step::new(Dropout::NONE, par, &mut grads);
        let (output, tape) = module.forward_train(tgt, memory, &masks, &mut step)?;
        let (d_tgt, d_memory) = module.backward(tgt, memory, &masks, &tape, d, &mut step)?;
        Ok(Ran {
            output,
            inputs: vec![("tgt", d_tgt), ("memory", d_memory)],
            grads,
        })
    };
    let ran = run().with_context(|| file.path().display().to_string())?;
    Ok(outputs(file, shape, ran))
}

pub(super) fn run_transformer(
    module: &Transformer,
    config: &LayerConfig,
    src_is_causal: bool,
    flags: DecoderFlags,
    file: &TensorFile,
    backward: bool,
    par: Par,
) -> Result<Outputs> {
    let names = [
        "src",
        "tgt",
        "src_mask",
        "tgt_mask",
        "memory_mask",
        "src_key_padding_mask",
        "tgt_key_padding_mask",
        "memory_key_padding_mask",
    ];
    file.only(&allowed(&names, backward))?;
    let layout = Layout::from_batch_first(config.batch_first);
    let (src, _, src_unbatched) = layer_input(file, "src", layout, config)?;
    let (tgt, shape, unbatched) = layer_input(file, "tgt", layout, config)?;
    if unbatched != src_unbatched || src.batch != tgt.batch {
        bail!(
            "{}: `src` and `tgt` must have one batch size (got {} and {})",
            file.path().display(),
            src.batch,
            tgt.batch
        );
    }
    let src_masks = BlockMasks {
        mask: score_mask(file, "src_mask", src.len, src.len, src.batch * config.nhead)?,
        key_padding: key_padding(file, "src_key_padding_mask", src.batch, src.len, unbatched)?,
        is_causal: src_is_causal,
        packing: None,
    };
    let (tgt_masks, memory_masks) = decoder_masks(config, flags, file, &tgt, &src, unbatched)?;
    let layers = module.encoder.config().num_layers + module.decoder.config().num_layers;
    check_backward_memory(config, src.batch * (src.len + tgt.len), layers, backward)?;
    let context = || file.path().display().to_string();
    let ran = match grad_output(file, backward, &shape)? {
        None => Ran::forward(
            module
                .forward(src, tgt, &src_masks, &tgt_masks, &memory_masks, par)
                .with_context(context)?,
        ),
        Some(d) => {
            let masks = TransformerMasks {
                src: src_masks,
                tgt: tgt_masks,
                memory: memory_masks,
            };
            let mut grads = Grads::new();
            let mut step = Step::new(Dropout::NONE, par, &mut grads);
            let (output, tape) = module
                .forward_train(src, tgt, &masks, &mut step)
                .with_context(context)?;
            let (d_src, d_tgt) = module
                .backward(src, tgt, &masks, &tape, d, &mut step)
                .with_context(context)?;
            Ran {
                output,
                inputs: vec![("src", d_src), ("tgt", d_tgt)],
                grads,
            }
        }
    };
    Ok(outputs(file, shape, ran))
}
