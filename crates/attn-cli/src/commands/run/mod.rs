//! `attn run`: a module with PyTorch weights on tensors from a safetensors file.
//!
//! MODULE.json holds `"module"`, the PyTorch constructor fields (PyTorch's names and defaults)
//! and the forward flags; WEIGHTS holds the module's `state_dict()`; IN holds the forward's
//! inputs under their PyTorch argument names. See docs/CLI.md.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;
use attn_nn::core::{Grads, MhaConfig, MultiHeadAttention, Precision, StateDict, Tensor as CoreTensor};
use attn_nn::{Decoder, DecoderLayer, Encoder, EncoderLayer, LayerConfig, StackConfig, Transformer, TransformerConfig};
use serde_json::{Map, Value};

use crate::support::dtype::Dtype;
use crate::support::tensors::{write_f32, Tensor, TensorFile};
use crate::support::threads::Threads;
use crate::support::timing::{self, BenchFlags};

mod inputs;
mod layers;
mod mha;

use layers::{run_decoder, run_encoder, run_transformer};
use mha::run_mha;

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
    /// `query`, `key` and `value` of the input file hold the same numbers (compared once, when
    /// the files are read): the forward takes the self-attention path, as PyTorch does when
    /// the three are one tensor.
    same_inputs: bool,
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
            Tensor::Bf16 { shape, bits } => {
                dict.insert(
                    name.clone(),
                    CoreTensor::from_bf16_bits(name, shape.clone(), bits.clone())?,
                );
            }
            Tensor::Bool { .. } => bail!(
                "{}: tensor `{name}` has dtype BOOL, expected F32",
                weights.path().display()
            ),
        }
    }
    Ok(dict)
}

/// Reads the three files and builds the module; with `bf16_weights`, BF16 weights are accepted
/// and kept as bits (for `--dtype bf16`).
pub fn prepare(config_path: &Path, weights_path: &Path, input_path: &Path, bf16_weights: bool) -> Result<Prepared> {
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
    let weights = TensorFile::read_weights(weights_path, bf16_weights)?;
    let inputs = TensorFile::read(input_path)?;
    check_not_swapped(&weights, &inputs)?;
    let kind = match module.as_str() {
        "multihead_attention" => {
            let flags = MhaFlags {
                need_weights: take_flag(&mut config, config_path, "need_weights", true)?,
                average_attn_weights: take_flag(&mut config, config_path, "average_attn_weights", true)?,
                is_causal: take_flag(&mut config, config_path, "is_causal", false)?,
                same_inputs: mha::same_inputs(&inputs),
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

    /// The module's linear maps in `precision`.
    pub(crate) fn set_precision(&mut self, precision: Precision) -> Result<()> {
        match &mut self.kind {
            Module::Mha { module, .. } => module.set_precision(precision)?,
            Module::EncoderLayer { module, .. } => module.set_precision(precision)?,
            Module::Encoder { module, .. } => module.set_precision(precision)?,
            Module::DecoderLayer { module, .. } => module.set_precision(precision)?,
            Module::Decoder { module, .. } => module.set_precision(precision)?,
            Module::Transformer { module, .. } => module.set_precision(precision)?,
        }
        Ok(())
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
            Module::EncoderLayer { module, is_causal } => run_encoder(&**module, *is_causal, file, backward, par),
            Module::Encoder { module, is_causal } => run_encoder(&**module, *is_causal, file, backward, par),
            Module::DecoderLayer { module, flags } => run_decoder(&**module, *flags, file, backward, par),
            Module::Decoder { module, flags } => run_decoder(&**module, *flags, file, backward, par),
            Module::Transformer {
                module,
                src_is_causal,
                flags,
                layer,
            } => run_transformer(module, layer, *src_is_causal, *flags, file, backward, par),
        }
    }
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
    /// Number format of the module's products (bf16: weights rounded once, activations and
    /// attention's operands as each product reads them, f32 sums; softmax, norms and residual
    /// adds stay f32). With --backward, mixed precision as `attn train --precision bf16`: the
    /// linear maps' products in bf16 forward and backward, attention in f32, f32 gradients.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
}

impl Files {
    fn prepare(&self) -> Result<Prepared> {
        // A BF16 state_dict is accepted with --dtype bf16 (even where the CPU runs f32: the
        // user chose bf16's rounding) and kept as bits: the weights are packed from them.
        let mut prepared = prepare(&self.config, &self.weights, &self.input, self.dtype == Dtype::Bf16)?;
        prepared.set_precision(self.dtype.effective(true).precision())?;
        Ok(prepared)
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
        let stats = timing::measure_warmed(budget, || {
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
                false,
            )
            .unwrap();
            let Module::Mha { module, .. } = &prepared.kind else {
                panic!("{case} is an MHA fixture")
            };
            let out = std::env::temp_dir().join(format!("attn-save-{}-{case}.safetensors", std::process::id()));
            write_state_dict(&out, &module.state_dict()).unwrap();
            let original = TensorFile::read(&fixtures.join(format!("{case}.weights.safetensors"))).unwrap();
            let saved = TensorFile::read(&out).unwrap();
            std::fs::remove_file(&out).unwrap();
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
