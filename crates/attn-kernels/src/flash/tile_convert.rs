//! Passes 1 and 4 of a row tile on keys and values converted as they are read
//! ([`crate::tile::Stored`]): bf16 bits (a bf16 KV cache, [`super::kv_bits`]) widened exactly in
//! f32, or as rounding their values gives them in bf16 without bf16 instructions, and f32
//! values rounded to bf16 in bf16 without bf16 instructions ([`super::Operation::RoundingF32`]
//! where nothing packs them). Decoding's kernels convert each key and value as they load it
//! in place; tiles of more rows convert each key block as they transpose it into panels and
//! each value block as they put it in panels, or read K and V that the call's packing
//! converted. Each gives the bits of [`super::tile`]'s passes on the values K and V stand for,
//! as on converted copies.

use super::scratch::{KeyBlock, Scratch, TileRows};
use super::tile_blocks::{packed_key_block, packed_value_block, panel_scores, row_max_pass_forced};
use super::tile_values::{value_panels, values_product};
use super::{Kv, Operands, Plan};
use crate::scores::{key_panels_stored, ScoreKernel};
use crate::tile::{Bf16Bits, Bf16Rounded, F32Rounded, Stored, NR};

/// Whether the tile's passes read K and V through [`scores`] and [`weighted_values`]: bf16
/// bits (packed or not), or f32 values rounded as they are read (rounded operands,
/// `round_q`, that no packing holds).
pub(super) fn converts(ops: &Operands<'_, '_>) -> bool {
    matches!(ops.k, Kv::Bits(_)) || (ops.round_q && ops.kt_packed.is_none() && ops.packed_per_group.is_none())
}

/// Pass 1 on converted keys: from the call's packing of the bits when there is one, else
/// decoding's dot products against the keys in place or the tile kernel on the block
/// transposed into panels, each key converted as it is loaded. The bits of pass 1 on the
/// converted keys. Returns whether each row's maximum was folded into `scratch.maxes` (as
/// the tile kernel does over whole panels).
pub(super) fn scores(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
) -> bool {
    if let Some(packed) = ops.kt_packed {
        let kt = packed_key_block(plan, packed, ops.packed_per_group.is_some(), [rows.b, rows.g, block.t0]);
        let maxes = (!row_max_pass_forced()).then_some(&mut scratch.maxes[..]);
        return panel_scores(
            &mut scratch.scores,
            plan,
            &scratch.q_tile,
            rows.n_rows,
            maxes,
            kt,
            block.bc,
        );
    }
    let at = |st: [usize; 4]| rows.b * st[0] + rows.g * st[1] + block.t0 * st[2];
    macro_rules! as_stored {
        ($stored:ty, $k:expr) => {
            stored_scores::<$stored>(
                scratch,
                plan,
                ops,
                rows,
                block,
                &$k.data()[at($k.strides())..],
                $k.strides(),
            )
        };
    }
    match (ops.k, ops.round_q) {
        (Kv::Bits(k), false) => as_stored!(Bf16Bits, k),
        (Kv::Bits(k), true) => as_stored!(Bf16Rounded, k),
        (Kv::F32(k), _) => as_stored!(F32Rounded, k),
    }
}

