//! `attn run`: a module with PyTorch weights on tensors from a safetensors file.
//!
//! MODULE.json holds `"module"`, the PyTorch constructor fields (PyTorch's names and defaults)
//! and the forward flags; WEIGHTS holds the module's `state_dict()`; IN holds the forward's
//! inputs under their PyTorch argument names. See ../shared/CONTRACT.md.

use std::path::Path;

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;
use attn_nn::core::{
    BoolMeaning, KeyPadding, Layout, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights, ScoreMask, Sequence,
    StateDict, Tensor as CoreTensor,
};
use serde_json::{Map, Value};

use crate::tensors::{write_f32, Tensor, TensorFile};

/// A module ready to run, with its inputs.
pub struct Prepared {
    kind: Module,
    inputs: TensorFile,
}

enum Module {
    Mha {
        module: MultiHeadAttention,
        flags: MhaFlags,
    },
}

#[derive(Debug, Clone, Copy)]
struct MhaFlags {
    need_weights: bool,
    average_attn_weights: bool,
    is_causal: bool,
}

/// Removes the boolean `name` from `config` (default `default`), or fails naming it.
fn take_flag(config: &mut Map<String, Value>, path: &Path, name: &str, default: bool) -> Result<bool> {
    match config.remove(name) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(b),
        Some(other) => bail!("{}: field `{name}` is {other}, expected true or false", path.display()),
    }
}

fn state_dict(weights: &TensorFile) -> Result<StateDict> {
    let mut dict = StateDict::new();
    for (name, tensor) in weights.iter() {
        match tensor {
            Tensor::F32 { shape, data } => {
                dict.insert(name.clone(), CoreTensor::new(name, shape.clone(), data.clone())?);
            }
            Tensor::Bool { .. } => bail!(
                "{}: tensor `{name}` has dtype BOOL, expected F32",
                weights.path().display()
            ),
        }
    }
    Ok(dict)
}

