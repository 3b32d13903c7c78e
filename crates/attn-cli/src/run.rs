//! `attn run`: a module with PyTorch weights on tensors from a safetensors file.
//!
//! MODULE.json holds `"module"`, the PyTorch constructor fields (PyTorch's names and defaults)
//! and the forward flags; WEIGHTS holds the module's `state_dict()`; IN holds the forward's
//! inputs under their PyTorch argument names. See docs/CLI.md.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;
use attn_nn::core::{
    BoolMeaning, Grads, KeyPadding, Layout, MhaConfig, MhaInputs, MhaOptions, MultiHeadAttention, NeedWeights,
    ParamPath, ScoreMask, Sequence, StateDict, Tensor as CoreTensor,
};
use attn_nn::layers::Dropout;
use attn_nn::{
    BlockMasks, Decoder, DecoderLayer, Encoder, EncoderLayer, LayerConfig, StackConfig, Step, Transformer,
    TransformerConfig, TransformerMasks,
};
use serde_json::{Map, Value};

use crate::tensors::{write_f32, Tensor, TensorFile};
use crate::threads::Threads;
use crate::timing::{self, BenchFlags};

/// A module ready to run, with its inputs.
pub struct Prepared {
    kind: Module,
    inputs: TensorFile,
}

enum Module {
    Mha {
        module: Box<MultiHeadAttention>,
        flags: MhaFlags,
    },
    EncoderLayer {
        module: Box<EncoderLayer>,
        is_causal: bool,
    },
    Encoder {
        module: Box<Encoder>,
        is_causal: bool,
    },
    DecoderLayer {
        module: Box<DecoderLayer>,
        flags: DecoderFlags,
    },
    Decoder {
        module: Box<Decoder>,
        flags: DecoderFlags,
    },
    Transformer {
        module: Box<Transformer>,
        src_is_causal: bool,
        flags: DecoderFlags,
        layer: Box<LayerConfig>,
    },
}

#[derive(Debug, Clone, Copy)]
struct DecoderFlags {
    tgt_is_causal: bool,
    memory_is_causal: bool,
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
    check_not_swapped(&weights, &inputs)?;
    let kind = match module.as_str() {
        "multihead_attention" => {
            let flags = MhaFlags {
                need_weights: take_flag(&mut config, config_path, "need_weights", true)?,
                average_attn_weights: take_flag(&mut config, config_path, "average_attn_weights", true)?,
                is_causal: take_flag(&mut config, config_path, "is_causal", false)?,
            };
            let mha_config: MhaConfig = serde_json::from_value(Value::Object(config))
                .map_err(anyhow::Error::from)
                .and_then(|c: MhaConfig| Ok(c.validate().map(|()| c)?))
                .with_context(|| format!("{}: bad multihead_attention config", config_path.display()))?;
            let module = MultiHeadAttention::from_state_dict(mha_config, state_dict(&weights)?)
                .with_context(|| format!("{}: weights do not fit the config", weights_path.display()))?;
            Module::Mha {
                module: Box::new(module),
                flags,
            }
        }
        kind @ ("transformer_encoder_layer" | "transformer_encoder") => {
            let is_causal = take_flag(&mut config, config_path, "is_causal", false)?;
            let dict = state_dict(&weights)?;
            if kind == "transformer_encoder" {
                let cfg: StackConfig = parse_config(config, config_path, kind)?;
                let module = Encoder::from_state_dict(cfg, dict).with_context(|| weights_error(weights_path))?;
                Module::Encoder {
                    module: Box::new(module),
                    is_causal,
                }
            } else {
                let cfg: LayerConfig = parse_config(config, config_path, kind)?;
                let module = EncoderLayer::from_state_dict(cfg, dict).with_context(|| weights_error(weights_path))?;
                Module::EncoderLayer {
                    module: Box::new(module),
                    is_causal,
                }
            }
        }
        kind @ ("transformer_decoder_layer" | "transformer_decoder") => {
            let flags = DecoderFlags {
                tgt_is_causal: take_flag(&mut config, config_path, "tgt_is_causal", false)?,
                memory_is_causal: take_flag(&mut config, config_path, "memory_is_causal", false)?,
            };
            let dict = state_dict(&weights)?;
            if kind == "transformer_decoder" {
                let cfg: StackConfig = parse_config(config, config_path, kind)?;
                let module = Decoder::from_state_dict(cfg, dict).with_context(|| weights_error(weights_path))?;
                Module::Decoder {
                    module: Box::new(module),
                    flags,
                }
            } else {
                let cfg: LayerConfig = parse_config(config, config_path, kind)?;
                let module = DecoderLayer::from_state_dict(cfg, dict).with_context(|| weights_error(weights_path))?;
                Module::DecoderLayer {
                    module: Box::new(module),
                    flags,
                }
            }
        }
        "transformer" => {
            let src_is_causal = take_flag(&mut config, config_path, "src_is_causal", false)?;
            let flags = DecoderFlags {
                tgt_is_causal: take_flag(&mut config, config_path, "tgt_is_causal", false)?,
                memory_is_causal: take_flag(&mut config, config_path, "memory_is_causal", false)?,
            };
            let cfg: TransformerConfig = parse_config(config, config_path, "transformer")?;
            let module = Transformer::from_state_dict(cfg, state_dict(&weights)?)
                .with_context(|| weights_error(weights_path))?;
            let layer = module.encoder.config().layer.clone();
            Module::Transformer {
                module: Box::new(module),
                src_is_causal,
                flags,
                layer: Box::new(layer),
            }
        }
        other => bail!(
            "{}: unknown module `{other}`; this version runs: multihead_attention, transformer_encoder_layer, \
             transformer_decoder_layer, transformer_encoder, transformer_decoder, transformer",
            config_path.display()
        ),
    };
    Ok(Prepared { kind, inputs })
}

