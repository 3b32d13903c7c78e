//! Gradient buffers: one flat buffer in a [`ParamStore`]'s layout, or buffers by name.
//!
//! A backward pass **adds** into the gradient of each parameter it reads, so gradients of a
//! parameter used twice sum and micro-batches accumulate. [`Grads::for_store`] makes one
//! 64-byte-aligned buffer of the store's layout: a backward finds a parameter's gradient from
//! the tensor itself (its range in the store), with no name built or looked up, and zeroing,
//! clipping and the optimizer are each one pass over flat memory. [`Grads::new`] keeps buffers
//! by state-dict name, created zeroed the first time a backward adds to them, for a module
//! outside any store (tests, `attn run --backward`). Either way the gradients read back by name
//! ([`Grads::get`], [`Grads::iter`]), and [`Grads::zero`] clears every buffer for the next step
//! and keeps the memory.
//!
//! A backward that returns an error may already have added part of its sums (a model's
//! backward runs layer by layer, each adding as it goes): zero the gradients before using them
//! again. `attn train` ends the run on such an error, before any update.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::params::{flat_fill, AlignedBuf, ParamLayout, ParamPath, ParamStore, FLAT_CHUNK};
use crate::{AttnError, Result, StateDict, Tensor};

/// Gradients of a model's parameters.
#[derive(Debug, Clone, Default)]
pub struct Grads {
    /// Buffers by name (a module outside any store).
    map: BTreeMap<String, Tensor>,
    /// The flat buffer of a store's layout.
    flat: Option<FlatGrads>,
}

#[derive(Debug, Clone)]
struct FlatGrads {
    store: u64,
    layout: Arc<ParamLayout>,
    buf: AlignedBuf,
}

/// A gradient read back by name: its shape and values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradRef<'g> {
    shape: &'g [usize],
    data: &'g [f32],
}

impl<'g> GradRef<'g> {
    /// The parameter's shape.
    pub fn shape(&self) -> &'g [usize] {
        self.shape
    }

    /// The values.
    pub fn data(&self) -> &'g [f32] {
        self.data
    }

    /// An owned copy.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::new("gradient", self.shape.to_vec(), self.data.to_vec()).expect("the layout's shape")
    }
}

impl Grads {
    /// No buffers yet: each is made, by name, the first time a backward adds to it.
    pub fn new() -> Self {
        Grads::default()
    }

    /// One zeroed flat buffer in the layout of `store`, for the module it adopted.
    pub fn for_store(store: &ParamStore) -> Self {
        Grads {
            map: BTreeMap::new(),
            flat: Some(FlatGrads {
                store: store.id(),
                layout: Arc::clone(store.layout()),
                buf: AlignedBuf::zeros(store.layout().len()),
            }),
        }
    }

    /// Sets every buffer to zero (keeping it), as `optimizer.zero_grad(set_to_none=False)`.
    pub fn zero(&mut self) {
        if let Some(f) = &mut self.flat {
            flat_fill(&mut f.buf, 0.0);
        }
        for t in self.map.values_mut() {
            t.data_mut().fill(0.0);
        }
    }

    /// The flat buffer and its layout, for gradients made by [`Grads::for_store`].
    pub fn flat(&self) -> Option<(&Arc<ParamLayout>, &[f32])> {
        self.flat.as_ref().map(|f| (&f.layout, &f.buf[..]))
    }

    /// The flat buffer, mutably (to reduce it across processes, say).
    pub fn flat_mut(&mut self) -> Option<&mut [f32]> {
        self.flat.as_mut().map(|f| &mut f.buf[..])
    }

    /// True when these gradients are the flat buffer of `store`.
    pub fn is_for(&self, store: &ParamStore) -> bool {
        self.flat.as_ref().is_some_and(|f| f.store == store.id())
    }

