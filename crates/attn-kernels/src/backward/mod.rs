//! The backward pass of attention: FlashAttention-2's algorithm on the CPU, deterministic.
//!
//! The forward keeps only `out` and the LSE. Here `Δ = rowsum(dO ∘ O)` comes first; then every
//! tile recomputes `P = exp(scale·q·kᵀ + masks − lse)` and forms
//! `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ∘ (dP − Δ)`, `dK += scale·dSᵀ·Q`, `dQ += scale·dS·K`.
//! No `S×T` matrix is stored: a worker holds one tile of scores, `[64, 128]` (two passes) or
//! `[64, 256]` (one pass).
//!
//! # Determinism: who owns what
//! A CPU has no cheap atomics for `dQ`, so the work is cut so that every output element has
//! one owner and is summed in a fixed order, whatever the thread count:
//! - **Key pass** (tasks `(b, g, key block of 128)`): owns `dK` and `dV` of its keys and sums
//!   over the query heads of group `g` (GQA and MQA without copies), then the query rows, in
//!   order.
//! - **Query pass** (tasks `(b, h, row tile of 64)`): owns `dQ` of its rows and sums over the key
//!   blocks in order. It recomputes `P` and `dP` (as Triton's tutorial kernel does), so the
//!   backward costs 7 tile GEMMs against the forward's 2, the "3.5×" of the CLI contract.
//! - **One pass** ([`BackwardPath::OnePass`]): a task `(b, g)` takes every key and owns
//!   `dK`, `dV` and the `dQ` of its heads, so `dQ` comes from the same `dS` with no
//!   recomputation: 5 tile GEMMs. It walks the keys in blocks of 256, every row tile of its
//!   heads passing over a block before the next, and adds each block's share of `dQ` to sums
//!   it keeps for every row of its heads. Each row tile visits only the keys one of its rows
//!   may see, so causal calls skip the masked half, and a task skips the blocks of keys none of
//!   its rows sees (their sums are zeros). With fewer than 8 `(b, g)`, each one's rows
//!   are cut into chunks (one per 256 rows at most; past 512 keys, where that makes fewer than
//!   4 tasks, one per 128 rows, then one per row tile of 64; 8 tasks in all at most): a task
//!   `(b, g, chunk)` owns the `dQ` of its rows and writes its sums of `dK` and `dV` to a buffer
//!   of partial sums, which a last pass adds chunk after chunk, in order, into `dK` and `dV`
//!   (leaving out, block by block, the chunks whose rows see none of its keys).
//!   Chosen for short keys, and for any number of keys when it makes at least 4 tasks (measured
//!   on the Zen 4 machine: [1,8,1024,64] forward + backward 54 -> 45 ms, [1,16,2048,128]
//!   causal 445 -> 360 ms, when it took every key at once and stopped at 4096 keys and 8
//!   `(b, g)`; on a Zen 3, blocks of 256 keys gave 4–9% more, and the one pass runs 1.24–1.40×
//!   faster than two passes on the shapes that took those before; chunks of 128 rows, 1.11–1.31×
//!   on shapes that took two passes for want of tasks, and chunks of 64, 1.15–1.29×).
//!
//! - **Unfused** ([`BackwardPath::Unfused`]): the one pass with each head's rows as one tile,
//!   so `P` and `dS` are whole `[S, T]` matrices and each product is one GEMM over the head (the
//!   textbook backward). Chosen for short sequences, `S·T` up to 128², where it runs level with
//!   the one pass (at `S ≤ 64` the two are the same computation); beyond, the one pass's
//!   tiles stay in cache and win (0.73× at S = T = 512). Results equal the other paths' to
//!   rounding, and the tests compare them directly.
//!
//! Memory beyond the gradients: `Δ` (`[B, H, S]` f32) and, per worker, a few tiles: about
//! 420 KiB at D = Dv = 128 on the two-pass path; on the one-pass path about 720 KiB at D = Dv =
//! 128 and the `dQ` sums of a task's rows of its heads (`[H/G, rows, D]`, 2 MiB at 4096 rows,
//! D = 128 without GQA), and with chunks of rows the partial sums, `chunks · B · G · T ·
//! (D + Dv)` floats, at most 128 MiB (beyond, two passes). Workers keep their tiles from call
//! to call.
//!
//! A key task packs its block's keys and values into the tile kernel's transposed panels once;
//! every row tile of every head of the group then computes its scores `q·kᵀ` and `dP = dO·Vᵀ`
//! on them. Where the tile kernel computes the scores and `D` and `Dv` are whole numbers of
//! its 16-column panels, it also computes `dV += Pᵀ·dO` and `dK += dSᵀ·(scale·Q)`, reading `P`
//! and `dS` transposed in place (each step's broadcasts are consecutive keys of one row) and
//! `dO` and the query tile as they are; their rows are one panel longer than a whole number
//! of panels, so that the rows of a column do not share an L1 set. Elsewhere faer's GEMM
//! computes them, and `dQ += dS·K` everywhere (on the tile kernel it measured no faster).
//! Which one runs depends on the shape alone, so the bits do not depend on the thread count.
//!
//! # Rows and keys that see nothing
//! A row with nothing to attend to (`lse = -inf`) passes no gradient: its `dQ` is zero and it adds
//! nothing to `dK` or `dV`. A hidden key (mask, causal limit, key length) gets nothing from a row
//! that cannot see it, not even a NaN. A NaN row (NaN `lse`) spreads NaN to its own `dQ` and to
//! the keys it sees, as its forward did to its output.

