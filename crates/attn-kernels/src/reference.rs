//! Naive f64 references of the attention kernels: the definition, written as plainly as possible.
//!
//! These are what the fast paths are tested against; they allocate freely and run in
//! `O(B·H·S·T·(D + Dv))` with no tiling. Passes are numbered as in the flash kernel.

use crate::mask::{resolve_scale, Mask};
use crate::{AttentionOptions, View4};

/// The reference result of an attention call.
#[derive(Debug, Clone)]
pub struct ReferenceAttention {
    /// `[B, H, S, Dv]` row-major.
    pub out: Vec<f64>,
    /// `[B, H, S]`: log-sum-exp of each row, `-inf` when nothing is visible.
    pub lse: Vec<f64>,
    /// `[B, H, S, T]`: the softmax weights.
    pub weights: Vec<f64>,
    /// The largest `|score|` of a visible key (scale, ALiBi and additive masks included). The
    /// f32 paths round scores of this size, so their error grows with it: tests bound it by
    /// a few `f32::EPSILON · max_abs_score` on top of their base tolerance.
    pub max_abs_score: f64,
}

/// `q: [B, H, S, D]`, `k: [B, G, T, D]`, `v: [B, G, T, Dv]` -> out `[B, H, S, Dv]`, lse
/// `[B, H, S]` and weights `[B, H, S, T]`, all in f64. Shapes must already be valid.
pub fn attention_reference(
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    options: &AttentionOptions<'_>,
) -> ReferenceAttention {
    let [b_n, h_n, s_n, d] = q.shape();
    let [_, g_n, t_n, _] = k.shape();
    let dv = v.shape()[3];
    let rep = h_n / g_n;
    let scale = resolve_scale(options, d) as f64;
    let mut out = vec![0.0; b_n * h_n * s_n * dv];
    let mut lse = vec![f64::NEG_INFINITY; b_n * h_n * s_n];
    let mut weights = vec![0.0; b_n * h_n * s_n * t_n];
    let mut scores = vec![0.0f64; t_n];
    let mut max_abs_score = 0.0f64;
    for b in 0..b_n {
        for h in 0..h_n {
            let g = h / rep;
            for s in 0..s_n {
                let limit = options
                    .causal
                    .key_limit(s, s_n, t_n)
                    .min(options.key_lengths.map_or(t_n, |l| l[b]));
                // Pass 1: scaled scores, masked.
                for (t, score) in scores.iter_mut().enumerate() {
                    let mut dot = 0.0f64;
                    for j in 0..d {
                        dot += q.get([b, h, s, j]) as f64 * k.get([b, g, t, j]) as f64;
                    }
                    let mut x = dot * scale;
                    if let Some(slopes) = options.alibi_slopes {
                        let position = (s + t_n) as f64 - s_n as f64;
                        x -= slopes[h] as f64 * (position - t as f64);
                    }
                    for mask in [&options.mask, &options.key_mask] {
                        match mask {
                            Mask::None => {}
                            Mask::Additive(m) => {
                                // `-inf` hides the key whatever its score (even NaN).
                                let add = m.get([b, h, s, t]) as f64;
                                x = if add == f64::NEG_INFINITY { add } else { x + add };
                            }
                            Mask::Allowed(m) => {
                                if !m.get([b, h, s, t]) {
                                    x = f64::NEG_INFINITY
                                }
                            }
                            Mask::Disallowed(m) => {
                                if m.get([b, h, s, t]) {
                                    x = f64::NEG_INFINITY
                                }
                            }
                        }
                    }
                    if t >= limit {
                        x = f64::NEG_INFINITY;
                    }
                    if x.is_finite() {
                        max_abs_score = max_abs_score.max(x.abs());
                    }
                    *score = x;
                }
                let row = (b * h_n + h) * s_n + s;
                if scores.iter().any(|x| x.is_nan()) {
                    // A NaN score of a visible key: the row's softmax is NaN on every key it
                    // sees (hidden keys keep weight 0), and so are its output and lse.
                    lse[row] = f64::NAN;
                    out[row * dv..(row + 1) * dv].fill(f64::NAN);
                    for t in 0..t_n {
                        if scores[t] != f64::NEG_INFINITY {
                            weights[row * t_n + t] = f64::NAN;
                        }
                    }
                    continue;
                }
                // Pass 2: row max, exp and sum.
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let sum: f64 = scores.iter().map(|&x| (x - m).exp()).sum();
                lse[row] = m + sum.ln();
                // Passes 3 and 4: each weight rescaled by 1/sum, then weighted V, over the
                // visible keys only (a hidden key's value never enters, not even as `0·v`).
                for t in 0..t_n {
                    if scores[t] == f64::NEG_INFINITY {
                        continue;
                    }
                    let p = (scores[t] - m).exp() / sum;
                    weights[row * t_n + t] = p;
                    for j in 0..dv {
                        out[row * dv + j] += p * v.get([b, g, t, j]) as f64;
                    }
                }
            }
        }
    }
    ReferenceAttention {
        out,
        lse,
        weights,
        max_abs_score,
    }
}

