//! Passes 1 and 4 of a row tile in bf16 ([`crate::Precision::Bf16`]): on `vdpbf16ps` or AMX
//! tiles ([`AmxTile`]) over K and V packed by [`super::bf16`] (per `(b, g)` or per call), or,
//! decoding, over K and V read in place.

use super::scratch::{KeyBlock, Scratch, TileRows};
use super::{Bf16Source, Kv, Operands, Plan, BF16_BLOCK_KEYS, BF16_SCORES_LD, BLOCK_ROWS, P16_LD};

/// Pass 1 on `vdpbf16ps` or AMX: the tile's query pairs against the key block, packed or in
/// place.
pub(super) fn bf16_scores(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    source: Bf16Source<'_>,
    amx: &mut AmxTile,
) {
    // The bf16 kernels' tiles and layouts are those of blocks of BF16_BLOCK_KEYS keys.
    assert_eq!(
        plan.scores_ld, BF16_SCORES_LD,
        "a bf16 call's plan has blocks of {BF16_BLOCK_KEYS} keys"
    );
    let key_len = super::bf16::key_block_len(plan, ops.amx);
    #[cfg(target_arch = "x86_64")]
    if let (true, Bf16Source::Packed(kt16, _)) = (ops.amx, source) {
        let kt = super::bf16::packed_block(kt16, key_len, plan, ops.packed_at(rows, block.t0));
        amx.scores(plan, &scratch.q16, [rows.n_rows, block.bc], kt, &mut scratch.scores);
        return;
    }
    let _ = amx;
    let pairs = plan.d.div_ceil(2);
    assert!(
        scratch.q16.len() >= rows.n_rows * pairs
            && scratch.q_tile.len() >= rows.n_rows * plan.d
            && scratch.scores.len() >= BLOCK_ROWS * BF16_SCORES_LD
    );
    let k_st = ops.k.strides();
    let k_base = rows.b * k_st[0] + rows.g * k_st[1] + block.t0 * k_st[2];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `ops.bf16` is set only at the detected AVX512-BF16 level; `scores` is
    // `[BLOCK_ROWS, BF16_SCORES_LD]` with `bc <= BF16_SCORES_LD`. Packed: `q16` holds the tile's rows of
    // `pairs` words, `kt` the block's `kb_pad / 16` panels of `pairs · 16` words (`bc <=
    // kb_pad`). In place: at most `DECODE_ROWS_MAX` rows of `D` rounded values in `q_tile`,
    // and the block's `bc` keys of `D` contiguous values lie inside K (checked).
    unsafe {
        match source {
            Bf16Source::Packed(kt16, _) => {
                let kt = super::bf16::packed_block(kt16, key_len, plan, ops.packed_at(rows, block.t0));
                crate::bf16::avx512bf16::tile::<false>(
                    rows.n_rows,
                    block.bc,
                    pairs,
                    scratch.q16.as_ptr().cast(),
                    pairs,
                    kt.as_ptr().cast(),
                    pairs * 16,
                    scratch.scores.as_mut_ptr(),
                    BF16_SCORES_LD,
                )
            }
            Bf16Source::InPlace => {
                let (q, c) = (scratch.q_tile.as_ptr(), scratch.scores.as_mut_ptr());
                let (n, d, ks, bc) = (rows.n_rows, plan.d, k_st[2], block.bc);
                match ops.k {
                    Kv::F32(k) => {
                        let k = in_place(k.data(), k_base, bc, ks, d, "key");
                        super::bf16_x86::dot_rows(n, d, q, d, k, ks, bc, c, BF16_SCORES_LD)
                    }
                    Kv::Bits(k) => {
                        let k = in_place(k.data(), k_base, bc, ks, d, "key");
                        super::bf16_x86::dot_rows(n, d, q, d, k, ks, bc, c, BF16_SCORES_LD)
                    }
                }
            }
        }
    };
    let _ = (k_base, k_st, source);
}

#[cfg(target_arch = "x86_64")]
/// The first of `rows` rows of `width` elements, `stride` apart from `base`, of `data`;
/// panics (naming `what`) if the last row would end past `data`.
fn in_place<E>(data: &[E], base: usize, rows: usize, stride: usize, width: usize, what: &str) -> *const E {
    assert!(
        rows > 0 && base + (rows - 1) * stride + width <= data.len(),
        "{what} block past its operand"
    );
    data[base..].as_ptr()
}

