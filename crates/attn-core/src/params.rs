//! One parameter store: a model's parameters in one contiguous, 64-byte-aligned f32 buffer.
//!
//! Training wants its state whole, as llm.c holds it: zeroing the gradients, their global norm,
//! the AdamW update, an all-reduce across processes and a bf16 copy of the weights are each one
//! pass over flat memory. [`ParamStore::adopt`] moves every parameter tensor of a module into
//! one buffer, in the module's state-dict order, each tensor starting on a 64-byte boundary;
//! the module keeps its [`Tensor`]s, which now read and write their range of that buffer, so
//! every forward and backward runs unchanged. The store's [`ParamLayout`] (name, shape and
//! range of each parameter, built once) gives gradients ([`Grads::for_store`](crate::Grads::for_store))
//! and optimizer moments the same layout.
//!
//! State-dict names are for checkpoints and errors: a module lists its parameters through
//! [`Parameters::visit_params`] with a [`ParamPath`] that is formatted only when a name is
//! asked for.
//!
//! # Ownership
//! Each range of the buffer belongs to exactly one tensor (cloning a tensor copies its values
//! out). The whole buffer is lent out only by [`ParamStore::flat_mut`], which takes the module
//! by `&mut` and first checks that the module still holds every one of the store's tensors, in
//! place: while the flat slice lives, nothing else can reach any part of the buffer.

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::{AttnError, Result, Tensor};

/// Floats per 64 bytes: every parameter starts on a multiple of this.
const ALIGN_FLOATS: usize = 16;
/// Floats per task of a flat pass: large enough to amortise a task, small enough to spread
/// a small model over two threads.
pub const FLAT_CHUNK: usize = 1 << 14;

