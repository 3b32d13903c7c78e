//! `attn check`: every kernel and module path on random inputs against an f64 reference on this
//! machine, forward and backward (each attention backward path against the f64 chain rule), with
//! the SIMD level and timings, so a user can trust a new machine in one command.
//!
//! Exits 1 when any path is outside its tolerance.

use std::time::Instant;

use anyhow::{bail, Result};
use attn_nn::core::kernels::{
    attention_backward_path, attention_backward_reference, attention_reference, attention_unfused, attention_weights,
    attention_with_lse_lo, backward_path, bf16_level, broadcast_to, exp_slice, flash_attention, gemm, gemm_bf16,
    gemm_bf16_route, gemm_reference, gemm_route, round_to_bf16, simd_level, Accum, AttentionOptions, BackwardInputs,
    BackwardPath, Bf16Panels, Causal, ForwardInputs, Gradients, Mask, Par, View, View2, View4, ViewMut, ViewMut2,
    ViewMut4, WeightsDst,
};
use attn_nn::core::{MhaConfig, MhaOptions, MultiHeadAttention, Sequence, StateDict};
use attn_nn::{BlockMasks, EncoderLayer, LayerConfig};
use serde_json::json;

use crate::support::numerics::max_abs;
use crate::support::timing::random_vec;

struct Row {
    path: String,
    error: f64,
    tolerance: f64,
    seconds: f64,
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t0 = Instant::now();
    let value = f()?;
    Ok((value, t0.elapsed().as_secs_f64()))
}

/// Whether two runs gave the same bits in every part (a path gives the same bits on any number
/// of threads).
fn same_bits(a: &[&[f32]], b: &[&[f32]]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| p.to_bits() == q.to_bits()))
}

/// The largest `|got - want|` over the parts, divided by `scale`: NaN when any part's is (a NaN
/// is never within tolerance, which `f64::max` would drop).
fn worst_error(got: &[&[f32]], want: &[&[f64]], scale: f64) -> f64 {
    worst_of(got.iter().zip(want).map(|(g, w)| max_abs(g, w))) / scale
}

/// The largest of `errors`, NaN when any is.
fn worst_of(errors: impl IntoIterator<Item = f64>) -> f64 {
    errors
        .into_iter()
        .fold(0.0f64, |worst, e| if e.is_nan() || e > worst { e } else { worst })
}

/// A mask over `[s, t]` that keeps about 80% of the scores and hides the rest, and key lengths
/// that shrink over the batch (`t` for the first sequence, `t - i·t/(2b)` for the `i`-th): what
/// the masked configurations hide.
fn key_masks(b: usize, s: usize, t: usize) -> (Vec<bool>, Vec<usize>) {
    let allowed = random_vec(s * t, 4).iter().map(|&x| x > -0.6).collect();
    let key_lengths = (0..b).map(|i| t - (i * t / (2 * b.max(1))).min(t)).collect();
    (allowed, key_lengths)
}

/// What of `options` hides keys, as the rows' labels name it (`", top-left causal, mask, key
/// lengths"`; empty for nothing), so that a label says what was checked.
fn hiding(options: &AttentionOptions<'_>) -> String {
    let causal = match options.causal {
        Causal::None => None,
        Causal::TopLeft => Some("top-left causal"),
        Causal::BottomRight => Some("bottom-right causal"),
    };
    let mask = (!matches!(options.mask, Mask::None)).then_some("mask");
    let lengths = options.key_lengths.is_some().then_some("key lengths");
    [causal, mask, lengths]
        .into_iter()
        .flatten()
        .map(|p| format!(", {p}"))
        .collect()
}

