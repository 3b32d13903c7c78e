//! Passes 1 and 4 of a row tile with the f32 decoding kernels on keys and values converted as
//! they are loaded ([`crate::tile::Stored`]): bf16 bits (a bf16 KV cache, [`super::kv_bits`])
//! widened exactly in f32, or as rounding their values gives them in bf16 without bf16
//! instructions, and f32 values rounded to bf16 in bf16 without bf16 instructions
//! ([`super::Operation::RoundingF32`] when decoding). Each gives the bits of [`super::tile`]'s
//! passes on the values K and V stand for, as on converted copies.

use super::scratch::{KeyBlock, Scratch, TileRows};
use super::tile_values::{value_panels, values_product};
use super::{Kv, Operands, Plan};
use crate::scores::ScoreKernel;
use crate::tile::{Bf16Bits, Bf16Rounded, F32Rounded, Stored, NR};

/// Whether the tile's passes read K and V through [`scores`] and [`weighted_values`]: bf16
/// bits, or f32 values rounded as they load (rounded operands, `round_q`, that no packing
/// holds).
pub(super) fn converts(ops: &Operands<'_, '_>) -> bool {
    matches!(ops.k, Kv::Bits(_)) || (ops.round_q && ops.kt_packed.is_none() && ops.packed_per_group.is_none())
}

/// Pass 1: decoding's dot products against the keys in place, each key converted as it is
/// loaded, so the bits of [`ScoreKernel::Dot`] on the converted keys. Returns false (no maxima
/// folded, as that kernel).
pub(super) fn scores(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
) -> bool {
    let at = |st: [usize; 4]| rows.b * st[0] + rows.g * st[1] + block.t0 * st[2];
    macro_rules! as_stored {
        ($stored:ty, $k:expr) => {
            in_place_scores::<$stored>(
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
fn in_place_scores<S: Stored>(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    keys: &[S::Elem],
    k_st: [usize; 4],
) -> bool {
    assert!(
        ops.score_kernel == ScoreKernel::Dot,
        "converted keys are read in place by decoding's dot products only"
    );
    let (d, bc, n_rows, ld) = (plan.d, block.bc, rows.n_rows, plan.scores_ld);
    assert!(
        k_st[3] == 1 && bc > 0 && (bc - 1) * k_st[2] + d <= keys.len(),
        "key block past K"
    );
    assert!(n_rows <= crate::tile::DECODE_ROWS_MAX && scratch.q_tile.len() >= n_rows * d);
    assert!(scratch.scores.len() >= (n_rows - 1) * ld + bc && bc <= ld);
    #[cfg(target_arch = "x86_64")]
    {
        let (q, c) = (scratch.q_tile.as_ptr(), scratch.scores.as_mut_ptr());
        // SAFETY: the Dot kernel is chosen only at a vector level; `q_tile` holds the tile's
        // `n_rows` rows of `D`, the block's `bc` keys of `D` contiguous elements lie inside
        // `keys` and `scores` holds `n_rows` rows of `ld ≥ bc` (all checked above).
        unsafe { crate::tile::dot_rows::<S>(n_rows, bc, d, q, d, keys.as_ptr(), k_st[2], c, ld) };
    }
    false
}

/// Pass 4: rows of whole panels read in place and converted as they are loaded, other rows
/// converted into panels first; the bits of the f32 kernel's pass 4 on the converted values,
/// which takes the same two routes.
pub(super) fn weighted_values(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
) {
    macro_rules! as_stored {
        ($stored:ty, $v:expr) => {
            in_place_values::<$stored>(
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
fn in_place_values<S: Stored>(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    values: &[S::Elem],
    v_st: [usize; 4],
) {
    let (dv, dv_pad, n_rows, bc) = (plan.dv, plan.dv_pad, rows.n_rows, block.bc);
    assert!(
        ops.micro && ops.v_packed.is_none() && v_st[3] == 1 && n_rows <= crate::tile::DECODE_ROWS_MAX,
        "converted values are read in place by decoding's kernels only"
    );
    if dv != dv_pad {
        value_panels::<S>(&mut scratch.vp, plan.kb_pad, values, bc, dv, [v_st[2], 1]);
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
