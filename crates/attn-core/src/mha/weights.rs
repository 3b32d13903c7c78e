//! The projection weights under PyTorch's state-dict names, and the linear map that applies them.

use std::sync::Arc;

use attn_kernels::{
    gemm, gemm_bf16, gemm_bf16_bias, gemm_bias, gemm_packed, linear_backward, linear_backward_bf16, Accum, Bf16Panels,
    F32Panels, LinearShape, Par, View2, ViewMut2,
};

pub(super) use super::packs::Proj;
use super::packs::{Bf16Weights, ForwardPacks, ProjWeights};
use super::Dims;
use crate::error::shape_error;
use crate::tensor::{expect_empty, take, StateDict, Tensor};
use crate::{Precision, Result, Rope};

/// The weights and the forward pass shared by [`MultiHeadAttention`] and [`Attention`].
#[derive(Debug, Clone)]
pub(super) struct Core {
    pub(super) dims: Dims,
    /// Fused: `[q_width + k_width + v_width, E]`; else `[q_width, E]`.
    pub(super) w_q_or_qkv: Tensor,
    /// Separate key and value weights when `kdim` or `vdim` differ from `E`.
    pub(super) w_k: Option<Tensor>,
    pub(super) w_v: Option<Tensor>,
    /// `[q_width + k_width + v_width]`.
    pub(super) b_qkv: Option<Tensor>,
    pub(super) w_out: Option<Tensor>,
    pub(super) b_out: Option<Tensor>,
    /// `[k_width]` and `[v_width]` rows appended to keys and values.
    pub(super) bias_kv: Option<(Tensor, Tensor)>,
    pub(super) add_zero_attn: bool,
    pub(super) rope: Option<Rope>,
    pub(super) alibi: Option<Vec<f32>>,
    /// The weights rounded to bf16 and packed, when the precision is [`Precision::Bf16`].
    pub(super) bf16: Option<Arc<Bf16Weights>>,
    /// The weights packed in f32 when the precision is [`Precision::F32`]: those attn's own GEMM
    /// reads ([`F32Panels::worth_packing`]), each at the first product that reads it
    /// ([`F32Panels::read_by`]).
    pub(super) f32: Option<Arc<ForwardPacks<F32Panels>>>,
}

/// A linear map of token rows: `dst[n, :] = x[n, :] · wᵀ (+ bias)` with `x: [N, in]`,
/// `w: [out, in]` given as the rows `w_rows` of a row-major weight of width `in_dim`,
/// `bias: [out]`, `dst: [N, out]` with row stride `dst_stride`.
///
/// The bias is added by [`attn_kernels::gemm_bias`]: as each block of the destination is stored
/// where attn's own GEMM serves the product, written first otherwise (the same bits).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    dst: &mut [f32],
    dst_stride: usize,
    x: View2<'_, f32>,
    w: &[f32],
    w_rows: std::ops::Range<usize>,
    in_dim: usize,
    bias: Option<&[f32]>,
    par: Par,
) -> Result<()> {
    linear_packed(dst, dst_stride, x, (w, w_rows, in_dim), None, bias, par)
}

/// [`linear`], the weight given as `(w, w_rows, in_dim)`, and its rows also packed once where
/// there is a packed copy ([`crate::pack_weight_f32`] of the same rows): the own GEMM's bits,
/// the copy read in place where it serves the product ([`attn_kernels::gemm_packed`]; on Zen 5
/// only a product by a packed copy goes there). `packed` must hold the rows' current values.
pub fn linear_packed(
    dst: &mut [f32],
    dst_stride: usize,
    x: View2<'_, f32>,
    (w, w_rows, in_dim): (&[f32], std::ops::Range<usize>, usize),
    packed: Option<&F32Panels>,
    bias: Option<&[f32]>,
    par: Par,
) -> Result<()> {
    let out = w_rows.len();
    linear_with(dst, dst_stride, x, out, |dst_view| {
        let w_t = View2::new(
            &w[w_rows.start * in_dim..w_rows.end * in_dim],
            [in_dim, out],
            [1, in_dim],
        )?;
        match (packed, bias) {
            (Some(packed), _) => Ok(gemm_packed(dst_view, x, w_t, packed, bias, par)?),
            (None, Some(bias)) => Ok(gemm_bias(dst_view, x, w_t, bias, par)?),
            (None, None) => Ok(gemm(dst_view, Accum::Replace, x, w_t, 1.0, par)?),
        }
    })
}

