//! Multi-head and single-head attention that own their weights, with PyTorch's
//! `nn.MultiheadAttention` semantics and state-dict names.
//!
//! Shapes: query `[B, S, E]`, key `[B, T, kdim]`, value `[B, T, vdim]` (batch first; the
//! sequence-first layout `[S, B, E]` is read and written in place through [`Layout::SeqFirst`])
//! -> output `[B, S, E]` in the query's layout, weights `[B, S, T]` (averaged) or
//! `[B, H, S, T]`.
//!
//! How a call flows: the input rows are projected by GEMMs (one fused `[3E, E]` GEMM for
//! self-attention), heads are strided views of the projections (no split copies), the flash
//! kernel writes each head straight into `[tokens, H·Dv]`, and the output projection reads that
//! buffer as it is (no merge copy). Weights, when asked for, come from the kernel's LSE in a
//! second pass. What this leaves out: dropout (inference only).

use attn_kernels::{
    attention_weights, flash_attention, gemm, Accum, AttentionOptions, Causal, Mask, Par, View, View2, View4, ViewMut,
    ViewMut2, WeightsDst,
};
use serde::{Deserialize, Serialize};

use crate::error::shape_error;
use crate::tensor::{expect_empty, take, StateDict, Tensor};
use crate::{AttnError, BoolMeaning, KeyPadding, KvCache, Result, Rope, ScoreMask};

/// How a sequence tensor is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[B, L, E]` (PyTorch `batch_first=True`).
    #[default]
    BatchFirst,
    /// `[L, B, E]` (PyTorch's default for `nn.MultiheadAttention`).
    SeqFirst,
}

/// A batch of sequences of `dim`-wide vectors.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    /// The elements, `[B, L, dim]` or `[L, B, dim]` by `layout`.
    pub data: &'a [f32],
    /// B.
    pub batch: usize,
    /// L.
    pub len: usize,
    /// The vector width.
    pub dim: usize,
    /// The memory layout.
    pub layout: Layout,
}

impl<'a> Sequence<'a> {
    /// A batch-first sequence `[batch, len, dim]`.
    pub fn batch_first(data: &'a [f32], batch: usize, len: usize, dim: usize) -> Self {
        Sequence {
            data,
            batch,
            len,
            dim,
            layout: Layout::BatchFirst,
        }
    }

    fn check(&self, op: &'static str, name: &str, dim: usize) -> Result<()> {
        let shape = match self.layout {
            Layout::BatchFirst => ("[B, L, E]", [self.batch, self.len, self.dim]),
            Layout::SeqFirst => ("[L, B, E]", [self.len, self.batch, self.dim]),
        };
        if self.dim != dim {
            return Err(shape_error(op, name, format!("{} with E = {dim}", shape.0), &shape.1));
        }
        let needed = self.batch.checked_mul(self.len).and_then(|x| x.checked_mul(dim));
        if needed != Some(self.data.len()) {
            return Err(AttnError::BadTensorData {
                name: name.to_string(),
                shape: shape.1.to_vec(),
                needed: needed.unwrap_or(usize::MAX),
                len: self.data.len(),
            });
        }
        Ok(())
    }

    /// Strides `[B, L]` of token rows, in rows.
    fn token_strides(&self) -> [usize; 2] {
        match self.layout {
            Layout::BatchFirst => [self.len, 1],
            Layout::SeqFirst => [1, self.batch],
        }
    }
}

/// Which attention weights a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NeedWeights {
    /// None (the fastest path).
    #[default]
    No,
    /// `[B, H, S, T]`.
    PerHead,
    /// `[B, S, T]`, the mean over heads (PyTorch's `average_attn_weights=True`).
    Averaged,
}

/// Forward options in the conventions of `nn.MultiheadAttention.forward`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MhaOptions<'a> {
    /// `attn_mask`: `[S, T]` or `[B·H, S, T]`; boolean `true` = masked out (PyTorch's module
    /// convention; other conventions are allowed through [`BoolMeaning`]) or additive.
    pub attn_mask: ScoreMask<'a>,
    /// `key_padding_mask` `[B, T]` (boolean `true` = padding), or lengths.
    pub key_padding: KeyPadding<'a>,
    /// `is_causal`: queries attend only keys at or before their position (top-left aligned).
    /// Applied together with `attn_mask` when both are given (PyTorch treats the flag as a
    /// hint that the mask is causal; for a causal mask the two agree).
    pub is_causal: bool,
    /// Which weights to return.
    pub need_weights: NeedWeights,
}

/// The result of a forward call.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// `[B, S, E]` (or `[S, B, E]`, the query's layout).
    pub output: Vec<f32>,
    /// `[B, S, T]` or `[B, H, S, T]` when asked for.
    pub weights: Option<Vec<f32>>,
}

/// Configuration of [`MultiHeadAttention`]: `nn.MultiheadAttention`'s constructor arguments
/// with PyTorch's names and defaults, plus attn's extensions (`num_kv_heads`, `rope`, `alibi`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MhaConfig {
    /// E, the model dim.
    pub embed_dim: usize,
    /// H, query heads; must divide `embed_dim`.
    pub num_heads: usize,
    /// G, key/value heads (grouped-query attention); must divide `num_heads`. Default `num_heads`.
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    /// Biases on the input and output projections.
    #[serde(default = "yes")]
    pub bias: bool,
    /// Learned key and value rows appended to every key and value sequence.
    #[serde(default)]
    pub add_bias_kv: bool,
    /// A zero key and value appended to every sequence (after `add_bias_kv`).
    #[serde(default)]
    pub add_zero_attn: bool,
    /// Width of the keys; default `embed_dim`.
    #[serde(default)]
    pub kdim: Option<usize>,
    /// Width of the values; default `embed_dim`.
    #[serde(default)]
    pub vdim: Option<usize>,
    /// Dropout probability: accepted for compatibility, ignored (inference).
    #[serde(default)]
    pub dropout: f64,
    /// Layout of inputs and outputs at the module's boundary (`batch_first` in PyTorch).
    #[serde(default)]
    pub batch_first: bool,
    /// Rotary position embeddings on queries and keys.
    #[serde(default)]
    pub rope: Option<Rope>,
    /// ALiBi distance penalties with the standard slopes.
    #[serde(default)]
    pub alibi: bool,
}

