//! `nn.MultiheadAttention` under `attn run`: its inputs, flags, forward and backward.

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;
use attn_nn::core::{Grads, Layout, MhaInputs, MhaOptions, MultiHeadAttention, NeedWeights, ParamPath, Sequence};

use crate::support::tensors::{Tensor, TensorFile};

use super::inputs::{allowed, grad_output, key_padding, outputs, score_mask, seq_dims};
use super::{MhaFlags, Outputs, Ran};

pub(super) fn run_mha(
    module: &MultiHeadAttention,
    flags: MhaFlags,
    file: &TensorFile,
    backward: bool,
    par: Par,
) -> Result<Outputs> {
    file.only(&allowed(
        &["query", "key", "value", "key_padding_mask", "attn_mask"],
        backward,
    ))?;
    let path = file.path().display().to_string();
    let layout = Layout::from_batch_first(module.config().batch_first);
    let ([query, key, value], unbatched) = read_sequences(file, layout)?;
    let (b, s, e, t) = (query.batch, query.len, query.dim, key.len);
    let [_, h, _, _] = module.dims();
    let layout = query.layout;

    let key_padding = key_padding(file, "key_padding_mask", b, t, unbatched)?;
    let attn_mask = score_mask(file, "attn_mask", s, t, b * h)?;
    let need_weights = match (flags.need_weights, flags.average_attn_weights) {
        (false, _) => NeedWeights::No,
        (true, true) => NeedWeights::Averaged,
        (true, false) => NeedWeights::PerHead,
    };
    let forward_bytes = module.forward_bytes(b, s, t, need_weights);
    crate::support::memory::check(
        if backward {
            forward_bytes.saturating_mul(3)
        } else {
            forward_bytes
        },
        "multihead_attention (projections and attention weights)",
    )?;
    let options = MhaOptions {
        attn_mask,
        key_padding,
        is_causal: flags.is_causal,
        need_weights,
    };
    let out_shape = if unbatched {
        vec![s, e]
    } else {
        match layout {
            Layout::BatchFirst => vec![b, s, e],
            Layout::SeqFirst => vec![s, b, e],
        }
    };
    let (result, ran) = match grad_output(file, backward, &out_shape)? {
        None => {
            // PyTorch takes the self-attention path when query, key and value are one tensor;
            // equal contents give the same numbers, so equal tensors take the fused path here.
            let self_attention = flags.same_inputs && key.dim == e && value.dim == e && t == s;
            let result = if self_attention {
                module.forward_self(query, &options, par)
            } else {
                module.forward(query, key, value, &options, par)
            }
            .with_context(|| path.clone())?;
            (result, None)
        }
        Some(d_output) => {
            // Each file tensor is its own input and gets its own gradient.
            let inputs = MhaInputs {
                query,
                key_value: Some((key, value)),
                options,
                packing: None,
            };
            let (result, tape) = module.forward_train(&inputs, par).with_context(|| path.clone())?;
            let mut grads = Grads::new();
            let d = module
                .backward(&inputs, &tape, d_output, &mut grads, &ParamPath::ROOT, par)
                .with_context(|| path.clone())?;
            let inputs = vec![
                ("query", d.query),
                ("key", d.key.expect("cross-attention")),
                ("value", d.value.expect("cross-attention")),
            ];
            (result, Some((inputs, grads)))
        }
    };
    let mut outputs = vec![("output".to_string(), out_shape, result.output)];
    if let Some(w) = result.weights {
        let weight_t = w.len() / (b * s * if need_weights == NeedWeights::PerHead { h } else { 1 }).max(1);
        let shape = match (need_weights, unbatched) {
            (NeedWeights::PerHead, false) => vec![b, h, s, weight_t],
            (NeedWeights::PerHead, true) => vec![h, s, weight_t],
            (_, false) => vec![b, s, weight_t],
            (_, true) => vec![s, weight_t],
        };
        outputs.push(("attn_weights".to_string(), shape, w));
    }
    if let Some((inputs, grads)) = ran {
        let ran = Ran {
            output: Vec::new(),
            inputs,
            grads,
        };
        outputs.extend(self::outputs(file, Vec::new(), ran).into_iter().skip(1));
    }
    Ok(outputs)
}