/// A layer, stack or model config, parsed and checked field by field; errors name the config
/// file and the field as the user wrote it.
fn parse_config<T: serde::de::DeserializeOwned + HasLayer>(
    config: Map<String, Value>,
    path: &Path,
    kind: &str,
) -> Result<T> {
    let parsed: T = serde_json::from_value(Value::Object(config))
        .with_context(|| format!("{}: bad {kind} config", path.display()))?;
    parsed
        .layer()
        .validate()
        .with_context(|| format!("{}: bad {kind} config", path.display()))?;
    Ok(parsed)
}

/// The per-layer fields of a config.
trait HasLayer {
    fn layer(&self) -> &LayerConfig;
}

impl HasLayer for LayerConfig {
    fn layer(&self) -> &LayerConfig {
        self
    }
}

impl HasLayer for StackConfig {
    fn layer(&self) -> &LayerConfig {
        &self.layer
    }
}

impl HasLayer for TransformerConfig {
    fn layer(&self) -> &LayerConfig {
        &self.layer
    }
}

/// The forward's input names, which a state dict never holds.
const INPUT_NAMES: [&str; 14] = [
    "query",
    "key",
    "value",
    "src",
    "tgt",
    "memory",
    "attn_mask",
    "key_padding_mask",
    "src_mask",
    "tgt_mask",
    "memory_mask",
    "src_key_padding_mask",
    "tgt_key_padding_mask",
    "memory_key_padding_mask",
];

/// Fails with a message saying so when --weights holds the forward's inputs and --input does
/// not (the two files swapped), instead of a dtype error about a mask in the weights.
fn check_not_swapped(weights: &TensorFile, inputs: &TensorFile) -> Result<()> {
    let input_names = |file: &TensorFile| -> Vec<String> {
        file.iter()
            .map(|(name, _)| name.clone())
            .filter(|name| INPUT_NAMES.contains(&name.as_str()))
            .collect()
    };
    let in_weights = input_names(weights);
    if !in_weights.is_empty() && input_names(inputs).is_empty() {
        bail!(
            "--weights {} holds the forward's inputs ({}), not a state_dict, and --input {} holds none: \
             are --weights and --input swapped?",
            weights.path().display(),
            in_weights
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", "),
            inputs.path().display()
        );
    }
    Ok(())
}

fn weights_error(path: &Path) -> String {
    format!("{}: weights do not fit the config", path.display())
}

/// Named outputs: (name, shape, data).
pub type Outputs = Vec<(String, Vec<usize>, Vec<f32>)>;

