//! The flash kernel's bf16 operands ([`crate::Precision::Bf16`]).
//!
//! At the AVX512-BF16 level the two products run on `vdpbf16ps` ([`crate::bf16`]'s tile
//! kernel), which multiplies pairs of bf16 values along the depth; at the AMX level on
//! `tdpbf16ps` ([`crate::bf16::amx::Tiles`]). K and V are rounded and packed once per
//! `(b, g, key block)`, by the tasks one `(b, g)` at a time into a buffer of their thread
//! (`super::attend_per_group`), or for the whole call before its tiles run (long keys):
//! - keys as the right operand of `q·kᵀ`: `[kb_pad / 16 panels][key pairs][16 keys]` words,
//!   each word the pair `(k[t, 2p], k[t, 2p + 1])` (a zero after an odd `D`);
//! - values as the right operand of `P·V`: `[Dv_pad / 16 panels][value pairs][16 columns]`,
//!   each word the pair `(v[2p, c], v[2p + 1, c])` (a zero row after an odd block).
//!
//! Each panel is a column of B tiles as AMX reads them (16 pairs of 16 columns, 1 KiB); for
//! AMX the pairs are padded with zeros to whole tiles ([`key_pairs`], [`value_pairs`]).
//!
//! Per tile, the scaled query rows and each block's probabilities are rounded into rows of pairs
//! (the module's `convert_row`, one `vcvtneps2bf16` per 16 values), or at the AMX level into
//! A tiles ([`row_into_tiles`]; the probabilities by [`exp_sub_sum_into_tiles`], fused with
//! pass 2's `exp`). AMX multiplies whole steps of 32 along the depth:
//! where a key block ends inside one (`bc` not a multiple of 32, at a row's causal limit or its
//! key length) the step also reads the values of the keys after it, against probabilities
//! that are zero. Finite values add nothing; a NaN or infinite one there spoils the row, which
//! [`crate::nonfinite`]'s repair then computes again from values whose non-finite entries are
//! zero, as it does for a hidden non-finite value on every path.
//!
//! Decoding (at most 8 query rows per key/value head) packs nothing: it reads each key and value
//! once, so the kernels `bf16_x86::dot_rows` and `bf16_x86::axpy_rows` round K and V as they load them and
//! multiply the rounded values with f32 FMAs (exact products, f32 sums), on query rows and
//! probabilities rounded in f32.
//!
//! Without the instructions, and on Intel's AVX512-BF16 level outside decoding
//! (`super::rounds_into_f32`: its `vdpbf16ps` runs at half the f32 rate), the f32 kernel
//! multiplies rounded operands: it rounds them as it packs them where it packs K and V for the
//! call, else [`rounded_copies`] makes rounded copies of the scaled queries,
//! keys and values and the f32 kernel runs on them, rounding the probabilities before `P·V`:
//! the same rounded operands, the same error bound (derived in `tests.rs`), f32 products.

use super::pack::Packer;
use super::{Kv, Plan};
use crate::bf16::AMX_STEP_PAIRS as STEP_PAIRS;
use crate::buffer::Buffer;
use crate::{round_to_bf16, Par, View4};
use rayon::prelude::*;

/// Pairs per packed key (`D / 2` rounded up; to whole AMX steps of 16 pairs for AMX).
pub(super) fn key_pairs(plan: &Plan, amx: bool) -> usize {
    let pairs = plan.d.div_ceil(2);
    if amx {
        pairs.next_multiple_of(STEP_PAIRS)
    } else {
        pairs
    }
}

/// Pairs per panel of a packed value block (`kb_pad / 2`; to whole AMX steps for AMX).
pub(super) fn value_pairs(plan: &Plan, amx: bool) -> usize {
    if amx {
        (plan.kb_pad / 2).next_multiple_of(STEP_PAIRS)
    } else {
        plan.kb_pad / 2
    }
}

