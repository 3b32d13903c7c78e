//! One row tile of the online softmax: the query tile, then for each key block the four passes
//! (numbered as in the reference and the unfused path).

use super::bf16::AmxTile;
use super::{row_position, Bf16Source, Operands, Plan, BLOCK_KEYS, BLOCK_ROWS, SCORES_LD};
use crate::buffer::Buffer;
use crate::gemm::gemm_raw;
use crate::mask::mask_row;
use crate::scores::{key_panels, scores_into, tile_scores, Keys, ScoreKernel};
use crate::simd::{exp_sub_sum, row_max, scale_into, scale_row};
use crate::tile::NR;
use crate::{Accum, Par, View4};

/// Per-worker scratch: kept per thread between tasks and calls ([`with_scratch`]), each
/// buffer 64-byte aligned; every element a tile reads it has written first.
pub(super) struct Scratch {
    /// `[BLOCK_ROWS, D]`: the tile's query rows, times the scale.
    pub(super) q_tile: Buffer,
    /// `[BLOCK_ROWS, SCORES_LD]`: scores, then probabilities (`BLOCK_KEYS` used per row).
    pub(super) scores: Buffer,
    /// `[BLOCK_ROWS, Dv_pad]`: the unnormalised output rows.
    pub(super) acc: Buffer,
    /// `[kb_pad / NR, D, NR]`: the key block in transposed panels (when K is not packed).
    pub(super) kt: Buffer,
    /// `[Dv_pad / NR, kb_pad, NR]`: the value block in panels (when V is not packed and cannot
    /// be read in place).
    pub(super) vp: Buffer,
    pub(super) m: Buffer,
    pub(super) l: Buffer,
    /// `[BLOCK_ROWS, D / 2]` words: the scaled query rows rounded to bf16 pairs (bf16 calls;
    /// as A tiles on AMX, `D / 2` rounded up to whole steps).
    pub(super) q16: Buffer,
    /// `[BLOCK_ROWS, SCORES_LD / 2]` words: a block's probabilities rounded to bf16 pairs.
    pub(super) p16: Buffer,
}

impl Scratch {
    fn new(plan: &Plan) -> Self {
        Scratch {
            q_tile: Buffer::zeroed(BLOCK_ROWS * plan.d),
            scores: Buffer::zeroed(BLOCK_ROWS * SCORES_LD),
            acc: Buffer::zeroed(BLOCK_ROWS * plan.dv_pad),
            kt: Buffer::zeroed(plan.d * plan.kb_pad),
            vp: Buffer::zeroed(plan.kb_pad * plan.dv_pad),
            m: Buffer::zeroed(BLOCK_ROWS),
            l: Buffer::zeroed(BLOCK_ROWS),
            q16: Buffer::zeroed(BLOCK_ROWS * q16_words(plan)),
            p16: Buffer::zeroed(BLOCK_ROWS * SCORES_LD / 2),
        }
    }

    /// Whether every buffer is large enough for `plan`.
    fn fits(&self, plan: &Plan) -> bool {
        self.q_tile.len() >= BLOCK_ROWS * plan.d
            && self.acc.len() >= BLOCK_ROWS * plan.dv_pad
            && self.kt.len() >= plan.d * plan.kb_pad
            && self.vp.len() >= plan.kb_pad * plan.dv_pad
            && self.q16.len() >= BLOCK_ROWS * q16_words(plan)
    }
}