fn yes() -> bool {
    true
}

impl MhaConfig {
    /// `embed_dim` and `num_heads` with every other field at PyTorch's default.
    pub fn new(embed_dim: usize, num_heads: usize) -> Self {
        MhaConfig {
            embed_dim,
            num_heads,
            num_kv_heads: None,
            bias: true,
            add_bias_kv: false,
            add_zero_attn: false,
            kdim: None,
            vdim: None,
            dropout: 0.0,
            batch_first: false,
            rope: None,
            alibi: false,
        }
    }

    fn dims(&self) -> Result<Dims> {
        let invalid = |field: &'static str, got: String, expected: &str| AttnError::InvalidConfig {
            field,
            got,
            expected: expected.to_string(),
        };
        let (e, h) = (self.embed_dim, self.num_heads);
        if e == 0 {
            return Err(invalid("embed_dim", e.to_string(), "at least 1"));
        }
        if h == 0 || e % h != 0 {
            return Err(invalid(
                "num_heads",
                h.to_string(),
                &format!("a divisor of embed_dim = {e}"),
            ));
        }
        let g = self.num_kv_heads.unwrap_or(h);
        if g == 0 || h % g != 0 {
            return Err(invalid(
                "num_kv_heads",
                g.to_string(),
                &format!("a divisor of num_heads = {h}"),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", self.dropout.to_string(), "a probability in [0, 1)"));
        }
        let kdim = self.kdim.unwrap_or(e);
        let vdim = self.vdim.unwrap_or(e);
        if kdim == 0 || vdim == 0 {
            return Err(invalid("kdim", format!("{kdim} (vdim {vdim})"), "at least 1"));
        }
        let d = e / h;
        if self.rope.is_some() && d % 2 != 0 {
            return Err(invalid(
                "rope",
                format!("head dim {d}"),
                "an even head dim (embed_dim / num_heads)",
            ));
        }
        if self.rope.is_some() && (self.add_bias_kv || self.add_zero_attn) {
            return Err(invalid(
                "rope",
                "set with add_bias_kv or add_zero_attn".into(),
                "rope without appended key rows",
            ));
        }
        Ok(Dims {
            e,
            kdim,
            vdim,
            h,
            g,
            d,
            dv: d,
            out: Some(e),
        })
    }
}

/// Resolved widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    /// Query input width.
    e: usize,
    kdim: usize,
    vdim: usize,
    h: usize,
    g: usize,
    d: usize,
    dv: usize,
    /// Output projection width (`None`: no output projection, single-head `Attention`).
    out: Option<usize>,
}

impl Dims {
    fn q_width(&self) -> usize {
        self.h * self.d
    }
    fn k_width(&self) -> usize {
        self.g * self.d
    }
    fn v_width(&self) -> usize {
        self.g * self.dv
    }
    /// Whether Q, K and V share one input width, so one fused weight serves all three.
    fn fused(&self) -> bool {
        self.kdim == self.e && self.vdim == self.e
    }
}

/// The weights and the forward pass shared by [`MultiHeadAttention`] and [`Attention`].
#[derive(Debug, Clone)]
struct Core {
    dims: Dims,
    /// Fused: `[q_width + k_width + v_width, E]`; else `[q_width, E]`.
    w_q_or_qkv: Tensor,
    /// Separate key and value weights when `kdim` or `vdim` differ from `E`.
    w_k: Option<Tensor>,
    w_v: Option<Tensor>,
    /// `[q_width + k_width + v_width]`.
    b_qkv: Option<Tensor>,
    w_out: Option<Tensor>,
    b_out: Option<Tensor>,
    /// `[k_width]` and `[v_width]` rows appended to keys and values.
    bias_kv: Option<(Tensor, Tensor)>,
    add_zero_attn: bool,
    rope: Option<Rope>,
    alibi: Option<Vec<f32>>,
}

/// A linear map of token rows: `dst[n, :] = x[n, :] · wᵀ (+ bias)` with `x: [N, in]`,
/// `w: [out, in]` given as the rows `w_rows` of a row-major weight of width `in_dim`,
/// `bias: [out]`, `dst: [N, out]` with row stride `dst_stride`.
///
/// The bias is written first and the GEMM adds to it, so the destination is visited once.
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
    let n = x.shape()[0];
    let out = w_rows.len();
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
    let w_t = View2::new(
        &w[w_rows.start * in_dim..w_rows.end * in_dim],
        [in_dim, out],
        [1, in_dim],
    )?;
    let accum = match bias {
        Some(bias) => {
            // The bias goes in first and the GEMM adds to it: one pass over the destination.
            for row in 0..n {
                dst[row * dst_stride..row * dst_stride + out].copy_from_slice(bias);
            }
            Accum::Add
        }
        None => Accum::Replace,
    };
    let dst_view = ViewMut2::new(&mut dst[..needed], [n, out], [dst_stride, 1])?;
    gemm(dst_view, accum, x, w_t, 1.0, par)?;
    Ok(())
}

