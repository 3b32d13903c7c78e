//! The f32 tile's key and value blocks, shared by its passes (`tile.rs`) and the converting
//! ones (`tile_convert.rs`): the floats of a packed block, where a packed block lies, the tile
//! kernel's scores against a block of key panels (with each row's maximum folded in), and the
//! tests' switch that takes the maxima from the `row_max` pass instead.

use super::scratch::TileRows;
use super::{Operands, Plan};
use crate::scores::tile_scores;
use crate::tile::NR;

/// The floats of one packed key block: `D` by `kb_pad` keys.
pub(super) fn key_block_len(plan: &Plan) -> usize {
    plan.d * plan.kb_pad
}

/// The floats of one packed value block: `kb_pad` keys by `Dv_pad` columns.
pub(super) fn value_block_len(plan: &Plan) -> usize {
    plan.dv_pad * plan.kb_pad
}

#[cfg(test)]
thread_local! {
    /// Set by the tests to take every row's maximum from the `row_max` pass, as without the
    /// score kernel's folded maxima.
    pub(crate) static FORCE_ROW_MAX_PASS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a test on this thread asked for the `row_max` pass (never outside tests).
pub(super) fn row_max_pass_forced() -> bool {
    #[cfg(test)]
    let forced = FORCE_ROW_MAX_PASS.with(|f| f.get());
    #[cfg(not(test))]
    let forced = false;
    forced
}

/// Key block `t0` of `(b, g)` in `packed`, K transposed once for the call
/// ([`super::tile::pack_keys_rounded`]) or, `per_group`, for the tile's `(b, g)` alone.
pub(super) fn packed_key_block<'p>(
    plan: &Plan,
    packed: &'p [f32],
    per_group: bool,
    [b, g, t0]: [usize; 3],
) -> &'p [f32] {
    let blocks = plan.t.div_ceil(plan.block_keys);
    let group = if per_group { 0 } else { b * plan.g + g };
    let index = group * blocks + t0 / plan.block_keys;
    let len = key_block_len(plan);
    &packed[index * len..(index + 1) * len]
}

/// [`tile_scores`] of the tile's `n_rows` query rows against the `bc` keys in transposed
/// panels `kt`, into `scores` (row stride `plan.scores_ld`); with `maxes` and a whole number of
/// panels, each row's maximum folded into its lanes of `maxes` too. Returns whether it was.
pub(super) fn panel_scores(
    scores: &mut [f32],
    plan: &Plan,
    q_tile: &[f32],
    n_rows: usize,
    maxes: Option<&mut [f32]>,
    kt: &[f32],
    bc: usize,
) -> bool {
    let mut maxes = maxes.filter(|_| bc.is_multiple_of(NR));
    if let Some(maxes) = maxes.as_deref_mut() {
        maxes[..n_rows * crate::tile::max_lanes()].fill(f32::NEG_INFINITY);
    }
    let folded = maxes.is_some();
    tile_scores(scores, plan.scores_ld, q_tile, [n_rows, plan.d], kt, bc, maxes);
    folded
}

/// The value block of key `t0` for the tile's rows in `packed` (V packed once for the call, or
/// for the tile's `(b, g)` alone), as `(pointer, ldb, b_panel)` for the micro-kernels.
pub(super) fn packed_value_block(
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    t0: usize,
    packed: &[f32],
) -> (*const f32, usize, usize) {
    let blocks = plan.t.div_ceil(plan.block_keys);
    let [b, g, _] = ops.packed_at(rows, t0);
    let index = (b * plan.g + g) * blocks + t0 / plan.block_keys;
    let len = value_block_len(plan);
    let block_values = &packed[index * len..(index + 1) * len];
    (block_values.as_ptr(), NR, plan.kb_pad * NR)
}
