//! Fused masked softmax over score rows, and the unfused attention path built on it.
//!
//! [`masked_softmax`] does scale, mask and a numerically stable softmax of each row of a
//! `[B, H, S, T]` score tensor in one pass over memory (per row: scale and mask, max, exp and
//! sum, normalise). [`attention_unfused`] is the textbook path, `softmax(scale·q·kᵀ + mask)·v`
//! with the full `S×T` scores of one head in memory: it exists as a second fast path to compare
//! the flash kernel with and to measure what fusion buys. It is not what attn uses by default.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::flash::validate;
use crate::gemm::gemm_raw;
use crate::mask::{mask_row, resolve_scale, validate_options};
use crate::scores::{scores_into, Keys, ScoreKernel};
use crate::simd::{exp_sub_sum, row_max, scale_into, scale_row};
use crate::view::SharedMut;
use crate::weights::{finish_row, zero_fill, RawWeights, WeightsDst};
use crate::{Accum, AttentionOptions, ForwardInputs, KernelError, Par, View4, ViewMut, ViewMut4};

/// Softmax of one row in place after scaling and masking; returns the row's log-sum-exp as
/// `(lse, lse_lo)` ([`crate::flash::split_lse`]; `(-inf, 0)` and a zero row when no key is
/// visible).
#[inline]
fn softmax_row(
    row: &mut [f32],
    scale: f32,
    options: &AttentionOptions<'_>,
    bhs: [usize; 3],
    limit: usize,
    shape: [usize; 2],
) -> (f32, f32) {
    // Pass 1 (the scores are given): scale and mask.
    if scale != 1.0 {
        scale_row(row, scale);
    }
    mask_row(row, options, bhs, 0, limit, shape);
    // Pass 2: row max, exp and sum.
    let m = row_max(row);
    if m == f32::NEG_INFINITY {
        if row.iter().any(|x| x.is_nan()) {
            // Only NaN scores besides hidden keys: NaN on what the row sees, zero elsewhere.
            row.iter_mut()
                .for_each(|x| *x = if *x == f32::NEG_INFINITY { 0.0 } else { f32::NAN });
            return (f32::NAN, 0.0);
        }
        row.fill(0.0);
        return (f32::NEG_INFINITY, 0.0);
    }
    let sum = exp_sub_sum(row, m);
    // Pass 3: rescale by 1/sum (the online kernel rescales by exp(m_old - m_new) instead).
    scale_row(row, 1.0 / sum);
    crate::flash::split_lse(m, sum)
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
    let base = SharedMut(scores.data_mut().as_mut_ptr());
    let mut lse = lse;
    let lse_dst = lse
        .as_mut()
        .map(|l| (SharedMut(l.data_mut().as_mut_ptr()), l.strides()));
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
        let (value, _) = softmax_row(row, scale, options, [bi, hi, si], limit, [s, t]);
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

/// Unfused attention, one head at a time: `scores = scale·q·kᵀ` (`[S, T]` in memory), masked
/// softmax, `out = p·v`. Same shapes, options and results (to rounding) as
/// [`flash_attention`](crate::flash_attention): `q: [B, H, S, D]`, `k: [B, G, T, D]`,
/// `v: [B, G, T, Dv]` -> `out: [B, H, S, Dv]`, `lse: [B, H, S]`.
///
/// It allocates `S×T` floats per worker thread.
pub fn attention_unfused(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    unfused_impl(out, [lse, None], inputs, options, par, true)
}

/// Bytes of scratch [`attention_unfused`] allocates on `workers` threads for `q: [B, H, S, D]`
/// and `T` keys: the `[S, T]` scores, the row sums, the scaled queries and the keys in panels
/// of one head each.
pub fn unfused_scratch_bytes([_, _, s, d]: [usize; 4], t: usize, workers: usize) -> u128 {
    // Scores `[S, T]` with T padded to the tile kernel's panels, the LSE, the scaled queries,
    // and the keys in transposed panels `[T, D]` (padded likewise).
    let t_pad = (t as u128).div_ceil(crate::tile::NR as u128) * crate::tile::NR as u128;
    let per_worker = (s as u128)
        .saturating_mul(t_pad)
        .saturating_add(s as u128)
        .saturating_add((s as u128).saturating_mul(d as u128))
        .saturating_add(t_pad.saturating_mul(d as u128));
    per_worker.saturating_mul(workers as u128).saturating_mul(4)
}

/// [`attention_unfused`], with the repair of values that rows cannot see switched by `repair`.
pub(crate) fn unfused_impl(
    out: ViewMut4<'_, f32>,
    [lse, lse_lo]: [Option<ViewMut<'_, f32, 3>>; 2],
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
    repair: bool,
) -> Result<(), KernelError> {
    let ForwardInputs { q, k, v } = inputs;
    crate::bf16::require_f32("attention_unfused", options)?;
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
    let (mut out, mut lse, mut lse_lo) = (out, lse, lse_lo);
    crate::flash::check_lse_lo("attention_unfused", &out, &lse_lo)?;
    let crate::flash::Dst {
        out: out_ptr,
        out_strides: ost,
        lse: lse_dst,
        lse_lo: lse_lo_dst,
    } = crate::flash::Dst::new(&mut out, &mut lse, &mut lse_lo);
    let (ks, vs) = (k.strides(), v.strides());
    // Set when a row came out non-finite from a finite softmax: a non-finite value reached it.
    let spoilt_rows = AtomicBool::new(false);
    // The flash path's score arithmetic (`crate::scores`), so that either forward path gives the
    // backward the same scores to recompute; rows `ld` apart.
    let kernel = ScoreKernel::for_call(plan.rows_per_group, ks[3] == 1);
    let ld = kernel.min_ld(t);
    let head_job = |(scores, lses, q_scaled, kt): &mut Buffers, bh: usize| {
        let (b, h) = (bh / plan.h, bh % plan.h);
        let g = h / plan.rep;
        scale_head(q_scaled, &q, [b, h], scale);
        let keys = Keys {
            keys: &k.data()[b * ks[0] + g * ks[1]..],
            row_stride: ks[2],
            col_stride: ks[3],
            bc: t,
        };
        scores_into(kernel, scores, ld, q_scaled, [s, d], keys, kt);
        let key_length = options.key_lengths.map_or(t, |l| l[b]);
        for si in 0..s {
            let limit = options.causal.key_limit(si, s, t).min(key_length);
            let (value, lo) = softmax_row(
                &mut scores[si * ld..si * ld + t],
                1.0,
                options,
                [b, h, si],
                limit,
                [s, t],
            );
            lses[si] = value;
            for (dst, x) in [(lse_dst, value), (lse_lo_dst, lo)] {
                if let Some((ptr, lst)) = dst {
                    // SAFETY: the element of `(b, h, si)` is in bounds and this job's alone.
                    unsafe { *ptr.get().add(b * lst[0] + h * lst[1] + si * lst[2]) = x };
                }
            }
        }
        // SAFETY: every view was bounds-checked by `validate`; `scores` holds [S, ld]; the
        // destination head `(b, h)` is written by this job only.
        unsafe {
            gemm_raw(
                out_ptr.get().add(b * ost[0] + h * ost[1]),
                [ost[2], ost[3]],
                [s, dv, t],
                Accum::Replace,
                scores.as_ptr(),
                [ld, 1],
                v.data().as_ptr().add(b * vs[0] + g * vs[1]),
                [vs[2], vs[3]],
                1.0,
                Par::Seq,
            );
        }
        // SAFETY: head `(b, h)` of `out` is in bounds and this job's alone.
        if unsafe { finish_head(out_ptr, ost, [b, h], dv, lses) } {
            spoilt_rows.store(true, Ordering::Relaxed);
        }
    };
    // What `unfused_scratch_bytes` counts, per worker.
    let buffers = || -> Buffers { (vec![0.0; s * ld], vec![0.0; s], vec![0.0; s * d], Vec::new()) };
    run_heads(plan.b * plan.h, par, buffers, head_job);
    if repair && spoilt_rows.load(Ordering::Relaxed) {
        crate::nonfinite::repair_values(&mut out, &q, &k, &v, options, scale, |out, lse, v| {
            let inputs = ForwardInputs::new(q, k, v);
            unfused_impl(out, [Some(lse), None], inputs, options, par, false)
        })?;
    }
    Ok(())
}

/// Head `(b, h)` of `q`, times `scale`, into `dst: [S, D]`: `scale·q` first, as the flash
/// kernel does, so a product `q·k` that would overflow f32 before scaling does not overflow here
/// either, or the two paths would disagree.
fn scale_head(dst: &mut [f32], q: &View4<'_, f32>, [b, h]: [usize; 2], scale: f32) {
    let ([_, _, s, d], qs) = (q.shape(), q.strides());
    for si in 0..s {
        let base = b * qs[0] + h * qs[1] + si * qs[2];
        for (j, x) in dst[si * d..(si + 1) * d].iter_mut().enumerate() {
            *x = q.data()[base + j * qs[3]] * scale;
        }
    }
}

/// Runs `head_job(buffers, bh)` for every head `bh < heads`, sequentially or on the rayon pool
/// with a worker's `buffers`.
fn run_heads(
    heads: usize,
    par: Par,
    buffers: impl Fn() -> Buffers + Sync + Send,
    head_job: impl Fn(&mut Buffers, usize) + Sync + Send,
) {
    match par {
        Par::Seq => {
            let mut buffers = buffers();
            (0..heads).for_each(|bh| head_job(&mut buffers, bh));
        }
        Par::Rayon => (0..heads).into_par_iter().for_each_init(buffers, head_job),
    }
}

/// A worker's buffers in the unfused path: the scores `[S, ld]`, the rows' LSE, the scaled
/// queries and the keys in panels.
type Buffers = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// After pass 4 of head `(b, h)`: rows that saw no key (`lse = -inf`) become zeros, even where
/// `0·v` was not zero (a non-finite value) and when `T = 0` (a GEMM with an empty inner
/// dimension leaves `out` as it was). Returns whether a row came out non-finite from a finite
/// softmax (a non-finite value reached it).
///
/// # Safety
/// Head `(b, h)` of the destination (`S` rows of `Dv` values at `strides`) must be in bounds and
/// written by no other thread.
unsafe fn finish_head(out: SharedMut, strides: [usize; 4], [b, h]: [usize; 2], dv: usize, lses: &[f32]) -> bool {
    let mut spoilt = false;
    for (si, &value) in lses.iter().enumerate() {
        let base = b * strides[0] + h * strides[1] + si * strides[2];
        if value == f32::NEG_INFINITY {
            for j in 0..dv {
                // SAFETY: in bounds and this job's, by the caller's contract.
                unsafe { *out.get().add(base + j * strides[3]) = 0.0 };
            }
            continue;
        }
        // SAFETY: as above.
        let finite = (0..dv).all(|j| unsafe { *out.get().add(base + j * strides[3]) }.is_finite());
        spoilt |= !finite && value.is_finite();
    }
    spoilt
}

/// Checks the weights operands of `op` ([`attention_weights`] or
/// [`crate::attention_with_weights`]); returns `[B, H, G, S, T, D]`.
pub(crate) fn validate_weights(
    op: &'static str,
    dst: &WeightsDst<'_>,
    q: &View4<'_, f32>,
    k: &View4<'_, f32>,
    options: &AttentionOptions<'_>,
) -> Result<[usize; 6], KernelError> {
    let [b, h, g, s, t, d] = crate::flash::validate_qk(op, q, k)?;
    if d == 0 {
        return Err(KernelError::InvalidArgument {
            op,
            what: "head dim D",
            got: "0".into(),
            expected: "at least 1",
        });
    }
    let (averaged, dst_shape) = (dst.averaged(), dst.shape());
    let want = if averaged { vec![b, s, t] } else { vec![b, h, s, t] };
    if dst_shape != want {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "weights",
            expected: want,
            got: dst_shape,
        });
    }
    validate_options(op, options, [b, h, s, t])?;
    Ok([b, h, g, s, t, d])
}