use crate::flash::validate;
use crate::view::{is_non_overlapping, span, SharedMut};
use crate::{AttentionOptions, KernelError, Par, View, View4, ViewMut4};

mod deltas;
mod products;
mod tasks;
#[cfg(test)]
mod tests;

use tasks::{run_backward, Out};

/// Query rows per tile.
const ROWS: usize = 64;
/// Keys per block of the two-pass path.
const KEYS: usize = 128;
/// Scores `S·T` up to which the unfused path is taken: where it measured level with the one
/// pass (medians of 5 alternated rounds on the Zen 4 machine, one-pass / unfused time: 1.03 at
/// S = T = 64, 1.06 at 128, 0.96 at 256, 0.73 at 512).
const UNFUSED_MAX_SCORES: usize = 128 * 128;
/// Keys up to which the one-pass path is always taken.
const ONE_PASS_SHORT_KEYS: usize = 512;
/// Tasks the one pass aims at, to share out among the threads: with fewer `(b, g)`, each one's
/// rows are cut into chunks ([`row_chunks`]).
const ONE_PASS_TASKS: usize = 8;
/// Tasks the one pass needs beyond [`ONE_PASS_SHORT_KEYS`] keys. With them it is taken at any
/// length: its cache footprint does not grow with the keys ([`ONE_PASS_KEYS`]), and it runs
/// 5 tile GEMMs where two passes run 7. Forward + backward on the Zen 3 machine at 2 threads,
/// one pass against two (two runs each): 1.40× at [1,8,6144,64], 1.42× at [1,8,8192,128]
/// causal (before the keys were walked in blocks, the one pass stopped at 4096 keys); 1.32×
/// at [1,1,1024,64] in 4 chunks of rows. With more threads than tasks the one pass leaves
/// some idle, where two passes use them all.
const ONE_PASS_MIN_TASKS: usize = 4;
/// The one pass makes at most one chunk of rows per this many rows (rounded up): each chunk
/// packs its keys and writes partial sums of `dK` and `dV` again. At [1,2,512,64] (forward + backward, Zen 3, three runs each) 4
/// chunks of 128 rows ran 1.06× slower than one of 512, 2 of 256 1.02×.
const CHUNK_MIN_ROWS: usize = 256;
/// Beyond [`ONE_PASS_SHORT_KEYS`] keys, where chunks of [`CHUNK_MIN_ROWS`] rows make fewer than
/// [`ONE_PASS_MIN_TASKS`] tasks, the one pass makes at most one chunk per this many rows
/// instead: the smaller chunks cost a few percent, two passes a quarter. Forward + backward on
/// the Zen 3 machine at 2 threads, one pass in chunks of 128 rows against two passes (two runs
/// each): 1.30× at `[1,1,512,4096,64]` (and 1.03× slower than its 2 chunks of 256), 1.30× at
/// `[1,2,256,2048,64]`, 1.27× at `[1,3,200,1024,64]`, 1.28× at `[1,1,768,8192,64]`, 1.09–1.14×
/// at `[1,1,400,2048,64]`.
const CHUNK_FEW_ROWS: usize = 128;
/// Where chunks of [`CHUNK_FEW_ROWS`] rows still make too few tasks, the one pass makes at most
/// one chunk per this many rows (one row tile) before it gives way to two passes. Forward +
/// backward on the Zen 3 machine at 2 threads, against two passes (`bench_ab.py`, 5 rounds):
/// 1.20× at `[1,1,256,4096,64]`, 1.15× at `[1,1,200,2048,64]`, 1.27× at `[1,2,128,4096,64]`,
/// 1.24× at `[1,3,100,2048,64]`, 1.27× at `[1,1,384,1024,64]`, 1.17× at `[1,1,300,8192,64]`.
const CHUNK_LEAST_ROWS: usize = ROWS;
/// Keys per block of the one pass: a task walks its keys in blocks of this many, every row
/// tile of its heads passing over one block (its packed keys and values and its `dK`, `dV`
/// sums, 256 KiB at D = Dv = 64) before the next. Taking every key at once put `[64, T]`
/// probabilities and score gradients and `[T, D]` panels and sums, 1.6 MiB at T = 1024, out
/// of a 512 KiB L2. Forward + backward on the Zen 3 machine, median ms by block (two runs each;
/// 128 / 256 / 512 / all keys): [1,8,1024,64] 48.3 / 47.2 / 47.1 / 49.1; [1,16,2048,128] causal 398 /
/// 383 / 382 / 411. A multiple of the tile kernel's panels, so the exp and the masks see
/// the same keys in each vector whatever the block.
const ONE_PASS_KEYS: usize = 256;

