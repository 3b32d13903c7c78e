//! `Δ = rowsum(dO ∘ O)`, the backward's first step: one f64 dot product per query row.

use rayon::prelude::*;

use super::BackwardInputs;
use crate::buffer::{self, Buffer};
use crate::Par;

/// The f64 lanes of a row's dot product: element `c` adds into lane `c % LANES`, in order, and
/// the lanes are then summed pairwise ([`fold`]). Eight chains of additions instead of one
/// (which ran at an element per four cycles, 1–1.5% of a small model's training step), and
/// the same bits at every SIMD level.
const LANES: usize = 8;

/// Rows per parallel task (each task one call at the SIMD level).
const TASK_ROWS: usize = 256;

/// `Δ[b, h, s] = Σ_c dout[b, h, s, c] · out[b, h, s, c]`, summed in f64 ([`LANES`]).
/// The buffer comes from this thread's pool (every element is written); hand it back with
/// `buffer::give`.
pub(super) fn row_deltas(inputs: &BackwardInputs<'_>, [batches, heads, rows, dv]: [usize; 4], par: Par) -> Buffer {
    let mut delta = buffer::take(batches * heads * rows);
    let (out, dout) = (inputs.out, inputs.dout);
    let contiguous = out.strides()[3] == 1 && dout.strides()[3] == 1;
    let task = |(t, chunk): (usize, &mut [f32])| {
        let row = |i: usize| {
            let index = t * TASK_ROWS + i;
            let (bh, s) = (index / rows.max(1), index % rows.max(1));
            [bh / heads, bh % heads, s]
        };
        if contiguous {
            // The usual case: both rows contiguous, the products vectorised.
            let rows_of = |i: usize| {
                let [b, h, s] = row(i);
                let (o0, d0) = (out.offset([b, h, s, 0]), dout.offset([b, h, s, 0]));
                (&out.data()[o0..o0 + dv], &dout.data()[d0..d0 + dv])
            };
            at_level!(contiguous_deltas(chunk, &rows_of));
        } else {
            // Element by element, into the same lanes in the same order.
            for (i, x) in chunk.iter_mut().enumerate() {
                let [b, h, s] = row(i);
                let mut lanes = [0.0f64; LANES];
                for c in 0..dv {
                    lanes[c % LANES] += out.get([b, h, s, c]) as f64 * dout.get([b, h, s, c]) as f64;
                }
                *x = fold(lanes) as f32;
            }
        }
    };
    match par {
        Par::Seq => delta.chunks_mut(TASK_ROWS).enumerate().for_each(task),
        Par::Rayon => delta.par_chunks_mut(TASK_ROWS).enumerate().for_each(task),
    }
    delta
}

/// `dst[i] = Σ_c o[c]·d[c]` for the rows `(o, d) = rows_of(i)`, in [`LANES`] f64 lanes
/// (compiled at the caller's level by `at_level!`).
#[inline(always)]
fn contiguous_deltas<'a>(dst: &mut [f32], rows_of: &impl Fn(usize) -> (&'a [f32], &'a [f32])) {
    for (i, x) in dst.iter_mut().enumerate() {
        let (o, d) = rows_of(i);
        let mut lanes = [0.0f64; LANES];
        let (oc, dc) = (o.chunks_exact(LANES), d.chunks_exact(LANES));
        let (ot, dt) = (oc.remainder(), dc.remainder());
        for (a, b) in oc.zip(dc) {
            for l in 0..LANES {
                lanes[l] += a[l] as f64 * b[l] as f64;
            }
        }
        for (l, (&a, &b)) in ot.iter().zip(dt).enumerate() {
            lanes[l] += a as f64 * b as f64;
        }
        *x = fold(lanes) as f32;
    }
}

/// The lanes' sum, pairwise in a fixed order.
#[inline(always)]
fn fold(l: [f64; LANES]) -> f64 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;
    use crate::{View, View4};

    /// Inputs whose `out` and `dout` are given (the rest are unused zeros of the same shape).
    fn inputs<'a>(out: View4<'a, f32>, dout: View4<'a, f32>, zeros: &'a [f32], lse: &'a [f32]) -> BackwardInputs<'a> {
        let [b, h, s, dv] = out.shape();
        let zeros = View4::contiguous(zeros, [b, h, s, dv]).unwrap();
        BackwardInputs {
            q: zeros,
            k: zeros,
            v: zeros,
            out,
            lse: View::contiguous(lse, [b, h, s]).unwrap(),
            lse_lo: None,
            dout,
        }
    }

    /// Each row's Δ is its f64 dot product rounded once to f32 (or within an ulp of it: the
    /// lanes' order of additions), whether the rows are contiguous or strided along `Dv`; the
    /// two layouts give the same bits; rows are found across task boundaries (more rows than
    /// a task, tasks ending inside a head), sequentially and on threads. Dv of 1, 7, 8, 37, 64
    /// and 130 cover the lanes' tail, a tail alone, and more than eight elements a lane.
    #[test]
    fn deltas_are_f64_dot_products_in_any_layout() {
        for (b, h, s, dv) in [
            (2, 3, 150, 37),
            (1, 2, 300, 64),
            (3, 1, 5, 1),
            (1, 1, 513, 7),
            (2, 2, 9, 8),
            (1, 2, 40, 130),
        ] {
            let (shape, n) = ([b, h, s, dv], b * h * s * dv);
            let out = random_vec(n, 3).iter().map(|x| x * 40.0).collect::<Vec<_>>();
            let dout = random_vec(n, 4);
            let zeros = vec![0.0f32; n];
            let lse = vec![0.0f32; b * h * s];
            // The same values stored `[B, H, Dv, S]`: stride S along Dv.
            let transpose = |data: &[f32]| {
                let mut t = vec![0.0f32; n];
                for bh in 0..b * h {
                    for r in 0..s {
                        for c in 0..dv {
                            t[(bh * dv + c) * s + r] = data[(bh * s + r) * dv + c];
                        }
                    }
                }
                t
            };
            let (out_t, dout_t) = (transpose(&out), transpose(&dout));
            let strides = [h * dv * s, dv * s, 1, s];
            for par in [Par::Seq, Par::Rayon] {
                let got = row_deltas(
                    &inputs(
                        View4::contiguous(&out, shape).unwrap(),
                        View4::contiguous(&dout, shape).unwrap(),
                        &zeros,
                        &lse,
                    ),
                    shape,
                    par,
                )
                .to_vec();
                let got_strided = row_deltas(
                    &inputs(
                        View4::new(&out_t, shape, strides).unwrap(),
                        View4::new(&dout_t, shape, strides).unwrap(),
                        &zeros,
                        &lse,
                    ),
                    shape,
                    par,
                )
                .to_vec();
                assert_eq!(got.len(), b * h * s);
                assert_eq!(got, got_strided, "{shape:?}: strided rows give other bits");
                for (row, &x) in got.iter().enumerate() {
                    let want: f64 = (0..dv)
                        .map(|c| out[row * dv + c] as f64 * dout[row * dv + c] as f64)
                        .sum();
                    let mass: f64 = (0..dv)
                        .map(|c| (out[row * dv + c] as f64 * dout[row * dv + c] as f64).abs())
                        .sum();
                    let err = (x as f64 - want).abs();
                    assert!(
                        err <= want.abs() * 2.0f64.powi(-24) + mass * 1e-14,
                        "{shape:?} row {row}: {x} against {want}"
                    );
                }
            }
        }
    }
}