/// The words of one packed key block: `kb_pad` keys by [`key_pairs`].
pub(super) fn key_block_len(plan: &Plan, amx: bool) -> usize {
    plan.kb_pad * key_pairs(plan, amx)
}

/// The words of one packed value block: [`value_pairs`] by `Dv_pad` columns.
pub(super) fn value_block_len(plan: &Plan, amx: bool) -> usize {
    value_pairs(plan, amx) * plan.dv_pad
}

/// `k: [B, G, T, D]` rounded to bf16 and packed as the module describes, one block of
/// [`key_block_len`] words per `(b, g, key block)` (stored in f32 slots). Keys past a block's
/// end are left as they were: their columns of the scores are never stored.
pub(super) fn pack_keys(plan: &Plan, k: &View4<'_, f32>, amx: bool, par: Par) -> Buffer {
    super::pack::pack_blocks(plan, k, key_block_len(plan, amx), par, key_packer(plan, amx))
}

/// [`pack_keys`] of keys held as bf16 bits ([`crate::attention_bf16_kv`]): the words of
/// [`pack_keys`] on the widened keys, read straight from the bits where they can be
/// ([`key_bits_packer`]), else from each block widened exactly into a buffer of the thread
/// ([`widen_block`]); no widened copy of the whole of K is made.
pub(super) fn pack_keys_bits(plan: &Plan, k: &View4<'_, u16>, amx: bool, par: Par) -> Buffer {
    super::pack::pack_blocks(plan, k, key_block_len(plan, amx), par, key_bits_packer(plan, amx))
}

/// The K and V of `(b, g)` alone (f32 values or bf16 bits) into `keys` and `values`: the words
/// of [`pack_keys`] and [`pack_values`] (or their `_bits` forms) in that `(b, g)`'s part.
pub(super) fn pack_group(plan: &Plan, [k, v]: [Kv<'_>; 2], amx: bool, bg: [usize; 2], [keys, values]: [&mut [f32]; 2]) {
    use super::pack::pack_group;
    let (key_len, value_len) = (key_block_len(plan, amx), value_block_len(plan, amx));
    match k {
        Kv::F32(k) => pack_group(plan, &k, key_len, bg, keys, key_packer(plan, amx)),
        Kv::Bits(k) => pack_group(plan, &k, key_len, bg, keys, key_bits_packer(plan, amx)),
    }
    match v {
        Kv::F32(v) => pack_group(plan, &v, value_len, bg, values, value_packer(plan, amx)),
        Kv::Bits(v) => pack_group(plan, &v, value_len, bg, values, value_bits_packer(plan, amx)),
    }
}

/// One key block of f32 values as [`pack_keys`] packs it.
fn key_packer(plan: &Plan, amx: bool) -> impl Packer<f32> + '_ {
    let pairs = key_pairs(plan, amx);
    move |dst, keys, bc, strides| key_block(dst, keys, bc, strides, plan.d, pairs)
}

/// One key block of bf16 bits as [`pack_keys_bits`] packs it: whole panels of 16 contiguous
/// keys of an even `D` straight from the bits ([`key_bits_panels16`]), the rest widened
/// exactly and packed as f32 keys are.
fn key_bits_packer(plan: &Plan, amx: bool) -> impl Packer<u16> + '_ {
    let pairs = key_pairs(plan, amx);
    move |dst, keys, bc, [rs, cs]| {
        let whole = if cs == 1 && plan.d.is_multiple_of(2) {
            key_bits_panels16(dst, keys, bc, plan.d, rs, pairs)
        } else {
            0
        };
        if whole < bc {
            // `whole` is a multiple of 16: the rest start on a panel of their own.
            let wide = widen_block(&keys[whole * rs..], bc - whole, plan.d, [rs, cs]);
            key_block(&mut dst[whole * pairs..], &wide, bc - whole, [plan.d, 1], plan.d, pairs);
            crate::buffer::give(wide);
        }
    }
}

