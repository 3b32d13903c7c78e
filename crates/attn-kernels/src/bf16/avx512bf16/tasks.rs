//! The `vdpbf16ps` GEMM's parallel part: the tasks of rows that share a product, and the groups
//! of columns each task goes across ([`super::tile_from`] computes them).

use super::{tile_from, Shared, MR, PANEL};
use crate::bf16::TASK_ROWS;
use crate::{Accum, Par};

/// [`gemm`]'s left operand `[m, pairs]`.
#[derive(Clone, Copy)]
pub(crate) enum Lhs<'a> {
    /// Packed words in panels of 16 rows, `pairs·16` words each, as [`crate::Bf16Panels`]
    /// lays out columns: row `r`'s pair `q` at `a[(r / 16)·pairs·16 + q·16 + r % 16]`. The
    /// weight gradient's `dyᵀ` comes this way, packed as `dy`'s columns are (pairs of rows
    /// interleaved, no transpose).
    Panels(*const u32),
    /// Rows rounded by each task of rows as it starts: `round(i, row)` writes row `i`'s
    /// `pairs` words into `row` (a buffer of the task's thread, read in cache right after).
    Rounded(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// `c[m, n] (+)= a · b` over `pairs` pairs of the depth: `a` `[m, pairs]` ([`Lhs`]), `b`
/// panels of 16 columns `b_panel` words apart (as [`crate::Bf16Panels`] holds them), `c` rows
/// `ldc` apart. With [`Accum::Replace`] and a `bias` (`n` values) each row's sums start from
/// it.
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; the operands must cover those shapes (with
/// [`Lhs::Panels`], `m.div_ceil(16)` whole panels).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    pairs: usize,
    lhs: Lhs<'_>,
    b: &[u32],
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    accum: Accum,
    bias: Option<&[f32]>,
    par: Par,
) {
    assert!(b_panel >= pairs * PANEL && (n == 0 || b.len() >= (n.div_ceil(PANEL) - 1) * b_panel + pairs * PANEL));
    assert!(bias.is_none_or(|bias| bias.len() >= n && accum == Accum::Replace));
    let bias = Shared(bias.map_or(std::ptr::null(), <[f32]>::as_ptr));
    let (lhs, b, c) = (Shared(lhs), Shared(b.as_ptr()), Shared(c));
    let (units, tasks) = row_bands(m, par.threads());
    let group = column_group(pairs, ldc);
    let task = |index: usize| {
        let band = row_band(m, units, tasks, index);
        let (r0, rows) = (band.start, band.len());
        // SAFETY: the caller's contract, for rows `r0..r0 + rows`; `r0` is a multiple of `MR`,
        // so no block of `MR` rows crosses a panel of 16.
        unsafe {
            let (c, bias) = (c.get().add(r0 * ldc), bias.get());
            let b = b.get();
            // The task's tiles, `accum` as `tile_from`'s `ADD`.
            macro_rules! tiles {
                ($a_step:expr, $a_row:expr, $lda:expr) => {
                    match accum {
                        Accum::Replace => tile_from::<false, $a_step>(
                            rows, n, pairs, $a_row, $lda, b, b_panel, c, ldc, bias, group,
                        ),
                        Accum::Add => tile_from::<true, $a_step>(
                            rows, n, pairs, $a_row, $lda, b, b_panel, c, ldc, bias, group,
                        ),
                    }
                };
            }
            match lhs.get() {
                Lhs::Rounded(round) => {
                    let mut rounded = crate::buffer::take(rows * pairs);
                    for (i, row) in rounded.chunks_exact_mut(pairs).enumerate() {
                        round(r0 + i, row);
                    }
                    let a = rounded.as_ptr().cast::<u32>();
                    tiles!(1, |r: usize| a.add(r * pairs), pairs);
                    crate::buffer::give(rounded);
                }
                Lhs::Panels(a) => {
                    // Row `row`'s first pair; the rows of a block of `MR` are 1 word apart and
                    // their pairs 16 (`r0` is a multiple of `MR`: no block crosses a panel).
                    let a_row = |r: usize| {
                        let row = r0 + r;
                        a.add(row / PANEL * pairs * PANEL + row % PANEL)
                    };
                    tiles!(PANEL, a_row, 1);
                }
            }
        }
    };
    par.for_each_task(tasks, task);
}

/// The bytes of `b`'s panels one group of columns of [`gemm`] reads ([`column_group`]).
const GROUP_BYTES: usize = 256 << 10;

/// The columns [`gemm`] takes a task's blocks of rows across ([`tile_from`]'s `group`) into `c`
/// rows `ldc` floats apart. Where the rows are a multiple of 4 KiB apart, as many pairs of
/// panels as hold about [`GROUP_BYTES`] of `b` at this depth (256 columns at a depth of 512, 64
/// at 2,048); elsewhere one pair. Going down a task's rows one pair of panels at a time keeps
/// the pair's `b` words in L1 for every block, but with such rows stores each block's rows into
/// the same cache sets: on a Zen 5 EPYC, one thread, 2048 × 2048 × 512 ran at 369 GFLOP/s
/// against 445 for 2048 × 1536 × 512, and 1.10–1.20× faster in groups of 256 columns, where
/// groups cost other shapes up to 5% (`attn embed --dtype bf16`; PERFORMANCE.md).
fn column_group(pairs: usize, ldc: usize) -> usize {
    if !ldc.is_multiple_of(1024) {
        return 2 * PANEL;
    }
    let panels = GROUP_BYTES / (pairs.max(1) * PANEL * 4);
    (panels / 2).max(1) * 2 * PANEL
}

/// The blocks of [`MR`] rows of an `m`-row product, and the tasks that share them: about
/// [`TASK_ROWS`] rows each, a multiple of `threads` in number, so that each thread gets as many
/// rows (fixed tasks of 64 rows split a 1,200-row product 10 to 9, and left one of two threads
/// idle for a nineteenth of it); never more tasks than blocks. Task `t` takes blocks
/// `units·t / tasks .. units·(t + 1) / tasks`.
fn row_bands(m: usize, threads: usize) -> (usize, usize) {
    let units = m.div_ceil(MR);
    (units, m.div_ceil(TASK_ROWS).next_multiple_of(threads.max(1)).min(units))
}

/// The rows of task `index` of [`row_bands`]' `(units, tasks)`: blocks
/// `units·index / tasks .. units·(index + 1) / tasks`, the last one cut at `m`.
fn row_band(m: usize, units: usize, tasks: usize, index: usize) -> std::ops::Range<usize> {
    units * index / tasks * MR..(units * (index + 1) / tasks * MR).min(m)
}

#[cfg(test)]
mod tests {
    use super::{row_band, row_bands, MR, TASK_ROWS};

    /// The bands cover every row once, in blocks of [`MR`] (the last block may be short), each
    /// task within one block of the others; the count is a multiple of the threads wherever
    /// there are enough blocks, and the tasks are about [`TASK_ROWS`] rows.
    #[test]
    fn row_bands_share_the_rows_evenly() {
        for threads in 1..=5 {
            for m in 0..700 {
                let (units, tasks) = row_bands(m, threads);
                assert_eq!(units, m.div_ceil(MR));
                assert!(tasks <= units);
                if units >= threads {
                    assert_eq!(tasks % threads, 0, "m {m}, threads {threads}: {tasks} tasks");
                }
                let bands: Vec<(usize, usize)> = (0..tasks)
                    .map(|t| row_band(m, units, tasks, t))
                    .map(|band| (band.start, band.end))
                    .collect();
                let mut next = 0;
                for &(lo, hi) in &bands {
                    assert_eq!(lo, next, "m {m}, threads {threads}: {bands:?}");
                    assert!(hi > lo, "m {m}, threads {threads}: an empty band in {bands:?}");
                    assert!(hi - lo <= TASK_ROWS, "m {m}, threads {threads}: {bands:?}");
                    next = hi;
                }
                assert_eq!(next, m, "m {m}, threads {threads}: {bands:?}");
                let blocks = |&(lo, hi): &(usize, usize)| (hi - lo).div_ceil(MR);
                let (most, least) = (bands.iter().map(blocks).max(), bands.iter().map(blocks).min());
                if let (Some(most), Some(least)) = (most, least) {
                    assert!(most - least <= 1, "m {m}, threads {threads}: {bands:?}");
                }
            }
        }
    }
}
