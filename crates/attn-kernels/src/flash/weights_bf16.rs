//! The scores of [`crate::attention_weights`]'s second pass in bf16, from the products the
//! forward runs on this CPU ([`Bf16Scores`]), so that its weights are the forward's
//! probabilities bit for bit, as the kept weights of [`super::weights`] are.
//!
//! Where the forward multiplies rounded operands in f32 ([`super::rounds_into_f32`]), the
//! second pass already has its bits: it runs the f32 kernel on rounded copies of `scale·q` and
//! `k`. Elsewhere it runs what the forward runs: `vdpbf16ps` on K packed into pairs and the
//! scaled query rows rounded into pairs, or, decoding, the dot products against K read in
//! place (rounded as loaded) of query rows rounded in f32. Each score is one sum over `D` in an
//! order that does not depend on which rows or keys share a tile, so the second pass may cut
//! its tiles differently (per head, not per key/value group). AMX tiles are not run here: on
//! AMX the second pass stays on the rounded copies (docs/SEMANTICS.md says where it differs).

use super::{bf16, decodes_in_place, rounds_into_f32, Plan, BF16_BLOCK_KEYS, BF16_SCORES_LD, BLOCK_ROWS};
use crate::buffer::Buffer;
use crate::{round_to_bf16, Bf16Level, Par, View4};

/// How a bf16 call's forward computes its scores, where that is not the f32 kernel on rounded
/// operands: what [`crate::attention_weights`] computes them with to get the same bits.
pub(crate) enum Bf16Scores<'a> {
    /// `vdpbf16ps` on `(plan, K packed)` as [`bf16::pack_keys`] packs it for the call.
    Packed(Plan, Buffer),
    /// Decoding's dot products against `K` read in place.
    InPlace(View4<'a, f32>),
}

impl<'a> Bf16Scores<'a> {
    /// The forward's score kernel for a call of `plan` on `k`, with V's strides `v_strides` (the
    /// forward reads K and V in place only when both rows are contiguous): `None` where the
    /// forward multiplies rounded operands in f32 or runs on AMX tiles.
    pub(crate) fn for_call(plan: &Plan, k: View4<'a, f32>, v_strides: [usize; 4], par: Par) -> Option<Self> {
        assert_eq!(
            plan.block_keys, BF16_BLOCK_KEYS,
            "a bf16 call's plan has blocks of {BF16_BLOCK_KEYS} keys"
        );
        let in_place = decodes_in_place(plan, k.strides(), v_strides);
        if rounds_into_f32(in_place) {
            return None;
        }
        if in_place {
            return Some(Bf16Scores::InPlace(k));
        }
        if crate::bf16_level() == Bf16Level::Amx {
            return None;
        }
        Some(Bf16Scores::Packed(*plan, bf16::pack_keys(plan, &k, false, par)))
    }

    /// The words of one query row in a tile: `D / 2` rounded up pairs, or `D` rounded values.
    pub(crate) fn row_words(&self, d: usize) -> usize {
        match self {
            Bf16Scores::Packed(..) => d.div_ceil(2),
            Bf16Scores::InPlace(_) => d,
        }
    }

    /// `scale·q` for the `d` values `src[j·stride]` into `dst` ([`Bf16Scores::row_words`]
    /// words), as the forward's tile holds a query row: rounded into pairs, or rounded in f32.
    pub(crate) fn load_row(&self, src: &[f32], [d, stride]: [usize; 2], scale: f32, dst: &mut [f32]) {
        match self {
            Bf16Scores::Packed(..) if stride == 1 => bf16::scaled_row_into_pairs(&src[..d], scale, dst),
            // The forward scales a strided row into f32 first, then rounds it into pairs: the
            // same bits.
            Bf16Scores::Packed(..) => bf16::convert_strided(src, d, stride, scale, dst),
            Bf16Scores::InPlace(_) => {
                for (j, x) in dst[..d].iter_mut().enumerate() {
                    *x = round_to_bf16(src[j * stride] * scale);
                }
            }
        }
    }

    /// `scores[i·BF16_SCORES_LD + j]` = query row `i` of `q_tile` (rows [`Bf16Scores::row_words`]
    /// apart, loaded by [`Bf16Scores::load_row`]) against key `t0 + j` of `(b, g)`, for
    /// `i < n_rows` and `j < bc`, by the forward's kernel.
    pub(crate) fn block(&self, q_tile: &[f32], n_rows: usize, [b, g, t0, bc]: [usize; 4], scores: &mut [f32]) {
        assert!(n_rows <= BLOCK_ROWS && bc <= BF16_BLOCK_KEYS && scores.len() >= BLOCK_ROWS * BF16_SCORES_LD);
        match self {
            Bf16Scores::Packed(plan, kt16) => {
                let pairs = plan.d.div_ceil(2);
                assert!(q_tile.len() >= n_rows * pairs && t0 + bc <= plan.t && b < plan.b && g < plan.g);
                let kt = bf16::packed_block(kt16, bf16::key_block_len(plan, false), plan, [b, g, t0]);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Packed` is made only where the forward runs `vdpbf16ps` (the
                // AVX512-BF16 level, not AMX); `q_tile` holds `n_rows` rows of `pairs` words,
                // `kt` the block's `kb_pad / 16` panels of `pairs · 16` words with `bc <=
                // kb_pad`, and `scores` `[BLOCK_ROWS, BF16_SCORES_LD]` (checked above).
                unsafe {
                    crate::bf16::avx512bf16::tile::<false>(
                        n_rows,
                        bc,
                        pairs,
                        q_tile.as_ptr().cast(),
                        pairs,
                        kt.as_ptr().cast(),
                        pairs * 16,
                        scores.as_mut_ptr(),
                        BF16_SCORES_LD,
                    )
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("vdpbf16ps exists on x86-64 only: {kt:p}");
            }
            Bf16Scores::InPlace(k) => {
                let d = k.shape()[3];
                let st = k.strides();
                let base = b * st[0] + g * st[1] + t0 * st[2];
                // A tile of one head's rows: at most the `S · H / G <= DECODE_ROWS` rows of a
                // call that decodes in place.
                assert!(n_rows <= crate::DECODE_ROWS && st[3] == 1 && q_tile.len() >= n_rows * d);
                assert!(
                    bc == 0 || base + (bc - 1) * st[2] + d <= k.data().len(),
                    "key block outside K"
                );
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `InPlace` is made only where the forward decodes on the AVX512-BF16
                // instructions; at most `DECODE_ROWS` rows of `d` values in `q_tile`, `bc` keys
                // of `d` contiguous values inside K, stores inside `scores` (checked above).
                unsafe {
                    super::bf16_x86::dot_rows(
                        n_rows,
                        d,
                        q_tile.as_ptr(),
                        d,
                        k.data().as_ptr().add(base),
                        st[2],
                        bc,
                        scores.as_mut_ptr(),
                        BF16_SCORES_LD,
                    )
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("AVX512-BF16 exists on x86-64 only: {n_rows} rows");
            }
        }
    }

    /// Hands the packed keys back to the thread's pool.
    pub(crate) fn give(self) {
        if let Bf16Scores::Packed(_, packed) = self {
            crate::buffer::give(packed);
        }
    }
}
