//! The forward passes: projections, heads as views, the flash kernel, the output projection;
//! and the packed variant for sequences of different lengths.

use attn_kernels::{
    arena, attention, attention_bf16_kv, attention_weights, attention_with_weights, AttentionOptions, Causal,
    ForwardInputs, Par, View, View2, View4, ViewMut, WeightsDst,
};

use super::weights::Proj;
use super::{Core, Dims, MaskSet, MhaOptions, MhaOutput, NeedWeights, Sequence};
use crate::error::shape_error;
use crate::{f32_size_in_bytes, AttnError, KvCache, KvView, Result};

/// Where a forward call's keys and values come from: the four legal sources.
pub(super) enum Source<'s, 'c> {
    /// Self-attention: projections of the query.
    SelfAttention,
    /// Keys and values projected from these sequences (cross- or general attention).
    Cross(Sequence<'s>, Sequence<'s>),
    /// Self-attention whose new keys and values join the cache; the queries are the cache's
    /// last positions (bottom-right causal).
    Append(&'c mut KvCache),
    /// Keys and values already in the cache (a fixed memory), which is left unchanged.
    Memory(&'c KvCache),
}

/// Freshly projected keys and values as the cache's views.
fn fresh<'a>(k: View4<'a, f32>, v: View4<'a, f32>) -> (KvView<'a>, KvView<'a>) {
    (KvView::F32(k), KvView::F32(v))
}

/// The projections of one call.
#[derive(Debug)]
pub(super) struct Projected {
    /// `[tokens, q_width]`: queries, and in the fused case keys and values after them.
    pub(super) q_buf: Vec<f32>,
    pub(super) q_width: usize,
    /// `[B, T', G, D]` and `[B, T', G, Dv]` unless fused or read from a memory cache.
    pub(super) k_buf: Vec<f32>,
    pub(super) v_buf: Vec<f32>,
    /// T': projected key rows per batch entry, appended rows included.
    pub(super) t_new: usize,
    pub(super) fused: bool,
}

/// A 4-D view `[B, X, L, D]` of projected token rows of width `row_width`, starting at column
/// `base`, with token strides `[bs, ls]` in rows.
pub(super) fn head_view(
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

fn check_cache(cache: &KvCache, dims: [usize; 4]) -> Result<()> {
    if cache.dims() != dims {
        return Err(shape_error(
            "multihead_attention",
            "cache",
            format!("[B, G, D, Dv] = {dims:?}"),
            &cache.dims(),
        ));
    }
    Ok(())
}

/// Elements of the weights `need` asks for: `[B, H, S, T]`, averaged `[B, S, T]`, or none.
fn weights_len(need: NeedWeights, [b, h, s, t]: [usize; 4]) -> usize {
    match need {
        NeedWeights::No => 0,
        NeedWeights::PerHead => b * h * s * t,
        NeedWeights::Averaged => b * s * t,
    }
}

/// `w` as the destination of the weights `need` asks for (not [`NeedWeights::No`]).
fn weights_dst(need: NeedWeights, w: &mut [f32], [b, h, s, t]: [usize; 4]) -> Result<WeightsDst<'_>> {
    Ok(if need == NeedWeights::PerHead {
        WeightsDst::PerHead(ViewMut::contiguous(w, [b, h, s, t])?)
    } else {
        WeightsDst::Averaged(ViewMut::contiguous(w, [b, s, t])?)
    })
}

/// Attention weights `[B, H, S, T]` or averaged `[B, S, T]`, recomputed from the LSE.
pub(super) fn weights_from_lse(
    kind: NeedWeights,
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    lse: &[f32],
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<Vec<f32>> {
    let [b, h, s, _] = q.shape();
    let t = k.shape()[2];
    let lse = View::contiguous(lse, [b, h, s])?;
    let mut w = vec![0.0f32; weights_len(kind, [b, h, s, t])];
    attention_weights(weights_dst(kind, &mut w, [b, h, s, t])?, q, k, lse, options, par)?;
    Ok(w)
}

impl Core {
    /// Token rows `[B·L, dim]` of a sequence, in storage order.
    pub(super) fn rows<'a>(seq: &Sequence<'a>) -> Result<View2<'a, f32>> {
        Ok(View2::contiguous(seq.data, [seq.batch * seq.len, seq.dim])?)
    }