/// Reads the three files and builds the module.
pub fn prepare(config_path: &Path, weights_path: &Path, input_path: &Path) -> Result<Prepared> {
    let text =
        std::fs::read_to_string(config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    let Value::Object(mut config) = value else {
        bail!(
            "{}: expected a JSON object with a \"module\" field",
            config_path.display()
        );
    };
    let module = match config.remove("module") {
        Some(Value::String(m)) => m,
        Some(other) => bail!(
            "{}: field `module` is {other}, expected a module name",
            config_path.display()
        ),
        None => bail!(
            "{}: missing field `module` (e.g. \"multihead_attention\")",
            config_path.display()
        ),
    };
    let weights = TensorFile::read(weights_path)?;
    let inputs = TensorFile::read(input_path)?;
    let kind = match module.as_str() {
        "multihead_attention" => {
            let flags = MhaFlags {
                need_weights: take_flag(&mut config, config_path, "need_weights", true)?,
                average_attn_weights: take_flag(&mut config, config_path, "average_attn_weights", true)?,
                is_causal: take_flag(&mut config, config_path, "is_causal", false)?,
            };
            let mha_config: MhaConfig = serde_json::from_value(Value::Object(config))
                .with_context(|| format!("{}: bad multihead_attention config", config_path.display()))?;
            let module = MultiHeadAttention::from_state_dict(mha_config, state_dict(&weights)?)
                .with_context(|| format!("{}: weights do not fit the config", weights_path.display()))?;
            Module::Mha { module, flags }
        }
        other => bail!(
            "{}: unknown module `{other}`; this version runs: multihead_attention",
            config_path.display()
        ),
    };
    Ok(Prepared { kind, inputs })
}

/// Named outputs: (name, shape, data).
pub type Outputs = Vec<(String, Vec<usize>, Vec<f32>)>;

impl Prepared {
    /// Runs the forward pass.
    pub fn execute(&self, par: Par) -> Result<Outputs> {
        match &self.kind {
            Module::Mha { module, flags } => run_mha(module, *flags, &self.inputs, par),
        }
    }
}

/// `(batch, len, dim, unbatched)` of a sequence input in the module's layout.
fn seq_dims<'a>(file: &'a TensorFile, name: &str, layout: Layout) -> Result<(usize, usize, usize, bool, &'a [f32])> {
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

fn run_mha(module: &MultiHeadAttention, flags: MhaFlags, file: &TensorFile, par: Par) -> Result<Outputs> {
    file.only(&["query", "key", "value", "key_padding_mask", "attn_mask"])?;
    let path = file.path().display().to_string();
    let layout = if module.config().batch_first {
        Layout::BatchFirst
    } else {
        Layout::SeqFirst
    };
    let (b, s, e, unbatched, q) = seq_dims(file, "query", layout)?;
    let (kb, t, kdim, k_unbatched, k) = seq_dims(file, "key", layout)?;
    let (vb, vt, vdim, v_unbatched, v) = seq_dims(file, "value", layout)?;
    if unbatched != k_unbatched || unbatched != v_unbatched {
        bail!("{path}: `query`, `key` and `value` must all be batched (3-D) or all unbatched (2-D)");
    }
    if kb != b || vb != b || vt != t {
        bail!("{path}: `key` and `value` must have the batch size of `query` ({b}) and one length (got key {kb}×{t}, value {vb}×{vt})");
    }
    let [_, h, _, _] = module.dims();
    let layout = if unbatched { Layout::BatchFirst } else { layout };
    let query = Sequence {
        data: q,
        batch: b,
        len: s,
        dim: e,
        layout,
    };
    let key = Sequence {
        data: k,
        batch: b,
        len: t,
        dim: kdim,
        layout,
    };
    let value = Sequence {
        data: v,
        batch: b,
        len: t,
        dim: vdim,
        layout,
    };

    let key_padding = match file.get("key_padding_mask") {
        None => KeyPadding::None,
        Some(tensor) => {
            let want: &[usize] = if unbatched { &[t] } else { &[b, t] };
            if tensor.shape() != want {
                bail!(
                    "{path}: tensor `key_padding_mask` has shape {:?}, expected {want:?} ([N, S] of the keys)",
                    tensor.shape()
                );
            }
            match tensor {
                Tensor::Bool { data, .. } => KeyPadding::Bool {
                    data,
                    meaning: BoolMeaning::MaskedOut,
                },
                Tensor::F32 { data, .. } => KeyPadding::Additive(data),
            }
        }
    };
    let attn_mask = match file.get("attn_mask") {
        None => ScoreMask::None,
        Some(tensor) => {
            let shape = tensor.shape();
            let ok = shape == [s, t] || shape == [b * h, s, t];
            if !ok {
                bail!(
                    "{path}: tensor `attn_mask` has shape {shape:?}, expected [L, S] = [{s}, {t}] or [N·num_heads, L, S] = [{}, {s}, {t}]",
                    b * h
                );
            }
            match tensor {
                Tensor::Bool { shape, data } => ScoreMask::Bool {
                    data,
                    shape,
                    meaning: BoolMeaning::MaskedOut,
                },
                Tensor::F32 { shape, data } => ScoreMask::Additive { data, shape },
            }
        }
    };
    let need_weights = match (flags.need_weights, flags.average_attn_weights) {
        (false, _) => NeedWeights::No,
        (true, true) => NeedWeights::Averaged,
        (true, false) => NeedWeights::PerHead,
    };
    let options = MhaOptions {
        attn_mask,
        key_padding,
        is_causal: flags.is_causal,
        need_weights,
    };
    // PyTorch takes the self-attention path when query, key and value are one tensor; equal
    // contents give the same numbers, so equal tensors take the fused path here.
    let self_attention = kdim == e && vdim == e && t == s && k == q && v == q;
    let result = if self_attention {
        module.forward_self(query, &options, par)
    } else {
        module.forward(query, key, value, &options, par)
    }
    .with_context(|| path.clone())?;
    let out_shape = if unbatched {
        vec![s, e]
    } else {
        match layout {
            Layout::BatchFirst => vec![b, s, e],
            Layout::SeqFirst => vec![s, b, e],
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
    Ok(outputs)
}

/// `attn run`.
pub fn run(config: &Path, weights: &Path, input: &Path, output: &Path) -> Result<()> {
    let prepared = prepare(config, weights, input)?;
    let outputs = prepared.execute(Par::Rayon)?;
    let refs: Vec<(&str, &[usize], &[f32])> = outputs
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
        .collect();
    write_f32(output, &refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a module's state dict under its PyTorch names, as `safetensors.torch.save_file`
    /// would for the same module.
    fn write_state_dict(path: &Path, dict: &StateDict) -> Result<()> {
        let refs: Vec<(&str, &[usize], &[f32])> = dict.iter().map(|(n, t)| (n.as_str(), t.shape(), t.data())).collect();
        write_f32(path, &refs)
    }

    #[test]
    fn weights_load_and_save_under_pytorch_names() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/modules");
        for case in ["mha_basic", "mha_kdim_vdim_per_head", "mha_bias_kv", "mha_no_bias"] {
            let prepared = prepare(
                &fixtures.join(format!("{case}.json")),
                &fixtures.join(format!("{case}.weights.safetensors")),
                &fixtures.join(format!("{case}.in.safetensors")),
            )
            .unwrap();
            let Module::Mha { module, .. } = &prepared.kind;
            let out = std::env::temp_dir().join(format!("attn-save-{}-{case}.safetensors", std::process::id()));
            write_state_dict(&out, &module.state_dict()).unwrap();
            let original = TensorFile::read(&fixtures.join(format!("{case}.weights.safetensors"))).unwrap();
            let saved = TensorFile::read(&out).unwrap();
            let names = |f: &TensorFile| {
                f.iter()
                    .map(|(n, t)| (n.clone(), t.shape().to_vec()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&original), names(&saved), "{case}");
            for ((_, a), (_, b)) in original.iter().zip(saved.iter()) {
                match (a, b) {
                    (Tensor::F32 { data: x, .. }, Tensor::F32 { data: y, .. }) => assert_eq!(x, y, "{case}"),
                    _ => panic!("{case}: dtypes differ"),
                }
            }
        }
    }
}
