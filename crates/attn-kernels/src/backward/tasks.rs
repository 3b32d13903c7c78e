//! The backward's tasks: the key pass, the query pass and the one pass over tiles of rows and
//! keys, each writing the gradient elements it owns (see the parent module for who owns what),
//! with their per-thread scratch; one tile's steps are in `steps.rs`.

use crate::buffer;
use crate::mask::resolve_scale;
use crate::scores::{key_panels, ScoreKernel};
use crate::tile::{pad_to_nr, NR};
use crate::view::SharedMut;
use crate::{AttentionOptions, KernelError, Par, ViewMut4};

use super::{BackwardInputs, BackwardPath, KEYS, ROWS};

mod steps;

/// The backward into the three destinations, once the call is validated.
pub(super) fn run_backward(
    [dq, dk, dv]: [Out; 3],
    inputs: BackwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
    path: BackwardPath,
    plan: crate::flash::Plan,
    one_pass_keys: usize,
) -> Result<(), KernelError> {
    debug_assert!(one_pass_keys > 0 && one_pass_keys.is_multiple_of(NR));
    let shape = Shape {
        b: plan.b,
        h: plan.h,
        g: plan.g,
        s: plan.s,
        t: plan.t,
        d: plan.d,
        dv: plan.dv,
    };
    let delta = super::deltas::row_deltas(&inputs, [shape.b, shape.h, shape.s, shape.dv], par);
    let job = Job {
        shape,
        inputs,
        options,
        scale: resolve_scale(options, plan.d),
        score_kernel: ScoreKernel::for_call(plan.rows_per_group, inputs.k.strides()[3] == 1),
        delta: &delta,
        dq,
        dk,
        dv,
        one_pass_keys,
    };
    let one_pass = path != BackwardPath::TwoPass || plan.t <= KEYS;
    if plan.t == 0 {
        // No keys: every row sees nothing, so its `dQ` is zero; `dK` and `dV` are empty.
        let zeros = vec![0.0; plan.s * plan.d];
        for (b, h) in (0..plan.b).flat_map(|b| (0..plan.h).map(move |h| (b, h))) {
            // SAFETY: every row of every head, in bounds of the checked `dq`.
            unsafe { job.dq.write_rows([b, h, 0], &zeros, plan.d, 1.0) };
        }
    } else if !one_pass {
        let blocks = plan.t.div_ceil(KEYS);
        run(plan.b * plan.g * blocks, par, |scratch, task| {
            let (bg, block) = (task / blocks, task % blocks);
            let keys = block * KEYS..(block * KEYS + KEYS).min(plan.t);
            let span = Span::new(&job.shape, bg, keys, 0..plan.s);
            job.key_task(scratch, span, KEYS, ROWS, QuerySums::None, [job.dk, job.dv]);
        });
        let query_tasks = plan.b * plan.h * plan.s.div_ceil(ROWS);
        run(query_tasks, par, |scratch, task| job.query_task(scratch, task));
    } else if path == BackwardPath::Unfused {
        // The one pass with a single row tile and a single block of keys: whole heads.
        run(plan.b * plan.g, par, |scratch, bg| {
            let span = Span::new(&job.shape, bg, 0..plan.t, 0..plan.s);
            // `max(1)`: a row tile of no rows would be a step of 0.
            job.key_task(scratch, span, plan.t, plan.s.max(1), QuerySums::Tile, [job.dk, job.dv]);
        });
    } else {
        job.one_pass(
            par,
            super::row_chunks(plan.b * plan.g, plan.s, plan.t, plan.d + plan.dv),
        );
    }
    buffer::give(delta);
    Ok(())
}

/// What a key task covers: key/value head `(b, g)`, keys `keys` and query rows `rows` of
/// every head of the group.
#[derive(Clone)]
struct Span {
    b: usize,
    g: usize,
    keys: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    /// Its sums of `dK` and `dV` are one chunk's partial sums: a block of keys the task does
    /// not visit ([`Job::visits`]) is left unwritten, and the chunks' reduction leaves it out;
    /// otherwise zeros are written there.
    partial: bool,
}

impl Span {
    /// Key/value head `bg` (`b·G + g`) of `shape`.
    fn new(shape: &Shape, bg: usize, keys: std::ops::Range<usize>, rows: std::ops::Range<usize>) -> Self {
        Span {
            b: bg / shape.g,
            g: bg % shape.g,
            keys,
            rows,
            partial: false,
        }
    }
}

