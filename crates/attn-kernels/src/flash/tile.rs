//! One row tile of the online softmax: the query tile, then for each key block the four passes
//! (numbered as in the reference and the unfused path).

use super::pack::{self, pack_blocks, Packer};
use super::scratch::{KeyBlock, Scratch, TileRows};
use super::tile_bf16::AmxTile;
use super::tile_blocks::{
    key_block_len, packed_key_block, packed_value_block, panel_scores, row_max_pass_forced, value_block_len,
};
use super::tile_values::value_panels;
use super::{row_position, Bf16Source, Kv, Operands, Plan, BLOCK_ROWS, P16_LD};
use crate::buffer::Buffer;
use crate::gemm::gemm_raw;
use crate::mask::{mask_row, shapes_rows};
use crate::scores::{key_panels, key_panels_stored, scores_into, Keys, ScoreKernel};
use crate::simd::{exp_sub_sum, row_max, scale_into, scale_row};
use crate::tile::{Bf16Bits, Bf16Rounded, F32Values, Stored, NR};
use crate::{Accum, Par, View4};

/// `k: [B, G, T, D]` -> `[B, G, ceil(T / block_keys), kb_pad / NR, D, NR]`: each key block
/// transposed into panels of [`NR`] keys, contiguous along `D`, zero past `T`. The buffer comes
/// from this thread's pool ([`crate::buffer::take`]); hand it back with `buffer::give`.
pub(crate) fn pack_keys_transposed(plan: &Plan, k: &View4<'_, f32>, par: Par) -> Buffer {
    pack_keys_rounded(plan, Kv::F32(*k), false, par)
}

/// Runs `$body` with `$x` the view inside `$kv` and `$packer` the packer of its blocks:
/// `$f32_packer(plan, round)` for f32 values, `$bits_packer::<S>(plan)` for bf16 bits, `S`
/// widening them exactly or, when `round`, as rounding their values gives ([`Bf16Rounded`]).
macro_rules! with_packer {
    ($kv:expr, $round:expr, $plan:expr, $f32_packer:ident, $bits_packer:ident, |$x:ident, $packer:ident| $body:expr) => {
        match ($kv, $round) {
            (Kv::F32($x), round) => {
                let $packer = $f32_packer($plan, round);
                $body
            }
            (Kv::Bits($x), false) => {
                let $packer = $bits_packer::<Bf16Bits>($plan);
                $body
            }
            (Kv::Bits($x), true) => {
                let $packer = $bits_packer::<Bf16Rounded>($plan);
                $body
            }
        }
    };
}

/// [`pack_keys_transposed`] of f32 keys or of bf16 bits (widened as they are packed), each
/// block's values rounded to bf16 when `round` (f32 values after the block is packed, bits as
/// they are widened: [`Bf16Rounded`]).
pub(super) fn pack_keys_rounded(plan: &Plan, k: Kv<'_>, round: bool, par: Par) -> Buffer {
    let len = key_block_len(plan);
    with_packer!(k, round, plan, key_packer, key_bits_packer, |k, packer| {
        pack_blocks(plan, &k, len, par, packer)
    })
}

/// `v: [B, G, T, Dv]` -> `[B, G, ceil(T / block_keys), Dv_pad / NR, kb_pad, NR]`: each value
/// block in panels of [`NR`] columns, contiguous along the keys, zero past `Dv`. Rows past a
/// block's last key are left as they were (the products never read them). f32 values or bf16
/// bits, rounded as [`pack_keys_rounded`] rounds keys when `round`.
pub(super) fn pack_values_rounded(plan: &Plan, v: Kv<'_>, round: bool, par: Par) -> Buffer {
    let len = value_block_len(plan);
    with_packer!(v, round, plan, value_packer, value_bits_packer, |v, packer| {
        pack_blocks(plan, &v, len, par, packer)
    })
}