/// How [`weights_pass`] computes a tile's scores: the flash kernel's f32 tile machinery with
/// the call's score kernel, or the bf16 forward's own products
/// ([`crate::flash::Bf16Scores`]).
enum Scorer<'a> {
    F32(crate::flash::Plan, crate::flash::KeySource<'a>),
    Bf16(crate::flash::Bf16Scores<'a>),
}

impl Scorer<'_> {
    /// Keys per block and the score buffer's row stride: the plan's in f32, the bf16 kernels'.
    fn blocks(&self) -> [usize; 2] {
        match self {
            Scorer::F32(plan, _) => [plan.block_keys, plan.scores_ld],
            Scorer::Bf16(_) => [crate::BF16_BLOCK_KEYS, crate::flash::BF16_SCORES_LD],
        }
    }

    /// Words of one query row in a tile.
    fn row_words(&self, d: usize) -> usize {
        match self {
            Scorer::F32(..) => d,
            Scorer::Bf16(bf16) => bf16.row_words(d),
        }
    }

    /// `scale·q` for the `d` values `src[j·stride]` into the tile's row `dst`.
    fn load_row(&self, src: &[f32], [d, stride]: [usize; 2], scale: f32, dst: &mut [f32]) {
        match self {
            Scorer::F32(..) if stride == 1 => scale_into(dst, &src[..d], scale),
            Scorer::F32(..) => dst
                .iter_mut()
                .enumerate()
                .for_each(|(p, x)| *x = src[p * stride] * scale),
            Scorer::Bf16(bf16) => bf16.load_row(src, [d, stride], scale, dst),
        }
    }

    /// The scores of the tile's `n_rows` rows against keys `t0..t0 + bc` of `(b, g)`.
    fn block(&self, q_tile: &[f32], n_rows: usize, at: [usize; 4], scores: &mut [f32]) {
        match self {
            Scorer::F32(plan, keys) => {
                let tile = crate::flash::ScoreTile {
                    scores,
                    q_tile,
                    kt_scratch: &mut [],
                    n_rows,
                    maxes: None,
                };
                crate::flash::block_scores(tile, plan, keys, at);
            }
            Scorer::Bf16(bf16) => bf16.block(q_tile, n_rows, at, scores),
        }
    }
}