/// Words per query row of [`Scratch::q16`]: `D / 2` pairs, rounded up to whole AMX steps.
fn q16_words(plan: &Plan) -> usize {
    super::bf16::key_pairs(plan, true)
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's scratch, made or enlarged for `plan` when needed and kept for
/// the next task or call.
pub(super) fn with_scratch<R>(plan: &Plan, f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut scratch = SCRATCH
        .take()
        .filter(|s| s.fits(plan))
        .unwrap_or_else(|| Scratch::new(plan));
    let result = f(&mut scratch);
    SCRATCH.set(Some(scratch));
    result
}

/// `k: [B, G, T, D]` -> `[B, G, ceil(T / BLOCK_KEYS), kb_pad / NR, D, NR]`: each key block
/// transposed into panels of [`NR`] keys, contiguous along `D`, zero past `T`. The buffer comes
/// from this thread's pool ([`crate::buffer::take`]); hand it back with `buffer::give`.
pub(crate) fn pack_keys_transposed(plan: &Plan, k: &View4<'_, f32>, par: Par) -> Buffer {
    super::pack::pack_blocks(plan, k, plan.d * plan.kb_pad, par, |dst, keys, bc, [row, col]| {
        key_panels(dst, keys, bc, plan.d, row, col)
    })
}

/// `v: [B, G, T, Dv]` -> `[B, G, ceil(T / BLOCK_KEYS), Dv_pad / NR, kb_pad, NR]`: each value
/// block in panels of [`NR`] columns, contiguous along the keys, zero past `Dv`. Rows past a
/// block's last key are left as they were (the products never read them).
pub(crate) fn pack_values(plan: &Plan, v: &View4<'_, f32>, par: Par) -> Buffer {
    super::pack::pack_blocks(plan, v, plan.dv_pad * plan.kb_pad, par, |dst, values, bc, strides| {
        value_panels(dst, plan.kb_pad, values, bc, plan.dv, strides)
    })
}

/// `bc` value rows (`values[j·strides[0] + c·strides[1]]`, `c < dv`) into panels of [`NR`]
/// columns: `dst[(c / NR)·ld·NR + j·NR + c % NR]`, zero for `c` from `dv` up to the next
/// multiple of [`NR`].
fn value_panels(dst: &mut [f32], ld: usize, values: &[f32], bc: usize, dv: usize, strides: [usize; 2]) {
    if bc == 0 {
        return;
    }
    let panels = dv.div_ceil(NR);
    assert!(bc <= ld && dst.len() >= panels * ld * NR && values.len() > (bc - 1) * strides[0] + (dv - 1) * strides[1]);
    for panel in 0..panels {
        let (c0, n) = (panel * NR, (dv - panel * NR).min(NR));
        let out = &mut dst[panel * ld * NR..];
        for j in 0..bc {
            let row = &mut out[j * NR..(j + 1) * NR];
            let src = j * strides[0] + c0 * strides[1];
            if strides[1] == 1 {
                row[..n].copy_from_slice(&values[src..src + n]);
            } else {
                row[..n]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(c, x)| *x = values[src + c * strides[1]]);
            }
            row[n..].fill(0.0);
        }
    }
}

/// The tile's fixed indices and rows: batch `b`, key/value head `g`, `n_rows` stacked query rows
/// with their `(s, h)` and each row's key limit (causal, key length).
struct TileRows {
    b: usize,
    g: usize,
    n_rows: usize,
    positions: [(usize, usize); BLOCK_ROWS],
    limits: [usize; BLOCK_ROWS],
}

/// One key block `[t0, t0 + bc)` and the offset of its first value.
struct KeyBlock {
    t0: usize,
    bc: usize,
    v_base: usize,
}

/// Runs the online softmax of one row tile over keys `keys`, leaving the unnormalised
/// accumulator in `scratch.acc`, the running max in `scratch.m` and the running sum in
/// `scratch.l`. Returns the number of rows in the tile.
pub(super) fn attend_tile(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    [b, g, tile]: [usize; 3],
    keys: std::ops::Range<usize>,
) -> usize {
    let rows = load_query_tile(scratch, plan, ops, [b, g, tile]);
    let n_rows = rows.n_rows;
    scratch.m[..n_rows].fill(f32::NEG_INFINITY);
    scratch.l[..n_rows].fill(0.0);
    scratch.acc[..n_rows * plan.dv_pad].fill(0.0);

    // Keys that no row of the tile may see are never visited.
    let max_limit = rows.limits[..n_rows].iter().copied().max().unwrap_or(0);
    let t_end = keys.end.min(max_limit);
    let v_st = ops.v.strides();
    let mut amx = AmxTile::default();
    let mut t0 = keys.start;
    while t0 < t_end {
        let bc = (t_end - t0).min(BLOCK_KEYS);
        let block = KeyBlock {
            t0,
            bc,
            v_base: b * v_st[0] + g * v_st[1] + t0 * v_st[2],
        };
        pass1_scores(scratch, plan, ops, &rows, &block, &mut amx);
        passes2_3_online_softmax(scratch, plan, ops, &rows, &block);
        pass4_weighted_values(scratch, plan, ops, &rows, &block, &mut amx);
        t0 += bc;
    }
    n_rows
}