/// One block of [`pack_keys`]: `bc` keys of `d` values, `keys[j·rs + c·cs]`.
fn key_block(dst: &mut [f32], keys: &[f32], bc: usize, [rs, cs]: [usize; 2], d: usize, pairs: usize) {
    // Whole panels of 16 contiguous keys: rounded and transposed 16 × 16 words at a time.
    let whole = if cs == 1 {
        key_panels16(dst, keys, bc, d, rs, pairs)
    } else {
        0
    };
    // Zeros past `D / 2` pairs: `convert_strided` writes the pairs that hold values.
    let mut row = vec![0.0f32; pairs];
    for j in whole..bc {
        convert_strided(&keys[j * rs..], d, cs, 1.0, &mut row);
        let panel = &mut dst[(j / 16) * pairs * 16 + j % 16..];
        for (p, &word) in row.iter().enumerate() {
            panel[p * 16] = word;
        }
    }
}

/// `bc` rows of `width` bf16 bits (`bits[j·rs + c·cs]`) widened exactly into a contiguous
/// `[bc, width]` buffer of this thread's pool (hand it back with `buffer::give`).
fn widen_block(bits: &[u16], bc: usize, width: usize, [rs, cs]: [usize; 2]) -> Buffer {
    let mut wide = crate::buffer::take(bc * width);
    for (j, row) in wide.chunks_exact_mut(width.max(1)).take(bc).enumerate() {
        if cs == 1 {
            let src = &bits[j * rs..j * rs + width];
            row.iter_mut().zip(src).for_each(|(x, &h)| *x = crate::bf16_to_f32(h));
        } else {
            row.iter_mut()
                .enumerate()
                .for_each(|(c, x)| *x = crate::bf16_to_f32(bits[j * rs + c * cs]));
        }
    }
    wide
}

/// The first `16·⌊bc / 16⌋` of `bc` keys (rows `rs` apart in `keys`, `d` contiguous values each)
/// rounded into [`pack_keys`]'s panels of `pairs` pairs (zeros past `D / 2`), at the
/// AVX512-BF16 level: each key's steps of 16 pairs rounded as A tile rows
/// (`convert_row_steps`), then each 16 × 16 block of words transposed into the panel (16 words
/// per pair) instead of 16 stores of one word per key. Returns how many keys it packed (0
/// without the instructions); the caller packs the rest.
fn key_panels16(dst: &mut [f32], keys: &[f32], bc: usize, d: usize, rs: usize, pairs: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        let steps = pairs.div_ceil(STEP_PAIRS);
        let panels = bc / 16;
        assert!(d <= 2 * pairs && dst.len() >= panels * pairs * 16);
        assert!(panels == 0 || keys.len() >= (16 * panels - 1) * rs + d);
        // `[steps][16 keys][16 words]`.
        let mut block = vec![[[0.0f32; 16]; 16]; steps];
        for panel in 0..panels {
            let out = &mut dst[panel * pairs * 16..(panel + 1) * pairs * 16];
            // SAFETY: the level was detected; each key's `d ≤ 32·steps` values lie in `keys`
            // (checked); key `j`'s step `s` goes to the 16 words at `block[s][j]`, `256`
            // words apart per step; `out` holds the panel's `pairs · 16` words.
            unsafe {
                let base = block.as_mut_ptr().cast::<f32>();
                for j in 0..16 {
                    let key = &keys[(16 * panel + j) * rs..][..d];
                    crate::bf16::avx512bf16::convert_row_steps(key, 1.0, steps, base.add(16 * j), 256);
                }
                transpose_into_panel(&block, out, pairs);
            }
        }
        return 16 * panels;
    }
    let _ = (dst, keys, bc, d, rs, pairs);
    0
}