/// One attention configuration through flash (sequential and parallel), unfused and weights.
fn attention_rows(
    rows: &mut Vec<Row>,
    label: &str,
    [b, h, g, s, t, d]: [usize; 6],
    causal: Causal,
    masked: bool,
    lengths: bool,
) -> Result<()> {
    let q = random_vec(b * h * s * d, 1);
    let k = random_vec(b * g * t * d, 2);
    let v = random_vec(b * g * t * d, 3);
    let (allowed, key_lengths) = key_masks(b, s, t);
    let options = AttentionOptions {
        causal,
        mask: if masked {
            Mask::Allowed(broadcast_to(&allowed, &[s, t], [b, h, s, t])?)
        } else {
            Mask::None
        },
        key_lengths: lengths.then_some(&key_lengths[..]),
        ..Default::default()
    };
    let label = &format!("{label}{}", hiding(&options));
    let (qv, kv, vv) = (
        View4::contiguous(&q, [b, h, s, d])?,
        View4::contiguous(&k, [b, g, t, d])?,
        View4::contiguous(&v, [b, g, t, d])?,
    );
    let reference = attention_reference(qv, kv, vv, &options);
    let run = |par: Par, unfused: bool| -> Result<(Vec<f32>, Vec<f32>, f64)> {
        let mut out = vec![0.0f32; b * h * s * d];
        let mut lse = vec![0.0f32; b * h * s];
        let (_, secs) = timed(|| {
            let o = ViewMut4::contiguous(&mut out, [b, h, s, d])?;
            let l = Some(ViewMut::contiguous(&mut lse, [b, h, s])?);
            if unfused {
                attention_unfused(o, l, ForwardInputs::new(qv, kv, vv), &options, par)?;
            } else {
                flash_attention(o, l, ForwardInputs::new(qv, kv, vv), &options, par)?;
            }
            Ok(())
        })?;
        Ok((out, lse, secs))
    };
    let (seq_out, seq_lse, _) = run(Par::Seq, false)?;
    let (out, lse, secs) = run(Par::Rayon, false)?;
    let same = same_bits(&[&seq_out, &seq_lse], &[&out, &lse]);
    rows.push(Row {
        path: format!("flash {label}{}", if same { "" } else { " (threads DIFFER)" }),
        error: if same {
            worst_error(&[&out, &lse], &[&reference.out, &reference.lse], 1.0)
        } else {
            f64::INFINITY
        },
        tolerance: 2e-5,
        seconds: secs,
    });
    let (out, lse, secs) = run(Par::Rayon, true)?;
    rows.push(Row {
        path: format!("unfused {label}"),
        error: worst_error(&[&out, &lse], &[&reference.out, &reference.lse], 1.0),
        tolerance: 2e-5,
        seconds: secs,
    });
    backward_rows(rows, label, [b, h, g, s, t, d], [&q, &k, &v], &options)?;
    let mut weights = vec![0.0f32; b * h * s * t];
    let (_, secs) = timed(|| {
        let dst = WeightsDst::PerHead(ViewMut4::contiguous(&mut weights, [b, h, s, t])?);
        Ok(attention_weights(
            dst,
            qv,
            kv,
            View::contiguous(&lse, [b, h, s])?,
            &options,
            Par::Rayon,
        )?)
    })?;
    rows.push(Row {
        path: format!("weights {label}"),
        error: max_abs(&weights, &reference.weights),
        tolerance: 2e-5,
        seconds: secs,
    });
    Ok(())
}