/// Packs the tile's query rows, pre-multiplied by the scale, and sets each row's key limit.
fn load_query_tile(scratch: &mut Scratch, plan: &Plan, ops: &Operands<'_, '_>, [b, g, tile]: [usize; 3]) -> TileRows {
    let (q, options, d) = (ops.q, ops.options, plan.d);
    let r0 = tile * BLOCK_ROWS;
    let n_rows = (plan.rows_per_group - r0).min(BLOCK_ROWS);
    let key_length = options.key_lengths.map_or(plan.t, |lengths| lengths[b]);
    let mut rows = TileRows {
        b,
        g,
        n_rows,
        positions: [(0, 0); BLOCK_ROWS],
        limits: [0; BLOCK_ROWS],
    };
    let q_data = q.data();
    for i in 0..n_rows {
        let (s, h) = row_position(plan, g, r0 + i);
        rows.positions[i] = (s, h);
        rows.limits[i] = options.causal.key_limit(s, plan.s, plan.t).min(key_length);
        let dst = &mut scratch.q_tile[i * d..(i + 1) * d];
        let base = q.offset([b, h, s, 0]);
        if q.strides()[3] == 1 {
            scale_into(dst, &q_data[base..base + d], ops.scale);
        } else {
            let st = q.strides()[3];
            dst.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = q_data[base + j * st] * ops.scale);
        }
        match ops.bf16 {
            // On AMX: A tiles, all rows at once below.
            Some(Bf16Source::Packed(..)) if ops.amx => {}
            Some(Bf16Source::Packed(..)) => {
                let pairs = d.div_ceil(2);
                super::bf16::convert_row(dst, &mut scratch.q16[i * pairs..(i + 1) * pairs]);
            }
            // Decoding's kernels multiply rounded f32 values.
            Some(Bf16Source::InPlace) => dst.iter_mut().for_each(|x| *x = crate::round_to_bf16(*x)),
            None => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if ops.amx {
        AmxTile::pack(&scratch.q_tile, [n_rows, d, d], &mut scratch.q16);
    }
    rows
}

/// Pass 1: `scores = q_tile · k_blockᵀ`, `[n_rows, bc]` in `scratch.scores` (row stride
/// `SCORES_LD`).
fn pass1_scores(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    amx: &mut AmxTile,
) {
    if let Some(source) = ops.bf16 {
        bf16_scores(scratch, plan, ops, rows, block, source, amx);
        return;
    }
    let keys = KeySource {
        k: ops.k,
        kt_packed: ops.kt_packed,
        kernel: ops.score_kernel,
    };
    let tile = ScoreTile {
        scores: &mut scratch.scores,
        q_tile: &scratch.q_tile,
        kt_scratch: &mut scratch.kt,
        n_rows: rows.n_rows,
    };
    block_scores(tile, plan, &keys, [rows.b, rows.g, block.t0, block.bc]);
}

/// Where a key block's scores come from: `k: [B, G, T, D]`, K transposed once for the call
/// when packed ([`pack_keys_transposed`]), and the call's score kernel.
pub(crate) struct KeySource<'a> {
    pub k: View4<'a, f32>,
    pub kt_packed: Option<&'a [f32]>,
    pub kernel: ScoreKernel,
}

/// The buffers of one tile's pass 1: `scores: [BLOCK_ROWS, SCORES_LD]`, the scaled query rows
/// `q_tile: [n_rows, D]`, and room `[kb_pad / NR, D, NR]` to transpose a key block into panels
/// when K is not packed.
pub(crate) struct ScoreTile<'a> {
    pub scores: &'a mut [f32],
    pub q_tile: &'a [f32],
    pub kt_scratch: &'a mut [f32],
    pub n_rows: usize,
}

