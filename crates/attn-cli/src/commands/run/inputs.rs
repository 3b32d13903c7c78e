//! Reading a module's inputs from the input file (sequences, masks, `grad.output`) and naming its outputs.

use anyhow::{bail, Context, Result};
use attn_nn::core::{BoolMeaning, KeyPadding, Layout, ScoreMask, Sequence};
use attn_nn::{BlockMasks, LayerConfig};

use crate::support::tensors::{Tensor, TensorFile};

use super::{DecoderFlags, Outputs, Ran};

/// `grad.output` of the input file when `backward`: present, F32, of the output's shape.
pub(super) fn grad_output<'a>(file: &'a TensorFile, backward: bool, shape: &[usize]) -> Result<Option<&'a [f32]>> {
    if !backward {
        return Ok(None);
    }
    let path = file.path().display();
    match file.get("grad.output") {
        None => bail!("{path}: --backward needs `grad.output` in the input file, the shape of `output` {shape:?}"),
        Some(t @ (Tensor::Bool { .. } | Tensor::Bf16 { .. })) => {
            bail!(
                "{path}: `grad.output` has dtype {}, expected F32 {shape:?}",
                t.dtype_name()
            )
        }
        Some(Tensor::F32 { shape: got, data }) => {
            if got.as_slice() != shape {
                bail!("{path}: `grad.output` has shape {got:?}, expected the shape of `output` {shape:?}");
            }
            Ok(Some(data))
        }
    }
}

/// The tensors an input file may hold: `names`, and `grad.output` with `--backward`.
pub(super) fn allowed<'a>(names: &[&'a str], backward: bool) -> Vec<&'a str> {
    let mut all = names.to_vec();
    if backward {
        all.push("grad.output");
    }
    all
}

/// `output` and, after a backward, `grad.NAME` of each input (in its file shape) and parameter.
pub(super) fn outputs(file: &TensorFile, shape: Vec<usize>, ran: Ran) -> Outputs {
    let mut out = vec![("output".to_string(), shape, ran.output)];
    for (name, grad) in ran.inputs {
        let shape = file.get(name).map(|t| t.shape().to_vec()).unwrap_or_default();
        out.push((format!("grad.{name}"), shape, grad));
    }
    for (name, t) in ran.grads.into_state_dict() {
        let shape = t.shape().to_vec();
        out.push((format!("grad.{name}"), shape, t.into_data()));
    }
    out
}

/// The memory a backward keeps, bounded by a forward's per layer plus one.
pub(super) fn check_backward_memory(config: &LayerConfig, tokens: usize, layers: usize, backward: bool) -> Result<()> {
    if backward {
        let bytes = config.forward_bytes(tokens).saturating_mul(layers as u128 + 2);
        crate::support::memory::check(bytes, "the backward pass (activations kept for it and gradients)")?;
    }
    Ok(())
}

/// `(batch, len, dim, unbatched)` of a sequence input in the module's layout.
pub(super) fn seq_dims<'a>(
    file: &'a TensorFile,
    name: &str,
    layout: Layout,
) -> Result<(usize, usize, usize, bool, &'a [f32])> {
    let what = match layout {
        Layout::BatchFirst => "[N, L, E] (batch_first) or unbatched [L, E]",
        Layout::SeqFirst => "[L, N, E] or unbatched [L, E]",
    };
    let tensor = file
        .get(name)
        .with_context(|| format!("{}: missing tensor `{name}`, expected {what}", file.path().display()))?;
    let Tensor::F32 { shape, data } = tensor else {
        bail!(
            "{}: tensor `{name}` has dtype BOOL, expected F32 {what}",
            file.path().display()
        );
    };
    match (shape.as_slice(), layout) {
        (&[l, e], _) => Ok((1, l, e, true, data)),
        (&[n, l, e], Layout::BatchFirst) | (&[l, n, e], Layout::SeqFirst) => Ok((n, l, e, false, data)),
        _ => bail!(
            "{}: tensor `{name}` has shape {shape:?}, expected {what}",
            file.path().display()
        ),
    }
}