    /// Keys and values `[B, T', G, D]` (T' = T + extra rows), batch-first, projected.
    pub(super) fn project_kv(
        &self,
        key: &Sequence<'_>,
        value: &Sequence<'_>,
        par: Par,
    ) -> Result<(Vec<f32>, Vec<f32>, usize)> {
        let Dims { g, d, dv, .. } = self.dims;
        let extra = usize::from(self.bias_kv.is_some()) + usize::from(self.add_zero_attn);
        let (b, t) = (key.batch, key.len);
        let t_all = t + extra;
        // The projections write every row but the appended ones; `add_zero_attn`'s is a zero row.
        let fresh = if extra == 0 { arena::overwritten } else { arena::zeroed };
        let mut k_buf = fresh(b * t_all * g * d);
        let mut v_buf = fresh(b * t_all * g * dv);
        for (which, seq, buf, width) in [(1, key, &mut k_buf, g * d), (2, value, &mut v_buf, g * dv)] {
            let in_dim = self.weight_tensor(which).2;
            let bias = self.bias(which);
            let [bs, ls] = seq.token_strides();
            for bi in 0..b {
                if t == 0 {
                    break;
                }
                // Batch `bi`'s token rows: `[T, in]` with row stride `ls·in`.
                let x = View2::new(&seq.data[bi * bs * in_dim..], [t, in_dim], [ls * in_dim, 1])?;
                self.apply(Proj::Part(which), &mut buf[bi * t_all * width..], width, x, bias, par)?;
                if let Some((bk, bv)) = &self.bias_kv {
                    let src = if which == 1 { bk.data() } else { bv.data() };
                    buf[(bi * t_all + t) * width..(bi * t_all + t + 1) * width].copy_from_slice(src);
                }
                // A zero row for `add_zero_attn` is already there.
            }
        }
        Ok((k_buf, v_buf, t_all))
    }

    /// The forward pass: queries from `query`, keys and values from `source`.
    pub(super) fn forward(
        &self,
        query: &Sequence<'_>,
        mut source: Source<'_, '_>,
        options: &MhaOptions<'_>,
        par: Par,
    ) -> Result<MhaOutput> {
        let Dims { h, d, dv, .. } = self.dims;
        self.check_inputs(query, &source)?;
        let (b, s) = (query.batch, query.len);
        let [qbs, qls] = query.token_strides();
        let offset = match &source {
            Source::Append(cache) => cache.len(),
            _ => 0,
        };
        let p = self.project(query, &source, offset, par)?;
        // Key rows appended after the caller's (`add_bias_kv`, `add_zero_attn`).
        let extra = match &source {
            Source::Cross(key, _) => p.t_new - key.len,
            Source::SelfAttention if !p.fused => p.t_new - s,
            _ => 0,
        };
        let decoding = matches!(source, Source::Append(_));

        // 4-D views `[B, X, L, D]` of the projections, the keys and values joining the cache.
        let q_view = head_view(&p.q_buf, 0, [b, h, s, d], p.q_width, [qbs, qls])?;
        let (k_fresh, v_fresh) = match &source {
            Source::Memory(cache) => (cache.keys(), cache.values()),
            _ if p.fused => fresh(
                head_view(&p.q_buf, h * d, [b, self.dims.g, s, d], p.q_width, [qbs, qls])?,
                head_view(
                    &p.q_buf,
                    h * d + self.dims.g * d,
                    [b, self.dims.g, s, dv],
                    p.q_width,
                    [qbs, qls],
                )?,
            ),
            _ => {
                let (g, t) = (self.dims.g, p.t_new);
                fresh(
                    View4::new(&p.k_buf, [b, g, t, d], [t * g * d, d, g * d, 1])?,
                    View4::new(&p.v_buf, [b, g, t, dv], [t * g * dv, dv, g * dv, 1])?,
                )
            }
        };
        let (k_view, v_view) = match &mut source {
            Source::Append(cache) => {
                let (KvView::F32(k_new), KvView::F32(v_new)) = (k_fresh, v_fresh) else {
                    unreachable!("projected keys and values are f32")
                };
                cache.append(k_new, v_new)?;
                (cache.keys(), cache.values())
            }
            _ => (k_fresh, v_fresh),
        };

        // Masks in the module's conventions, padded for appended key rows.
        let t = k_view.shape()[2];
        let masks = MaskSet::new(options, [b, h, s, t], extra, decoding)?;
        let kernel_options = AttentionOptions {
            precision: self.precision(),
            ..masks.options(self.alibi.as_deref())?
        };

        // Attention: each head written straight into `[tokens, H·Dv]` in the query's order.
        let mut attn_out = vec![0.0f32; b * s * h * dv];
        let out_view = ViewMut::new(&mut attn_out[..], [b, h, s, dv], [qbs * h * dv, dv, qls * h * dv, 1])?;
        let need = options.need_weights;
        let weights = match (k_view, v_view) {
            // f32 keys and values: the weights in the same call (from the flash kernel's own
            // scores where it keeps them).
            (KvView::F32(k), KvView::F32(v)) => {
                let inputs = ForwardInputs::new(q_view, k, v);
                if need == NeedWeights::No {
                    attention(out_view, None, inputs, &kernel_options, par)?;
                    None
                } else {
                    let mut w = vec![0.0f32; weights_len(need, [b, h, s, t])];
                    let dst = weights_dst(need, &mut w, [b, h, s, t])?;
                    attention_with_weights(out_view, None, dst, inputs, &kernel_options, par)?;
                    Some(w)
                }
            }
            // A bf16 cache: read in place when decoding, the bits of its widened values; the
            // weights from the LSE over the widened keys.
            (KvView::Bf16(k), KvView::Bf16(v)) => {
                let mut lse = vec![0.0f32; if need == NeedWeights::No { 0 } else { b * h * s }];
                let lse_view = (!lse.is_empty())
                    .then(|| ViewMut::contiguous(&mut lse[..], [b, h, s]))
                    .transpose()?;
                attention_bf16_kv(out_view, lse_view, q_view, k, v, &kernel_options, par)?;
                if need == NeedWeights::No {
                    None
                } else {
                    let k = k_view.to_f32();
                    let k = View4::contiguous(&k, k_view.shape())?;
                    Some(weights_from_lse(need, q_view, k, &lse, &kernel_options, par)?)
                }
            }
            _ => unreachable!("a cache holds keys and values of one precision"),
        };
        let output = self.project_out(attn_out, b * s, par)?;
        Ok(MhaOutput { output, weights })
    }

