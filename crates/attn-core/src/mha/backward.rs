//! The backward's parts: the fused self-attention backward (dQ, dK, dV straight into `d_qkv`),
//! the packed sequences' backward, and the input projections' backward with the appended key
//! rows.

use std::borrow::Cow;

use attn_kernels::{arena, attention_backward, attention_backward_fused, FusedGradients, Gradients, Par, ViewMut4};

use super::train::{packed_views, CallViews, MhaInputGrads, MhaInputs, MhaTape, Packing};
use super::weights::Proj;
use super::{Core, Dims, MaskSet, Sequence};
use crate::{Grads, Layout, ParamPath, Result, Tensor};

/// A sequence's rows batch-first, `[B, L, dim]`: borrowed when they already are.
fn batch_first_rows<'a>(seq: &Sequence<'a>) -> Cow<'a, [f32]> {
    if seq.layout == Layout::BatchFirst || seq.batch <= 1 || seq.len <= 1 {
        return Cow::Borrowed(seq.data);
    }
    let (b, l, e) = (seq.batch, seq.len, seq.dim);
    let mut out = arena::zeroed(seq.data.len());
    for bi in 0..b {
        for li in 0..l {
            out[(bi * l + li) * e..][..e].copy_from_slice(&seq.data[(li * b + bi) * e..][..e]);
        }
    }
    Cow::Owned(out)
}

/// Batch-first rows `[B, L, dim]` laid out like `seq`.
fn in_layout_of(rows: Vec<f32>, seq: &Sequence<'_>) -> Vec<f32> {
    if seq.layout == Layout::BatchFirst || seq.batch <= 1 || seq.len <= 1 {
        return rows;
    }
    let (b, l, e) = (seq.batch, seq.len, seq.dim);
    let mut out = arena::zeroed(rows.len());
    for bi in 0..b {
        for li in 0..l {
            out[(li * b + bi) * e..][..e].copy_from_slice(&rows[(bi * l + li) * e..][..e]);
        }
    }
    arena::give(rows);
    out
}

impl Core {
    /// Steps 2, 3 and 5 of the backward for the fused `[tokens, q|k|v]` projection: the attention
    /// kernel writes dQ, dK and dV straight into their columns of one `d_qkv` buffer
    /// ([`FusedGradients`]), RoPE's inverse rotates them there, and one GEMM pair takes it back
    /// through `in_proj`.
    pub(super) fn fused_backward(
        &self,
        inputs: &MhaInputs<'_>,
        tape: &MhaTape,
        d_attn: Vec<f32>,
        grads: &mut Grads,
        path: &ParamPath<'_>,
        par: Par,
    ) -> Result<MhaInputGrads> {
        let Dims { e, h, g, d, dv, .. } = self.dims;
        let query = &inputs.query;
        let (b, s) = (query.batch, query.len);
        let n = b * s;
        let p = &tape.projected;
        let width = p.q_width;
        let [qbs, qls] = query.token_strides();
        // The kernel writes every element (each packed sequence's call, its rows).
        let mut d_qkv = arena::overwritten(n * width);
        // The blocks of rows `[rows, width]` laid out with batch and row strides `[bs, ls]`.
        let blocks = |[bs, ls]: [usize; 2], [b, s]: [usize; 2]| {
            [
                (0, [b, h, s, d], [bs * width, d, ls * width, 1]),
                (h * d, [b, g, s, d], [bs * width, d, ls * width, 1]),
                (h * d + g * d, [b, g, s, dv], [bs * width, dv, ls * width, 1]),
            ]
        };
        match &inputs.packing {
            Some(packing) => {
                self.check_packing(inputs, packing, p.t_new)?;
                let options = self.packed_options(inputs.options.is_causal);
                // Each sequence's rows of d_qkv, split off for its own call.
                let mut jobs = Vec::new();
                let mut rest = &mut d_qkv[..];
                for (i, w) in packing.query_starts.windows(2).enumerate() {
                    let (mine, tail) = rest.split_at_mut((w[1] - w[0]) * width);
                    jobs.push((i, mine));
                    rest = tail;
                }
                let run = |(i, rows): (usize, &mut [f32]), inner: Par| -> Result<()> {
                    let (q0, q1) = (packing.query_starts[i], packing.query_starts[i + 1]);
                    let sl = q1 - q0;
                    if sl == 0 {
                        return Ok(());
                    }
                    let [q, k, v] = packed_views(p, [h, g, d, dv], [q0, q1], [q0, q1])?;
                    let out_strides = [sl * h * dv, dv, h * dv, 1];
                    attention_backward_fused(
                        FusedGradients::new(rows, blocks([sl, 1], [1, sl]))?,
                        tape.kernel_inputs([q, k, v], &d_attn, q0..q1, [1, h, sl, dv], out_strides)?,
                        &options,
                        inner,
                    )?;
                    Ok(())
                };
                super::for_each_sequence(jobs, par, run)?;
            }
            None => {
                let c = CallViews { b, s, qbs, qls };
                let [q, k, v] = self.kernel_views(p, &c)?;
                let masks = MaskSet::new(&inputs.options, [b, h, s, s], 0, false)?;
                let kernel_options = masks.options(self.alibi.as_deref())?;
                let out_strides = [qbs * h * dv, dv, qls * h * dv, 1];
                attention_backward_fused(
                    FusedGradients::new(&mut d_qkv, blocks([qbs, qls], [b, s]))?,
                    tape.kernel_inputs([q, k, v], &d_attn, 0..n, [b, h, s, dv], out_strides)?,
                    &kernel_options,
                    par,
                )?;
            }
        }
        arena::give(d_attn);
        if let Some(rope) = &self.rope {
            let token_position = |r: usize| if qls == 1 { r % s.max(1) } else { r / b.max(1) };
            rope.apply_inverse(&mut d_qkv, [width, 0, h, d], token_position, n);
            rope.apply_inverse(&mut d_qkv, [width, h * d, g, d], token_position, n);
        }
        let mut d_query = arena::overwritten(n * e);
        let (dw, db) = grads.of_weight_and_bias(
            path,
            (&self.w_q_or_qkv, "in_proj_weight"),
            self.b_qkv.as_ref().map(|b| (b, "in_proj_bias")),
        )?;
        self.proj_backward(Proj::Fused, Some(&mut d_query), dw, db, &d_qkv, query.data, par)?;
        arena::give(d_qkv);
        Ok(MhaInputGrads {
            query: d_query,
            key: None,
            value: None,
        })
    }