/// The reference gradients of `sum(out ∘ dout)`, in f64, row-major, each the shape of its
/// input.
#[derive(Debug, Clone)]
pub struct ReferenceGradients {
    /// `[B, H, S, D]`.
    pub dq: Vec<f64>,
    /// `[B, G, T, D]`.
    pub dk: Vec<f64>,
    /// `[B, G, T, Dv]`.
    pub dv: Vec<f64>,
}

/// The backward pass by its definition, from the reference weights `P` of
/// [`attention_reference`]: for each row, `dV[t] += P_t · dout`, `dP_t = dout · v[t]`,
/// `dS_t = P_t · (dP_t − Σ_u P_u dP_u)`, `dQ += scale · Σ_t dS_t k[t]`,
/// `dK[t] += scale · dS_t · q`. Keys a row cannot see (weight exactly 0 from a hidden key) get
/// nothing from it; a NaN row gives NaN to its `dQ` and to the keys it sees.
pub fn attention_backward_reference(
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    dout: View4<'_, f32>,
    options: &AttentionOptions<'_>,
) -> ReferenceGradients {
    let [b_n, h_n, s_n, d] = q.shape();
    let [_, g_n, t_n, _] = k.shape();
    let dv_n = v.shape()[3];
    let rep = h_n / g_n;
    let scale = resolve_scale(options, d) as f64;
    let forward = attention_reference(q, k, v, options);
    let mut dq = vec![0.0; b_n * h_n * s_n * d];
    let mut dk = vec![0.0; b_n * g_n * t_n * d];
    let mut dv = vec![0.0; b_n * g_n * t_n * dv_n];
    let mut d_p = vec![0.0f64; t_n];
    for b in 0..b_n {
        for h in 0..h_n {
            let g = h / rep;
            for s in 0..s_n {
                let row = (b * h_n + h) * s_n + s;
                let p = &forward.weights[row * t_n..(row + 1) * t_n];
                for (t, d_p_t) in d_p.iter_mut().enumerate() {
                    *d_p_t = (0..dv_n)
                        .map(|c| dout.get([b, h, s, c]) as f64 * v.get([b, g, t, c]) as f64)
                        .sum();
                }
                let delta: f64 = (0..t_n).filter(|&t| p[t] != 0.0).map(|t| p[t] * d_p[t]).sum();
                for t in 0..t_n {
                    if p[t] == 0.0 {
                        continue;
                    }
                    let kv = (b * g_n + g) * t_n + t;
                    for c in 0..dv_n {
                        dv[kv * dv_n + c] += p[t] * dout.get([b, h, s, c]) as f64;
                    }
                    let ds = p[t] * (d_p[t] - delta);
                    for j in 0..d {
                        dq[row * d + j] += scale * ds * k.get([b, g, t, j]) as f64;
                        dk[kv * d + j] += scale * ds * q.get([b, h, s, j]) as f64;
                    }
                }
            }
        }
    }
    ReferenceGradients { dq, dk, dv }
}
