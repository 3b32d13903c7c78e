//! An owned f32 tensor, and state dicts: named tensors as PyTorch's `state_dict()` has them.
//!
//! attn-core does no file IO: a caller reads a safetensors file (attn-cli does) into a
//! [`StateDict`] and hands it over; saving goes the other way.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use crate::params::StoreSlice;

use crate::{AttnError, Result};

/// A dense row-major f32 tensor. Its values are its own, or its range of a
/// [`ParamStore`](crate::ParamStore)'s buffer once a store adopted it; either way only this
/// tensor reads and writes them, and a clone copies them out.
pub struct Tensor {
    shape: Vec<usize>,
    data: Storage,
}

#[derive(Debug)]
enum Storage {
    Owned(Vec<f32>),
    Store(StoreSlice),
}

impl Clone for Tensor {
    fn clone(&self) -> Self {
        Tensor {
            shape: self.shape.clone(),
            data: Storage::Owned(self.data().to_vec()),
        }
    }
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape && self.data() == other.data()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("data", &self.data())
            .field("in_store", &matches!(self.data, Storage::Store(_)))
            .finish()
    }
}

impl Tensor {
    /// A tensor of `shape` holding `data`; fails unless the element counts agree. `name` is
    /// used in the error.
    pub fn new(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let needed = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if needed != Some(data.len()) {
            return Err(AttnError::BadTensorData {
                name: name.to_string(),
                shape,
                needed: needed.unwrap_or(usize::MAX),
                len: data.len(),
            });
        }
        Ok(Tensor {
            shape,
            data: Storage::Owned(data),
        })
    }

    /// Zeros of `shape`.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: Storage::Owned(vec![0.0; n]),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[f32] {
        match &self.data {
            Storage::Owned(v) => v,
            Storage::Store(s) => s.data(),
        }
    }

    /// The elements, mutably.
    pub fn data_mut(&mut self) -> &mut [f32] {
        match &mut self.data {
            Storage::Owned(v) => v,
            Storage::Store(s) => s.data_mut(),
        }
    }

    /// The elements, by value (copied out of a store).
    pub fn into_data(self) -> Vec<f32> {
        match self.data {
            Storage::Owned(v) => v,
            Storage::Store(s) => s.data().to_vec(),
        }
    }

    /// The id of the store holding the values and their range in it, if a store does.
    pub(crate) fn place(&self) -> Option<(u64, Range<usize>)> {
        match &self.data {
            Storage::Owned(_) => None,
            Storage::Store(s) => Some(s.place()),
        }
    }

    /// Moves the values to `slice`, which holds a copy of them (see `ParamStore::adopt`).
    pub(crate) fn set_store(&mut self, slice: StoreSlice) {
        debug_assert_eq!(slice.data(), self.data());
        self.data = Storage::Store(slice);
    }
}

/// Named tensors, as `module.state_dict()` names them.
pub type StateDict = BTreeMap<String, Tensor>;

/// Takes the tensor `name` of `shape` out of `dict`; a missing or misshapen tensor is an error
/// naming it and its expected shape.
pub fn take(dict: &mut StateDict, name: &str, shape: &[usize]) -> Result<Tensor> {
    let tensor = dict.remove(name).ok_or_else(|| AttnError::MissingTensor {
        name: name.to_string(),
        expected: shape.to_vec(),
    })?;
    if tensor.shape() != shape {
        return Err(AttnError::ShapeMismatch {
            op: "load",
            tensor: name.to_string(),
            expected: format!("{shape:?}"),
            got: tensor.shape().to_vec(),
        });
    }
    Ok(tensor)
}

/// Fails, naming the first leftover, if `dict` still holds a tensor after loading took what it
/// knows (`known`, for the message).
pub fn expect_empty(dict: &StateDict, known: &[String]) -> Result<()> {
    match dict.keys().next() {
        None => Ok(()),
        Some(name) => Err(AttnError::UnexpectedTensor {
            name: name.clone(),
            known: known.join(", "),
        }),
    }
}

/// Takes every tensor whose name starts with `prefix` out of `dict`, with the prefix removed:
/// the state dict of a submodule (`"layers.0."`, `"self_attn."`).
pub fn take_prefixed(dict: &mut StateDict, prefix: &str) -> StateDict {
    let names: Vec<String> = dict.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
    names
        .into_iter()
        .map(|name| {
            let tensor = dict.remove(&name).expect("listed above");
            (name[prefix.len()..].to_string(), tensor)
        })
        .collect()
}

/// Puts every tensor of `sub` into `dict` under `prefix`.
pub fn insert_prefixed(dict: &mut StateDict, prefix: &str, sub: StateDict) {
    for (name, tensor) in sub {
        dict.insert(format!("{prefix}{name}"), tensor);
    }
}

/// Deterministic pseudo-random weights, uniform in `±1/sqrt(fan_in)` like PyTorch's default
/// `nn.Linear` initialisation, from a seed (the workspace's one generator,
/// `attn_kernels::rng::SplitMix64`): for tests, examples and benchmarks.
#[derive(Debug, Clone)]
pub struct WeightInit {
    rng: attn_kernels::rng::SplitMix64,
}

impl WeightInit {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        WeightInit {
            rng: attn_kernels::rng::SplitMix64::new(seed),
        }
    }

    /// A tensor of `shape` with elements uniform in `±1/sqrt(fan_in)`.
    pub fn uniform(&mut self, shape: Vec<usize>, fan_in: usize) -> Tensor {
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let n = shape.iter().product();
        let data = (0..n).map(|_| self.rng.next_signed() * bound).collect();
        Tensor {
            shape,
            data: Storage::Owned(data),
        }
    }
}