    /// The backward of [`Core::packed_attention`]: `dQ` `[N, H·D]`, `dK`, `dV` in the layout of
    /// K and V (rows of the fused buffer, or `[M, G·D]`).
    pub(super) fn packed_attention_backward(
        &self,
        tape: &MhaTape,
        d_attn: &[f32],
        packing: &Packing<'_>,
        is_causal: bool,
        [dq, dk, dv]: [&mut Vec<f32>; 3],
        par: Par,
    ) -> Result<()> {
        let Dims { h, g, d, dv: dvw, .. } = self.dims;
        let p = &tape.projected;
        let options = self.packed_options(is_causal);
        // Split the gradients by sequence: query rows for dQ, key rows for dK and dV.
        let mut jobs = Vec::new();
        let (mut q_rest, mut k_rest, mut v_rest) = (&mut dq[..], &mut dk[..], &mut dv[..]);
        for (i, (qw, kw)) in packing
            .query_starts
            .windows(2)
            .zip(packing.key_starts.windows(2))
            .enumerate()
        {
            let (ql, kl) = (qw[1] - qw[0], kw[1] - kw[0]);
            let (a, a_tail) = q_rest.split_at_mut(ql * h * d);
            let (b, b_tail) = k_rest.split_at_mut(kl * g * d);
            let (c, c_tail) = v_rest.split_at_mut(kl * g * dvw);
            jobs.push((i, a, b, c));
            q_rest = a_tail;
            k_rest = b_tail;
            v_rest = c_tail;
        }
        let run = |(i, dq, dk, dv): (usize, &mut [f32], &mut [f32], &mut [f32]), inner: Par| -> Result<()> {
            let (q0, q1) = (packing.query_starts[i], packing.query_starts[i + 1]);
            let (k0, k1) = (packing.key_starts[i], packing.key_starts[i + 1]);
            let (sl, tl) = (q1 - q0, k1 - k0);
            if sl == 0 {
                // Keys no query attends to pass no gradient.
                dk.fill(0.0);
                dv.fill(0.0);
                return Ok(());
            }
            let [q, k, v] = packed_views(p, [h, g, d, dvw], [q0, q1], [k0, k1])?;
            let out_strides = [sl * h * dvw, dvw, h * dvw, 1];
            attention_backward(
                Gradients {
                    dq: ViewMut4::new(dq, [1, h, sl, d], [sl * h * d, d, h * d, 1])?,
                    dk: ViewMut4::new(dk, [1, g, tl, d], [tl * g * d, d, g * d, 1])?,
                    dv: ViewMut4::new(dv, [1, g, tl, dvw], [tl * g * dvw, dvw, g * dvw, 1])?,
                },
                tape.kernel_inputs([q, k, v], d_attn, q0..q1, [1, h, sl, dvw], out_strides)?,
                &options,
                inner,
            )?;
            Ok(())
        };
        super::for_each_sequence(jobs, par, run)
    }