fn state_names(prefix_fused: bool, dims: &Dims, bias: bool, bias_kv: bool) -> Vec<String> {
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
    fn from_state_dict(
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
        })
    }

    fn state_dict(&self) -> StateDict {
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
    fn weight(&self, which: usize) -> (&[f32], std::ops::Range<usize>, usize) {
        let (qw, kw, vw) = (self.dims.q_width(), self.dims.k_width(), self.dims.v_width());
        if self.dims.fused() {
            let rows = [0..qw, qw..qw + kw, qw + kw..qw + kw + vw][which].clone();
            (self.w_q_or_qkv.data(), rows, self.dims.e)
        } else {
            match which {
                0 => (self.w_q_or_qkv.data(), 0..qw, self.dims.e),
                1 => (
                    self.w_k.as_ref().expect("separate weights").data(),
                    0..kw,
                    self.dims.kdim,
                ),
                _ => (
                    self.w_v.as_ref().expect("separate weights").data(),
                    0..vw,
                    self.dims.vdim,
                ),
            }
        }
    }

    /// The bias of the Q, K or V projection (`which` = 0, 1, 2).
    fn bias(&self, which: usize) -> Option<&[f32]> {
        let (qw, kw, vw) = (self.dims.q_width(), self.dims.k_width(), self.dims.v_width());
        let range = [0..qw, qw..qw + kw, qw + kw..qw + kw + vw][which].clone();
        Some(&self.b_qkv.as_ref()?.data()[range])
    }

    /// Token rows `[B·L, dim]` of a sequence, in storage order.
    fn rows<'a>(seq: &Sequence<'a>) -> Result<View2<'a, f32>> {
        Ok(View2::contiguous(seq.data, [seq.batch * seq.len, seq.dim])?)
    }

    /// Keys and values `[B, T', G, D]` (T' = T + extra rows), batch-first, projected.
    fn project_kv(&self, key: &Sequence<'_>, value: &Sequence<'_>, par: Par) -> Result<(Vec<f32>, Vec<f32>, usize)> {
        let Dims { g, d, dv, .. } = self.dims;
        let extra = usize::from(self.bias_kv.is_some()) + usize::from(self.add_zero_attn);
        let (b, t) = (key.batch, key.len);
        let t_all = t + extra;
        let mut k_buf = vec![0.0f32; b * t_all * g * d];
        let mut v_buf = vec![0.0f32; b * t_all * g * dv];
        for (which, seq, buf, width) in [(1, key, &mut k_buf, g * d), (2, value, &mut v_buf, g * dv)] {
            let (w, rows, in_dim) = self.weight(which);
            let bias = self.bias(which);
            let [bs, ls] = seq.token_strides();
            for bi in 0..b {
                if t == 0 {
                    break;
                }
                // Batch `bi`'s token rows: `[T, in]` with row stride `ls·in`.
                let x = View2::new(&seq.data[bi * bs * in_dim..], [t, in_dim], [ls * in_dim, 1])?;
                linear(
                    &mut buf[bi * t_all * width..],
                    width,
                    x,
                    w,
                    rows.clone(),
                    in_dim,
                    bias,
                    par,
                )?;
                if let Some((bk, bv)) = &self.bias_kv {
                    let src = if which == 1 { bk.data() } else { bv.data() };
                    buf[(bi * t_all + t) * width..(bi * t_all + t + 1) * width].copy_from_slice(src);
                }
                // A zero row for `add_zero_attn` is already there.
            }
        }
        Ok((k_buf, v_buf, t_all))
    }

    /// The forward pass. `key`/`value` of `None` means self-attention on `query`.
    fn forward(
        &self,
        query: &Sequence<'_>,
        kv: Option<(&Sequence<'_>, &Sequence<'_>)>,
        options: &MhaOptions<'_>,
        cache: Option<&mut KvCache>,
        fixed: Option<&KvCache>,
        par: Par,
    ) -> Result<MhaOutput> {
        let op = "multihead_attention";
        let Dims { e, h, g, d, dv, .. } = self.dims;
        query.check(op, "query", e)?;
        let (key, value) = kv.unwrap_or((query, query));
        if fixed.is_none() {
            key.check(op, "key", self.dims.kdim)?;
            value.check(op, "value", self.dims.vdim)?;
        }
        if key.batch != query.batch || value.batch != query.batch || key.len != value.len {
            return Err(shape_error(
                op,
                "key/value",
                format!("batch {} and equal lengths", query.batch),
                &[key.batch, key.len, value.batch, value.len],
            ));
        }
        if key.layout != query.layout || value.layout != query.layout {
            return Err(AttnError::InvalidConfig {
                field: "layout",
                got: format!("{:?}/{:?}/{:?}", query.layout, key.layout, value.layout),
                expected: "one layout for query, key and value".into(),
            });
        }
        let (b, s) = (query.batch, query.len);
        let offset = cache.as_ref().map_or(0, |c| c.len());
        // With a cache, the new queries are the last positions of the cached sequence.
        let decoding = cache.is_some();
        if decoding && (self.bias_kv.is_some() || self.add_zero_attn) {
            return Err(AttnError::InvalidConfig {
                field: "add_bias_kv / add_zero_attn",
                got: "true".into(),
                expected: "false for cached decoding (appended rows would repeat at every step)".into(),
            });
        }

        // Queries: `[tokens, H·D]` in the query's storage order; for self-attention without
        // extra key rows, one fused GEMM gives `[tokens, q|k|v]`.
        let fused_self =
            fixed.is_none() && kv.is_none() && self.dims.fused() && self.bias_kv.is_none() && !self.add_zero_attn;
        let qkv_width = self.dims.q_width() + self.dims.k_width() + self.dims.v_width();
        let q_rows = Self::rows(query)?;
        let [qbs, qls] = query.token_strides();
        let (q_buf, q_width) = if fused_self {
            let mut buf = vec![0.0f32; b * s * qkv_width];
            let bias = self.b_qkv.as_ref().map(|t| t.data());
            linear(
                &mut buf,
                qkv_width,
                q_rows,
                self.w_q_or_qkv.data(),
                0..qkv_width,
                e,
                bias,
                par,
            )?;
            (buf, qkv_width)
        } else {
            let mut buf = vec![0.0f32; b * s * h * d];
            let (w, rows, in_dim) = self.weight(0);
            linear(&mut buf, h * d, q_rows, w, rows, in_dim, self.bias(0), par)?;
            (buf, h * d)
        };
        let mut q_buf = q_buf;

        // Keys and values, batch-first `[B, T', G, D]`, or views of the fused buffer.
        let (mut k_buf, v_buf, t_new) = if fused_self || fixed.is_some() {
            (Vec::new(), Vec::new(), s)
        } else {
            self.project_kv(key, value, par)?
        };
        if let Some(rope) = &self.rope {
            let token_position = |r: usize| offset + if qls == 1 { r % s.max(1) } else { r / b.max(1) };
            rope.apply(&mut q_buf, q_width, 0, h, d, token_position, b * s);
            if fused_self {
                rope.apply(&mut q_buf, q_width, h * d, g, d, token_position, b * s);
            } else if fixed.is_none() {
                rope.apply(&mut k_buf, g * d, 0, g, d, |r| offset + r % t_new.max(1), b * t_new);
            }
        }
        // 4-D views `[B, X, L, D]` of the projections.
        fn head_view(
            data: &[f32],
            base: usize,
            [b, heads, len, hd]: [usize; 4],
            row_width: usize,
            [bs, ls]: [usize; 2],
        ) -> Result<View4<'_, f32>> {
            Ok(View4::new(
                &data[base.min(data.len())..],
                [b, heads, len, hd],
                [bs * row_width, hd, ls * row_width, 1],
            )?)
        }
        let q_view = head_view(&q_buf, 0, [b, h, s, d], q_width, [qbs, qls])?;
        let (k_fresh, v_fresh) = if let Some(fixed) = fixed {
            if fixed.dims() != [b, g, d, dv] {
                return Err(shape_error(
                    op,
                    "cache",
                    format!("[B, G, D, Dv] = {:?}", [b, g, d, dv]),
                    &fixed.dims(),
                ));
            }
            (fixed.keys(), fixed.values())
        } else if fused_self {
            (
                head_view(&q_buf, h * d, [b, g, s, d], q_width, [qbs, qls])?,
                head_view(&q_buf, h * d + g * d, [b, g, s, dv], q_width, [qbs, qls])?,
            )
        } else {
            (
                View4::new(&k_buf, [b, g, t_new, d], [t_new * g * d, d, g * d, 1])?,
                View4::new(&v_buf, [b, g, t_new, dv], [t_new * g * dv, dv, g * dv, 1])?,
            )
        };
        let cache_ref;
        let (k_view, v_view) = match cache {
            Some(cache) => {
                if cache.dims() != [b, g, d, dv] {
                    return Err(shape_error(
                        op,
                        "cache",
                        format!("[B, G, D, Dv] = {:?}", [b, g, d, dv]),
                        &cache.dims(),
                    ));
                }
                cache.append(k_fresh, v_fresh)?;
                cache_ref = &*cache;
                (cache_ref.keys(), cache_ref.values())
            }
            None => (k_fresh, v_fresh),
        };
        let t = k_view.shape()[2];

        // Masks, in the module's conventions, padded for appended key rows.
        let extra = if fused_self || fixed.is_some() {
            0
        } else {
            t_new - key.len
        };
        let masks = MaskSet::new(options, [b, h, s, t], extra, decoding)?;
        let kernel_options = masks.options(self.alibi.as_deref())?;

        // Attention: each head written straight into `[tokens, H·Dv]` in the query's order.
        let mut attn_out = vec![0.0f32; b * s * h * dv];
        let out_view = ViewMut::new(&mut attn_out[..], [b, h, s, dv], [qbs * h * dv, dv, qls * h * dv, 1])?;
        let mut lse = vec![
            0.0f32;
            if options.need_weights == NeedWeights::No {
                0
            } else {
                b * h * s
            }
        ];
        let lse_view = if lse.is_empty() {
            None
        } else {
            Some(ViewMut::contiguous(&mut lse[..], [b, h, s])?)
        };
        flash_attention(out_view, lse_view, q_view, k_view, v_view, &kernel_options, par)?;

        let weights = match options.need_weights {
            NeedWeights::No => None,
            kind => {
                let lse_view = View::contiguous(&lse[..], [b, h, s])?;
                let mut w = vec![
                    0.0f32;
                    if kind == NeedWeights::PerHead {
                        b * h * s * t
                    } else {
                        b * s * t
                    }
                ];
                let dst = if kind == NeedWeights::PerHead {
                    WeightsDst::PerHead(ViewMut::contiguous(&mut w[..], [b, h, s, t])?)
                } else {
                    WeightsDst::Averaged(ViewMut::contiguous(&mut w[..], [b, s, t])?)
                };
                attention_weights(dst, q_view, k_view, lse_view, &kernel_options, par)?;
                Some(w)
            }
        };

        // Output projection over the token rows as they are.
        let output = match (&self.w_out, self.dims.out) {
            (Some(w_out), Some(out_dim)) => {
                let mut output = vec![0.0f32; b * s * out_dim];
                let x = View2::contiguous(&attn_out, [b * s, h * dv])?;
                linear(
                    &mut output,
                    out_dim,
                    x,
                    w_out.data(),
                    0..out_dim,
                    h * dv,
                    self.b_out.as_ref().map(|t| t.data()),
                    par,
                )?;
                output
            }
            _ => attn_out,
        };
        Ok(MhaOutput { output, weights })
    }
}