/// What a module computed: its output, and after a backward the gradients of its sequence
/// inputs (by input name) and of its parameters.
struct Ran {
    output: Vec<f32>,
    inputs: Vec<(&'static str, Vec<f32>)>,
    grads: Grads,
}

impl Ran {
    fn forward(output: Vec<f32>) -> Self {
        Ran {
            output,
            inputs: Vec::new(),
            grads: Grads::new(),
        }
    }
}

/// No dropout: `attn run --backward` differentiates the module as PyTorch's training mode
/// does with dropout 0.
/// A decoder's masks as its training forward takes them (no source side).
fn training_masks<'a>(tgt: &BlockMasks<'a>, memory: &BlockMasks<'a>) -> TransformerMasks<'a> {
    TransformerMasks {
        src: BlockMasks::default(),
        tgt: *tgt,
        memory: *memory,
    }
}

impl Prepared {
    /// Runs the forward pass.
    pub fn execute(&self, par: Par) -> Result<Outputs> {
        self.run(par, false)
    }

    /// Runs the forward and backward passes: the outputs, then `grad.NAME` for every sequence
    /// input and every parameter, against the input file's `grad.output`.
    pub fn execute_backward(&self, par: Par) -> Result<Outputs> {
        self.run(par, true)
    }

    fn run(&self, par: Par, backward: bool) -> Result<Outputs> {
        let file = &self.inputs;
        if !backward && file.get("grad.output").is_some() {
            bail!(
                "{}: `grad.output` is read only with --backward (the gradient of the output)",
                file.path().display()
            );
        }
        match &self.kind {
            Module::Mha { module, flags } => run_mha(module, *flags, file, backward, par),
            Module::EncoderLayer { module, is_causal } => run_encoder(
                module.config(),
                1,
                *is_causal,
                file,
                backward,
                |src, masks, d| match d {
                    None => Ok(Ran::forward(module.forward(src, masks, par)?)),
                    Some(d) => {
                        let mut grads = Grads::new();
                        let mut step = Step::new(Dropout::NONE, par, &mut grads);
                        let (output, tape) = module.forward_train(src, masks, &mut step)?;
                        let d_src = module.backward(src, masks, &tape, d, &mut step)?;
                        Ok(Ran {
                            output,
                            inputs: vec![("src", d_src)],
                            grads,
                        })
                    }
                },
            ),
            Module::Encoder { module, is_causal } => {
                let layers = module.config().num_layers;
                run_encoder(
                    &module.config().layer,
                    layers,
                    *is_causal,
                    file,
                    backward,
                    |src, masks, d| match d {
                        None => Ok(Ran::forward(module.forward(src, masks, par)?)),
                        Some(d) => {
                            let mut grads = Grads::new();
                            let mut step = Step::new(Dropout::NONE, par, &mut grads);
                            let (output, tape) = module.forward_train(src, masks, &mut step)?;
                            let d_src = module.backward(src, masks, &tape, d, &mut step)?;
                            Ok(Ran {
                                output,
                                inputs: vec![("src", d_src)],
                                grads,
                            })
                        }
                    },
                )
            }
            Module::DecoderLayer { module, flags } => {
                run_decoder(module.config(), 1, *flags, file, backward, |t, m, tm, mm, d| match d {
                    None => Ok(Ran::forward(module.forward(t, m, tm, mm, par)?)),
                    Some(d) => {
                        let masks = training_masks(tm, mm);
                        let mut grads = Grads::new();
                        let mut step = Step::new(Dropout::NONE, par, &mut grads);
                        let (output, tape) = module.forward_train(t, m, &masks, &mut step)?;
                        let (d_tgt, d_memory) = module.backward(t, m, &masks, &tape, d, &mut step)?;
                        Ok(Ran {
                            output,
                            inputs: vec![("tgt", d_tgt), ("memory", d_memory)],
                            grads,
                        })
                    }
                })
            }
            Module::Decoder { module, flags } => {
                let layers = module.config().num_layers;
                run_decoder(
                    &module.config().layer,
                    layers,
                    *flags,
                    file,
                    backward,
                    |t, m, tm, mm, d| match d {
                        None => Ok(Ran::forward(module.forward(t, m, tm, mm, par)?)),
                        Some(d) => {
                            let masks = training_masks(tm, mm);
                            let mut grads = Grads::new();
                            let mut step = Step::new(Dropout::NONE, par, &mut grads);
                            let (output, tape) = module.forward_train(t, m, &masks, &mut step)?;
                            let (d_tgt, d_memory) = module.backward(t, m, &masks, &tape, d, &mut step)?;
                            Ok(Ran {
                                output,
                                inputs: vec![("tgt", d_tgt), ("memory", d_memory)],
                                grads,
                            })
                        }
                    },
                )
            }
            Module::Transformer {
                module,
                src_is_causal,
                flags,
                layer,
            } => run_transformer(module, layer, *src_is_causal, *flags, file, backward, par),
        }
    }
}

/// `grad.output` of the input file when `backward`: present, F32, of the output's shape.
fn grad_output<'a>(file: &'a TensorFile, backward: bool, shape: &[usize]) -> Result<Option<&'a [f32]>> {
    if !backward {
        return Ok(None);
    }
    let path = file.path().display();
    match file.get("grad.output") {
        None => bail!("{path}: --backward needs `grad.output` in the input file, the shape of `output` {shape:?}"),
        Some(Tensor::Bool { .. }) => bail!("{path}: `grad.output` has dtype BOOL, expected F32 {shape:?}"),
        Some(Tensor::F32 { shape: got, data }) => {
            if got.as_slice() != shape {
                bail!("{path}: `grad.output` has shape {got:?}, expected the shape of `output` {shape:?}");
            }
            Ok(Some(data))
        }
    }
}