/// [`linear`] in bf16: `w` packed once ([`crate::pack_weight`]), `x` rounded to bf16 while it
/// is packed, f32 sums starting from the bias and f32 output (see
/// [`attn_kernels::gemm_bf16_bias`]; the bits of writing the bias first).
pub fn linear_bf16(
    dst: &mut [f32],
    dst_stride: usize,
    x: View2<'_, f32>,
    w: &Bf16Panels,
    bias: Option<&[f32]>,
    par: Par,
) -> Result<()> {
    let [in_dim, out] = w.shape();
    if x.shape()[1] != in_dim {
        return Err(shape_error("project", "x", format!("[N, {in_dim}]"), &x.shape()));
    }
    linear_with(dst, dst_stride, x, out, |dst_view| {
        match bias {
            // The sums start from the bias: one pass over the destination.
            Some(bias) => gemm_bf16_bias(dst_view, bias, x, w, par)?,
            None => gemm_bf16(dst_view, Accum::Replace, x, w, par)?,
        }
        Ok(())
    })
}

/// The shared part of [`linear`] and [`linear_bf16`]: the destination checked, then
/// `product(dst)` writes it.
fn linear_with(
    dst: &mut [f32],
    dst_stride: usize,
    x: View2<'_, f32>,
    out: usize,
    product: impl FnOnce(ViewMut2<'_, f32>) -> Result<()>,
) -> Result<()> {
    let n = x.shape()[0];
    if n == 0 || out == 0 {
        return Ok(());
    }
    let needed = (n - 1) * dst_stride + out;
    if dst.len() < needed {
        return Err(shape_error(
            "project",
            "destination",
            format!("{needed} elements"),
            &[dst.len()],
        ));
    }
    let dst_view = ViewMut2::new(&mut dst[..needed], [n, out], [dst_stride, 1])?;
    product(dst_view)
}

pub(super) fn state_names(prefix_fused: bool, dims: &Dims, bias: bool, bias_kv: bool) -> Vec<String> {
    let mut names = Vec::new();
    if prefix_fused {
        names.push("in_proj_weight".to_string());
    } else {
        names.extend(["q_proj_weight", "k_proj_weight", "v_proj_weight"].map(String::from));
    }
    if bias {
        names.push("in_proj_bias".to_string());
    }
    if bias_kv {
        names.extend(["bias_k", "bias_v"].map(String::from));
    }
    if dims.out.is_some() {
        names.push("out_proj.weight".to_string());
        if bias {
            names.push("out_proj.bias".to_string());
        }
    }
    names
}

impl Core {
    pub(super) fn from_state_dict(
        dims: Dims,
        mut dict: StateDict,
        bias: bool,
        add_bias_kv: bool,
        add_zero_attn: bool,
    ) -> Result<Self> {
        let (qw, kw, vw) = (dims.q_width(), dims.k_width(), dims.v_width());
        let names = state_names(dims.fused(), &dims, bias, add_bias_kv);
        let (w_q_or_qkv, w_k, w_v) = if dims.fused() {
            (take(&mut dict, "in_proj_weight", &[qw + kw + vw, dims.e])?, None, None)
        } else {
            (
                take(&mut dict, "q_proj_weight", &[qw, dims.e])?,
                Some(take(&mut dict, "k_proj_weight", &[kw, dims.kdim])?),
                Some(take(&mut dict, "v_proj_weight", &[vw, dims.vdim])?),
            )
        };
        let b_qkv = if bias {
            Some(take(&mut dict, "in_proj_bias", &[qw + kw + vw])?)
        } else {
            None
        };
        let bias_kv = if add_bias_kv {
            let k = take(&mut dict, "bias_k", &[1, 1, kw])?;
            let v = take(&mut dict, "bias_v", &[1, 1, vw])?;
            Some((k, v))
        } else {
            None
        };
        let (w_out, b_out) = match dims.out {
            Some(out) => (
                Some(take(&mut dict, "out_proj.weight", &[out, dims.h * dims.dv])?),
                if bias {
                    Some(take(&mut dict, "out_proj.bias", &[out])?)
                } else {
                    None
                },
            ),
            None => (None, None),
        };
        expect_empty(&dict, &names)?;
        Ok(Core {
            dims,
            w_q_or_qkv,
            w_k,
            w_v,
            b_qkv,
            w_out,
            b_out,
            bias_kv,
            add_zero_attn,
            rope: None,
            alibi: None,
            bf16: None,
            f32: None,
        })
    }

    pub(super) fn state_dict(&self) -> StateDict {
        let mut dict = StateDict::new();
        let fused = self.dims.fused();
        dict.insert(
            if fused { "in_proj_weight" } else { "q_proj_weight" }.to_string(),
            self.w_q_or_qkv.clone(),
        );
        if let (Some(k), Some(v)) = (&self.w_k, &self.w_v) {
            dict.insert("k_proj_weight".into(), k.clone());
            dict.insert("v_proj_weight".into(), v.clone());
        }
        if let Some(b) = &self.b_qkv {
            dict.insert("in_proj_bias".into(), b.clone());
        }
        if let Some((k, v)) = &self.bias_kv {
            dict.insert("bias_k".into(), k.clone());
            dict.insert("bias_v".into(), v.clone());
        }
        if let Some(w) = &self.w_out {
            dict.insert("out_proj.weight".into(), w.clone());
        }
        if let Some(b) = &self.b_out {
            dict.insert("out_proj.bias".into(), b.clone());
        }
        dict
    }

    /// Weight rows and input width of the Q, K or V projection (`which` = 0, 1, 2).
    pub(super) fn weight(&self, which: usize) -> (&[f32], std::ops::Range<usize>, usize) {
        let (w, rows, in_dim) = self.weight_tensor(which);
        (w.data(), rows, in_dim)
    }

    /// The tensor holding the Q, K or V projection's weight (`which` = 0, 1, 2), its rows and
    /// input width, without reading its values (a bf16 tensor stays unwidened).
    pub(super) fn weight_tensor(&self, which: usize) -> (&Tensor, std::ops::Range<usize>, usize) {
        let (qw, kw, vw) = (self.dims.q_width(), self.dims.k_width(), self.dims.v_width());
        if self.dims.fused() {
            let rows = [0..qw, qw..qw + kw, qw + kw..qw + kw + vw][which].clone();
            (&self.w_q_or_qkv, rows, self.dims.e)
        } else {
            match which {
                0 => (&self.w_q_or_qkv, 0..qw, self.dims.e),
                1 => (self.w_k.as_ref().expect("separate weights"), 0..kw, self.dims.kdim),
                _ => (self.w_v.as_ref().expect("separate weights"), 0..vw, self.dims.vdim),
            }
        }
    }

    /// The bias of the Q, K or V projection (`which` = 0, 1, 2).
    pub(super) fn bias(&self, which: usize) -> Option<&[f32]> {
        let (qw, kw, vw) = (self.dims.q_width(), self.dims.k_width(), self.dims.v_width());
        let range = [0..qw, qw..qw + kw, qw + kw..qw + kw + vw][which].clone();
        Some(&self.b_qkv.as_ref()?.data()[range])
    }

    /// Bytes of weights held: the tensors ([`Tensor::bytes_held`]) and their bf16 packs.
    pub(super) fn bytes_held(&self) -> usize {
        let tensors = [
            Some(&self.w_q_or_qkv),
            self.w_k.as_ref(),
            self.w_v.as_ref(),
            self.b_qkv.as_ref(),
        ]
        .into_iter()
        .chain([self.w_out.as_ref(), self.b_out.as_ref()])
        .flatten()
        .chain(self.bias_kv.iter().flat_map(|(k, v)| [k, v]))
        .map(Tensor::bytes_held)
        .sum::<usize>();
        let packs = self.bf16.as_ref().map_or(0, |b| b.bytes()) + self.f32.as_ref().map_or(0, |p| p.bytes());
        tensors + packs
    }

    /// The precision the projections run in.
    pub(super) fn precision(&self) -> Precision {
        if self.bf16.is_some() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// Packs the weights in bf16; for f32, packs those that attn's own GEMM reads in f32
    /// ([`F32Panels::worth_packing`]; none on other machines), each at the first product of
    /// enough rows to read it ([`F32Panels::read_by`]; decoding's few rows never do).
    pub(super) fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.drop_packs();
        match precision {
            Precision::F32 => self.f32 = Some(Arc::new(ForwardPacks::new(self)?)),
            Precision::Bf16 => self.bf16 = Some(Arc::new(Bf16Weights::new(self)?)),
        }
        Ok(())
    }

    /// Drops every packed copy (the weights are about to be handed out mutably: a copy would
    /// go stale), which returns the projections to f32.
    pub(super) fn drop_packs(&mut self) {
        self.bf16 = None;
        self.f32 = None;
    }

    /// The weight `proj` names as row-major rows: `(w, rows, in_dim)`.
    fn proj_weight(&self, proj: Proj) -> (&[f32], std::ops::Range<usize>, usize) {
        match proj {
            Proj::Fused => {
                let width = self.dims.q_width() + self.dims.k_width() + self.dims.v_width();
                (self.w_q_or_qkv.data(), 0..width, self.dims.e)
            }
            Proj::Part(which) => self.weight(which),
            Proj::Out => {
                let w = self.w_out.as_ref().expect("called only with an output projection");
                (w.data(), 0..self.dims.out.unwrap_or(0), self.dims.h * self.dims.dv)
            }
        }
    }

    /// The backward of projection `proj` over `x: [N, in]`: `dw += dyᵀ·x`, `db += Σ dy`, and
    /// `dx = dy·W` when asked for; in bf16 ([`linear_backward_bf16`], the weight packed as it
    /// is at the first backward) when the module's precision is bf16, else in f32.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn proj_backward(
        &self,
        proj: Proj,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        dy: &[f32],
        x: &[f32],
        par: Par,
    ) -> Result<()> {
        let (w, rows, in_dim) = self.proj_weight(proj);
        let shape = LinearShape {
            n: x.len() / in_dim.max(1),
            in_dim,
            out_dim: rows.len(),
        };
        let Some(packed) = &self.bf16 else {
            let w = &w[rows.start * in_dim..rows.end * in_dim];
            linear_backward(dx, dw, db, dy, x, w, shape, par)?;
            return Ok(());
        };
        let w_packed = packed.backward(self, proj);
        linear_backward_bf16(dx, dw, db, dy, x, w_packed, shape, par)?;
        Ok(())
    }

    /// `dst[n, :] = x[n, :] · wᵀ + bias` for the weight `proj` names, in the module's precision
    /// (f32 through the packed copy where there is one).
    pub(super) fn apply(
        &self,
        proj: Proj,
        dst: &mut [f32],
        dst_stride: usize,
        x: View2<'_, f32>,
        bias: Option<&[f32]>,
        par: Par,
    ) -> Result<()> {
        if let Some(packed) = &self.bf16 {
            let w = packed
                .forward
                .get(self, proj)
                .expect("bf16 packs every projection the module has");
            return linear_bf16(dst, dst_stride, x, w, bias, par);
        }
        let (w, rows, in_dim) = self.proj_weight(proj);
        let reads = F32Panels::read_by([x.shape()[0], in_dim, rows.len()]);
        let packed = self.f32.as_ref().filter(|_| reads).and_then(|p| p.get(self, proj));
        linear_packed(dst, dst_stride, x, (w, rows, in_dim), packed, bias, par)
    }
}