/// The sizes of a call.
#[derive(Debug, Clone, Copy)]
struct Shape {
    b: usize,
    h: usize,
    g: usize,
    s: usize,
    t: usize,
    d: usize,
    dv: usize,
}

/// A gradient destination shared by the tasks, each of which writes its own rows.
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub(super) ptr: SharedMut,
    pub(super) strides: [usize; 4],
}

impl Out {
    pub(super) fn new(view: &mut ViewMut4<'_, f32>) -> Self {
        Out {
            ptr: SharedMut(view.data_mut().as_mut_ptr()),
            strides: view.strides(),
        }
    }

    /// A dense `[B, X, L, W]` array at `ptr`.
    ///
    /// # Safety
    /// `ptr` must hold the array's elements for as long as the `Out` is written.
    unsafe fn contiguous(ptr: *mut f32, shape: [usize; 4]) -> Self {
        Out {
            ptr: SharedMut(ptr),
            strides: crate::view::contiguous_strides(shape),
        }
    }

    /// `dst[i, j, r0 + r, c] = scale · rows[r·width + c]`.
    ///
    /// # Safety
    /// The rows must be in bounds of the view and owned by the calling task.
    unsafe fn write_rows(self, [i, j, r0]: [usize; 3], rows: &[f32], width: usize, scale: f32) {
        let st = self.strides;
        for (r, row) in rows.chunks_exact(width).enumerate() {
            let base = i * st[0] + j * st[1] + (r0 + r) * st[2];
            if st[3] == 1 {
                // SAFETY: in bounds and owned, by the caller's contract; `rows` is the caller's
                // own buffer, apart from the destination.
                let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.get().add(base), width) };
                dst.iter_mut().zip(row).for_each(|(d, &x)| *d = x * scale);
                continue;
            }
            for (c, &x) in row.iter().enumerate() {
                // SAFETY: in bounds and owned, by the caller's contract.
                unsafe { *self.ptr.get().add(base + c * st[3]) = x * scale };
            }
        }
    }
}

/// One worker's tiles, kept per thread and reused from task to task and from call to call, as
/// the forward's are: a task sizes each buffer it uses and resets `packed_keys` before reading it.
#[derive(Default)]
struct Scratch {
    /// `[ROWS, D]`: query rows times the scale.
    q_tile: Vec<f32>,
    /// `[ROWS, key block]` (rows `Job::p_ld` apart): probabilities, then `dS`.
    p: Vec<f32>,
    /// The key block in transposed panels, for the tile kernel.
    kt: Vec<f32>,
    /// The value block in transposed panels, for the tile kernel's `dP = dO·Vᵀ`.
    vt: Vec<f32>,
    /// `[ROWS, Dv]`: the tile's rows of `dO`, contiguous, for the same product (and for `dV`'s
    /// on the tile kernel when `dO` is strided along `Dv`).
    dout_tile: Vec<f32>,
    /// `(b, g, t0, bc)` when `kt` and `vt` hold that key block for the whole key task.
    packed_keys: Option<(usize, usize, usize, usize)>,
    /// `[ROWS, key block]` (rows `Job::p_ld` apart): `dP`.
    dp: Vec<f32>,
    /// `[key block, D]` and `[key block, Dv]`: the key task's sums.
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// `dQ` sums: `[rows, D]` for a query task or a one-pass task with one block of keys;
    /// `[H/G, S, D]` for a one-pass task with several ([`QuerySums`]).
    dq: Vec<f32>,
}