/// `q: [B, H, S, D]`, `k: [B, G, T, D]`, `lse: [B, H, S]` (from
/// [`flash_attention`](crate::flash_attention) with the same `options`) -> `[B, H, S, T]` or,
/// averaged over heads, `[B, S, T]`. A row with nothing to attend to (`lse = -inf`) gets zeros.
/// Work is cut by shape only and heads are averaged in head order, so the result does not
/// depend on the thread count.
///
/// The scores are the forward's own, bit for bit, so the weights are the probabilities its
/// `P·V` weighed, `exp(s − lse)`: in f32 from the flash kernel's tile machinery with the call's
/// score kernel; in bf16 (`scale·q` and `k` rounded, products summed in f32) from the
/// products the forward runs on this CPU: `vdpbf16ps` at the AVX512-BF16 level, and when
/// decoding (at most [`crate::DECODE_ROWS`] query rows per key/value head) the dot products
/// against K in place, which the forward takes when V's rows are contiguous too (assumed here;
/// [`crate::attention_with_weights`] knows V). On AMX outside decoding the second pass
/// multiplies the rounded operands in f32 and differs from the tiles' sums in the last bits.
pub fn attention_weights(
    dst: WeightsDst<'_>,
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    lse: crate::View<'_, f32, 3>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    weights_of_call(dst, [q, k], k.strides(), lse, options, par)
}

