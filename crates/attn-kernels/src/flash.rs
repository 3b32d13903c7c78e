//! Flash-style attention forward: tiled over query rows and key blocks with an online softmax
//! (FlashAttention-2 loop order), never materialising an `S×T` score matrix.
//!
//! Shapes: `q: [B, H, S, D]`, `k: [B, G, T, D]`, `v: [B, G, T, Dv]` -> `out: [B, H, S, Dv]`,
//! `lse: [B, H, S]`; `G` divides `H` and query head `h` reads key/value head `h / (H / G)`.
//!
//! # How the work is cut
//! The query rows that share one key/value head, `(s, h)` for the `H/G` heads of group `g`, are
//! stacked into one sequence of `S·H/G` rows (s-major), so grouped-query and multi-query
//! attention read each K/V tile once for all heads of the group, with no copy of K or V. That
//! sequence is cut into tiles of [`BLOCK_ROWS`] rows; a task is one `(b, g, row tile, key split)`.
//! The number of key splits is 1 unless there are fewer than [`MIN_TASKS`] tasks (decoding:
//! `S = 1`, long `T`); then the keys are split so that all cores have work, and the partial
//! results are merged in split order afterwards. Every choice depends on the shapes only, never
//! on the thread count, and each row's arithmetic runs on one thread in a fixed order: results
//! are bit-identical for any number of threads.
//!
//! # One tile, passes numbered as in the reference
//! For each key block `[t0, t0 + bc)` of the tile's key range:
//! - pass 1: `scores = (scale·q_tile) · k_blockᵀ` (faer GEMM, sequential);
//! - pass 2: mask, row max, `p = exp(scores - m_new)` and its row sum, the online update
//!   `l = l·exp(m_old - m_new) + sum(p)`;
//! - pass 3: rescale the accumulator rows by `exp(m_old - m_new)`;
//! - pass 4: `acc += p · v_block` (faer GEMM, sequential).
//!
//! Finally `out = acc / l` and `lse = m + ln(l)`; a row that saw no key (`l = 0`) writes zeros
//! and `lse = -inf`. Key blocks past the causal limit of the tile's last row, or past the
//! batch's key length, are never visited. A row that comes out non-finite from a finite softmax
//! is repaired afterwards so that hidden keys' values never reach it ([`crate::nonfinite`]).

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::gemm::gemm_raw;
use crate::mask::{mask_row, resolve_scale, validate_options};
use crate::simd::{exp_sub_sum, row_max, scale_into, scale_row};
use crate::view::SharedMut;
use crate::{Accum, AttentionOptions, KernelError, Par, View4, ViewMut, ViewMut4};

/// Query rows per tile.
pub const BLOCK_ROWS: usize = 64;
/// Keys per block.
pub const BLOCK_KEYS: usize = 128;
/// Below this many `(b, g, row tile)` tasks the keys are split across tasks (decoding).
pub const MIN_TASKS: usize = 32;
/// Tiles of at most this many rows compute scores by dot products on keys in place.
const DOT_ROWS_MAX: usize = 8;
/// The smallest number of keys a split covers.
const MIN_KEYS_PER_SPLIT: usize = 512;

/// The shapes of one call and how its work is cut.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub b: usize,
    pub h: usize,
    pub g: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
    pub dv: usize,
    /// `Dv` rounded up to the micro-kernel width: the row stride of the accumulator.
    pub dv_pad: usize,
    /// Query heads per key/value head, `H / G`.
    pub rep: usize,
    /// `S · rep`: the stacked rows of one group.
    pub rows_per_group: usize,
    pub row_tiles: usize,
    pub splits: usize,
    pub keys_per_split: usize,
}

impl Plan {
    pub(crate) fn new([b, h, s, d]: [usize; 4], [g, t, dv]: [usize; 3]) -> Self {
        let rep = h / g.max(1);
        let rows_per_group = s * rep;
        let row_tiles = rows_per_group.div_ceil(BLOCK_ROWS);
        let tasks = b * g * row_tiles;
        let splits = if tasks == 0 || tasks >= MIN_TASKS || t < 2 * MIN_KEYS_PER_SPLIT {
            1
        } else {
            MIN_TASKS.div_ceil(tasks).min(t / MIN_KEYS_PER_SPLIT).max(1)
        };
        let keys_per_split = t.div_ceil(splits).div_ceil(BLOCK_KEYS) * BLOCK_KEYS;
        let splits = if t == 0 { 1 } else { t.div_ceil(keys_per_split.max(1)) };
        let dv_pad = crate::tile::pad_to_nr(dv);
        Plan {
            b,
            h,
            g,
            s,
            t,
            d,
            dv,
            dv_pad,
            rep,
            rows_per_group,
            row_tiles,
            splits,
            keys_per_split,
        }
    }
}

/// Checks `q: [B, H, S, D]` against `k: [B, G, T, D]` (G dividing H) and returns
/// `[B, H, G, S, T, D]`.
pub(crate) fn validate_qk(op: &'static str, q: &View4<'_, f32>, k: &View4<'_, f32>) -> Result<[usize; 6], KernelError> {
    let [b, h, s, d] = q.shape();
    let [kb, g, t, kd] = k.shape();
    if g == 0 || h % g != 0 {
        return Err(KernelError::HeadsNotDivisible {
            op,
            n_heads: h,
            n_kv_heads: g,
        });
    }
    if kb != b || kd != d {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "k",
            expected: vec![b, g, t, d],
            got: k.shape().to_vec(),
        });
    }
    Ok([b, h, g, s, t, d])
}

/// Validates the operands of an attention call and returns its plan.
pub(crate) fn validate(
    op: &'static str,
    out_shape: [usize; 4],
    lse_shape: Option<[usize; 3]>,
    q: &View4<'_, f32>,
    k: &View4<'_, f32>,
    v: &View4<'_, f32>,
    options: &AttentionOptions<'_>,
) -> Result<Plan, KernelError> {
    let [b, h, g, s, t, d] = validate_qk(op, q, k)?;
    let dv = v.shape()[3];
    if v.shape() != [b, g, t, dv] {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "v",
            expected: vec![b, g, t, dv],
            got: v.shape().to_vec(),
        });
    }
    if out_shape != [b, h, s, dv] {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "out",
            expected: vec![b, h, s, dv],
            got: out_shape.to_vec(),
        });
    }
    if let Some(lse_shape) = lse_shape {
        if lse_shape != [b, h, s] {
            return Err(KernelError::ShapeMismatch {
                op,
                tensor: "lse",
                expected: vec![b, h, s],
                got: lse_shape.to_vec(),
            });
        }
    }
    if d == 0 || dv == 0 {
        return Err(KernelError::InvalidArgument {
            op,
            what: "head dim (D, Dv)",
            got: format!("({d}, {dv})"),
            expected: "at least 1",
        });
    }
    validate_options(op, options, [b, h, s, t])?;
    Ok(Plan::new([b, h, s, d], [g, t, dv]))
}

