//! Flash-style attention forward: tiled over query rows and key blocks with an online softmax
//! (FlashAttention-2 loop order), never materialising an `S×T` score matrix.
//!
//! Shapes: `q: [B, H, S, D]`, `k: [B, G, T, D]`, `v: [B, G, T, Dv]` -> `out: [B, H, S, Dv]`,
//! `lse: [B, H, S]`; `G` divides `H` and query head `h` reads key/value head `h / (H / G)`.
//!
//! # How the work is cut
//! The query rows that share one key/value head, `(s, h)` for the `H/G` heads of group `g`, are
//! stacked into one sequence of `S·H/G` rows (s-major), so grouped-query and multi-query
//! attention read each K/V tile once for all heads of the group, with no copy of K or V. That
//! sequence is cut into tiles of [`BLOCK_ROWS`] rows; a task is one `(b, g, row tile, key split)`.
//! The number of key splits is 1 unless there are fewer than [`MIN_TASKS`] tasks (decoding:
//! `S = 1`, long `T`); then the keys are split so that all cores have work, and the partial
//! results are merged in split order afterwards. Every choice depends on the shapes only, never
//! on the thread count, and each row's arithmetic runs on one thread in a fixed order: results
//! are bit-identical for any number of threads.
//!
//! # One tile, passes numbered as in the reference and the unfused path
//! (1: scores and mask; 2: row max, exp and sum; 3: rescale; 4: weighted V)
//! For each key block `[t0, t0 + bc)` of the tile's key range:
//! - pass 1: `scores = (scale·q_tile) · k_blockᵀ` (the level's tile micro-kernel on K
//!   transposed per block, or dot products on K in place for tiles of a few rows; faer's GEMM,
//!   sequential, at the scalar level);
//!   then the mask;
//! - pass 2: row max, `p = exp(scores - m_new)` and its row sum, the online update
//!   `l = l·exp(m_old - m_new) + sum(p)`;
//! - pass 3: rescale the accumulator rows by `exp(m_old - m_new)`;
//! - pass 4: `acc += p · v_block` (the micro-kernel, or row AXPYs for tiles of a few rows; faer's
//!   GEMM at the scalar level).
//!
//! Files: `plan.rs` validates a call and cuts its work, `tile.rs` runs one row tile's passes,
//! `split_kv.rs` merges key splits, `per_group.rs` packs K and V per `(b, g)` in the tasks that
//! read them, `weights.rs` writes a call's weights from the kept scores, `tests.rs` checks all
//! of it against the f64 reference.
//!
//! Finally `out = acc / l` and `lse = m + ln(l)`; a row that saw no key (`l = 0`) writes zeros
//! and `lse = -inf`. Key blocks past the causal limit of the tile's last row, or past the
//! batch's key length, are never visited. A row that comes out non-finite from a finite softmax
//! is repaired afterwards so that hidden keys' values never reach it ([`crate::nonfinite`]).

mod bf16;
#[cfg(target_arch = "x86_64")]
mod bf16_x86;
mod kv_bits;
mod pack;
mod per_group;
mod plan;
mod scratch;
mod split_kv;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_bf16;
#[cfg(test)]
mod tests_bf16_exp;
#[cfg(test)]
mod tests_bf16_route;
#[cfg(test)]
mod tests_bf16_weights;
#[cfg(test)]
mod tests_kv_bits;
#[cfg(test)]
mod tests_per_group;
mod tile;
mod tile_bf16;
mod tile_blocks;
mod tile_convert;
mod tile_values;
mod weights;
mod weights_bf16;

pub(crate) use bf16::rounded_copies;
pub use kv_bits::{attention_bf16_kv, DECODE_ROWS};
use per_group::{attend_per_group, packs_per_group};
pub(crate) use plan::{validate, validate_qk, Plan};
use scratch::{with_scratch, Scratch};
use tile::attend_tile;
pub(crate) use tile::{block_scores, pack_keys_transposed, KeySource, ScoreTile};
pub(crate) use weights::MAX_KEPT_KEYS;
pub(crate) use weights_bf16::Bf16Scores;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::mask::resolve_scale;
use crate::scores::ScoreKernel;
use crate::view::SharedMut;
use crate::weights::RawWeights;
use crate::{AttentionOptions, Bf16Level, ForwardInputs, KernelError, Par, Precision, View4, ViewMut, ViewMut4};

