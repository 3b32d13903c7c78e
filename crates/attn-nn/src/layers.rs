//! The pieces around attention: `Linear`, `LayerNorm` and `RmsNorm` (with the residual add fused
//! into the same pass), activations, and the feed-forward block.
//!
//! Every layer works on token rows `[N, E]` in storage order, so it is indifferent to batch-first
//! or sequence-first layouts. Rows are independent: parallel loops over rows give the same bits
//! whatever the thread count.

use attn_core::kernels::Par;
use attn_core::{linear, take, StateDict, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::invalid;
use crate::Result;

/// Rows per parallel chunk in row-wise passes.
const ROW_CHUNK: usize = 16;

/// `y = x·Wᵀ + b`: `x: [N, in]` -> `[N, out]`; state-dict names `weight` `[out, in]`, `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Takes `{prefix}weight` (and `{prefix}bias` when `bias`) out of `dict`.
    pub fn load(dict: &mut StateDict, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = take(dict, &format!("{prefix}weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(take(dict, &format!("{prefix}bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Puts the tensors back under `prefix`.
    pub fn save(&self, dict: &mut StateDict, prefix: &str) {
        dict.insert(format!("{prefix}weight"), self.weight.clone());
        if let Some(b) = &self.bias {
            dict.insert(format!("{prefix}bias"), b.clone());
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.weight.shape()[0], self.weight.shape()[1]]
    }

    /// `x: [N, in]` rows -> `[N, out]` rows.
    pub fn forward(&self, x: &[f32], par: Par) -> Result<Vec<f32>> {
        let [out, inp] = self.dims();
        let n = x.len() / inp.max(1);
        let mut y = vec![0.0f32; n * out];
        let view = attn_core::kernels::View2::contiguous(x, [n, inp]).map_err(attn_core::AttnError::from)?;
        linear(
            &mut y,
            out,
            view,
            self.weight.data(),
            0..out,
            inp,
            self.bias.as_ref().map(|b| b.data()),
            par,
        )?;
        Ok(y)
    }
}

/// Layer normalisation over the last dim (`weight`, `bias`: `[E]`), PyTorch's `nn.LayerNorm`
/// (biased variance, `eps` inside the square root); or RMS normalisation (`weight` only).
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
    kind: NormKind,
}

/// Which normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) · w + b`.
    LayerNorm,
    /// `x / sqrt(mean(x²) + eps) · w`.
    RmsNorm,
}

impl Norm {
    /// Takes `{prefix}weight` (and `{prefix}bias` for layer norm with bias) out of `dict`.
    pub fn load(dict: &mut StateDict, prefix: &str, dim: usize, eps: f64, kind: NormKind, bias: bool) -> Result<Self> {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(invalid("layer_norm_eps", eps, "a positive finite number"));
        }
        let weight = take(dict, &format!("{prefix}weight"), &[dim])?;
        let bias = if bias && kind == NormKind::LayerNorm {
            Some(take(dict, &format!("{prefix}bias"), &[dim])?)
        } else {
            None
        };
        Ok(Norm {
            weight,
            bias,
            eps: eps as f32,
            kind,
        })
    }

    /// Puts the tensors back under `prefix`.
    pub fn save(&self, dict: &mut StateDict, prefix: &str) {
        dict.insert(format!("{prefix}weight"), self.weight.clone());
        if let Some(b) = &self.bias {
            dict.insert(format!("{prefix}bias"), b.clone());
        }
    }

    fn row(&self, src: &[f32], dst: &mut [f32]) {
        let e = src.len() as f64;
        let w = self.weight.data();
        // Statistics in f64 over an L1-resident row: exact enough to match PyTorch to 1e-6.
        let (shift, inv) = match self.kind {
            NormKind::LayerNorm => {
                let mean = src.iter().map(|&x| x as f64).sum::<f64>() / e;
                let var = src.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / e;
                (mean as f32, (1.0 / (var + self.eps as f64).sqrt()) as f32)
            }
            NormKind::RmsNorm => {
                let ms = src.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / e;
                (0.0, (1.0 / (ms + self.eps as f64).sqrt()) as f32)
            }
        };
        match &self.bias {
            Some(b) => {
                for (((d, &x), &w), &b) in dst.iter_mut().zip(src).zip(w).zip(b.data()) {
                    *d = (x - shift) * inv * w + b;
                }
            }
            None => {
                for ((d, &x), &w) in dst.iter_mut().zip(src).zip(w) {
                    *d = (x - shift) * inv * w;
                }
            }
        }
    }

    fn dim(&self) -> usize {
        self.weight.shape()[0]
    }

    /// `norm(x)` into a new buffer: `x: [N, E]` rows.
    pub fn forward(&self, x: &[f32], par: Par) -> Vec<f32> {
        let e = self.dim();
        let mut out = vec![0.0f32; x.len()];
        zip_chunks(par, &mut out, x, e * ROW_CHUNK, |dst, src| {
            dst.chunks_mut(e).zip(src.chunks(e)).for_each(|(d, s)| self.row(s, d))
        });
        out
    }

    /// The residual add and the norm in one pass: `x = norm(x + residual)` (post-norm).
    pub fn add_forward_in_place(&self, x: &mut [f32], residual: &[f32], par: Par) {
        let e = self.dim();
        zip_chunks(par, x, residual, e * ROW_CHUNK, |xs, rs| {
            let mut sum = vec![0.0f32; e];
            for (xr, rr) in xs.chunks_mut(e).zip(rs.chunks(e)) {
                sum.iter_mut()
                    .zip(xr.iter().zip(rr))
                    .for_each(|(s, (&a, &b))| *s = a + b);
                self.row(&sum, xr);
            }
        });
    }

    /// The residual add and the next norm in one pass (pre-norm): `x += residual`, and returns
    /// `norm(x)`.
    pub fn add_then_forward(&self, x: &mut [f32], residual: &[f32], par: Par) -> Vec<f32> {
        let e = self.dim();
        let mut out = vec![0.0f32; x.len()];
        let n = e * ROW_CHUNK;
        let body = |(os, (xs, rs)): (&mut [f32], (&mut [f32], &[f32]))| {
            for ((o, xr), rr) in os.chunks_mut(e).zip(xs.chunks_mut(e)).zip(rs.chunks(e)) {
                xr.iter_mut().zip(rr).for_each(|(a, &b)| *a += b);
                self.row(xr, o);
            }
        };
        match par {
            Par::Seq => out
                .chunks_mut(n)
                .zip(x.chunks_mut(n).zip(residual.chunks(n)))
                .for_each(body),
            Par::Rayon => out
                .par_chunks_mut(n)
                .zip(x.par_chunks_mut(n).zip(residual.par_chunks(n)))
                .for_each(body),
        }
        out
    }
}