/// Per-worker scratch, sized once for the call.
struct Scratch {
    /// `[BLOCK_ROWS, D]`: the tile's query rows, times the scale.
    q_tile: Vec<f32>,
    /// `[BLOCK_ROWS, BLOCK_KEYS]`: scores, then probabilities.
    scores: Vec<f32>,
    /// `[BLOCK_ROWS, Dv_pad]`: the unnormalised output rows.
    acc: Vec<f32>,
    /// `[D, BLOCK_KEYS]`: the key block, transposed (micro-kernel path).
    kt: Vec<f32>,
    /// `[BLOCK_KEYS, Dv_pad]`: the value block (micro-kernel path).
    vp: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Scratch {
    fn new(plan: &Plan) -> Self {
        Scratch {
            q_tile: vec![0.0; BLOCK_ROWS * plan.d],
            scores: vec![0.0; BLOCK_ROWS * BLOCK_KEYS],
            acc: vec![0.0; BLOCK_ROWS * plan.dv_pad],
            kt: vec![0.0; plan.d * BLOCK_KEYS],
            vp: vec![0.0; BLOCK_KEYS * plan.dv_pad],
            m: vec![0.0; BLOCK_ROWS],
            l: vec![0.0; BLOCK_ROWS],
        }
    }
}

/// Flash-style attention: `q: [B, H, S, D]`, `k: [B, G, T, D]`, `v: [B, G, T, Dv]` ->
/// `out: [B, H, S, Dv]` and optionally `lse: [B, H, S]` (natural log of each row's softmax
/// denominator, `-inf` for a row with nothing to attend to).
///
/// All five are strided views, so `[B, S, H, D]` storage is passed as a permuted view without a
/// copy. A row with nothing to attend to gets zeros. With `Par::Rayon` the work runs on the
/// current rayon pool; the result is bit-identical to `Par::Seq`.
///
/// ```
/// use attn_kernels::{flash_attention, AttentionOptions, Causal, Par, View4, ViewMut4};
/// let (b, h, s, d) = (1, 2, 3, 4);
/// let q: Vec<f32> = (0..b * h * s * d).map(|i| (i as f32 * 0.1).sin()).collect();
/// let mut out = vec![0.0f32; b * h * s * d];
/// let view = View4::contiguous(&q, [b, h, s, d]).unwrap();
/// let options = AttentionOptions { causal: Causal::TopLeft, ..Default::default() };
/// flash_attention(ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(), None, view, view, view, &options, Par::Seq).unwrap();
/// // The first query of a causal call sees only the first key: its output is that key's value.
/// assert_eq!(&out[..d], &q[..d]);
/// ```
pub fn flash_attention(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    flash_impl(out, lse, q, k, v, options, par, true)
}

/// [`flash_attention`], with the repair of values that rows cannot see (see
/// [`crate::nonfinite`]) switched by `repair`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash_impl(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    q: View4<'_, f32>,
    k: View4<'_, f32>,
    v: View4<'_, f32>,
    options: &AttentionOptions<'_>,
    par: Par,
    repair: bool,
) -> Result<(), KernelError> {
    let plan = validate(
        "flash_attention",
        out.shape(),
        lse.as_ref().map(|l| l.shape()),
        &q,
        &k,
        &v,
        options,
    )?;
    let mut out = out;
    let out_strides = out.strides();
    let out_ptr = SharedMut(out.data_mut().as_mut_ptr());
    let mut lse = lse;
    let lse_dst = lse
        .as_mut()
        .map(|l| (SharedMut(l.data_mut().as_mut_ptr()), l.strides()));
    let scale = resolve_scale(options, plan.d);
    let micro = crate::simd::simd_level() == crate::SimdLevel::Avx2Fma;
    // When several row tiles read the same keys, transpose K once for the whole call rather
    // than once per tile: `[B, G, key blocks, D, BLOCK_KEYS]`, zero past T.
    let kt_packed = (micro && plan.row_tiles > 1).then(|| pack_keys_transposed(&plan, &k, par));
    let ops = Operands {
        q,
        k,
        v,
        options,
        scale,
        kt_packed: kt_packed.as_deref(),
        micro,
    };

    // Set when a row came out non-finite from a finite softmax: a non-finite value reached it.
    let spoilt_rows = AtomicBool::new(false);
    let tasks = plan.b * plan.g * plan.row_tiles;
    if plan.splits == 1 {
        let run = |scratch: &mut Scratch, task: usize| {
            let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
            let (b, g) = (bg / plan.g, bg % plan.g);
            let rows = attend_tile(scratch, &plan, &ops, [b, g, tile], 0..plan.t);
            for i in 0..rows {
                let (s, h) = row_position(&plan, g, tile * BLOCK_ROWS + i);
                let l = scratch.l[i];
                let acc_row = &scratch.acc[i * plan.dv_pad..i * plan.dv_pad + plan.dv];
                // SAFETY: `(b, h, s)` is in bounds and belongs to this task alone.
                let spoilt = unsafe {
                    write_row(
                        out_ptr,
                        out_strides,
                        [b, h, s],
                        plan.dv,
                        acc_row,
                        l,
                        scratch.m[i],
                        lse_dst,
                    )
                };
                if spoilt {
                    spoilt_rows.store(true, Ordering::Relaxed);
                }
            }
        };
        run_tasks(tasks, par, &plan, run);
    } else {
        // Split-KV: every split writes its unnormalised accumulator, max and sum for its rows;
        // a second loop merges the splits of each row in split order.
        let rows = plan.rows_per_group.min(BLOCK_ROWS);
        let n = tasks * plan.splits;
        let mut part_acc = vec![0.0f32; n * rows * plan.dv];
        let mut part_ml = vec![(f32::NEG_INFINITY, 0.0f32); n * rows];
        let part_chunks: Vec<SplitSlot<'_>> = part_acc
            .chunks_mut(rows * plan.dv)
            .zip(part_ml.chunks_mut(rows))
            .collect();
        let body = |scratch: &mut Scratch, (index, (acc_dst, ml_dst)): (usize, SplitSlot<'_>)| {
            let (task, split) = (index / plan.splits, index % plan.splits);
            let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
            let (b, g) = (bg / plan.g, bg % plan.g);
            let t_lo = split * plan.keys_per_split;
            let t_hi = (t_lo + plan.keys_per_split).min(plan.t);
            let n_rows = attend_tile(scratch, &plan, &ops, [b, g, tile], t_lo..t_hi);
            for i in 0..n_rows {
                acc_dst[i * plan.dv..(i + 1) * plan.dv]
                    .copy_from_slice(&scratch.acc[i * plan.dv_pad..i * plan.dv_pad + plan.dv]);
                ml_dst[i] = (scratch.m[i], scratch.l[i]);
            }
        };
        match par {
            Par::Seq => {
                let mut scratch = Scratch::new(&plan);
                part_chunks
                    .into_iter()
                    .enumerate()
                    .for_each(|item| body(&mut scratch, item));
            }
            Par::Rayon => part_chunks
                .into_par_iter()
                .enumerate()
                .for_each_init(|| Scratch::new(&plan), body),
        }
        let merge = |_: &mut Scratch, task: usize| {
            let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
            let (b, g) = (bg / plan.g, bg % plan.g);
            let n_rows = (plan.rows_per_group - tile * BLOCK_ROWS).min(BLOCK_ROWS);
            let mut acc = vec![0.0f32; plan.dv];
            for i in 0..n_rows {
                let slot = |split: usize| (task * plan.splits + split) * rows + i;
                let m_max = (0..plan.splits)
                    .map(|sp| part_ml[slot(sp)].0)
                    .fold(f32::NEG_INFINITY, f32::max);
                acc.fill(0.0);
                let mut l_total = 0.0f32;
                if m_max == f32::NEG_INFINITY && (0..plan.splits).any(|sp| part_ml[slot(sp)].1.is_nan()) {
                    // A split saw only NaN scores: the row is NaN.
                    l_total = f32::NAN;
                    acc.fill(f32::NAN);
                } else if m_max != f32::NEG_INFINITY {
                    for sp in 0..plan.splits {
                        let (m, l) = part_ml[slot(sp)];
                        if l == 0.0 && m == f32::NEG_INFINITY {
                            continue;
                        }
                        let w = crate::simd::exp_scalar(m - m_max);
                        l_total += l * w;
                        let src = &part_acc[slot(sp) * plan.dv..(slot(sp) + 1) * plan.dv];
                        acc.iter_mut().zip(src).for_each(|(a, &x)| *a += x * w);
                    }
                }
                let (s, h) = row_position(&plan, g, tile * BLOCK_ROWS + i);
                // SAFETY: `(b, h, s)` is in bounds and belongs to this task alone.
                let spoilt =
                    unsafe { write_row(out_ptr, out_strides, [b, h, s], plan.dv, &acc, l_total, m_max, lse_dst) };
                if spoilt {
                    spoilt_rows.store(true, Ordering::Relaxed);
                }
            }
        };
        run_tasks(tasks, par, &plan, merge);
    }
    if repair && spoilt_rows.load(Ordering::Relaxed) {
        crate::nonfinite::repair_values(&mut out, &q, &k, &v, options, scale, |out, lse, v| {
            flash_impl(out, Some(lse), q, k, v, options, par, false)
        })?;
    }
    Ok(())
}

