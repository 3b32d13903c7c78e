//! Packing for [`super`]'s GEMM: `A` slivers step-major, `B` panels from f32 (any strides) or
//! from bf16 panels, and the rounding of packed values to bf16.

use super::{masks, KC, MR, NR, V};
use std::arch::x86_64::*;

/// Packs `b[0..kc, 0..nc]` into panels of [`NR`] columns: panel `q` at `q · depth · NR` (`depth`
/// is [`KC`] for a block, the whole depth for [`crate::F32Panels`]), its row `p` at `p · NR`,
/// columns past `nc` zero (never stored; zeroed so that no leftover NaN or subnormal reaches the
/// FMAs). Row-major `b` is copied a row at a time; other strides as
/// [`super::super::own::pack_b_strided`] packs them.
///
/// # Safety
/// `b` readable at `p·rs + j·cs` for `p < kc`, `j < nc`; `kc ≤ depth`; `dst` holds
/// `nc.div_ceil(NR) · depth · NR`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack_b(dst: &mut [f32], depth: usize, b: *const f32, rs: usize, cs: usize, kc: usize, nc: usize) {
    for q in 0..nc.div_ceil(NR) {
        let j0 = q * NR;
        let cols = (nc - j0).min(NR);
        let panel = &mut dst[q * depth * NR..q * depth * NR + kc * NR];
        // SAFETY: every read is inside the block, by the caller's guarantee.
        unsafe {
            let src = b.add(j0 * cs);
            if cs == 1 {
                let masks = masks(cols);
                for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                    let from = src.add(p * rs);
                    for (v, &mask) in masks.iter().enumerate() {
                        // Zeros for a vector wholly past `cols`, whose address could lie past `b`.
                        let value = if mask == 0 {
                            _mm512_setzero_ps()
                        } else {
                            _mm512_maskz_loadu_ps(mask, from.add(16 * v))
                        };
                        _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), value);
                    }
                }
            } else {
                super::super::own::pack_b_strided(panel, src, rs, cs, kc, cols);
            }
        }
    }
}

/// [`pack_b`] for a bf16 operand: rows `pc..pc + kc` and the first `nc` columns of the panels
/// at `words` (`panel` words apart), widened to f32 (exactly: a bf16 value is the upper half of
/// an f32). Columns past the operand's are zero words in the panels, so zeros here.
///
/// # Safety
/// `words` holds `⌈nc / 16⌉` panels `panel` words apart of at least `⌈(pc + kc) / 2⌉` pair rows;
/// `dst` as for [`pack_b`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn widen_b(dst: &mut [f32], words: *const u32, panel: usize, pc: usize, kc: usize, nc: usize) {
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for q in 0..nc.div_ceil(NR) {
        let cols = (nc - q * NR).min(NR);
        let out = &mut dst[q * KC * NR..q * KC * NR + kc * NR];
        // SAFETY: the bf16 panels `V·q + v` that hold some of the block's columns (`16·v <
        // cols`), pair rows below `⌈(pc + kc) / 2⌉`, by the caller's guarantee.
        unsafe {
            let first = words.add(V * q * panel);
            let sources: [Option<*const u32>; V] =
                std::array::from_fn(|v| (16 * v < cols).then(|| first.add(v * panel)));
            for (p, row) in out.chunks_exact_mut(NR).enumerate() {
                let depth = pc + p;
                let at = depth / 2 * 16;
                let widen = |w: __m512i| {
                    _mm512_castsi512_ps(if depth.is_multiple_of(2) {
                        _mm512_slli_epi32::<16>(w)
                    } else {
                        _mm512_and_si512(w, high)
                    })
                };
                for (v, source) in sources.iter().enumerate() {
                    let w = source.map_or(_mm512_setzero_si512(), |words| _mm512_loadu_si512(words.add(at).cast()));
                    _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), widen(w));
                }
            }
        }
    }
}

/// Rounds each value of `row` to bf16 in place, with the bits of [`crate::round_to_bf16`]: to
/// nearest, ties to even; NaN made quiet; subnormals to zeros of their sign.
#[target_feature(enable = "avx512f")]
pub(crate) fn round_row_to_bf16(row: &mut [f32]) {
    for chunk in row.chunks_mut(16) {
        let mask: __mmask16 = ((1u32 << chunk.len()) - 1) as u16;
        // SAFETY: the masked lanes are inside `chunk`.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, chunk.as_ptr());
            _mm512_mask_storeu_ps(chunk.as_mut_ptr(), mask, round_lanes(x));
        }
    }
}

/// Each lane of `x` rounded to bf16, with the bits of [`crate::round_to_bf16`] (see
/// [`round_row_to_bf16`]).
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn round_lanes(x: __m512) -> __m512 {
    let bits = _mm512_castps_si512(x);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let upper = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let rounded = _mm512_and_si512(
        _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)),
        upper,
    );
    let exp = _mm512_and_si512(bits, _mm512_set1_epi32(0x7F80_0000));
    let subnormal = _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512());
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let sign = _mm512_set1_epi32(0x8000_0000u32 as i32);
    let out = _mm512_mask_mov_epi32(rounded, subnormal, _mm512_and_si512(bits, sign));
    let quieted = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)), upper);
    _mm512_castsi512_ps(_mm512_mask_mov_epi32(out, nan, quieted))
}

/// Packs `a[0..mr, 0..kc]` step-major with this level's [`MR`] ([`super::super::own::pack_a_body`]).
///
/// # Safety
/// `a` readable at `i·rs + p·cs` for `i < mr`, `p < kc`; `dst` holds `kc · MR`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_a(dst: &mut [f32], a: *const f32, rs: usize, cs: usize, mr: usize, kc: usize) {
    // SAFETY: by the caller's guarantee.
    unsafe { super::super::own::pack_a_body::<MR>(dst, a, rs, cs, mr, kc) }
}