    /// The bytes [`Core::forward`] allocates (see `MultiHeadAttention::forward_bytes`).
    pub(super) fn forward_bytes(&self, b: usize, s: usize, t: usize, need: NeedWeights) -> u128 {
        let Dims { h, g, d, dv, .. } = self.dims;
        let extra = usize::from(self.bias_kv.is_some()) + usize::from(self.add_zero_attn);
        let t = t.saturating_add(extra);
        let out_width = self.dims.out.unwrap_or(h * dv);
        let weights = match need {
            NeedWeights::No => 0,
            NeedWeights::Averaged => f32_size_in_bytes(&[b, s, t]).saturating_add(f32_size_in_bytes(&[b, h, s])),
            NeedWeights::PerHead => f32_size_in_bytes(&[b, h, s, t]).saturating_add(f32_size_in_bytes(&[b, h, s])),
        };
        [
            f32_size_in_bytes(&[b, s, h, d]), // queries (the fused buffer holds keys and values too)
            f32_size_in_bytes(&[b, t, g, d + dv]), // keys and values
            f32_size_in_bytes(&[b, s, h, dv]), // attention output
            f32_size_in_bytes(&[b, s, out_width]), // output
            weights,
            // the flash kernel's packed keys and values
            crate::SdpaShape { b, h, g, s, t, d, dv }.packed_bytes(),
        ]
        .iter()
        .fold(0u128, |acc, &x| acc.saturating_add(x))
    }

    /// Shapes and layouts of the inputs against the module and against each other.
    pub(super) fn check_inputs(&self, query: &Sequence<'_>, source: &Source<'_, '_>) -> Result<()> {
        let op = "multihead_attention";
        let Dims { e, g, d, dv, .. } = self.dims;
        query.check(op, "query", e)?;
        match source {
            Source::Cross(key, value) => {
                key.check(op, "key", self.dims.kdim)?;
                value.check(op, "value", self.dims.vdim)?;
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
            }
            Source::SelfAttention | Source::Append(_) => {
                // The query is also the key and the value.
                query.check(op, "key", self.dims.kdim)?;
                query.check(op, "value", self.dims.vdim)?;
                if let Source::Append(cache) = source {
                    check_cache(cache, [query.batch, g, d, dv])?;
                }
            }
            Source::Memory(cache) => check_cache(cache, [query.batch, g, d, dv])?,
        }
        if matches!(source, Source::Append(_)) && (self.bias_kv.is_some() || self.add_zero_attn) {
            return Err(AttnError::InvalidConfig {
                field: "add_bias_kv / add_zero_attn",
                got: "true".into(),
                expected: "false for cached decoding (appended rows would repeat at every step)".into(),
            });
        }
        Ok(())
    }