impl Scratch {
    /// Whether `kt` and `vt` hold the key block `tile` reads, packed once for its key task.
    fn holds_block(&self, tile: &Tile) -> bool {
        self.packed_keys
            .is_some_and(|(pb, pg, pt0, pbc)| (pb, pg, pt0) == (tile.b, tile.g, tile.t0) && tile.bc <= pbc)
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

/// Runs `body(scratch, task)` for every task, in order or on the rayon pool, each with the
/// running thread's scratch.
fn run(tasks: usize, par: Par, body: impl Fn(&mut Scratch, usize) + Sync + Send) {
    let task = |task: usize| {
        let mut scratch = SCRATCH.take().unwrap_or_default();
        body(&mut scratch, task);
        SCRATCH.set(Some(scratch));
    };
    par.for_each_task(tasks, task);
}

/// Everything a task reads, and where it writes.
struct Job<'a, 'o> {
    shape: Shape,
    inputs: BackwardInputs<'a>,
    options: &'o AttentionOptions<'a>,
    scale: f32,
    /// The forward's score arithmetic for this call (`crate::scores`).
    score_kernel: ScoreKernel,
    delta: &'o [f32],
    dq: Out,
    dk: Out,
    dv: Out,
    /// Keys per block of the one pass ([`ONE_PASS_KEYS`](super::ONE_PASS_KEYS)).
    one_pass_keys: usize,
}

/// Where a key block's share of `dQ` goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QuerySums {
    /// Nowhere: the two-pass path's query pass computes `dQ`.
    None,
    /// The one pass's only block: each row tile's `dQ` is whole once the tile is done, summed
    /// in `[rows, D]` and written then.
    Tile,
    /// One of the one pass's several blocks: added to `[H/G, S, D]` sums, every row of the
    /// task's heads, written after the last block.
    Heads,
}

/// The rows `[r0, r0 + rows)` of head `h` against keys `[t0, t0 + bc)`, as one tile.
#[derive(Clone, Copy)]
struct Tile {
    b: usize,
    h: usize,
    g: usize,
    r0: usize,
    rows: usize,
    t0: usize,
    bc: usize,
}

impl Job<'_, '_> {
    /// The key limit of row `s` of batch `b` (causal alignment and key length together).
    fn limit(&self, b: usize, s: usize) -> usize {
        let sh = &self.shape;
        let key_length = self.options.key_lengths.map_or(sh.t, |l| l[b]);
        self.options.causal.key_limit(s, sh.s, sh.t).min(key_length)
    }

    /// One past the last key any row of `[r0, r0 + rows)` may see.
    fn keys_seen(&self, b: usize, r0: usize, rows: usize) -> usize {
        (r0..r0 + rows).map(|s| self.limit(b, s)).max().unwrap_or(0)
    }

    /// Whether a key task whose keys start at `first`, whose rows see keys up to `seen`
    /// ([`Job::keys_seen`]) and whose query sums are `sums` visits the block of keys starting
    /// at `t0`: when some row sees into it, and the first block always where that block writes
    /// each row tile's `dQ` ([`QuerySums::Tile`]). A block left out adds nothing to `dK` and
    /// `dV` (every row's probability there is zero), and packing its keys and values, zeroing
    /// its sums and, with chunks of rows, adding them up would cost more than the few rows that
    /// see anything at all (causal rows before long keys, short key lengths).
    fn visits(first: usize, seen: usize, t0: usize, sums: QuerySums) -> bool {
        t0 < seen || (sums == QuerySums::Tile && t0 == first)
    }

    /// The one pass: a task per `(b, g)` and chunk of `chunks` of the rows
    /// ([`row_chunks`](super::row_chunks)), over every key. With one chunk each task writes its
    /// `dK` and `dV`; with more, each chunk's sums go to a buffer of partial sums, which the
    /// chunks then add in order, key block by key block, into `dK` and `dV`.
    fn one_pass(&self, par: Par, chunks: usize) {
        let sh = self.shape;
        let groups = sh.b * sh.g;
        let chunk_rows = (sh.s.div_ceil(ROWS).div_ceil(chunks.max(1)) * ROWS).max(ROWS);
        let chunks = sh.s.div_ceil(chunk_rows).max(1);
        let block = self.one_pass_keys;
        let sums = if sh.t > block {
            QuerySums::Heads
        } else {
            QuerySums::Tile
        };
        if chunks == 1 {
            run(groups, par, |scratch, bg| {
                let span = Span::new(&sh, bg, 0..sh.t, 0..sh.s);
                self.key_task(scratch, span, block, ROWS, sums, [self.dk, self.dv]);
            });
            return;
        }
        // `[chunks, B, G, T, D]` then `[chunks, B, G, T, Dv]`, in one buffer: every element
        // written by its chunk's task (each key block's sums, seen or not).
        let (per_k, per_v) = (groups * sh.t * sh.d, groups * sh.t * sh.dv);
        let mut parts = buffer::take(chunks * (per_k + per_v));
        let base_k = SharedMut(parts.as_mut_ptr());
        // SAFETY: the `Dv` sums start after the `D` sums, in bounds.
        let base_v = SharedMut(unsafe { base_k.get().add(chunks * per_k) });
        run(groups * chunks, par, |scratch, task| {
            let (bg, c) = (task / chunks, task % chunks);
            let rows = c * chunk_rows..((c + 1) * chunk_rows).min(sh.s);
            let span = Span {
                partial: true,
                ..Span::new(&sh, bg, 0..sh.t, rows)
            };
            // SAFETY: chunk `c` of each buffer, `per_k` (`per_v`) floats in bounds; each task
            // writes its own `(b, g)` of its own chunk.
            let outs = unsafe {
                [
                    Out::contiguous(base_k.get().add(c * per_k), [sh.b, sh.g, sh.t, sh.d]),
                    Out::contiguous(base_v.get().add(c * per_v), [sh.b, sh.g, sh.t, sh.dv]),
                ]
            };
            self.key_task(scratch, span, block, ROWS, sums, outs);
        });
        let blocks = sh.t.div_ceil(block);
        let (sums_k, sums_v) = parts.split_at(chunks * per_k);
        run(groups * blocks, par, |scratch, task| {
            let (bg, t0) = (task / blocks, task % blocks * block);
            let keys = t0..(t0 + block).min(sh.t);
            let [b, g] = [bg / sh.g, bg % sh.g];
            // The chunks whose tasks wrote this block, in order.
            let wrote = |c: usize| {
                let r0 = c * chunk_rows;
                Self::visits(0, self.keys_seen(b, r0, chunk_rows.min(sh.s - r0)), t0, sums)
            };
            let writers: Vec<usize> = (0..chunks).filter(|&c| wrote(c)).collect();
            for (parts, width, out) in [(sums_k, sh.d, self.dk), (sums_v, sh.dv, self.dv)] {
                let at = |c: usize| (c * groups + bg) * sh.t * width;
                let span = keys.start * width..keys.end * width;
                // The worker's `dK` sums buffer, free between key tasks, holds these sums:
                // zeros where no chunk wrote the block.
                let sums = &mut scratch.dk;
                sums.clear();
                match writers.split_first() {
                    Some((&first, rest)) => {
                        sums.extend_from_slice(&parts[at(first)..][span.clone()]);
                        for &c in rest {
                            sums.iter_mut()
                                .zip(&parts[at(c)..][span.clone()])
                                .for_each(|(x, &y)| *x += y);
                        }
                    }
                    None => sums.resize(span.len(), 0.0),
                }
                // SAFETY: keys `keys` of `(b, g)` belong to this task alone.
                unsafe { out.write_rows([b, g, keys.start], sums, width, 1.0) };
            }
        });
        buffer::give(parts);
    }