/// The K and V of `(b, g)` alone into `keys` and `values`: the words of [`pack_keys_rounded`]
/// and [`pack_values_rounded`] in that `(b, g)`'s part.
pub(super) fn pack_group(
    plan: &Plan,
    [k, v]: [Kv<'_>; 2],
    round: bool,
    bg: [usize; 2],
    [keys, values]: [&mut [f32]; 2],
) {
    let (key_len, value_len) = (key_block_len(plan), value_block_len(plan));
    with_packer!(k, round, plan, key_packer, key_bits_packer, |k, packer| {
        pack::pack_group(plan, &k, key_len, bg, keys, packer)
    });
    with_packer!(v, round, plan, value_packer, value_bits_packer, |v, packer| {
        pack::pack_group(plan, &v, value_len, bg, values, packer)
    });
}

/// One key block of f32 values as [`pack_keys_rounded`] packs it.
fn key_packer(plan: &Plan, round: bool) -> impl Packer<f32> + '_ {
    move |dst, keys, bc, [row, col]| {
        key_panels(dst, keys, bc, plan.d, row, col);
        if round {
            crate::bf16::round_in_place(dst);
        }
    }
}

/// One key block of bf16 bits as [`pack_keys_rounded`] packs it, converted as `S` loads them.
fn key_bits_packer<S: Stored<Elem = u16>>(plan: &Plan) -> impl Packer<u16> + '_ {
    move |dst, keys, bc, [row, col]| key_panels_stored::<S>(dst, keys, bc, plan.d, row, col)
}

/// One value block of f32 values as [`pack_values_rounded`] packs it.
fn value_packer(plan: &Plan, round: bool) -> impl Packer<f32> + '_ {
    move |dst, values, bc, strides| {
        value_panels::<F32Values>(dst, plan.kb_pad, values, bc, plan.dv, strides);
        if round {
            crate::bf16::round_in_place(dst);
        }
    }
}

/// One value block of bf16 bits as [`pack_values_rounded`] packs it, converted as `S` loads
/// them.
fn value_bits_packer<S: Stored<Elem = u16>>(plan: &Plan) -> impl Packer<u16> + '_ {
    move |dst, values, bc, strides| value_panels::<S>(dst, plan.kb_pad, values, bc, plan.dv, strides)
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

    // Keys that no row of the tile may see are never visited.
    let max_limit = rows.limits[..n_rows].iter().copied().max().unwrap_or(0);
    let t_end = keys.end.min(max_limit);
    let v_st = ops.v.strides();
    let mut amx = AmxTile::default();
    let mut t0 = keys.start;
    while t0 < t_end {
        let bc = (t_end - t0).min(plan.block_keys);
        let block = KeyBlock {
            t0,
            bc,
            v_base: b * v_st[0] + g * v_st[1] + t0 * v_st[2],
            first: t0 == keys.start,
        };
        let maxes = pass1_scores(scratch, plan, ops, &rows, &block, &mut amx);
        passes2_3_online_softmax(scratch, plan, ops, &rows, &block, maxes);
        pass4_weighted_values(scratch, plan, ops, &rows, &block, &mut amx);
        t0 += bc;
    }
    if t_end <= keys.start {
        // No block visited: the accumulator of rows that see nothing is zero.
        scratch.acc[..n_rows * plan.dv_pad].fill(0.0);
    }
    if ops.keep_scores {
        // Keys past the last visited block are hidden from every row of the tile.
        for i in 0..n_rows {
            scratch.kept[i * plan.t + t_end.max(keys.start)..(i + 1) * plan.t].fill(f32::NEG_INFINITY);
        }
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
        let base = q.offset([b, h, s, 0]);
        if ops.amx && q.strides()[3] == 1 {
            // Scaled and rounded straight into A tiles (the bits of scaling, then rounding).
            super::bf16::row_into_tiles(&q_data[base..base + d], ops.scale, i, &mut scratch.q16);
            continue;
        }
        if matches!(ops.bf16, Some(Bf16Source::Packed(..))) && !ops.round_q && q.strides()[3] == 1 {
            // Scaled and rounded straight into rows of pairs (the bits of scaling, then rounding).
            let pairs = d.div_ceil(2);
            super::bf16::scaled_row_into_pairs(
                &q_data[base..base + d],
                ops.scale,
                &mut scratch.q16[i * pairs..(i + 1) * pairs],
            );
            continue;
        }
        let dst = &mut scratch.q_tile[i * d..(i + 1) * d];
        if q.strides()[3] == 1 {
            scale_into(dst, &q_data[base..base + d], ops.scale);
        } else {
            let st = q.strides()[3];
            dst.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = q_data[base + j * st] * ops.scale);
        }
        if ops.round_q {
            crate::bf16::round_in_place(dst);
        }
        match ops.bf16 {
            // On AMX: the row of A tiles (contiguous rows were rounded straight from Q above).
            Some(Bf16Source::Packed(..)) if ops.amx => super::bf16::row_into_tiles(dst, 1.0, i, &mut scratch.q16),
            Some(Bf16Source::Packed(..)) => {
                let pairs = d.div_ceil(2);
                super::bf16::convert_row(dst, &mut scratch.q16[i * pairs..(i + 1) * pairs]);
            }
            // Decoding's kernels multiply rounded f32 values.
            Some(Bf16Source::InPlace) => dst.iter_mut().for_each(|x| *x = crate::round_to_bf16(*x)),
            None => {}
        }
    }
    rows
}

