//! Fused masked softmax over score rows, and the unfused attention path built on it.
//!
//! [`masked_softmax`] does scale, mask and a numerically stable softmax of each row of a
//! `[B, H, S, T]` score tensor in one pass over memory (per row: scale and mask, max, exp and
//! sum, normalise). [`attention_unfused`] is the textbook path, `softmax(scale·q·kᵀ + mask)·v`
//! with the full `S×T` scores of one head in memory: it exists as a second fast path to compare
//! the flash kernel with and to measure what fusion buys. It is not what attn uses by default.

use rayon::prelude::*;

use crate::flash::validate;
use crate::gemm::gemm_raw;
use crate::mask::{mask_row, resolve_scale, validate_options};
use crate::simd::{exp_sub_sum, row_max, scale_row};
use crate::{Accum, AttentionOptions, KernelError, Par, View4, ViewMut, ViewMut4};

/// Softmax of one row in place after scaling and masking; returns the row's log-sum-exp
/// (`-inf` and a zero row when no key is visible).
#[inline]
fn softmax_row(row: &mut [f32], scale: f32, options: &AttentionOptions<'_>, bhs: [usize; 3], limit: usize) -> f32 {
    // Pass 1: scale and mask; row max.
    if scale != 1.0 {
        scale_row(row, scale);
    }
    mask_row(row, &options.mask, bhs, 0, limit);
    let m = row_max(row);
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    // Pass 2: exp and sum.
    let sum = exp_sub_sum(row, m);
    // Pass 3: normalise.
    scale_row(row, 1.0 / sum);
    m + sum.ln()
}