/// A panel of 16 keys from its steps (`block[s][j]`: key `j`'s words `16s .. 16s + 16`): each
/// 16 × 16 block transposed into `out` (16 words per pair, step `s` from word `256·s`), only
/// the `pairs − 16s` rows of a partial last step.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
unsafe fn transpose_into_panel(block: &[[[f32; 16]; 16]], out: &mut [f32], pairs: usize) {
    assert!(out.len() >= pairs * 16 && block.len() == pairs.div_ceil(16));
    let mut last = [[0.0f32; 16]; 16];
    for (s, rows) in block.iter().enumerate() {
        let n = (pairs - 16 * s).min(16);
        // SAFETY: AVX-512F by the caller's contract; a transpose writes 16 rows of 16 words,
        // inside `out` for a whole step (checked above) and into `last` for a partial one.
        unsafe {
            if n == 16 {
                crate::bf16::avx512bf16::transpose16(rows, out[256 * s..].as_mut_ptr(), 16);
            } else {
                crate::bf16::avx512bf16::transpose16(rows, last.as_mut_ptr().cast(), 16);
                for (p, row) in last[..n].iter().enumerate() {
                    out[256 * s + 16 * p..256 * s + 16 * p + 16].copy_from_slice(row);
                }
            }
        }
    }
}

/// [`key_panels16`] of keys held as bf16 bits with an even `d`: each key's pairs are its
/// bits read two at a time (as [`crate::bf16::canonical`] makes them: the words that rounding
/// the widened keys gives), then each 16 × 16 block of words transposed into the panel. Returns
/// how many keys it packed (0 without AVX-512); the caller packs the rest.
fn key_bits_panels16(dst: &mut [f32], keys: &[u16], bc: usize, d: usize, rs: usize, pairs: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        let (steps, words, panels) = (pairs.div_ceil(STEP_PAIRS), d / 2, bc / 16);
        assert!(d.is_multiple_of(2) && words <= pairs && dst.len() >= panels * pairs * 16);
        assert!(panels == 0 || keys.len() >= (16 * panels - 1) * rs + d);
        // `[steps][16 keys][16 words]`: each key's `d / 2` words, zeros past them.
        let mut block = vec![[[0.0f32; 16]; 16]; steps];
        for panel in 0..panels {
            for j in 0..16 {
                let key = &keys[(16 * panel + j) * rs..][..d];
                for (s, step) in block.iter_mut().enumerate() {
                    let n = words.saturating_sub(16 * s).min(16);
                    // SAFETY: the level was detected (AVX-512F/BW with it); the step's `2n`
                    // values lie in `key`, and `step[j]` holds 16 words.
                    unsafe {
                        crate::bf16::avx512bf16::bits_to_words16(
                            key.as_ptr().wrapping_add(32 * s),
                            n,
                            step[j].as_mut_ptr(),
                        )
                    };
                }
            }
            let out = &mut dst[panel * pairs * 16..(panel + 1) * pairs * 16];
            // SAFETY: the level was detected (AVX-512F with it); `out` holds the panel.
            unsafe { transpose_into_panel(&block, out, pairs) };
        }
        return 16 * panels;
    }
    let _ = (dst, keys, bc, d, rs, pairs);
    0
}

/// `v: [B, G, T, Dv]` rounded to bf16 and packed as the module describes, one block of
/// [`value_block_len`] words per `(b, g, key block)`. The pair after an odd block's last value
/// holds a zero (the probabilities' pad is zero too, and `0 · NaN` would not be); pairs past
/// it are never read by `vdpbf16ps`, and are zeros for AMX, which reads whole steps.
pub(super) fn pack_values(plan: &Plan, v: &View4<'_, f32>, amx: bool, par: Par) -> Buffer {
    super::pack::pack_blocks(plan, v, value_block_len(plan, amx), par, value_packer(plan, amx))
}

