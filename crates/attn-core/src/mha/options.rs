//! What a forward call takes and returns: sequences in their layout, masks and flags in
//! `nn.MultiheadAttention.forward`'s conventions, the output and weights.

use crate::error::shape_error;
use crate::{AttnError, KeyPadding, Result, ScoreMask};

/// How a sequence tensor is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[B, L, E]` (PyTorch `batch_first=True`).
    #[default]
    BatchFirst,
    /// `[L, B, E]` (PyTorch's default for `nn.MultiheadAttention`).
    SeqFirst,
}

impl Layout {
    /// The layout a PyTorch `batch_first` flag names.
    pub fn from_batch_first(batch_first: bool) -> Self {
        if batch_first {
            Layout::BatchFirst
        } else {
            Layout::SeqFirst
        }
    }
}

/// A batch of sequences of `dim`-wide vectors.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    /// The elements, `[B, L, dim]` or `[L, B, dim]` by `layout`.
    pub data: &'a [f32],
    /// B.
    pub batch: usize,
    /// L.
    pub len: usize,
    /// The vector width.
    pub dim: usize,
    /// The memory layout.
    pub layout: Layout,
}

impl<'a> Sequence<'a> {
    /// A batch-first sequence `[batch, len, dim]`.
    pub fn batch_first(data: &'a [f32], batch: usize, len: usize, dim: usize) -> Self {
        Sequence {
            data,
            batch,
            len,
            dim,
            layout: Layout::BatchFirst,
        }
    }

    /// The positions `range` of every sequence, copied out batch-first `[B, range.len(), dim]`:
    /// what a decoder with a KV cache takes at each step when the whole batch is in one
    /// buffer (in seq-first storage a step is already contiguous and needs no copy).
    ///
    /// ```
    /// use attn_core::prelude::*;
    /// let (b, s, e) = (3, 4, 16);
    /// let mha = MultiHeadAttention::with_seed(MhaConfig::new(e, 4), 0).unwrap();
    /// let x: Vec<f32> = (0..b * s * e).map(|i| (i as f32 * 0.1).sin()).collect();
    /// let batch = Sequence::batch_first(&x, b, s, e);
    /// let causal = MhaOptions { is_causal: true, ..Default::default() };
    /// let full = mha.forward_self(batch, &causal, Par::Seq).unwrap().output;
    /// let mut cache = mha.new_cache(b, s);
    /// for t in 0..s {
    ///     let step = batch.positions(t..t + 1).unwrap(); // [B, 1, E]
    ///     let out = mha.forward_append(Sequence::batch_first(&step, b, 1, e), &mut cache, &Default::default(), Par::Seq).unwrap();
    ///     for bi in 0..b {
    ///         let want = &full[(bi * s + t) * e..][..e];
    ///         assert!(out.output[bi * e..][..e].iter().zip(want).all(|(a, w)| (a - w).abs() < 1e-5));
    ///     }
    /// }
    /// ```
    pub fn positions(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        self.check("Sequence::positions", "sequence", self.dim)?;
        if range.start > range.end || range.end > self.len {
            return Err(AttnError::InvalidConfig {
                field: "positions",
                got: format!("{range:?}"),
                expected: format!("a range within 0..{} (the sequence length)", self.len),
            });
        }
        let [bs, ls] = self.token_strides();
        let mut out = Vec::with_capacity(self.batch * range.len() * self.dim);
        for b in 0..self.batch {
            for l in range.clone() {
                let row = b * bs + l * ls;
                out.extend_from_slice(&self.data[row * self.dim..(row + 1) * self.dim]);
            }
        }
        Ok(out)
    }

    pub(crate) fn check(&self, op: &'static str, name: &str, dim: usize) -> Result<()> {
        let shape = match self.layout {
            Layout::BatchFirst => ("[B, L, E]", [self.batch, self.len, self.dim]),
            Layout::SeqFirst => ("[L, B, E]", [self.len, self.batch, self.dim]),
        };
        if self.dim != dim {
            return Err(shape_error(op, name, format!("{} with E = {dim}", shape.0), &shape.1));
        }
        let needed = self.batch.checked_mul(self.len).and_then(|x| x.checked_mul(dim));
        if needed != Some(self.data.len()) {
            return Err(AttnError::BadTensorData {
                name: name.to_string(),
                shape: shape.1.to_vec(),
                needed: needed.unwrap_or(usize::MAX),
                len: self.data.len(),
            });
        }
        Ok(())
    }

    /// Fails when the sequence is laid out otherwise than a module configured with
    /// `batch_first` expects, unless the two layouts are the same bytes (`B = 1` or `L = 1`).
    pub(crate) fn check_layout(&self, name: &str, batch_first: bool) -> Result<()> {
        let expected = Layout::from_batch_first(batch_first);
        if self.layout != expected && self.batch > 1 && self.len > 1 {
            return Err(AttnError::InvalidConfig {
                field: "batch_first",
                got: format!("{batch_first}, but `{name}` is laid out {:?}", self.layout),
                expected: format!(
                    "`{name}` laid out {expected:?} (or a config with batch_first = {})",
                    !batch_first
                ),
            });
        }
        Ok(())
    }

    /// Strides `[B, L]` of token rows, in rows.
    pub(crate) fn token_strides(&self) -> [usize; 2] {
        match self.layout {
            Layout::BatchFirst => [self.len, 1],
            Layout::SeqFirst => [1, self.batch],
        }
    }
}

/// Which attention weights a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NeedWeights {
    /// None (the fastest path).
    #[default]
    No,
    /// `[B, H, S, T]`.
    PerHead,
    /// `[B, S, T]`, the mean over heads (PyTorch's `average_attn_weights=True`).
    Averaged,
}

/// Forward options in the conventions of `nn.MultiheadAttention.forward`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MhaOptions<'a> {
    /// `attn_mask`: `[S, T]` or `[B·H, S, T]`; boolean `true` = masked out (PyTorch's module
    /// convention; other conventions are allowed through [`BoolMeaning`](crate::BoolMeaning)) or additive.
    pub attn_mask: ScoreMask<'a>,
    /// `key_padding_mask` `[B, T]` (boolean `true` = padding), or lengths.
    pub key_padding: KeyPadding<'a>,
    /// `is_causal`: queries attend only keys at or before their position (top-left aligned).
    /// Applied together with `attn_mask` when both are given (PyTorch treats the flag as a
    /// hint that the mask is causal; for a causal mask the two agree).
    pub is_causal: bool,
    /// Which weights to return.
    pub need_weights: NeedWeights,
}

impl<'a> MhaOptions<'a> {
    /// Causal: each query attends keys at or before its own position (`is_causal = true`).
    pub fn causal(self) -> Self {
        MhaOptions {
            is_causal: true,
            ..self
        }
    }

    /// These keys are padding (`key_padding_mask`, or lengths).
    pub fn key_padding(self, key_padding: KeyPadding<'a>) -> Self {
        MhaOptions { key_padding, ..self }
    }

    /// This `attn_mask`.
    pub fn attn_mask(self, attn_mask: ScoreMask<'a>) -> Self {
        MhaOptions { attn_mask, ..self }
    }

    /// Return these attention weights.
    pub fn need_weights(self, need_weights: NeedWeights) -> Self {
        MhaOptions { need_weights, ..self }
    }
}

/// The result of a forward call.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// `[B, S, E]` (or `[S, B, E]`, the query's layout).
    pub output: Vec<f32>,
    /// `[B, S, T]` or `[B, H, S, T]` when asked for.
    pub weights: Option<Vec<f32>>,
}