/// The attention backward of one configuration on each of its paths (sequential and parallel,
/// which must give the same bits) against the f64 chain rule, relative to the largest gradient.
fn backward_rows(
    rows: &mut Vec<Row>,
    label: &str,
    [b, h, g, s, t, d]: [usize; 6],
    [q, k, v]: [&[f32]; 3],
    options: &AttentionOptions<'_>,
) -> Result<()> {
    let (qv, kv, vv) = (
        View4::contiguous(q, [b, h, s, d])?,
        View4::contiguous(k, [b, g, t, d])?,
        View4::contiguous(v, [b, g, t, d])?,
    );
    let mut out = vec![0.0f32; b * h * s * d];
    let mut lse = vec![0.0f32; b * h * s];
    let mut lse_lo = vec![0.0f32; b * h * s];
    // The forward as training runs it: with `lse_lo`, so the probabilities are exact.
    attention_with_lse_lo(
        ViewMut4::contiguous(&mut out, [b, h, s, d])?,
        ViewMut::contiguous(&mut lse, [b, h, s])?,
        ViewMut::contiguous(&mut lse_lo, [b, h, s])?,
        ForwardInputs::new(qv, kv, vv),
        options,
        Par::Rayon,
    )?;
    let dout = random_vec(b * h * s * d, 7);
    let inputs = BackwardInputs {
        q: qv,
        k: kv,
        v: vv,
        out: View4::contiguous(&out, [b, h, s, d])?,
        lse: View::contiguous(&lse, [b, h, s])?,
        lse_lo: Some(View::contiguous(&lse_lo, [b, h, s])?),
        dout: View4::contiguous(&dout, [b, h, s, d])?,
    };
    let want = attention_backward_reference(qv, kv, vv, inputs.dout, options);
    let largest = [&want.dq, &want.dk, &want.dv]
        .iter()
        .flat_map(|g| g.iter())
        .fold(1e-30f64, |m, x| m.max(x.abs()));
    let run = |path: BackwardPath, par: Par| -> Result<([Vec<f32>; 3], f64)> {
        let mut grads = [
            vec![0.0f32; b * h * s * d],
            vec![0.0f32; b * g * t * d],
            vec![0.0f32; b * g * t * d],
        ];
        let [dq, dk, dv] = &mut grads;
        let (_, secs) = timed(|| {
            let dst = Gradients {
                dq: ViewMut4::contiguous(dq, [b, h, s, d])?,
                dk: ViewMut4::contiguous(dk, [b, g, t, d])?,
                dv: ViewMut4::contiguous(dv, [b, g, t, d])?,
            };
            Ok(attention_backward_path(dst, inputs, options, par, path)?)
        })?;
        Ok((grads, secs))
    };
    let chosen = backward_path(b * g, s, t, 2 * d);
    for path in [BackwardPath::OnePass, BackwardPath::TwoPass, BackwardPath::Unfused] {
        let (seq, _) = run(path, Par::Seq)?;
        let (par, secs) = run(path, Par::Rayon)?;
        let same_bits = same_bits(&[&seq[0], &seq[1], &seq[2]], &[&par[0], &par[1], &par[2]]);
        let error = worst_error(&[&par[0], &par[1], &par[2]], &[&want.dq, &want.dk, &want.dv], largest);
        let name = format!("{path:?}").to_lowercase().replace("pass", "-pass");
        rows.push(Row {
            path: format!(
                "backward {name}{} {label}{}",
                if path == chosen { " (chosen)" } else { "" },
                if same_bits { "" } else { " (threads DIFFER)" }
            ),
            error: if same_bits { error } else { f64::INFINITY },
            // Relative to the largest gradient, as the kernel's own tests bound it.
            tolerance: 1e-5,
            seconds: secs,
        });
    }
    Ok(())
}

/// `x·Wᵀ + b` in f64 over token rows.
fn linear_f64(x: &[f64], w: &[f32], b: Option<&[f32]>, rows: std::ops::Range<usize>, in_dim: usize) -> Vec<f64> {
    let n = x.len() / in_dim;
    let out = rows.len();
    let mut y = vec![0.0; n * out];
    for i in 0..n {
        for (o, r) in rows.clone().enumerate() {
            let mut acc = b.map_or(0.0, |b| b[r] as f64);
            for j in 0..in_dim {
                acc += x[i * in_dim + j] * w[r * in_dim + j] as f64;
            }
            y[i * out + o] = acc;
        }
    }
    y
}

/// Multi-head self-attention in f64 from a state dict: `x: [B, S, E]` -> `[B, S, E]`.
fn mha_f64(dict: &StateDict, x: &[f64], [b, s, e, h]: [usize; 4]) -> Vec<f64> {
    let d = e / h;
    let w = dict["in_proj_weight"].data();
    let bias = Some(dict["in_proj_bias"].data());
    let (q, k, v) = (
        linear_f64(x, w, bias, 0..e, e),
        linear_f64(x, w, bias, e..2 * e, e),
        linear_f64(x, w, bias, 2 * e..3 * e, e),
    );
    let mut heads = vec![0.0; b * s * e];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..s {
                let scores: Vec<f64> = (0..s)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[(bi * s + i) * e + hi * d + c] * k[(bi * s + j) * e + hi * d + c])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    heads[(bi * s + i) * e + hi * d + c] = (0..s)
                        .map(|j| (scores[j] - m).exp() / sum * v[(bi * s + j) * e + hi * d + c])
                        .sum();
                }
            }
        }
    }
    linear_f64(
        &heads,
        dict["out_proj.weight"].data(),
        Some(dict["out_proj.bias"].data()),
        0..e,
        e,
    )
}

