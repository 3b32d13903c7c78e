//! The KV cache for incremental decoding: keys and values of past positions, preallocated and
//! grown by doubling, never reallocated per step.
//!
//! Layout: `k: [B, G, capacity, D]`, `v: [B, G, capacity, Dv]`; the first `len` positions are
//! filled. Views of the filled part go straight to the kernels.
//!
//! A cache holds f32 values, or, made in [`Precision::Bf16`] (as a bf16 module's
//! [`crate::MultiHeadAttention::new_cache`] makes it), bf16 bits: each appended key and value
//! rounded to bf16 ([`attn_kernels::f32_to_bf16`]), at half the bytes. A bf16 module rounds
//! keys and values to bf16 as attention reads them anyway, so its outputs are the same bits
//! with either cache; decoding reads the bf16 bits in place ([`attn_kernels::attention_bf16_kv`]),
//! so each step streams half the bytes.

use attn_kernels::{bf16_to_f32, f32_to_bf16, Precision, View4};

use crate::error::shape_error;
use crate::Result;

/// Cached keys and values of one attention module.
///
/// ```
/// use attn_core::prelude::*;
/// let mha = MultiHeadAttention::with_seed(MhaConfig::new(16, 4), 0).unwrap();
/// let mut cache = mha.new_cache(1, 8); // one sequence, room for 8 positions (grows if needed)
/// for token in [[0.1f32; 16], [0.2; 16], [0.3; 16]] {
///     let x = Sequence::batch_first(&token, 1, 1, 16);
///     // Appends the token's key and value, then attends to every cached position.
///     mha.forward_append(x, &mut cache, &MhaOptions::default(), Par::Seq).unwrap();
/// }
/// assert_eq!(cache.len(), 3);
/// ```
#[derive(Debug, Clone)]
pub struct KvCache {
    batch: usize,
    n_kv_heads: usize,
    head_dim: usize,
    v_head_dim: usize,
    capacity: usize,
    len: usize,
    k: Store,
    v: Store,
}

/// The elements of a cache's keys or values.
#[derive(Debug, Clone)]
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

/// The filled part of a cache's keys or values, `[B, G, len, D]`: f32 values, or bf16 bits
/// ([`KvCache::new_in`]).
#[derive(Debug, Clone, Copy)]
pub enum KvView<'a> {
    /// f32 values.
    F32(View4<'a, f32>),
    /// bf16 bits, the upper halves of f32 values.
    Bf16(View4<'a, u16>),
}

impl KvView<'_> {
    /// `[B, G, len, D]`.
    pub fn shape(&self) -> [usize; 4] {
        match self {
            KvView::F32(view) => view.shape(),
            KvView::Bf16(view) => view.shape(),
        }
    }

    /// The value at `index` (widened exactly from bf16).
    pub fn get(&self, index: [usize; 4]) -> f32 {
        match self {
            KvView::F32(view) => view.get(index),
            KvView::Bf16(view) => bf16_to_f32(view.get(index)),
        }
    }

    /// The values, contiguous `[B, G, len, D]` (widened exactly from bf16).
    pub fn to_f32(&self) -> Vec<f32> {
        let [b, g, t, d] = self.shape();
        let mut out = Vec::with_capacity(b * g * t * d);
        for i in 0..b {
            for j in 0..g {
                for r in 0..t {
                    out.extend((0..d).map(|c| self.get([i, j, r, c])));
                }
            }
        }
        out
    }
}

impl KvCache {
    /// An empty f32 cache for `batch` sequences of `n_kv_heads` heads, with room for `capacity`
    /// positions before it first grows.
    pub fn new(batch: usize, n_kv_heads: usize, head_dim: usize, v_head_dim: usize, capacity: usize) -> Self {
        Self::new_in(Precision::F32, batch, n_kv_heads, head_dim, v_head_dim, capacity)
    }

    /// [`KvCache::new`] holding `precision`'s elements: f32 values, or in `Bf16` the bits of
    /// each appended value rounded to bf16 (half the bytes).
    pub fn new_in(
        precision: Precision,
        batch: usize,
        n_kv_heads: usize,
        head_dim: usize,
        v_head_dim: usize,
        capacity: usize,
    ) -> Self {
        let store = |d: usize| {
            let n = batch * n_kv_heads * capacity * d;
            match precision {
                Precision::F32 => Store::F32(vec![0.0; n]),
                Precision::Bf16 => Store::Bf16(vec![0; n]),
            }
        };
        KvCache {
            batch,
            n_kv_heads,
            head_dim,
            v_head_dim,
            capacity,
            len: 0,
            k: store(head_dim),
            v: store(v_head_dim),
        }
    }

