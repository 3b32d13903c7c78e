//! The pieces around attention: `Linear`, `LayerNorm` and `RmsNorm` (with the residual add fused
//! into the same pass), activations, and the feed-forward block.
//!
//! Every layer works on token rows `[N, E]` in storage order, so it is indifferent to batch-first
//! or sequence-first layouts. Rows are independent: parallel loops over rows give the same bits
//! whatever the thread count. The row and pointwise work runs in attn-kernels' SIMD kernels
//! (`norm_rows`, `add_norm_rows`, `add_then_norm_rows`, `bias_activation`), at the level the
//! machine has.

use attn_core::kernels::{self, arena, LinearShape, NormParams, Par, View2};
use std::sync::{Arc, OnceLock};

use attn_core::kernels::{Bf16Panels, F32Panels};
use attn_core::{
    linear_bf16, linear_packed, pack_weight_f32, pack_weight_of, take, AttnError, ParamPath, Parameters, Precision,
    StateDict, Tensor,
};
use serde::{Deserialize, Serialize};

use crate::error::invalid;
pub use crate::step::Dropout;
use crate::step::Step;
use crate::Result;

pub use attn_core::kernels::{erf, NormKind};

/// Token rows per pass of the feed-forward block: `[FFN_ROWS, F]` of hidden activations stay
/// in cache between the first GEMM, its bias and activation, and the second GEMM. Measured
/// on MiniLM (`attn bench embed`, 1000 sentences, a Zen 4 EPYC at avx512): 128 to 512 rows
/// ran alike, unblocked was 5–15% slower.
const FFN_ROWS: usize = 256;

/// `y = x·Wᵀ + b`: `x: [N, in]` -> `[N, out]`; state-dict names `weight` `[out, in]`, `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight rounded to bf16 and packed, when the precision is [`Precision::Bf16`].
    bf16: Option<Arc<LinearBf16>>,
    /// `Wᵀ` packed in f32, when the precision is [`Precision::F32`] and attn's own GEMM reads
    /// it ([`F32Panels::worth_packing`] of its shape): packed at the first product of enough
    /// rows to read it ([`F32Panels::read_by`]), so a layer that only decodes never holds it.
    f32: Option<Arc<OnceLock<F32Panels>>>,
}

/// [`Linear`]'s weight in bf16: `Wᵀ` for the forward, packed when the precision is set, and `W`
/// for the backward's `dx = dy·W` (mixed-precision training), packed at the first backward.
#[derive(Debug)]
struct LinearBf16 {
    forward: Bf16Panels,
    backward: OnceLock<Bf16Panels>,
}

impl LinearBf16 {
    /// `weight: [out, in]` packed for the forward, and for the backward now too if `backward`
    /// (else at the first backward).
    fn packed(weight: &Tensor, backward: bool) -> attn_core::Result<Self> {
        let packs = LinearBf16 {
            forward: pack_weight_of(weight, 0..weight.shape()[0])?,
            backward: OnceLock::new(),
        };
        if backward {
            let _ = packs.backward.set(Self::pack_backward(weight));
        }
        Ok(packs)
    }