/// The inputs of one call as the tiles see them.
#[derive(Clone, Copy)]
struct Operands<'a, 'o> {
    q: View4<'a, f32>,
    k: View4<'a, f32>,
    v: View4<'a, f32>,
    options: &'o AttentionOptions<'a>,
    scale: f32,
    /// K transposed per key block, when packed once for the call.
    kt_packed: Option<&'o [f32]>,
    /// Whether the AVX2+FMA micro-kernels run the tile GEMMs.
    micro: bool,
}

/// `k: [B, G, T, D]` -> `[B, G, ceil(T / BLOCK_KEYS), D, BLOCK_KEYS]`, zero past `T`.
pub(crate) fn pack_keys_transposed(plan: &Plan, k: &View4<'_, f32>, par: Par) -> Vec<f32> {
    let blocks = plan.t.div_ceil(BLOCK_KEYS);
    let block_len = plan.d * BLOCK_KEYS;
    let mut packed = vec![0.0f32; plan.b * plan.g * blocks * block_len];
    let st = k.strides();
    let data = k.data();
    let pack = |(index, dst): (usize, &mut [f32])| {
        let (bg, block) = (index / blocks, index % blocks);
        let (b, g) = (bg / plan.g, bg % plan.g);
        let t0 = block * BLOCK_KEYS;
        let bc = (plan.t - t0).min(BLOCK_KEYS);
        let base = b * st[0] + g * st[1] + t0 * st[2];
        transpose_keys(dst, &data[base..], bc, plan.d, st[2], st[3]);
    };
    match par {
        Par::Seq => packed.chunks_mut(block_len).enumerate().for_each(pack),
        Par::Rayon => packed.par_chunks_mut(block_len).enumerate().for_each(pack),
    }
    packed
}

/// `dst[p·BLOCK_KEYS + j] = keys[j·row_stride + p·col_stride]` for `j < bc`, `p < d`: a key
/// block transposed for the tile micro-kernel.
fn transpose_keys(dst: &mut [f32], keys: &[f32], bc: usize, d: usize, row_stride: usize, col_stride: usize) {
    if bc == 0 {
        return;
    }
    assert!(dst.len() >= (d - 1) * BLOCK_KEYS + bc && keys.len() > (bc - 1) * row_stride + (d - 1) * col_stride);
    #[cfg(target_arch = "x86_64")]
    if col_stride == 1 && crate::simd::simd_level() == crate::SimdLevel::Avx2Fma {
        // SAFETY: AVX2 was detected; the assertion above bounds both operands.
        unsafe { crate::tile::avx2::transpose(bc, d, keys.as_ptr(), row_stride, dst.as_mut_ptr(), BLOCK_KEYS) };
        return;
    }
    for j in 0..bc {
        for p in 0..d {
            dst[p * BLOCK_KEYS + j] = keys[j * row_stride + p * col_stride];
        }
    }
}

/// One split's destination: unnormalised accumulator rows and each row's (max, sum).
type SplitSlot<'a> = (&'a mut [f32], &'a mut [(f32, f32)]);

/// Runs `body(scratch, task)` for every task, sequentially or on the rayon pool.
fn run_tasks(tasks: usize, par: Par, plan: &Plan, body: impl Fn(&mut Scratch, usize) + Sync + Send) {
    match par {
        Par::Seq => {
            let mut scratch = Scratch::new(plan);
            (0..tasks).for_each(|task| body(&mut scratch, task));
        }
        Par::Rayon => (0..tasks).into_par_iter().for_each_init(|| Scratch::new(plan), body),
    }
}

/// The `(s, h)` of stacked row `r` of group `g`.
#[inline]
fn row_position(plan: &Plan, g: usize, r: usize) -> (usize, usize) {
    (r / plan.rep, g * plan.rep + r % plan.rep)
}

/// Writes `out[b, h, s, :] = acc / l` and `lse[b, h, s] = m + ln(l)`; zeros and `-inf` if `l = 0`.
/// Returns whether the row must be repaired ([`crate::nonfinite::spoiled`]).
///
/// # Safety
/// `(b, h, s)` must be in bounds of both destinations, and no other thread may write that row.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn write_row(
    out: SharedMut,
    strides: [usize; 4],
    [b, h, s]: [usize; 3],
    dv: usize,
    acc: &[f32],
    l: f32,
    m: f32,
    lse: Option<(SharedMut, [usize; 3])>,
) -> bool {
    let base = b * strides[0] + h * strides[1] + s * strides[2];
    let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
    let mut finite = true;
    for (j, &a) in acc.iter().enumerate().take(dv) {
        let x = if l == 0.0 { 0.0 } else { a * inv };
        finite &= x.is_finite();
        // SAFETY: in bounds by the caller's contract; the row is this task's alone.
        unsafe { *out.get().add(base + j * strides[3]) = x };
    }
    if let Some((ptr, st)) = lse {
        let value = if l == 0.0 { f32::NEG_INFINITY } else { m + l.ln() };
        // SAFETY: as above.
        unsafe { *ptr.get().add(b * st[0] + h * st[1] + s * st[2]) = value };
    }
    crate::nonfinite::spoiled(m, l, !finite)
}

