//! Training: a forward that keeps what the backward needs, and the backward, read side by side.
//!
//! The forward keeps the projections (after RoPE), the attention output `[tokens, H·Dv]` and
//! the kernel's LSE `[B, H, S]`: O(S) per query row, never `S×T`. It does not keep its inputs;
//! the backward takes them again ([`MhaInputs`]), as llm.c's backward passes take `inp`, so a
//! layer that already holds its activations does not hold them twice.
//!
//! The backward, in reverse order of the forward:
//! 1. output projection: `d_attn = dY·W_out`, `out_proj.weight += dYᵀ·attn`, `out_proj.bias += Σ dY`;
//! 2. attention: the fused kernel ([`attention_backward`]) from the LSE, under the same masks;
//! 3. RoPE: the inverse rotation of `dQ` and `dK`;
//! 4. appended key rows: `bias_k`, `bias_v` get their rows' gradients, summed over the batch
//!    (the `add_zero_attn` row has no parameter);
//! 5. input projections: one GEMM pair over the fused `[tokens, q|k|v]` for self-attention,
//!    else one per projection; `d_query` (and `d_key`, `d_value`) come back in the inputs' layout.

use std::sync::Arc;

use attn_kernels::{
    arena, attention_backward, attention_with_lse_lo, BackwardInputs, ForwardInputs, Gradients, Par, View, View4,
    ViewMut, ViewMut4,
};

use super::forward::{head_view, weights_from_lse, Projected, Source};
use super::packs::Bf16Weights;
use super::weights::Proj;
use super::{Core, Dims, MaskSet, MhaOptions, MhaOutput, MultiHeadAttention, NeedWeights, Sequence};
use crate::error::shape_error;
use crate::{Grads, ParamPath, Parameters, Result, Tensor};

/// The inputs of a training forward, given again to its backward.
#[derive(Debug, Clone, Copy)]
pub struct MhaInputs<'a> {
    /// `[B, S, E]` in the module's layout.
    pub query: Sequence<'a>,
    /// Key `[B, T, kdim]` and value `[B, T, vdim]`; `None` is self-attention over `query`.
    pub key_value: Option<(Sequence<'a>, Sequence<'a>)>,
    /// Masks and flags, as for [`MultiHeadAttention::forward`].
    pub options: MhaOptions<'a>,
    /// Sequences packed back to back without padding (the query and key sequences are then
    /// `[1, N, ·]` and `[1, M, ·]`).
    pub packing: Option<Packing<'a>>,
}

/// Sequences of different lengths packed back to back, without padding: sequence `i` is query
/// rows `query_starts[i]..query_starts[i + 1]` attending key rows
/// `key_starts[i]..key_starts[i + 1]` (the same starts for self-attention). Each sequence
/// attends only to itself; `is_causal` makes that top-left causal; no other mask applies. The
/// projections run once over all rows, so the cost follows the real token count.
#[derive(Debug, Clone, Copy)]
pub struct Packing<'a> {
    /// `0 = starts[0] <= ... <= starts[last] = N` over the query rows.
    pub query_starts: &'a [usize],
    /// The same over the key rows, one more entry than sequences.
    pub key_starts: &'a [usize],
}

/// What [`MultiHeadAttention::forward_train`] keeps for [`MultiHeadAttention::backward`].
#[derive(Debug)]
pub struct MhaTape {
    /// `[B, S, T]` of the call (T without appended rows), checked against the backward's inputs.
    pub(super) shape: [usize; 3],
    pub(super) projected: Projected,
    /// `[tokens, H·Dv]` in the query's storage order.
    pub(super) attn_out: Vec<f32>,
    /// `[B, H, S]`.
    pub(super) lse: Vec<f32>,
    /// `[B, H, S]`: what rounding `lse` lost, so the backward's probabilities are exact.
    pub(super) lse_lo: Vec<f32>,
}

impl MhaTape {
    /// Hands the tape's buffers back to the activation arena ([`attn_kernels::arena`]) for the
    /// next step.
    pub fn recycle(self) {
        let p = self.projected;
        [p.q_buf, p.k_buf, p.v_buf, self.attn_out, self.lse, self.lse_lo]
            .into_iter()
            .for_each(arena::give);
    }