impl ProjWeights for Core {
    fn matrix(&self, proj: Proj) -> Option<(&Tensor, std::ops::Range<usize>)> {
        match proj {
            Proj::Fused if self.dims.fused() => {
                let width = self.dims.q_width() + self.dims.k_width() + self.dims.v_width();
                Some((&self.w_q_or_qkv, 0..width))
            }
            Proj::Fused => None,
            Proj::Part(which) => {
                let (w, rows, _) = self.weight_tensor(which);
                Some((w, rows))
            }
            Proj::Out => Some((self.w_out.as_ref()?, 0..self.dims.out?)),
        }
    }

    fn rows(&self, proj: Proj) -> (&[f32], std::ops::Range<usize>, usize) {
        self.proj_weight(proj)
    }
}

/// Deterministic weights for `dims` under the PyTorch names.
pub(super) fn random_state_dict(dims: &Dims, bias: bool, bias_kv: bool, seed: u64) -> StateDict {
    let mut init = crate::WeightInit::new(seed);
    let mut next = |n: usize, fan_in: usize| init.uniform(vec![n], fan_in).into_data();
    let (qw, kw, vw) = (dims.q_width(), dims.k_width(), dims.v_width());
    let mut dict = StateDict::new();
    let mut put = |name: &str, shape: Vec<usize>, data: Vec<f32>| {
        dict.insert(name.to_string(), Tensor::new(name, shape, data).expect("sizes agree"));
    };
    if dims.fused() {
        put(
            "in_proj_weight",
            vec![qw + kw + vw, dims.e],
            next((qw + kw + vw) * dims.e, dims.e),
        );
    } else {
        put("q_proj_weight", vec![qw, dims.e], next(qw * dims.e, dims.e));
        put("k_proj_weight", vec![kw, dims.kdim], next(kw * dims.kdim, dims.kdim));
        put("v_proj_weight", vec![vw, dims.vdim], next(vw * dims.vdim, dims.vdim));
    }
    if bias {
        put("in_proj_bias", vec![qw + kw + vw], next(qw + kw + vw, dims.e));
    }
    if bias_kv {
        put("bias_k", vec![1, 1, kw], next(kw, dims.e));
        put("bias_v", vec![1, 1, vw], next(vw, dims.e));
    }
    if let Some(out) = dims.out {
        put(
            "out_proj.weight",
            vec![out, dims.h * dims.dv],
            next(out * dims.h * dims.dv, dims.h * dims.dv),
        );
        if bias {
            put("out_proj.bias", vec![out], next(out, dims.h * dims.dv));
        }
    }
    dict
}