/// [`pack_values`] of values held as bf16 bits: the words of [`pack_values`] on the widened
/// values, paired straight from the bits where they can be ([`value_bits_packer`]), else from
/// each block widened exactly into a buffer of the thread ([`widen_block`]).
pub(super) fn pack_values_bits(plan: &Plan, v: &View4<'_, u16>, amx: bool, par: Par) -> Buffer {
    super::pack::pack_blocks(plan, v, value_block_len(plan, amx), par, value_bits_packer(plan, amx))
}

/// One value block of f32 values as [`pack_values`] packs it.
fn value_packer(plan: &Plan, amx: bool) -> impl Packer<f32> + '_ {
    let pairs = value_pairs(plan, amx);
    move |dst, values, bc, strides| value_block(dst, values, bc, strides, plan, pairs, amx)
}

/// One value block of bf16 bits as [`pack_values_bits`] packs it: contiguous rows whose `Dv`
/// is a whole number of panels paired straight from the bits, else the block widened exactly
/// and packed as f32 values are.
fn value_bits_packer(plan: &Plan, amx: bool) -> impl Packer<u16> + '_ {
    let pairs = value_pairs(plan, amx);
    move |dst, values, bc, [rs, cs]| {
        if cs == 1 && plan.dv == plan.dv_pad {
            value_bits_block(dst, values, bc, rs, plan.dv, pairs, amx);
            return;
        }
        let wide = widen_block(values, bc, plan.dv, [rs, cs]);
        value_block(dst, &wide, bc, [plan.dv, 1], plan, pairs, amx);
        crate::buffer::give(wide);
    }
}

/// `out[c]` the pair of `lo[c]` and `hi[c]` for 16 columns, each made canonical
/// ([`crate::bf16::canonical`]).
fn interleave_bits(lo: &[u16], hi: &[u16], out: &mut [f32]) {
    assert!(lo.len() >= 16 && hi.len() >= 16 && out.len() >= 16);
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        // SAFETY: the level was detected (AVX-512F/BW with it); the slices hold 16 values.
        unsafe { crate::bf16::avx512bf16::interleave_bits16(lo.as_ptr(), hi.as_ptr(), out.as_mut_ptr()) };
        return;
    }
    for ((word, &l), &h) in out[..16].iter_mut().zip(lo).zip(hi) {
        *word = f32::from_bits(crate::bf16::canonical(l) as u32 | (crate::bf16::canonical(h) as u32) << 16);
    }
}

/// [`value_block`] of `bc` contiguous rows of `dv` bf16 bits (`dv` a multiple of 16), rows `rs`
/// apart: each word the pair of rows `2p` and `2p + 1` as [`crate::bf16::canonical`] makes
/// them (the bits that rounding their widened values gives), a zero after an odd block's last
/// row, zero pairs to the panel's end for `amx`.
fn value_bits_block(dst: &mut [f32], values: &[u16], bc: usize, rs: usize, dv: usize, pairs: usize, amx: bool) {
    let panel_len = pairs * 16;
    assert!(dv.is_multiple_of(16) && bc.div_ceil(2) <= pairs && dst.len() >= dv / 16 * panel_len);
    assert!(bc == 0 || values.len() >= (bc - 1) * rs + dv);
    let zeros = [0u16; 16];
    for p in 0..bc.div_ceil(2) {
        let lo = &values[2 * p * rs..2 * p * rs + dv];
        let hi = (2 * p + 1 < bc).then(|| &values[(2 * p + 1) * rs..(2 * p + 1) * rs + dv]);
        for panel in 0..dv / 16 {
            let out = &mut dst[panel * panel_len + p * 16..panel * panel_len + p * 16 + 16];
            let lo = &lo[panel * 16..panel * 16 + 16];
            let hi = hi.map_or(&zeros[..], |hi| &hi[panel * 16..panel * 16 + 16]);
            interleave_bits(lo, hi, out);
        }
    }
    if amx {
        for panel in dst.chunks_exact_mut(panel_len) {
            panel[bc.div_ceil(2) * 16..].fill(0.0);
        }
    }
}