    /// Queries `[tokens, H·D]` in the query's storage order, and keys and values `[B, T', G, D]`
    /// (unless they are read from a memory cache), with RoPE applied. For self-attention without
    /// appended key rows one fused GEMM gives `[tokens, q|k|v]`, and keys and values stay in it.
    pub(super) fn project(
        &self,
        query: &Sequence<'_>,
        source: &Source<'_, '_>,
        offset: usize,
        par: Par,
    ) -> Result<Projected> {
        let Dims { h, g, d, .. } = self.dims;
        let (b, s) = (query.batch, query.len);
        let self_attention = matches!(source, Source::SelfAttention | Source::Append(_));
        let fused = self_attention && self.dims.fused() && self.bias_kv.is_none() && !self.add_zero_attn;
        let q_rows = Self::rows(query)?;
        let (mut q_buf, q_width) = if fused {
            let width = self.dims.q_width() + self.dims.k_width() + self.dims.v_width();
            // Every element is written by the projection (here and below).
            let mut buf = arena::overwritten(b * s * width);
            let bias = self.b_qkv.as_ref().map(|t| t.data());
            self.apply(Proj::Fused, &mut buf, width, q_rows, bias, par)?;
            (buf, width)
        } else {
            let mut buf = arena::overwritten(b * s * h * d);
            self.apply(Proj::Part(0), &mut buf, h * d, q_rows, self.bias(0), par)?;
            (buf, h * d)
        };
        let (mut k_buf, v_buf, t_new) = match source {
            _ if fused => (Vec::new(), Vec::new(), s),
            Source::Memory(_) => (Vec::new(), Vec::new(), 0),
            Source::Cross(key, value) => self.project_kv(key, value, par)?,
            Source::SelfAttention | Source::Append(_) => self.project_kv(query, query, par)?,
        };
        if let Some(rope) = &self.rope {
            let qls = query.token_strides()[1];
            let token_position = |r: usize| offset + if qls == 1 { r % s.max(1) } else { r / b.max(1) };
            rope.apply(&mut q_buf, q_width, 0, h, d, token_position, b * s);
            if fused {
                rope.apply(&mut q_buf, q_width, h * d, g, d, token_position, b * s);
            } else if !matches!(source, Source::Memory(_)) {
                rope.apply(&mut k_buf, g * d, 0, g, d, |r| offset + r % t_new.max(1), b * t_new);
            }
        }
        Ok(Projected {
            q_buf,
            q_width,
            k_buf,
            v_buf,
            t_new,
            fused,
        })
    }

    /// The output projection over the token rows `[N, H·Dv]` as they are (none for `Attention`).
    pub(super) fn project_out(&self, attn_out: Vec<f32>, tokens: usize, par: Par) -> Result<Vec<f32>> {
        match self.w_out {
            Some(_) => self.project_out_of(&attn_out, tokens, par),
            None => Ok(attn_out),
        }
    }

    /// [`Core::project_out`] reading `attn_out` in place (the training forward keeps it for the
    /// backward, so it is not consumed); a copy only when there is no output projection.
    pub(super) fn project_out_of(&self, attn_out: &[f32], tokens: usize, par: Par) -> Result<Vec<f32>> {
        let (Some(_), Some(out_dim)) = (&self.w_out, self.dims.out) else {
            return Ok(arena::copied(attn_out));
        };
        let width = self.dims.h * self.dims.dv;
        // Every element is written by the projection.
        let mut output = arena::overwritten(tokens * out_dim);
        let x = View2::contiguous(attn_out, [tokens, width])?;
        let bias = self.b_out.as_ref().map(|t| t.data());
        self.apply(Proj::Out, &mut output, out_dim, x, bias, par)?;
        Ok(output)
    }
}

impl Core {
    pub(super) fn forward_packed(&self, x: &[f32], starts: &[usize], causal: bool, par: Par) -> Result<Vec<f32>> {
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
        self.apply(Proj::Fused, &mut qkv, width, View2::contiguous(x, [n, e])?, bias, par)?;
        if let Some(rope) = &self.rope {
            let position = |r: usize| r - starts[starts.partition_point(|&s0| s0 <= r) - 1];
            rope.apply(&mut qkv, width, 0, h, d, position, n);
            rope.apply(&mut qkv, width, h * d, g, d, position, n);
        }
        let options = AttentionOptions {
            causal: if causal { Causal::TopLeft } else { Causal::None },
            alibi_slopes: self.alibi.as_deref(),
            precision: self.precision(),
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
            attention(
                out_view,
                None,
                ForwardInputs::new(view(0, h, d)?, view(h * d, g, d)?, view(h * d + g * d, g, dv)?),
                &options,
                inner,
            )?;
            Ok(())
        };
        super::for_each_sequence(chunks, par, attend)?;
        match (&self.w_out, self.dims.out) {
            (Some(_), Some(out_dim)) => {
                let mut output = vec![0.0f32; n * out_dim];
                let rows = View2::contiguous(&attn_out, [n, h * dv])?;
                self.apply(
                    Proj::Out,
                    &mut output,
                    out_dim,
                    rows,
                    self.b_out.as_ref().map(|t| t.data()),
                    par,
                )?;
                Ok(output)
            }
            _ => Ok(attn_out),
        }
    }
}
