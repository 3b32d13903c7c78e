//! The backward of layer and RMS norms: statistics recomputed from the input in f64, the
//! weight's and bias's gradients summed by fixed chunks of rows.

use rayon::prelude::*;

use super::SUM_ROWS;
use crate::error::check_len;
use crate::f64_lanes::{fold, F64x8, Lanes8};
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
        let rows = Rows {
            dx: dxs,
            dy: dys,
            x: xs,
            weight,
            center,
            eps,
        };
        rows_at_level(rows, xhat_dy, with_bias.then_some(dy_sum));
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

/// A chunk of rows of [`norm_backward`] and what every row shares.
struct Rows<'a> {
    dx: &'a mut [f32],
    dy: &'a [f32],
    x: &'a [f32],
    weight: &'a [f32],
    center: bool,
    eps: f32,
}

/// [`rows_backward`] at the running SIMD level. Every level evaluates the same f64 operations in
/// the same order (eight lanes, no fused multiply-adds), so all give the same bits.
fn rows_at_level(rows: Rows<'_>, xhat_dy: &mut [f64], dy_sum: Option<&mut [f64]>) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::{simd_level, SimdLevel};
        match simd_level() {
            // SAFETY: `simd_level` reported the features each entry point enables.
            SimdLevel::Avx512 => return unsafe { x86::rows_avx512(rows, xhat_dy, dy_sum) },
            // SAFETY: as above.
            SimdLevel::Avx2Fma => return unsafe { x86::rows_avx2(rows, xhat_dy, dy_sum) },
            SimdLevel::Scalar => {}
        }
    }
    rows_backward::<Lanes8>(rows, xhat_dy, dy_sum)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{rows_backward, Rows};
    use crate::f64_lanes::x86::{Ymm2, Zmm};

    /// [`rows_backward`] at AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub(super) unsafe fn rows_avx512(rows: Rows<'_>, xhat_dy: &mut [f64], dy_sum: Option<&mut [f64]>) {
        rows_backward::<Zmm>(rows, xhat_dy, dy_sum)
    }

    /// [`rows_backward`] at AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(rows: Rows<'_>, xhat_dy: &mut [f64], dy_sum: Option<&mut [f64]>) {
        rows_backward::<Ymm2>(rows, xhat_dy, dy_sum)
    }
}