/// Pass 1 for one key block of `(b, g)`: `scores[i, j] = q_tile[i] · k[b, g, t0 + j]` for
/// `i < n_rows`, `j < bc`. The flash kernel and [`crate::attention_weights`] share it.
pub(crate) fn block_scores(tile: ScoreTile<'_>, plan: &Plan, keys: &KeySource<'_>, [b, g, t0, bc]: [usize; 4]) {
    let ScoreTile {
        scores,
        q_tile,
        kt_scratch,
        n_rows,
    } = tile;
    let d = plan.d;
    let (k_data, k_st) = (keys.k.data(), keys.k.strides());
    let k_base = b * k_st[0] + g * k_st[1] + t0 * k_st[2];
    assert!(scores.len() >= BLOCK_ROWS * SCORES_LD && q_tile.len() >= n_rows * d && n_rows <= BLOCK_ROWS);
    if keys.kernel != ScoreKernel::Tile {
        // Decoding's dot products against the keys in place, or the portable sum: the same
        // function the backward recomputes its scores with (`crate::scores`).
        let block = Keys {
            keys: &k_data[k_base..],
            row_stride: k_st[2],
            col_stride: k_st[3],
            bc,
        };
        scores_into(
            keys.kernel,
            scores,
            SCORES_LD,
            q_tile,
            [n_rows, d],
            block,
            &mut Vec::new(),
        );
        return;
    }
    let kt: &[f32] = match keys.kt_packed {
        Some(packed) => {
            let blocks = plan.t.div_ceil(BLOCK_KEYS);
            let index = (b * plan.g + g) * blocks + t0 / BLOCK_KEYS;
            &packed[index * d * plan.kb_pad..(index + 1) * d * plan.kb_pad]
        }
        None => {
            key_panels(kt_scratch, &k_data[k_base..], bc, d, k_st[2], k_st[3]);
            &*kt_scratch
        }
    };
    // The same function the backward recomputes its scores with.
    tile_scores(scores, SCORES_LD, q_tile, [n_rows, d], kt, bc);
}

/// The end of pass 1 (the mask) and passes 2 and 3 for each row: row max,
/// `p = exp(scores - m_new)` and its sum, the online update `l = l·exp(m_old - m_new) + sum(p)`;
/// then the accumulator row rescaled by `exp(m_old - m_new)` (skipped while the max holds).
fn passes2_3_online_softmax(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
) {
    let (dv, dv_pad) = (plan.dv, plan.dv_pad);
    let KeyBlock { t0, bc, .. } = *block;
    for i in 0..rows.n_rows {
        let row = &mut scratch.scores[i * SCORES_LD..i * SCORES_LD + bc];
        let (s, h) = rows.positions[i];
        // Pass 1, continued: the mask.
        mask_row(row, ops.options, [rows.b, h, s], t0, rows.limits[i], [plan.s, plan.t]);
        // Pass 2: row max, exp and sum.
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
            if ops.amx {
                super::bf16::row_into_tiles(row, i, &mut scratch.p16);
            }
            continue;
        }
        // On AMX the probabilities go straight into pass 4's A tiles, rounded.
        let sum = if ops.amx {
            super::bf16::exp_sub_sum_into_tiles(row, m_new, i, &mut scratch.p16)
        } else {
            exp_sub_sum(row, m_new)
        };
        if ops.round_p {
            // bf16 without the instructions: `P·V` multiplies the rounded probabilities (the
            // sum keeps them unrounded, as at the AVX512-BF16 level).
            row.iter_mut().for_each(|p| *p = crate::round_to_bf16(*p));
        }
        let alpha = crate::simd::exp_scalar(m_old - m_new);
        scratch.l[i] = scratch.l[i] * alpha + sum;
        scratch.m[i] = m_new;
        // Pass 3: rescale the accumulator row.
        if alpha != 1.0 {
            scale_row(&mut scratch.acc[i * dv_pad..i * dv_pad + dv], alpha);
        }
    }
}