/// Query rows per tile.
pub const BLOCK_ROWS: usize = 64;
/// Keys per block of the f32 kernel. 256 rather than 128 halved the per-row work of each block
/// (the mask, the row max and the sums' reductions, the online update), which measured 6–14% of
/// a one-thread forward at S = T = 512 and 2048, D = 64, on an Intel Xeon; 512 halves it
/// again, 1.5–2.7% of the forward and of decoding on a Zen 3 EPYC (docs/PERFORMANCE.md).
pub const BLOCK_KEYS: usize = 512;
/// Keys per block of the bf16 kernels (`vdpbf16ps` and AMX), and of the f32 kernel when it
/// multiplies operands rounded to bf16 in their place (the same bits on every CPU): the sizes
/// of their tiles and layouts, measured against 128 on an Intel Xeon with AMX and not yet
/// against 512 there.
pub const BF16_BLOCK_KEYS: usize = 256;
/// Row stride of the f32 kernel's score buffer: [`BLOCK_KEYS`] plus one 16-float panel, so the
/// rows (read and written at every pass) do not sit a power of two apart, where they would
/// share a handful of L1 sets.
pub(crate) const SCORES_LD: usize = BLOCK_KEYS + 16;
/// Row stride of the score buffer for [`BF16_BLOCK_KEYS`], as [`SCORES_LD`] for
/// [`BLOCK_KEYS`].
pub(crate) const BF16_SCORES_LD: usize = BF16_BLOCK_KEYS + 16;
/// Words between rows of a tile's probabilities rounded to bf16 pairs at the AVX512-BF16 level
/// (`Scratch::p16`): two probabilities per word, room for a whole block and its last step's
/// padding.
pub(crate) const P16_LD: usize = BF16_SCORES_LD / 2;
/// Below this many `(b, g, row tile)` tasks the keys are split across tasks (decoding).
pub const MIN_TASKS: usize = 32;
/// The smallest number of keys a split covers.
const MIN_KEYS_PER_SPLIT: usize = 512;

/// Flash-style attention: `q: [B, H, S, D]`, `k: [B, G, T, D]`, `v: [B, G, T, Dv]` ->
/// `out: [B, H, S, Dv]` and optionally `lse: [B, H, S]` (natural log of each row's softmax
/// denominator, `-inf` for a row with nothing to attend to).
///
/// All five are strided views, so `[B, S, H, D]` storage is passed as a permuted view without a
/// copy. A row with nothing to attend to gets zeros. With `Par::Rayon` the work runs on the
/// current rayon pool; the result is bit-identical to `Par::Seq`.
///
/// ```
/// use attn_kernels::{flash_attention, AttentionOptions, Causal, ForwardInputs, Par, View4, ViewMut4};
/// let (b, h, s, d) = (1, 2, 3, 4);
/// let q: Vec<f32> = (0..b * h * s * d).map(|i| (i as f32 * 0.1).sin()).collect();
/// let mut out = vec![0.0f32; b * h * s * d];
/// let view = View4::contiguous(&q, [b, h, s, d]).unwrap();
/// let options = AttentionOptions { causal: Causal::TopLeft, ..Default::default() };
/// let out_view = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
/// // Self-attention: the same view as queries, keys and values.
/// flash_attention(out_view, None, ForwardInputs::new(view, view, view), &options, Par::Seq).unwrap();
/// // The first query of a causal call sees only the first key: its output is that key's value.
/// assert_eq!(&out[..d], &q[..d]);
/// ```
pub fn flash_attention(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    flash_impl(out, [lse, None], inputs, options, par, true, None)
}