/// Pass 4 on `vdpbf16ps` or AMX: the probabilities rounded into rows of pairs (A tiles on
/// AMX), then `acc += P · V` against the value block, packed or in place.
pub(super) fn bf16_weighted_values(
    scratch: &mut Scratch,
    plan: &Plan,
    ops: &Operands<'_, '_>,
    rows: &TileRows,
    block: &KeyBlock,
    source: Bf16Source<'_>,
    amx: &mut AmxTile,
) {
    let (dv, dv_pad, n_rows) = (plan.dv, plan.dv_pad, rows.n_rows);
    let KeyBlock { bc, v_base, .. } = *block;
    let value_len = super::bf16::value_block_len(plan, ops.amx);
    #[cfg(target_arch = "x86_64")]
    if let (true, Bf16Source::Packed(_, v16)) = (ops.amx, source) {
        // The probabilities are in `p16` already (`passes2_3_online_softmax`).
        let vp = super::bf16::packed_block(v16, value_len, plan, ops.packed_at(rows, block.t0));
        amx.weighted_values(plan, &scratch.p16, [n_rows, bc], vp, &mut scratch.acc, block.first);
        return;
    }
    let _ = amx;
    // Packed: the probabilities are in `p16` already (`passes2_3_online_softmax`).
    let (lda, pairs) = (P16_LD, bc.div_ceil(2));
    assert!(scratch.acc.len() >= n_rows * dv_pad && scratch.p16.len() >= BLOCK_ROWS * lda);
    if block.first && matches!(source, Bf16Source::InPlace) {
        // The in-place products add to `acc`: start it from zeros.
        scratch.acc[..n_rows * dv_pad].fill(0.0);
    }
    let v_st = ops.v.strides();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `ops.bf16` is set only at the detected AVX512-BF16 level; `acc` is
    // `[BLOCK_ROWS, Dv_pad]`. Packed: `p16` holds the tile's rows of `pairs <= lda` words (an
    // odd block's last pair ends in a zero), `vp` the block's `Dv_pad / 16` panels of
    // `kb_pad / 2 · 16` words (`pairs <= kb_pad / 2`). In place: at most `DECODE_ROWS_MAX`
    // rows of `bc` rounded probabilities in `scores`, and the block's `bc` value rows of `Dv`
    // contiguous values lie inside V (checked).
    unsafe {
        match source {
            Bf16Source::Packed(_, v16) => {
                let vp = super::bf16::packed_block(v16, value_len, plan, ops.packed_at(rows, block.t0));
                let product = if block.first {
                    crate::bf16::avx512bf16::tile::<false>
                } else {
                    crate::bf16::avx512bf16::tile::<true>
                };
                product(
                    n_rows,
                    dv,
                    pairs,
                    scratch.p16.as_ptr().cast(),
                    lda,
                    vp.as_ptr().cast(),
                    plan.kb_pad / 2 * 16,
                    scratch.acc.as_mut_ptr(),
                    dv_pad,
                )
            }
            Bf16Source::InPlace => {
                let (p, acc, vs) = (scratch.scores.as_ptr(), scratch.acc.as_mut_ptr(), v_st[2]);
                match ops.v {
                    Kv::F32(v) => {
                        let v = in_place(v.data(), v_base, bc, vs, dv, "value");
                        super::bf16_x86::axpy_rows(n_rows, dv, bc, p, BF16_SCORES_LD, v, vs, acc, dv_pad)
                    }
                    Kv::Bits(v) => {
                        let v = in_place(v.data(), v_base, bc, vs, dv, "value");
                        super::bf16_x86::axpy_rows(n_rows, dv, bc, p, BF16_SCORES_LD, v, vs, acc, dv_pad)
                    }
                }
            }
        }
    };
    let _ = (v_st, source, v_base);
}

/// AMX's share of one row tile: the tile registers, configured by the tile's first product
/// and released when the tile is done (dropped).
#[derive(Default)]
pub(super) struct AmxTile {
    #[cfg(target_arch = "x86_64")]
    tiles: Option<crate::bf16::amx::Tiles>,
}