/// The masks of one call, converted and padded as needed, owning any buffers.
struct MaskSet {
    /// `[S, T]` or `[B, H, S, T]` boolean, `true` = masked out.
    bool_mask: Option<(Vec<bool>, Vec<usize>)>,
    /// Additive `[S, T]` or `[B, H, S, T]`.
    add_mask: Option<(Vec<f32>, Vec<usize>)>,
    /// `[B, T]` key padding, `true` = masked out, or additive.
    pad_bool: Option<Vec<bool>>,
    pad_add: Option<Vec<f32>>,
    lengths: Option<Vec<usize>>,
    target: [usize; 4],
    /// Causal alignment that the kernel applies.
    causal: Causal,
}

impl MaskSet {
    /// `extra` key rows were appended after the `T - extra` real keys; masks get columns that
    /// allow them (PyTorch pads with zeros).
    fn new(options: &MhaOptions<'_>, target: [usize; 4], extra: usize, decoding: bool) -> Result<Self> {
        let op = "multihead_attention";
        let [b, h, s, t] = target;
        let t_real = t - extra;
        let pad_cols = |rows: usize, data: &mut dyn FnMut(usize, usize)| {
            for r in 0..rows {
                for c in 0..t {
                    data(r, c);
                }
            }
        };
        let mask_shape = |shape: &[usize]| -> Result<(usize, Vec<usize>)> {
            match *shape {
                [ms, mt] if [ms, mt] == [s, t_real] => Ok((s, vec![s, t])),
                [mb, ms, mt] if [mb, ms, mt] == [b * h, s, t_real] => Ok((b * h * s, vec![b, h, s, t])),
                _ => Err(shape_error(
                    op,
                    "attn_mask",
                    format!("[S, T] = [{s}, {t_real}] or [B·H, S, T] = [{}, {s}, {t_real}]", b * h),
                    shape,
                )),
            }
        };
        let mut set = MaskSet {
            bool_mask: None,
            add_mask: None,
            pad_bool: None,
            pad_add: None,
            lengths: None,
            target,
            causal: Causal::None,
        };
        match options.attn_mask {
            ScoreMask::None => {}
            ScoreMask::Bool { data, shape, meaning } => {
                let (rows, full) = mask_shape(shape)?;
                check_len("attn_mask", shape, data.len())?;
                let mut out = vec![false; rows * t];
                pad_cols(rows, &mut |r, c| {
                    out[r * t + c] = c < t_real && (data[r * t_real + c] == (meaning == BoolMeaning::MaskedOut));
                });
                set.bool_mask = Some((out, full));
            }
            ScoreMask::Additive { data, shape } => {
                let (rows, full) = mask_shape(shape)?;
                check_len("attn_mask", shape, data.len())?;
                let mut out = vec![0.0f32; rows * t];
                pad_cols(rows, &mut |r, c| {
                    out[r * t + c] = if c < t_real { data[r * t_real + c] } else { 0.0 }
                });
                set.add_mask = Some((out, full));
            }
        }
        let padding_len = |len: usize| {
            if len != b * t_real {
                return Err(shape_error(
                    op,
                    "key_padding_mask",
                    format!("[B, T] = [{b}, {t_real}]"),
                    &[len],
                ));
            }
            Ok(())
        };
        match options.key_padding {
            KeyPadding::None => {}
            KeyPadding::Lengths(lengths) => {
                if lengths.len() != b {
                    return Err(shape_error(op, "key_lengths", format!("[B] = [{b}]"), &[lengths.len()]));
                }
                if let Some(&bad) = lengths.iter().find(|&&l| l > t_real) {
                    return Err(AttnError::InvalidConfig {
                        field: "key_lengths",
                        got: bad.to_string(),
                        expected: format!("at most T = {t_real}"),
                    });
                }
                if extra == 0 {
                    set.lengths = Some(lengths.to_vec());
                } else {
                    let mut out = vec![false; b * t];
                    pad_cols(b, &mut |r, c| out[r * t + c] = c >= lengths[r] && c < t_real);
                    set.pad_bool = Some(out);
                }
            }
            KeyPadding::Bool { data, meaning } => {
                padding_len(data.len())?;
                let mut out = vec![false; b * t];
                pad_cols(b, &mut |r, c| {
                    out[r * t + c] = c < t_real && (data[r * t_real + c] == (meaning == BoolMeaning::MaskedOut))
                });
                set.pad_bool = Some(out);
            }
            KeyPadding::Additive(data) => {
                padding_len(data.len())?;
                let mut out = vec![0.0f32; b * t];
                pad_cols(b, &mut |r, c| {
                    out[r * t + c] = if c < t_real { data[r * t_real + c] } else { 0.0 }
                });
                set.pad_add = Some(out);
            }
        }
        if decoding {
            // New queries are the last positions of the cached sequence.
            set.causal = Causal::BottomRight;
        } else if options.is_causal {
            if extra == 0 {
                set.causal = Causal::TopLeft;
            } else {
                // Appended key rows stay visible to every query, as in PyTorch's padded mask.
                let mut causal = vec![false; s * t];
                pad_cols(s, &mut |r, c| causal[r * t + c] = c < t_real && c > r);
                set.merge_bool_2d(causal);
            }
        }
        Ok(set)
    }