fn layer_norm_f64(x: &mut [f64], w: &[f32], b: &[f32], e: usize, eps: f64) {
    for row in x.chunks_mut(e) {
        let mean = row.iter().sum::<f64>() / e as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / e as f64;
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v - mean) / (var + eps).sqrt() * w[j] as f64 + b[j] as f64;
        }
    }
}

/// `attn check`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  attn check --threads 2\n\nExits 1 if any path is outside its tolerance on this machine."
)]
pub struct Args {
    #[command(flatten)]
    threads: crate::support::threads::Threads,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs `attn check`.
pub fn main(args: Args) -> Result<()> {
    args.threads.install(|n| run(n, args.json))
}

/// Every path against its reference, on `threads` workers.
fn run(threads: usize, as_json: bool) -> Result<()> {
    let mut rows = Vec::new();
    kernel_rows(&mut rows)?;
    attention_rows(
        &mut rows,
        "MHA B=2 H=4 S=T=200 D=64",
        [2, 4, 4, 200, 200, 64],
        Causal::None,
        false,
        false,
    )?;
    attention_rows(
        &mut rows,
        "GQA H=8 G=2",
        [2, 8, 2, 130, 130, 32],
        Causal::TopLeft,
        true,
        true,
    )?;
    attention_rows(
        &mut rows,
        "decode (split keys) H=8 G=2 T=3000",
        [1, 8, 2, 1, 3000, 64],
        Causal::BottomRight,
        false,
        false,
    )?;

    module_rows(&mut rows)?;
    report(&rows, threads, as_json)
}

/// exp and GEMM against f64.
fn kernel_rows(rows: &mut Vec<Row>) -> Result<()> {
    // exp over the softmax range, through the dispatched path.
    let xs: Vec<f32> = (0..100_001).map(|i| -87.0 + 87.0 * i as f32 / 100_000.0).collect();
    let mut ys = xs.clone();
    let (_, secs) = timed(|| {
        exp_slice(&mut ys);
        Ok(())
    })?;
    rows.push(Row {
        path: format!("exp (relative) on [{}, {}]", xs[0], xs[xs.len() - 1]),
        error: exp_error(&xs, &ys),
        tolerance: 2.5e-7,
        seconds: secs,
    });

    // GEMM with a transposed operand: a small product (faer's everywhere) and one large enough
    // for attn's own GEMM where it is the default (Intel and Zen 4 at AVX-512, Zen 3 at AVX2), each named by
    // the route it took. The f32 sums' error grows with the depth: 1e-5 at 67, 1e-4 at 300
    // (measured 2.9e-6 and 1.5e-5 on a Zen 4, on either GEMM).
    for ((m, n, k), tolerance) in [((130, 270, 300), 1e-4), ((129, 131, 67), 1e-5)] {
        let a = random_vec(m * k, 5);
        let bm = random_vec(n * k, 6);
        let mut c = vec![0.0f32; m * n];
        let lhs = View2::contiguous(&a, [m, k])?;
        let rhs = View2::contiguous(&bm, [n, k])?.permuted([1, 0])?;
        let (_, secs) = timed(|| {
            Ok(gemm(
                ViewMut2::contiguous(&mut c, [m, n])?,
                Accum::Replace,
                lhs,
                rhs,
                1.0,
                Par::Rayon,
            )?)
        })?;
        let mut want = vec![0.0f64; m * n];
        gemm_reference(&mut want, Accum::Replace, lhs, rhs, 1.0);
        rows.push(Row {
            path: format!("gemm ({}) {m}×{k}·{k}×{n}", gemm_route([m, n, k])),
            error: max_abs(&c, &want),
            tolerance,
            seconds: secs,
        });

        // The bf16 GEMM on the same operands against an f64 sum of the bf16-rounded inputs: its
        // error relative to Σ|â·b̂| is bounded by the f32 sums alone, (K + 1)·2^-24.
        let packed = Bf16Panels::pack(rhs);
        let (_, secs) = timed(|| {
            Ok(gemm_bf16(
                ViewMut2::contiguous(&mut c, [m, n])?,
                Accum::Replace,
                lhs,
                &packed,
                Par::Rayon,
            )?)
        })?;
        let rounded = packed.widened();
        rows.push(Row {
            path: format!("gemm bf16 ({}) {m}×{k}·{k}×{n}, error / Σ|a·b|", gemm_bf16_route()),
            error: bf16_gemm_error(&c, &a, &rounded, [m, n, k]),
            tolerance: (k + 1) as f64 * 2f64.powi(-24),
            seconds: secs,
        });
    }

    Ok(())
}

/// The largest relative error of `ys = e^xs` against f64 (NaN when any is).
fn exp_error(xs: &[f32], ys: &[f32]) -> f64 {
    worst_of(xs.iter().zip(ys).map(|(&x, &y)| {
        let want = (x as f64).exp();
        ((y as f64 - want) / want).abs()
    }))
}

/// The largest error of the bf16 product `c = a·b` (`[m, k]·[k, n]`, `b` already rounded)
/// against the f64 sums of the bf16-rounded operands, each relative to its `Σ|â·b̂|` (NaN when
/// any is).
fn bf16_gemm_error(c: &[f32], a: &[f32], rounded_b: &[f32], [m, n, k]: [usize; 3]) -> f64 {
    worst_of((0..m * n).map(|ij| {
        let (i, j) = (ij / n, ij % n);
        let (mut sum, mut abs) = (0.0f64, 0.0f64);
        for p in 0..k {
            let term = round_to_bf16(a[i * k + p]) as f64 * rounded_b[p * n + j] as f64;
            sum += term;
            abs += term.abs();
        }
        (c[ij] as f64 - sum).abs() / abs.max(f64::MIN_POSITIVE)
    }))
}

/// The multi-head attention module and a post-norm encoder layer against the f64 definition.
fn module_rows(rows: &mut Vec<Row>) -> Result<()> {
    // Multi-head attention module against the f64 definition.
    let (b, s, e, h) = (2, 50, 64, 4);
    let mut config = MhaConfig::new(e, h);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config, 7)?;
    let x = random_vec(b * s * e, 8);
    let (out, secs) = timed(|| {
        Ok(mha
            .forward_self(Sequence::batch_first(&x, b, s, e), &MhaOptions::default(), Par::Rayon)?
            .output)
    })?;
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let want = mha_f64(&mha.state_dict(), &x64, [b, s, e, h]);
    rows.push(Row {
        path: "multihead_attention module".into(),
        error: max_abs(&out, &want),
        tolerance: 2e-5,
        seconds: secs,
    });