    /// `W` packed as it is, the right operand of the backward's `dx = dy·W`.
    fn pack_backward(weight: &Tensor) -> Bf16Panels {
        let view =
            View2::contiguous(weight.data(), [weight.shape()[0], weight.shape()[1]]).expect("the weight is [out, in]");
        Bf16Panels::pack(view)
    }
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
        Ok(Linear {
            weight,
            bias,
            bf16: None,
            f32: None,
        })
    }

    /// The precision of the product ([`Precision`]).
    pub fn precision(&self) -> Precision {
        if self.bf16.is_some() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// Whether the layer holds a packed copy of its weight: in bf16, or in f32 where attn's own
    /// GEMM has read one ([`Linear::set_precision`]).
    pub fn is_packed(&self) -> bool {
        self.bf16.is_some() || self.f32.as_ref().is_some_and(|p| p.get().is_some())
    }

    /// `Bf16` rounds and packs the current weight once. `F32` packs it once in f32 where
    /// attn's own GEMM reads the packed copy ([`F32Panels::worth_packing`]: the own GEMM's bits,
    /// without packing `Wᵀ` on every call), at the first product of enough rows to read it
    /// ([`F32Panels::read_by`]), and holds no copy elsewhere. Handing the weight out
    /// mutably ([`Parameters::visit_params`]) drops either copy and returns the layer to f32;
    /// an update in place ([`Parameters::update_params`]) packs the bf16 copies again.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let [out, inp] = self.dims();
        (self.bf16, self.f32) = (None, None);
        match precision {
            Precision::F32 if F32Panels::worth_packing([inp, out]) => {
                self.f32 = Some(Arc::new(OnceLock::new()));
            }
            Precision::F32 => {}
            Precision::Bf16 => self.bf16 = Some(Arc::new(LinearBf16::packed(&self.weight, false)?)),
        }
        Ok(())
    }

    /// `y = x·Wᵀ (+ bias)` in the layer's precision.
    fn product(&self, y: &mut [f32], view: View2<'_, f32>, bias: Option<&[f32]>, par: Par) -> Result<()> {
        let [out, inp] = self.dims();
        match &self.bf16 {
            Some(packed) => linear_bf16(y, out, view, &packed.forward, bias, par)?,
            None => {
                let w = (self.weight.data(), 0..out, inp);
                linear_packed(y, out, view, w, self.f32_panels(view.shape()[0]), bias, par)?
            }
        }
        Ok(())
    }

    /// The f32 copy a product of `rows` rows reads, packed now if this is the first
    /// ([`F32Panels::read_by`]); `None` when the product reads the weight itself.
    fn f32_panels(&self, rows: usize) -> Option<&F32Panels> {
        let [out, inp] = self.dims();
        let cell = self.f32.as_ref().filter(|_| F32Panels::read_by([rows, inp, out]))?;
        Some(cell.get_or_init(|| {
            pack_weight_f32(&self.weight, 0..out).expect("rows 0..out lie within the [out, in] weight")
        }))
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

    /// Bytes of weights held: the tensors ([`Tensor::bytes_held`]) and the packed copies.
    pub fn bytes_held(&self) -> usize {
        let packs = self.bf16.as_ref().map_or(0, |b| {
            b.forward.size_in_bytes() + b.backward.get().map_or(0, Bf16Panels::size_in_bytes)
        }) + self.f32.as_ref().and_then(|p| p.get()).map_or(0, |p| p.size_in_bytes());
        self.weight.bytes_held() + self.bias.as_ref().map_or(0, Tensor::bytes_held) + packs
    }

    /// `x: [N, in]` rows -> `[N, out]` rows.
    pub fn forward(&self, x: &[f32], par: Par) -> Result<Vec<f32>> {
        let [out, inp] = self.dims();
        let n = x.len() / inp.max(1);
        // Every element is written by the product.
        let mut y = arena::overwritten(n * out);
        self.forward_into(&mut y, x, par)?;
        Ok(y)
    }

    /// `y = x·Wᵀ + b` into `y: [N, out]`: the GEMM's sums start from the bias (in f32
    /// [`attn_core::kernels::gemm_bias`], in bf16 [`attn_core::kernels::gemm_bf16_bias`]).
    pub fn forward_into(&self, y: &mut [f32], x: &[f32], par: Par) -> Result<()> {
        let inp = self.dims()[1];
        let n = x.len() / inp.max(1);
        let view = View2::contiguous(x, [n, inp]).map_err(AttnError::from)?;
        self.product(y, view, self.bias.as_ref().map(|b| b.data()), par)
    }

    /// `y = act(x·Wᵀ + b)` into `y: [N, out]`: the GEMM, then the bias and the activation in
    /// one pass over `y`.
    pub fn forward_activated_into(&self, y: &mut [f32], x: &[f32], act: Activation, par: Par) -> Result<()> {
        let [out, inp] = self.dims();
        let n = x.len() / inp.max(1);
        let view = View2::contiguous(x, [n, inp]).map_err(AttnError::from)?;
        self.product(y, view, None, par)?;
        let bias = self.bias.as_ref().map(|b| b.data());
        kernels::bias_activation(y, out, bias, act.kernel(), par).map_err(AttnError::from)?;
        Ok(())
    }
}