/// A zero-initialised f32 buffer whose first element is 64-byte aligned.
pub struct AlignedBuf {
    ptr: NonNull<f32>,
    len: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively, as a `Box<[f32]>` does.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read, as for a `Box<[f32]>`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) } as *mut f32;
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.checked_mul(4).expect("a buffer that fits in memory"), 64)
            .expect("a buffer that fits in memory")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeros` with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len)) };
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `len` initialised floats (zeroed at allocation), owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut copy = AlignedBuf::zeros(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} floats)", self.len)
    }
}

/// The buffer a store's tensors share. Range `r` of it is read and written only by the one
/// tensor the store gave `r` to, or through [`ParamStore::flat_mut`] (see the module doc).
pub(crate) struct SharedBuf {
    id: u64,
    ptr: NonNull<f32>,
    len: usize,
    /// Owns the allocation; never dereferenced after construction (`ptr` is taken from it).
    _owner: AlignedBuf,
}

// SAFETY: the allocation is owned; access to its ranges follows the ownership rule above, which
// `&`/`&mut` of the owning tensors (or of the whole module) enforce.
unsafe impl Send for SharedBuf {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedBuf {}

impl fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBuf(#{}, {} floats)", self.id, self.len)
    }
}

/// A tensor's range of a store's buffer.
#[derive(Debug)]
pub(crate) struct StoreSlice {
    buf: Arc<SharedBuf>,
    offset: usize,
    len: usize,
}

impl StoreSlice {
    pub(crate) fn data(&self) -> &[f32] {
        // SAFETY: the range is inside the buffer and owned by the tensor holding `self`; a
        // shared borrow of that tensor excludes writers (the tensor's `&mut`, or a flat view,
        // which needs `&mut` of the module holding the tensor).
        unsafe { std::slice::from_raw_parts(self.buf.ptr.as_ptr().add(self.offset), self.len) }
    }

    pub(crate) fn data_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `data`; `&mut` of the owning tensor excludes every other access.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr.as_ptr().add(self.offset), self.len) }
    }

    /// The store's id and this tensor's range in it.
    pub(crate) fn place(&self) -> (u64, Range<usize>) {
        (self.buf.id, self.offset..self.offset + self.len)
    }
}

/// A parameter's state-dict name, as a path of parts formatted only when asked for: the
/// concatenation of its parts (`"transformer."`, `"encoder."`, `"layers."`, `"0."`,
/// `"self_attn."`, `"in_proj_weight"`).
#[derive(Debug, Clone, Copy)]
pub enum ParamPath<'p> {
    /// The prefix every name starts with (often `""`).
    Root(&'p str),
    /// A part after a path.
    Part(&'p ParamPath<'p>, &'p str),
    /// A list index after a path, written `"{i}."`.
    Index(&'p ParamPath<'p>, usize),
}

/// FNV-1a's offset basis: the hash of no bytes.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of `bytes`, continued from `hash`.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

impl ParamPath<'static> {
    /// The empty path: a module on its own.
    pub const ROOT: ParamPath<'static> = ParamPath::Root("");
}

impl<'p> ParamPath<'p> {
    /// FNV-1a (64-bit) of the path's text followed by `leaf`, without formatting it: the key of
    /// a dropout site (`"encoder.layers.0."` + `"dropout1"`), so each site draws its own stream
    /// of random numbers, the same as the hash of the whole name.
    pub fn hash_with(&self, leaf: &str) -> u64 {
        fnv1a(self.hash_from(FNV_OFFSET), leaf.as_bytes())
    }

    fn hash_from(&self, hash: u64) -> u64 {
        match self {
            ParamPath::Root(prefix) => fnv1a(hash, prefix.as_bytes()),
            ParamPath::Part(parent, part) => fnv1a(parent.hash_from(hash), part.as_bytes()),
            ParamPath::Index(parent, i) => {
                let mut digits = [0u8; 21];
                let mut at = digits.len() - 1;
                digits[at] = b'.';
                let mut n = *i;
                loop {
                    at -= 1;
                    digits[at] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                fnv1a(parent.hash_from(hash), &digits[at..])
            }
        }
    }

    /// This path followed by `part` (a submodule's `"norm1."` or a parameter's `"weight"`).
    pub fn join(&'p self, part: &'p str) -> ParamPath<'p> {
        ParamPath::Part(self, part)
    }

    /// This path followed by `"{i}."`.
    pub fn index(&'p self, i: usize) -> ParamPath<'p> {
        ParamPath::Index(self, i)
    }
}

impl fmt::Display for ParamPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamPath::Root(prefix) => f.write_str(prefix),
            ParamPath::Part(parent, part) => {
                parent.fmt(f)?;
                f.write_str(part)
            }
            ParamPath::Index(parent, i) => {
                parent.fmt(f)?;
                write!(f, "{i}.")
            }
        }
    }
}

/// A module whose parameters can be listed, in a fixed (state-dict) order.
pub trait Parameters {
    /// Calls `f` on every parameter, with its name under `path`, always in the same order.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor));

    /// Calls `f` on every parameter, as [`Parameters::visit_params`] does and in its order, to
    /// change the values in place, and keeps the module's precision: a module holding packed
    /// copies of its weights (bf16, [`crate::Precision`]) packs them again from the new values
    /// right after `f` has seen its own tensors, while they are still in cache, where
    /// `visit_params` drops them. Copies made on demand (bf16 `W` for the backward, the query,
    /// key and value parts of a fused matrix) are packed again only if the module held them.
    /// A module in bf16 ends with the copies that `visit_params`, then
    /// [`set_precision`](crate::MultiHeadAttention::set_precision) and the same later calls
    /// would have made from the new values, bit for bit; a module in f32 ends as
    /// `visit_params` leaves it.
    ///
    /// The default goes through `visit_params`, which drops packed copies: a module that holds
    /// them, or holds a module that does, overrides it. Errors come from packing.
    fn update_params(&mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor)) -> Result<()> {
        self.visit_params(path, &mut |p, t| f(p, t));
        Ok(())
    }

    /// Every parameter under `prefix` + its state-dict name (formats every name: for building
    /// stores, initialisation and tests, not for every step).
    fn params_mut(&mut self, prefix: &str) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        self.visit_params(&ParamPath::Root(prefix), &mut |path, t| out.push((path.to_string(), t)));
        out
    }
}

/// One parameter's place in a store.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// Its state-dict name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its floats in the buffer (starting on a 64-byte boundary).
    pub range: Range<usize>,
}

/// Where each parameter of a store lives: built once, shared by the gradients and the
/// optimizer's moments, which use the same ranges of buffers of the same length.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    by_name: HashMap<String, usize>,
    /// Entry indices in the order of their names (the order of a `BTreeMap` of gradients).
    name_order: Vec<usize>,
    len: usize,
}

impl ParamLayout {
    fn new(params: &[(String, Vec<usize>)]) -> Self {
        let mut entries = Vec::with_capacity(params.len());
        let mut at = 0usize;
        for (name, shape) in params {
            let n: usize = shape.iter().product();
            entries.push(ParamEntry {
                name: name.clone(),
                shape: shape.clone(),
                range: at..at + n,
            });
            at = (at + n).div_ceil(ALIGN_FLOATS) * ALIGN_FLOATS;
        }
        let by_name = entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        let mut name_order: Vec<usize> = (0..entries.len()).collect();
        name_order.sort_by(|&a, &b| entries[a].name.cmp(&entries[b].name));
        ParamLayout {
            entries,
            by_name,
            name_order,
            len: at,
        }
    }

    /// Every parameter, in the module's order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The parameter `name`.
    pub fn entry(&self, name: &str) -> Option<&ParamEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// Entry indices in the order of the names.
    pub fn name_order(&self) -> &[usize] {
        &self.name_order
    }

    /// Floats in a buffer of this layout (the parameters and the padding between them).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a module without parameters.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sum over parameters of their element counts (no padding).
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|e| e.range.len()).sum()
    }
}

static NEXT_STORE: AtomicU64 = AtomicU64::new(1);

/// A model's parameters in one buffer: see the module documentation.
#[derive(Debug, Clone)]
pub struct ParamStore {
    buf: Arc<SharedBuf>,
    layout: Arc<ParamLayout>,
}

impl Default for ParamStore {
    /// A store of no parameters.
    fn default() -> Self {
        let owner = AlignedBuf::zeros(0);
        ParamStore {
            buf: Arc::new(SharedBuf {
                id: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
                ptr: owner.ptr,
                len: 0,
                _owner: owner,
            }),
            layout: Arc::new(ParamLayout::new(&[])),
        }
    }
}

impl ParamStore {
    /// Moves every parameter of `module` into one new buffer, in its order, and points its
    /// tensors at their ranges; the values are unchanged, bit for bit.
    pub fn adopt<M: Parameters + ?Sized>(module: &mut M) -> ParamStore {
        let mut tensors: Vec<(String, &mut Tensor)> = Vec::new();
        module.visit_params(&ParamPath::Root(""), &mut |path, t| tensors.push((path.to_string(), t)));
        let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect();
        let layout = ParamLayout::new(&shapes);
        let mut owner = AlignedBuf::zeros(layout.len);
        for ((_, t), e) in tensors.iter().zip(&layout.entries) {
            owner[e.range.clone()].copy_from_slice(t.data());
        }
        let buf = Arc::new(SharedBuf {
            id: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            ptr: owner.ptr,
            len: owner.len,
            _owner: owner,
        });
        for ((_, t), e) in tensors.into_iter().zip(&layout.entries) {
            t.set_store(StoreSlice {
                buf: Arc::clone(&buf),
                offset: e.range.start,
                len: e.range.len(),
            });
        }
        ParamStore {
            buf,
            layout: Arc::new(layout),
        }
    }

    /// Where each parameter lives.
    pub fn layout(&self) -> &Arc<ParamLayout> {
        &self.layout
    }

    /// Identifies the buffer (gradients made for this store check it).
    pub(crate) fn id(&self) -> u64 {
        self.buf.id
    }

    /// The range of `tensor` if it lives in this store.
    pub fn range_of(&self, tensor: &Tensor) -> Option<Range<usize>> {
        tensor.place().filter(|(id, _)| *id == self.buf.id).map(|(_, r)| r)
    }

    /// Every parameter of `module` as one flat slice of this store's layout (padding zero),
    /// for a pass over all of them at once. Fails, naming the first tensor out of place, unless
    /// `module` is the module this store adopted and still holds each of its tensors in place.
    pub fn flat_mut<'m, M: Parameters + ?Sized>(&self, module: &'m mut M) -> Result<&'m mut [f32]> {
        let entries = &self.layout.entries;
        let mut k = 0usize;
        let mut misplaced: Option<String> = None;
        module.visit_params(&ParamPath::Root(""), &mut |path, t| {
            let expected = entries.get(k).map(|e| (self.buf.id, e.range.clone()));
            if misplaced.is_none() && t.place() != expected {
                misplaced = Some(path.to_string());
            }
            k += 1;
        });
        if let Some(name) = misplaced {
            return Err(AttnError::InvalidConfig {
                field: "parameter store",
                got: format!("`{name}` is not where the store put it"),
                expected: "the module the store adopted, holding each of its tensors".into(),
            });
        }
        if k != entries.len() {
            return Err(AttnError::InvalidConfig {
                field: "parameter store",
                got: format!("a module of {k} parameters"),
                expected: format!("the module the store adopted ({} parameters)", entries.len()),
            });
        }
        // SAFETY: every range of the buffer belongs to one tensor, and `module`, borrowed
        // exclusively for 'm, holds all of them (checked above): no other access to any part of
        // the buffer can happen while the slice lives. The padding belongs to no tensor.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.buf.ptr.as_ptr(), self.buf.len) })
    }
}

/// Runs `f` on matching `FLAT_CHUNK`-float chunks of `a` and `b` on rayon's threads (the same
/// elementwise work on any thread count).
pub fn flat_zip_mut(a: &mut [f32], b: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    a.par_chunks_mut(FLAT_CHUNK)
        .zip(b.par_chunks(FLAT_CHUNK))
        .for_each(|(a, b)| f(a, b));
}

/// Fills `a` with `value` on rayon's threads.
pub fn flat_fill(a: &mut [f32], value: f32) {
    a.par_chunks_mut(FLAT_CHUNK).for_each(|c| c.fill(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two {
        a: Tensor,
        b: Tensor,
    }

    impl Parameters for Two {
        fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
            f(&path.join("a"), &mut self.a);
            let sub = path.join("sub.");
            f(&sub.index(3).join("b"), &mut self.b);
        }
    }

    fn two() -> Two {
        Two {
            a: Tensor::new("a", vec![3], vec![1.0, 2.0, 3.0]).unwrap(),
            b: Tensor::new("b", vec![2, 2], vec![4.0, 5.0, 6.0, 7.0]).unwrap(),
        }
    }

    #[test]
    fn adopt_keeps_values_names_and_aligns_each_parameter() {
        let mut m = two();
        let store = ParamStore::adopt(&mut m);
        let names: Vec<&str> = store.layout().entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "sub.3.b"]);
        assert_eq!(store.layout().entry("sub.3.b").unwrap().range, 16..20);
        assert_eq!(store.layout().len(), 32);
        assert_eq!(store.layout().numel(), 7);
        assert_eq!(m.a.data(), &[1.0, 2.0, 3.0]);
        assert_eq!(m.b.data(), &[4.0, 5.0, 6.0, 7.0]);
        assert_eq!(m.b.shape(), &[2, 2]);
        assert_eq!(store.range_of(&m.b), Some(16..20));
        let flat = store.flat_mut(&mut m).unwrap();
        assert_eq!(flat.as_ptr() as usize % 64, 0);
        assert_eq!(&flat[..4], &[1.0, 2.0, 3.0, 0.0]);
        flat[17] = -1.0;
        assert_eq!(m.b.data(), &[4.0, -1.0, 6.0, 7.0]);
        m.a.data_mut()[0] = 9.0;
        assert_eq!(store.flat_mut(&mut m).unwrap()[0], 9.0);
    }

    #[test]
    fn a_clone_owns_its_values_and_the_store_refuses_a_changed_module() {
        let mut m = two();
        let store = ParamStore::adopt(&mut m);
        let copy = m.b.clone();
        assert_eq!(store.range_of(&copy), None);
        m.b.data_mut()[0] = 0.5;
        assert_eq!(copy.data()[0], 4.0);
        // A tensor swapped out of the module: the flat view is refused, naming it.
        let escaped = std::mem::replace(&mut m.b, copy);
        let err = store.flat_mut(&mut m).unwrap_err().to_string();
        assert!(err.contains("sub.3.b"), "{err}");
        m.b = escaped;
        assert!(store.flat_mut(&mut m).is_ok());
        // A second adoption moves the module out of the first store.
        let second = ParamStore::adopt(&mut m);
        assert!(store.flat_mut(&mut m).is_err());
        assert_eq!(second.flat_mut(&mut m).unwrap()[16], 0.5);
    }

    #[test]
    fn paths_format_as_state_dict_names() {
        let root = ParamPath::Root("transformer.");
        let layers = root.join("layers.");
        let layer = layers.index(2);
        assert_eq!(
            layer.join("norm1.").join("weight").to_string(),
            "transformer.layers.2.norm1.weight"
        );
    }

    /// The flat helpers reach every element, past whole chunks too, pairing `a[i]` with `b[i]`.
    #[test]
    fn flat_helpers_cover_every_element_in_place() {
        let n = 2 * FLAT_CHUNK + 5;
        let mut a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (2 * i) as f32 + 0.5).collect();
        flat_zip_mut(&mut a, &b, |a, b| a.iter_mut().zip(b).for_each(|(x, y)| *x += y));
        assert!(a.iter().enumerate().all(|(i, &x)| x == (3 * i) as f32 + 0.5));
        flat_fill(&mut a, -2.0);
        assert!(a.iter().all(|&x| x == -2.0));
    }

    /// A path's hash is FNV-1a (64-bit) of its whole name: the published test vectors, and
    /// list indices of one to twenty digits against the formatted name.
    #[test]
    fn path_hashes_are_fnv1a_of_the_names() {
        assert_eq!(ParamPath::ROOT.hash_with(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(ParamPath::ROOT.hash_with("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(ParamPath::ROOT.hash_with("foobar"), 0x8594_4171_f739_67e8);
        let name_hash = |name: &str| fnv1a(FNV_OFFSET, name.as_bytes());
        let root = ParamPath::Root("encoder.");
        let layers = root.join("layers.");
        for i in [0, 7, 10, 99, 1234, usize::MAX] {
            let layer = layers.index(i);
            let name = format!("encoder.layers.{i}.dropout1");
            assert_eq!(layer.hash_with("dropout1"), name_hash(&name), "{name}");
            assert_eq!(format!("{layer}dropout1"), name);
        }
    }
}