/// Pass 4: `acc += p · v_block`.
fn pass4_weighted_values(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    amx: &mut AmxTile,
) {
    let (dv, dv_pad, n_rows) = (plan.dv, plan.dv_pad, rows.n_rows);
    let KeyBlock { bc, v_base, .. } = *block;
    let (v_data, v_st) = (ops.v.data(), ops.v.strides());
    if let Some(source) = ops.bf16 {
        bf16_weighted_values(scratch, plan, ops, rows, block, source, amx);
        return;
    }
    if !ops.micro {
        // SAFETY: `acc` holds BLOCK_ROWS×Dv_pad elements; the value block was bounds-checked
        // with `v`.
        unsafe {
            gemm_raw(
                scratch.acc.as_mut_ptr(),
                [dv_pad, 1],
                [n_rows, dv, bc],
                Accum::Add,
                scratch.scores.as_ptr(),
                [SCORES_LD, 1],
                v_data.as_ptr().add(v_base),
                [v_st[2], v_st[3]],
                1.0,
                Par::Seq,
            )
        };
        return;
    }
    let n_rows_decode = n_rows <= crate::tile::DECODE_ROWS_MAX;
    // Where the value block comes from, as `(pointer, ldb, b_panel)` for the micro-kernel:
    // packed once for the call, in place (contiguous rows, a multiple of the kernel width
    // wide), or packed here into panels.
    let (v_ptr, ldv, v_panel) = if let Some(packed) = ops.v_packed {
        let blocks = plan.t.div_ceil(BLOCK_KEYS);
        let index = (rows.b * plan.g + rows.g) * blocks + block.t0 / BLOCK_KEYS;
        let len = plan.kb_pad * dv_pad;
        let block_values = &packed[index * len..(index + 1) * len];
        (block_values.as_ptr(), NR, plan.kb_pad * NR)
    } else if v_st[3] == 1 && dv == dv_pad {
        // The kernel reads `bc` rows of `Dv_pad` values in place: check that extent.
        assert!(
            v_base + (bc - 1) * v_st[2] + dv_pad <= v_data.len(),
            "value block past V"
        );
        (v_data.as_ptr().wrapping_add(v_base), v_st[2], NR)
    } else {
        value_panels(
            &mut scratch.vp,
            plan.kb_pad,
            &v_data[v_base..],
            bc,
            dv,
            [v_st[2], v_st[3]],
        );
        (scratch.vp.as_ptr(), NR, plan.kb_pad * NR)
    };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a vector level (AVX2+FMA, or AVX-512 with them) was detected; `scores` is
    // [n_rows, SCORES_LD] with `bc` valid columns, the value block (`bc` rows of `Dv_pad`
    // values, in place with row stride `ldv`, or in panels: bounds-checked with `v` or sized
    // by the plan) and `acc` is [BLOCK_ROWS, Dv_pad].
    unsafe {
        if n_rows_decode && v_panel == NR {
            // A few rows against values read in place: one pass over the rows, in order.
            crate::tile::axpy_rows(
                n_rows,
                dv_pad,
                bc,
                scratch.scores.as_ptr(),
                SCORES_LD,
                v_ptr,
                ldv,
                scratch.acc.as_mut_ptr(),
                dv_pad,
            )
        } else {
            crate::tile::gemm::<true>(
                n_rows,
                dv_pad,
                bc,
                scratch.scores.as_ptr(),
                SCORES_LD,
                v_ptr,
                ldv,
                v_panel,
                scratch.acc.as_mut_ptr(),
                dv_pad,
            )
        }
    };
}

/// Pass 1 on `vdpbf16ps` or AMX: the tile's query pairs against the key block, packed or in
/// place.
fn bf16_scores(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    source: Bf16Source<'_>,
    amx: &mut AmxTile,
) {
    let key_len = super::bf16::key_block_len(plan, ops.amx);
    #[cfg(target_arch = "x86_64")]
    if let (true, Bf16Source::Packed(kt16, _)) = (ops.amx, source) {
        let kt = super::bf16::packed_block(kt16, key_len, plan, [rows.b, rows.g, block.t0]);
        amx.scores(plan, &scratch.q16, [rows.n_rows, block.bc], kt, &mut scratch.scores);
        return;
    }
    let _ = amx;
    let pairs = plan.d.div_ceil(2);
    assert!(
        scratch.q16.len() >= rows.n_rows * pairs
            && scratch.q_tile.len() >= rows.n_rows * plan.d
            && scratch.scores.len() >= BLOCK_ROWS * SCORES_LD
    );
    let (k_data, k_st) = (ops.k.data(), ops.k.strides());
    let k_base = rows.b * k_st[0] + rows.g * k_st[1] + block.t0 * k_st[2];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `ops.bf16` is set only at the detected AVX512-BF16 level; `scores` is
    // `[BLOCK_ROWS, SCORES_LD]` with `bc <= SCORES_LD`. Packed: `q16` holds the tile's rows of
    // `pairs` words, `kt` the block's `kb_pad / 16` panels of `pairs · 16` words (`bc <=
    // kb_pad`). In place: at most `DECODE_ROWS_MAX` rows of `D` rounded values in `q_tile`,
    // and the block's `bc` keys of `D` contiguous values lie inside K (checked).
    unsafe {
        match source {
            Bf16Source::Packed(kt16, _) => {
                let kt = super::bf16::packed_block(kt16, key_len, plan, [rows.b, rows.g, block.t0]);
                crate::bf16::avx512bf16::tile::<false>(
                    rows.n_rows,
                    block.bc,
                    pairs,
                    scratch.q16.as_ptr().cast(),
                    pairs,
                    kt.as_ptr().cast(),
                    pairs * 16,
                    scratch.scores.as_mut_ptr(),
                    SCORES_LD,
                )
            }
            Bf16Source::InPlace => {
                assert!(
                    k_base + (block.bc - 1) * k_st[2] + plan.d <= k_data.len(),
                    "key block past K"
                );
                super::bf16::x86::dot_rows(
                    rows.n_rows,
                    plan.d,
                    scratch.q_tile.as_ptr(),
                    plan.d,
                    k_data.as_ptr().add(k_base),
                    k_st[2],
                    block.bc,
                    scratch.scores.as_mut_ptr(),
                    SCORES_LD,
                )
            }
        }
    };
    let _ = (k_data, k_base, source);
}