    // A post-norm encoder layer against the f64 definition.
    let mut layer_config = LayerConfig::new(e, h);
    layer_config.dim_feedforward = 128;
    layer_config.batch_first = true;
    let layer = EncoderLayer::with_seed(layer_config, 9)?;
    let (out, secs) =
        timed(|| Ok(layer.forward(Sequence::batch_first(&x, b, s, e), &BlockMasks::default(), Par::Rayon)?))?;
    let dict = layer.state_dict();
    let sa_dict: StateDict = dict
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("self_attn.").map(|s| (s.to_string(), t.clone())))
        .collect();
    let mut h1: Vec<f64> = mha_f64(&sa_dict, &x64, [b, s, e, h])
        .iter()
        .zip(&x64)
        .map(|(a, r)| a + r)
        .collect();
    layer_norm_f64(&mut h1, dict["norm1.weight"].data(), dict["norm1.bias"].data(), e, 1e-5);
    let mut f = linear_f64(
        &h1,
        dict["linear1.weight"].data(),
        Some(dict["linear1.bias"].data()),
        0..128,
        e,
    );
    f.iter_mut().for_each(|v| *v = v.max(0.0));
    let f = linear_f64(
        &f,
        dict["linear2.weight"].data(),
        Some(dict["linear2.bias"].data()),
        0..e,
        128,
    );
    let mut want: Vec<f64> = f.iter().zip(&h1).map(|(a, r)| a + r).collect();
    layer_norm_f64(
        &mut want,
        dict["norm2.weight"].data(),
        dict["norm2.bias"].data(),
        e,
        1e-5,
    );
    rows.push(Row {
        path: "transformer_encoder_layer".into(),
        error: max_abs(&out, &want),
        tolerance: 1e-4,
        seconds: secs,
    });

    Ok(())
}

