//! `Δ = rowsum(dO ∘ O)`, the backward's first step: one f64 dot product per query row.

use rayon::prelude::*;

use super::BackwardInputs;
use crate::buffer::{self, Buffer};
use crate::Par;

/// `Δ[b, h, s] = Σ_c dout[b, h, s, c] · out[b, h, s, c]`, summed in f64.
/// The buffer comes from this thread's pool (every element is written); hand it back with
/// `buffer::give`.
pub(super) fn row_deltas(inputs: &BackwardInputs<'_>, [batches, heads, rows, dv]: [usize; 4], par: Par) -> Buffer {
    let mut delta = buffer::take(batches * heads * rows);
    let (out, dout) = (inputs.out, inputs.dout);
    let row = |(index, x): (usize, &mut f32)| {
        let (bh, s) = (index / rows.max(1), index % rows.max(1));
        let (b, h) = (bh / heads, bh % heads);
        // A contiguous dot product where both rows are (the usual case), element by element
        // otherwise; the same order of additions either way.
        let (o0, d0) = (out.offset([b, h, s, 0]), dout.offset([b, h, s, 0]));
        let sum: f64 = if out.strides()[3] == 1 && dout.strides()[3] == 1 {
            let (o, d) = (&out.data()[o0..o0 + dv], &dout.data()[d0..d0 + dv]);
            o.iter().zip(d).map(|(&a, &b)| a as f64 * b as f64).sum()
        } else {
            (0..dv)
                .map(|c| out.get([b, h, s, c]) as f64 * dout.get([b, h, s, c]) as f64)
                .sum()
        };
        *x = sum as f32;
    };
    match par {
        Par::Seq => delta.iter_mut().enumerate().for_each(row),
        Par::Rayon => delta.par_iter_mut().enumerate().for_each(row),
    }
    delta
}