/// One block of [`pack_values`]: `bc` value rows of `Dv` values, `values[j·rs + c·cs]`, into
/// panels of `pairs` pairs, padded with zero pairs to the panel's end for `amx`.
fn value_block(dst: &mut [f32], values: &[f32], bc: usize, [rs, cs]: [usize; 2], plan: &Plan, pairs: usize, amx: bool) {
    let (dv, dv_pad) = (plan.dv, plan.dv_pad);
    let panel_len = pairs * 16;
    let mut lo = vec![0.0f32; dv_pad];
    let mut hi = vec![0.0f32; dv_pad];
    for p in 0..bc.div_ceil(2) {
        if cs == 1 && dv == dv_pad && 2 * p + 1 < bc {
            // Two whole contiguous rows: paired where they are, panel by panel.
            let (lo, hi) = (&values[2 * p * rs..], &values[(2 * p + 1) * rs..]);
            for panel in 0..dv_pad / 16 {
                let out = &mut dst[panel * panel_len + p * 16..panel * panel_len + p * 16 + 16];
                crate::bf16::pair_rows(&lo[panel * 16..], &hi[panel * 16..], out);
            }
            continue;
        }
        let gather = |row: &mut [f32], j: usize| {
            if j >= bc {
                row[..dv].fill(0.0);
            } else if cs == 1 {
                row[..dv].copy_from_slice(&values[j * rs..j * rs + dv]);
            } else {
                row[..dv]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(c, x)| *x = values[j * rs + c * cs]);
            }
        };
        gather(&mut lo, 2 * p);
        gather(&mut hi, 2 * p + 1);
        for panel in 0..dv_pad / 16 {
            let out = &mut dst[panel * panel_len + p * 16..panel * panel_len + p * 16 + 16];
            crate::bf16::pair_rows(&lo[panel * 16..], &hi[panel * 16..], out);
        }
    }
    if amx {
        for panel in dst.chunks_exact_mut(panel_len) {
            panel[bc.div_ceil(2) * 16..].fill(0.0);
        }
    }
}

/// Passes 2 and 3's `p = exp(x - m)` on AMX, fused with the rounding of pass 4: the
/// probabilities of row `i` of the tile (`row`, `bc` scores) go straight into A tiles of `p16`
/// ([`crate::bf16::amx::pack_tiles`]'s layout for `bc` columns, zeros after them), and the sum of the
/// unrounded values is returned, in the order of [`crate::simd::exp_sub_sum`]. The `exp` is
/// the shorter one of `bf16_x86::exp_short` (relative error below 8.5e-6, against 1e-7), which the
/// rounding to bf16 that follows (2^-8) leaves unseen: it took a third of a bf16 SDPA at D = 64.
/// `row` itself is left as it was.
pub(super) fn exp_sub_sum_into_tiles(row: &[f32], m: f32, i: usize, p16: &mut [f32]) -> f32 {
    let (steps, first) = tile_row(row.len(), i, p16);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 and AVX512-BF16 are available where AMX is (`tile_row` checked the
    // level); `p16` holds 16 words at each step's offset from `first` (checked there too).
    unsafe {
        super::bf16_x86::exp_sub_sum_steps(row, m, steps, p16.as_mut_ptr().add(first), STEP_PAIRS * 16)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, steps, first);
        unreachable!("AMX exists on x86-64 only")
    }
}