/// The inputs of a backward call: the forward's inputs, its `out` and `lse`, and `dout`, the
/// gradient of the loss with respect to `out`.
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a> {
    /// `[B, H, S, D]`.
    pub q: View4<'a, f32>,
    /// `[B, G, T, D]`.
    pub k: View4<'a, f32>,
    /// `[B, G, T, Dv]`.
    pub v: View4<'a, f32>,
    /// `[B, H, S, Dv]`: the forward's output.
    pub out: View4<'a, f32>,
    /// `[B, H, S]`: the forward's log-sum-exp (natural log).
    pub lse: View<'a, f32, 3>,
    /// `[B, H, S]`, optional: what rounding `lse` to f32 lost
    /// ([`attention_with_lse_lo`](crate::attention_with_lse_lo)). With it the probabilities are
    /// recomputed as `exp((s − lse) − lse_lo)`, exact to f32 however large the logits; without
    /// it `exp(s − lse)` carries `lse`'s rounding (half an ulp of the row's largest score).
    pub lse_lo: Option<View<'a, f32, 3>>,
    /// `[B, H, S, Dv]`.
    pub dout: View4<'a, f32>,
}

/// Where the gradients go, each the shape of its input; overwritten.
#[derive(Debug)]
pub struct Gradients<'a> {
    /// `[B, H, S, D]`.
    pub dq: ViewMut4<'a, f32>,
    /// `[B, G, T, D]`: summed over the query heads of each group.
    pub dk: ViewMut4<'a, f32>,
    /// `[B, G, T, Dv]`: likewise.
    pub dv: ViewMut4<'a, f32>,
}

/// `dQ`, `dK` and `dV` as column blocks of one buffer of rows, as a fused `[tokens, q|k|v]`
/// projection lays them out: the backward writes each straight into its columns (no separate
/// buffers to copy from). Each block is `(offset, shape, strides)`: its element `[0, 0, 0, 0]`
/// at `offset`, its last dim contiguous and its heads side by side (`strides[3] = 1`,
/// `strides[1] = shape[3]`), the three sharing the batch and row strides; overwritten.
#[derive(Debug)]
pub struct FusedGradients<'a> {
    buf: &'a mut [f32],
    blocks: [(usize, [usize; 4], [usize; 4]); 3],
}

impl<'a> FusedGradients<'a> {
    /// The three blocks `[dq, dk, dv]` of `buf`; fails unless each is in bounds, the three
    /// occupy disjoint columns of one row layout, and no two rows overlap.
    pub fn new(buf: &'a mut [f32], blocks: [(usize, [usize; 4], [usize; 4]); 3]) -> Result<Self, KernelError> {
        let op = "attention_backward (fused gradients)";
        let [(_, _, first), ..] = blocks;
        let mut columns = Vec::with_capacity(3);
        for (name, (offset, shape, strides)) in ["dq", "dk", "dv"].into_iter().zip(blocks) {
            let laid_out =
                strides[3] == 1 && strides[1] == shape[3] && strides[0] == first[0] && strides[2] == first[2];
            if !laid_out {
                return Err(KernelError::InvalidArgument {
                    op,
                    what: name,
                    got: format!("shape {shape:?}, strides {strides:?}"),
                    expected: "contiguous heads side by side in rows shared with the other blocks",
                });
            }
            let needed = span(shape, strides).and_then(|n| n.checked_add(offset));
            if needed.is_none_or(|n| n > buf.len()) {
                return Err(KernelError::OutOfBounds {
                    op,
                    tensor: name,
                    shape: shape.to_vec(),
                    strides: strides.to_vec(),
                    needed: needed.unwrap_or(usize::MAX),
                    len: buf.len(),
                });
            }
            columns.push((offset, offset + shape[1] * shape[3], shape[0], shape[2]));
        }
        columns.sort_unstable();
        let disjoint = columns.windows(2).all(|w| w[0].1 <= w[1].0);
        let (start, end) = (columns[0].0, columns[2].1);
        let (rows_b, rows_s) = columns.iter().fold((0, 0), |(b, s), c| (b.max(c.2), s.max(c.3)));
        // Every row's columns `start..end` apart from every other row's.
        let rows_apart = is_non_overlapping([rows_b, rows_s, end - start], [first[0], first[2], 1]);
        if !(disjoint && rows_apart) {
            return Err(KernelError::OverlappingDestination {
                op,
                tensor: "dq, dk, dv",
                shape: vec![rows_b, rows_s, end - start],
                strides: vec![first[0], first[2], 1],
            });
        }
        Ok(FusedGradients { buf, blocks })
    }
}