impl Linear {
    /// The backward of [`forward`](Self::forward) on `x: [N, in]`: `weight += dyᵀ·x`,
    /// `bias += Σ dy` (at `step.path`), and `dx = dy·W` written when asked for; with bf16
    /// products ([`kernels::linear_backward_bf16`]) when the precision is bf16, f32 gradients
    /// either way.
    pub fn backward(&self, dx: Option<&mut [f32]>, dy: &[f32], x: &[f32], step: &mut Step<'_>) -> Result<()> {
        let [out, inp] = self.dims();
        let shape = LinearShape {
            n: x.len() / inp.max(1),
            in_dim: inp,
            out_dim: out,
        };
        let par = step.par;
        let (dw, db) = weight_and_bias_grads(step, &self.weight, self.bias.as_ref())?;
        match &self.bf16 {
            Some(packed) => {
                let w_packed = packed.backward.get_or_init(|| LinearBf16::pack_backward(&self.weight));
                kernels::linear_backward_bf16(dx, dw, db, dy, x, w_packed, shape, par)
            }
            None => kernels::linear_backward(dx, dw, db, dy, x, self.weight.data(), shape, par),
        }
        .map_err(AttnError::from)?;
        Ok(())
    }
}

/// The gradients of `weight` and `bias` at `step.path`.
fn weight_and_bias_grads<'g>(
    step: &'g mut Step<'_>,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(&'g mut [f32], Option<&'g mut [f32]>)> {
    Ok(step
        .grads
        .of_weight_and_bias(step.path, (weight, "weight"), bias.map(|b| (b, "bias")))?)
}

/// `weight`, then `bias` when there is one.
fn visit_weight_and_bias<'a>(
    weight: &'a mut Tensor,
    bias: &'a mut Option<Tensor>,
    path: &ParamPath<'_>,
    f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor),
) {
    f(&path.join("weight"), weight);
    if let Some(b) = bias {
        f(&path.join("bias"), b);
    }
}

impl Parameters for Linear {
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        // The weight may change: a packed copy would go stale.
        (self.bf16, self.f32) = (None, None);
        visit_weight_and_bias(&mut self.weight, &mut self.bias, path, f);
    }

    /// In bf16 the layer packs `Wᵀ` again once its tensors have been updated, and `W` for the
    /// backward if it held it; in f32 it ends as [`Parameters::visit_params`] leaves it.
    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        let had = self.bf16.take();
        self.f32 = None;
        visit_weight_and_bias(&mut self.weight, &mut self.bias, path, &mut |p, t| f(p, t));
        if let Some(had) = had {
            let packs = LinearBf16::packed(&self.weight, had.backward.get().is_some())?;
            self.bf16 = Some(Arc::new(packs));
        }
        Ok(())
    }
}

impl Parameters for Norm {
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        visit_weight_and_bias(&mut self.weight, &mut self.bias, path, f);
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

impl Norm {
    /// Bytes of weights held ([`Tensor::bytes_held`]).
    pub fn bytes_held(&self) -> usize {
        self.weight.bytes_held() + self.bias.as_ref().map_or(0, Tensor::bytes_held)
    }

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

    fn params(&self) -> NormParams<'_> {
        NormParams {
            kind: self.kind,
            weight: self.weight.data(),
            bias: self.bias.as_ref().map(|b| b.data()),
            eps: self.eps,
        }
    }

    /// `norm(x)` into a new buffer: `x: [N, E]` rows.
    pub fn forward(&self, x: &[f32], par: Par) -> Result<Vec<f32>> {
        // Every row is written by the norm.
        let mut out = arena::overwritten(x.len());
        kernels::norm_rows(&mut out, x, self.params(), par).map_err(AttnError::from)?;
        Ok(out)
    }