    /// Folds a boolean `[S, T]` "masked out" mask into the score mask.
    fn merge_bool_2d(&mut self, extra_mask: Vec<bool>) {
        let [b, h, s, t] = self.target;
        match &mut self.bool_mask {
            None => self.bool_mask = Some((extra_mask, vec![s, t])),
            Some((data, shape)) => {
                let per = s * t;
                let copies = if shape.len() == 4 { b * h } else { 1 };
                for c in 0..copies {
                    for i in 0..per {
                        data[c * per + i] |= extra_mask[i];
                    }
                }
            }
        }
    }

    fn options<'a>(&'a self, alibi: Option<&'a [f32]>) -> Result<AttentionOptions<'a>> {
        let target = self.target;
        let [b, _, _, t] = target;
        let mut mask = Mask::None;
        if let Some((data, shape)) = &self.bool_mask {
            mask = Mask::Disallowed(attn_kernels::broadcast_to(data, shape, target)?);
        }
        if let Some((data, shape)) = &self.add_mask {
            if matches!(mask, Mask::None) {
                mask = Mask::Additive(attn_kernels::broadcast_to(data, shape, target)?);
            }
        }
        let mut key_mask = Mask::None;
        if let Some(data) = &self.pad_bool {
            key_mask = Mask::Disallowed(attn_kernels::broadcast_to(data, &[b, 1, 1, t], target)?);
        }
        if let Some(data) = &self.pad_add {
            key_mask = Mask::Additive(attn_kernels::broadcast_to(data, &[b, 1, 1, t], target)?);
        }
        if self.bool_mask.is_some() && self.add_mask.is_some() {
            // Unreachable: a call carries one attn_mask.
            return Err(AttnError::InvalidConfig {
                field: "attn_mask",
                got: "two".into(),
                expected: "one mask".into(),
            });
        }
        Ok(AttentionOptions {
            scale: None,
            mask,
            key_mask,
            causal: self.causal,
            key_lengths: self.lengths.as_deref(),
            alibi_slopes: alibi,
        })
    }
}

