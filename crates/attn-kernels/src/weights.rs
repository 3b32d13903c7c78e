//! Where attention weights go and how one row of them is finished and written: shared by the
//! second pass that recomputes them ([`crate::attention_weights`]) and the flash kernel that
//! keeps its scores for them ([`crate::attention_with_weights`]), so both give the same bits.

use crate::simd::exp_sub_sum;
use crate::view::SharedMut;
use crate::{ViewMut, ViewMut4};

/// Where [`crate::attention_weights`] and [`crate::attention_with_weights`] write.
#[derive(Debug)]
pub enum WeightsDst<'a> {
    /// Every head's weights: `[B, H, S, T]`.
    PerHead(ViewMut4<'a, f32>),
    /// The mean over heads: `[B, S, T]`, without any per-head `S×T` buffer.
    Averaged(ViewMut<'a, f32, 3>),
}

impl WeightsDst<'_> {
    /// The destination's shape.
    pub(crate) fn shape(&self) -> Vec<usize> {
        match self {
            WeightsDst::PerHead(v) => v.shape().to_vec(),
            WeightsDst::Averaged(v) => v.shape().to_vec(),
        }
    }

    /// Whether the heads are averaged.
    pub(crate) fn averaged(&self) -> bool {
        matches!(self, WeightsDst::Averaged(_))
    }
}

/// A validated destination as the tasks write it: element `(b, h, s, t)` of the weights (every
/// head at the same place when averaged, head stride 0) at `ptr + Σ index·stride`.
#[derive(Clone, Copy)]
pub(crate) struct RawWeights {
    pub(crate) ptr: SharedMut,
    pub(crate) strides: [usize; 4],
    /// `1/H` when the heads are averaged.
    pub(crate) inv_heads: Option<f32>,
}

impl RawWeights {
    /// The raw form of `dst`, for `h` heads.
    pub(crate) fn new(dst: WeightsDst<'_>, h: usize) -> Self {
        match dst {
            WeightsDst::PerHead(mut v) => RawWeights {
                ptr: SharedMut(v.data_mut().as_mut_ptr()),
                strides: v.strides(),
                inv_heads: None,
            },
            WeightsDst::Averaged(mut v) => {
                let st = v.strides();
                RawWeights {
                    ptr: SharedMut(v.data_mut().as_mut_ptr()),
                    strides: [st[0], 0, st[1], st[2]],
                    inv_heads: Some(1.0 / h as f32),
                }
            }
        }
    }

    /// Writes the finished weights `row` of head `h` for keys `t0..t0 + row.len()` of row
    /// `(b, s)`: stored per head, or the average's term (the first head stores `w/H`, the
    /// next add theirs, in head order).
    ///
    /// # Safety
    /// `(b, h, s)` and those keys must be in bounds of the destination, and no other thread may
    /// write them while this runs (averaged: no other thread writes row `(b, s)`).
    #[inline]
    pub(crate) unsafe fn write(&self, [b, h, s, t0]: [usize; 4], row: &[f32]) {
        let st = self.strides;
        let base = b * st[0] + h * st[1] + s * st[2] + t0 * st[3];
        let mode = match (self.inv_heads, h) {
            (None, _) => Accumulate::Write,
            (Some(f), 0) => Accumulate::WriteScaled(f),
            (Some(f), _) => Accumulate::AddScaled(f),
        };
        // SAFETY: the caller's contract.
        unsafe { write_weights(self.ptr, base, st[3], row, mode) };
    }
}

impl RawWeights {
    /// Turns row `(b, h, s)`'s masked scores over all keys (`kept`) into its weights given its
    /// `lse` ([`finish_row`]), in key blocks of [`crate::BLOCK_KEYS`] as
    /// [`crate::attention_weights`] computes them, and writes them ([`RawWeights::write`]).
    ///
    /// # Safety
    /// As for [`RawWeights::write`], for every key of the row.
    #[inline]
    pub(crate) unsafe fn write_finished(&self, kept: &mut [f32], lse: f32, [b, h, s]: [usize; 3]) {
        for (block, row) in kept.chunks_mut(crate::BLOCK_KEYS).enumerate() {
            finish_row(row, lse);
            // SAFETY: the caller's contract.
            unsafe { self.write([b, h, s, block * crate::BLOCK_KEYS], row) };
        }
    }
}

/// Turns one row's masked scores (`-inf` where the row cannot see a key) into its weights,
/// given the row's log-sum-exp: `exp(score - lse)`; zeros when `lse = -inf` (nothing to attend
/// to); for a NaN row (a NaN query, a visible NaN key or a `+inf` score), NaN on the keys it
/// sees and zero on those it cannot.
#[inline]
pub(crate) fn finish_row(row: &mut [f32], lse: f32) {
    if lse == f32::NEG_INFINITY {
        row.fill(0.0);
    } else if lse.is_nan() {
        row.iter_mut()
            .for_each(|x| *x = if *x == f32::NEG_INFINITY { 0.0 } else { f32::NAN });
    } else {
        exp_sub_sum(row, lse);
    }
}

/// How a head's weights reach the destination.
#[derive(Clone, Copy)]
enum Accumulate {
    /// Per-head weights: stored as they are.
    Write,
    /// The first head of an average: stored times `1/H`.
    WriteScaled(f32),
    /// The next heads of an average: added times `1/H`.
    AddScaled(f32),
}

/// Writes `row` to `dst[base + j·stride]`, `j < row.len()`, per `mode`.
///
/// # Safety
/// Those elements must be in bounds of the destination and written by no other thread.
unsafe fn write_weights(dst: SharedMut, base: usize, stride: usize, row: &[f32], mode: Accumulate) {
    if stride == 1 {
        // Contiguous: the same arithmetic (a product, then a sum: no fused multiply-add), as
        // loops the compiler vectorises.
        // SAFETY: `row.len()` elements from `base` are in bounds and this task's alone, by the
        // caller's contract.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.get().add(base), row.len()) };
        match mode {
            Accumulate::Write => out.copy_from_slice(row),
            Accumulate::WriteScaled(f) => out.iter_mut().zip(row).for_each(|(o, &w)| *o = w * f),
            Accumulate::AddScaled(f) => out.iter_mut().zip(row).for_each(|(o, &w)| *o += w * f),
        }
        return;
    }
    for (j, &w) in row.iter().enumerate() {
        // SAFETY: in bounds and this task's alone, by the caller's contract.
        let p = unsafe { dst.get().add(base + j * stride) };
        // SAFETY: as above.
        unsafe {
            *p = match mode {
                Accumulate::Write => w,
                Accumulate::WriteScaled(f) => w * f,
                Accumulate::AddScaled(f) => *p + w * f,
            }
        };
    }
}

/// Writes zeros to every element of `v: [B, S, T]`.
pub(crate) fn zero_fill(mut v: ViewMut<'_, f32, 3>, [b, s, t]: [usize; 3]) {
    for bi in 0..b {
        for si in 0..s {
            for ti in 0..t {
                let offset = v.offset([bi, si, ti]);
                v.data_mut()[offset] = 0.0;
            }
        }
    }
}