/// [`flash_attention`], with the repair of values that rows cannot see (see
/// [`crate::nonfinite`]) switched by `repair`; `[lse, lse_lo]` as in
/// [`crate::attention_with_lse_lo`], each optional; and the call's weights written to `weights`
/// when given (calls that [`crate::path::flash_keeps_scores`] gives this kernel; see [`weights`]).
pub(crate) fn flash_impl(
    out: ViewMut4<'_, f32>,
    [lse, lse_lo]: [Option<ViewMut<'_, f32, 3>>; 2],
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
    repair: bool,
    weights: Option<RawWeights>,
) -> Result<(), KernelError> {
    let ForwardInputs { q, k, v } = inputs;
    let plan = validate(
        "flash_attention",
        out.shape(),
        lse.as_ref().map(|l| l.shape()),
        &q,
        &k,
        &v,
        options,
    )?;
    let (mut out, mut lse, mut lse_lo) = (out, lse, lse_lo);
    crate::flash::check_lse_lo("flash_attention", &out, &lse_lo)?;
    let dst = Dst::new(&mut out, &mut lse, &mut lse_lo);
    let scale = resolve_scale(options, plan.d);
    assert!(weights.is_none() || plan.splits == 1);
    let spoilt = match options.precision {
        // No bf16 instructions, or Intel's slow `vdpbf16ps` outside decoding: the f32 kernel
        // rounds the operands in its tiles (as it packs K and V, or puts each block in
        // panels), or as decoding's kernels load them.
        Precision::Bf16 if rounds_into_f32(decodes_in_place(&plan, k.strides(), v.strides())) => {
            if rounds_in_tiles(&plan) || rounds_while_loading(&plan, &k, &v) {
                attend(&plan, inputs, options, scale, Operation::RoundingF32, dst, weights, par)
            } else {
                // Else on rounded copies (the same bits), the scale already applied.
                let copies = bf16::rounded_copies(&[(&q, scale), (&k, 1.0), (&v, 1.0)], par);
                let (qr, rest) = copies.split_at(q.shape().iter().product());
                let (kr, vr) = rest.split_at(k.shape().iter().product());
                let rounded = ForwardInputs::new(
                    View4::contiguous(qr, q.shape())?,
                    View4::contiguous(kr, k.shape())?,
                    View4::contiguous(vr, v.shape())?,
                );
                let spoilt = attend(&plan, rounded, options, 1.0, Operation::RoundedF32, dst, weights, par);
                crate::buffer::give(copies);
                spoilt
            }
        }
        Precision::Bf16 => attend(&plan, inputs, options, scale, Operation::Bf16, dst, weights, par),
        Precision::F32 => attend(&plan, inputs, options, scale, Operation::F32, dst, weights, par),
    };
    if repair && spoilt {
        crate::nonfinite::repair_values(&mut out, &q, &k, &v, options, scale, |out, lse, v| {
            let inputs = ForwardInputs::new(q, k, v);
            flash_impl(out, [Some(lse), None], inputs, options, par, false, None)
        })?;
    }
    Ok(())
}

/// How a call's two products are computed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Operation {
    /// f32 operands.
    F32,
    /// bf16 operands on `vdpbf16ps` or AMX tiles (the AVX512-BF16 and AMX levels).
    Bf16,
    /// Operands already rounded to bf16, multiplied in f32; the probabilities are rounded
    /// before `P·V`.
    RoundedF32,
    /// f32 operands rounded to bf16 as the kernel packs them (the scaled query tile; K and V
    /// packed for the call, or each block as a tile puts it in panels), or, decoding, as its
    /// kernels load them; multiplied in f32; the probabilities rounded before `P·V`: the bits
    /// of [`Operation::RoundedF32`] on rounded copies.
    RoundingF32,
}

/// Whether a call of `plan` that multiplies rounded operands in f32 rounds them in the f32
/// kernel's tiles ([`Operation::RoundingF32`]) rather than copying them: at a vector level with
/// more query rows per key/value head than decoding's (so the tile score kernel runs), K and V
/// rounded as the call packs them (several row tiles) or as each tile transposes its key
/// blocks and puts its value blocks in panels (one row tile: `tile_convert.rs`).
fn rounds_in_tiles(plan: &Plan) -> bool {
    crate::simd::simd_level().is_vector() && plan.rows_per_group > DECODE_ROWS
}

