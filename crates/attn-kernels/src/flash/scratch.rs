//! A row tile's working set: the per-thread scratch buffers, the tile's rows and the key block
//! in hand, shared by the f32 passes (`tile.rs`) and the bf16 ones (`tile_bf16.rs`).

use super::{Plan, BLOCK_ROWS, P16_LD, SCORES_LD};
use crate::buffer::Buffer;

/// Per-worker scratch: kept per thread between tasks and calls ([`with_scratch`]), each
/// buffer 64-byte aligned; every element a tile reads it has written first.
pub(super) struct Scratch {
    /// `[BLOCK_ROWS, D]`: the tile's query rows, times the scale.
    pub(super) q_tile: Buffer,
    /// `[BLOCK_ROWS, plan.scores_ld]`: scores, then probabilities (`plan.block_keys` used per
    /// row); room for the f32 kernel's [`SCORES_LD`], the larger stride.
    pub(super) scores: Buffer,
    /// `[BLOCK_ROWS, Dv_pad]`: the unnormalised output rows.
    pub(super) acc: Buffer,
    /// `[kb_pad / NR, D, NR]`: the key block in transposed panels (when K is not packed).
    pub(super) kt: Buffer,
    /// `[Dv_pad / NR, kb_pad, NR]`: the value block in panels (when V is not packed and cannot
    /// be read in place).
    pub(super) vp: Buffer,
    /// `[BLOCK_ROWS, 16]`: each row's maximum over a key block in the running level's lanes
    /// (pass 1, `block_scores`).
    pub(super) maxes: Buffer,
    pub(super) m: Buffer,
    pub(super) l: Buffer,
    /// `[BLOCK_ROWS, D / 2]` words: the scaled query rows rounded to bf16 pairs (bf16 calls;
    /// as A tiles on AMX, `D / 2` rounded up to whole steps).
    pub(super) q16: Buffer,
    /// `[BLOCK_ROWS, P16_LD]` words: a bf16 block's probabilities rounded to bf16 pairs.
    pub(super) p16: Buffer,
    /// `[BLOCK_ROWS, T]`: the tile's masked scores over all keys, kept for the weights
    /// (sized by [`Scratch::keep_room`], only when a call asks for them).
    pub(super) kept: Buffer,
}

impl Scratch {
    fn new(plan: &Plan) -> Self {
        Scratch {
            q_tile: Buffer::zeroed(BLOCK_ROWS * plan.d),
            scores: Buffer::zeroed(BLOCK_ROWS * SCORES_LD),
            acc: Buffer::zeroed(BLOCK_ROWS * plan.dv_pad),
            kt: Buffer::zeroed(plan.d * plan.kb_pad),
            vp: Buffer::zeroed(plan.kb_pad * plan.dv_pad),
            maxes: Buffer::zeroed(BLOCK_ROWS * 16),
            m: Buffer::zeroed(BLOCK_ROWS),
            l: Buffer::zeroed(BLOCK_ROWS),
            q16: Buffer::zeroed(BLOCK_ROWS * q16_words(plan)),
            p16: Buffer::zeroed(BLOCK_ROWS * P16_LD),
            kept: Buffer::zeroed(0),
        }
    }

    /// Makes [`Scratch::kept`] hold `[BLOCK_ROWS, t]`.
    pub(super) fn keep_room(&mut self, t: usize) {
        if self.kept.len() < BLOCK_ROWS * t {
            self.kept = Buffer::zeroed(BLOCK_ROWS * t);
        }
    }

    /// Whether every buffer is large enough for `plan`.
    fn fits(&self, plan: &Plan) -> bool {
        self.q_tile.len() >= BLOCK_ROWS * plan.d
            && self.acc.len() >= BLOCK_ROWS * plan.dv_pad
            && self.kt.len() >= plan.d * plan.kb_pad
            && self.vp.len() >= plan.kb_pad * plan.dv_pad
            && self.q16.len() >= BLOCK_ROWS * q16_words(plan)
    }
}

/// Words per query row of [`Scratch::q16`]: `D / 2` pairs, rounded up to whole AMX steps.
fn q16_words(plan: &Plan) -> usize {
    super::bf16::key_pairs(plan, true)
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's scratch, made or enlarged for `plan` when needed and kept for
/// the next task or call.
pub(super) fn with_scratch<R>(plan: &Plan, f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut scratch = SCRATCH
        .take()
        .filter(|s| s.fits(plan))
        .unwrap_or_else(|| Scratch::new(plan));
    let result = f(&mut scratch);
    SCRATCH.set(Some(scratch));
    result
}

/// The tile's fixed indices and rows: batch `b`, key/value head `g`, `n_rows` stacked query rows
/// with their `(s, h)` and each row's key limit (causal, key length).
pub(super) struct TileRows {
    pub(super) b: usize,
    pub(super) g: usize,
    pub(super) n_rows: usize,
    pub(super) positions: [(usize, usize); BLOCK_ROWS],
    pub(super) limits: [usize; BLOCK_ROWS],
}

/// One key block `[t0, t0 + bc)` and the offset of its first value.
pub(super) struct KeyBlock {
    pub(super) t0: usize,
    pub(super) bc: usize,
    pub(super) v_base: usize,
    /// Whether this is the tile's first visited block: its pass 4 writes the accumulator
    /// (`acc = p · v`) instead of adding to it, the bits of adding to zeros.
    pub(super) first: bool,
}
