//! `Δ = rowsum(dO ∘ O)`, the backward's first step: one f64 dot product per query row.

use rayon::prelude::*;

use super::BackwardInputs;
use crate::buffer::{self, Buffer};
use crate::f64_lanes::{fold, F64x8, Lanes8};
use crate::Par;

/// Rows per parallel task.
const TASK_ROWS: usize = 256;

/// `Δ[b, h, s] = Σ_c dout[b, h, s, c] · out[b, h, s, c]`, summed in f64 on eight lanes
/// ([`crate::f64_lanes`]: element `c` in lane `c mod 8`, the lanes folded pairwise), the same
/// bits at every level and for strided rows. One chain of additions per row ran at an element
/// per four cycles (1–1.5% of a small model's training step).
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
            // The usual case: both rows contiguous, on the running level's lanes.
            let rows_of = |i: usize| {
                let [b, h, s] = row(i);
                let (o0, d0) = (out.offset([b, h, s, 0]), dout.offset([b, h, s, 0]));
                (&out.data()[o0..o0 + dv], &dout.data()[d0..d0 + dv])
            };
            dot_rows(chunk, &rows_of);
        } else {
            // Element by element, into the same lanes in the same order.
            for (i, x) in chunk.iter_mut().enumerate() {
                let [b, h, s] = row(i);
                let mut lanes = [0.0f64; 8];
                for c in 0..dv {
                    lanes[c % 8] += out.get([b, h, s, c]) as f64 * dout.get([b, h, s, c]) as f64;
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

/// `dst[i] = Σ_c o[c]·d[c]` for the rows `(o, d) = rows_of(i)`, at the running SIMD level.
fn dot_rows<'a, F: Fn(usize) -> (&'a [f32], &'a [f32])>(dst: &mut [f32], rows_of: &F) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::{simd_level, SimdLevel};
        match simd_level() {
            // SAFETY: `simd_level` reported the features each entry point enables.
            SimdLevel::Avx512 => return unsafe { x86::dot_rows_avx512(dst, rows_of) },
            // SAFETY: as above.
            SimdLevel::Avx2Fma => return unsafe { x86::dot_rows_avx2(dst, rows_of) },
            SimdLevel::Scalar => {}
        }
    }
    // SAFETY: the portable lanes need no features.
    unsafe { dot_rows_with::<Lanes8, F>(dst, rows_of) }
}

/// [`dot_rows`] on the lanes `V`.
///
/// # Safety
/// `V`'s features must be enabled.
#[inline(always)]
unsafe fn dot_rows_with<'a, V: F64x8, F: Fn(usize) -> (&'a [f32], &'a [f32])>(dst: &mut [f32], rows_of: &F) {
    for (i, x) in dst.iter_mut().enumerate() {
        let (o, d) = rows_of(i);
        assert_eq!(o.len(), d.len());
        let full = o.len() / 8 * 8;
        // SAFETY: the caller enabled `V`'s features.
        let mut acc = unsafe { V::splat(0.0) };
        for j in (0..full).step_by(8) {
            // SAFETY: `j + 8 <= full` values of each row; the caller enabled `V`'s features.
            acc = unsafe { acc.add(V::widen(o.as_ptr().add(j)).mul(V::widen(d.as_ptr().add(j)))) };
        }
        // SAFETY: as above.
        let mut lanes = unsafe { acc.lanes() };
        for (l, (&a, &b)) in o[full..].iter().zip(&d[full..]).enumerate() {
            lanes[l] += a as f64 * b as f64;
        }
        *x = fold(lanes) as f32;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::dot_rows_with;
    use crate::f64_lanes::x86::{Ymm2, Zmm};

    /// [`dot_rows_with`] at AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub(super) unsafe fn dot_rows_avx512<'a, F: Fn(usize) -> (&'a [f32], &'a [f32])>(dst: &mut [f32], rows_of: &F) {
        // SAFETY: this function enables AVX-512.
        unsafe { dot_rows_with::<Zmm, F>(dst, rows_of) }
    }

    /// [`dot_rows_with`] at AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_avx2<'a, F: Fn(usize) -> (&'a [f32], &'a [f32])>(dst: &mut [f32], rows_of: &F) {
        // SAFETY: this function enables AVX2.
        unsafe { dot_rows_with::<Ymm2, F>(dst, rows_of) }
    }
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