/// The tensors an input file may hold: `names`, and `grad.output` with `--backward`.
fn allowed<'a>(names: &[&'a str], backward: bool) -> Vec<&'a str> {
    let mut all = names.to_vec();
    if backward {
        all.push("grad.output");
    }
    all
}

/// `output` and, after a backward, `grad.NAME` of each input (in its file shape) and parameter.
fn outputs(file: &TensorFile, shape: Vec<usize>, ran: Ran) -> Outputs {
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
fn check_backward_memory(config: &LayerConfig, tokens: usize, layers: usize, backward: bool) -> Result<()> {
    if backward {
        let bytes = config.forward_bytes(tokens).saturating_mul(layers as u128 + 2);
        crate::memory::check(bytes, "the backward pass (activations kept for it and gradients)")?;
    }
    Ok(())
}

/// `(batch, len, dim, unbatched)` of a sequence input in the module's layout.
pub(crate) fn seq_dims<'a>(
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
pub(crate) fn key_padding<'a>(
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
    })
}

/// The optional attention mask `name`: `[L, S]` or `[N·H, L, S]`; BOOL `true` = not allowed.
pub(crate) fn score_mask<'a>(file: &'a TensorFile, name: &str, s: usize, t: usize, bh: usize) -> Result<ScoreMask<'a>> {
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
    })
}