    /// The residual add and the norm in one pass: `x = norm(x + residual)` (post-norm).
    pub fn add_forward_in_place(&self, x: &mut [f32], residual: &[f32], par: Par) -> Result<()> {
        kernels::add_norm_rows(x, residual, self.params(), par).map_err(AttnError::from)?;
        Ok(())
    }

    /// The residual add and the next norm in one pass (pre-norm): `x += residual`, and returns
    /// `norm(x)`.
    pub fn add_then_forward(&self, x: &mut [f32], residual: &[f32], par: Par) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; x.len()];
        kernels::add_then_norm_rows(x, residual, &mut out, self.params(), par).map_err(AttnError::from)?;
        Ok(out)
    }
}

impl Norm {
    /// The backward of [`forward`](Self::forward) on `x: [N, E]`: **adds** the input's
    /// gradient to `dx` (the residual's other branch usually holds one already), and
    /// `weight`, `bias` (at `step.path`) get theirs.
    pub fn backward(&self, dx: &mut [f32], dy: &[f32], x: &[f32], step: &mut Step<'_>) -> Result<()> {
        let par = step.par;
        let (dw, db) = weight_and_bias_grads(step, &self.weight, self.bias.as_ref())?;
        kernels::norm_backward(dx, dw, db, dy, x, self.weight.data(), (self.kind, self.eps), par)
            .map_err(AttnError::from)?;
        Ok(())
    }
}

/// `x += residual`.
pub fn add_in_place(x: &mut [f32], residual: &[f32], par: Par) -> Result<()> {
    kernels::add_assign(x, residual, par).map_err(AttnError::from)?;
    Ok(())
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
    /// The kernel's name for it.
    pub fn kernel(self) -> kernels::Activation {
        match self {
            Activation::Relu => kernels::Activation::Relu,
            Activation::Gelu => kernels::Activation::Gelu,
            Activation::GeluTanh => kernels::Activation::GeluTanh,
        }
    }

    /// Applies the activation in place.
    pub fn apply(self, x: &mut [f32], par: Par) {
        let width = x.len().max(1);
        // One row as wide as `x`, no bias: cannot fail.
        kernels::bias_activation(x, width, None, self.kernel(), par).expect("one whole row, no bias");
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
    /// Bytes of weights held by both layers ([`Linear::bytes_held`]).
    pub fn bytes_held(&self) -> usize {
        self.linear1.bytes_held() + self.linear2.bytes_held()
    }

    /// Sets both layers' precision ([`Linear::set_precision`]).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.linear1.set_precision(precision)?;
        self.linear2.set_precision(precision)
    }

    /// `x: [N, E]` rows -> `[N, E]` rows, `FFN_ROWS` (256) tokens at a time: for each block, the
    /// first GEMM, then its bias and the activation in one pass while the block is in cache,
    /// then the second GEMM (its sums starting from its bias). No `[N, F]` buffer is made.
    pub fn forward(&self, x: &[f32], par: Par) -> Result<Vec<f32>> {
        let [f, e] = self.linear1.dims();
        let n = x.len() / e.max(1);
        let out_dim = self.linear2.dims()[0];
        let mut y = vec![0.0f32; n * out_dim];
        let mut hidden = vec![0.0f32; n.min(FFN_ROWS) * f];
        for (x_block, y_block) in x.chunks(FFN_ROWS * e).zip(y.chunks_mut(FFN_ROWS * out_dim)) {
            let rows = x_block.len() / e.max(1);
            let h = &mut hidden[..rows * f];
            self.linear1.forward_activated_into(h, x_block, self.activation, par)?;
            self.linear2.forward_into(y_block, h, par)?;
        }
        Ok(y)
    }
}

/// What [`FeedForward::forward_train`] keeps, one `[N, F]` buffer: with ReLU, the activation's
/// output after dropout, `z`, which `linear2` read (the backward needs it for `linear2.weight`,
/// and `z > 0` exactly where dropout kept the element and ReLU passed it, so the backward
/// reads the mask and the derivative off it); with the other
/// activations, the first layer's output before the activation, `u`, from which the backward
/// recomputes `z`.
#[derive(Debug)]
pub struct FfnTape {
    /// `z` (ReLU) or `u`.
    kept: Vec<f32>,
    /// Whether `kept` is `z`.
    output: bool,
}