    /// The kernel's backward inputs for the query rows `rows` of the call (`0..B·S`, or one
    /// packed sequence's `q0..q1` with `b = 1`): `[q, k, v]`, this tape's output and LSE, and
    /// `d_attn`, each output-shaped view `[b, h, len, dv]` with `out_strides`.
    pub(super) fn kernel_inputs<'a>(
        &'a self,
        [q, k, v]: [View4<'a, f32>; 3],
        d_attn: &'a [f32],
        rows: std::ops::Range<usize>,
        [b, h, len, dv]: [usize; 4],
        out_strides: [usize; 4],
    ) -> Result<BackwardInputs<'a>> {
        let (out_rows, lse_rows) = (rows.start * h * dv..rows.end * h * dv, rows.start * h..rows.end * h);
        Ok(BackwardInputs {
            q,
            k,
            v,
            out: View4::new(&self.attn_out[out_rows.clone()], [b, h, len, dv], out_strides)?,
            lse: View::contiguous(&self.lse[lse_rows.clone()], [b, h, len])?,
            lse_lo: Some(View::contiguous(&self.lse_lo[lse_rows], [b, h, len])?),
            dout: View4::new(&d_attn[out_rows], [b, h, len, dv], out_strides)?,
        })
    }

    /// Bytes the tape holds.
    pub fn bytes(&self) -> usize {
        4 * (self.projected.q_buf.len()
            + self.projected.k_buf.len()
            + self.projected.v_buf.len()
            + self.attn_out.len()
            + self.lse.len()
            + self.lse_lo.len())
    }
}

/// Gradients of the inputs, each in its input's layout and shape.
#[derive(Debug, Clone)]
pub struct MhaInputGrads {
    /// Of `query` (for self-attention: through queries, keys and values).
    pub query: Vec<f32>,
    /// Of `key` (`None` for self-attention).
    pub key: Option<Vec<f32>>,
    /// Of `value` (`None` for self-attention).
    pub value: Option<Vec<f32>>,
}

/// Views `[1, H, len, D]` of query rows `q0..q1` and `[1, G, len, ·]` of key/value rows
/// `k0..k1` of the projections (the fused `[N, q|k|v]` buffer, or queries `[N, H·D]` with keys
/// and values `[M, G·D]`).
pub(super) fn packed_views<'p>(
    p: &'p Projected,
    [h, g, d, dv]: [usize; 4],
    [q0, q1]: [usize; 2],
    [k0, k1]: [usize; 2],
) -> Result<[View4<'p, f32>; 3]> {
    let w = p.q_width;
    let (sl, tl) = (q1 - q0, k1 - k0);
    let q = View4::new(&p.q_buf[q0 * w..], [1, h, sl, d], [sl * w, d, w, 1])?;
    if p.fused {
        let k = View4::new(&p.q_buf[k0 * w + h * d..], [1, g, tl, d], [tl * w, d, w, 1])?;
        let v = View4::new(&p.q_buf[k0 * w + h * d + g * d..], [1, g, tl, dv], [tl * w, dv, w, 1])?;
        return Ok([q, k, v]);
    }
    let k = View4::new(&p.k_buf[k0 * g * d..], [1, g, tl, d], [tl * g * d, d, g * d, 1])?;
    let v = View4::new(&p.v_buf[k0 * g * dv..], [1, g, tl, dv], [tl * g * dv, dv, g * dv, 1])?;
    Ok([q, k, v])
}

impl MultiHeadAttention {
    /// The training forward: the output (and weights when asked for), as
    /// [`forward`](Self::forward) or [`forward_self`](Self::forward_self) gives them, and the
    /// tape its [`backward`](Self::backward) needs. Dropout is not applied (the module's
    /// `dropout` is ignored, as everywhere in attn-core).
    pub fn forward_train(&self, inputs: &MhaInputs<'_>, par: Par) -> Result<(MhaOutput, MhaTape)> {
        inputs.query.check_layout("query", self.config.batch_first)?;
        if let Some((key, value)) = &inputs.key_value {
            key.check_layout("key", self.config.batch_first)?;
            value.check_layout("value", self.config.batch_first)?;
        }
        self.core.forward_train(inputs, par)
    }

    /// The backward of [`forward_train`](Self::forward_train) called with the same `inputs`:
    /// adds the gradient of every parameter into `grads` (named `path` + its state-dict name
    /// (`in_proj_weight`, `in_proj_bias`, `out_proj.weight`, ..., `bias_k`), and returns the
    /// gradients of the inputs. `d_output` is the gradient of the output, in the output's
    /// layout. A query row with nothing to attend to passes no gradient through attention.
    pub fn backward(
        &self,
        inputs: &MhaInputs<'_>,
        tape: &MhaTape,
        d_output: &[f32],
        grads: &mut Grads,
        path: &ParamPath<'_>,
        par: Par,
    ) -> Result<MhaInputGrads> {
        self.core.backward(inputs, tape, d_output, grads, path, par)
    }
}