    /// The keys of `span` against its rows of every head of its group, in blocks of `block` keys
    /// and row tiles of `row_tile`: `dK` and `dV` of those keys (their sums over those rows) into
    /// `key_outs`, and `dQ` of those rows as `sums` says. Each key's sums and each row's `dQ`
    /// add in the same order whatever the block, so on the tile kernel the block size does not
    /// change the bits.
    fn key_task(
        &self,
        scratch: &mut Scratch,
        span: Span,
        block: usize,
        row_tile: usize,
        sums: QuerySums,
        key_outs: [Out; 2],
    ) {
        let sh = self.shape;
        let Span {
            b,
            g,
            keys,
            rows,
            partial,
        } = span;
        let rep = sh.h / sh.g;
        let height = rows.len();
        if sums == QuerySums::Heads {
            scratch.dq.clear();
            scratch.dq.resize(rep * height * sh.d, 0.0);
        }
        let seen = self.keys_seen(b, rows.start, height);
        for t0 in keys.clone().step_by(block) {
            if !Self::visits(keys.start, seen, t0, sums) {
                // No row sees these keys or any after them: zero sums, or none for a chunk.
                if !partial {
                    let n = keys.end - t0;
                    for (out, width) in [(key_outs[0], sh.d), (key_outs[1], sh.dv)] {
                        scratch.dk.clear();
                        scratch.dk.resize(n * width, 0.0);
                        // SAFETY: keys `[t0, keys.end)` of `(b, g)` belong to this task alone.
                        unsafe { out.write_rows([b, g, t0], &scratch.dk, width, 1.0) };
                    }
                }
                break;
            }
            let bc = (keys.end - t0).min(block);
            self.key_block(scratch, [b, g, t0, bc], rows.clone(), row_tile, sums, key_outs);
        }
        if sums == QuerySums::Heads && height * sh.d > 0 {
            for (h, dq) in (g * rep..).zip(scratch.dq.chunks_exact(height * sh.d)) {
                // SAFETY: rows `rows` of head `h` belong to this task alone (its group's heads
                // and rows, all keys).
                unsafe { self.dq.write_rows([b, h, rows.start], dq, sh.d, self.scale) };
            }
        }
    }

