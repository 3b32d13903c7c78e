//! The backward of layer and RMS norms: statistics recomputed from the input in f64, the
//! weight's and bias's gradients summed by fixed chunks of rows.

use rayon::prelude::*;

use super::SUM_ROWS;
use crate::error::check_len;
use crate::layer::NormKind;
use crate::{KernelError, Par};

/// The backward of a norm over rows of `x: [N, E]` (the norm's input, after any residual add):
/// `dx` is **added** to (the residual's other branch usually holds a gradient already), and
/// `dweight += Σ_n dy·x̂`, `dbias += Σ_n dy` (layer norm with a bias). The statistics are
/// recomputed from `x` in f64.
///
/// Layer norm: `dx = r·(g − mean(g) − x̂·mean(g·x̂))`, `g = dy·w`, `x̂ = (x − μ)·r`,
/// `r = 1/sqrt(var + eps)`. RMS norm: the same without the mean terms.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    dx: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    (kind, eps): (NormKind, f32),
    par: Par,
) -> Result<(), KernelError> {
    let op = "norm_backward";
    let e = weight.len();
    if e == 0 || !x.len().is_multiple_of(e) {
        return Err(KernelError::shape(
            op,
            "x",
            vec![x.len().div_ceil(e.max(1)), e],
            vec![x.len()],
        ));
    }
    check_len(op, "dy", x.len(), dy.len())?;
    check_len(op, "dx", x.len(), dx.len())?;
    check_len(op, "dweight", e, dweight.len())?;
    if let Some(db) = dbias.as_deref() {
        check_len(op, "dbias", e, db.len())?;
    }
    let center = kind == NormKind::LayerNorm;
    let with_bias = dbias.is_some();
    // Per chunk of rows: the chunk's `Σ dy·x̂` and `Σ dy` (when there is a bias), per column,
    // each summed over the chunk's rows in order from zero, as `add_column_sums` sums.
    let chunk = |(dxs, (dys, xs)): (&mut [f32], (&[f32], &[f32]))| {
        let mut partial = vec![0.0f64; if with_bias { 2 * e } else { e }];
        let (xhat_dy, dy_sum) = partial.split_at_mut(e);
        for ((dx, dy), x) in dxs.chunks_exact_mut(e).zip(dys.chunks_exact(e)).zip(xs.chunks_exact(e)) {
            at_level!(norm_row_backward(dx, dy, x, weight, center, eps, xhat_dy));
            if with_bias {
                dy_sum.iter_mut().zip(dy).for_each(|(s, &g)| *s += g as f64);
            }
        }
        partial
    };
    let n = SUM_ROWS * e;
    let partials: Vec<Vec<f64>> = match par {
        Par::Seq => dx.chunks_mut(n).zip(dy.chunks(n).zip(x.chunks(n))).map(chunk).collect(),
        Par::Rayon => dx
            .par_chunks_mut(n)
            .zip(dy.par_chunks(n).zip(x.par_chunks(n)))
            .map(chunk)
            .collect(),
    };
    let mut total = vec![0.0f64; if with_bias { 2 * e } else { e }];
    for p in &partials {
        total.iter_mut().zip(p).for_each(|(t, &v)| *t += v);
    }
    dweight.iter_mut().zip(&total).for_each(|(d, &t)| *d += t as f32);
    if let Some(db) = dbias {
        db.iter_mut().zip(&total[e..]).for_each(|(d, &t)| *d += t as f32);
    }
    Ok(())
}

/// One row of [`norm_backward`]: adds to `dx`; adds the row's `dy·x̂` to `xhat_dy` (for the
/// weight's gradient). Three passes in f64: the mean; then the variance, `Σ g` and
/// `Σ g·(x − μ)` together (none needs `r`); then `dx`.
#[inline(always)]
fn norm_row_backward(
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    center: bool,
    eps: f32,
    xhat_dy: &mut [f64],
) {
    let e = weight.len();
    let (dx, dy, x, xhat_dy) = (&mut dx[..e], &dy[..e], &x[..e], &mut xhat_dy[..e]);
    let n = e as f64;
    let mean = if center { lane_sum(x) / n } else { 0.0 };
    let [sq, sum_g, sum_gc] = centred_sums(x, dy, weight, mean);
    let r = 1.0 / (sq / n + eps as f64).sqrt();
    let mean_g = if center { sum_g / n } else { 0.0 };
    // mean(g·x̂) = r · Σ g·(x − μ) / n.
    let mean_gx = r * sum_gc / n;
    for ((((dx, &dy), &x), &w), s) in dx.iter_mut().zip(dy).zip(x).zip(weight).zip(xhat_dy) {
        let (dy, w) = (dy as f64, w as f64);
        let xh = (x as f64 - mean) * r;
        *s += dy * xh;
        *dx += (r * (dy * w - mean_g - xh * mean_gx)) as f32;
    }
}

/// `Σ x[j]` in f64 as eight interleaved partial sums added at the end: a fixed order (the same
/// bits every time, at every level) that vectorises.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] as f64;
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += v as f64;
    }
    fold_lanes(acc)
}

/// `[Σ c², Σ g, Σ g·c]` with `c = x − mean`, `g = dy·w`, in f64, each as eight interleaved
/// partial sums in the order of [`lane_sum`]. The slices have the same length.
#[inline(always)]
fn centred_sums(x: &[f32], dy: &[f32], w: &[f32], mean: f64) -> [f64; 3] {
    let (mut sq, mut sg, mut sgc) = ([0.0f64; 8], [0.0f64; 8], [0.0f64; 8]);
    let (xs, ds, ws) = (x.chunks_exact(8), dy.chunks_exact(8), w.chunks_exact(8));
    let rest = xs.remainder().iter().zip(ds.remainder()).zip(ws.remainder());
    for ((x, d), w) in xs.zip(ds).zip(ws) {
        let c: [f64; 8] = std::array::from_fn(|l| x[l] as f64 - mean);
        let g: [f64; 8] = std::array::from_fn(|l| d[l] as f64 * w[l] as f64);
        for l in 0..8 {
            sq[l] += c[l] * c[l];
        }
        for l in 0..8 {
            sg[l] += g[l];
        }
        for l in 0..8 {
            sgc[l] += g[l] * c[l];
        }
    }
    for (l, ((&x, &d), &w)) in rest.enumerate() {
        let c = x as f64 - mean;
        let g = d as f64 * w as f64;
        sq[l] += c * c;
        sg[l] += g;
        sgc[l] += g * c;
    }
    [sq, sg, sgc].map(fold_lanes)
}

/// The eight partial sums added pairwise, in a fixed order.
#[inline(always)]
fn fold_lanes(a: [f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}