/// Whether a decoding call of `plan` that multiplies rounded operands in f32 rounds K and V as
/// decoding's kernels load them ([`Operation::RoundingF32`] without packing: `tile_convert.rs`)
/// rather than copying them: at a vector level, with K and V read in place
/// ([`decodes_in_place`]). The same bits: the same kernel ([`ScoreKernel::Dot`]) on the same
/// rounded values.
fn rounds_while_loading(plan: &Plan, k: &View4<'_, f32>, v: &View4<'_, f32>) -> bool {
    crate::simd::simd_level().is_vector() && decodes_in_place(plan, k.strides(), v.strides())
}

/// Runs a validated call's tiles into `dst` (and its weights into `weights`, when given),
/// packing K and V once for the call where that pays. Returns whether a row came out
/// non-finite from a finite softmax.
#[allow(clippy::too_many_arguments)]
fn attend(
    plan: &Plan,
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    scale: f32,
    operation: Operation,
    dst: Dst,
    weights: Option<RawWeights>,
    par: Par,
) -> bool {
    let ForwardInputs { q, k, v } = inputs;
    attend_kv(
        plan,
        q,
        [Kv::F32(k), Kv::F32(v)],
        options,
        scale,
        operation,
        dst,
        weights,
        par,
    )
}

/// [`attend`] on K and V as f32 values or as bf16 bits ([`kv_bits`]): bits only in f32 or
/// rounding into f32 ([`Operation::F32`], [`Operation::RoundingF32`]), with more query rows
/// per key/value head than decoding's ([`DECODE_ROWS`]) at a vector level, where the f32
/// kernel widens them as it packs them (for the call or per `(b, g)`) or as each tile
/// transposes its key blocks and puts its value blocks in panels (`tile_convert.rs`).
#[allow(clippy::too_many_arguments)]
fn attend_kv(
    plan: &Plan,
    q: View4<'_, f32>,
    [k, v]: [Kv<'_>; 2],
    options: &AttentionOptions<'_>,
    scale: f32,
    operation: Operation,
    dst: Dst,
    weights: Option<RawWeights>,
    par: Par,
) -> bool {
    let micro = crate::simd::simd_level().is_vector();
    let score_kernel = ScoreKernel::for_call(plan.rows_per_group, k.strides()[3] == 1);
    // bf16 operands are packed into pairs, except when decoding: a few query rows per
    // key/value head read each key and value once, so they are rounded as they are loaded
    // instead (packing would cost more than the products).
    let in_place = decodes_in_place(plan, k.strides(), v.strides());
    // Packed bf16 operands run on AMX where the CPU has it (whole tiles: padded layouts).
    let amx = operation == Operation::Bf16 && !in_place && crate::bf16_level() == Bf16Level::Amx;
    // How K and V are packed, if they are: f32 K and V when several row tiles read the same
    // keys (else each tile transposes its key blocks, and reads V in place or packs it), bf16
    // ones unless decoding.
    let packing = match operation {
        Operation::Bf16 if !in_place => Some(GroupPacking::Bf16),
        Operation::Bf16 => None,
        _ if micro && plan.row_tiles > 1 => Some(GroupPacking::F32 {
            round: operation == Operation::RoundingF32,
        }),
        _ => None,
    };
    let round = operation == Operation::RoundingF32;
    let bits = matches!(k, Kv::Bits(_));
    // Rounded (or bits widened) as the kernel packs K and V, or as each tile transposes its key
    // blocks and puts its value blocks in panels (more rows than decoding's, `tile_convert.rs`),
    // or, decoding, as its kernels load them.
    let in_tiles = micro && score_kernel == ScoreKernel::Tile && plan.rows_per_group > DECODE_ROWS;
    assert!(!round || in_tiles || (in_place && score_kernel == ScoreKernel::Dot));
    assert!(!bits || (in_tiles && weights.is_none() && matches!(operation, Operation::F32 | Operation::RoundingF32)));
    // Packed per `(b, g)` by the tasks ([`attend_per_group`]), or once for the call before its
    // tiles run (keys transposed into panels, `[B, G, key blocks, D, kt_ld]`, zero past T;
    // values in panels: read in place, rows `Dv` floats apart (512 bytes at Dv = 128) would
    // share a few L1 sets).
    let per_group = packing.is_some()
        && packs_per_group(plan)
        && weights.as_ref().is_none_or(|w| weights::keeps_per_group(plan, w, par));
    let for_the_call = if per_group { None } else { packing };
    let (kt_packed, v_packed) = match for_the_call {
        Some(GroupPacking::F32 { round }) => (
            Some(tile::pack_keys_rounded(plan, k, round, par)),
            Some(tile::pack_values_rounded(plan, v, round, par)),
        ),
        _ => (None, None),
    };
    let bf16_packed = matches!(for_the_call, Some(GroupPacking::Bf16)).then(|| {
        (
            bf16::pack_keys(plan, &k.f32(), amx, par),
            bf16::pack_values(plan, &v.f32(), amx, par),
        )
    });
    let bf16_source = match (&bf16_packed, operation) {
        (Some((kt, vp)), _) => Some(Bf16Source::Packed(kt, vp)),
        // Packed by each task (`attend_per_group`).
        (None, Operation::Bf16) if per_group => None,
        (None, Operation::Bf16) => Some(Bf16Source::InPlace),
        _ => None,
    };
    let ops = Operands {
        q,
        k,
        v,
        options,
        scale,
        kt_packed: kt_packed.as_deref(),
        v_packed: v_packed.as_deref(),
        bf16: bf16_source,
        amx,
        // Rounded f32 probabilities: bf16 without the instructions, and decoding's kernels.
        round_p: matches!(operation, Operation::RoundedF32 | Operation::RoundingF32)
            || matches!(bf16_source, Some(Bf16Source::InPlace)),
        round_q: round,
        micro,
        score_kernel,
        keep_scores: weights.is_some(),
        packed_per_group: if per_group { packing } else { None },
    };
    let spoilt = match weights {
        Some(weights) => weights::attend_keeping_scores(plan, &ops, dst, weights, par),
        None if per_group => attend_per_group(plan, &ops, dst, par),
        None => run_operands(plan, &ops, dst, par),
    };
    let bf16_buffers = bf16_packed.into_iter().flat_map(|(kt, vp)| [kt, vp]);
    kt_packed
        .into_iter()
        .chain(v_packed)
        .chain(bf16_buffers)
        .for_each(crate::buffer::give);
    spoilt
}

/// Runs the tiles of `ops` into `dst`, split across the keys when the plan says so. Returns
/// whether a row came out non-finite from a finite softmax.
fn run_operands(plan: &Plan, ops: &Operands<'_, '_>, dst: Dst, par: Par) -> bool {
    if plan.splits == 1 {
        attend_unsplit(plan, ops, dst, par)
    } else {
        split_kv::attend_split(plan, ops, dst, par)
    }
}

/// Whether a call of `plan` with K and V of these strides is decoding, whose bf16 kernels read
/// K and V in place (a few query rows per key/value head, contiguous rows) instead of packing
/// them; [`attention_bf16_kv`] reads bf16 bits in place by the same rule.
pub(crate) fn decodes_in_place(plan: &Plan, k_strides: [usize; 4], v_strides: [usize; 4]) -> bool {
    plan.rows_per_group <= DECODE_ROWS && k_strides[3] == 1 && v_strides[3] == 1
}

/// Whether a bf16 call runs the f32 kernel on its operands rounded to bf16 (else the bf16
/// kernels), `decodes` saying whether it decodes in place ([`decodes_in_place`]): without bf16
/// instructions, and at the AVX512-BF16 level on an Intel CPU
/// ([`crate::bf16::Route::Widened`]) except when decoding in place. There
/// `vdpbf16ps` runs at half the f32 FMA rate, so the products are faster in f32 even with the
/// copies (fastest runs 1.06–1.34× on [1,8,512,64], [1,8,2048,64] and [1,16,4096,128] causal,
/// 1.2–1.35× on [8,8,256,64], even on [4,12,128,64]), while decoding, bound by reading K and V,
/// reads them in place.
pub(crate) fn rounds_into_f32(decodes: bool) -> bool {
    match crate::bf16_level() {
        Bf16Level::None => true,
        Bf16Level::Amx => false,
        Bf16Level::Avx512Bf16 => {
            crate::bf16::Route::of(Bf16Level::Avx512Bf16) == crate::bf16::Route::Widened
                && !vdpbf16ps_forced()
                && !decodes
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Set by the tests to run the `vdpbf16ps` kernels where [`rounds_into_f32`] would not.
    pub(crate) static FORCE_VDPBF16PS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a test on this thread asked for the `vdpbf16ps` kernels (never outside tests).
fn vdpbf16ps_forced() -> bool {
    #[cfg(test)]
    let forced = FORCE_VDPBF16PS.with(|f| f.get());
    #[cfg(not(test))]
    let forced = false;
    forced
}

/// One task per `(b, g, row tile)` over all keys, each writing its rows. Returns whether a row
/// came out non-finite from a finite softmax (a non-finite value reached it).
fn attend_unsplit(plan: &Plan, ops: &Operands<'_, '_>, dst: Dst, par: Par) -> bool {
    let spoilt_rows = AtomicBool::new(false);
    let run = |scratch: &mut Scratch, task: usize| {
        let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
        tile_into(scratch, plan, ops, [bg / plan.g, bg % plan.g, tile], &dst, &spoilt_rows);
    };
    run_tasks(plan.b * plan.g * plan.row_tiles, par, plan, run);
    spoilt_rows.load(Ordering::Relaxed)
}

/// Row tile `tile` of `(b, g)` over all keys, its rows written to `dst`; sets `spoilt_rows`
/// when one came out non-finite from a finite softmax.
fn tile_into(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    [b, g, tile]: [usize; 3],
    dst: &Dst,
    spoilt_rows: &AtomicBool,
) {
    let rows = attend_tile(scratch, plan, ops, [b, g, tile], 0..plan.t);
    for i in 0..rows {
        let (s, h) = row_position(plan, g, tile * BLOCK_ROWS + i);
        let acc_row = &scratch.acc[i * plan.dv_pad..i * plan.dv_pad + plan.dv];
        // SAFETY: `(b, h, s)` is in bounds and belongs to this task alone.
        let spoilt = unsafe { dst.write_row([b, h, s], acc_row, scratch.l[i], scratch.m[i]) };
        if spoilt {
            spoilt_rows.store(true, Ordering::Relaxed);
        }
    }
}

/// The inputs of one call as the tiles see them.
#[derive(Clone, Copy)]
struct Operands<'a, 'o> {
    q: View4<'a, f32>,
    k: Kv<'a>,
    v: Kv<'a>,
    options: &'o AttentionOptions<'a>,
    scale: f32,
    /// K transposed per key block, when packed once for the call.
    kt_packed: Option<&'o [f32]>,
    /// V per key block in panels, when packed once for the call.
    v_packed: Option<&'o [f32]>,
    /// Where the bf16 operands come from, when the products run on `vdpbf16ps` or AMX.
    bf16: Option<Bf16Source<'o>>,
    /// Whether the packed bf16 operands are multiplied on AMX tiles (in [`bf16`]'s padded
    /// layouts).
    amx: bool,
    /// Whether the probabilities are rounded to bf16 before `P·V` (bf16 without the
    /// instructions: the other operands come rounded).
    round_p: bool,
    /// Whether the scaled query tile is rounded to bf16 as it is loaded (K and V then come
    /// rounded in their packing: [`Operation::RoundingF32`]).
    round_q: bool,
    /// Whether the vector micro-kernels (AVX2 or AVX-512) run the tile GEMMs.
    micro: bool,
    /// How the scores are computed (the backward recomputes them the same way).
    score_kernel: ScoreKernel,
    /// Whether each tile keeps its masked scores for the weights (`Scratch::kept`).
    keep_scores: bool,
    /// How K and V are packed when the tasks pack them per `(b, g)` ([`attend_per_group`]):
    /// then the packed operands hold the tile's `(b, g)` alone, not every `(b, g)` of the call.
    packed_per_group: Option<GroupPacking>,
}

/// How K and V are packed: for the f32 kernel (keys transposed into panels, values in
/// panels, rounded to bf16 when `round`), or for the bf16 kernels (pairs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GroupPacking {
    F32 { round: bool },
    Bf16,
}

impl Operands<'_, '_> {
    /// The `[b, g, t0]` to look up key `t0` of the tile's rows in the packed operands (f32 or
    /// bf16): `(b, g)` is the first and only one when packed per group.
    fn packed_at(&self, rows: &scratch::TileRows, t0: usize) -> [usize; 3] {
        if self.packed_per_group.is_some() {
            [0, 0, t0]
        } else {
            [rows.b, rows.g, t0]
        }
    }
}

/// Keys or values as the tiles read them: f32 values, or bf16 bits (a bf16 KV cache,
/// [`crate::attention_bf16_kv`]), which the bf16 kernels read (in place when decoding, packed
/// from the bits otherwise) and the f32 kernel converts as it reads them (`tile_convert.rs`).
#[derive(Clone, Copy)]
enum Kv<'a> {
    F32(View4<'a, f32>),
    Bits(View4<'a, u16>),
}

impl<'a> Kv<'a> {
    fn strides(&self) -> [usize; 4] {
        match self {
            Kv::F32(view) => view.strides(),
            Kv::Bits(view) => view.strides(),
        }
    }

    /// The f32 view. Bits reach only the bf16 kernels and the converting passes
    /// (`tile_convert.rs`), so every path that asks holds f32 operands.
    fn f32(&self) -> View4<'a, f32> {
        match self {
            Kv::F32(view) => *view,
            Kv::Bits(_) => unreachable!("bf16 bits reach only the bf16 kernels and the converting passes"),
        }
    }
}

/// The keys and values of a call whose products run on bf16 instructions ([`bf16`]).
#[derive(Clone, Copy)]
enum Bf16Source<'o> {
    /// Rounded and packed once for the call: K for `q·kᵀ`, V for `P·V`.
    Packed(&'o [f32], &'o [f32]),
    /// Read in place and rounded as they are loaded (decoding).
    InPlace,
}

/// Runs `body(scratch, task)` for every task, sequentially or on the rayon pool.
fn run_tasks(tasks: usize, par: Par, plan: &Plan, body: impl Fn(&mut Scratch, usize) + Sync + Send) {
    match par {
        Par::Seq => with_scratch(plan, |scratch| (0..tasks).for_each(|task| body(scratch, task))),
        Par::Rayon => par.for_each_task(tasks, |task| with_scratch(plan, |scratch| body(scratch, task))),
    }
}

/// The `(s, h)` of stacked row `r` of group `g`.
#[inline]
fn row_position(plan: &Plan, g: usize, r: usize) -> (usize, usize) {
    (r / plan.rep, g * plan.rep + r % plan.rep)
}

/// Fails unless `lse_lo`, when given, is `[B, H, S]` like `out`'s first three dimensions.
pub(crate) fn check_lse_lo(
    op: &'static str,
    out: &ViewMut4<'_, f32>,
    lse_lo: &Option<ViewMut<'_, f32, 3>>,
) -> Result<(), KernelError> {
    let [b, h, s, _] = out.shape();
    match lse_lo {
        Some(l) if l.shape() != [b, h, s] => Err(KernelError::shape(op, "lse_lo", vec![b, h, s], l.shape().to_vec())),
        _ => Ok(()),
    }
}

/// A row's log-sum-exp `m + ln(l)` (row max `m`, sum `l` of `exp(s − m)`) as two f32: `lse`,
/// the nearest f32, and `lse_lo`, what rounding to it lost (computed in f64). With logits in the
/// hundreds, `lse` alone is off by up to half an ulp of `m` (8e-6 at 200), which the backward's
/// `P = exp(s − lse)` would turn into that relative error; `exp((s − lse) − lse_lo)` is exact to
/// the f32 rounding of `ln(l)` and of `exp` (the subtraction `s − lse` is exact for the keys
/// that carry the weight).
#[inline]
pub(crate) fn split_lse(m: f32, l: f32) -> (f32, f32) {
    let exact = m as f64 + (l as f64).ln();
    let lse = exact as f32;
    let lo = (exact - lse as f64) as f32;
    (lse, if lo.is_finite() { lo } else { 0.0 })
}

/// Where a call's rows go: `out: [B, H, S, Dv]` and optionally `lse: [B, H, S]`, shared by the
/// tasks, each of which writes its own rows.
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    pub out: SharedMut,
    pub out_strides: [usize; 4],
    pub lse: Option<(SharedMut, [usize; 3])>,
    /// The rounding error of `lse` ([`split_lse`]), for the backward.
    pub lse_lo: Option<(SharedMut, [usize; 3])>,
}

impl Dst {
    /// Raw destinations of a validated call (the flash kernel's and the unfused path's).
    pub(crate) fn new(
        out: &mut ViewMut4<'_, f32>,
        lse: &mut Option<ViewMut<'_, f32, 3>>,
        lse_lo: &mut Option<ViewMut<'_, f32, 3>>,
    ) -> Self {
        let raw = |l: &mut ViewMut<'_, f32, 3>| (SharedMut(l.data_mut().as_mut_ptr()), l.strides());
        Dst {
            out: SharedMut(out.data_mut().as_mut_ptr()),
            out_strides: out.strides(),
            lse: lse.as_mut().map(raw),
            lse_lo: lse_lo.as_mut().map(raw),
        }
    }

    /// Writes `out[b, h, s, :] = acc / l` and `lse[b, h, s] = m + ln(l)`; zeros and `-inf` if
    /// `l = 0`. Returns whether the row must be repaired ([`crate::nonfinite::spoiled`]).
    ///
    /// # Safety
    /// `(b, h, s)` must be in bounds of both destinations, `acc` must hold `Dv` values, and no
    /// other thread may write that row.
    #[inline]
    unsafe fn write_row(&self, index: [usize; 3], acc: &[f32], l: f32, m: f32) -> bool {
        let want_lse = self.lse.is_some() || self.lse_lo.is_some();
        // SAFETY: the caller's contract.
        unsafe { self.write_row_lse(index, acc, l, m, want_lse) }.0
    }

    /// [`Dst::write_row`], also returning the row's `lse` as written (computed when `want_lse`
    /// or a destination asks for it, else 0).
    ///
    /// # Safety
    /// As for [`Dst::write_row`].
    #[inline]
    unsafe fn write_row_lse(&self, [b, h, s]: [usize; 3], acc: &[f32], l: f32, m: f32, want_lse: bool) -> (bool, f32) {
        let strides = self.out_strides;
        let base = b * strides[0] + h * strides[1] + s * strides[2];
        let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
        let mut finite = true;
        if strides[3] == 1 && l != 0.0 {
            // SAFETY: the row's `acc.len()` values are in bounds by the caller's contract, and
            // the row is this task's alone.
            let row = unsafe { std::slice::from_raw_parts_mut(self.out.get().add(base), acc.len()) };
            finite = crate::simd::scale_into_finite(row, acc, inv);
        } else {
            for (j, &a) in acc.iter().enumerate() {
                let x = if l == 0.0 { 0.0 } else { a * inv };
                finite &= x.is_finite();
                // SAFETY: in bounds by the caller's contract; the row is this task's alone.
                unsafe { *self.out.get().add(base + j * strides[3]) = x };
            }
        }
        // One f64 logarithm per row, and only when a caller asked for the LSE.
        let (lse, lse_lo) = if !want_lse && self.lse.is_none() && self.lse_lo.is_none() {
            (0.0, 0.0)
        } else if l == 0.0 {
            (f32::NEG_INFINITY, 0.0)
        } else {
            split_lse(m, l)
        };
        if let Some((ptr, st)) = self.lse {
            // SAFETY: as above.
            unsafe { *ptr.get().add(b * st[0] + h * st[1] + s * st[2]) = lse };
        }
        if let Some((ptr, st)) = self.lse_lo {
            // SAFETY: as above.
            unsafe { *ptr.get().add(b * st[0] + h * st[1] + s * st[2]) = lse_lo };
        }
        (crate::nonfinite::spoiled(m, l, !finite), lse)
    }
}