/// Which algorithm a backward call runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackwardPath {
    /// A key pass for `dK`, `dV` and a query pass for `dQ`, over blocks of 128 keys.
    TwoPass,
    /// One pass per `(b, g)` over all its keys (in blocks of 256), rows in tiles of 64.
    OnePass,
    /// Unfused: per `(b, g)`, each head's whole `[S, T]` probabilities and score gradients in
    /// memory, and every product one GEMM over the head.
    Unfused,
}

/// The floats the one pass may spend on partial sums of `dK` and `dV` when it cuts rows into
/// chunks (128 MiB): beyond, a call with few `(b, g)` and long keys takes two passes.
const PARTIAL_FLOATS: usize = 32 << 20;

/// The path [`attention_backward`] takes for `groups = B·G` key/value heads, `s` query rows,
/// `t` keys and head sizes `widths = D + Dv`: by shape only, so results stay the same from run
/// to run.
pub fn backward_path(groups: usize, s: usize, t: usize, widths: usize) -> BackwardPath {
    if s.saturating_mul(t) <= UNFUSED_MAX_SCORES {
        BackwardPath::Unfused
    } else if t <= ONE_PASS_SHORT_KEYS || row_chunks(groups, s, t, widths) * groups >= ONE_PASS_MIN_TASKS {
        BackwardPath::OnePass
    } else {
        BackwardPath::TwoPass
    }
}

/// The chunks the one pass cuts each `(b, g)`'s rows into: enough for [`ONE_PASS_TASKS`]
/// tasks, at most one per [`CHUNK_MIN_ROWS`] rows (rounded up), or beyond
/// [`ONE_PASS_SHORT_KEYS`] keys, where that makes too few tasks, per [`CHUNK_FEW_ROWS`] rows and
/// then per [`CHUNK_LEAST_ROWS`] (the smallest when none make enough), their partial sums of `dK`
/// and `dV` (`chunks · groups · t · widths` floats) within [`PARTIAL_FLOATS`]; 1 from 8
/// `(b, g)`. A function of the shape alone, so the bits do not depend on the thread count.
fn row_chunks(groups: usize, s: usize, t: usize, widths: usize) -> usize {
    if groups >= ONE_PASS_TASKS {
        return 1;
    }
    let affordable = PARTIAL_FLOATS / groups.saturating_mul(t).saturating_mul(widths).max(1);
    let chunks = |rows_each: usize| {
        ONE_PASS_TASKS
            .div_ceil(groups.max(1))
            .min(s.div_ceil(rows_each))
            .min(affordable)
            .max(1)
    };
    let wide = chunks(CHUNK_MIN_ROWS);
    if t <= ONE_PASS_SHORT_KEYS {
        return wide;
    }
    // Beyond, the largest chunks that make enough tasks, else the smallest.
    [CHUNK_MIN_ROWS, CHUNK_FEW_ROWS]
        .into_iter()
        .map(chunks)
        .find(|c| c * groups >= ONE_PASS_MIN_TASKS)
        .unwrap_or_else(|| chunks(CHUNK_LEAST_ROWS))
}