/// Runs the online softmax of one row tile over keys `keys`, leaving the unnormalised
/// accumulator in `scratch.acc`, the running max in `scratch.m` and the running sum in
/// `scratch.l`. Returns the number of rows in the tile.
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    [b, g, tile]: [usize; 3],
    keys: std::ops::Range<usize>,
) -> usize {
    let Operands {
        q,
        k,
        v,
        options,
        scale,
        ..
    } = *ops;
    let (d, dv, dv_pad) = (plan.d, plan.dv, plan.dv_pad);
    let r0 = tile * BLOCK_ROWS;
    let n_rows = (plan.rows_per_group - r0).min(BLOCK_ROWS);
    let key_length = options.key_lengths.map_or(plan.t, |lengths| lengths[b]);

    // Pack the tile's query rows, pre-multiplied by the scale, and set each row's key limit.
    let mut limits = [0usize; BLOCK_ROWS];
    let mut positions = [(0usize, 0usize); BLOCK_ROWS];
    let q_data = q.data();
    for i in 0..n_rows {
        let (s, h) = row_position(plan, g, r0 + i);
        positions[i] = (s, h);
        limits[i] = options.causal.key_limit(s, plan.s, plan.t).min(key_length);
        let dst = &mut scratch.q_tile[i * d..(i + 1) * d];
        let base = q.offset([b, h, s, 0]);
        if q.strides()[3] == 1 {
            scale_into(dst, &q_data[base..base + d], scale);
        } else {
            let st = q.strides()[3];
            dst.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = q_data[base + j * st] * scale);
        }
    }
    scratch.m[..n_rows].fill(f32::NEG_INFINITY);
    scratch.l[..n_rows].fill(0.0);
    scratch.acc[..n_rows * dv_pad].fill(0.0);

    // Keys that no row of the tile may see are never visited.
    let max_limit = limits[..n_rows].iter().copied().max().unwrap_or(0);
    let t_end = keys.end.min(max_limit);
    let mut t0 = keys.start;
    let micro = ops.micro;
    let (k_data, v_data) = (k.data(), v.data());
    // Values are read in place when their rows are contiguous and a multiple of the kernel width.
    let v_in_place = v.strides()[3] == 1 && dv == dv_pad;
    let (k_st, v_st) = (k.strides(), v.strides());
    while t0 < t_end {
        let bc = (t_end - t0).min(BLOCK_KEYS);
        let k_base = b * k_st[0] + g * k_st[1] + t0 * k_st[2];
        let v_base = b * v_st[0] + g * v_st[1] + t0 * v_st[2];
        // Pass 1: scores = q_tile · k_blockᵀ.
        if micro {
            // Short tiles (decoding) read the keys in place by dot products; others take the
            // key block transposed, packed once for the call or here.
            let keys_in_place = n_rows <= DOT_ROWS_MAX && k_st[3] == 1 && ops.kt_packed.is_none();
            let bc_pad = crate::tile::pad_to_nr(bc);
            let kt: &[f32] = match ops.kt_packed {
                _ if keys_in_place => &[],
                Some(packed) => {
                    let blocks = plan.t.div_ceil(BLOCK_KEYS);
                    let index = (b * plan.g + g) * blocks + t0 / BLOCK_KEYS;
                    &packed[index * d * BLOCK_KEYS..(index + 1) * d * BLOCK_KEYS]
                }
                None => {
                    transpose_keys(&mut scratch.kt, &k_data[k_base..], bc, d, k_st[2], k_st[3]);
                    for p in 0..d {
                        scratch.kt[p * BLOCK_KEYS + bc..p * BLOCK_KEYS + bc_pad].fill(0.0);
                    }
                    &scratch.kt
                }
            };
            if !v_in_place {
                for j in 0..bc {
                    let dst = &mut scratch.vp[j * dv_pad..j * dv_pad + dv];
                    let src = v_base + j * v_st[2];
                    dst.iter_mut()
                        .enumerate()
                        .for_each(|(c, x)| *x = v_data[src + c * v_st[3]]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            if keys_in_place {
                // SAFETY: AVX2+FMA were detected; `q_tile` is [n_rows, D], the key rows
                // `[b, g, t0..t0+bc, :]` are contiguous and were bounds-checked with `k`, and
                // `scores` is [BLOCK_ROWS, BLOCK_KEYS].
                unsafe {
                    crate::tile::avx2::dot_rows(
                        n_rows,
                        bc,
                        d,
                        scratch.q_tile.as_ptr(),
                        d,
                        k_data.as_ptr().add(k_base),
                        k_st[2],
                        scratch.scores.as_mut_ptr(),
                        BLOCK_KEYS,
                    )
                };
            } else {
                // The kernel reads `kt` through a pointer: check the extent it will read.
                assert!(
                    kt.len() >= (d - 1) * BLOCK_KEYS + bc_pad,
                    "key block of {} values",
                    kt.len()
                );
                // SAFETY: AVX2+FMA were detected; `q_tile` is [n_rows, D], `kt` is
                // [D, BLOCK_KEYS] with `bc_pad <= BLOCK_KEYS` columns written (checked above),
                // `scores` is [BLOCK_ROWS, BLOCK_KEYS].
                unsafe {
                    crate::tile::avx2::gemm::<false>(
                        n_rows,
                        bc_pad,
                        d,
                        scratch.q_tile.as_ptr(),
                        d,
                        kt.as_ptr(),
                        BLOCK_KEYS,
                        scratch.scores.as_mut_ptr(),
                        BLOCK_KEYS,
                    )
                };
            }
        } else {
            // SAFETY: `scores` holds BLOCK_ROWS×BLOCK_KEYS elements and `q_tile` BLOCK_ROWS×D;
            // the key block `[b, g, t0..t0+bc, :]` was bounds-checked with `k`.
            unsafe {
                gemm_raw(
                    scratch.scores.as_mut_ptr(),
                    [BLOCK_KEYS, 1],
                    [n_rows, bc, d],
                    Accum::Replace,
                    scratch.q_tile.as_ptr(),
                    [d, 1],
                    k_data.as_ptr().add(k_base),
                    [k_st[3], k_st[2]],
                    1.0,
                    Par::Seq,
                )
            };
        }
        for i in 0..n_rows {
            let row = &mut scratch.scores[i * BLOCK_KEYS..i * BLOCK_KEYS + bc];
            let (s, h) = positions[i];
            // Pass 2: mask, max, exp and sum.
            mask_row(row, options, [b, h, s], t0, limits[i], [plan.s, plan.t]);
            let m_old = scratch.m[i];
            let m_new = m_old.max(row_max(row));
            if m_new == f32::NEG_INFINITY {
                if row.iter().any(|x| x.is_nan()) {
                    // Only NaN scores besides hidden keys (a NaN query, say): the row is NaN.
                    scratch.l[i] = f32::NAN;
                    row.fill(f32::NAN);
                } else {
                    // Nothing visible yet in this row: contribute nothing.
                    row.fill(0.0);
                }
                continue;
            }
            let sum = exp_sub_sum(row, m_new);
            let alpha = crate::simd::exp_scalar(m_old - m_new);
            scratch.l[i] = scratch.l[i] * alpha + sum;
            scratch.m[i] = m_new;
            // Pass 3: rescale the accumulator row (skipped while the max holds).
            if alpha != 1.0 {
                scale_row(&mut scratch.acc[i * dv_pad..i * dv_pad + dv], alpha);
            }
        }
        // Pass 4: acc += p · v_block.
        if micro {
            let v_ptr = if v_in_place {
                // The kernel reads `bc` rows of `Dv_pad` values in place: check that extent.
                assert!(
                    v_base + (bc - 1) * v_st[2] + dv_pad <= v_data.len(),
                    "value block past V"
                );
                v_data.as_ptr().wrapping_add(v_base)
            } else {
                scratch.vp.as_ptr()
            };
            let ldv = if v_in_place { v_st[2] } else { dv_pad };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2+FMA were detected; `scores` is [n_rows, BLOCK_KEYS] with `bc` valid
            // columns, the value block ([bc, Dv_pad], packed or in place: bounds-checked with `v`)
            // and `acc` is [BLOCK_ROWS, Dv_pad].
            unsafe {
                if n_rows <= DOT_ROWS_MAX {
                    crate::tile::avx2::axpy_rows(
                        n_rows,
                        dv_pad,
                        bc,
                        scratch.scores.as_ptr(),
                        BLOCK_KEYS,
                        v_ptr,
                        ldv,
                        scratch.acc.as_mut_ptr(),
                        dv_pad,
                    )
                } else {
                    crate::tile::avx2::gemm::<true>(
                        n_rows,
                        dv_pad,
                        bc,
                        scratch.scores.as_ptr(),
                        BLOCK_KEYS,
                        v_ptr,
                        ldv,
                        scratch.acc.as_mut_ptr(),
                        dv_pad,
                    )
                }
            };
        } else {
            // SAFETY: `acc` holds BLOCK_ROWS×Dv_pad elements; the value block was bounds-checked
            // with `v`.
            unsafe {
                gemm_raw(
                    scratch.acc.as_mut_ptr(),
                    [dv_pad, 1],
                    [n_rows, dv, bc],
                    Accum::Add,
                    scratch.scores.as_ptr(),
                    [BLOCK_KEYS, 1],
                    v_data.as_ptr().add(v_base),
                    [v_st[2], v_st[3]],
                    1.0,
                    Par::Seq,
                )
            };
        }
        t0 += bc;
    }
    n_rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};
    use crate::{attention_reference, attention_unfused, broadcast_to, Causal, Mask};
    use proptest::prelude::*;

    #[derive(Debug, Clone, Copy)]
    enum MaskKind {
        None,
        /// Boolean, with the given shape selector.
        Allowed(MaskShape),
        /// Additive, with some `-inf` entries.
        Additive(MaskShape),
        /// Boolean, `true` = masked out.
        Disallowed(MaskShape),
    }

    #[derive(Debug, Clone, Copy)]
    enum MaskShape {
        Full,
        TwoD,
        Padding,
    }

    #[derive(Debug, Clone, Copy)]
    struct Case {
        b: usize,
        h: usize,
        g: usize,
        s: usize,
        t: usize,
        d: usize,
        dv: usize,
        /// Store q, k, v and out as `[B, S, H, D]` and pass permuted views.
        bshd: bool,
        causal: Causal,
        mask: MaskKind,
        lengths: bool,
        /// A second, `[B, T]` key-padding mask (`true` = masked out).
        key_mask: bool,
        /// ALiBi slopes per head.
        alibi: bool,
        scale: Option<f32>,
        /// Multiplies q, for large logits.
        magnitude: f32,
    }

    impl Case {
        fn new(b: usize, h: usize, g: usize, s: usize, t: usize, d: usize, dv: usize) -> Self {
            Case {
                b,
                h,
                g,
                s,
                t,
                d,
                dv,
                bshd: false,
                causal: Causal::None,
                mask: MaskKind::None,
                lengths: false,
                key_mask: false,
                alibi: false,
                scale: None,
                magnitude: 1.0,
            }
        }
    }

    /// A `[B, X, L, W]` tensor, stored either as such or as `[B, L, X, W]`, seen as the former.
    fn view4(data: &[f32], [b, x, l, w]: [usize; 4], bshd: bool) -> View4<'_, f32> {
        if bshd {
            View4::contiguous(data, [b, l, x, w])
                .unwrap()
                .permuted([0, 2, 1, 3])
                .unwrap()
        } else {
            View4::contiguous(data, [b, x, l, w]).unwrap()
        }
    }

    fn view4_mut(data: &mut [f32], [b, x, l, w]: [usize; 4], bshd: bool) -> ViewMut4<'_, f32> {
        if bshd {
            ViewMut4::contiguous(data, [b, l, x, w])
                .unwrap()
                .permuted([0, 2, 1, 3])
                .unwrap()
        } else {
            ViewMut4::contiguous(data, [b, x, l, w]).unwrap()
        }
    }

    type Output = (Vec<f32>, Vec<f32>);
    type Kernel<'k> = dyn Fn(ViewMut4<'_, f32>, ViewMut<'_, f32, 3>, Par) + 'k;

    /// The largest error against the f64 reference measured over these tests, as
    /// `|got - want| / (1 + |want|)`: 1.2e-6 (additive masks of ±3 on the scores), on AVX2+FMA
    /// and the scalar path, for scores of order 1 (larger scores add their own rounding, see
    /// `check`). The bound is about 8× that. A flash rescale off by 1e-4, or a key block
    /// dropped, is far outside.
    const TOLERANCE: f64 = 1e-5;

    /// Runs `case` through the reference, the flash kernel (sequential, 1, 2, 3, 8 threads and
    /// the machine's count) and the unfused path; asserts agreement within [`TOLERANCE`] and
    /// bit-identity of `out` and `lse` across thread counts.
    fn check(case: Case) {
        let Case {
            b,
            h,
            g,
            s,
            t,
            d,
            dv,
            bshd,
            ..
        } = case;
        let mut q = random_vec(b * h * s * d, 11);
        q.iter_mut().for_each(|x| *x *= case.magnitude);
        let k = random_vec(b * g * t * d, 12);
        let v = random_vec(b * g * t * dv, 13);
        let target = [b, h, s, t];
        let mask_shape: Vec<usize> = match case.mask {
            MaskKind::None => vec![],
            MaskKind::Allowed(sh) | MaskKind::Additive(sh) | MaskKind::Disallowed(sh) => match sh {
                MaskShape::Full => vec![b, h, s, t],
                MaskShape::TwoD => vec![s, t],
                MaskShape::Padding => vec![b, 1, 1, t],
            },
        };
        let n_mask: usize = mask_shape.iter().product();
        let raw = random_vec(n_mask, 14);
        let allowed: Vec<bool> = raw.iter().map(|&x| x > -0.5).collect();
        let additive: Vec<f32> = raw
            .iter()
            .map(|&x| if x < -0.8 { f32::NEG_INFINITY } else { x * 3.0 })
            .collect();
        let mask = match case.mask {
            MaskKind::None => Mask::None,
            MaskKind::Allowed(_) => Mask::Allowed(broadcast_to(&allowed, &mask_shape, target).unwrap()),
            MaskKind::Additive(_) => Mask::Additive(broadcast_to(&additive, &mask_shape, target).unwrap()),
            MaskKind::Disallowed(_) => Mask::Disallowed(broadcast_to(&allowed, &mask_shape, target).unwrap()),
        };
        let padding: Vec<bool> = random_vec(b * t, 15).iter().map(|&x| x > 0.6).collect();
        let key_mask = if case.key_mask {
            Mask::Disallowed(broadcast_to(&padding, &[b, 1, 1, t], target).unwrap())
        } else {
            Mask::None
        };
        let slopes: Vec<f32> = (0..h).map(|i| 0.5f32.powi(i as i32 + 1)).collect();
        let lengths: Vec<usize> = (0..b).map(|i| (t * (i + 1) / (b + 1)).min(t)).collect();
        let options = AttentionOptions {
            scale: case.scale,
            mask,
            causal: case.causal,
            key_lengths: case.lengths.then_some(&lengths[..]),
            key_mask,
            alibi_slopes: case.alibi.then_some(&slopes[..]),
        };
        let (qv, kv, vv) = (
            view4(&q, [b, h, s, d], bshd),
            view4(&k, [b, g, t, d], bshd),
            view4(&v, [b, g, t, dv], bshd),
        );
        let reference = attention_reference(qv, kv, vv, &options);
        let mut want = vec![0.0f64; b * h * s * dv];
        // The reference is [B, H, S, Dv]; lay it out as the outputs are stored.
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    for j in 0..dv {
                        let src = ((bi * h + hi) * s + si) * dv + j;
                        let dst = if bshd { ((bi * s + si) * h + hi) * dv + j } else { src };
                        want[dst] = reference.out[src];
                    }
                }
            }
        }

        let run = |f: &Kernel<'_>, par: Par| -> Output {
            let mut out = vec![f32::NAN; b * h * s * dv];
            let mut lse = vec![f32::NAN; b * h * s];
            f(
                view4_mut(&mut out, [b, h, s, dv], bshd),
                ViewMut::contiguous(&mut lse, [b, h, s]).unwrap(),
                par,
            );
            (out, lse)
        };
        let flash = |out: ViewMut4<'_, f32>, lse: ViewMut<'_, f32, 3>, par: Par| {
            flash_attention(out, Some(lse), qv, kv, vv, &options, par).unwrap()
        };
        let unfused = |out: ViewMut4<'_, f32>, lse: ViewMut<'_, f32, 3>, par: Par| {
            attention_unfused(out, Some(lse), qv, kv, vv, &options, par).unwrap()
        };
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let seq = run(&flash, Par::Seq);
        let one = pool(1).install(|| run(&flash, Par::Rayon));
        let two = pool(2).install(|| run(&flash, Par::Rayon));
        let fused_unfused = pool(2).install(|| run(&unfused, Par::Rayon));
        let what = format!("{case:?}");
        // The fast paths round scores to f32: an absolute error of up to half an ulp of the
        // largest score, which the softmax carries into the weights and the output (measured:
        // 2.7e-5 with ALiBi biases of -540 at T = 1100; 9.5e-5 in the weights with logits of
        // 1e4). The bound adds two epsilons of the largest visible score.
        let tol = TOLERANCE + 2.0 * f32::EPSILON as f64 * reference.max_abs_score;
        assert_close(&seq.0, &want, tol, tol, &format!("flash out {what}"));
        assert_close(&seq.1, &reference.lse, tol, tol, &format!("flash lse {what}"));
        assert_close(&fused_unfused.0, &want, tol, tol, &format!("unfused out {what}"));
        assert_close(
            &fused_unfused.1,
            &reference.lse,
            tol,
            tol,
            &format!("unfused lse {what}"),
        );
        let bits = |o: &Output| {
            (
                o.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                o.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(bits(&seq), bits(&one), "1 thread differs from sequential: {what}");
        assert_eq!(bits(&seq), bits(&two), "2 threads differ from sequential: {what}");
        // More threads than this machine's cores, and the machine's own count.
        let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
        for n in [3, 8, machine] {
            let many = pool(n).install(|| run(&flash, Par::Rayon));
            assert_eq!(bits(&seq), bits(&many), "{n} threads differ from sequential: {what}");
        }
        assert!(seq.0.iter().all(|x| !x.is_nan()), "NaN in output: {what}");

        // Weights from the LSE, per head and averaged over heads.
        let lse_view = crate::View::contiguous(&seq.1[..], [b, h, s]).unwrap();
        let mut per_head = vec![f32::NAN; b * h * s * t];
        let dst = crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut per_head, [b, h, s, t]).unwrap());
        crate::attention_weights(dst, qv, kv, lse_view, &options, Par::Rayon).unwrap();
        assert_close(&per_head, &reference.weights, tol, tol, &format!("weights {what}"));
        let mut averaged = vec![f32::NAN; b * s * t];
        let dst = crate::WeightsDst::Averaged(ViewMut::contiguous(&mut averaged, [b, s, t]).unwrap());
        crate::attention_weights(dst, qv, kv, lse_view, &options, Par::Rayon).unwrap();
        let mut want_avg = vec![0.0f64; b * s * t];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..s * t {
                    want_avg[bi * s * t + i] += reference.weights[(bi * h + hi) * s * t + i] / h as f64;
                }
            }
        }
        assert_close(&averaged, &want_avg, tol, tol, &format!("averaged weights {what}"));
    }

    #[test]
    fn block_edges() {
        for &n in &[1, 15, 16, 17, 63, 64, 65, 129] {
            check(Case::new(1, 2, 2, n, n, 16, 16));
            check(Case::new(1, 1, 1, n, 130, 7, 5));
        }
    }

    #[test]
    fn odd_head_dims_and_dv() {
        for &(d, dv) in &[(1, 1), (3, 9), (33, 17), (64, 128), (129, 3)] {
            check(Case::new(2, 2, 1, 19, 37, d, dv));
        }
    }

    #[test]
    fn causal_alignments() {
        for causal in [Causal::TopLeft, Causal::BottomRight] {
            for &(s, t) in &[(1, 1), (1, 300), (70, 70), (70, 200), (200, 70), (129, 129)] {
                let mut case = Case::new(1, 4, 2, s, t, 16, 16);
                case.causal = causal;
                check(case);
            }
        }
    }

    #[test]
    fn masks_and_padding() {
        for mask in [
            MaskKind::Allowed(MaskShape::Full),
            MaskKind::Allowed(MaskShape::TwoD),
            MaskKind::Allowed(MaskShape::Padding),
            MaskKind::Additive(MaskShape::Full),
            MaskKind::Additive(MaskShape::TwoD),
            MaskKind::Additive(MaskShape::Padding),
            MaskKind::Disallowed(MaskShape::Full),
            MaskKind::Disallowed(MaskShape::TwoD),
        ] {
            let mut case = Case::new(2, 4, 2, 33, 150, 8, 8);
            case.mask = mask;
            check(case);
            case.lengths = true;
            case.causal = Causal::BottomRight;
            check(case);
            case.key_mask = true;
            case.alibi = true;
            check(case);
        }
    }

    #[test]
    fn strided_layout_and_custom_scale() {
        let mut case = Case::new(2, 6, 3, 40, 70, 12, 20);
        case.bshd = true;
        case.scale = Some(0.3);
        case.causal = Causal::TopLeft;
        check(case);
    }

    #[test]
    fn operands_with_non_unit_inner_strides() {
        // Q stored as [B, H, D, S], K as [B, G, D, T], V as [B, G, Dv, T] and the masks as
        // [B, H, T, S]: all seen through transposed views, on prefill tiles, decoding tiles
        // (keys read in place by dot products), value widths that are and are not a multiple of
        // the micro-kernel width, and split-KV.
        for &(b, h, g, s, t, d, dv) in &[
            (2, 4, 2, 70, 150, 12, 10),
            (1, 2, 1, 70, 150, 8, 16),
            (2, 2, 2, 1, 150, 12, 16),
            (1, 2, 1, 3, 1100, 8, 16),
        ] {
            let q_store = random_vec(b * h * d * s, 1);
            let k_store = random_vec(b * g * d * t, 2);
            let v_store = random_vec(b * g * dv * t, 3);
            let transposed = |data, shape| View4::contiguous(data, shape).unwrap().permuted([0, 1, 3, 2]).unwrap();
            let (qv, kv, vv) = (
                transposed(&q_store, [b, h, d, s]),
                transposed(&k_store, [b, g, d, t]),
                transposed(&v_store, [b, g, dv, t]),
            );
            let raw = random_vec(b * h * t * s, 4);
            let additive: Vec<f32> = raw.iter().map(|&x| x * 2.0).collect();
            let allowed: Vec<bool> = raw.iter().map(|&x| x > -0.6).collect();
            let masks = [
                Mask::None,
                Mask::Additive(transposed(&additive, [b, h, t, s])),
                Mask::Allowed(
                    View4::contiguous(&allowed, [b, h, t, s])
                        .unwrap()
                        .permuted([0, 1, 3, 2])
                        .unwrap(),
                ),
            ];
            for (causal, mask) in [Causal::None, Causal::BottomRight]
                .into_iter()
                .flat_map(|c| masks.iter().map(move |m| (c, m)))
            {
                let options = AttentionOptions {
                    causal,
                    mask: *mask,
                    ..Default::default()
                };
                let want = attention_reference(qv, kv, vv, &options);
                let mut out = vec![0.0f32; b * h * s * dv];
                flash_attention(
                    ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap(),
                    None,
                    qv,
                    kv,
                    vv,
                    &options,
                    Par::Rayon,
                )
                .unwrap();
                let tol = TOLERANCE + 2.0 * f32::EPSILON as f64 * want.max_abs_score;
                let what = format!("transposed q, k, v, mask: {:?}", (b, h, g, s, t, d, dv, causal));
                assert_close(&out, &want.out, tol, tol, &what);
            }
        }
    }

    /// The split-KV merge keeps the non-finite policy: a NaN query makes its row NaN, and so does
    /// a split whose every visible key has a NaN score, though the other split is finite.
    #[test]
    fn split_kv_rows_with_nan_scores_are_nan() {
        let (s, t, d) = (1, 1100, 8);
        let plan = Plan::new([1, 1, s, d], [1, t, d]);
        assert_eq!(plan.splits, 2, "expected two splits");
        let split = plan.keys_per_split;
        let v = random_vec(t * d, 3);
        for nan_query in [true, false] {
            let mut q = random_vec(s * d, 1);
            let mut k = random_vec(t * d, 2);
            if nan_query {
                q[3] = f32::NAN;
            } else {
                k[split * d..].iter_mut().step_by(d).for_each(|x| *x = f32::NAN);
            }
            let (mut out, mut lse) = (vec![0.0f32; s * d], vec![0.0f32; s]);
            flash_attention(
                ViewMut4::contiguous(&mut out, [1, 1, s, d]).unwrap(),
                Some(ViewMut::contiguous(&mut lse, [1, 1, s]).unwrap()),
                View4::contiguous(&q, [1, 1, s, d]).unwrap(),
                View4::contiguous(&k, [1, 1, t, d]).unwrap(),
                View4::contiguous(&v, [1, 1, t, d]).unwrap(),
                &AttentionOptions::default(),
                Par::Seq,
            )
            .unwrap();
            assert!(out.iter().all(|x| x.is_nan()), "nan_query={nan_query}: {out:?}");
            assert!(lse[0].is_nan(), "nan_query={nan_query}: lse {}", lse[0]);
        }
    }

    #[test]
    fn decode_split_kv() {
        // One query per head, few heads, long keys: the split-KV path.
        for &(h, g, t) in &[(1, 1, 5000), (8, 2, 4096), (4, 4, 1025)] {
            let mut case = Case::new(1, h, g, 1, t, 32, 32);
            assert!(
                Plan::new([1, h, 1, 32], [g, t, 32]).splits > 1,
                "expected a split plan for {case:?}"
            );
            check(case);
            case.lengths = true;
            case.mask = MaskKind::Additive(MaskShape::Padding);
            check(case);
        }
    }

    #[test]
    fn fully_masked_rows_give_zeros_and_neg_inf_lse() {
        let (b, h, s, t, d) = (1, 1, 3, 200, 8);
        let q = random_vec(b * h * s * d, 1);
        let k = random_vec(b * h * t * d, 2);
        // Row 1 may attend nothing.
        let allowed: Vec<bool> = (0..s * t).map(|i| i / t != 1).collect();
        let options = AttentionOptions {
            mask: Mask::Allowed(broadcast_to(&allowed, &[s, t], [b, h, s, t]).unwrap()),
            ..Default::default()
        };
        let qv = View4::contiguous(&q, [b, h, s, d]).unwrap();
        let kv = View4::contiguous(&k, [b, h, t, d]).unwrap();
        for unfused in [false, true] {
            let mut out = vec![f32::NAN; b * h * s * d];
            let mut lse = vec![0.0f32; s];
            let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
            let l = Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap());
            if unfused {
                attention_unfused(o, l, qv, kv, kv, &options, Par::Seq).unwrap();
            } else {
                flash_attention(o, l, qv, kv, kv, &options, Par::Seq).unwrap();
            }
            assert!(
                out[d..2 * d].iter().all(|&x| x == 0.0),
                "unfused={unfused}: {:?}",
                &out[d..2 * d]
            );
            assert_eq!(lse[1], f32::NEG_INFINITY);
            assert!(lse[0].is_finite() && lse[2].is_finite());
            assert!(out.iter().all(|x| x.is_finite()));
        }
        // No keys at all.
        let mut out = vec![f32::NAN; b * h * s * d];
        let empty: [f32; 0] = [];
        let ke = View4::contiguous(&empty, [b, h, 0, d]).unwrap();
        flash_attention(
            ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
            None,
            qv,
            ke,
            ke,
            &AttentionOptions::default(),
            Par::Seq,
        )
        .unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn large_logits_neither_overflow_nor_lose_the_row() {
        let mut case = Case::new(1, 2, 2, 17, 300, 16, 16);
        // |q·k|·scale reaches the order of 1e4.
        case.magnitude = 1e4;
        check(case);
        case.causal = Causal::TopLeft;
        case.mask = MaskKind::Additive(MaskShape::Full);
        check(case);
    }

    #[test]
    fn huge_finite_mask_values_behave_as_in_pytorch() {
        // A row whose every score is pushed to -1e30 by an additive mask is still a softmax over
        // equal values (uniform weights), as in PyTorch; only -inf (or a boolean) empties a row.
        // Scores of +1e30 win outright without overflowing.
        let (s, t, d) = (3, 5, 4);
        let q = random_vec(s * d, 1);
        let k = random_vec(t * d, 2);
        let v: Vec<f32> = (0..t * d).map(|i| (i / d) as f32).collect(); // value row j is all j
        let mut mask = vec![0.0f32; s * t];
        mask[..t].fill(-1e30); // row 0: every key at -1e30
        mask[t + 3] = 1e30; // row 1: key 3 at +1e30
        mask[2 * t..3 * t].fill(f32::NEG_INFINITY); // row 2: nothing visible
        let options = AttentionOptions {
            mask: Mask::Additive(View4::contiguous(&mask, [1, 1, s, t]).unwrap()),
            ..Default::default()
        };
        let (qv, kv, vv) = (
            View4::contiguous(&q, [1, 1, s, d]).unwrap(),
            View4::contiguous(&k, [1, 1, t, d]).unwrap(),
            View4::contiguous(&v, [1, 1, t, d]).unwrap(),
        );
        for unfused in [false, true] {
            let mut out = vec![f32::NAN; s * d];
            let o = ViewMut4::contiguous(&mut out, [1, 1, s, d]).unwrap();
            if unfused {
                attention_unfused(o, None, qv, kv, vv, &options, Par::Seq).unwrap();
            } else {
                flash_attention(o, None, qv, kv, vv, &options, Par::Seq).unwrap();
            }
            // Uniform over values 0..5: mean 2 (to the rounding of scores near -1e30).
            assert!(
                out[..d].iter().all(|&x| (x - 2.0).abs() < 1e-3),
                "unfused={unfused}: {:?}",
                &out[..d]
            );
            assert!(
                out[d..2 * d].iter().all(|&x| x == 3.0),
                "unfused={unfused}: {:?}",
                &out[d..2 * d]
            );
            assert!(
                out[2 * d..].iter().all(|&x| x == 0.0),
                "unfused={unfused}: {:?}",
                &out[2 * d..]
            );
        }
    }

    #[test]
    fn shape_errors_name_the_tensor() {
        let x = [0.0f32; 64];
        let q = View4::contiguous(&x[..48], [1, 3, 4, 4]).unwrap();
        let k = View4::contiguous(&x[..32], [1, 2, 4, 4]).unwrap();
        let mut o = [0.0f32; 48];
        let err = flash_attention(
            ViewMut4::contiguous(&mut o, [1, 3, 4, 4]).unwrap(),
            None,
            q,
            k,
            k,
            &Default::default(),
            Par::Seq,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::HeadsNotDivisible {
                op: "flash_attention",
                n_heads: 3,
                n_kv_heads: 2
            }
        );
        let k = View4::contiguous(&x[..48], [1, 3, 4, 4]).unwrap();
        let v = View4::contiguous(&x[..36], [1, 3, 3, 4]).unwrap();
        let err = flash_attention(
            ViewMut4::contiguous(&mut o, [1, 3, 4, 4]).unwrap(),
            None,
            q,
            k,
            v,
            &Default::default(),
            Par::Seq,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::ShapeMismatch {
                op: "flash_attention",
                tensor: "v",
                expected: vec![1, 3, 4, 4],
                got: vec![1, 3, 3, 4]
            }
        );
        let lengths = [5usize];
        let options = AttentionOptions {
            key_lengths: Some(&lengths),
            ..Default::default()
        };
        let err = flash_attention(
            ViewMut4::contiguous(&mut o, [1, 3, 4, 4]).unwrap(),
            None,
            q,
            k,
            k,
            &options,
            Par::Seq,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::KeyLengthTooLarge {
                op: "flash_attention",
                batch: 0,
                length: 5,
                n_keys: 4
            }
        );
    }

    /// Query lengths around the row-tile edges (64 rows; 128 and 256 rows, two and four tiles).
    const QUERY_LENGTHS: [usize; 14] = [1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257];
    /// Key lengths around the key-block edges (128 and 256 keys: a partial last block, the
    /// online rescale across blocks), and past `2·MIN_KEYS_PER_SPLIT`, where calls with few
    /// tasks split the keys and merge the partial results.
    const KEY_LENGTHS: [usize; 16] = [
        1, 2, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 1100,
    ];

    fn arb_case() -> impl Strategy<Value = Case> {
        (
            (
                1usize..3,
                prop::sample::select(vec![(1usize, 1usize), (2, 1), (2, 2), (4, 1), (6, 3)]),
            ),
            (
                prop::sample::select(QUERY_LENGTHS.to_vec()),
                prop::sample::select(KEY_LENGTHS.to_vec()),
                prop::sample::select(vec![1usize, 3, 8, 17, 64]),
            ),
            (
                any::<bool>(),
                0usize..3,
                0usize..8,
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |((b, (h, g)), (s, t, d), (bshd, causal, mask, lengths, key_mask, alibi))| {
                    let mut case = Case::new(b, h, g, s, t, d, if d % 2 == 0 { d } else { d + 2 });
                    case.bshd = bshd;
                    case.causal = [Causal::None, Causal::TopLeft, Causal::BottomRight][causal];
                    case.mask = match mask {
                        0 => MaskKind::None,
                        1 => MaskKind::Allowed(MaskShape::Full),
                        2 => MaskKind::Allowed(MaskShape::TwoD),
                        3 => MaskKind::Allowed(MaskShape::Padding),
                        4 => MaskKind::Additive(MaskShape::Full),
                        5 => MaskKind::Additive(MaskShape::TwoD),
                        6 => MaskKind::Disallowed(MaskShape::Full),
                        _ => MaskKind::Additive(MaskShape::Padding),
                    };
                    case.lengths = lengths;
                    case.key_mask = key_mask;
                    case.alibi = alibi;
                    case
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        #[test]
        fn flash_matches_reference_for_every_shape(case in arb_case()) {
            check(case);
        }
    }
}