/// Pass 1: `scores = q_tile · k_blockᵀ`, `[n_rows, bc]` in `scratch.scores` (row stride
/// `plan.scores_ld`). Returns whether it also left each row's maximum in `scratch.maxes`
/// ([`block_scores`]).
fn pass1_scores(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    amx: &mut AmxTile,
) -> bool {
    if let Some(source) = ops.bf16 {
        super::tile_bf16::bf16_scores(scratch, plan, ops, rows, block, source, amx);
        return false;
    }
    if super::tile_convert::converts(ops) {
        return super::tile_convert::scores(scratch, plan, ops, rows, block);
    }
    let keys = KeySource {
        k: ops.k.f32(),
        kt_packed: ops.kt_packed,
        per_group: ops.packed_per_group.is_some(),
        kernel: ops.score_kernel,
    };
    let tile = ScoreTile {
        scores: &mut scratch.scores,
        q_tile: &scratch.q_tile,
        kt_scratch: &mut scratch.kt,
        n_rows: rows.n_rows,
        maxes: (!row_max_pass_forced()).then_some(&mut scratch.maxes[..]),
    };
    block_scores(tile, plan, &keys, [rows.b, rows.g, block.t0, block.bc])
}

/// Where a key block's scores come from: `k: [B, G, T, D]`, K transposed once for the call
/// when packed ([`pack_keys_transposed`]), and the call's score kernel.
pub(crate) struct KeySource<'a> {
    pub k: View4<'a, f32>,
    pub kt_packed: Option<&'a [f32]>,
    /// Whether `kt_packed` holds the keys of the tile's `(b, g)` alone (packed per `(b, g)`).
    pub per_group: bool,
    pub kernel: ScoreKernel,
}

/// The buffers of one tile's pass 1: `scores: [BLOCK_ROWS, plan.scores_ld]`, the scaled query rows
/// `q_tile: [n_rows, D]`, room `[kb_pad / NR, D, NR]` to transpose a key block into panels
/// when K is not packed, and optionally `[BLOCK_ROWS, max_lanes]` for the rows' maxima.
pub(crate) struct ScoreTile<'a> {
    pub scores: &'a mut [f32],
    pub q_tile: &'a [f32],
    pub kt_scratch: &'a mut [f32],
    pub n_rows: usize,
    pub maxes: Option<&'a mut [f32]>,
}