    /// The gradient of `name`.
    pub fn get(&self, name: &str) -> Option<GradRef<'_>> {
        if let Some(f) = &self.flat {
            if let Some(e) = f.layout.entry(name) {
                return Some(GradRef {
                    shape: &e.shape,
                    data: &f.buf[e.range.clone()],
                });
            }
        }
        self.map.get(name).map(|t| GradRef {
            shape: t.shape(),
            data: t.data(),
        })
    }

    /// Every gradient, in the order of the names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, GradRef<'_>)> {
        self.names().into_iter().map(|n| (n, self.get(n).expect("listed")))
    }

    /// Every gradient's values, mutably, in the order of the names.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut [f32])> {
        let mut out: Vec<(&str, &mut [f32])> = self.map.iter_mut().map(|(n, t)| (n.as_str(), t.data_mut())).collect();
        if let Some(f) = &mut self.flat {
            let mut rest: &mut [f32] = &mut f.buf;
            let mut at = 0usize;
            for e in f.layout.entries() {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(e.range.start - at);
                let (mine, tail) = tail.split_at_mut(e.range.len());
                out.push((e.name.as_str(), mine));
                rest = tail;
                at = e.range.end;
            }
        }
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.into_iter()
    }

    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.map.keys().map(String::as_str).collect();
        if let Some(f) = &self.flat {
            names.extend(f.layout.entries().iter().map(|e| e.name.as_str()));
        }
        names.sort_unstable();
        names
    }

    /// How many gradients there are.
    pub fn len(&self) -> usize {
        self.map.len() + self.flat.as_ref().map_or(0, |f| f.layout.entries().len())
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gradients as a state dict (for saving, or for `grad.NAME` outputs).
    pub fn into_state_dict(self) -> StateDict {
        let mut dict = StateDict::new();
        for (name, g) in self.iter() {
            dict.insert(name.to_string(), g.to_tensor());
        }
        dict
    }

    /// The global 2-norm of every gradient, as `torch.nn.utils.clip_grad_norm_` computes it (the
    /// norm of the per-parameter norms, in f64, parameters in the order of their names), and
    /// every gradient scaled by `min(1, max_norm / (norm + 1e-6))`. Returns the norm before
    /// clipping. One pass over flat memory on rayon's threads; the same bits on any thread
    /// count.
    pub fn clip_norm(&mut self, max_norm: f32) -> f32 {
        let mut all: Vec<&mut [f32]> = self.iter_mut().map(|(_, g)| g).collect();
        clip_grad_norm(&mut all, max_norm)
    }

    /// The gradient of `param`, whose state-dict name is `path` + `name`: its range of the
    /// flat buffer when `param` lives in the store these gradients were made for (no name is
    /// built), else the buffer of that name (see [`Grads::slot`]).
    pub fn of(&mut self, param: &Tensor, path: &ParamPath<'_>, name: &str) -> Result<&mut [f32]> {
        if let Some(range) = self.flat_range(param) {
            let f = self.flat.as_mut().expect("a flat range");
            return Ok(&mut f.buf[range]);
        }
        self.slot(&format!("{path}{name}"), param.shape())
    }

    /// The gradients of a weight and, when the module has one, its bias: see [`Grads::of`].
    pub fn of_weight_and_bias(
        &mut self,
        path: &ParamPath<'_>,
        weight: (&Tensor, &str),
        bias: Option<(&Tensor, &str)>,
    ) -> Result<(&mut [f32], Option<&mut [f32]>)> {
        let Some((b, b_name)) = bias else {
            return Ok((self.of(weight.0, path, weight.1)?, None));
        };
        if let (Some(w), Some(bias)) = (self.flat_range(weight.0), self.flat_range(b)) {
            let f = self.flat.as_mut().expect("a flat range");
            let (dw, db) = two_ranges(&mut f.buf, w, bias)?;
            return Ok((dw, Some(db)));
        }
        let (dw, db) = self.slot_pair(
            (&format!("{path}{}", weight.1), weight.0.shape()),
            (&format!("{path}{b_name}"), b.shape()),
        )?;
        Ok((dw, Some(db)))
    }

    /// The range of `param` in the flat buffer, if it lives in the store of these gradients.
    fn flat_range(&self, param: &Tensor) -> Option<std::ops::Range<usize>> {
        let f = self.flat.as_ref()?;
        let (id, range) = param.place()?;
        (id == f.store).then_some(range)
    }

    /// The buffer `name` of `shape`: in flat gradients, that parameter's range (an unknown name
    /// or another shape is an error naming it); otherwise created zeroed if absent, and an
    /// existing buffer of another shape is an error naming it.
    pub fn slot(&mut self, name: &str, shape: &[usize]) -> Result<&mut [f32]> {
        let Grads { map, flat } = self;
        if let Some(f) = flat {
            let e = f.layout.entry(name).ok_or_else(|| not_in_layout(name))?;
            check_shape(name, &e.shape, shape)?;
            let range = e.range.clone();
            return Ok(&mut f.buf[range]);
        }
        ensure(map, name, shape)?;
        Ok(map.get_mut(name).expect("ensured").data_mut())
    }

    /// Two distinct buffers at once (a weight and its bias): see [`Grads::slot`].
    pub fn slot_pair(&mut self, a: (&str, &[usize]), b: (&str, &[usize])) -> Result<(&mut [f32], &mut [f32])> {
        if a.0 == b.0 {
            return Err(AttnError::InvalidConfig {
                field: "gradient",
                got: format!("`{}` as both buffers", a.0),
                expected: "two different parameters".into(),
            });
        }
        let Grads { map, flat } = self;
        if let Some(f) = flat {
            let range = |(name, shape): (&str, &[usize])| -> Result<std::ops::Range<usize>> {
                let e = f.layout.entry(name).ok_or_else(|| not_in_layout(name))?;
                check_shape(name, &e.shape, shape)?;
                Ok(e.range.clone())
            };
            let (ra, rb) = (range(a)?, range(b)?);
            return two_ranges(&mut f.buf, ra, rb);
        }
        ensure(map, a.0, a.1)?;
        ensure(map, b.0, b.1)?;
        let (mut first, mut second) = (None, None);
        for (name, t) in map.iter_mut() {
            if name == a.0 {
                first = Some(t.data_mut());
            } else if name == b.0 {
                second = Some(t.data_mut());
            }
        }
        Ok((first.expect("ensured"), second.expect("ensured")))
    }

    /// The buffers of a weight and, when the module has one, its bias: see [`Grads::slot`].
    pub fn weight_and_bias(
        &mut self,
        weight: (&str, &[usize]),
        bias: Option<(&str, &[usize])>,
    ) -> Result<(&mut [f32], Option<&mut [f32]>)> {
        match bias {
            Some(bias) => {
                let (w, b) = self.slot_pair(weight, bias)?;
                Ok((w, Some(b)))
            }
            None => Ok((self.slot(weight.0, weight.1)?, None)),
        }
    }
}