/// `f(dst_chunk, src_chunk)` over matching chunks of `n` elements, in order on this thread
/// (`Par::Seq`) or on the rayon pool (`Par::Rayon`); every chunk's arithmetic is the same
/// either way.
fn zip_chunks(par: Par, dst: &mut [f32], src: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync + Send) {
    match par {
        Par::Seq => dst.chunks_mut(n).zip(src.chunks(n)).for_each(|(d, s)| f(d, s)),
        Par::Rayon => dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(|(d, s)| f(d, s)),
    }
}

/// `x += residual`.
pub fn add_in_place(x: &mut [f32], residual: &[f32], par: Par) {
    zip_chunks(par, x, residual, 4096, |a, b| {
        a.iter_mut().zip(b).for_each(|(x, &r)| *x += r)
    });
}

/// `erf(x)` in f32: a rational approximation `x·P(x²)/Q(x²)` on `[-4, 4]` (clamped outside,
/// where `|1 - |erf|| < 2e-8`), the one Eigen uses. Branch-free, so the loop vectorises; the
/// absolute error in f32 is below 5e-7 over the real line (test `erf_is_accurate`).
#[inline]
pub fn erf(x: f32) -> f32 {
    const A: [f32; 7] = [
        -2.726_142e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const B: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = A[1..].iter().fold(A[0], |acc, &c| acc * x2 + c) * x;
    let q = B[1..].iter().fold(B[0], |acc, &c| acc * x2 + c);
    p / q
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(x, 0)`.
    #[default]
    Relu,
    /// `x·Φ(x)` with the exact erf (PyTorch's `gelu`, BERT's `gelu`).
    Gelu,
    /// The tanh approximation (`gelu(approximate="tanh")`, `gelu_new`).
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    /// Applies the activation in place.
    pub fn apply(self, x: &mut [f32], par: Par) {
        let body = |chunk: &mut [f32]| match self {
            Activation::Relu => chunk.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Gelu => chunk
                .iter_mut()
                .for_each(|v| *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2))),
            Activation::GeluTanh => chunk.iter_mut().for_each(|v| {
                let x = *v as f64;
                let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                *v = (0.5 * x * (1.0 + inner.tanh())) as f32;
            }),
        };
        match par {
            Par::Seq => x.chunks_mut(4096).for_each(body),
            Par::Rayon => x.par_chunks_mut(4096).for_each(body),
        }
    }
}

/// The feed-forward block: `linear2(act(linear1(x)))`, `x: [N, E]` -> `[N, E]` through `[N, F]`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// `[F, E]`.
    pub linear1: Linear,
    /// `[E, F]`.
    pub linear2: Linear,
    /// Between the two.
    pub activation: Activation,
}

impl FeedForward {
    /// `x: [N, E]` rows -> `[N, E]` rows. The bias of `linear1` is folded into its GEMM and the
    /// activation runs in one pass after it.
    pub fn forward(&self, x: &[f32], par: Par) -> Result<Vec<f32>> {
        let mut hidden = self.linear1.forward(x, par)?;
        self.activation.apply(&mut hidden, par);
        self.linear2.forward(&hidden, par)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_match_their_definitions() {
        let e = 5;
        let mut dict = StateDict::new();
        dict.insert(
            "weight".into(),
            Tensor::new("w", vec![e], vec![1.0, 2.0, 0.5, -1.0, 1.5]).unwrap(),
        );
        dict.insert(
            "bias".into(),
            Tensor::new("b", vec![e], vec![0.1, 0.0, -0.2, 0.3, 0.0]).unwrap(),
        );
        // Epsilons far from PyTorch's default 1e-5, so a norm that ignores its own shows.
        let (ln_eps, rms_eps) = (0.1, 0.05);
        let ln = Norm::load(&mut dict.clone(), "", e, ln_eps, NormKind::LayerNorm, true).unwrap();
        let rms = Norm::load(&mut dict, "", e, rms_eps, NormKind::RmsNorm, false).unwrap();
        let x = [1.0f32, -2.0, 3.0, 0.5, 4.0];
        let mean = x.iter().sum::<f32>() as f64 / 5.0;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 5.0;
        let w = [1.0, 2.0, 0.5, -1.0, 1.5];
        let b = [0.1, 0.0, -0.2, 0.3, 0.0];
        // Each on this thread (Par::Seq) and on the pool (Par::Rayon).
        for par in [Par::Seq, Par::Rayon] {
            let got = ln.forward(&x, par);
            for i in 0..e {
                let want = (x[i] as f64 - mean) / (var + ln_eps).sqrt() * w[i] + b[i];
                // Measured 8e-8 (f32 rounding of values below 4); eps = 1e-5 instead is 3.6e-2 off.
                assert!((got[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
            }
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 5.0;
            let got = rms.forward(&x, par);
            for i in 0..e {
                let want = x[i] as f64 / (ms + rms_eps).sqrt() * w[i];
                assert!((got[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
            }
            // Fused residual add: norm(x + r) == norm applied to the sum.
            let r = [0.5f32; 5];
            let mut fused = x.to_vec();
            ln.add_forward_in_place(&mut fused, &r, par);
            let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
            assert_eq!(fused, ln.forward(&sum, par));
            let mut pre = x.to_vec();
            let normed = ln.add_then_forward(&mut pre, &r, par);
            assert_eq!(pre, sum);
            assert_eq!(normed, ln.forward(&sum, par));
        }
    }

    #[test]
    fn erf_is_accurate() {
        let mut worst = 0.0f64;
        for i in -80_000..=80_000 {
            let x = i as f64 / 10_000.0;
            worst = worst.max((erf(x as f32) as f64 - libm::erf(x)).abs());
        }
        assert!(worst < 5e-7, "worst absolute error {worst:e}");
        assert_eq!(erf(f32::INFINITY), erf(4.0));
    }

    #[test]
    fn activations() {
        let mut x = [-2.0f32, -0.5, 0.0, 0.5, 3.0];
        Activation::Relu.apply(&mut x, Par::Seq);
        assert_eq!(x, [0.0, 0.0, 0.0, 0.5, 3.0]);
        let mut g = [-1.0f32, 0.0, 1.0, 2.0];
        Activation::Gelu.apply(&mut g, Par::Rayon);
        // PyTorch: gelu([-1, 0, 1, 2]) = [-0.15865526, 0, 0.8413447, 1.9544997]
        for (a, b) in g.iter().zip([-0.158_655_26f32, 0.0, 0.841_344_7, 1.954_499_7]) {
            assert!((a - b).abs() < 1e-6, "{a} {b}");
        }
        let mut t = [1.0f32];
        Activation::GeluTanh.apply(&mut t, Par::Seq);
        assert!((t[0] - 0.841_192).abs() < 1e-5, "{}", t[0]);
    }
}