fn check_len(name: &str, shape: &[usize], len: usize) -> Result<()> {
    let needed: usize = shape.iter().product();
    if needed != len {
        return Err(AttnError::BadTensorData {
            name: name.to_string(),
            shape: shape.to_vec(),
            needed,
            len,
        });
    }
    Ok(())
}

/// Multi-head attention owning its weights: PyTorch's `nn.MultiheadAttention` (inference), with
/// grouped-query heads, RoPE and ALiBi as extensions.
///
/// ```
/// use attn_core::{MhaConfig, MhaOptions, MultiHeadAttention, Sequence};
/// use attn_core::kernels::Par;
/// let mut config = MhaConfig::new(8, 2);
/// config.batch_first = true;
/// let mha = MultiHeadAttention::with_seed(config, 7).unwrap();
/// let x = vec![0.1f32; 3 * 8]; // [B=1, S=3, E=8]
/// let out = mha.forward_self(Sequence::batch_first(&x, 1, 3, 8), &MhaOptions::default(), Par::Seq).unwrap();
/// assert_eq!(out.output.len(), 3 * 8);
/// ```
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    config: MhaConfig,
    core: Core,
}

impl MultiHeadAttention {
    /// Builds the module from `nn.MultiheadAttention.state_dict()` tensors: `in_proj_weight`
    /// `[3E, E]` (or `q_proj_weight` `[E, E]`, `k_proj_weight` `[E, kdim]`, `v_proj_weight`
    /// `[E, vdim]` when `kdim` or `vdim` differ from `E`), `in_proj_bias` `[3E]`,
    /// `out_proj.weight` `[E, E]`, `out_proj.bias` `[E]`, `bias_k` and `bias_v` `[1, 1, E]`. With
    /// `num_kv_heads = G`, the key and value parts have `G·E/H` rows. A missing, misshapen or
    /// unknown tensor is an error naming it.
    pub fn from_state_dict(config: MhaConfig, dict: StateDict) -> Result<Self> {
        let dims = config.dims()?;
        let mut core = Core::from_state_dict(dims, dict, config.bias, config.add_bias_kv, config.add_zero_attn)?;
        core.rope = config.rope;
        core.alibi = config.alibi.then(|| crate::alibi_slopes(dims.h));
        Ok(MultiHeadAttention { config, core })
    }

    /// A module with deterministic pseudo-random weights (uniform in `±1/sqrt(fan_in)`), for
    /// tests, demos and benchmarks.
    pub fn with_seed(config: MhaConfig, seed: u64) -> Result<Self> {
        let dims = config.dims()?;
        let dict = random_state_dict(&dims, config.bias, config.add_bias_kv, seed);
        Self::from_state_dict(config, dict)
    }

    /// The tensors under their PyTorch names, for saving.
    pub fn state_dict(&self) -> StateDict {
        self.core.state_dict()
    }

    /// The configuration.
    pub fn config(&self) -> &MhaConfig {
        &self.config
    }

    /// `[E, H, G, D]`.
    pub fn dims(&self) -> [usize; 4] {
        let d = self.core.dims;
        [d.e, d.h, d.g, d.d]
    }