/// Rows of [`norm_backward`]: adds to each row's `dx`; adds each row's `dy·x̂` to `xhat_dy` and,
/// when asked, its `dy` to `dy_sum` (rows in order). Per row, three passes in f64: the mean;
/// then the variance, `Σ g` and `Σ g·(x − μ)` together (none needs `r`); then `dx`. Every sum
/// runs over eight lanes (element `j` in lane `j mod 8`), folded as
/// `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`.
#[inline(always)]
fn rows_backward<V: F64x8>(rows: Rows<'_>, xhat_dy: &mut [f64], mut dy_sum: Option<&mut [f64]>) {
    let Rows {
        dx,
        dy,
        x,
        weight,
        center,
        eps,
    } = rows;
    let e = weight.len();
    let full = e / 8 * 8;
    let n = e as f64;
    let w = weight.as_ptr();
    for ((dx, dy), x) in dx.chunks_exact_mut(e).zip(dy.chunks_exact(e)).zip(x.chunks_exact(e)) {
        let (xp, dp) = (x.as_ptr(), dy.as_ptr());
        // SAFETY: `j + 8 <= full <= e`, and every row, `weight` and `xhat_dy` hold `e` values;
        // the remainders index in bounds.
        unsafe {
            let mean = if center {
                let mut acc = V::splat(0.0);
                for j in (0..full).step_by(8) {
                    acc = acc.add(V::widen(xp.add(j)));
                }
                let mut lanes = acc.lanes();
                for (l, &v) in x[full..].iter().enumerate() {
                    lanes[l] += v as f64;
                }
                fold(lanes) / n
            } else {
                0.0
            };
            let m = V::splat(mean);
            let (mut sq, mut sg, mut sgc) = (V::splat(0.0), V::splat(0.0), V::splat(0.0));
            for j in (0..full).step_by(8) {
                let c = V::widen(xp.add(j)).sub(m);
                let g = V::widen(dp.add(j)).mul(V::widen(w.add(j)));
                sq = sq.add(c.mul(c));
                sg = sg.add(g);
                sgc = sgc.add(g.mul(c));
            }
            let (mut sq, mut sg, mut sgc) = (sq.lanes(), sg.lanes(), sgc.lanes());
            for l in 0..e - full {
                let j = full + l;
                let c = x[j] as f64 - mean;
                let g = dy[j] as f64 * weight[j] as f64;
                sq[l] += c * c;
                sg[l] += g;
                sgc[l] += g * c;
            }
            let r = 1.0 / (fold(sq) / n + eps as f64).sqrt();
            let mean_g = if center { fold(sg) / n } else { 0.0 };
            // mean(g·x̂) = r · Σ g·(x − μ) / n.
            let mean_gx = r * fold(sgc) / n;
            let (rv, mg, mgx) = (V::splat(r), V::splat(mean_g), V::splat(mean_gx));
            let s = xhat_dy.as_mut_ptr();
            for j in (0..full).step_by(8) {
                let d = V::widen(dp.add(j));
                let xh = V::widen(xp.add(j)).sub(m).mul(rv);
                V::load(s.add(j)).add(d.mul(xh)).store(s.add(j));
                let g = d.mul(V::widen(w.add(j)));
                rv.mul(g.sub(mg).sub(xh.mul(mgx))).add_narrowed(dx.as_mut_ptr().add(j));
            }
            for j in full..e {
                let d = dy[j] as f64;
                let xh = (x[j] as f64 - mean) * r;
                xhat_dy[j] += d * xh;
                dx[j] += (r * (d * weight[j] as f64 - mean_g - xh * mean_gx)) as f32;
            }
        }
        if let Some(sum) = dy_sum.as_deref_mut() {
            sum.iter_mut().zip(dy).for_each(|(s, &g)| *s += g as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    /// Every level the CPU has gives the portable lanes' bits, with and without a remainder of
    /// a vector, for layer and RMS norms (the bias sums included).
    #[test]
    fn every_level_gives_the_same_bits() {
        for (rows, e) in [(5, 37), (3, 128), (2, 7)] {
            let x: Vec<f32> = random_vec(rows * e, 1).iter().map(|v| 1.5 + 2.0 * v).collect();
            let dy = random_vec(rows * e, 2);
            let w = random_vec(e, 3);
            for center in [true, false] {
                let run = |level: Option<&str>| {
                    let mut dx = random_vec(rows * e, 4);
                    let (mut xhat_dy, mut dy_sum) = (vec![0.5f64; e], vec![0.25f64; e]);
                    let r = Rows {
                        dx: &mut dx,
                        dy: &dy,
                        x: &x,
                        weight: &w,
                        center,
                        eps: 1e-5,
                    };
                    match level {
                        None => rows_backward::<Lanes8>(r, &mut xhat_dy, Some(&mut dy_sum)),
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: the level was detected just before.
                        Some("avx512") => unsafe { x86::rows_avx512(r, &mut xhat_dy, Some(&mut dy_sum)) },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above.
                        Some(_) => unsafe { x86::rows_avx2(r, &mut xhat_dy, Some(&mut dy_sum)) },
                        #[cfg(not(target_arch = "x86_64"))]
                        Some(_) => unreachable!(),
                    }
                    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    (
                        dx.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        bits(&xhat_dy),
                        bits(&dy_sum),
                    )
                };
                let want = run(None);
                #[cfg(target_arch = "x86_64")]
                for (name, has) in [
                    ("avx512", crate::simd::detect() == crate::SimdLevel::Avx512),
                    (
                        "avx2",
                        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                    ),
                ] {
                    if has {
                        assert_eq!(run(Some(name)), want, "{name}, rows {rows}, e {e}, center {center}");
                    } else {
                        eprintln!("skipped {name}: not on this CPU");
                    }
                }
            }
        }
    }
}