impl FfnTape {
    /// Hands the kept buffer back to the activation arena for the next step.
    pub fn recycle(self) {
        arena::give(self.kept);
    }

    /// Elements kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

impl FeedForward {
    /// The training forward: `x: [N, E]` -> `[N, E]`, keeping one `[N, F]` buffer ([`FfnTape`]).
    /// Dropout site `dropout` (at `step.path`, PyTorch's place in the Transformer layers)
    /// applies between the activation and `linear2`.
    pub fn forward_train(&self, x: &[f32], step: &mut Step<'_>) -> Result<(Vec<f32>, FfnTape)> {
        let [f, e] = self.linear1.dims();
        let n = x.len() / e.max(1);
        let mut u = arena::overwritten(n * f);
        self.linear1.forward_into(&mut u, x, step.par)?;
        if self.activation == Activation::Relu {
            // `z` over `u`, which the backward does not need.
            let mut z = u;
            kernels::bias_activation(&mut z, f, None, kernels::Activation::Relu, step.par).map_err(AttnError::from)?;
            step.dropout(&mut z, "dropout")?;
            let y = self.linear2.forward(&z, step.par)?;
            return Ok((y, FfnTape { kept: z, output: true }));
        }
        let z = self.activated(&u, step)?;
        let y = self.linear2.forward(&z, step.par)?;
        arena::give(z);
        Ok((y, FfnTape { kept: u, output: false }))
    }

    /// The backward of [`forward_train`](Self::forward_train) on the same `x`: parameters
    /// `linear1.*`, `linear2.*` (at `step.path`) get their gradients; returns `dx`.
    pub fn backward(&self, x: &[f32], tape: &FfnTape, dy: &[f32], step: &mut Step<'_>) -> Result<Vec<f32>> {
        let par = step.par;
        let act = self.activation.kernel();
        // `z`, kept or recomputed, and what the derivative is taken at (`z` itself for ReLU).
        let recomputed = if tape.output {
            None
        } else {
            Some(self.activated(&tape.kept, step)?)
        };
        let z = recomputed.as_deref().unwrap_or(&tape.kept);
        // Written by the products below.
        let mut dz = arena::overwritten(z.len());
        let here = step.path;
        self.linear2
            .backward(Some(&mut dz), dy, z, &mut step.at(&here.join("linear2.")))?;
        if tape.output {
            // ReLU keeps `z = dropout(relu(u))`, positive exactly where the element was kept
            // and passed: du = dz / (1 − p) there, 0 elsewhere, with no draw replayed.
            kernels::relu_dropout_backward(&mut dz, &tape.kept, step.dropout.p, par).map_err(AttnError::from)?;
        } else {
            step.dropout(&mut dz, "dropout")?;
            // du = act'(u)·dz, over dz.
            kernels::activation_backward_in_place(&mut dz, &tape.kept, act, par).map_err(AttnError::from)?;
        }
        if let Some(z) = recomputed {
            arena::give(z);
        }
        let mut dx = arena::overwritten(x.len());
        self.linear1
            .backward(Some(&mut dx), &dz, x, &mut step.at(&here.join("linear1.")))?;
        arena::give(dz);
        Ok(dx)
    }

    /// `dropout(act(u))` for `u: [N, F]`, rows of F in parallel.
    fn activated(&self, u: &[f32], step: &Step<'_>) -> Result<Vec<f32>> {
        let f = self.linear1.dims()[0];
        let mut z = arena::overwritten(u.len());
        kernels::bias_activation_from(&mut z, u, f, None, self.activation.kernel(), step.par)
            .map_err(AttnError::from)?;
        step.dropout(&mut z, "dropout")?;
        Ok(z)
    }
}

impl Parameters for FeedForward {
    /// `linear1.*`, then `linear2.*`.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        self.linear1.visit_params(&path.join("linear1."), f);
        self.linear2.visit_params(&path.join("linear2."), f);
    }