/// `exp(x - m)` of each value of `row`, rounded to bf16 pairs into `p16`'s first words (a
/// row of pass 4's left operand at the AVX512-BF16 level, as [`convert_row`] would write
/// it from the values, zeros after `row`'s end up to the next 32 values); returns the sum of
/// the unrounded values. The `exp` is [`exp_sub_sum_into_tiles`]'s: the rounding to bf16
/// hides its shorter polynomial. `row` itself is left as it was.
pub(super) fn exp_sub_sum_into_pairs(row: &[f32], m: f32, p16: &mut [f32]) -> f32 {
    let steps = row.len().div_ceil(2 * STEP_PAIRS);
    assert!(p16.len() >= steps * 16 && crate::bf16_level().has_avx512bf16());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the level was checked; `p16` holds the `steps` runs of 16 words (checked).
    unsafe {
        super::bf16_x86::exp_sub_sum_steps(row, m, steps, p16.as_mut_ptr(), 16)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, steps);
        unreachable!("AVX512-BF16 exists on x86-64 only")
    }
}

/// `factor·x` for each `x` of `row`, rounded into row `i` of the A tiles `tiles`, as
/// [`exp_sub_sum_into_tiles`] writes them: a query row with the scale (`q16`), or a row of
/// probabilities as it is (zeros or NaN for a row that sees no key, `factor` 1).
pub(super) fn row_into_tiles(row: &[f32], factor: f32, i: usize, tiles: &mut [f32]) {
    let (steps, first) = tile_row(row.len(), i, tiles);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `exp_sub_sum_into_tiles`.
    unsafe {
        let dst = tiles.as_mut_ptr().add(first);
        crate::bf16::avx512bf16::convert_row_steps(row, factor, steps, dst, STEP_PAIRS * 16)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (factor, steps, first);
        unreachable!("AMX exists on x86-64 only")
    }
}

/// The steps of a row of `n` values in A tiles, and the word where row `i`'s first step
/// starts (row tile `i / 16`, row `i % 16`); checks that `p16` holds every step of it, and
/// that the level is AMX.
fn tile_row(n: usize, i: usize, p16: &[f32]) -> (usize, usize) {
    let steps = n.div_ceil(2 * STEP_PAIRS);
    let tile = STEP_PAIRS * 16;
    let first = (i / 16 * steps) * tile + i % 16 * STEP_PAIRS;
    assert!(steps > 0 && p16.len() >= first + (steps - 1) * tile + STEP_PAIRS);
    assert!(crate::bf16_level() == crate::Bf16Level::Amx);
    (steps, first)
}

/// `n` values `factor·src[j·stride]` rounded to bf16 into `dst`'s words, two per word (a zero
/// after an odd `n`): 16 values per `vcvtneps2bf16` when contiguous and unscaled at the
/// AVX512-BF16 level, with the scalar rounding's bits (tested in `crate::bf16`); the products
/// are those of [`crate::simd::scale_into`], so the bits are its row's, then rounded.
pub(super) fn convert_strided(src: &[f32], n: usize, stride: usize, factor: f32, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if stride == 1 && factor == 1.0 && crate::bf16_level().has_avx512bf16() {
        // SAFETY: the level was detected; `convert_row` checks `dst`'s length.
        unsafe { crate::bf16::avx512bf16::convert_row(&src[..n], dst) };
        return;
    }
    for (p, word) in dst[..n.div_ceil(2)].iter_mut().enumerate() {
        let lo = src[2 * p * stride] * factor;
        let hi = if 2 * p + 1 < n {
            src[(2 * p + 1) * stride] * factor
        } else {
            0.0
        };
        *word = f32::from_bits(crate::f32_to_bf16(lo) as u32 | (crate::f32_to_bf16(hi) as u32) << 16);
    }
}

/// `src` rounded to bf16 into `dst`'s words, two per word (a zero after an odd count).
pub(super) fn convert_row(src: &[f32], dst: &mut [f32]) {
    convert_strided(src, src.len(), 1, 1.0, dst)
}

