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
use crate::weights::{RawWeights, WeightsDst};
use crate::{AttentionOptions, ForwardInputs, KernelError, Par, Precision, ViewMut, ViewMut4};

/// Keys above which the weights take the second pass: the kept scores are `BLOCK_ROWS × T`
/// floats per worker (4 MiB at this bound).
const MAX_KEPT_KEYS: usize = 16 * 1024;

/// Whether the flash kernel writes the weights of a call of `plan` itself (else they come from
/// a second pass over the call's LSE): f32, the flash path, unsplit keys, at most
/// [`MAX_KEPT_KEYS`] keys, no empty dimension; when averaging over heads, one task holds every
/// head of its query rows, so the heads of a query row must not straddle two row tiles and
/// there must be a task for each worker.
pub(crate) fn keeps_scores(plan: &Plan, options: &AttentionOptions<'_>, averaged: bool, par: Par) -> bool {
    let flash = crate::chosen_path(crate::simd_level(), [plan.b, plan.h, plan.s, plan.d], [plan.g, plan.t])
        == crate::KernelPath::Flash;
    let sized = plan.b > 0 && plan.h > 0 && plan.s > 0 && plan.t > 0 && plan.d > 0 && plan.t <= MAX_KEPT_KEYS;
    let workers = match par {
        Par::Seq => 1,
        Par::Rayon => rayon::current_num_threads(),
    };
    let averages = !averaged || (BLOCK_ROWS.is_multiple_of(plan.rep) && plan.b * plan.row_tiles >= workers);
    options.precision == Precision::F32 && flash && plan.splits == 1 && sized && averages
}

/// The flash kernel on a call [`keeps_scores`] allows, writing `weights` as well: the non-finite
/// repair of [`super::flash_impl`] included.
pub(crate) fn flash_with_weights(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    weights: WeightsDst<'_>,
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let raw = RawWeights::new(weights, inputs.q.shape()[1]);
    super::flash_call(out, [lse, None], inputs, options, par, true, Some(raw))
}

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
    let groups_per_task = if weights.inv_heads.is_some() { plan.g } else { 1 };
    let run = |scratch: &mut Scratch, task: usize| {
        scratch.keep_room(plan.t);
        let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
        let tasks_per_b = plan.g / groups_per_task;
        let (b, g_first) = (bg / tasks_per_b, (bg % tasks_per_b) * groups_per_task);
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