    /// The weight tensor holding projection `which` (0, 1, 2) and its state-dict name.
    pub(super) fn weight_param(&self, which: usize) -> (&Tensor, &'static str) {
        match (which, &self.w_k, &self.w_v) {
            (1, Some(k), _) => (k, "k_proj_weight"),
            (2, _, Some(v)) => (v, "v_proj_weight"),
            _ if self.dims.fused() => (&self.w_q_or_qkv, "in_proj_weight"),
            _ => (&self.w_q_or_qkv, "q_proj_weight"),
        }
    }

    /// The backward of projection `which` over `x` rows: its weight rows and bias range get
    /// their gradients (in `grads`, named under `path`), and `dx` (if given) is written.
    pub(super) fn projection_backward(
        &self,
        (grads, path): (&mut Grads, &ParamPath<'_>),
        which: usize,
        dx: Option<&mut [f32]>,
        dy: &[f32],
        x: &[f32],
        par: Par,
    ) -> Result<()> {
        let (_, rows, in_dim) = self.weight(which);
        let (param, name) = self.weight_param(which);
        let (qw, kw, vw) = (self.dims.q_width(), self.dims.k_width(), self.dims.v_width());
        let bias_range = [0..qw, qw..qw + kw, qw + kw..qw + kw + vw][which].clone();
        let (dw, db) =
            grads.of_weight_and_bias(path, (param, name), self.b_qkv.as_ref().map(|b| (b, "in_proj_bias")))?;
        let dw = &mut dw[rows.start * in_dim..rows.end * in_dim];
        let db = db.map(|db| &mut db[bias_range]);
        self.proj_backward(Proj::Part(which), dx, dw, db, dy, x, par)
    }

    /// The backward of the key (`which` = 1) or value (2) side from its gradient `d_proj`
    /// `[B, T', width]`: the appended rows' parameters, then the projection; returns the
    /// gradient of `seq` in its layout.
    pub(super) fn kv_backward(
        &self,
        grads: &mut Grads,
        path: &ParamPath<'_>,
        which: usize,
        seq: &Sequence<'_>,
        d_proj: &[f32],
        par: Par,
    ) -> Result<Vec<f32>> {
        let (b, t_real) = (seq.batch, seq.len);
        let width = if which == 1 {
            self.dims.k_width()
        } else {
            self.dims.v_width()
        };
        let t = t_real + self.extra_rows();
        let real_rows: Cow<'_, [f32]> = if t == t_real {
            Cow::Borrowed(d_proj)
        } else {
            if let Some((bias_k, bias_v)) = &self.bias_kv {
                let slot = if which == 1 {
                    grads.of(bias_k, path, "bias_k")?
                } else {
                    grads.of(bias_v, path, "bias_v")?
                };
                // Summed over the batch in order.
                for bi in 0..b {
                    let row = &d_proj[(bi * t + t_real) * width..][..width];
                    slot.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
                }
            }
            let mut rows = arena::overwritten(b * t_real * width);
            for bi in 0..b {
                rows[bi * t_real * width..][..t_real * width]
                    .copy_from_slice(&d_proj[bi * t * width..][..t_real * width]);
            }
            Cow::Owned(rows)
        };
        let x = batch_first_rows(seq);
        let mut dx = arena::overwritten(x.len());
        self.projection_backward((grads, path), which, Some(&mut dx), &real_rows, &x, par)?;
        if let Cow::Owned(rows) = real_rows {
            arena::give(rows);
        }
        if let Cow::Owned(x) = x {
            arena::give(x);
        }
        Ok(in_layout_of(dx, seq))
    }
}