    /// Keys `[t0, t0 + bc)` of `(b, g)` against every row of the group's heads: their `dK`,
    /// `dV`, and their share of `dQ` as `sums` says.
    fn key_block(
        &self,
        scratch: &mut Scratch,
        [b, g, t0, bc]: [usize; 4],
        rows_of: std::ops::Range<usize>,
        row_tile: usize,
        sums: QuerySums,
        [dk, dv]: [Out; 2],
    ) {
        let sh = self.shape;
        scratch.dk.clear();
        scratch.dk.resize(bc * sh.d, 0.0);
        scratch.dv.clear();
        scratch.dv.resize(bc * sh.dv, 0.0);
        // The tile kernel reads the block's keys (for the scores) and values (for `dP`) in
        // transposed panels: made once here for every row tile and head of the group, not once
        // per tile.
        scratch.packed_keys = None;
        if self.score_kernel == ScoreKernel::Tile && bc > 0 {
            let (k, v) = (self.inputs.k, self.inputs.v);
            let (k_st, v_st) = (k.strides(), v.strides());
            scratch.kt.resize(pad_to_nr(bc) * sh.d, 0.0);
            let keys = &k.data()[k.offset([b, g, t0, 0])..];
            key_panels(&mut scratch.kt, keys, bc, sh.d, k_st[2], k_st[3]);
            scratch.vt.resize(pad_to_nr(bc) * sh.dv, 0.0);
            let values = &v.data()[v.offset([b, g, t0, 0])..];
            key_panels(&mut scratch.vt, values, bc, sh.dv, v_st[2], v_st[3]);
            scratch.packed_keys = Some((b, g, t0, bc));
        }
        let rep = sh.h / sh.g;
        for h in g * rep..(g + 1) * rep {
            for r0 in rows_of.clone().step_by(row_tile) {
                let rows = (rows_of.end - r0).min(row_tile);
                // Only the keys some row of the tile may see: under a causal mask the early row
                // tiles stop well before the block's end.
                let seen = self.keys_seen(b, r0, rows).min(t0 + bc);
                let tile = Tile {
                    b,
                    h,
                    g,
                    r0,
                    rows,
                    t0,
                    bc: seen.saturating_sub(t0),
                };
                let at = match sums {
                    QuerySums::Heads => ((h - g * rep) * rows_of.len() + r0 - rows_of.start) * sh.d,
                    QuerySums::Tile => {
                        scratch.dq.clear();
                        scratch.dq.resize(rows * sh.d, 0.0);
                        0
                    }
                    QuerySums::None => 0,
                };
                if tile.bc > 0 {
                    self.probabilities(scratch, tile);
                    self.value_gradient(scratch, tile);
                    self.score_gradient(scratch, tile);
                    self.key_gradient(scratch, tile);
                    if sums != QuerySums::None {
                        self.query_gradient(scratch, tile, at);
                    }
                }
                if sums == QuerySums::Tile {
                    // SAFETY: rows `[r0, r0 + rows)` of head `h` belong to this task alone (its
                    // group's heads, all keys).
                    unsafe { self.dq.write_rows([b, h, r0], &scratch.dq, sh.d, self.scale) };
                }
            }
        }
        // SAFETY: keys `[t0, t0 + bc)` of `(b, g)` in `dk` and `dv` belong to this task alone.
        unsafe {
            dk.write_rows([b, g, t0], &scratch.dk, sh.d, 1.0);
            dv.write_rows([b, g, t0], &scratch.dv, sh.dv, 1.0);
        }
    }

    /// The query task `(b, h, row tile)`: `dQ` of its rows over every key block.
    fn query_task(&self, scratch: &mut Scratch, task: usize) {
        let sh = self.shape;
        let tiles = sh.s.div_ceil(ROWS);
        let (bh, tile) = (task / tiles, task % tiles);
        let (b, h) = (bh / sh.h, bh % sh.h);
        let g = h / (sh.h / sh.g);
        let r0 = tile * ROWS;
        let rows = (sh.s - r0).min(ROWS);
        scratch.dq.clear();
        scratch.dq.resize(rows * sh.d, 0.0);
        scratch.packed_keys = None;
        // Key blocks past every row's limit are never visited.
        let seen = self.keys_seen(b, r0, rows).min(sh.t);
        for t0 in (0..seen).step_by(KEYS) {
            let tile = Tile {
                b,
                h,
                g,
                r0,
                rows,
                t0,
                bc: (seen - t0).min(KEYS),
            };
            self.probabilities(scratch, tile);
            self.score_gradient(scratch, tile);
            self.query_gradient(scratch, tile, 0);
        }
        // SAFETY: rows `[r0, r0 + rows)` of `(b, h)` belong to this task alone.
        unsafe { self.dq.write_rows([b, h, r0], &scratch.dq, sh.d, self.scale) };
    }
}