fn run_mha(
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

    let key_padding = key_padding(file, "key_padding_mask", b, t, unbatched)?;
    let attn_mask = score_mask(file, "attn_mask", s, t, b * h)?;
    let need_weights = match (flags.need_weights, flags.average_attn_weights) {
        (false, _) => NeedWeights::No,
        (true, true) => NeedWeights::Averaged,
        (true, false) => NeedWeights::PerHead,
    };
    let forward_bytes = module.forward_bytes(b, s, t, need_weights);
    crate::memory::check(
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
            let self_attention = kdim == e && vdim == e && t == s && k == q && v == q;
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

/// A sequence input of a layer: the `Sequence` view and its output shape.
fn layer_input<'a>(
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
    crate::memory::check(
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

fn run_encoder(
    config: &LayerConfig,
    layers: usize,
    is_causal: bool,
    file: &TensorFile,
    backward: bool,
    run: impl Fn(Sequence<'_>, &BlockMasks<'_>, Option<&[f32]>) -> Result<Ran>,
) -> Result<Outputs> {
    file.only(&allowed(&["src", "src_mask", "src_key_padding_mask"], backward))?;
    let (src, shape, unbatched) = layer_input(file, "src", Layout::from_batch_first(config.batch_first), config)?;
    check_backward_memory(config, src.batch * src.len, layers, backward)?;
    let d_output = grad_output(file, backward, &shape)?;
    let masks = BlockMasks {
        mask: score_mask(file, "src_mask", src.len, src.len, src.batch * config.nhead)?,
        key_padding: key_padding(file, "src_key_padding_mask", src.batch, src.len, unbatched)?,
        is_causal,
        packing: None,
    };
    let ran = run(src, &masks, d_output).with_context(|| file.path().display().to_string())?;
    Ok(outputs(file, shape, ran))
}

fn decoder_masks<'a>(
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

fn run_decoder(
    config: &LayerConfig,
    layers: usize,
    flags: DecoderFlags,
    file: &TensorFile,
    backward: bool,
    run: impl Fn(Sequence<'_>, Sequence<'_>, &BlockMasks<'_>, &BlockMasks<'_>, Option<&[f32]>) -> Result<Ran>,
) -> Result<Outputs> {
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
    check_backward_memory(config, tgt.batch * (tgt.len + memory.len), layers, backward)?;
    let d_output = grad_output(file, backward, &shape)?;
    let ran =
        run(tgt, memory, &tgt_masks, &memory_masks, d_output).with_context(|| file.path().display().to_string())?;
    Ok(outputs(file, shape, ran))
}

fn run_transformer(
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

/// The three files of a module run, shared by `attn run` and `attn bench run`.
#[derive(Debug, clap::Args)]
pub struct Files {
    /// MODULE.json: {"module": KIND, constructor fields..., forward flags...}.
    #[arg(long)]
    config: PathBuf,
    /// The module's state_dict() as safetensors.
    #[arg(long)]
    weights: PathBuf,
    /// The forward's inputs, under PyTorch's argument names.
    #[arg(long)]
    input: PathBuf,
}

impl Files {
    fn prepare(&self) -> Result<Prepared> {
        prepare(&self.config, &self.weights, &self.input)
    }
}

/// `attn run`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  attn run --config mha.json --weights mha.safetensors --input in.safetensors --output out.safetensors\n\nMODULE.json: {\"module\": \"multihead_attention\", \"embed_dim\": 16, \"num_heads\": 4, \"need_weights\": false}\nwith PyTorch's constructor fields and defaults; WEIGHTS is the module's state_dict().\nWith --backward, IN also holds grad.output (the shape of output), and OUT also holds grad.NAME for every\nsequence input (query, key, value, src, tgt, memory) and every parameter under its state-dict name."
)]
pub struct Args {
    #[command(flatten)]
    files: Files,
    /// Where the outputs go.
    #[arg(long)]
    output: PathBuf,
    /// Also the backward pass: IN holds `grad.output`, and OUT gets `grad.NAME` for every
    /// sequence input and every parameter (PyTorch's `.grad` after `output.backward(grad_output)`
    /// in training mode with dropout 0).
    #[arg(long)]
    backward: bool,
    #[command(flatten)]
    threads: Threads,
}

/// Runs `attn run`; prints one line: the file written and each output's name and shape.
pub fn main(args: Args) -> Result<()> {
    args.threads.install(|_| {
        let prepared = args.files.prepare()?;
        let outputs = if args.backward {
            prepared.execute_backward(Par::Rayon)?
        } else {
            prepared.execute(Par::Rayon)?
        };
        let refs: Vec<(&str, &[usize], &[f32])> = outputs
            .iter()
            .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
            .collect();
        write_f32(&args.output, &refs)?;
        let shapes: Vec<String> = outputs.iter().map(|(n, s, _)| format!("{n} {s:?}")).collect();
        println!("wrote {}: {}", args.output.display(), shapes.join(", "));
        Ok(())
    })
}

/// `attn bench run`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    files: Files,
    /// Time the forward and the backward together (IN holds `grad.output`), as `attn run
    /// --backward` computes them.
    #[arg(long)]
    backward: bool,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    budget: BenchFlags,
}

/// Times the forward pass exactly as `attn run` computes it (files read once, outside the
/// timing).
pub fn bench(args: BenchArgs) -> Result<()> {
    let budget = args.budget.budget()?;
    let prepared = args.files.prepare()?;
    let backward = args.backward;
    let once = |p: &Prepared| {
        if backward {
            p.execute_backward(Par::Rayon)
        } else {
            p.execute(Par::Rayon)
        }
    };
    let (stats, n) = args.threads.install(|n| {
        once(&prepared)?;
        let stats = timing::measure(budget, || {
            once(&prepared).expect("ran once above");
        });
        Ok((stats, n))
    })?;
    let what = format!(
        "{}{}",
        args.files.config.display(),
        if backward { " forward+backward" } else { "" }
    );
    println!("{}", timing::report_plain("run", &what, stats, n, args.budget.json));
    Ok(())
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
            let Module::Mha { module, .. } = &prepared.kind else {
                panic!("{case} is an MHA fixture")
            };
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