/// The gradients of `sum(out ∘ dout)` with respect to `q`, `k` and `v`, where `out` is
/// attention of `q`, `k`, `v` under `options` ([`crate::attention`]): what PyTorch's
/// `out.backward(dout)` gives. Masks, ALiBi slopes and key lengths get no gradient. With
/// `Par::Rayon` the work runs on the current rayon pool; the result is bit-identical to
/// `Par::Seq` and across thread counts.
pub fn attention_backward(
    grads: Gradients<'_>,
    inputs: BackwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let [b, g, t, d] = inputs.k.shape();
    let path = backward_path(b * g, inputs.q.shape()[2], t, d + inputs.v.shape()[3]);
    attention_backward_path(grads, inputs, options, par, path)
}

/// [`attention_backward`] on the path named (for tests and benchmarks; both give results within
/// rounding of each other).
pub fn attention_backward_path(
    grads: Gradients<'_>,
    inputs: BackwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
    path: BackwardPath,
) -> Result<(), KernelError> {
    backward_in_blocks(grads, inputs, options, par, path, ONE_PASS_KEYS)
}

/// [`attention_backward_path`] with the one pass walking its keys in blocks of `one_pass_keys`
/// (a multiple of 16; the tests ask that the block size not change the bits on the tile kernel).
fn backward_in_blocks(
    grads: Gradients<'_>,
    inputs: BackwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
    path: BackwardPath,
    one_pass_keys: usize,
) -> Result<(), KernelError> {
    let op = "attention_backward";
    crate::bf16::require_f32(op, options)?;
    let plan = validate_inputs(op, &inputs, options)?;
    check_gradients(op, [grads.dq.shape(), grads.dk.shape(), grads.dv.shape()], &inputs)?;
    let Gradients { mut dq, mut dk, mut dv } = grads;
    let outs = [Out::new(&mut dq), Out::new(&mut dk), Out::new(&mut dv)];
    run_backward(outs, inputs, options, par, path, plan, one_pass_keys)
}

/// [`attention_backward`] writing into column blocks of one buffer ([`FusedGradients`]): the
/// same values, the same bits.
pub fn attention_backward_fused(
    grads: FusedGradients<'_>,
    inputs: BackwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let op = "attention_backward";
    crate::bf16::require_f32(op, options)?;
    let plan = validate_inputs(op, &inputs, options)?;
    let FusedGradients { buf, blocks } = grads;
    check_gradients(op, blocks.map(|(_, shape, _)| shape), &inputs)?;
    let base = buf.as_mut_ptr();
    let out = |(offset, _, strides): (usize, [usize; 4], [usize; 4])| Out {
        // SAFETY: `FusedGradients::new` checked each block, offset included, in bounds of `buf`.
        ptr: SharedMut(unsafe { base.add(offset) }),
        strides,
    };
    let [q, k, v] = blocks;
    let [b, g, t, d] = inputs.k.shape();
    let path = backward_path(b * g, inputs.q.shape()[2], t, d + inputs.v.shape()[3]);
    run_backward(
        [out(q), out(k), out(v)],
        inputs,
        options,
        par,
        path,
        plan,
        ONE_PASS_KEYS,
    )
}

/// The forward's checks of `q`, `k`, `v`, `out`, `lse` and the options, and `dout` and
/// `lse_lo` against `out` and `lse`: the call's plan.
fn validate_inputs(
    op: &'static str,
    inputs: &BackwardInputs<'_>,
    options: &AttentionOptions<'_>,
) -> Result<crate::flash::Plan, KernelError> {
    let plan = validate(
        op,
        inputs.out.shape(),
        Some(inputs.lse.shape()),
        &inputs.q,
        &inputs.k,
        &inputs.v,
        options,
    )?;
    if inputs.dout.shape() != inputs.out.shape() {
        return Err(KernelError::shape(
            op,
            "dout",
            inputs.out.shape().to_vec(),
            inputs.dout.shape().to_vec(),
        ));
    }
    if let Some(lo) = &inputs.lse_lo {
        if lo.shape() != inputs.lse.shape() {
            return Err(KernelError::shape(
                op,
                "lse_lo",
                inputs.lse.shape().to_vec(),
                lo.shape().to_vec(),
            ));
        }
    }
    Ok(plan)
}

/// The gradients' shapes `[dq, dk, dv]` against the inputs' `q`, `k`, `v`.
fn check_gradients(op: &'static str, shapes: [[usize; 4]; 3], inputs: &BackwardInputs<'_>) -> Result<(), KernelError> {
    let want = [inputs.q.shape(), inputs.k.shape(), inputs.v.shape()];
    for ((name, got), want) in ["dq", "dk", "dv"].into_iter().zip(shapes).zip(want) {
        if got != want {
            return Err(KernelError::shape(op, name, want.to_vec(), got.to_vec()));
        }
    }
    Ok(())
}
