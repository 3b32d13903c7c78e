//! Passes 1 and 4 of a row tile on keys and values held as bf16 bits (a bf16 KV cache) with
//! the f32 kernels ([`super::kv_bits`]): decoding's kernels read the bits in place and widen
//! them in registers, exactly in f32, or as rounding their values gives them in bf16 without
//! bf16 instructions; the bits of [`super::tile`]'s passes on the values they stand for.

use super::scratch::{KeyBlock, Scratch, TileRows};
use super::tile_values::{value_panels, values_product};
use super::{Operands, Plan};
use crate::scores::ScoreKernel;
use crate::tile::{Bf16Bits, Bf16Rounded, NR};
use crate::View4;

/// Pass 1 on keys held as bf16 bits (decoding from a bf16 cache with the f32 kernels,
/// [`super::kv_bits`]): decoding's dot products against the keys in place, each key widened
/// as it is loaded (and rounded, as rounding its value gives, when `ops.round_q` says the
/// operands are rounded: bf16 without bf16 instructions), so the bits of [`ScoreKernel::Dot`]
/// on those values. Returns false (no maxima folded, as that kernel).
pub(super) fn bits_scores(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    k: &View4<'_, u16>,
) -> bool {
    assert!(
        ops.score_kernel == ScoreKernel::Dot,
        "bf16 keys are read in place by decoding's dot products only"
    );
    let (d, bc, n_rows, ld) = (plan.d, block.bc, rows.n_rows, plan.scores_ld);
    let (k_data, k_st) = (k.data(), k.strides());
    let k_base = rows.b * k_st[0] + rows.g * k_st[1] + block.t0 * k_st[2];
    assert!(
        k_st[3] == 1 && bc > 0 && k_base + (bc - 1) * k_st[2] + d <= k_data.len(),
        "key block past K"
    );
    assert!(n_rows <= crate::tile::DECODE_ROWS_MAX && scratch.q_tile.len() >= n_rows * d);
    assert!(scratch.scores.len() >= (n_rows - 1) * ld + bc && bc <= ld);
    #[cfg(target_arch = "x86_64")]
    {
        let (q, keys, c) = (
            scratch.q_tile.as_ptr(),
            k_data[k_base..].as_ptr(),
            scratch.scores.as_mut_ptr(),
        );
        // SAFETY: the Dot kernel is chosen only at a vector level; `q_tile` holds the tile's
        // `n_rows` rows of `D`, the block's `bc` keys of `D` contiguous bits lie inside K and
        // `scores` holds `n_rows` rows of `ld ≥ bc` (all checked above).
        unsafe {
            if ops.round_q {
                crate::tile::dot_rows::<Bf16Rounded>(n_rows, bc, d, q, d, keys, k_st[2], c, ld)
            } else {
                crate::tile::dot_rows::<Bf16Bits>(n_rows, bc, d, q, d, keys, k_st[2], c, ld)
            }
        };
    }
    false
}

/// Pass 4 on values held as bf16 bits (decoding from a bf16 cache with the f32 kernels,
/// [`super::kv_bits`]): rows of whole panels read in place and widened as they are loaded,
/// other rows widened into panels first (rounded either way, as rounding their values gives,
/// when `ops.round_q` says the operands are rounded); the bits of the f32 kernel's pass 4 on
/// those values, which takes the same two routes.
pub(super) fn bits_weighted_values(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    v: &View4<'_, u16>,
) {
    let (dv, dv_pad, n_rows) = (plan.dv, plan.dv_pad, rows.n_rows);
    let KeyBlock { bc, v_base, .. } = *block;
    let (v_data, v_st) = (v.data(), v.strides());
    assert!(
        ops.micro && ops.v_packed.is_none() && v_st[3] == 1 && n_rows <= crate::tile::DECODE_ROWS_MAX,
        "bf16 values are read in place by decoding's kernels only"
    );
    if dv != dv_pad {
        let (panels, values) = (&mut scratch.vp, &v_data[v_base..]);
        if ops.round_q {
            value_panels::<Bf16Rounded>(panels, plan.kb_pad, values, bc, dv, [v_st[2], 1]);
        } else {
            value_panels::<Bf16Bits>(panels, plan.kb_pad, values, bc, dv, [v_st[2], 1]);
        }
        values_product(
            scratch,
            plan,
            n_rows,
            block,
            (scratch.vp.as_ptr(), NR, plan.kb_pad * NR),
        );
        return;
    }
    assert!(
        v_base + (bc - 1) * v_st[2] + dv_pad <= v_data.len(),
        "value block past V"
    );
    assert!(scratch.acc.len() >= n_rows * dv_pad && scratch.scores.len() >= (n_rows - 1) * plan.scores_ld + bc);
    if block.first {
        scratch.acc[..n_rows * dv_pad].fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (p, ldp, acc) = (scratch.scores.as_ptr(), plan.scores_ld, scratch.acc.as_mut_ptr());
        let values = v_data[v_base..].as_ptr();
        // SAFETY: `micro` is set only at a vector level; `scores` holds `n_rows` rows of `bc`
        // probabilities, the block's `bc` value rows of `Dv_pad` contiguous bits lie inside V
        // and `acc` holds `n_rows` rows of `Dv_pad` (all checked above).
        unsafe {
            if ops.round_q {
                crate::tile::axpy_rows::<Bf16Rounded>(n_rows, dv_pad, bc, p, ldp, values, v_st[2], acc, dv_pad)
            } else {
                crate::tile::axpy_rows::<Bf16Bits>(n_rows, dv_pad, bc, p, ldp, values, v_st[2], acc, dv_pad)
            }
        };
    }
}