impl Core {
    /// Like [`Core::from_state_dict`] but always with separate Q, K, V weights.
    pub(super) fn from_state_dict_separate(dims: Dims, mut dict: StateDict, bias: bool) -> Result<Self> {
        let (qw, kw, vw) = (dims.q_width(), dims.k_width(), dims.v_width());
        let w_q = take(&mut dict, "q_proj_weight", &[qw, dims.e])?;
        let w_k = take(&mut dict, "k_proj_weight", &[kw, dims.kdim])?;
        let w_v = take(&mut dict, "v_proj_weight", &[vw, dims.vdim])?;
        let b_qkv = if bias {
            Some(take(&mut dict, "in_proj_bias", &[qw + kw + vw])?)
        } else {
            None
        };
        let mut names = vec![
            "q_proj_weight".to_string(),
            "k_proj_weight".into(),
            "v_proj_weight".into(),
        ];
        if bias {
            names.push("in_proj_bias".into());
        }
        expect_empty(&dict, &names)?;
        // Stack the three weights when they share an input width, so `weight()` can index
        // them as one fused tensor.
        let (w_q_or_qkv, w_k, w_v) = if dims.fused() {
            let mut data = Vec::with_capacity((qw + kw + vw) * dims.e);
            data.extend_from_slice(w_q.data());
            data.extend_from_slice(w_k.data());
            data.extend_from_slice(w_v.data());
            let fused = Tensor::new("in_proj_weight", vec![qw + kw + vw, dims.e], data)?;
            (fused, None, None)
        } else {
            (w_q, Some(w_k), Some(w_v))
        };
        Ok(Core {
            dims,
            w_q_or_qkv,
            w_k,
            w_v,
            b_qkv,
            w_out: None,
            b_out: None,
            bias_kv: None,
            add_zero_attn: false,
            rope: None,
            alibi: None,
            bf16: None,
            f32: None,
        })
    }
}
