//! The flash kernel writing the call's attention weights as it goes ([`crate::attention_with_weights`]).
//!
//! Each tile keeps its masked scores over all keys (`Scratch::kept`, `[BLOCK_ROWS, T]`) while
//! the online softmax runs; when a row is finished its log-sum-exp is known, and the kept row
//! becomes its weights, `exp(score − lse)`, written straight to the destination. That is the
//! arithmetic of [`crate::attention_weights`] on the same scores (the same tile products, the
//! same masks, the same key blocks and `exp`, the same head order when averaging), so the two
//! give the same bits, without the second pass's products and its packing of K.
//!
//! K and V are packed per `(b, g)` by the tasks ([`super::per_group`]) when the call packs them
//! and [`keeps_per_group`] says so, else once for the call.

use std::sync::atomic::{AtomicBool, Ordering};

use super::per_group::GroupPacker;
use super::{attend_tile, row_position, run_tasks, Dst, Operands, Plan, Scratch, BLOCK_ROWS};
use crate::weights::RawWeights;
use crate::Par;

/// Keys above which the weights take the second pass: the kept scores are `BLOCK_ROWS × T`
/// floats per worker (4 MiB at this bound).
pub(crate) const MAX_KEPT_KEYS: usize = 16 * 1024;

/// Batch elements per worker from which an averaging call packs K and V per `(b, g)`: its
/// tasks are then one per batch element ([`attend_keeping_scores`]), and with fewer of them a
/// worker would be left idle or one task would run long after the others.
const AVERAGED_TASKS_PER_WORKER: usize = 4;

/// Whether a call of `plan` that keeps its scores, packs K and V and may pack them per `(b, g)`
/// (`super::packs_per_group`) does so: always for per-head weights, whose tasks are those of
/// `super::attend_per_group`; when averaging, only with [`AVERAGED_TASKS_PER_WORKER`] batch
/// elements per worker.
pub(super) fn keeps_per_group(plan: &Plan, weights: &RawWeights, par: Par) -> bool {
    weights.inv_heads.is_none() || plan.b >= AVERAGED_TASKS_PER_WORKER * par.threads()
}

/// The tasks of an unsplit call that keeps its scores. With K and V packed for the call: per
/// `(b, g, row tile)` for per-head weights, per `(b, row tile)` over every `g` in order when
/// averaging (so each query row's heads are added in head order by one task). With K and V
/// packed per `(b, g)` ([`keeps_per_group`]): per `(b, g, row tile)` for per-head weights, each
/// reading its `(b, g)`'s packing, and per `b` when averaging, over every `g` in order and for
/// each `g` every row tile, so that a `(b, g)` is packed once and each row's heads are still
/// added in head order. The arithmetic of a row is the same in every case. Returns whether a
/// row came out non-finite from a finite softmax.
pub(super) fn attend_keeping_scores(
    plan: &Plan,
    ops: &Operands<'_, '_>,
    dst: Dst,
    weights: RawWeights,
    par: Par,
) -> bool {
    let spoilt_rows = AtomicBool::new(false);
    let averaged = weights.inv_heads.is_some();
    // One row tile of `(b, g)` on `ops`, its rows and their weights written.
    let finish_tile = |scratch: &mut Scratch, ops: &Operands<'_, '_>, [b, g, tile]: [usize; 3]| {
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
    };
    if ops.packed_per_group.is_some() {
        let packer = GroupPacker::new(plan, ops);
        if averaged {
            let run = |scratch: &mut Scratch, b: usize| {
                scratch.keep_room(plan.t);
                for g in 0..plan.g {
                    packer.with_group(plan, ops, [b, g], |group_ops| {
                        (0..plan.row_tiles).for_each(|tile| finish_tile(scratch, group_ops, [b, g, tile]))
                    });
                }
            };
            run_tasks(plan.b, par, plan, run);
        } else {
            let run = |scratch: &mut Scratch, task: usize| {
                scratch.keep_room(plan.t);
                let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
                let (b, g) = (bg / plan.g, bg % plan.g);
                packer.with_group(plan, ops, [b, g], |group_ops| {
                    finish_tile(scratch, group_ops, [b, g, tile])
                });
            };
            run_tasks(plan.b * plan.g * plan.row_tiles, par, plan, run);
        }
        return spoilt_rows.load(Ordering::Relaxed);
    }
    let groups_per_task = if averaged { plan.g } else { 1 };
    let run = |scratch: &mut Scratch, task: usize| {
        scratch.keep_room(plan.t);
        let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
        // Averaging: `bg` is `b`, over every group; else `(b, g)`, one group.
        let (b, g_first) = if averaged { (bg, 0) } else { (bg / plan.g, bg % plan.g) };
        for g in g_first..g_first + groups_per_task {
            finish_tile(scratch, ops, [b, g, tile]);
        }
    };
    run_tasks(plan.b * (plan.g / groups_per_task) * plan.row_tiles, par, plan, run);
    spoilt_rows.load(Ordering::Relaxed)
}
