//! Reads the golden fixtures that `xtask/python/gen_crate_fixtures.py` writes from PyTorch: one
//! safetensors file a case, the module's config (`attn run`'s MODULE.json) in the metadata, and
//! `param.*` (state dict), `input.*` (forward arguments, PyTorch's names) and `expected.*`
//! (PyTorch's outputs) tensors. attn-core's tests use it, and attn-nn's include this same file by
//! path, so the two crates read fixtures one way.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use attn_core::kernels::testing::max_error;
use attn_core::{BoolMeaning, KeyPadding, Layout, ScoreMask, Sequence, StateDict, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

/// An input tensor: `f32` or boolean, with its shape.
pub enum Input {
    /// An `f32` tensor.
    F32 { shape: Vec<usize>, data: Vec<f32> },
    /// A boolean tensor (`true` = masked out, PyTorch's module convention).
    Bool { shape: Vec<usize>, data: Vec<bool> },
}

impl Input {
    fn shape(&self) -> &[usize] {
        match self {
            Input::F32 { shape, .. } | Input::Bool { shape, .. } => shape,
        }
    }
}

/// One golden case.
pub struct Golden {
    /// The file stem.
    pub name: String,
    /// MODULE.json: `module`, constructor fields, forward flags.
    pub config: Map<String, Value>,
    /// Query, key and value are one tensor (only `query` is stored).
    pub self_attention: bool,
    /// The state dict under PyTorch's names.
    pub params: StateDict,
    /// The forward's inputs.
    pub inputs: BTreeMap<String, Input>,
    /// PyTorch's outputs: shape and data.
    pub expected: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Removes the boolean forward flag `name` from a config (default `default`).
pub fn take_flag(config: &mut Map<String, Value>, name: &str, default: bool) -> bool {
    config
        .remove(name)
        .map_or(default, |v| v.as_bool().expect("flags are booleans"))
}

/// Every case listed in `dir/cases.json`.
pub fn load_all(dir: &Path) -> Vec<Golden> {
    let manifest = std::fs::read_to_string(dir.join("cases.json"))
        .unwrap_or_else(|e| panic!("{}/cases.json: {e} (run `cargo xtask codegen`)", dir.display()));
    let names: Vec<String> = serde_json::from_str(&manifest).expect("cases.json lists names");
    assert!(!names.is_empty(), "{}: no cases", dir.display());
    names
        .iter()
        .map(|name| load(&dir.join(format!("{name}.safetensors"))))
        .collect()
}

/// The names of `attn run`'s golden cases (`crates/attn-cli/tests/fixtures/modules/cases.json`).
pub fn module_case_names(dir: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(dir.join("cases.json"))
        .unwrap_or_else(|e| panic!("{}/cases.json: {e} (run `cargo xtask codegen`)", dir.display()));
    serde_json::from_str(&manifest).expect("cases.json lists names")
}

/// One of `attn run`'s backward golden cases (`gen_module_fixtures.py`): MODULE.json as the
/// config, the state dict, the inputs with `grad.output`, and as expected the `grad.NAME`
/// tensors of PyTorch autograd in float64.
pub fn load_backward(dir: &Path, name: &str) -> Golden {
    let read = |suffix: &str| {
        let path = dir.join(format!("{name}{suffix}"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask codegen`)", path.display()))
    };
    let config: Map<String, Value> = serde_json::from_slice(&read(".json")).expect("config is a JSON object");
    let mut golden = Golden {
        name: name.to_string(),
        config,
        self_attention: false,
        params: StateDict::new(),
        inputs: BTreeMap::new(),
        expected: BTreeMap::new(),
    };
    for (suffix, which) in [
        (".weights.safetensors", 0),
        (".backward.in.safetensors", 1),
        (".backward.want.safetensors", 2),
    ] {
        let bytes = read(suffix);
        let file = SafeTensors::deserialize(&bytes).expect("a safetensors file");
        for (tensor, view) in file.tensors() {
            let input = tensor_of(&tensor, &view);
            match (which, input) {
                (0, Input::F32 { shape, data }) => {
                    golden
                        .params
                        .insert(tensor.clone(), Tensor::new(&tensor, shape, data).unwrap());
                }
                (1, input) => {
                    golden.inputs.insert(tensor, input);
                }
                (2, Input::F32 { shape, data }) => {
                    golden.expected.insert(tensor, (shape, data));
                }
                _ => panic!("{name}{suffix}: `{tensor}` has an unexpected dtype"),
            }
        }
    }
    golden
}

/// `max |got - want| / max |want|`; a NaN is an infinite error.
pub fn relative_to_largest(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0.0f64, |m, &w| m.max((w as f64).abs()))
        .max(f64::MIN_POSITIVE);
    let worst = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
    worst / scale
}

fn tensor_of(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Input {
    let shape = view.shape().to_vec();
    match view.dtype() {
        Dtype::F32 => Input::F32 {
            shape,
            data: view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        },
        Dtype::BOOL => Input::Bool {
            shape,
            data: view.data().iter().map(|&b| b != 0).collect(),
        },
        other => panic!("{name}: dtype {other:?}"),
    }
}

fn load(path: &Path) -> Golden {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, metadata) = SafeTensors::read_metadata(&bytes).expect("a safetensors header");
    let meta = metadata.metadata().clone().expect("golden files carry metadata");
    let config: Map<String, Value> = serde_json::from_str(&meta["config"]).expect("config is a JSON object");
    let file = SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let mut golden = Golden {
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        config,
        self_attention: meta.get("self_attention").is_some_and(|v| v == "true"),
        params: StateDict::new(),
        inputs: BTreeMap::new(),
        expected: BTreeMap::new(),
    };
    for (name, view) in file.tensors() {
        let input = tensor_of(&name, &view);
        let (kind, short) = name.split_once('.').expect("prefixed tensor names");
        match (kind, input) {
            ("param", Input::F32 { shape, data }) => {
                golden
                    .params
                    .insert(short.to_string(), Tensor::new(short, shape, data).unwrap());
            }
            ("input", input) => {
                golden.inputs.insert(short.to_string(), input);
            }
            ("expected", Input::F32 { shape, data }) => {
                golden.expected.insert(short.to_string(), (shape, data));
            }
            _ => panic!("{name}: unexpected tensor"),
        }
    }
    golden
}

impl Golden {
    /// The `f32` input `name`.
    pub fn f32(&self, name: &str) -> &[f32] {
        match &self.inputs[name] {
            Input::F32 { data, .. } => data,
            Input::Bool { .. } => panic!("{}: `{name}` is boolean", self.name),
        }
    }

    /// The sequence input `name` in `layout` (`[L, E]` unbatched inputs are one batch-first
    /// sequence), and whether it was unbatched.
    pub fn sequence(&self, name: &str, layout: Layout) -> (Sequence<'_>, bool) {
        let data = self.f32(name);
        match (self.inputs[name].shape(), layout) {
            (&[l, e], _) => (Sequence::batch_first(data, 1, l, e), true),
            (&[b, l, e], Layout::BatchFirst) | (&[l, b, e], Layout::SeqFirst) => (
                Sequence {
                    data,
                    batch: b,
                    len: l,
                    dim: e,
                    layout,
                },
                false,
            ),
            (shape, _) => panic!("{}: `{name}` has shape {shape:?}", self.name),
        }
    }

    /// The optional `attn_mask`-style input `name` (boolean `true` = masked out, or additive).
    pub fn score_mask(&self, name: &str) -> ScoreMask<'_> {
        match self.inputs.get(name) {
            None => ScoreMask::None,
            Some(Input::Bool { shape, data }) => ScoreMask::Bool {
                data,
                shape,
                meaning: BoolMeaning::MaskedOut,
            },
            Some(Input::F32 { shape, data }) => ScoreMask::Additive { data, shape },
        }
    }

    /// The optional key-padding input `name` (boolean `true` = padding, or additive).
    pub fn key_padding(&self, name: &str) -> KeyPadding<'_> {
        match self.inputs.get(name) {
            None => KeyPadding::None,
            Some(Input::Bool { data, .. }) => KeyPadding::Bool {
                data,
                meaning: BoolMeaning::MaskedOut,
            },
            Some(Input::F32 { data, .. }) => KeyPadding::Additive(data),
        }
    }

    /// The error of a gradient `got` against `expected[name]`, relative to the largest
    /// expected value: `max |got - want| / max |want|` (the measure for gradients).
    #[track_caller]
    pub fn grad_error(&self, name: &str, got: &[f32]) -> f64 {
        let (_, want) = self
            .expected
            .get(name)
            .unwrap_or_else(|| panic!("{}: no expected `{name}`", self.name));
        assert_eq!(got.len(), want.len(), "{}: `{name}` has the wrong length", self.name);
        relative_to_largest(got, want)
    }

    /// The largest error of `got` against `expected.NAME`, measured as
    /// `|got - want| / (1 + |want|)` ([`max_error`]).
    #[track_caller]
    pub fn error(&self, name: &str, got: &[f32]) -> f64 {
        let (_, want) = &self.expected[name];
        assert_eq!(got.len(), want.len(), "{}: `{name}` has the wrong length", self.name);
        max_error(got, &want.iter().map(|&w| w as f64).collect::<Vec<_>>())
    }
}
