//! An owned f32 tensor, and state dicts: named tensors as PyTorch's `state_dict()` has them.
//!
//! attn-core does no file IO: a caller reads a safetensors file (attn-cli does) into a
//! [`StateDict`] and hands it over; saving goes the other way.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use attn_kernels::bf16_to_f32;

use crate::params::StoreSlice;

use crate::{AttnError, Result};

/// A dense row-major f32 tensor. Its values are its own, or its range of a
/// [`ParamStore`](crate::ParamStore)'s buffer once a store adopted it; either way only this
/// tensor reads and writes them, and a clone copies them out.
///
/// A tensor may also hold bf16 values as their bits ([`Tensor::from_bf16_bits`]: a BF16
/// safetensors file read for a model that computes in bf16), two bytes each. The bf16 packing of
/// a weight ([`crate::pack_weight_of`]) and [`Tensor::row`] read the bits; the first f32 read
/// ([`Tensor::data`]) widens them once, exactly, and keeps the widened copy beside them;
/// [`Tensor::data_mut`] turns the tensor into an f32 one.
pub struct Tensor {
    shape: Vec<usize>,
    data: Storage,
}

#[derive(Debug)]
enum Storage {
    Owned(Vec<f32>),
    Store(StoreSlice),
    /// bf16 bits, and their f32 values once something read them as f32.
    Bf16 {
        bits: Vec<u16>,
        wide: OnceLock<Vec<f32>>,
    },
}

impl Clone for Tensor {
    fn clone(&self) -> Self {
        let data = match &self.data {
            Storage::Bf16 { bits, .. } => Storage::Bf16 {
                bits: bits.clone(),
                wide: OnceLock::new(),
            },
            _ => Storage::Owned(self.data().to_vec()),
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }
}

impl PartialEq for Tensor {
    /// The same shape and the same values (as f32; a bf16 tensor is compared without widening
    /// its storage).
    fn eq(&self, other: &Self) -> bool {
        let unwidened = |t: &Tensor| matches!(&t.data, Storage::Bf16 { wide, .. } if wide.get().is_none());
        if self.shape != other.shape {
            return false;
        }
        if unwidened(self) || unwidened(other) {
            return self.values().eq(other.values());
        }
        self.data() == other.data()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("data", &self.values().collect::<Vec<f32>>())
            .field("in_store", &matches!(self.data, Storage::Store(_)))
            .field("bf16", &self.is_bf16())
            .finish()
    }
}

impl Tensor {
    /// A tensor of `shape` holding `data`; fails unless the element counts agree. `name` is
    /// used in the error.
    pub fn new(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let shape = check_count(name, shape, data.len())?;
        Ok(Tensor {
            shape,
            data: Storage::Owned(data),
        })
    }