/// Pass 1 for one key block of `(b, g)`: `scores[i, j] = q_tile[i] · k[b, g, t0 + j]` for
/// `i < n_rows`, `j < bc`. The flash kernel and [`crate::attention_weights`] share it. With
/// `maxes`, on the tile kernel and a whole number of its panels (`bc` a multiple of [`NR`], so
/// no padding column takes part), each row's maximum over the block is also left in the
/// row's `max_lanes` lanes of `maxes` ([`tile_scores`]); returns whether it was.
pub(crate) fn block_scores(tile: ScoreTile<'_>, plan: &Plan, keys: &KeySource<'_>, [b, g, t0, bc]: [usize; 4]) -> bool {
    let ScoreTile {
        scores,
        q_tile,
        kt_scratch,
        n_rows,
        maxes,
    } = tile;
    let d = plan.d;
    let (k_data, k_st) = (keys.k.data(), keys.k.strides());
    let k_base = b * k_st[0] + g * k_st[1] + t0 * k_st[2];
    let ld = plan.scores_ld;
    assert!(
        scores.len() >= BLOCK_ROWS * ld && q_tile.len() >= n_rows * d && n_rows <= BLOCK_ROWS && bc <= plan.block_keys
    );
    if keys.kernel != ScoreKernel::Tile {
        // Decoding's dot products against the keys in place, or the portable sum: the same
        // function the backward recomputes its scores with (`crate::scores`).
        let block = Keys {
            keys: &k_data[k_base..],
            row_stride: k_st[2],
            col_stride: k_st[3],
            bc,
        };
        scores_into(keys.kernel, scores, ld, q_tile, [n_rows, d], block, &mut Vec::new());
        return false;
    }
    let kt: &[f32] = match keys.kt_packed {
        Some(packed) => packed_key_block(plan, packed, keys.per_group, [b, g, t0]),
        None => {
            key_panels(kt_scratch, &k_data[k_base..], bc, d, k_st[2], k_st[3]);
            &*kt_scratch
        }
    };
    // The same function the backward recomputes its scores with (the same bits with the
    // maxima).
    panel_scores(scores, plan, q_tile, n_rows, maxes, kt, bc)
}

/// The end of pass 1 (the mask) and passes 2 and 3 for each row: row max,
/// `p = exp(scores - m_new)` and its sum, the online update `l = l·exp(m_old - m_new) + sum(p)`;
/// then the accumulator row rescaled by `exp(m_old - m_new)` (skipped while the max holds).
///
/// Each step runs over every row of the tile before the next begins: a row's max, `exp`, sum
/// and update form one chain of dependent reductions, and rows side by side let the core
/// overlap them (the arithmetic of each row is the same as row by row).
fn passes2_3_online_softmax(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    maxes: bool,
) {
    let (dv, dv_pad, n_rows) = (plan.dv, plan.dv_pad, rows.n_rows);
    let KeyBlock { t0, bc, .. } = *block;
    let ld = plan.scores_ld;
    let row_range = |i: usize| i * ld..i * ld + bc;
    // Pass 1, continued: the mask (no call for a row it would leave as it is); pass 2's row max.
    let shapes = shapes_rows(ops.options);
    let mut m_new = [f32::NEG_INFINITY; BLOCK_ROWS];
    for (i, m) in m_new[..n_rows].iter_mut().enumerate() {
        let row = &mut scratch.scores[row_range(i)];
        let (s, h) = rows.positions[i];
        let masked = shapes || t0 + bc > rows.limits[i];
        if masked {
            mask_row(row, ops.options, [rows.b, h, s], t0, rows.limits[i], [plan.s, plan.t]);
        }
        if ops.keep_scores {
            scratch.kept[i * plan.t + t0..i * plan.t + t0 + bc].copy_from_slice(row);
        }
        // Pass 1's maxima hold for a row the mask left as it was (the same maximum; NaN may
        // win or not either way, and a NaN row comes out NaN).
        let row_m = if maxes && !masked {
            let lanes = crate::tile::max_lanes();
            scratch.maxes[i * lanes..(i + 1) * lanes]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
        } else {
            row_max(row)
        };
        *m = scratch.m[i].max(row_m);
    }
    // Pass 2: exp and sum.
    let mut sums = [0.0f32; BLOCK_ROWS];
    let packed_bf16 = matches!(ops.bf16, Some(Bf16Source::Packed(..)));
    for i in 0..n_rows {
        let row = &mut scratch.scores[row_range(i)];
        if m_new[i] == f32::NEG_INFINITY {
            if row.iter().any(|x| x.is_nan()) {
                // Only NaN scores besides hidden keys (a NaN query, say): the row is NaN.
                scratch.l[i] = f32::NAN;
                row.fill(f32::NAN);
            } else {
                // Nothing visible yet in this row: contribute nothing.
                row.fill(0.0);
            }
            if ops.amx {
                super::bf16::row_into_tiles(row, 1.0, i, &mut scratch.p16);
            } else if packed_bf16 {
                super::bf16::convert_row(row, &mut scratch.p16[i * P16_LD..(i + 1) * P16_LD]);
            }
            continue;
        }
        // With bf16 operands the probabilities go straight into pass 4's left operand,
        // rounded: A tiles on AMX, rows of pairs at the AVX512-BF16 level.
        sums[i] = if ops.amx {
            super::bf16::exp_sub_sum_into_tiles(row, m_new[i], i, &mut scratch.p16)
        } else if packed_bf16 {
            super::bf16::exp_sub_sum_into_pairs(row, m_new[i], &mut scratch.p16[i * P16_LD..(i + 1) * P16_LD])
        } else {
            exp_sub_sum(row, m_new[i])
        };
        if ops.round_p {
            // bf16 without the instructions: `P·V` multiplies the rounded probabilities (the
            // sum keeps them unrounded, as at the AVX512-BF16 level).
            crate::bf16::round_in_place(row);
        }
    }
    // The online update and pass 3, the accumulator's rescaling.
    for i in 0..n_rows {
        if m_new[i] == f32::NEG_INFINITY {
            continue;
        }
        // `exp(0)` is exactly 1: a finite max usually holds, and then the scalar `exp`'s chain of
        // dependent operations is skipped.
        let m_old = scratch.m[i];
        let alpha = if m_new[i] == m_old && m_new[i].is_finite() {
            1.0
        } else {
            crate::simd::exp_scalar(m_old - m_new[i])
        };
        scratch.l[i] = scratch.l[i] * alpha + sums[i];
        scratch.m[i] = m_new[i];
        // A row that has seen no key yet (`m_old = -inf`, so `alpha = 0`) holds +0 or NaN (a
        // probability of 0 times a non-finite value): a scale by 0 would leave them as they are.
        if alpha != 1.0 && m_old != f32::NEG_INFINITY {
            scale_row(&mut scratch.acc[i * dv_pad..i * dv_pad + dv], alpha);
        }
    }
}