/// In-place masked softmax: `scores: [B, H, S, T]` (rows contiguous: stride 1 along `T`) become
/// `softmax(scale·scores + mask)` along `T`, with `options`' mask, causal alignment and key
/// lengths. `lse: [B, H, S]` receives each row's log-sum-exp when given. A row with nothing to
/// attend to becomes zeros (its `lse` is `-inf`).
///
/// `options.scale` of `None` means 1 here: these are already-formed scores.
pub fn masked_softmax(
    scores: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let op = "masked_softmax";
    let shape = scores.shape();
    let [b, h, s, t] = shape;
    validate_options(op, options, shape)?;
    if scores.strides()[3] != 1 && t > 1 {
        return Err(KernelError::InvalidArgument {
            op,
            what: "scores stride along T",
            got: scores.strides()[3].to_string(),
            expected: "1 (contiguous rows)",
        });
    }
    if let Some(l) = &lse {
        if l.shape() != [b, h, s] {
            return Err(KernelError::ShapeMismatch {
                op,
                tensor: "lse",
                expected: vec![b, h, s],
                got: l.shape().to_vec(),
            });
        }
    }
    let scale = options.scale.unwrap_or(1.0);
    let st = scores.strides();
    let mut scores = scores;
    let base = SendPtr(scores.data_mut().as_mut_ptr());
    let mut lse = lse;
    let lse_dst = lse.as_mut().map(|l| (SendPtr(l.data_mut().as_mut_ptr()), l.strides()));
    let row_job = |index: usize| {
        let (bh, si) = (index / s, index % s);
        let (bi, hi) = (bh / h, bh % h);
        let limit = options
            .causal
            .key_limit(si, s, t)
            .min(options.key_lengths.map_or(t, |l| l[bi]));
        // SAFETY: the row `(bi, hi, si)` is in bounds, contiguous, and visited by this job only
        // (the view does not overlap itself).
        let row = unsafe { std::slice::from_raw_parts_mut(base.get().add(bi * st[0] + hi * st[1] + si * st[2]), t) };
        let value = softmax_row(row, scale, options, [bi, hi, si], limit);
        if let Some((ptr, lst)) = lse_dst {
            // SAFETY: as above, for the lse element of this row.
            unsafe { *ptr.get().add(bi * lst[0] + hi * lst[1] + si * lst[2]) = value };
        }
    };
    let rows = b * h * s;
    if t == 0 {
        // No keys: every row is empty and its lse is -inf.
        (0..rows).for_each(row_job);
        return Ok(());
    }
    match par {
        Par::Seq => (0..rows).for_each(row_job),
        Par::Rayon => (0..rows).into_par_iter().for_each(row_job),
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
impl SendPtr {
    #[inline]
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: each parallel job writes a disjoint row of a destination checked not to overlap.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Unfused attention, one head at a time: `scores = scale·q·kᵀ` (`[S, T]` in memory), masked
/// softmax, `out = p·v`. Same shapes, options and results (to rounding) as
/// [`flash_attention`](crate::flash_attention): `q: [B, H, S, D]`, `k: [B, G, T, D]`,
/// `v: [B, G, T, Dv]` -> `out: [B, H, S, Dv]`, `lse: [B, H, S]`.
///
/// It allocates `S×T` floats per worker thread.
pub fn attention_unfused(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let plan = validate(
        "attention_unfused",
        out.shape(),
        lse.as_ref().map(|l| l.shape()),
        &q,
        &k,
        &v,
        options,
    )?;
    let scale = resolve_scale(options, plan.d);
    let (s, t, d, dv) = (plan.s, plan.t, plan.d, plan.dv);
    let mut out = out;
    let ost = out.strides();
    let out_ptr = SendPtr(out.data_mut().as_mut_ptr());
    let mut lse = lse;
    let lse_dst = lse.as_mut().map(|l| (SendPtr(l.data_mut().as_mut_ptr()), l.strides()));
    let (qs, ks, vs) = (q.strides(), k.strides(), v.strides());
    let head_job = |scores: &mut Vec<f32>, bh: usize| {
        let (b, h) = (bh / plan.h, bh % plan.h);
        let g = h / plan.rep;
        // SAFETY: every view was bounds-checked by `validate`; `scores` holds S×T elements; the
        // destination head `(b, h)` is written by this job only (the same holds for the second GEMM).
        unsafe {
            gemm_raw(
                scores.as_mut_ptr(),
                [t, 1],
                [s, t, d],
                Accum::Replace,
                q.data().as_ptr().add(b * qs[0] + h * qs[1]),
                [qs[2], qs[3]],
                k.data().as_ptr().add(b * ks[0] + g * ks[1]),
                [ks[3], ks[2]],
                scale,
                Par::Seq,
            );
        }
        let key_length = options.key_lengths.map_or(t, |l| l[b]);
        for si in 0..s {
            let limit = options.causal.key_limit(si, s, t).min(key_length);
            let value = softmax_row(&mut scores[si * t..(si + 1) * t], 1.0, options, [b, h, si], limit);
            if let Some((ptr, lst)) = lse_dst {
                // SAFETY: the lse element of `(b, h, si)` is in bounds and this job's alone.
                unsafe { *ptr.get().add(b * lst[0] + h * lst[1] + si * lst[2]) = value };
            }
        }
        // SAFETY: see above.
        unsafe {
            gemm_raw(
                out_ptr.get().add(b * ost[0] + h * ost[1]),
                [ost[2], ost[3]],
                [s, dv, t],
                Accum::Replace,
                scores.as_ptr(),
                [t, 1],
                v.data().as_ptr().add(b * vs[0] + g * vs[1]),
                [vs[2], vs[3]],
                1.0,
                Par::Seq,
            );
        }
        if t == 0 {
            // A GEMM with an empty inner dimension leaves `out` as it was: write the zeros.
            for si in 0..s {
                for j in 0..dv {
                    // SAFETY: in bounds, this job's head.
                    unsafe { *out_ptr.get().add(b * ost[0] + h * ost[1] + si * ost[2] + j * ost[3]) = 0.0 };
                }
            }
        }
    };
    let heads = plan.b * plan.h;
    match par {
        Par::Seq => {
            let mut scores = vec![0.0f32; s * t];
            (0..heads).for_each(|bh| head_job(&mut scores, bh));
        }
        Par::Rayon => (0..heads)
            .into_par_iter()
            .for_each_init(|| vec![0.0f32; s * t], head_job),
    }
    Ok(())
}