    fn update_params(
        &mut self,
        path: &ParamPath<'_>,
        f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor),
    ) -> attn_core::Result<()> {
        self.linear1.update_params(&path.join("linear1."), f)?;
        self.linear2.update_params(&path.join("linear2."), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linear layer set to f32 packs its weight where attn's own GEMM reads it, with the
    /// unpacked layer's bits; handing the weight out mutably drops the copy, so the changed
    /// weight is what the next product uses.
    #[test]
    fn linear_in_f32_packs_its_weight_and_never_goes_stale() {
        // 60 rows, 300 outputs: a product big enough for attn's own GEMM. A depth of 64, which
        // faer's GEMM and the own one each sum in one chain from the bias: the same bits on Zen 5
        // too, where the unpacked product goes to faer's and the packed one to the own GEMM.
        let (inp, out, n) = (64, 300, 60);
        let mut init = attn_core::WeightInit::new(5);
        let mut dict = StateDict::new();
        dict.insert("weight".into(), init.uniform(vec![out, inp], inp));
        dict.insert("bias".into(), init.uniform(vec![out], inp));
        let plain = Linear::load(&mut dict, "", inp, out, true).unwrap();
        let x = kernels::testing::random_vec(n * inp, 8);
        let bits = |layer: &Linear| -> Vec<u32> {
            let y = layer.forward(&x, Par::Rayon).unwrap();
            y.iter().map(|v| v.to_bits()).collect()
        };
        let want = bits(&plain);
        let mut packed = plain.clone();
        packed.set_precision(Precision::F32).unwrap();
        assert_eq!(packed.precision(), Precision::F32);
        // Packed at the first product that reads the copy: not at a product of a few rows
        // (decoding's), which gives the same bits either way.
        assert!(!packed.is_packed());
        let few = &x[..4 * inp];
        assert_eq!(
            packed.forward(few, Par::Rayon).unwrap(),
            plain.forward(few, Par::Rayon).unwrap()
        );
        assert!(!packed.is_packed() && packed.bytes_held() == plain.bytes_held());
        let worth = F32Panels::worth_packing([inp, out]);
        assert_eq!(F32Panels::read_by([n, inp, out]), worth);
        assert!(bits(&packed) == want, "the packed copy changed the bits");
        assert_eq!(packed.is_packed(), worth);
        assert_eq!(packed.bytes_held() > plain.bytes_held(), worth);
        assert!(bits(&packed) == want, "the packed copy, read again, changed the bits");
        packed.visit_params(&ParamPath::Root(""), &mut |_, t| {
            t.data_mut().iter_mut().for_each(|v| *v *= 0.5);
        });
        assert!(!packed.is_packed());
        let mut dict = StateDict::new();
        packed.save(&mut dict, "");
        let changed = Linear::load(&mut dict, "", inp, out, true).unwrap();
        assert!(bits(&changed) != want);
        assert!(bits(&packed) == bits(&changed), "a stale copy");
        packed.set_precision(Precision::F32).unwrap();
        assert!(bits(&packed) == bits(&changed), "packed again");
    }

    /// A ReLU feed-forward block `e -> f -> e` with PyTorch's initialisation from `seed`.
    fn relu_block(e: usize, f: usize, seed: u64) -> FeedForward {
        let mut init = attn_core::WeightInit::new(seed);
        let mut dict = StateDict::new();
        for (name, shape, fan_in) in [
            ("linear1.weight", vec![f, e], e),
            ("linear1.bias", vec![f], e),
            ("linear2.weight", vec![e, f], f),
            ("linear2.bias", vec![e], f),
        ] {
            dict.insert(name.into(), init.uniform(shape, fan_in));
        }
        FeedForward {
            linear1: Linear::load(&mut dict, "linear1.", e, f, true).unwrap(),
            linear2: Linear::load(&mut dict, "linear2.", f, e, true).unwrap(),
            activation: Activation::Relu,
        }
    }

    /// The feed-forward block in bf16: its forward stays near f32's, and so do its training
    /// forward and backward (mixed precision: bf16 products, f32 gradients), with other bits.
    #[test]
    fn feed_forward_in_bf16_serves_inference_and_training() {
        let (e, f, n) = (32, 64, 5);
        let mut ffn = relu_block(e, f, 3);
        let x = kernels::testing::random_vec(n * e, 8);
        let want = ffn.forward(&x, Par::Seq).unwrap();
        ffn.set_precision(Precision::Bf16).unwrap();
        let got = ffn.forward(&x, Par::Seq).unwrap();
        let scale = 1.0 + want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let error = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0.0f32, f32::max);
        // Measured 9.6e-4 of the output's scale; the bound is about 10×.
        assert!(error > 0.0 && error < 1e-2, "{error:e}");
        // One training forward and backward in each precision: dx and every gradient.
        let dy = kernels::testing::random_vec(n * e, 9);
        let train = |ffn: &FeedForward| {
            let mut grads = attn_core::Grads::new();
            let mut step = Step::new(crate::step::Dropout { p: 0.0, seed: 1 }, Par::Seq, &mut grads);
            let (y, tape) = ffn.forward_train(&x, &mut step).unwrap();
            let dx = ffn.backward(&x, &tape, &dy, &mut step).unwrap();
            let mut all = vec![y, dx];
            all.extend(grads.iter().map(|(_, g)| g.data().to_vec()));
            all
        };
        let got = train(&ffn);
        ffn.set_precision(Precision::F32).unwrap();
        let want = train(&ffn);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let scale = 1.0 + w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let error = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0.0f32, f32::max);
            // Measured at most 1.8e-3 of each tensor's scale; the bound is about 10×. The bias
            // gradient of `linear2` is `Σ dy` in both precisions.
            assert!(error < 2e-2, "tensor {i}: {error:e}");
        }
        assert_ne!(got, want, "bf16 training gave the f32 bits");
    }

    /// With ReLU the training forward keeps `dropout(relu(u))` and the backward reads both the
    /// mask and ReLU's derivative off it (`relu_dropout_backward`, no draw replayed); with
    /// dropout on, in f32 and bf16, that gives the bits of the backward that recomputes `z`
    /// from `u` and replays the mask (the tape of the other activations).
    #[test]
    fn relu_backward_from_the_kept_output_is_the_recomputed_one() {
        let (e, f, n) = (16, 48, 40);
        let mut ffn = relu_block(e, f, 4);
        let x = kernels::testing::random_vec(n * e, 10);
        let dy = kernels::testing::random_vec(n * e, 11);
        let dropout = crate::step::Dropout { p: 0.3, seed: 7 };
        for precision in [Precision::F32, Precision::Bf16] {
            ffn.set_precision(precision).unwrap();
            let backward = |tape: &FfnTape| {
                let mut grads = attn_core::Grads::new();
                let mut step = Step::new(dropout, Par::Rayon, &mut grads);
                let dx = ffn.backward(&x, tape, &dy, &mut step).unwrap();
                let mut all = vec![dx];
                all.extend(grads.iter().map(|(_, g)| g.data().to_vec()));
                all
            };
            let mut unused = attn_core::Grads::new();
            let (_, kept) = ffn
                .forward_train(&x, &mut Step::new(dropout, Par::Rayon, &mut unused))
                .unwrap();
            assert!(kept.output, "ReLU keeps its output");
            assert!(kept.len() == n * f && !kept.is_empty());
            let (_, none) = ffn
                .forward_train(&[], &mut Step::new(dropout, Par::Rayon, &mut unused))
                .unwrap();
            assert!(none.is_empty());
            assert_eq!(none.len(), 0);
            let mut u = vec![0.0f32; n * f];
            ffn.linear1.forward_into(&mut u, &x, Par::Rayon).unwrap();
            assert!(u.iter().any(|&v| v < 0.0) && kept.kept.contains(&0.0));
            let recomputed = FfnTape { kept: u, output: false };
            let (got, want) = (backward(&kept), backward(&recomputed));
            assert_eq!(got.len(), 5);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{precision}: tensor {i}");
            }
        }
    }

    /// A layer's bytes are its tensors' plus each packed copy it holds: none in plain f32, the
    /// forward's in bf16, and the backward's too once a training backward has packed it.
    #[test]
    fn linear_bytes_count_every_packed_copy() {
        let (e, f, n) = (16, 48, 40);
        let mut ffn = relu_block(e, f, 6);
        let tensors = |l: &Linear| (l.weight.len() + l.bias.as_ref().map_or(0, Tensor::len)) * 4;
        let layer = &ffn.linear1;
        assert_eq!(layer.bytes_held(), tensors(layer));
        ffn.set_precision(Precision::Bf16).unwrap();
        let forward = pack_weight_of(&ffn.linear1.weight, 0..f).unwrap().size_in_bytes();
        let layer = &ffn.linear1;
        assert_eq!(layer.bytes_held(), tensors(layer) + forward);
        let x = kernels::testing::random_vec(n * e, 12);
        let dy = kernels::testing::random_vec(n * e, 13);
        let mut grads = attn_core::Grads::new();
        let mut step = Step::new(crate::step::Dropout { p: 0.0, seed: 1 }, Par::Seq, &mut grads);
        let (_, tape) = ffn.forward_train(&x, &mut step).unwrap();
        ffn.backward(&x, &tape, &dy, &mut step).unwrap();
        let backward = Bf16Panels::pack(View2::contiguous(ffn.linear1.weight.data(), [f, e]).unwrap()).size_in_bytes();
        let layer = &ffn.linear1;
        assert_eq!(layer.bytes_held(), tensors(layer) + forward + backward);
        assert_eq!(ffn.bytes_held(), ffn.linear1.bytes_held() + ffn.linear2.bytes_held());
    }

    /// A norm's epsilon must be positive and finite: zero, a negative, an infinity and NaN are
    /// refused with the field named; the smallest positive float is taken.
    #[test]
    fn norms_refuse_an_epsilon_that_is_not_positive_and_finite() {
        let e = 4;
        let dict = || {
            let mut dict = StateDict::new();
            dict.insert("weight".into(), Tensor::new("w", vec![e], vec![1.0; e]).unwrap());
            dict.insert("bias".into(), Tensor::new("b", vec![e], vec![0.0; e]).unwrap());
            dict
        };
        for kind in [NormKind::LayerNorm, NormKind::RmsNorm] {
            for eps in [0.0, -1e-5, f64::INFINITY, f64::NAN] {
                match Norm::load(&mut dict(), "", e, eps, kind, true) {
                    Err(crate::NnError::InvalidConfig { field, .. }) => assert_eq!(field, "layer_norm_eps"),
                    other => panic!("{kind:?} eps {eps}: {other:?}"),
                }
            }
            assert!(Norm::load(&mut dict(), "", e, f64::MIN_POSITIVE, kind, true).is_ok());
        }
    }

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
            let got = ln.forward(&x, par).unwrap();
            for i in 0..e {
                let want = (x[i] as f64 - mean) / (var + ln_eps).sqrt() * w[i] + b[i];
                // Measured 8e-8 (f32 rounding of values below 4); eps = 1e-5 instead is 3.6e-2 off.
                assert!((got[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
            }
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 5.0;
            let got = rms.forward(&x, par).unwrap();
            for i in 0..e {
                let want = x[i] as f64 / (ms + rms_eps).sqrt() * w[i];
                assert!((got[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
            }
            // Fused residual add: norm(x + r) == norm applied to the sum.
            let r = [0.5f32; 5];
            let mut fused = x.to_vec();
            ln.add_forward_in_place(&mut fused, &r, par).unwrap();
            let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
            assert_eq!(fused, ln.forward(&sum, par).unwrap());
            let mut pre = x.to_vec();
            let normed = ln.add_then_forward(&mut pre, &r, par).unwrap();
            assert_eq!(pre, sum);
            assert_eq!(normed, ln.forward(&sum, par).unwrap());
        }
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
