//! The flash kernel writing the call's attention weights as it goes ([`crate::attention_with_weights`]).
//!
//! Each tile keeps its masked scores over all keys (`Scratch::kept`, `[BLOCK_ROWS, T]`) while
//! the online softmax runs; when a row is finished its log-sum-exp is known, and the kept row
//! becomes its weights, `exp(score − lse)`, written straight to the destination. That is the
//! arithmetic of [`crate::attention_weights`] on the same scores (the same tile products, the
//! same masks, the same key blocks and `exp`, the same head order when averaging), so the two
//! give the same bits, without the second pass's products and its packing of K.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{attend_tile, row_position, run_tasks, Dst, Operands, Plan, Scratch, BLOCK_ROWS};
use crate::weights::RawWeights;
use crate::Par;

/// Keys above which the weights take the second pass: the kept scores are `BLOCK_ROWS × T`
/// floats per worker (4 MiB at this bound).
pub(crate) const MAX_KEPT_KEYS: usize = 16 * 1024;

/// The tasks of an unsplit call that keeps its scores: per `(b, g, row tile)` for per-head
/// weights, per `(b, row tile)` over every `g` in order when averaging (so each query row's
/// heads are added in head order by one task). Returns whether a row came out non-finite from
/// a finite softmax.
pub(super) fn attend_keeping_scores(
    plan: &Plan,
    ops: &Operands<'_, '_>,
    dst: Dst,
    weights: RawWeights,
    par: Par,
) -> bool {
    let spoilt_rows = AtomicBool::new(false);
    let averaged = weights.inv_heads.is_some();
    let groups_per_task = if averaged { plan.g } else { 1 };
    let run = |scratch: &mut Scratch, task: usize| {
        scratch.keep_room(plan.t);
        let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
        // Averaging: `bg` is `b`, over every group; else `(b, g)`, one group.
        let (b, g_first) = if averaged { (bg, 0) } else { (bg / plan.g, bg % plan.g) };
        for g in g_first..g_first + groups_per_task {
            let rows = attend_tile(scratch, plan, ops, [b, g, tile], 0..plan.t);
            for i in 0..rows {
                let (s, h) = row_position(plan, g, tile * BLOCK_ROWS + i);
                let acc_row = &scratch.acc[i * plan.dv_pad..i * plan.dv_pad + plan.dv];
                // SAFETY: `(b, h, s)` is in bounds and belongs to this task alone.
                let (spoilt, lse) = unsafe { dst.write_row_lse([b, h, s], acc_row, scratch.l[i], scratch.m[i], true) };
                if spoilt {
                    spoilt_rows.store(true, Ordering::Relaxed);
                }
                let kept = &mut scratch.kept[i * plan.t..(i + 1) * plan.t];
                // SAFETY: `(b, h, s)` is in bounds of the validated destination; the row
                // (averaged: every head of `(b, s)`) is this task's.
                unsafe { weights.write_finished(kept, lse, [b, h, s]) };
            }
        }
    };
    run_tasks(plan.b * (plan.g / groups_per_task) * plan.row_tiles, par, plan, run);
    spoilt_rows.load(Ordering::Relaxed)
}