    /// Cross- or general attention: query `[B, S, E]`, key `[B, T, kdim]`, value `[B, T, vdim]`
    /// (each in its [`Layout`]) -> output `[B, S, E]` and optional weights.
    pub fn forward(
        &self,
        query: Sequence<'_>,
        key: Sequence<'_>,
        value: Sequence<'_>,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        self.core
            .forward(&query, Some((&key, &value)), options, None, None, par)
    }

    /// Self-attention, `x: [B, S, E]` -> `[B, S, E]`: one fused QKV GEMM, heads as strided views.
    pub fn forward_self(&self, x: Sequence<'_>, options: &MhaOptions<'_>, par: Par) -> Result<MhaOutput> {
        self.core.forward(&x, None, options, None, None, par)
    }

    /// Self-attention over packed sequences of different lengths, without padding: `x: [N, E]`
    /// holds the token rows of every sequence back to back, sequence `i` being rows
    /// `starts[i]..starts[i + 1]` -> `[N, E]`. Each sequence attends only to itself; `causal`
    /// makes that attention causal. The projections run once over all `N` rows, so the cost
    /// follows the real token count.
    pub fn forward_self_packed(&self, x: &[f32], starts: &[usize], causal: bool, par: Par) -> Result<Vec<f32>> {
        self.core.forward_packed(x, starts, causal, par)
    }

    /// Incremental self-attention: `x: [B, n, E]` are the next `n` positions; their keys and
    /// values join `cache`, and each new query attends every cached position up to its own.
    /// Decoding N tokens one at a time equals one causal `forward_self` over the N tokens.
    pub fn forward_cached(
        &self,
        x: Sequence<'_>,
        cache: &mut KvCache,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        let mut options = *options;
        options.is_causal = true;
        self.core.forward(&x, None, &options, Some(cache), None, par)
    }

    /// Projects `key: [B, T, kdim]` and `value: [B, T, vdim]` once and appends them to `cache`,
    /// for cross-attention over a fixed memory (an encoder's output) at every decoding step.
    pub fn fill_cache(&self, key: Sequence<'_>, value: Sequence<'_>, cache: &mut KvCache, par: Par) -> Result<()> {
        let op = "multihead_attention";
        key.check(op, "key", self.core.dims.kdim)?;
        value.check(op, "value", self.core.dims.vdim)?;
        if key.batch != value.batch || key.len != value.len {
            return Err(shape_error(
                op,
                "value",
                format!("[B, T] = [{}, {}]", key.batch, key.len),
                &[value.batch, value.len],
            ));
        }
        let Dims { g, d, dv, .. } = self.core.dims;
        let (mut k_buf, v_buf, t) = self.core.project_kv(&key, &value, par)?;
        let b = key.batch;
        if let Some(rope) = &self.core.rope {
            let offset = cache.len();
            rope.apply(&mut k_buf, g * d, 0, g, d, |r| offset + r % t.max(1), b * t);
        }
        cache.append(
            View4::new(&k_buf, [b, g, t, d], [t * g * d, d, g * d, 1])?,
            View4::new(&v_buf, [b, g, t, dv], [t * g * dv, dv, g * dv, 1])?,
        )
    }

    /// Attention of `query: [B, S, E]` over keys and values already in `cache` (see
    /// [`fill_cache`](Self::fill_cache)), which is left unchanged -> `[B, S, E]`. Masks refer to
    /// the cached positions.
    pub fn forward_with_cache(
        &self,
        query: Sequence<'_>,
        cache: &KvCache,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        self.core.forward(&query, None, options, None, Some(cache), par)
    }

    /// An empty cache sized for this module and `batch` sequences.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let d = self.core.dims;
        KvCache::new(batch, d.g, d.d, d.dv, capacity)
    }
}

/// Deterministic weights for `dims` under the PyTorch names.
fn random_state_dict(dims: &Dims, bias: bool, bias_kv: bool, seed: u64) -> StateDict {
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

/// Configuration of a single-head [`Attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    /// Query input width.
    pub embed_dim: usize,
    /// Key input width.
    pub kdim: usize,
    /// Value input width.
    pub vdim: usize,
    /// D, the width of queries and keys after projection.
    pub head_dim: usize,
    /// Dv, the width of values after projection (and of the output).
    pub v_head_dim: usize,
    /// Biases on the projections.
    pub bias: bool,
}

/// Single-head attention owning its Q, K and V projections: query `[B, S, E]`, key
/// `[B, T, kdim]`, value `[B, T, vdim]` -> `[B, S, Dv]`. It has no output projection; a
/// multi-head module is the concatenation of its heads followed by one.
///
/// State-dict names follow `nn.MultiheadAttention`'s separate form: `q_proj_weight` `[D, E]`,
/// `k_proj_weight` `[D, kdim]`, `v_proj_weight` `[Dv, vdim]`, `in_proj_bias` `[2D + Dv]`.
#[derive(Debug, Clone)]
pub struct Attention {
    core: Core,
}

impl Attention {
    /// Builds the head from its tensors (see the type's docs for names and shapes).
    pub fn from_state_dict(config: AttentionConfig, dict: StateDict) -> Result<Self> {
        let dims = Dims {
            e: config.embed_dim,
            kdim: config.kdim,
            vdim: config.vdim,
            h: 1,
            g: 1,
            d: config.head_dim,
            dv: config.v_head_dim,
            out: None,
        };
        if [dims.e, dims.kdim, dims.vdim, dims.d, dims.dv].contains(&0) {
            return Err(AttnError::InvalidConfig {
                field: "attention dims",
                got: format!("{config:?}"),
                expected: "all at least 1".into(),
            });
        }
        let core = Core::from_state_dict_separate(dims, dict, config.bias)?;
        Ok(Attention { core })
    }