/// Pass 4 on `vdpbf16ps` or AMX: the probabilities rounded into rows of pairs (A tiles on
/// AMX), then `acc += P · V` against the value block, packed or in place.
fn bf16_weighted_values(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    source: Bf16Source<'_>,
    amx: &mut AmxTile,
) {
    let (dv, dv_pad, n_rows) = (plan.dv, plan.dv_pad, rows.n_rows);
    let KeyBlock { bc, v_base, .. } = *block;
    let value_len = super::bf16::value_block_len(plan, ops.amx);
    #[cfg(target_arch = "x86_64")]
    if let (true, Bf16Source::Packed(_, v16)) = (ops.amx, source) {
        // The probabilities are in `p16` already (`passes2_3_online_softmax`).
        let vp = super::bf16::packed_block(v16, value_len, plan, [rows.b, rows.g, block.t0]);
        amx.weighted_values(plan, &scratch.p16, [n_rows, bc], vp, &mut scratch.acc);
        return;
    }
    let _ = amx;
    let (lda, pairs) = (SCORES_LD / 2, bc.div_ceil(2));
    if let Bf16Source::Packed(..) = source {
        for i in 0..n_rows {
            let row = &scratch.scores[i * SCORES_LD..i * SCORES_LD + bc];
            super::bf16::convert_row(row, &mut scratch.p16[i * lda..i * lda + pairs]);
        }
    }
    assert!(scratch.acc.len() >= n_rows * dv_pad && scratch.p16.len() >= BLOCK_ROWS * lda);
    let (v_data, v_st) = (ops.v.data(), ops.v.strides());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `ops.bf16` is set only at the detected AVX512-BF16 level; `acc` is
    // `[BLOCK_ROWS, Dv_pad]`. Packed: `p16` holds the tile's rows of `pairs <= lda` words (an
    // odd block's last pair ends in a zero), `vp` the block's `Dv_pad / 16` panels of
    // `kb_pad / 2 · 16` words (`pairs <= kb_pad / 2`). In place: at most `DECODE_ROWS_MAX`
    // rows of `bc` rounded probabilities in `scores`, and the block's `bc` value rows of `Dv`
    // contiguous values lie inside V (checked).
    unsafe {
        match source {
            Bf16Source::Packed(_, v16) => {
                let vp = super::bf16::packed_block(v16, value_len, plan, [rows.b, rows.g, block.t0]);
                crate::bf16::avx512bf16::tile::<true>(
                    n_rows,
                    dv,
                    pairs,
                    scratch.p16.as_ptr().cast(),
                    lda,
                    vp.as_ptr().cast(),
                    plan.kb_pad / 2 * 16,
                    scratch.acc.as_mut_ptr(),
                    dv_pad,
                )
            }
            Bf16Source::InPlace => {
                assert!(v_base + (bc - 1) * v_st[2] + dv <= v_data.len(), "value block past V");
                super::bf16::x86::axpy_rows(
                    n_rows,
                    dv,
                    bc,
                    scratch.scores.as_ptr(),
                    SCORES_LD,
                    v_data.as_ptr().add(v_base),
                    v_st[2],
                    scratch.acc.as_mut_ptr(),
                    dv_pad,
                )
            }
        }
    };
    let _ = (v_data, v_st, source, v_base);
}