/// [`scores`] on the block's keys `keys` (from its first), `k_st` K's strides.
fn stored_scores<S: Stored>(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    keys: &[S::Elem],
    k_st: [usize; 4],
) -> bool {
    let (d, bc, n_rows, ld) = (plan.d, block.bc, rows.n_rows, plan.scores_ld);
    assert!(
        bc > 0 && (bc - 1) * k_st[2] + (d - 1) * k_st[3] < keys.len(),
        "key block past K"
    );
    assert!(scratch.q_tile.len() >= n_rows * d);
    assert!(scratch.scores.len() >= (n_rows - 1) * ld + bc && bc <= ld);
    match ops.score_kernel {
        ScoreKernel::Tile => {
            key_panels_stored::<S>(&mut scratch.kt, keys, bc, d, k_st[2], k_st[3]);
            let maxes = (!row_max_pass_forced()).then_some(&mut scratch.maxes[..]);
            panel_scores(
                &mut scratch.scores,
                plan,
                &scratch.q_tile,
                n_rows,
                maxes,
                &scratch.kt,
                bc,
            )
        }
        ScoreKernel::Dot => {
            assert!(k_st[3] == 1 && n_rows <= crate::tile::DECODE_ROWS_MAX);
            #[cfg(target_arch = "x86_64")]
            {
                let (q, c) = (scratch.q_tile.as_ptr(), scratch.scores.as_mut_ptr());
                // SAFETY: the Dot kernel is chosen only at a vector level; `q_tile` holds the
                // tile's `n_rows` rows of `D`, the block's `bc` keys of `D` contiguous elements
                // lie inside `keys` and `scores` holds `n_rows` rows of `ld ≥ bc` (all checked
                // above).
                unsafe { crate::tile::dot_rows::<S>(n_rows, bc, d, q, d, keys.as_ptr(), k_st[2], c, ld) };
            }
            false
        }
        ScoreKernel::Scalar => unreachable!("converted keys are read at a vector level only"),
    }
}

/// Pass 4 on converted values: from the call's packing of the bits when there is one; else,
/// decoding (a few rows, values of whole panels in contiguous rows), read in place and
/// converted as they are loaded; else converted into panels first. The bits of the f32
/// kernel's pass 4 on the converted values: decoding takes the same route there, and the tile
/// kernel's sums do not depend on whether its values lie in place or in panels.
pub(super) fn weighted_values(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
) {
    if let Some(packed) = ops.v_packed {
        let values = packed_value_block(plan, ops, rows, block.t0, packed);
        return values_product(scratch, plan, rows.n_rows, block, values);
    }
    macro_rules! as_stored {
        ($stored:ty, $v:expr) => {
            stored_values::<$stored>(
                scratch,
                plan,
                ops,
                rows,
                block,
                &$v.data()[block.v_base..],
                $v.strides(),
            )
        };
    }
    match (ops.v, ops.round_q) {
        (Kv::Bits(v), false) => as_stored!(Bf16Bits, v),
        (Kv::Bits(v), true) => as_stored!(Bf16Rounded, v),
        (Kv::F32(v), _) => as_stored!(F32Rounded, v),
    }
}

/// [`weighted_values`] on the block's values `values` (from its first), `v_st` V's strides.
fn stored_values<S: Stored>(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    values: &[S::Elem],
    v_st: [usize; 4],
) {
    let (dv, dv_pad, n_rows, bc) = (plan.dv, plan.dv_pad, rows.n_rows, block.bc);
    assert!(ops.micro, "converted values are read at a vector level only");
    let in_place = n_rows <= crate::tile::DECODE_ROWS_MAX && v_st[3] == 1 && dv == dv_pad;
    if !in_place {
        value_panels::<S>(&mut scratch.vp, plan.kb_pad, values, bc, dv, [v_st[2], v_st[3]]);
        values_product(
            scratch,
            plan,
            n_rows,
            block,
            (scratch.vp.as_ptr(), NR, plan.kb_pad * NR),
        );
        return;
    }
    assert!((bc - 1) * v_st[2] + dv_pad <= values.len(), "value block past V");
    assert!(scratch.acc.len() >= n_rows * dv_pad && scratch.scores.len() >= (n_rows - 1) * plan.scores_ld + bc);
    if block.first {
        scratch.acc[..n_rows * dv_pad].fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (p, ldp, acc) = (scratch.scores.as_ptr(), plan.scores_ld, scratch.acc.as_mut_ptr());
        // SAFETY: `micro` is set only at a vector level; `scores` holds `n_rows` rows of `bc`
        // probabilities, the block's `bc` value rows of `Dv_pad` contiguous elements lie
        // inside `values` and `acc` holds `n_rows` rows of `Dv_pad` (all checked above).
        unsafe { crate::tile::axpy_rows::<S>(n_rows, dv_pad, bc, p, ldp, values.as_ptr(), v_st[2], acc, dv_pad) };
    }
}