    /// A tensor of `shape` holding the bf16 values whose bits are `bits` (the upper halves of
    /// their f32 values), kept as bits: two bytes per value until something reads them as f32.
    /// Fails unless the element counts agree; `name` is used in the error.
    pub fn from_bf16_bits(name: &str, shape: Vec<usize>, bits: Vec<u16>) -> Result<Self> {
        let shape = check_count(name, shape, bits.len())?;
        Ok(Tensor {
            shape,
            data: Storage::Bf16 {
                bits,
                wide: OnceLock::new(),
            },
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

    /// The elements, row-major. A bf16 tensor widens its values on the first call and keeps
    /// the f32 copy (see the type's documentation).
    pub fn data(&self) -> &[f32] {
        match &self.data {
            Storage::Owned(v) => v,
            Storage::Store(s) => s.data(),
            Storage::Bf16 { bits, wide } => wide.get_or_init(|| widen(bits)),
        }
    }

    /// The elements, mutably. A bf16 tensor becomes an f32 one (its bits are dropped).
    pub fn data_mut(&mut self) -> &mut [f32] {
        if let Storage::Bf16 { bits, wide } = &mut self.data {
            let values = wide.take().unwrap_or_else(|| widen(bits));
            self.data = Storage::Owned(values);
        }
        match &mut self.data {
            Storage::Owned(v) => v,
            Storage::Store(s) => s.data_mut(),
            Storage::Bf16 { .. } => unreachable!("made f32 above"),
        }
    }

    /// The elements, by value (copied out of a store, widened from bf16).
    pub fn into_data(self) -> Vec<f32> {
        match self.data {
            Storage::Owned(v) => v,
            Storage::Store(s) => s.data().to_vec(),
            Storage::Bf16 { bits, mut wide } => wide.take().unwrap_or_else(|| widen(&bits)),
        }
    }

    /// The bf16 bits of a tensor that holds bf16 values ([`Tensor::from_bf16_bits`]); `None`
    /// for an f32 tensor.
    pub fn bf16_bits(&self) -> Option<&[u16]> {
        match &self.data {
            Storage::Bf16 { bits, .. } => Some(bits),
            _ => None,
        }
    }

    /// Whether the tensor holds bf16 values ([`Tensor::from_bf16_bits`]).
    pub fn is_bf16(&self) -> bool {
        matches!(self.data, Storage::Bf16 { .. })
    }

    /// Bytes of values the tensor holds: 4 per f32 value (its own or its range of a store),
    /// 2 per bf16 value, plus 4 per value once a bf16 tensor was read as f32.
    pub fn bytes_held(&self) -> usize {
        let n = self.len();
        match &self.data {
            Storage::Owned(_) | Storage::Store(_) => 4 * n,
            Storage::Bf16 { wide, .. } => 2 * n + if wide.get().is_some() { 4 * n } else { 0 },
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `index` along the first dimension (the `shape[1..]` elements at `index`), as f32:
    /// borrowed from an f32 tensor, widened from a bf16 one without widening the rest (an
    /// embedding table's lookup). Panics if `index` is out of range, as slicing does.
    pub fn row(&self, index: usize) -> Cow<'_, [f32]> {
        let width: usize = self.shape.iter().skip(1).product();
        let range = index * width..(index + 1) * width;
        match &self.data {
            Storage::Bf16 { bits, wide } if wide.get().is_none() => Cow::Owned(widen(&bits[range])),
            _ => Cow::Borrowed(&self.data()[range]),
        }
    }

    /// The values in order as f32, without widening a bf16 tensor's storage.
    fn values(&self) -> Box<dyn Iterator<Item = f32> + '_> {
        match &self.data {
            Storage::Bf16 { bits, wide } if wide.get().is_none() => Box::new(bits.iter().map(|&h| bf16_to_f32(h))),
            _ => Box::new(self.data().iter().copied()),
        }
    }

    /// The id of the store holding the values and their range in it, if a store does.
    pub(crate) fn place(&self) -> Option<(u64, Range<usize>)> {
        match &self.data {
            Storage::Owned(_) | Storage::Bf16 { .. } => None,
            Storage::Store(s) => Some(s.place()),
        }
    }

    /// Moves the values to `slice`, which holds a copy of them (see `ParamStore::adopt`).
    pub(crate) fn set_store(&mut self, slice: StoreSlice) {
        debug_assert_eq!(slice.data(), self.data());
        self.data = Storage::Store(slice);
    }
}

/// `shape` back when its element count is `len`; else an error naming `name`.
fn check_count(name: &str, shape: Vec<usize>, len: usize) -> Result<Vec<usize>> {
    let needed = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if needed != Some(len) {
        return Err(AttnError::BadTensorData {
            name: name.to_string(),
            shape,
            needed: needed.unwrap_or(usize::MAX),
            len,
        });
    }
    Ok(shape)
}

/// bf16 bits widened to their f32 values (exact).
fn widen(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&h| bf16_to_f32(h)).collect()
}

/// The tensors `parts` stacked along their first dimension (each `[n_i, rest..]`) into
/// `[Σ n_i, rest..]`: bf16 bits when every part holds bf16 values, f32 values otherwise.
/// Fails, naming `name`, unless the parts agree past the first dimension.
pub fn concat_rows(name: &str, parts: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        return Tensor::new(name, vec![0], Vec::new());
    };
    let rest = &first.shape()[1.min(first.shape().len())..];
    if let Some(bad) = parts.iter().find(|t| t.shape().is_empty() || &t.shape()[1..] != rest) {
        return Err(AttnError::ShapeMismatch {
            op: "concatenate",
            tensor: name.to_string(),
            expected: format!(
                "[n, {}] parts",
                rest.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
            ),
            got: bad.shape().to_vec(),
        });
    }
    let mut shape = first.shape().to_vec();
    shape[0] = parts.iter().map(|t| t.shape()[0]).sum();
    match parts.iter().map(|t| t.bf16_bits()).collect::<Option<Vec<&[u16]>>>() {
        Some(bits) => Tensor::from_bf16_bits(name, shape, bits.concat()),
        None => Tensor::new(
            name,
            shape,
            parts.iter().flat_map(|t| t.data().iter().copied()).collect(),
        ),
    }
}

/// Named tensors, as `module.state_dict()` names them.
pub type StateDict = BTreeMap<String, Tensor>;

/// The first tensor of `dict` (in name order) holding a value that is not finite, as "tensor
/// `name` holds NaN at [i, j]" (BF16 bits read as the value they stand for); `None` when every
/// value is finite. Models that read weights from a file refuse such a file with it: a NaN
/// weight makes NaN of every output it reaches.
pub fn first_non_finite(dict: &StateDict) -> Option<String> {
    dict.iter().find_map(|(name, tensor)| {
        let (flat, value) = match tensor.bf16_bits() {
            Some(bits) => bits
                .iter()
                .position(|&b| b & 0x7f80 == 0x7f80)
                .map(|k| (k, f32::from_bits((bits[k] as u32) << 16))),
            None => tensor
                .data()
                .iter()
                .position(|v| !v.is_finite())
                .map(|k| (k, tensor.data()[k])),
        }?;
        let mut index = vec![0; tensor.shape().len()];
        let mut rest = flat;
        for (d, &n) in tensor.shape().iter().enumerate().rev() {
            index[d] = rest % n.max(1);
            rest /= n.max(1);
        }
        Some(format!("tensor `{name}` holds {value} at {index:?}"))
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use attn_kernels::f32_to_bf16;

    fn bf16_tensor(shape: Vec<usize>, seed: u64) -> Tensor {
        let n = shape.iter().product();
        let values = WeightInit::new(seed).uniform(vec![n], 1).into_data();
        let bits = values.iter().map(|&x| f32_to_bf16(x)).collect();
        Tensor::from_bf16_bits("t", shape, bits).unwrap()
    }

    /// A bf16 tensor reads as its exact f32 values, widens only when read as a whole, and
    /// becomes an f32 tensor when written.
    #[test]
    fn bf16_storage_widens_once_and_only_when_asked() {
        let t = bf16_tensor(vec![3, 4], 1);
        let want: Vec<f32> = t.bf16_bits().unwrap().iter().map(|&h| bf16_to_f32(h)).collect();
        assert_eq!((t.len(), t.bytes_held()), (12, 24));
        assert_eq!(&*t.row(1), &want[4..8]);
        let copy = t.clone();
        assert_eq!(t.bytes_held(), 24, "a row and a clone leave the storage as it is");
        assert_eq!(t.data(), &want[..]);
        assert_eq!(t.bytes_held(), 24 + 48, "the widened copy is kept beside the bits");
        assert!(matches!(t.row(2), Cow::Borrowed(_)));
        assert_eq!((copy.is_bf16(), copy.bytes_held()), (true, 24));
        assert_eq!(copy, t);
        assert_eq!(copy.clone().into_data(), want);
        let mut written = copy;
        written.data_mut()[0] = 5.0;
        assert!(!written.is_bf16() && written.bf16_bits().is_none());
        assert_eq!((written.data()[0], &written.data()[1..]), (5.0, &want[1..]));
        assert_eq!(written.bytes_held(), 48);
        let err = Tensor::from_bf16_bits("w", vec![2, 2], vec![0; 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains('w') && err.contains('3'), "{err}");
    }

    /// Equal means the same shape and the same values, whatever the storage; `Debug` shows
    /// both; an empty shape is empty.
    #[test]
    fn equality_looks_at_shape_and_values() {
        let t = Tensor::new("t", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(t, Tensor::new("u", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
        assert_ne!(t, Tensor::new("t", vec![4], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
        assert_ne!(t, Tensor::new("t", vec![2, 2], vec![1.0, 2.0, 3.0, 5.0]).unwrap());
        let bits = bf16_tensor(vec![2, 3], 4);
        let widened = Tensor::new("w", vec![2, 3], bits.clone().into_data()).unwrap();
        assert_eq!((bits.clone(), widened.clone()), (widened.clone(), bits.clone()));
        let mut moved = widened;
        moved.data_mut()[5] += 1.0;
        assert_ne!(bits, moved);
        assert_ne!(moved, bits);
        let shown = format!("{t:?}");
        assert!(
            shown.contains("shape: [2, 2]") && shown.contains("[1.0, 2.0, 3.0, 4.0]"),
            "{shown}"
        );
        assert!(!t.is_empty());
        assert!(Tensor::new("e", vec![3, 0], vec![]).unwrap().is_empty());
    }

    /// A submodule's state dict comes out without its prefix and goes back under it.
    #[test]
    fn prefixes_are_taken_off_and_put_back() {
        let t = |v: f32| Tensor::new("t", vec![1], vec![v]).unwrap();
        let mut dict: StateDict = [
            ("layers.0.w", 1.0),
            ("layers.0.b", 2.0),
            ("layers.1.w", 3.0),
            ("norm.w", 4.0),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), t(v)))
        .collect();
        let first = take_prefixed(&mut dict, "layers.0.");
        assert_eq!(first.keys().collect::<Vec<_>>(), ["b", "w"]);
        assert_eq!((first["w"].data(), first["b"].data()), (&[1.0][..], &[2.0][..]));
        assert_eq!(dict.keys().collect::<Vec<_>>(), ["layers.1.w", "norm.w"]);
        insert_prefixed(&mut dict, "layers.2.", first);
        assert_eq!(
            dict.keys().collect::<Vec<_>>(),
            ["layers.1.w", "layers.2.b", "layers.2.w", "norm.w"]
        );
        assert_eq!(dict["layers.2.b"].data(), &[2.0]);
    }

    /// Stacking keeps bf16 bits when every part has them, and f32 values otherwise.
    #[test]
    fn concat_rows_keeps_bf16_when_it_can() {
        let (a, b) = (bf16_tensor(vec![2, 3], 2), bf16_tensor(vec![1, 3], 3));
        let both = concat_rows("ab", &[&a, &b]).unwrap();
        assert_eq!((both.shape(), both.is_bf16()), (&[3, 3][..], true));
        assert_eq!(&both.bf16_bits().unwrap()[..6], a.bf16_bits().unwrap());
        let f = Tensor::new("f", vec![1, 3], vec![1.0, 2.0, 3.0]).unwrap();
        let mixed = concat_rows("af", &[&a, &f]).unwrap();
        assert!(!mixed.is_bf16());
        assert_eq!(&mixed.data()[..6], a.data());
        assert_eq!(&mixed.data()[6..], f.data());
        let err = concat_rows("bad", &[&a, &bf16_tensor(vec![2, 4], 4)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad") && err.contains("[2, 4]"), "{err}");
    }

    /// A weight's rows packed from its bits are the words of packing its widened values.
    #[test]
    fn packing_a_bf16_weight_reads_its_bits() {
        let w = bf16_tensor(vec![10, 7], 5);
        let widened = Tensor::new("w", vec![10, 7], w.clone().into_data()).unwrap();
        for rows in [0..10, 3..8, 4..4] {
            let from_bits = crate::pack_weight_of(&w, rows.clone()).unwrap();
            let from_values = crate::pack_weight_of(&widened, rows.clone()).unwrap();
            assert_eq!(from_bits.widened(), from_values.widened(), "{rows:?}");
            assert_eq!(from_bits.shape(), [7, rows.len()]);
        }
        assert_eq!(w.bytes_held(), 140, "packing did not widen");
        assert!(crate::pack_weight_of(&w, 8..11).is_err());
        assert!(crate::pack_weight_of(&bf16_tensor(vec![4], 6), 0..1).is_err());
    }
}