/// [`attention_weights`] of a call whose V has strides `v_strides` (which decide, in bf16,
/// whether decoding reads K in place).
pub(crate) fn weights_of_call(
    dst: WeightsDst<'_>,
    [q, k]: [View4<'_, f32>; 2],
    v_strides: [usize; 4],
    lse: crate::View<'_, f32, 3>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let op = "attention_weights";
    let [b, h, g, s, t, d] = validate_weights(op, &dst, &q, &k, options)?;
    if lse.shape() != [b, h, s] {
        return Err(KernelError::shape(op, "lse", vec![b, h, s], lse.shape().to_vec()));
    }
    if b == 0 || s == 0 || t == 0 {
        return Ok(());
    }
    if h == 0 {
        // The mean over no heads: zeros.
        if let WeightsDst::Averaged(v) = dst {
            zero_fill(v, [b, s, t]);
        }
        return Ok(());
    }
    let scale = resolve_scale(options, d);
    let plan = crate::flash::Plan::for_precision([b, h, s, d], [g, t, d], options.precision);
    if options.precision == crate::Precision::Bf16 {
        if let Some(bf16) = crate::flash::Bf16Scores::for_call(&plan, k, v_strides, par) {
            let scorer = Scorer::Bf16(bf16);
            weights_pass(dst, (q, scale), [g, t], lse, options, &scorer, par);
            if let Scorer::Bf16(bf16) = scorer {
                bf16.give();
            }
            return Ok(());
        }
        // The f32 kernel on rounded copies of `scale·q` and `k`, as the forward multiplies
        // them here.
        let copies = crate::flash::rounded_copies(&[(&q, scale), (&k, 1.0)], par);
        let (qr, kr) = copies.split_at(q.shape().iter().product());
        let f32_options = AttentionOptions {
            scale: Some(1.0),
            precision: crate::Precision::F32,
            ..*options
        };
        let (qr, kr) = (View4::contiguous(qr, q.shape())?, View4::contiguous(kr, k.shape())?);
        let weights = weights_of_call(dst, [qr, kr], v_strides, lse, &f32_options, par);
        crate::buffer::give(copies);
        return weights;
    }
    // The scores come from the flash kernel's tile machinery with the call's score kernel, so
    // the weights are the forward's probabilities bit for bit: K transposed once per call for
    // the tile GEMM.
    let kernel = ScoreKernel::for_call(plan.rows_per_group, k.strides()[3] == 1);
    let kt_packed = (kernel == ScoreKernel::Tile).then(|| crate::flash::pack_keys_transposed(&plan, &k, par));
    let keys = crate::flash::KeySource {
        k,
        kt_packed: kt_packed.as_deref(),
        per_group: false,
        kernel,
    };
    weights_pass(dst, (q, scale), [g, t], lse, options, &Scorer::F32(plan, keys), par);
    if let Some(packed) = kt_packed {
        crate::buffer::give(packed);
    }
    Ok(())
}

/// The second pass of a validated call with no empty dimension: each tile's scores of
/// `scale·q` by `scorer`, masked, and `exp(s − lse)` written to `dst`.
fn weights_pass(
    dst: WeightsDst<'_>,
    (q, scale): (View4<'_, f32>, f32),
    [g, t]: [usize; 2],
    lse: crate::View<'_, f32, 3>,
    options: &AttentionOptions<'_>,
    scorer: &Scorer<'_>,
    par: Par,
) {
    let [b, h, s, d] = q.shape();
    let rep = h / g;
    let averaged = dst.averaged();
    let raw = RawWeights::new(dst, h);
    let qs = q.strides();
    const ROWS: usize = crate::BLOCK_ROWS;
    let [keys_per_block, ld] = scorer.blocks();
    let words = scorer.row_words(d);
    let key_blocks = t.div_ceil(keys_per_block);
    let row_tiles = s.div_ceil(ROWS);
    let heads_per_task = if averaged { h } else { 1 };
    let tasks = b * (h / heads_per_task) * row_tiles;
    let job = |scratch: &mut (Vec<f32>, Vec<f32>), task: usize| {
        let (scores, q_tile) = scratch;
        let (bh, tile) = (task / row_tiles, task % row_tiles);
        let (bi, h_first) = (bh / (h / heads_per_task), (bh % (h / heads_per_task)) * heads_per_task);
        let s0 = tile * ROWS;
        let rows = (s - s0).min(ROWS);
        let key_length = options.key_lengths.map_or(t, |l| l[bi]);
        for hi in h_first..h_first + heads_per_task {
            let gi = hi / rep;
            // The tile's query rows, times the scale.
            for i in 0..rows {
                let base = bi * qs[0] + hi * qs[1] + (s0 + i) * qs[2];
                let dst = &mut q_tile[i * words..(i + 1) * words];
                scorer.load_row(&q.data()[base..], [d, qs[3]], scale, dst);
            }
            for block in 0..key_blocks {
                let t0 = block * keys_per_block;
                let bc = (t - t0).min(keys_per_block);
                scorer.block(&q_tile[..], rows, [bi, gi, t0, bc], &mut scores[..]);
                for i in 0..rows {
                    let si = s0 + i;
                    let row = &mut scores[i * ld..i * ld + bc];
                    let limit = options.causal.key_limit(si, s, t).min(key_length);
                    mask_row(row, options, [bi, hi, si], t0, limit, [s, t]);
                    finish_row(row, lse.get([bi, hi, si]));
                    // SAFETY: `(bi, hi, si)` and keys `t0..t0 + bc` are in bounds of the
                    // destination, and rows `(bi, si)` (with head `hi` unless averaged) belong
                    // to this task alone.
                    unsafe { raw.write([bi, hi, si, t0], row) };
                }
            }
        }
    };
    let scratch = || (vec![0.0f32; ROWS * ld], vec![0.0f32; ROWS * words]);
    match par {
        Par::Seq => {
            let mut buffers = scratch();
            (0..tasks).for_each(|task| job(&mut buffers, task));
        }
        Par::Rayon => (0..tasks).into_par_iter().for_each_init(scratch, job),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};
    use crate::{broadcast_to, Causal, Mask};

    /// `masked_softmax` of one row in f64: scale, mask, causal limit and key length, softmax;
    /// returns the weights and the log-sum-exp (`-inf` and zeros for an empty row).
    fn reference_row(scores: &[f32], scale: f64, visible: impl Fn(usize) -> Option<f64>) -> (Vec<f64>, f64) {
        let x: Vec<f64> = scores
            .iter()
            .enumerate()
            .map(|(j, &v)| visible(j).map_or(f64::NEG_INFINITY, |add| v as f64 * scale + add))
            .collect();
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return (vec![0.0; x.len()], m);
        }
        let sum: f64 = x.iter().map(|&v| (v - m).exp()).sum();
        (x.iter().map(|&v| (v - m).exp() / sum).collect(), m + sum.ln())
    }

    /// The scores sit in a padded buffer (row stride `T + 3`, so batch and head strides are not
    /// those of a contiguous tensor) and the lse in every other element; scale, an additive
    /// `[B, 1, 1, T]` mask, a boolean `[S, T]` mask, both causal alignments and key lengths;
    /// sequential and parallel runs give the same bits and leave the padding alone.
    #[test]
    fn masked_softmax_matches_the_f64_definition() {
        let (b, h, s, t) = (2, 3, 5, 9);
        let pad = t + 3;
        let scores = random_vec(b * h * s * pad, 7)
            .iter()
            .map(|x| x * 4.0)
            .collect::<Vec<_>>();
        let additive: Vec<f32> = random_vec(b * t, 8);
        let allowed: Vec<bool> = random_vec(s * t, 9).iter().map(|&x| x > -0.7).collect();
        let lengths = [t, 4];
        for causal in [Causal::None, Causal::TopLeft, Causal::BottomRight] {
            for scale in [None, Some(0.6f32)] {
                let options = AttentionOptions {
                    scale,
                    causal,
                    mask: Mask::Additive(broadcast_to(&additive, &[b, 1, 1, t], [b, h, s, t]).unwrap()),
                    key_mask: Mask::Allowed(broadcast_to(&allowed, &[s, t], [b, h, s, t]).unwrap()),
                    key_lengths: Some(&lengths),
                    alibi_slopes: None,
                    precision: crate::Precision::F32,
                };
                let run = |par: Par| {
                    let mut data = scores.clone();
                    // The lse too is strided: every other element.
                    let mut lse = vec![f32::NAN; 2 * b * h * s];
                    let view = ViewMut4::new(&mut data, [b, h, s, t], [h * s * pad, s * pad, pad, 1]).unwrap();
                    let lse_view = ViewMut::new(&mut lse, [b, h, s], [2 * h * s, 2 * s, 2]).unwrap();
                    masked_softmax(view, Some(lse_view), &options, par).unwrap();
                    assert!(lse.iter().skip(1).step_by(2).all(|x| x.is_nan()), "lse gaps written");
                    (data, lse.into_iter().step_by(2).collect::<Vec<_>>())
                };
                let (got, got_lse) = run(Par::Seq);
                assert_eq!((got.clone(), got_lse.clone()), run(Par::Rayon));
                let scale = scale.unwrap_or(1.0) as f64;
                for row in 0..b * h * s {
                    let (bi, si) = (row / (h * s), row % s);
                    let limit = causal.key_limit(si, s, t).min(lengths[bi]);
                    let visible = |j: usize| (j < limit && allowed[si * t + j]).then(|| additive[bi * t + j] as f64);
                    let (want, want_lse) = reference_row(&scores[row * pad..row * pad + t], scale, visible);
                    let what = format!("{causal:?} scale {scale} row {row}");
                    // Measured 5.6e-8 (weights) and 6.4e-8 (lse) at both levels; the bound is
                    // about 10x.
                    assert_close(&got[row * pad..row * pad + t], &want, 6e-7, 6e-7, &what);
                    assert_close(&got_lse[row..row + 1], &[want_lse], 6e-7, 6e-7, &what);
                    assert_eq!(
                        &got[row * pad + t..(row + 1) * pad],
                        &scores[row * pad + t..(row + 1) * pad]
                    );
                }
            }
        }
    }

    #[test]
    fn masked_softmax_refuses_strided_rows_and_a_misshapen_lse() {
        let mut data = vec![0.5f32; 2 * 6];
        // Rows with a stride of 2 along T: refused unless T is 1.
        let view = ViewMut4::new(&mut data, [1, 1, 2, 3], [12, 12, 6, 2]).unwrap();
        let err = masked_softmax(view, None, &AttentionOptions::default(), Par::Seq).unwrap_err();
        assert!(err.to_string().contains("stride along T"), "{err}");
        let view = ViewMut4::new(&mut data, [1, 1, 2, 1], [12, 12, 6, 2]).unwrap();
        masked_softmax(view, None, &AttentionOptions::default(), Par::Seq).unwrap();
        assert_eq!((data[0], data[6]), (1.0, 1.0), "a row of one key has weight 1");
        let mut lse = vec![0.0f32; 3];
        let view = ViewMut4::contiguous(&mut data[..6], [1, 1, 2, 3]).unwrap();
        let err = masked_softmax(
            view,
            Some(ViewMut::contiguous(&mut lse, [1, 1, 3]).unwrap()),
            &AttentionOptions::default(),
            Par::Seq,
        )
        .unwrap_err();
        assert!(err.to_string().contains("lse"), "{err}");
    }
}