/// Whether the file's `query`, `key` and `value` are F32 tensors of one shape holding the same
/// numbers (bit for bit where the numbers are equal; NaN is equal to nothing, as in `==`).
pub(super) fn same_inputs(file: &TensorFile) -> bool {
    let f32 = |name| match file.get(name) {
        Some(Tensor::F32 { shape, data }) => Some((shape, data)),
        _ => None,
    };
    match (f32("query"), f32("key"), f32("value")) {
        (Some(q), Some(k), Some(v)) => q == k && q == v,
        _ => false,
    }
}

/// `query`, `key` and `value` from the file, in `layout` (batch-first when unbatched), and
/// whether they are unbatched; all batched or all not, one batch size, keys and values of one
/// length.
fn read_sequences<'f>(file: &'f TensorFile, layout: Layout) -> Result<([Sequence<'f>; 3], bool)> {
    let path = file.path().display();
    let (b, s, e, unbatched, q) = seq_dims(file, "query", layout)?;
    let (kb, t, kdim, k_unbatched, k) = seq_dims(file, "key", layout)?;
    let (vb, vt, vdim, v_unbatched, v) = seq_dims(file, "value", layout)?;
    if unbatched != k_unbatched || unbatched != v_unbatched {
        bail!("{path}: `query`, `key` and `value` must all be batched (3-D) or all unbatched (2-D)");
    }
    if kb != b || vb != b || vt != t {
        bail!("{path}: `key` and `value` must have the batch size of `query` ({b}) and one length (got key {kb}×{t}, value {vb}×{vt})");
    }
    let layout = if unbatched { Layout::BatchFirst } else { layout };
    let sequence = |data, len, dim| Sequence {
        data,
        batch: b,
        len,
        dim,
        layout,
    };
    Ok((
        [sequence(q, s, e), sequence(k, t, kdim), sequence(v, t, vdim)],
        unbatched,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of F32 tensors `(name, shape, values)`, written and read back.
    fn file(case: &str, tensors: &[(&str, &[usize], &[f32])]) -> TensorFile {
        let path = std::env::temp_dir().join(format!("attn-same-inputs-{}-{case}.safetensors", std::process::id()));
        crate::support::tensors::write_f32(&path, tensors).unwrap();
        let file = TensorFile::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    /// The same inputs are three F32 tensors of one shape and equal numbers: another value in
    /// the key or the value, another shape, NaN (equal to nothing) or a missing tensor is not.
    #[test]
    fn same_inputs_are_one_shape_and_equal_numbers() {
        let (x, y, nan) = ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0], [1.0, f32::NAN, 3.0, 4.0]);
        let three = |case, k: &[f32], v: &[f32], k_shape: &[usize]| {
            same_inputs(&file(
                case,
                &[("query", &[2, 2], &x), ("key", k_shape, k), ("value", &[2, 2], v)],
            ))
        };
        assert!(three("same", &x, &x, &[2, 2]));
        assert!(!three("key", &y, &x, &[2, 2]));
        assert!(!three("value", &x, &y, &[2, 2]));
        assert!(!three("shape", &x, &x, &[4, 1]));
        let all_nan = file(
            "nan",
            &[
                ("query", &[2, 2], &nan),
                ("key", &[2, 2], &nan),
                ("value", &[2, 2], &nan),
            ],
        );
        assert!(!same_inputs(&all_nan));
        assert!(!same_inputs(&file(
            "missing",
            &[("query", &[2, 2], &x), ("key", &[2, 2], &x)]
        )));
    }
}