/// The table (or JSON); fails when a check is outside its tolerance.
fn report(rows: &[Row], threads: usize, as_json: bool) -> Result<()> {
    // A NaN error is not within tolerance.
    let passed = |r: &Row| r.error <= r.tolerance;
    let failed = rows.iter().filter(|r| !passed(r)).count();
    if as_json {
        let list: Vec<_> = rows
            .iter()
            .map(|r| json!({"path": r.path, "max_error": r.error, "tolerance": r.tolerance, "ok": passed(r), "seconds": r.seconds}))
            .collect();
        println!(
            "{}",
            json!({"simd": simd_level().to_string(), "bf16": bf16_level().to_string(), "threads": threads, "checks": list, "failed": failed})
        );
    } else {
        println!(
            "attn check: SIMD {}, bf16 {}, {threads} threads\n",
            simd_level(),
            bf16_level()
        );
        let width = rows.iter().map(|r| r.path.chars().count()).max().unwrap_or(4);
        println!(
            "{:<width$} {:>11} {:>10} {:>10}  result",
            "path", "max error", "tolerance", "time"
        );
        for r in rows {
            let verdict = if passed(r) { "ok" } else { "FAIL" };
            println!(
                "{:<width$} {:>11.2e} {:>10.0e} {:>8.2}ms  {verdict}",
                r.path,
                r.error,
                r.tolerance,
                r.seconds * 1e3
            );
        }
        println!("\n{} of {} checks passed", rows.len() - failed, rows.len());
    }
    if failed > 0 {
        bail!("{failed} check(s) outside tolerance on this machine");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(error: f64, tolerance: f64) -> Row {
        Row {
            path: "p".into(),
            error,
            tolerance,
            seconds: 0.0,
        }
    }

    /// A check passes at its tolerance and fails past it; a NaN or infinite error fails; the
    /// error counts the failures, in either output.
    #[test]
    fn report_fails_past_a_tolerance_and_on_nan() {
        for as_json in [false, true] {
            assert!(report(&[row(1e-6, 1e-5), row(1e-5, 1e-5)], 1, as_json).is_ok());
            let err = report(&[row(1e-6, 1e-5), row(1.1e-5, 1e-5)], 1, as_json).unwrap_err();
            assert_eq!(err.to_string(), "1 check(s) outside tolerance on this machine");
            let err = report(
                &[row(f64::NAN, 1e-5), row(f64::INFINITY, 1e-5), row(0.0, 1e-5)],
                1,
                as_json,
            )
            .unwrap_err();
            assert_eq!(err.to_string(), "2 check(s) outside tolerance on this machine");
        }
    }

    /// The f64 references by their definitions on hand-worked inputs.
    #[test]
    fn f64_references_follow_their_definitions() {
        // x = [[1, 2], [3, -1]], W = [[1, 0], [2, -1], [0.5, 3]], b = [0.5, -1, 2]: rows 1..3
        // of W·x + b.
        let x = [1.0, 2.0, 3.0, -1.0];
        let w = [1.0f32, 0.0, 2.0, -1.0, 0.5, 3.0];
        let b = [0.5f32, -1.0, 2.0];
        assert_eq!(linear_f64(&x, &w, Some(&b), 1..3, 2), [-1.0, 8.5, 6.0, 0.5]);
        assert_eq!(linear_f64(&x, &w, None, 0..1, 2), [1.0, 3.0]);
        // [1, 2, 6]: mean 3, variance 14/3, with eps = 1/3 a deviation of √5; scaled by w and
        // shifted by b.
        let mut row = [1.0, 2.0, 6.0];
        layer_norm_f64(&mut row, &[2.0, 3.0, -0.5], &[0.0, 1.0, 0.5], 3, 1.0 / 3.0);
        let r = 5f64.sqrt();
        for (got, want) in row.iter().zip([-4.0 / r, 1.0 - 3.0 / r, 0.5 - 1.5 / r]) {
            assert!((got - want).abs() < 1e-12, "{row:?}");
        }
    }

    /// Two runs agree only bit for bit in every part: `-0` is not `+0`, a NaN is itself.
    #[test]
    fn same_bits_means_every_bit_of_every_part() {
        let (a, b) = ([1.0f32, f32::NAN], [2.0f32]);
        assert!(same_bits(&[&a, &b], &[&[1.0, f32::NAN], &[2.0]]));
        assert!(!same_bits(&[&a, &b], &[&a, &[2.0000002]]));
        assert!(!same_bits(&[&[0.0]], &[&[-0.0]]));
        assert!(!same_bits(&[&a, &b], &[&a]));
        assert!(!same_bits(&[&a], &[&a[..1]]));
    }

    /// The worst error over every part, scaled; a NaN in any part wins over larger numbers.
    #[test]
    fn worst_error_takes_every_part_and_keeps_nan() {
        let got: [&[f32]; 2] = [&[1.0, 2.0], &[0.0]];
        assert_eq!(worst_error(&got, &[&[1.0, 2.5], &[0.25]], 1.0), 0.5);
        assert_eq!(worst_error(&got, &[&[1.0, 2.0], &[0.25]], 0.5), 0.5);
        assert_eq!(worst_error(&got, &[&[1.0, 2.5], &[0.25]], 2.0), 0.25);
        assert!(worst_error(&[&[f32::NAN], &[0.0]], &[&[1.0], &[9.0]], 1.0).is_nan());
        assert!(worst_of([1.0, f64::NAN, 2.0]).is_nan());
        assert_eq!(worst_of([1.0, 3.0, 2.0]), 3.0);
    }

    /// The masked configuration's mask hides some scores and keeps most, and its key lengths
    /// cut all but the first sequence short.
    #[test]
    fn key_masks_hide_some_keys() {
        let (allowed, lengths) = key_masks(2, 130, 130);
        let kept = allowed.iter().filter(|&&a| a).count() as f64 / allowed.len() as f64;
        assert!((0.7..0.9).contains(&kept), "{kept}");
        assert_eq!(lengths, [130, 98]);
        assert_eq!(key_masks(4, 3, 40).1, [40, 35, 30, 25]);
    }

    /// A label names what hides keys.
    #[test]
    fn labels_name_what_hides_keys() {
        let lengths = [3, 2];
        let allowed = [true; 4];
        let mut options = AttentionOptions::default();
        assert_eq!(hiding(&options), "");
        options.causal = Causal::TopLeft;
        assert_eq!(hiding(&options), ", top-left causal");
        options.causal = Causal::BottomRight;
        options.mask = Mask::Allowed(View4::new(&allowed, [1, 1, 2, 2], [0, 0, 2, 1]).unwrap());
        options.key_lengths = Some(&lengths);
        assert_eq!(hiding(&options), ", bottom-right causal, mask, key lengths");
    }

    /// `exp`'s error is relative at every point, small arguments included; a NaN fails.
    #[test]
    fn exp_error_is_relative_everywhere() {
        let xs = [-30.0f32, -10.0, 0.0];
        let scaled: Vec<f32> = xs.iter().map(|&x| ((x as f64).exp() * (1.0 + 1e-3)) as f32).collect();
        assert!((exp_error(&xs, &scaled) - 1e-3).abs() < 1e-6);
        let only_small = [scaled[0], (-10.0f64).exp() as f32, 1.0];
        assert!((exp_error(&xs, &only_small) - 1e-3).abs() < 1e-6);
        assert!(exp_error(&xs, &[f32::NAN, 4.539_993e-5, 1.0]).is_nan());
    }

    /// The bf16 product's error is per element, relative to that element's `Σ|â·b̂|`.
    #[test]
    fn bf16_gemm_error_is_relative_to_each_sum_of_magnitudes() {
        // [1, -2]·[3, 1]ᵀ = 1 with Σ|a·b| = 5: 1.5 is 0.1 off.
        assert!((bf16_gemm_error(&[1.5], &[1.0, -2.0], &[3.0, 1.0], [1, 1, 2]) - 0.1).abs() < 1e-12);
        // [1, 2]ᵀ·[3, 4] = [[3, 4], [6, 8]]: only element (1, 0) is off, by 0.6 of 6.
        let c = [3.0f32, 4.0, 6.6, 8.0];
        let got = bf16_gemm_error(&c, &[1.0, 2.0], &[3.0, 4.0], [2, 2, 1]);
        assert!((got - 0.1).abs() < 1e-6, "{got}");
        assert_eq!(
            bf16_gemm_error(&[3.0, 4.0, 6.0, 8.0], &[1.0, 2.0], &[3.0, 4.0], [2, 2, 1]),
            0.0
        );
        assert!(bf16_gemm_error(&[f32::NAN, 4.0, 6.0, 8.0], &[1.0, 2.0], &[3.0, 4.0], [2, 2, 1]).is_nan());
        // The operand `a` is rounded to bf16 first: 1 + 2^-10 is 1 in bf16.
        assert_eq!(bf16_gemm_error(&[3.0], &[1.0 + 1.0 / 1024.0], &[3.0], [1, 1, 1]), 0.0);
    }

    /// `mha_f64` against an independent f64 reference: the projections by `linear_f64`, each
    /// head by the kernels' `attention_reference`, the output projection again.
    #[test]
    fn mha_reference_is_attention_between_its_projections() {
        let (b, s, e, h) = (2, 5, 8, 2);
        let d = e / h;
        let mut config = MhaConfig::new(e, h);
        config.batch_first = true;
        let dict = MultiHeadAttention::with_seed(config, 3).unwrap().state_dict();
        let x: Vec<f64> = random_vec(b * s * e, 4).iter().map(|&v| v as f64).collect();
        let (w, bias) = (dict["in_proj_weight"].data(), dict["in_proj_bias"].data());
        // [B, S, E] f64 -> [B, H, S, D] f32 (exact: the reference takes f32 views).
        let heads = |rows: std::ops::Range<usize>| -> Vec<f32> {
            let y = linear_f64(&x, w, Some(bias), rows, e);
            let mut out = vec![0.0f32; b * s * e];
            for (i, v) in y.iter().enumerate() {
                let (bi, si, c) = (i / (s * e), i / e % s, i % e);
                out[((bi * h + c / d) * s + si) * d + c % d] = *v as f32;
            }
            out
        };
        let (q, k, v) = (heads(0..e), heads(e..2 * e), heads(2 * e..3 * e));
        let [qv, kv, vv] = [&q, &k, &v].map(|t| View4::contiguous(t, [b, h, s, d]).unwrap());
        let reference = attention_reference(qv, kv, vv, &AttentionOptions::default());
        let mut concat = vec![0.0f64; b * s * e];
        for (i, o) in reference.out.iter().enumerate() {
            let (bh, si, c) = (i / (s * d), i / d % s, i % d);
            concat[((bh / h) * s + si) * e + (bh % h) * d + c] = *o;
        }
        let want = linear_f64(
            &concat,
            dict["out_proj.weight"].data(),
            Some(dict["out_proj.bias"].data()),
            0..e,
            e,
        );
        // Q, K and V rounded to f32 for the kernels' reference: about 1e-7 apart.
        let got = mha_f64(&dict, &x, [b, s, e, h]);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "{worst}");
    }
}
