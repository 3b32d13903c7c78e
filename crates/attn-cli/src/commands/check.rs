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
    let allowed: Vec<bool> = random_vec(s * t, 4).iter().map(|&x| x > -0.6).collect();
    let key_lengths: Vec<usize> = (0..b).map(|i| t - (i * t / (2 * b.max(1))).min(t)).collect();
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
    let bits_differ = seq_out.iter().zip(&out).any(|(a, b)| a.to_bits() != b.to_bits())
        || seq_lse.iter().zip(&lse).any(|(a, b)| a.to_bits() != b.to_bits());
    rows.push(Row {
        path: format!("flash {label}{}", if bits_differ { " (threads DIFFER)" } else { "" }),
        error: if bits_differ {
            f64::INFINITY
        } else {
            max_abs(&out, &reference.out).max(max_abs(&lse, &reference.lse))
        },
        tolerance: 2e-5,
        seconds: secs,
    });
    let (out, lse, secs) = run(Par::Rayon, true)?;
    rows.push(Row {
        path: format!("unfused {label}"),
        error: max_abs(&out, &reference.out).max(max_abs(&lse, &reference.lse)),
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
    let chosen = backward_path(b * g, s, t);
    for path in [BackwardPath::OnePass, BackwardPath::TwoPass, BackwardPath::Unfused] {
        let (seq, _) = run(path, Par::Seq)?;
        let (par, secs) = run(path, Par::Rayon)?;
        let same_bits = seq
            .iter()
            .zip(&par)
            .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let error = [(&par[0], &want.dq), (&par[1], &want.dk), (&par[2], &want.dv)]
            .iter()
            .map(|(got, want)| max_abs(got, want))
            .fold(0.0f64, |worst, e| if e.is_nan() || e > worst { e } else { worst })
            / largest;
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
        "GQA H=8 G=2 causal, mask, lengths",
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
    let exp_err = xs
        .iter()
        .zip(&ys)
        .map(|(&x, &y)| ((y as f64 - (x as f64).exp()) / (x as f64).exp()).abs())
        .fold(0.0, f64::max);
    rows.push(Row {
        path: "exp (relative)".into(),
        error: exp_err,
        tolerance: 2.5e-7,
        seconds: secs,
    });

    // GEMM with a transposed operand: a small product (faer's everywhere) and one large enough
    // for attn's own GEMM where it is the default (Intel and Zen 4 at AVX-512), each named by
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
        let mut worst = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let (mut sum, mut abs) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let term = round_to_bf16(a[i * k + p]) as f64 * rounded[p * n + j] as f64;
                    sum += term;
                    abs += term.abs();
                }
                worst = worst.max((c[i * n + j] as f64 - sum).abs() / abs.max(f64::MIN_POSITIVE));
            }
        }
        rows.push(Row {
            path: format!("gemm bf16 ({}) {m}×{k}·{k}×{n}, error / Σ|a·b|", gemm_bf16_route()),
            error: worst,
            tolerance: (k + 1) as f64 * 2f64.powi(-24),
            seconds: secs,
        });
    }

    Ok(())
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