/// The optional key-padding mask `name`: `[N, S]` (`[S]` unbatched); BOOL `true` = padding.
pub(super) fn key_padding<'a>(
    file: &'a TensorFile,
    name: &str,
    b: usize,
    t: usize,
    unbatched: bool,
) -> Result<KeyPadding<'a>> {
    let Some(tensor) = file.get(name) else {
        return Ok(KeyPadding::None);
    };
    let want: &[usize] = if unbatched { &[t] } else { &[b, t] };
    if tensor.shape() != want {
        bail!(
            "{}: tensor `{name}` has shape {:?}, expected {want:?} ([N, S] of the keys)",
            file.path().display(),
            tensor.shape()
        );
    }
    Ok(match tensor {
        Tensor::Bool { data, .. } => KeyPadding::Bool {
            data,
            meaning: BoolMeaning::MaskedOut,
        },
        Tensor::F32 { data, .. } => KeyPadding::Additive(data),
        Tensor::Bf16 { .. } => bail!(
            "{}: tensor `{name}` has dtype BF16, expected BOOL or F32",
            file.path().display()
        ),
    })
}

/// The optional attention mask `name`: `[L, S]` or `[N·H, L, S]`; BOOL `true` = not allowed.
pub(super) fn score_mask<'a>(file: &'a TensorFile, name: &str, s: usize, t: usize, bh: usize) -> Result<ScoreMask<'a>> {
    let Some(tensor) = file.get(name) else {
        return Ok(ScoreMask::None);
    };
    let shape = tensor.shape();
    if shape != [s, t] && shape != [bh, s, t] {
        bail!(
            "{}: tensor `{name}` has shape {shape:?}, expected [L, S] = [{s}, {t}] or [N·num_heads, L, S] = [{bh}, {s}, {t}]",
            file.path().display()
        );
    }
    Ok(match tensor {
        Tensor::Bool { shape, data } => ScoreMask::Bool {
            data,
            shape,
            meaning: BoolMeaning::MaskedOut,
        },
        Tensor::F32 { shape, data } => ScoreMask::Additive { data, shape },
        Tensor::Bf16 { .. } => bail!(
            "{}: tensor `{name}` has dtype BF16, expected BOOL or F32",
            file.path().display()
        ),
    })
}

/// A sequence input of a layer: the `Sequence` view and its output shape.
pub(super) fn layer_input<'a>(
    file: &'a TensorFile,
    name: &str,
    layout: Layout,
    config: &LayerConfig,
) -> Result<(Sequence<'a>, Vec<usize>, bool)> {
    let (b, l, e, unbatched, data) = seq_dims(file, name, layout)?;
    let d_model = config.d_model;
    if e != d_model {
        bail!(
            "{}: tensor `{name}` has feature dim {e}, expected d_model = {d_model}",
            file.path().display()
        );
    }
    crate::support::memory::check(
        config.forward_bytes(b.saturating_mul(l)),
        &format!("a layer on `{name}` ({b}×{l} tokens)"),
    )?;
    let shape = if unbatched {
        vec![l, e]
    } else if layout == Layout::BatchFirst {
        vec![b, l, e]
    } else {
        vec![l, b, e]
    };
    let layout = if unbatched { Layout::BatchFirst } else { layout };
    Ok((
        Sequence {
            data,
            batch: b,
            len: l,
            dim: e,
            layout,
        },
        shape,
        unbatched,
    ))
}

pub(super) fn decoder_masks<'a>(
    config: &LayerConfig,
    flags: DecoderFlags,
    file: &'a TensorFile,
    tgt: &Sequence<'_>,
    memory: &Sequence<'_>,
    unbatched: bool,
) -> Result<(BlockMasks<'a>, BlockMasks<'a>)> {
    let bh = tgt.batch * config.nhead;
    let tgt_masks = BlockMasks {
        mask: score_mask(file, "tgt_mask", tgt.len, tgt.len, bh)?,
        key_padding: key_padding(file, "tgt_key_padding_mask", tgt.batch, tgt.len, unbatched)?,
        is_causal: flags.tgt_is_causal,
        packing: None,
    };
    let memory_masks = BlockMasks {
        mask: score_mask(file, "memory_mask", tgt.len, memory.len, bh)?,
        key_padding: key_padding(file, "memory_key_padding_mask", memory.batch, memory.len, unbatched)?,
        is_causal: flags.memory_is_causal,
        packing: None,
    };
    Ok((tgt_masks, memory_masks))
}