/// The buffer `name` of `map`, created zeroed if absent; one of another shape is an error.
fn ensure(map: &mut BTreeMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<()> {
    match map.get(name) {
        Some(t) => check_shape(name, t.shape(), shape),
        None => {
            map.insert(name.to_string(), Tensor::zeros(shape.to_vec()));
            Ok(())
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_` over `grads` in the order given: the 2-norm of all of them
/// together (the norm of the per-tensor norms, each summed in f64 by
/// `attn_kernels::sum_of_squares`), and every element scaled by
/// `min(1, max_norm / (norm + 1e-6))`. Returns the norm before clipping. The tensors'
/// norms and the scaling run on rayon's threads; the bits do not depend on the thread count.
///
/// ```
/// let (mut a, mut b) = (vec![3.0f32, 0.0], vec![4.0f32]);
/// let norm = attn_core::clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
/// assert_eq!(norm, 5.0);
/// assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6);
/// ```
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let norms: Vec<f64> = grads
        .par_iter()
        .map(|g| attn_kernels::sum_of_squares(g).sqrt())
        .collect();
    let total = norms.iter().map(|n| n * n).sum::<f64>().sqrt() as f32;
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    for g in grads.iter_mut() {
        g.par_chunks_mut(FLAT_CHUNK)
            .for_each(|c| c.iter_mut().for_each(|x| *x *= coef));
    }
    total
}

/// Two disjoint ranges of `buf`, mutably, in the order asked; one range twice is an error
/// (a weight given as its own bias).
fn two_ranges(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> Result<(&mut [f32], &mut [f32])> {
    if !(a.end <= b.start || b.end <= a.start) {
        return Err(AttnError::InvalidConfig {
            field: "gradient",
            got: "one parameter as both weight and bias".into(),
            expected: "two different parameters".into(),
        });
    }
    Ok(if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b])
    })
}

fn check_shape(name: &str, have: &[usize], asked: &[usize]) -> Result<()> {
    if have == asked {
        return Ok(());
    }
    Err(AttnError::ShapeMismatch {
        op: "backward",
        tensor: format!("gradient of {name}"),
        expected: format!("{asked:?}"),
        got: have.to_vec(),
    })
}

fn not_in_layout(name: &str) -> AttnError {
    AttnError::InvalidConfig {
        field: "gradient",
        got: format!("`{name}`, which is not a parameter of the store these gradients were made for"),
        expected: "a parameter of the module the store adopted".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_created_zeroed_and_keep_what_is_added() {
        let mut g = Grads::new();
        g.slot("w", &[2, 2]).unwrap()[3] += 1.5;
        g.slot("w", &[2, 2]).unwrap()[3] += 1.0;
        assert_eq!(g.get("w").unwrap().data(), &[0.0, 0.0, 0.0, 2.5]);
        let (w, b) = g.slot_pair(("w", &[2, 2]), ("b", &[2])).unwrap();
        w[0] = 1.0;
        b[1] = 2.0;
        assert_eq!(g.get("b").unwrap().data(), &[0.0, 2.0]);
        assert!(matches!(g.slot("w", &[4]), Err(AttnError::ShapeMismatch { .. })));
        g.zero();
        assert!(g.iter().all(|(_, t)| t.data().iter().all(|&x| x == 0.0)));
        assert_eq!(g.len(), 2);
    }

    struct Lin {
        w: Tensor,
        b: Tensor,
    }

    impl crate::Parameters for Lin {
        fn visit_params<'a>(
            &'a mut self,
            path: &crate::ParamPath<'_>,
            f: &mut dyn FnMut(&crate::ParamPath<'_>, &'a mut Tensor),
        ) {
            f(&path.join("weight"), &mut self.w);
            f(&path.join("bias"), &mut self.b);
        }
    }

    #[test]
    fn flat_gradients_are_found_from_the_tensors_and_read_back_by_name() {
        let mut m = Lin {
            w: Tensor::zeros(vec![2, 3]),
            b: Tensor::zeros(vec![2]),
        };
        let store = ParamStore::adopt(&mut m);
        let mut g = Grads::for_store(&store);
        assert!(g.is_for(&store));
        let (dw, db) = g
            .of_weight_and_bias(&ParamPath::ROOT, (&m.w, "weight"), Some((&m.b, "bias")))
            .unwrap();
        dw[5] += 3.0;
        db.unwrap()[0] += 4.0;
        assert_eq!(g.get("weight").unwrap().data(), &[0.0, 0.0, 0.0, 0.0, 0.0, 3.0]);
        assert_eq!(g.get("bias").unwrap().shape(), &[2]);
        let names: Vec<&str> = g.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bias", "weight"]);
        // By name too, with the layout's shapes checked; unknown names are errors.
        g.slot("bias", &[2]).unwrap()[1] += 1.0;
        assert!(g.slot("bias", &[3]).is_err());
        assert!(g.slot("other", &[2]).is_err());
        // The norm of the per-parameter norms, as clip_grad_norm_; 5 → clipped to 1.
        let norm = g.clip_norm(1.0);
        assert!((norm - (9.0f32 + 16.0 + 1.0).sqrt()).abs() < 1e-6);
        let (_, flat) = g.flat().unwrap();
        let clipped: f64 = flat.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!((clipped.sqrt() - 1.0).abs() < 1e-6);
        assert_eq!((g.len(), g.is_empty()), (2, false));
        assert!(Grads::new().is_empty());
        // A module outside the store finds its gradients by name.
        let outside = Tensor::zeros(vec![2]);
        g.of(&outside, &ParamPath::ROOT, "bias").unwrap()[0] = 7.0;
        assert_eq!(g.get("bias").unwrap().data()[0], 7.0);
        g.zero();
        assert!(g.flat().unwrap().1.iter().all(|&x| x == 0.0));
        // One tensor as its own bias, or one name twice: errors, not panics.
        let err = g.of_weight_and_bias(&ParamPath::ROOT, (&m.w, "weight"), Some((&m.w, "bias")));
        assert!(matches!(err, Err(AttnError::InvalidConfig { .. })));
        assert!(g.slot_pair(("bias", &[2]), ("bias", &[2])).is_err());
        assert!(Grads::new().slot_pair(("b", &[2]), ("b", &[2])).is_err());
    }

    /// The flat buffer written through `flat_mut` (as a cross-process reduction does) reads
    /// back by name; `is_for` is true for that store only; `into_state_dict` keeps every name,
    /// shape and value; `weight_and_bias` hands out the right buffers by name, flat or not.
    #[test]
    fn flat_buffers_by_name_and_as_a_state_dict() {
        let mut m = Lin {
            w: Tensor::zeros(vec![2, 3]),
            b: Tensor::zeros(vec![2]),
        };
        let store = ParamStore::adopt(&mut m);
        let mut g = Grads::for_store(&store);
        let len = store.layout().len();
        let flat = g.flat_mut().unwrap();
        assert_eq!(flat.len(), len);
        for (i, x) in flat.iter_mut().enumerate() {
            *x = i as f32;
        }
        let (w, b) = (
            store.layout().entry("weight").unwrap(),
            store.layout().entry("bias").unwrap(),
        );
        let expect = |r: &std::ops::Range<usize>| r.clone().map(|i| i as f32).collect::<Vec<f32>>();
        assert_eq!(g.get("weight").unwrap().data(), expect(&w.range));
        assert_eq!(g.get("bias").unwrap().data(), expect(&b.range));
        assert!(Grads::new().flat_mut().is_none());
        // Another store of the same shapes is not this one; by-name gradients are for none.
        let mut other = Lin {
            w: Tensor::zeros(vec![2, 3]),
            b: Tensor::zeros(vec![2]),
        };
        let other_store = ParamStore::adopt(&mut other);
        assert!(g.is_for(&store) && !g.is_for(&other_store));
        assert!(!Grads::new().is_for(&store));
        // weight_and_bias, flat: the layout's ranges; a bias-less call gives the weight alone.
        let (dw, db) = g.weight_and_bias(("weight", &[2, 3]), Some(("bias", &[2]))).unwrap();
        assert_eq!(
            (dw.to_vec(), db.unwrap().to_vec()),
            (expect(&w.range), expect(&b.range))
        );
        let (dw, db) = g.weight_and_bias(("weight", &[2, 3]), None).unwrap();
        assert_eq!((dw.to_vec(), db.is_none()), (expect(&w.range), true));
        assert!(g.weight_and_bias(("weight", &[3, 2]), None).is_err());
        let dict = g.into_state_dict();
        assert_eq!(dict.len(), 2);
        assert_eq!(dict["weight"].shape(), &[2, 3]);
        assert_eq!(dict["weight"].data(), expect(&w.range));
        assert_eq!(dict["bias"].data(), expect(&b.range));
        // By name: created zeroed, then kept; the pair is two distinct buffers.
        let mut g = Grads::new();
        let (dw, db) = g.weight_and_bias(("w", &[2, 2]), Some(("b", &[2]))).unwrap();
        assert_eq!((dw.len(), db.as_ref().map(|b| b.len())), (4, Some(2)));
        dw[1] = 2.0;
        db.unwrap()[0] = 3.0;
        g.weight_and_bias(("w", &[2, 2]), None).unwrap().0[2] = 5.0;
        let dict = g.into_state_dict();
        assert_eq!(dict["w"].data(), &[0.0, 2.0, 5.0, 0.0]);
        assert_eq!(dict["b"].data(), &[3.0, 0.0]);
    }

    /// The clip coefficient is `max_norm / (total + 1e-6)`, as in `clip_grad_norm_`: the
    /// 1e-6 shows on gradients whose norm is near it.
    #[test]
    fn clipping_small_gradients_adds_pytorchs_epsilon() {
        let (mut a, mut b) = (vec![3e-6f32], vec![4e-6f32]);
        let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1e-6);
        assert!((norm - 5e-6).abs() < 1e-12);
        let coef = 1e-6 / (5e-6 + 1e-6);
        assert!(
            (a[0] - 3e-6 * coef).abs() < 1e-12 && (b[0] - 4e-6 * coef).abs() < 1e-12,
            "{a:?} {b:?}"
        );
    }
}