#[cfg(target_arch = "x86_64")]
impl AmxTile {
    /// The tile registers, taken on first use.
    fn tiles(&mut self) -> &mut crate::bf16::amx::Tiles {
        // SAFETY: `Operands::amx` is set, and these functions called, only at the detected
        // AMX level (`amx::available` returned true).
        self.tiles
            .get_or_insert_with(|| unsafe { crate::bf16::amx::Tiles::new(false) })
    }

    /// Pass 1 on AMX: `scores[i, j] = q_i · k_j` for `i < n_rows`, `j < bc`, from the query
    /// tile's A tiles `q16` ([`super::bf16::row_into_tiles`]) and the packed key block `keys` ([`super::bf16::pack_keys`]
    /// for AMX), `scores` rows [`super::BF16_SCORES_LD`] apart.
    pub(super) fn scores(
        &mut self,
        plan: &Plan,
        q16: &[f32],
        [n_rows, bc]: [usize; 2],
        keys: &[f32],
        scores: &mut [f32],
    ) {
        let pairs = super::bf16::key_pairs(plan, true);
        let steps = pairs / crate::bf16::AMX_STEP_PAIRS;
        let a_tiles = steps * crate::bf16::AMX_STEP_PAIRS * 16;
        assert!(n_rows > 0 && bc > 0 && bc <= super::BF16_SCORES_LD);
        assert!(q16.len() >= n_rows.div_ceil(16) * a_tiles && keys.len() >= bc.div_ceil(16) * pairs * 16);
        assert!(scores.len() >= (n_rows - 1) * super::BF16_SCORES_LD + bc);
        // SAFETY: the tiles cover `n_rows` rows of `steps` steps and `bc` columns of `pairs`
        // pairs (checked); `scores` holds `n_rows` rows of `bc` values.
        unsafe {
            self.tiles().product(
                [n_rows, bc, steps],
                (q16.as_ptr().cast(), a_tiles),
                (keys.as_ptr().cast(), pairs * 16),
                scores.as_mut_ptr(),
                super::BF16_SCORES_LD,
                crate::bf16::amx::Init::Zero,
            )
        }
    }

    /// Pass 4 on AMX: `acc[i, c] += Σ_j p[i, j] · v[j, c]` (`=` when `first`, from zeroed
    /// tiles: the bits of adding to zeros) for `i < n_rows`, `c < Dv`,
    /// `j < bc`, from the probabilities' A tiles `p16` (written by
    /// [`super::bf16::exp_sub_sum_into_tiles`] or [`super::bf16::row_into_tiles`] from `bc` values, so zeros from `bc` to
    /// the step's end) and the packed value block `values`
    /// ([`super::bf16::pack_values`] for AMX), `acc` rows `Dv_pad` apart.
    pub(super) fn weighted_values(
        &mut self,
        plan: &Plan,
        p16: &[f32],
        [n_rows, bc]: [usize; 2],
        values: &[f32],
        acc: &mut [f32],
        first: bool,
    ) {
        let (dv, dv_pad) = (plan.dv, plan.dv_pad);
        let pairs = super::bf16::value_pairs(plan, true);
        let steps = bc.div_ceil(2 * crate::bf16::AMX_STEP_PAIRS);
        let a_tiles = steps * crate::bf16::AMX_STEP_PAIRS * 16;
        assert!(n_rows > 0 && bc > 0 && steps * crate::bf16::AMX_STEP_PAIRS <= pairs);
        assert!(p16.len() >= n_rows.div_ceil(16) * a_tiles && values.len() >= dv_pad / 16 * pairs * 16);
        assert!(acc.len() >= (n_rows - 1) * dv_pad + dv);
        // SAFETY: the A tiles cover `n_rows` rows of `steps` steps, the value panels `pairs`
        // pairs, at least `steps` steps (checked); `acc` holds `n_rows` rows of `dv` values.
        unsafe {
            self.tiles().product(
                [n_rows, dv, steps],
                (p16.as_ptr().cast(), a_tiles),
                (values.as_ptr().cast(), pairs * 16),
                acc.as_mut_ptr(),
                dv_pad,
                if first {
                    crate::bf16::amx::Init::Zero
                } else {
                    crate::bf16::amx::Init::Dst
                },
            )
        }
    }
}