impl Parameters for MultiHeadAttention {
    /// `in_proj_weight` (or `q_proj_weight`, `k_proj_weight`, `v_proj_weight`),
    /// `in_proj_bias`, `bias_k`, `bias_v`, `out_proj.weight`, `out_proj.bias`: those the module
    /// has, in that order.
    fn visit_params<'a>(&'a mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
        // The weights may change: packed copies would go stale.
        self.core.drop_packs();
        each_param(&mut self.core, path, f);
    }

    /// In bf16, the packed copies the module held are packed again once its tensors have been
    /// updated; in f32 the module ends as [`Parameters::visit_params`] leaves it.
    fn update_params(&mut self, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &mut Tensor)) -> Result<()> {
        let had = self.core.bf16.take();
        self.core.drop_packs();
        each_param(&mut self.core, path, &mut |p, t| f(p, t));
        if let Some(had) = had {
            self.core.bf16 = Some(Arc::new(Bf16Weights::repacked(&self.core, &had)?));
        }
        Ok(())
    }
}

/// The module's parameters, in the order [`Parameters::visit_params`] gives.
fn each_param<'a>(c: &'a mut Core, path: &ParamPath<'_>, f: &mut dyn FnMut(&ParamPath<'_>, &'a mut Tensor)) {
    let fused = c.dims.fused();
    f(
        &path.join(if fused { "in_proj_weight" } else { "q_proj_weight" }),
        &mut c.w_q_or_qkv,
    );
    if let (Some(k), Some(v)) = (&mut c.w_k, &mut c.w_v) {
        f(&path.join("k_proj_weight"), k);
        f(&path.join("v_proj_weight"), v);
    }
    if let Some(b) = &mut c.b_qkv {
        f(&path.join("in_proj_bias"), b);
    }
    if let Some((k, v)) = &mut c.bias_kv {
        f(&path.join("bias_k"), k);
        f(&path.join("bias_v"), v);
    }
    if let Some(w) = &mut c.w_out {
        f(&path.join("out_proj.weight"), w);
    }
    if let Some(b) = &mut c.b_out {
        f(&path.join("out_proj.bias"), b);
    }
}

/// The batch, query length and query token strides of a call.
pub(super) struct CallViews {
    pub(super) b: usize,
    pub(super) s: usize,
    pub(super) qbs: usize,
    pub(super) qls: usize,
}

