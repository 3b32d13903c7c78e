//! Split-KV: when there are too few `(b, g, row tile)` tasks to keep every core busy (decoding,
//! `S = 1`, long `T`), each task's keys are cut into `plan.splits` ranges. Every split writes its
//! unnormalised accumulator rows and each row's (max, sum); a second loop merges the splits of
//! each row in split order, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::scratch::{with_scratch, Scratch};
use super::tile::attend_tile;
use super::{row_position, run_tasks, Dst, Operands, Plan, BLOCK_ROWS};
use crate::Par;

/// One split's destination: unnormalised accumulator rows and each row's (max, sum).
type SplitSlot<'a> = (&'a mut [f32], &'a mut [(f32, f32)]);

/// Runs every `(task, split)` pair, then merges each row's splits. Returns whether a row came
/// out non-finite from a finite softmax.
pub(super) fn attend_split(plan: &Plan, ops: &Operands<'_, '_>, dst: Dst, par: Par) -> bool {
    let tasks = plan.b * plan.g * plan.row_tiles;
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
        let n_rows = attend_tile(scratch, plan, ops, [b, g, tile], t_lo..t_hi);
        for i in 0..n_rows {
            acc_dst[i * plan.dv..(i + 1) * plan.dv]
                .copy_from_slice(&scratch.acc[i * plan.dv_pad..i * plan.dv_pad + plan.dv]);
            ml_dst[i] = (scratch.m[i], scratch.l[i]);
        }
    };
    match par {
        Par::Seq => with_scratch(plan, |scratch| {
            part_chunks.into_iter().enumerate().for_each(|item| body(scratch, item))
        }),
        Par::Rayon => part_chunks
            .into_par_iter()
            .enumerate()
            .for_each(|item| with_scratch(plan, |scratch| body(scratch, item))),
    }
    let spoilt_rows = std::sync::atomic::AtomicBool::new(false);
    let merge = |_: &mut Scratch, task: usize| {
        let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
        let (b, g) = (bg / plan.g, bg % plan.g);
        let n_rows = (plan.rows_per_group - tile * BLOCK_ROWS).min(BLOCK_ROWS);
        let mut acc = vec![0.0f32; plan.dv];
        for i in 0..n_rows {
            let slot = |split: usize| (task * plan.splits + split) * rows + i;
            let (m_max, l_total) = merge_row(plan, &part_acc, &part_ml, slot, &mut acc);
            let (s, h) = row_position(plan, g, tile * BLOCK_ROWS + i);
            // SAFETY: `(b, h, s)` is in bounds and belongs to this task alone.
            if unsafe { dst.write_row([b, h, s], &acc, l_total, m_max) } {
                spoilt_rows.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    run_tasks(tasks, par, plan, merge);
    spoilt_rows.load(std::sync::atomic::Ordering::Relaxed)
}

/// Merges the splits of one row into `acc` (unnormalised) and returns its `(max, sum)`.
fn merge_row(
    plan: &Plan,
    part_acc: &[f32],
    part_ml: &[(f32, f32)],
    slot: impl Fn(usize) -> usize,
    acc: &mut [f32],
) -> (f32, f32) {
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
    (m_max, l_total)
}