    /// Single-head attention, `query: [B, S, E]`, `key: [B, T, kdim]`, `value: [B, T, vdim]` ->
    /// `[B, S, Dv]`.
    pub fn forward(
        &self,
        query: Sequence<'_>,
        key: Sequence<'_>,
        value: Sequence<'_>,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        self.core
            .forward(&query, Some((&key, &value)), options, None, None, par)
    }
}

impl Core {
    fn forward_packed(&self, x: &[f32], starts: &[usize], causal: bool, par: Par) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let op = "multihead_attention_packed";
        let Dims { e, h, g, d, dv, .. } = self.dims;
        if !self.dims.fused() || self.bias_kv.is_some() || self.add_zero_attn {
            return Err(AttnError::InvalidConfig {
                field: "packed self-attention",
                got: "kdim/vdim, add_bias_kv or add_zero_attn".into(),
                expected: "a plain self-attention module".into(),
            });
        }
        let n = x.len() / e;
        if n * e != x.len() {
            return Err(shape_error(op, "x", format!("[N, E] with E = {e}"), &[x.len()]));
        }
        if starts.first() != Some(&0) || starts.last() != Some(&n) || starts.windows(2).any(|w| w[0] > w[1]) {
            return Err(shape_error(
                op,
                "starts",
                format!("0 = starts[0] <= ... <= starts[last] = N = {n}"),
                starts,
            ));
        }
        let width = self.dims.q_width() + self.dims.k_width() + self.dims.v_width();
        let mut qkv = vec![0.0f32; n * width];
        let bias = self.b_qkv.as_ref().map(|t| t.data());
        linear(
            &mut qkv,
            width,
            View2::contiguous(x, [n, e])?,
            self.w_q_or_qkv.data(),
            0..width,
            e,
            bias,
            par,
        )?;
        if let Some(rope) = &self.rope {
            let position = |r: usize| r - starts[starts.partition_point(|&s0| s0 <= r) - 1];
            rope.apply(&mut qkv, width, 0, h, d, position, n);
            rope.apply(&mut qkv, width, h * d, g, d, position, n);
        }
        let options = AttentionOptions {
            causal: if causal { Causal::TopLeft } else { Causal::None },
            alibi_slopes: self.alibi.as_deref(),
            ..Default::default()
        };
        let mut attn_out = vec![0.0f32; n * h * dv];
        // Split the output rows by sequence: each attention call writes its own rows.
        let mut chunks = Vec::with_capacity(starts.len() - 1);
        let mut rest = &mut attn_out[..];
        for w in starts.windows(2) {
            let (head, tail) = rest.split_at_mut((w[1] - w[0]) * h * dv);
            chunks.push((w[0], w[1] - w[0], head));
            rest = tail;
        }
        let attend = |(s0, len, out): (usize, usize, &mut [f32]), inner: Par| -> Result<()> {
            if len == 0 {
                return Ok(());
            }
            let rows = &qkv[s0 * width..(s0 + len) * width];
            let view = |base: usize, heads: usize, hd: usize| {
                View4::new(&rows[base..], [1, heads, len, hd], [len * width, hd, width, 1])
            };
            let out_view = ViewMut::new(out, [1, h, len, dv], [len * h * dv, dv, h * dv, 1])?;
            flash_attention(
                out_view,
                None,
                view(0, h, d)?,
                view(h * d, g, d)?,
                view(h * d + g * d, g, dv)?,
                &options,
                inner,
            )?;
            Ok(())
        };
        // Many sequences: one per task, each sequential. Few: one after another, each parallel.
        // Either way every row is computed the same way, so the bits do not depend on threads.
        if par == Par::Rayon && chunks.len() >= 2 * rayon::current_num_threads() {
            chunks.into_par_iter().try_for_each(|c| attend(c, Par::Seq))?;
        } else {
            chunks.into_iter().try_for_each(|c| attend(c, par))?;
        }
        match (&self.w_out, self.dims.out) {
            (Some(w_out), Some(out_dim)) => {
                let mut output = vec![0.0f32; n * out_dim];
                let rows = View2::contiguous(&attn_out, [n, h * dv])?;
                linear(
                    &mut output,
                    out_dim,
                    rows,
                    w_out.data(),
                    0..out_dim,
                    h * dv,
                    self.b_out.as_ref().map(|t| t.data()),
                    par,
                )?;
                Ok(output)
            }
            _ => Ok(attn_out),
        }
    }

    /// Like [`Core::from_state_dict`] but always with separate Q, K, V weights.
    fn from_state_dict_separate(dims: Dims, mut dict: StateDict, bias: bool) -> Result<Self> {
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
        if dims.fused() {
            let mut data = Vec::with_capacity((qw + kw + vw) * dims.e);
            data.extend_from_slice(w_q.data());
            data.extend_from_slice(w_k.data());
            data.extend_from_slice(w_v.data());
            let fused = Tensor::new("in_proj_weight", vec![qw + kw + vw, dims.e], data)?;
            return Ok(Core {
                dims,
                w_q_or_qkv: fused,
                w_k: None,
                w_v: None,
                b_qkv,
                w_out: None,
                b_out: None,
                bias_kv: None,
                add_zero_attn: false,
                rope: None,
                alibi: None,
            });
        }
        Ok(Core {
            dims,
            w_q_or_qkv: w_q,
            w_k: Some(w_k),
            w_v: Some(w_v),
            b_qkv,
            w_out: None,
            b_out: None,
            bias_kv: None,
            add_zero_attn: false,
            rope: None,
            alibi: None,
        })
    }
}