impl Core {
    pub(super) fn source<'a>(inputs: &MhaInputs<'a>) -> Source<'a, 'static> {
        match inputs.key_value {
            Some((k, v)) => Source::Cross(k, v),
            None => Source::SelfAttention,
        }
    }

    /// Key rows appended after the caller's (`add_bias_kv`, `add_zero_attn`).
    pub(super) fn extra_rows(&self) -> usize {
        usize::from(self.bias_kv.is_some()) + usize::from(self.add_zero_attn)
    }

    /// Views `[B, H, S, D]`, `[B, G, T', D]`, `[B, G, T', Dv]` of the projections.
    pub(super) fn kernel_views<'p>(&self, p: &'p Projected, c: &CallViews) -> Result<[View4<'p, f32>; 3]> {
        let Dims { h, g, d, dv, .. } = self.dims;
        let [b, s] = [c.b, c.s];
        let q = head_view(&p.q_buf, 0, [b, h, s, d], p.q_width, [c.qbs, c.qls])?;
        if p.fused {
            let k = head_view(&p.q_buf, h * d, [b, g, s, d], p.q_width, [c.qbs, c.qls])?;
            let v = head_view(&p.q_buf, h * d + g * d, [b, g, s, dv], p.q_width, [c.qbs, c.qls])?;
            return Ok([q, k, v]);
        }
        let t = p.t_new;
        Ok([
            q,
            View4::new(&p.k_buf, [b, g, t, d], [t * g * d, d, g * d, 1])?,
            View4::new(&p.v_buf, [b, g, t, dv], [t * g * dv, dv, g * dv, 1])?,
        ])
    }

    pub(super) fn forward_train(&self, inputs: &MhaInputs<'_>, par: Par) -> Result<(MhaOutput, MhaTape)> {
        let Dims { h, dv, .. } = self.dims;
        let query = &inputs.query;
        let source = Self::source(inputs);
        self.check_inputs(query, &source)?;
        let (b, s) = (query.batch, query.len);
        let [qbs, qls] = query.token_strides();
        let projected = self.project(query, &source, 0, par)?;
        let t_real = inputs.key_value.map_or(s, |(k, _)| k.len);
        if let Some(packing) = &inputs.packing {
            let (attn_out, lse, lse_lo) = self.packed_attention(&projected, inputs, packing, par)?;
            let output = self.project_out_of(&attn_out, b * s, par)?;
            let tape = MhaTape {
                shape: [b, s, t_real],
                projected,
                attn_out,
                lse,
                lse_lo,
            };
            return Ok((MhaOutput { output, weights: None }, tape));
        }
        let c = CallViews { b, s, qbs, qls };
        let [q, k, v] = self.kernel_views(&projected, &c)?;
        let t = k.shape()[2];
        let masks = MaskSet::new(&inputs.options, [b, h, s, t], t - t_real, false)?;
        let kernel_options = masks.options(self.alibi.as_deref())?;

        // The kernel writes every element of the three.
        let mut attn_out = arena::overwritten(b * s * h * dv);
        let mut lse = arena::overwritten(b * h * s);
        let mut lse_lo = arena::overwritten(b * h * s);
        attention_with_lse_lo(
            ViewMut::new(&mut attn_out[..], [b, h, s, dv], [qbs * h * dv, dv, qls * h * dv, 1])?,
            ViewMut::contiguous(&mut lse[..], [b, h, s])?,
            ViewMut::contiguous(&mut lse_lo[..], [b, h, s])?,
            ForwardInputs::new(q, k, v),
            &kernel_options,
            par,
        )?;
        let need = inputs.options.need_weights;
        let weights = match need {
            NeedWeights::No => None,
            _ => Some(weights_from_lse(need, q, k, &lse, &kernel_options, par)?),
        };
        let output = self.project_out_of(&attn_out, b * s, par)?;
        let tape = MhaTape {
            shape: [b, s, t_real],
            projected,
            attn_out,
            lse,
            lse_lo,
        };
        Ok((MhaOutput { output, weights }, tape))
    }

    pub(super) fn backward(
        &self,
        inputs: &MhaInputs<'_>,
        tape: &MhaTape,
        d_output: &[f32],
        grads: &mut Grads,
        path: &ParamPath<'_>,
        par: Par,
    ) -> Result<MhaInputGrads> {
        let op = "multihead_attention backward";
        let Dims { e, h, g, d, dv, .. } = self.dims;
        let query = &inputs.query;
        let (b, s) = (query.batch, query.len);
        let t_real = inputs.key_value.map_or(s, |(k, _)| k.len);
        if tape.shape != [b, s, t_real] {
            return Err(shape_error(
                op,
                "inputs",
                format!("the forward's [B, S, T] = {:?}", tape.shape),
                &[b, s, t_real],
            ));
        }
        self.check_inputs(query, &Self::source(inputs))?;
        let n = b * s;
        let out_width = self.dims.out.unwrap_or(h * dv);
        if d_output.len() != n * out_width {
            return Err(shape_error(
                op,
                "d_output",
                format!("[B, S, {out_width}]"),
                &[d_output.len()],
            ));
        }
        let p = &tape.projected;
        let [qbs, qls] = query.token_strides();

        // 1. The output projection.
        let d_attn = self.out_projection_backward(tape, d_output, n, (grads, path), par)?;

        // 2. Attention, under the forward's masks (or sequence by sequence when packed).
        let t = p.t_new;
        if p.fused {
            return self.fused_backward(inputs, tape, d_attn, grads, path, par);
        }
        // The kernel writes every element of the three (each packed sequence's call, its rows).
        let mut dq = arena::overwritten(n * h * d);
        let mut dk = arena::overwritten(b * t * g * d);
        let mut dv_buf = arena::overwritten(b * t * g * dv);
        match &inputs.packing {
            Some(packing) => self.check_packing(inputs, packing, t).and_then(|()| {
                self.packed_attention_backward(
                    tape,
                    &d_attn,
                    packing,
                    inputs.options.is_causal,
                    [&mut dq, &mut dk, &mut dv_buf],
                    par,
                )
            })?,
            None => {
                let c = CallViews { b, s, qbs, qls };
                let [q, k, v] = self.kernel_views(p, &c)?;
                let masks = MaskSet::new(&inputs.options, [b, h, s, t], t - t_real, false)?;
                let kernel_options = masks.options(self.alibi.as_deref())?;
                let out_strides = [qbs * h * dv, dv, qls * h * dv, 1];
                // dK and dV in the layout of K and V, `[B, T', G, ·]` (the fused projection
                // returned above).
                let (k_strides, v_strides) = ([t * g * d, d, g * d, 1], [t * g * dv, dv, g * dv, 1]);
                attention_backward(
                    Gradients {
                        dq: ViewMut4::new(&mut dq[..], [b, h, s, d], [qbs * h * d, d, qls * h * d, 1])?,
                        dk: ViewMut4::new(&mut dk[..], [b, g, t, d], k_strides)?,
                        dv: ViewMut4::new(&mut dv_buf[..], [b, g, t, dv], v_strides)?,
                    },
                    tape.kernel_inputs([q, k, v], &d_attn, 0..n, [b, h, s, dv], out_strides)?,
                    &kernel_options,
                    par,
                )?;
            }
        }

        arena::give(d_attn);

        // 3. RoPE's inverse rotation.
        if let Some(rope) = &self.rope {
            let token_position = |r: usize| if qls == 1 { r % s.max(1) } else { r / b.max(1) };
            rope.apply_inverse(&mut dq, [h * d, 0, h, d], token_position, n);
            rope.apply_inverse(&mut dk, [g * d, 0, g, d], |r| r % t.max(1), b * t);
        }

        // 5. The input projections (4, the appended rows, is inside `kv_backward`).
        let x_query = query.data;
        let mut d_query = arena::overwritten(n * e);
        self.projection_backward((grads, path), 0, Some(&mut d_query), &dq, x_query, par)?;
        let (key, value) = inputs.key_value.unwrap_or((*query, *query));
        let d_key = self.kv_backward(grads, path, 1, &key, &dk, par)?;
        let d_value = self.kv_backward(grads, path, 2, &value, &dv_buf, par)?;
        [dq, dk, dv_buf].into_iter().for_each(arena::give);
        if inputs.key_value.is_some() {
            return Ok(MhaInputGrads {
                query: d_query,
                key: Some(d_key),
                value: Some(d_value),
            });
        }
        // Self-attention: the query was also the key and the value.
        for ((q, k), v) in d_query.iter_mut().zip(&d_key).zip(&d_value) {
            *q += k + v;
        }
        [d_key, d_value].into_iter().for_each(arena::give);
        Ok(MhaInputGrads {
            query: d_query,
            key: None,
            value: None,
        })
    }

    /// The backward of the output projection: the gradient of the attention output `[N, H·Dv]`
    /// (arena storage), adding into `out_proj.*`; `d_output` itself without one.
    fn out_projection_backward(
        &self,
        tape: &MhaTape,
        d_output: &[f32],
        n: usize,
        (grads, path): (&mut Grads, &ParamPath<'_>),
        par: Par,
    ) -> Result<Vec<f32>> {
        let (Some(w_out), Some(_)) = (&self.w_out, self.dims.out) else {
            return Ok(arena::copied(d_output));
        };
        let in_dim = self.dims.h * self.dims.dv;
        // Written by the projection's backward.
        let mut d_attn = arena::overwritten(n * in_dim);
        let (dw, db) = grads.of_weight_and_bias(
            path,
            (w_out, "out_proj.weight"),
            self.b_out.as_ref().map(|b| (b, "out_proj.bias")),
        )?;
        self.proj_backward(Proj::Out, Some(&mut d_attn), dw, db, d_output, &tape.attn_out, par)?;
        Ok(d_attn)
    }

    /// The kernel options of packed sequences: causal or not, the module's ALiBi.
    pub(super) fn packed_options(&self, is_causal: bool) -> attn_kernels::AttentionOptions<'_> {
        attn_kernels::AttentionOptions {
            causal: if is_causal {
                attn_kernels::Causal::TopLeft
            } else {
                attn_kernels::Causal::None
            },
            alibi_slopes: self.alibi.as_deref(),
            ..Default::default()
        }
    }

    /// Checks a packing against the call: no mask but `is_causal`, no RoPE or appended rows;
    /// then batch 1, starts covering the rows, one count of sequences.
    pub(super) fn check_packing(&self, inputs: &MhaInputs<'_>, packing: &Packing<'_>, t: usize) -> Result<()> {
        let op = "multihead_attention (packed)";
        // What packing cannot carry, first: with appended key rows the starts would be
        // refused too, for a reason that is not the caller's.
        let o = &inputs.options;
        let masked = !matches!(o.attn_mask, crate::ScoreMask::None)
            || !matches!(o.key_padding, crate::KeyPadding::None)
            || o.need_weights != NeedWeights::No;
        if masked || self.rope.is_some() || self.extra_rows() > 0 {
            return Err(crate::AttnError::InvalidConfig {
                field: "packing",
                got: "with a mask, weights, RoPE, add_bias_kv or add_zero_attn".into(),
                expected: "packed sequences with at most is_causal".into(),
            });
        }
        let s = inputs.query.len;
        let valid = |starts: &[usize], n: usize| {
            starts.first() == Some(&0) && starts.last() == Some(&n) && starts.windows(2).all(|w| w[0] <= w[1])
        };
        if inputs.query.batch != 1 || !valid(packing.query_starts, s) {
            return Err(shape_error(
                op,
                "query_starts",
                format!("0 = starts[0] <= ... <= starts[last] = N = {s}, with the query as [1, N, E]"),
                packing.query_starts,
            ));
        }
        // Self-attention packs each sequence's keys on its own query rows.
        let self_attention = inputs.key_value.is_none();
        if !valid(packing.key_starts, t)
            || packing.key_starts.len() != packing.query_starts.len()
            || (self_attention && packing.key_starts != packing.query_starts)
        {
            return Err(shape_error(
                op,
                "key_starts",
                if self_attention {
                    format!("query_starts {:?} (self-attention)", packing.query_starts)
                } else {
                    format!("{} starts from 0 to M = {t}", packing.query_starts.len())
                },
                packing.key_starts,
            ));
        }
        Ok(())
    }

    /// Attention of packed sequences, each one kernel call on its rows: the output `[N, H·Dv]`
    /// and the LSE, `[H, len]` per sequence back to back.
    fn packed_attention(
        &self,
        p: &Projected,
        inputs: &MhaInputs<'_>,
        packing: &Packing<'_>,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let Dims { h, g, d, dv, .. } = self.dims;
        let n = inputs.query.len;
        self.check_packing(inputs, packing, p.t_new)?;
        let options = self.packed_options(inputs.options.is_causal);
        // Each sequence's call writes every element of its rows (a sequence without keys gets
        // zeros and an LSE of −∞).
        let mut attn_out = arena::overwritten(n * h * dv);
        let mut lse = arena::overwritten(n * h);
        let mut lse_lo = arena::overwritten(n * h);
        // Each sequence's rows of the output and of the LSE, split off for its own call.
        let mut jobs = Vec::new();
        let (mut out_rest, mut lse_rest, mut lo_rest) = (&mut attn_out[..], &mut lse[..], &mut lse_lo[..]);
        for (i, w) in packing.query_starts.windows(2).enumerate() {
            let len = w[1] - w[0];
            let (o, o_tail) = out_rest.split_at_mut(len * h * dv);
            let (l, l_tail) = lse_rest.split_at_mut(len * h);
            let (c, c_tail) = lo_rest.split_at_mut(len * h);
            jobs.push((i, o, l, c));
            out_rest = o_tail;
            lse_rest = l_tail;
            lo_rest = c_tail;
        }
        type Job<'j> = (usize, &'j mut [f32], &'j mut [f32], &'j mut [f32]);
        let attend = |(i, out, lse, lse_lo): Job<'_>, inner: Par| -> Result<()> {
            let (q0, q1) = (packing.query_starts[i], packing.query_starts[i + 1]);
            let (k0, k1) = (packing.key_starts[i], packing.key_starts[i + 1]);
            if q1 == q0 {
                return Ok(());
            }
            let [q, k, v] = packed_views(p, [h, g, d, dv], [q0, q1], [k0, k1])?;
            attention_with_lse_lo(
                ViewMut::new(out, [1, h, q1 - q0, dv], [(q1 - q0) * h * dv, dv, h * dv, 1])?,
                ViewMut::contiguous(lse, [1, h, q1 - q0])?,
                ViewMut::contiguous(lse_lo, [1, h, q1 - q0])?,
                ForwardInputs::new(q, k, v),
                &options,
                inner,
            )?;
            Ok(())
        };
        super::for_each_sequence(jobs, par, attend)?;
        Ok((attn_out, lse, lse_lo))
    }
}