/// `factor·x` for each `x` of `src` rounded to bf16 pairs into `dst`, as [`convert_row`] of
/// [`crate::simd::scale_into`]'s products (the same bits, without the f32 row between them):
/// a scaled query row at the AVX512-BF16 level.
pub(super) fn scaled_row_into_pairs(src: &[f32], factor: f32, dst: &mut [f32]) {
    assert!(crate::bf16_level().has_avx512bf16());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the level was checked; `convert_row_scaled` checks `dst`'s length.
    unsafe {
        crate::bf16::avx512bf16::convert_row_scaled(src, factor, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (src, factor, dst);
        unreachable!("AVX512-BF16 exists on x86-64 only")
    }
}

/// Contiguous copies of `factor·x` for each `(x, factor)` of `parts`, rounded to bf16: the
/// flash kernel makes them of `scale·q`, `k` and `v` (with the scale then 1) to multiply bf16
/// operands in f32 (`super::rounds_into_f32`), and [`crate::attention_weights`] of `scale·q`
/// and `k`. The copies follow one another in one buffer of the thread's pool ([`crate::buffer::take`];
/// hand it back with [`crate::buffer::give`]), so that a call does not fault in fresh pages.
pub(crate) fn rounded_copies(parts: &[(&View4<'_, f32>, f32)], par: Par) -> Buffer {
    let total = parts.iter().map(|(x, _)| x.shape().iter().product::<usize>()).sum();
    let mut out = crate::buffer::take(total);
    let mut rest = &mut out[..];
    for (x, factor) in parts {
        let (head, tail) = rest.split_at_mut(x.shape().iter().product());
        rounded_into(x, *factor, head, par);
        rest = tail;
    }
    out
}

/// `out = factor·x` rounded to bf16, contiguous in `x`'s shape (`out` holds exactly its values).
fn rounded_into(x: &View4<'_, f32>, factor: f32, out: &mut [f32], par: Par) {
    let [_, n1, n2, n3] = x.shape();
    let st = x.strides();
    let data = x.data();
    if n3 == 0 {
        return;
    }
    let fill = |(r, row): (usize, &mut [f32])| {
        let base = r / (n1 * n2) * st[0] + r / n2 % n1 * st[1] + r % n2 * st[2];
        if st[3] == 1 {
            round_into(&data[base..base + n3], factor, row);
        } else {
            for (i3, y) in row.iter_mut().enumerate() {
                *y = round_to_bf16(data[base + i3 * st[3]] * factor);
            }
        }
    };
    // Rows in parallel on large copies (each row's values are the same either way).
    if par == Par::Rayon && out.len() >= 1 << 15 {
        out.par_chunks_mut(n3).with_min_len(64).enumerate().for_each(fill);
    } else {
        out.chunks_mut(n3).enumerate().for_each(fill);
    }
}

/// `dst[i] = factor·src[i]` rounded to bf16: 16 at a time by `vcvtneps2bf16` at the
/// AVX512-BF16 level, 8 at a time at the other vector levels (the bits of [`round_to_bf16`],
/// as `convert_row`'s).
fn round_into(src: &[f32], factor: f32, dst: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        done = src.len() / 16 * 16;
        // SAFETY: the level was detected; both slices hold at least `done` values.
        unsafe { super::bf16_x86::round_scaled(&src[..done], factor, &mut dst[..done]) };
    } else if crate::simd::simd_level().is_vector() {
        done = src.len();
        // SAFETY: every vector level has AVX2; `dst` holds `src`'s values (the caller's rows).
        unsafe { crate::bf16::round_avx2::round_scaled(src, factor, &mut dst[..done]) };
    }
    for (y, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *y = round_to_bf16(x * factor);
    }
}

/// The packed block of `len` words that holds key `t0` of `(b, g)` in `packed` (from
/// [`pack_keys`] or [`pack_values`]).
#[inline]
pub(super) fn packed_block<'a>(packed: &'a [f32], len: usize, plan: &Plan, [b, g, t0]: [usize; 3]) -> &'a [f32] {
    let index = (b * plan.g + g) * plan.t.div_ceil(plan.block_keys) + t0 / plan.block_keys;
    &packed[index * len..(index + 1) * len]
}
