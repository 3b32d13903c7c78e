//! The KV cache for incremental decoding: keys and values of past positions, preallocated and
//! grown by doubling, never reallocated per step.
//!
//! Layout: `k: [B, G, capacity, D]`, `v: [B, G, capacity, Dv]`; the first `len` positions are
//! filled. Views of the filled part go straight to the kernels.

use attn_kernels::View4;

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
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// An empty cache for `batch` sequences of `n_kv_heads` heads, with room for `capacity`
    /// positions before it first grows.
    pub fn new(batch: usize, n_kv_heads: usize, head_dim: usize, v_head_dim: usize, capacity: usize) -> Self {
        KvCache {
            batch,
            n_kv_heads,
            head_dim,
            v_head_dim,
            capacity,
            len: 0,
            k: vec![0.0; batch * n_kv_heads * capacity * head_dim],
            v: vec![0.0; batch * n_kv_heads * capacity * v_head_dim],
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
    pub fn keys(&self) -> View4<'_, f32> {
        let (c, d) = (self.capacity, self.head_dim);
        View4::new(
            &self.k,
            [self.batch, self.n_kv_heads, self.len, d],
            [self.n_kv_heads * c * d, c * d, d, 1],
        )
        .expect("the cache's own layout is in bounds")
    }

    /// `[B, G, len, Dv]`: the cached values.
    pub fn values(&self) -> View4<'_, f32> {
        let (c, d) = (self.capacity, self.v_head_dim);
        View4::new(
            &self.v,
            [self.batch, self.n_kv_heads, self.len, d],
            [self.n_kv_heads * c * d, c * d, d, 1],
        )
        .expect("the cache's own layout is in bounds")
    }

    /// Appends `k_new: [B, G, n, D]` and `v_new: [B, G, n, Dv]` (any strides); grows the
    /// capacity to at least double when they do not fit.
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
        let (b_n, g_n, c) = (self.batch, self.n_kv_heads, self.capacity);
        for (buf, src, d) in [
            (&mut self.k, k_new, self.head_dim),
            (&mut self.v, v_new, self.v_head_dim),
        ] {
            for b in 0..b_n {
                for g in 0..g_n {
                    for i in 0..n {
                        let dst = ((b * g_n + g) * c + self.len + i) * d;
                        for j in 0..d {
                            buf[dst + j] = src.get([b, g, i, j]);
                        }
                    }
                }
            }
        }
        self.len += n;
        Ok(())
    }

    /// Batch row `i` becomes a copy of the old row `rows[i]` (beam search keeps the caches of
    /// the hypotheses it extends); rows past `rows.len()` copy `rows[0]`. An index past the
    /// batch is an error naming it.
    pub fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(crate::AttnError::InvalidConfig {
                field: "cache rows",
                got: bad.to_string(),
                expected: format!("below the batch size {}", self.batch),
            });
        }
        let per_row = |d: usize| self.n_kv_heads * self.capacity * d;
        for (buf, d) in [(&mut self.k, self.head_dim), (&mut self.v, self.v_head_dim)] {
            let width = per_row(d);
            let old = buf.clone();
            for b in 0..self.batch {
                let from = rows.get(b).or(rows.first()).copied().unwrap_or(b);
                buf[b * width..(b + 1) * width].copy_from_slice(&old[from * width..(from + 1) * width]);
            }
        }
        Ok(())
    }

    fn grow(&mut self, capacity: usize) {
        let (b_n, g_n, old) = (self.batch, self.n_kv_heads, self.capacity);
        for (buf, d) in [(&mut self.k, self.head_dim), (&mut self.v, self.v_head_dim)] {
            let mut bigger = vec![0.0f32; b_n * g_n * capacity * d];
            for bg in 0..b_n * g_n {
                let src = &buf[bg * old * d..bg * old * d + self.len * d];
                bigger[bg * capacity * d..bg * capacity * d + self.len * d].copy_from_slice(src);
            }
            *buf = bigger;
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
        let values = cache.values().data().to_vec();
        let v_view = View4::contiguous(&values[..6], [2, 1, 1, 3]).unwrap();
        let err = cache
            .append(View4::contiguous(&bad, [1, 1, 2, 2]).unwrap(), v_view)
            .unwrap_err();
        assert!(err.to_string().contains("`k`"), "{err}");
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
    }
}