    /// What the cache holds: f32 values or bf16 bits.
    pub fn precision(&self) -> Precision {
        match self.k {
            Store::F32(_) => Precision::F32,
            Store::Bf16(_) => Precision::Bf16,
        }
    }

    /// The bytes of its keys and values, the capacity's (not only the filled positions).
    pub fn size_in_bytes(&self) -> usize {
        let elements = self.batch * self.n_kv_heads * self.capacity * (self.head_dim + self.v_head_dim);
        elements
            * match self.precision() {
                Precision::F32 => 4,
                Precision::Bf16 => 2,
            }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that fit before the cache grows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `[B, G, D, Dv]` of the cache.
    pub fn dims(&self) -> [usize; 4] {
        [self.batch, self.n_kv_heads, self.head_dim, self.v_head_dim]
    }

    /// Forgets every position, keeping the memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// `[B, G, len, D]`: the cached keys.
    pub fn keys(&self) -> KvView<'_> {
        self.view(&self.k, self.head_dim)
    }

    /// `[B, G, len, Dv]`: the cached values.
    pub fn values(&self) -> KvView<'_> {
        self.view(&self.v, self.v_head_dim)
    }

    fn view<'a>(&self, store: &'a Store, d: usize) -> KvView<'a> {
        let c = self.capacity;
        let shape = [self.batch, self.n_kv_heads, self.len, d];
        let strides = [self.n_kv_heads * c * d, c * d, d, 1];
        const IN_BOUNDS: &str = "the cache's own layout is in bounds";
        match store {
            Store::F32(data) => KvView::F32(View4::new(data, shape, strides).expect(IN_BOUNDS)),
            Store::Bf16(data) => KvView::Bf16(View4::new(data, shape, strides).expect(IN_BOUNDS)),
        }
    }

    /// Appends `k_new: [B, G, n, D]` and `v_new: [B, G, n, Dv]` (any strides), rounded to bf16
    /// in a bf16 cache; grows the capacity to at least double when they do not fit.
    pub fn append(&mut self, k_new: View4<'_, f32>, v_new: View4<'_, f32>) -> Result<()> {
        let n = k_new.shape()[2];
        let want_k = [self.batch, self.n_kv_heads, n, self.head_dim];
        let want_v = [self.batch, self.n_kv_heads, n, self.v_head_dim];
        if k_new.shape() != want_k {
            return Err(shape_error(
                "kv_cache.append",
                "k",
                format!("{want_k:?}"),
                &k_new.shape(),
            ));
        }
        if v_new.shape() != want_v {
            return Err(shape_error(
                "kv_cache.append",
                "v",
                format!("{want_v:?}"),
                &v_new.shape(),
            ));
        }
        if self.len + n > self.capacity {
            self.grow((self.len + n).max(2 * self.capacity));
        }
        // Positions `len .. len + n` of every `(b, g)`: `[B, G, capacity, d]` row-major.
        fn copy_in<T>(buf: &mut [T], src: View4<'_, f32>, [c, len]: [usize; 2], convert: impl Fn(f32) -> T) {
            let [b_n, g_n, n, d] = src.shape();
            for b in 0..b_n {
                for g in 0..g_n {
                    for i in 0..n {
                        let dst = ((b * g_n + g) * c + len + i) * d;
                        for (j, x) in buf[dst..dst + d].iter_mut().enumerate() {
                            *x = convert(src.get([b, g, i, j]));
                        }
                    }
                }
            }
        }
        let at = [self.capacity, self.len];
        for (store, src) in [(&mut self.k, k_new), (&mut self.v, v_new)] {
            match store {
                Store::F32(buf) => copy_in(buf, src, at, |x| x),
                Store::Bf16(buf) => copy_in(buf, src, at, f32_to_bf16),
            }
        }
        self.len += n;
        Ok(())
    }

    /// Batch row `i` becomes a copy of the old row `rows[i]` (beam search keeps the caches of
    /// the hypotheses it extends); rows past `rows.len()` copy `rows[0]`. An index past the
    /// batch is an error naming it, and so is an empty `rows` (no row to copy from; before,
    /// it left the cache as it was) or one longer than the batch.
    pub fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() || rows.len() > self.batch {
            return Err(crate::AttnError::InvalidConfig {
                field: "cache rows",
                got: format!("{} row indices", rows.len()),
                expected: format!("1 to {} row indices", self.batch),
            });
        }
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(crate::AttnError::InvalidConfig {
                field: "cache rows",
                got: bad.to_string(),
                expected: format!("below the batch size {}", self.batch),
            });
        }
        // Only the filled positions move (those past `len` are never read): each new row's
        // heads gathered from its source, then written back in place.
        fn reorder_rows<T: Copy>(buf: &mut [T], [batch, heads, slot, filled]: [usize; 4], rows: &[usize]) {
            if filled == 0 {
                return;
            }
            let mut kept = Vec::with_capacity(batch * heads * filled);
            for b in 0..batch {
                let from = *rows.get(b).unwrap_or(&rows[0]);
                for h in 0..heads {
                    let start = (from * heads + h) * slot;
                    kept.extend_from_slice(&buf[start..start + filled]);
                }
            }
            for (bh, part) in kept.chunks_exact(filled).enumerate() {
                buf[bh * slot..bh * slot + filled].copy_from_slice(part);
            }
        }
        for (store, d) in [(&mut self.k, self.head_dim), (&mut self.v, self.v_head_dim)] {
            let sizes = [self.batch, self.n_kv_heads, self.capacity * d, self.len * d];
            match store {
                Store::F32(buf) => reorder_rows(buf, sizes, rows),
                Store::Bf16(buf) => reorder_rows(buf, sizes, rows),
            }
        }
        Ok(())
    }

    fn grow(&mut self, capacity: usize) {
        fn grown<T: Copy + Default>(buf: &[T], bgs: usize, [old, new, len, d]: [usize; 4]) -> Vec<T> {
            let mut bigger = vec![T::default(); bgs * new * d];
            for bg in 0..bgs {
                let src = &buf[bg * old * d..bg * old * d + len * d];
                bigger[bg * new * d..bg * new * d + len * d].copy_from_slice(src);
            }
            bigger
        }
        let (bgs, old) = (self.batch * self.n_kv_heads, self.capacity);
        for (store, d) in [(&mut self.k, self.head_dim), (&mut self.v, self.v_head_dim)] {
            let sizes = [old, capacity, self.len, d];
            *store = match store {
                Store::F32(buf) => Store::F32(grown(buf, bgs, sizes)),
                Store::Bf16(buf) => Store::Bf16(grown(buf, bgs, sizes)),
            };
        }
        self.capacity = capacity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_grows_by_doubling_and_keeps_contents() {
        let mut cache = KvCache::new(2, 1, 2, 3, 2);
        for step in 0..5 {
            let k: Vec<f32> = (0..2 * 2).map(|i| (step * 10 + i) as f32).collect();
            let v: Vec<f32> = (0..2 * 3).map(|i| (step * 100 + i) as f32).collect();
            cache
                .append(
                    View4::contiguous(&k, [2, 1, 1, 2]).unwrap(),
                    View4::contiguous(&v, [2, 1, 1, 3]).unwrap(),
                )
                .unwrap();
        }
        assert_eq!(cache.len(), 5);
        assert_eq!(cache.capacity(), 8);
        assert_eq!(cache.keys().get([1, 0, 3, 1]), 33.0);
        assert_eq!(cache.values().get([0, 0, 4, 2]), 402.0);
        let bad = [0.0f32; 4];
        let values = cache.values().to_f32();
        let v_view = View4::contiguous(&values[..6], [2, 1, 1, 3]).unwrap();
        let err = cache
            .append(View4::contiguous(&bad, [1, 1, 2, 2]).unwrap(), v_view)
            .unwrap_err();
        assert!(err.to_string().contains("`k`"), "{err}");
    }

    /// A cache fills to its capacity without growing, grows (at least doubling) only past it,
    /// reports its bytes at its capacity (4 a value in f32, 2 in bf16), and `clear` forgets
    /// every position but keeps the memory: the next append writes position 0 again.
    #[test]
    fn capacity_bytes_emptiness_and_clear() {
        let (b, g, d, dv) = (2, 3, 5, 7);
        for (precision, bytes) in [(Precision::F32, 4), (Precision::Bf16, 2)] {
            let mut cache = KvCache::new_in(precision, b, g, d, dv, 3);
            let size = |cap: usize| b * g * cap * (d + dv) * bytes;
            assert_eq!(cache.size_in_bytes(), size(3), "{precision:?}");
            assert!(cache.is_empty());
            assert_eq!(cache.len(), 0);
            let append = |cache: &mut KvCache, n: usize, x: f32| {
                let (k, v) = (vec![x; b * g * n * d], vec![-x; b * g * n * dv]);
                cache
                    .append(
                        View4::contiguous(&k, [b, g, n, d]).unwrap(),
                        View4::contiguous(&v, [b, g, n, dv]).unwrap(),
                    )
                    .unwrap();
            };
            append(&mut cache, 3, 1.0);
            assert_eq!((cache.len(), cache.capacity()), (3, 3), "filled exactly: no growth");
            assert!(!cache.is_empty());
            assert_eq!(cache.size_in_bytes(), size(3));
            append(&mut cache, 1, 2.0);
            assert_eq!((cache.len(), cache.capacity()), (4, 6), "past it: doubled");
            assert_eq!(cache.size_in_bytes(), size(6));
            cache.clear();
            assert!(cache.is_empty());
            assert_eq!((cache.len(), cache.keys().shape()[2]), (0, 0));
            assert_eq!((cache.capacity(), cache.size_in_bytes()), (6, size(6)), "memory kept");
            append(&mut cache, 1, 3.0);
            assert_eq!(cache.len(), 1);
            assert_eq!(cache.keys().to_f32(), vec![3.0; b * g * d]);
            assert_eq!(cache.values().to_f32(), vec![-3.0; b * g * dv]);
        }
    }

    /// A bf16 cache holds each appended value rounded to bf16, in the f32 cache's places,
    /// through growing and reordering, at half the bytes.
    #[test]
    fn bf16_cache_holds_the_rounded_values_in_place() {
        let (b, g, d, dv) = (2, 3, 5, 4);
        let mut caches = [
            KvCache::new(b, g, d, dv, 1),
            KvCache::new_in(Precision::Bf16, b, g, d, dv, 1),
        ];
        for step in 0..6 {
            let n = 1 + step % 2;
            let k = attn_kernels::testing::random_vec(b * g * n * d, step as u64);
            let v = attn_kernels::testing::random_vec(b * g * n * dv, 100 + step as u64);
            for cache in &mut caches {
                let k = View4::contiguous(&k, [b, g, n, d]).unwrap();
                cache.append(k, View4::contiguous(&v, [b, g, n, dv]).unwrap()).unwrap();
            }
            if step == 3 {
                caches.iter_mut().for_each(|c| c.reorder(&[1, 1]).unwrap());
            }
        }
        let [wide, bits] = &caches;
        assert_eq!(
            (bits.precision(), bits.len(), bits.capacity()),
            (Precision::Bf16, 9, wide.capacity())
        );
        assert_eq!(2 * bits.size_in_bytes(), wide.size_in_bytes());
        for (w, h) in [(wide.keys(), bits.keys()), (wide.values(), bits.values())] {
            assert!(matches!((w, h), (KvView::F32(_), KvView::Bf16(_))));
            let (w, h) = (w.to_f32(), h.to_f32());
            assert!(w.iter().zip(&h).all(|(&x, &y)| attn_kernels::round_to_bf16(x) == y));
            assert!(w.iter().zip(&h).any(|(x, y)| x != y));
        }
    }

    /// Row `i` becomes a copy of old row `rows[i]`, whole (keys and values, every head, every
    /// cached step); the rows past `rows.len()` copy `rows[0]`; an index past the batch is an
    /// error. Beam search relies on it: a hypothesis that overtakes another reads its own
    /// history only if its row moved with it.
    #[test]
    fn reorder_moves_whole_rows() {
        let (b, g, d, dv) = (3, 2, 2, 3);
        let mut cache = KvCache::new(b, g, d, dv, 2);
        for step in 0..3 {
            let k: Vec<f32> = (0..b * g * d).map(|i| (1000 * step + i) as f32).collect();
            let v: Vec<f32> = (0..b * g * dv).map(|i| -((1000 * step + i) as f32)).collect();
            cache
                .append(
                    View4::contiguous(&k, [b, g, 1, d]).unwrap(),
                    View4::contiguous(&v, [b, g, 1, dv]).unwrap(),
                )
                .unwrap();
        }
        let row = |cache: &KvCache, r: usize| -> (Vec<f32>, Vec<f32>) {
            let mut keys = Vec::new();
            let mut values = Vec::new();
            for gi in 0..g {
                for t in 0..cache.len() {
                    keys.extend((0..d).map(|j| cache.keys().get([r, gi, t, j])));
                    values.extend((0..dv).map(|j| cache.values().get([r, gi, t, j])));
                }
            }
            (keys, values)
        };
        let before: Vec<_> = (0..b).map(|r| row(&cache, r)).collect();
        assert_ne!(before[0], before[2]);
        cache.reorder(&[2, 0]).unwrap();
        assert_eq!(row(&cache, 0), before[2]);
        assert_eq!(row(&cache, 1), before[0]);
        assert_eq!(row(&cache, 2), before[2], "past rows.len(): rows[0]");
        let err = cache.reorder(&[0, 3]).unwrap_err();
        assert!(err.to_string().contains('3'), "{err}");
        let kept = (0..b).map(|r| row(&cache, r)).collect::<Vec<_>>();
        let err = cache.reorder(&[]).unwrap_err();
        assert!(err.to_string().contains("1 to 3 row indices"), "{err}");
        let err = cache.reorder(&[0, 1, 2, 0]).unwrap_err();
        assert!(err.to_string().contains("is 4 row indices"), "{err}");
        assert_eq!(
            (0..b).map(|r| row(&cache, r)).collect::<Vec<_>>(),
            kept,
            "an error changes nothing"
        );
    }
}