/// Pass 4: `acc += p · v_block`, or `acc = p · v_block` for the tile's first block (the bits of
/// adding to zeros: every kernel here starts its sums from +0).
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
    if let Some(source) = ops.bf16 {
        super::tile_bf16::bf16_weighted_values(scratch, plan, ops, rows, block, source, amx);
        return;
    }
    if super::tile_convert::converts(ops) {
        return super::tile_convert::weighted_values(scratch, plan, ops, rows, block);
    }
    let v = ops.v.f32();
    let (v_data, v_st) = (v.data(), v.strides());
    if !ops.micro {
        if block.first {
            scratch.acc[..n_rows * dv_pad].fill(0.0);
        }
        // SAFETY: `acc` holds BLOCK_ROWS×Dv_pad elements; the value block was bounds-checked
        // with `v`.
        unsafe {
            gemm_raw(
                scratch.acc.as_mut_ptr(),
                [dv_pad, 1],
                [n_rows, dv, bc],
                Accum::Add,
                scratch.scores.as_ptr(),
                [plan.scores_ld, 1],
                v_data.as_ptr().add(v_base),
                [v_st[2], v_st[3]],
                1.0,
                Par::Seq,
            )
        };
        return;
    }
    // Where the value block comes from, as `(pointer, ldb, b_panel)` for the micro-kernel:
    // packed once for the call, in place (contiguous rows, a multiple of the kernel width
    // wide), or packed here into panels.
    let values = if let Some(packed) = ops.v_packed {
        packed_value_block(plan, ops, rows, block.t0, packed)
    } else if v_st[3] == 1 && dv == dv_pad {
        // The kernel reads `bc` rows of `Dv_pad` values in place: check that extent.
        assert!(
            v_base + (bc - 1) * v_st[2] + dv_pad <= v_data.len(),
            "value block past V"
        );
        (v_data.as_ptr().wrapping_add(v_base), v_st[2], NR)
    } else {
        value_panels::<F32Values>(
            &mut scratch.vp,
            plan.kb_pad,
            &v_data[v_base..],
            bc,
            dv,
            [v_st[2], v_st[3]],
        );
        (scratch.vp.as_ptr(), NR, plan.kb_pad * NR)
    };
    super::tile_values::values_product(scratch, plan, n_rows, block, values);
}
