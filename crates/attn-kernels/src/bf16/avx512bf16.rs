//! The AVX512-BF16 kernel; every function requires AVX-512F and AVX512-BF16.

use std::arch::x86_64::*;

pub(crate) use super::PANEL;
pub(crate) use tasks::{gemm, Lhs};

mod tasks;

/// Rows of one micro-kernel call.
const MR: usize = 8;
// A block of `MR` rows never crosses a panel of 16 rows of a left operand in panels.
const _: () = assert!(PANEL.is_multiple_of(MR));

/// Word `i` of a pair vector takes bf16 lane `i` (the low row) and lane `16 + i` (the high).
const INDEX: [i16; 32] = {
    let mut index = [0i16; 32];
    let mut i = 0;
    while i < 16 {
        index[2 * i] = i as i16;
        index[2 * i + 1] = 16 + i as i16;
        i += 1;
    }
    index
};

/// `out[i] = pair(lo[i], hi[i])` for 16 lanes: both rounded by one `vcvtne2ps2bf16`, then
/// interleaved by one `vpermw`. The packing of row pairs (values in the flash kernel, both
/// operands of the weight gradient).
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 must be available; `lo` and `hi` readable and `out` writable
/// for 16 values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn interleave16(lo: *const f32, hi: *const f32, out: *mut f32) {
    // SAFETY: the caller's contract; the transmute is between 512-bit vectors.
    unsafe {
        let both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi), _mm512_loadu_ps(lo));
        let index = _mm512_loadu_si512(INDEX.as_ptr().cast());
        let words = _mm512_permutexvar_epi16(index, std::mem::transmute::<__m512bh, __m512i>(both));
        _mm512_storeu_si512(out.cast(), words);
    }
}

/// 32 lanes of bf16 bits as [`super::canonical`] makes them: a zero exponent becomes a zero
/// of its sign, a NaN is made quiet, the rest is kept.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn canonical32(h: __m512i) -> __m512i {
    let exponent = _mm512_and_si512(h, _mm512_set1_epi16(0x7F80));
    let zero_exponent = _mm512_cmpeq_epi16_mask(exponent, _mm512_setzero_si512());
    let magnitude = _mm512_and_si512(h, _mm512_set1_epi16(0x7FFF));
    let nan = _mm512_cmpgt_epu16_mask(magnitude, _mm512_set1_epi16(0x7F80));
    let h = _mm512_mask_blend_epi16(zero_exponent, h, _mm512_and_si512(h, _mm512_set1_epi16(i16::MIN)));
    _mm512_mask_blend_epi16(nan, h, _mm512_or_si512(h, _mm512_set1_epi16(0x0040)))
}

/// `n ≤ 16` words of bf16 pairs read from `src` (its first `2n` bits, two per word, in
/// order), made canonical ([`super::canonical`]), into the 16 words at `out`, zeros past `n`:
/// a step of a key packed straight from its bits.
///
/// # Safety
/// AVX-512F/BW must be available; `src` readable for `2n` values and `out` writable for 16.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn bits_to_words16(src: *const u16, n: usize, out: *mut f32) {
    let mask = if n >= 16 { u32::MAX } else { (1u32 << (2 * n)) - 1 };
    // SAFETY: the masked load reads the first `2n` values only; the store is the caller's.
    unsafe {
        let h = _mm512_maskz_loadu_epi16(mask, src.cast());
        _mm512_storeu_si512(out.cast(), canonical32(h));
    }
}

/// `out[c]` the pair `(lo[c], hi[c])` of bf16 bits for 16 columns, each made canonical
/// ([`super::canonical`]): two rows of values packed straight from their bits.
///
/// # Safety
/// AVX-512F/BW must be available; `lo` and `hi` readable for 16 values, `out` writable for 16.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn interleave_bits16(lo: *const u16, hi: *const u16, out: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe {
        let lo = _mm256_loadu_si256(lo.cast());
        let hi = _mm256_loadu_si256(hi.cast());
        let both = canonical32(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi));
        let index = _mm512_loadu_si512(INDEX.as_ptr().cast());
        _mm512_storeu_si512(out.cast(), _mm512_permutexvar_epi16(index, both));
    }
}

/// The transpose of a 16 × 16 block of words: `out[l·ld + p] = rows[p][l]` (row `l` of the
/// result at `out + l·ld`), by two rounds of unpacks within 128-bit lanes and two of lane
/// shuffles.
///
/// # Safety
/// AVX-512F must be available; `out + l·ld` writable for 16 words for every `l < 16`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(rows: &[[f32; 16]; 16], out: *mut f32, ld: usize) {
    // SAFETY: each row holds 16 words; the stores by the caller's contract.
    unsafe {
        let r: [__m512i; 16] = std::array::from_fn(|p| _mm512_loadu_si512(rows[p].as_ptr().cast()));
        // t[2k] = (r[2k][0] r[2k+1][0] r[2k][1] r[2k+1][1]) per lane, t[2k + 1] the lane's
        // words 2 and 3.
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // u[4q + j]: column j + 4·lane of rows 4q .. 4q + 4, per lane.
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (q, j) = (i / 4, i % 4);
            let (a, b) = (t[4 * q + j / 2], t[4 * q + 2 + j / 2]);
            if j % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        for j in 0..4 {
            // Lanes (col j, col j + 8) then (col j + 4, col j + 12) of rows 0..8 and 8..16.
            let v0 = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
            let w0 = _mm512_shuffle_i32x4::<0xDD>(u[j], u[4 + j]);
            let v1 = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
            let w1 = _mm512_shuffle_i32x4::<0xDD>(u[8 + j], u[12 + j]);
            let store = |l: usize, x: __m512i| _mm512_storeu_si512(out.add(l * ld).cast(), x);
            store(j, _mm512_shuffle_i32x4::<0x88>(v0, v1));
            store(j + 8, _mm512_shuffle_i32x4::<0xDD>(v0, v1));
            store(j + 4, _mm512_shuffle_i32x4::<0x88>(w0, w1));
            store(j + 12, _mm512_shuffle_i32x4::<0xDD>(w0, w1));
        }
    }
}

/// Pairs `p0 .. p0 + count` of the rows of `src: [n, width]` at columns `c0 .. c0 + cols`
/// (`cols ≤ 16`), each as [`interleave16`] pairs rows `2p` and `2p + 1`, pair `p` to the 16
/// words at `out + (p − p0)·16`; zeros for rows from `n` and columns from `cols`. One call per
/// run of pairs, so the level is checked once rather than per pair.
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 must be available; `out` writable for `16·count` words.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn interleave_rows(
    src: &[f32],
    [n, width, c0, cols]: [usize; 4],
    p0: usize,
    count: usize,
    out: *mut f32,
) {
    assert!(cols <= 16 && c0 + cols <= width && src.len() >= n * width);
    let mask = ((1u32 << cols) - 1) as __mmask16;
    // SAFETY: masked loads of `cols` values inside row `j < n` (asserted); the stores by the
    // caller's contract; the transmute is between 512-bit vectors.
    unsafe {
        let index = _mm512_loadu_si512(INDEX.as_ptr().cast());
        let row = |j: usize| {
            if j < n {
                _mm512_maskz_loadu_ps(mask, src.as_ptr().add(j * width + c0))
            } else {
                _mm512_setzero_ps()
            }
        };
        for q in 0..count {
            let p = p0 + q;
            let both = _mm512_cvtne2ps_pbh(row(2 * p + 1), row(2 * p));
            let words = _mm512_permutexvar_epi16(index, std::mem::transmute::<__m512bh, __m512i>(both));
            _mm512_storeu_si512(out.add(16 * q).cast(), words);
        }
    }
}

/// Pairs `p0 .. p0 + count` of the rows of `src: [n, width]` into every panel of 16 columns:
/// pair `p` of panel `j` (rows `2p` and `2p + 1` at columns `16j ..`, as [`interleave16`]
/// pairs them) to the 16 words at `out + j·panel_len + p·16`; zeros for rows from `n` and
/// columns from `width`. A pair of rows at a time across all the columns, so `src` is read
/// as two sequential streams (a panel at a time down 32 rows read 32 streams, 1.2–1.3× slower,
/// warm or cold).
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 must be available; `out` writable at
/// `j·panel_len + p·16 .. + 16` for every panel `j < width.div_ceil(16)` and `p0 ≤ p < p0 + count`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn interleave_across(
    src: &[f32],
    [n, width]: [usize; 2],
    p0: usize,
    count: usize,
    out: *mut f32,
    panel_len: usize,
) {
    assert!(src.len() >= n * width);
    let zero = _mm512_setzero_ps();
    // SAFETY: masked loads of the columns `c0 .. c0 + cols` of rows below `n` (asserted
    // inside `src`); the stores by the caller's contract; the transmute is between 512-bit
    // vectors.
    unsafe {
        let index = _mm512_loadu_si512(INDEX.as_ptr().cast());
        for p in p0..p0 + count {
            let (lo, hi) = (2 * p, 2 * p + 1);
            for c0 in (0..width).step_by(PANEL) {
                let mask = ((1u32 << (width - c0).min(PANEL)) - 1) as __mmask16;
                let row = |j: usize| {
                    if j < n {
                        _mm512_maskz_loadu_ps(mask, src.as_ptr().add(j * width + c0))
                    } else {
                        zero
                    }
                };
                let both = _mm512_cvtne2ps_pbh(row(hi), row(lo));
                let words = _mm512_permutexvar_epi16(index, std::mem::transmute::<__m512bh, __m512i>(both));
                _mm512_storeu_si512(out.add(c0 / PANEL * panel_len + PANEL * p).cast(), words);
            }
        }
    }
}

/// `src` rounded to bf16, in order, into `dst`'s words (two values per word, a zero after
/// an odd count).
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; `dst` must hold `src.len().div_ceil(2)` words.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn convert_row(src: &[f32], dst: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { convert_row_with::<false>(src, 1.0, dst) }
}

/// `factor·x` for each `x` of `src` (one f32 product: the bits of [`crate::simd::scale_into`]
/// then [`convert_row`]), rounded to bf16, in order, into `dst`'s words.
///
/// # Safety
/// As for [`convert_row`].
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn convert_row_scaled(src: &[f32], factor: f32, dst: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { convert_row_with::<true>(src, factor, dst) }
}

/// [`convert_row`], of `factor·x` when `SCALED`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_row_with<const SCALED: bool>(src: &[f32], factor: f32, dst: &mut [f32]) {
    let k = src.len();
    assert!(dst.len() >= k.div_ceil(2));
    let out = dst.as_mut_ptr().cast::<u16>();
    let scaled = |x: f32| if SCALED { x * factor } else { x };
    let mut p = 0;
    // SAFETY: `p + 16 <= k` reads inside `src`; `dst` holds at least `k` u16 slots.
    unsafe {
        let f = _mm512_set1_ps(factor);
        while p + 16 <= k {
            let mut x = _mm512_loadu_ps(src.as_ptr().add(p));
            if SCALED {
                x = _mm512_mul_ps(x, f);
            }
            let h: __m256bh = _mm512_cvtneps_pbh(x);
            _mm256_storeu_si256(out.add(p).cast(), std::mem::transmute::<__m256bh, __m256i>(h));
            p += 16;
        }
        for (q, &x) in src.iter().enumerate().skip(p) {
            *out.add(q) = super::f32_to_bf16(scaled(x));
        }
        if k % 2 == 1 {
            *out.add(k) = 0;
        }
    }
}

/// `factor·x` for each `x` of `src` (one f32 product, exact for a factor of 1), rounded to
/// bf16, in order, into `steps` rows of AMX A tiles: values `32s .. 32s + 32` into the 16 words
/// at `dst + s·stride`, zeros past `src`'s end (an odd count's last word included). One
/// `vcvtne2ps2bf16` per step, on masked loads: a row of the flash kernel's scaled queries or
/// probabilities, or of the AMX GEMM's left operand, in one call.
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; `src.len() <= 32·steps`; `dst + s·stride`
/// writable for 16 words for every `s < steps`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn convert_row_steps(src: &[f32], factor: f32, steps: usize, dst: *mut f32, stride: usize) {
    let k = src.len();
    assert!(k <= 32 * steps);
    let mask = |n: usize| ((1u32 << n.min(16)) - 1) as __mmask16;
    for s in 0..steps {
        let p = 32 * s;
        let (lo_n, hi_n) = (k.saturating_sub(p), k.saturating_sub(p + 16));
        // SAFETY: the masked loads read only lanes below `k` (pointers past the end are not
        // dereferenced: their lanes are masked off); the store is inside `dst`'s step `s` (the
        // caller's contract); the transmute is between 512-bit vectors.
        unsafe {
            let f = _mm512_set1_ps(factor);
            let lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(lo_n), src.as_ptr().wrapping_add(p)), f);
            let hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(hi_n), src.as_ptr().wrapping_add(p + 16)), f);
            let both = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                dst.add(s * stride).cast(),
                std::mem::transmute::<__m512bh, __m512i>(both),
            );
        }
    }
}

/// A pointer that may cross to rayon's workers: each task writes its own rows of `c` (here
/// and in the AMX kernel).
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) T);
// SAFETY: see the type's documentation.
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Shared<T> {}
impl<T: Copy> Shared<T> {
    pub(crate) fn get(self) -> T {
        self.0
    }
}

/// `c[0..ROWS, 0..16·VECS] (+)= Σ_q a[r·lda + q·A_STEP] · b_v[q]` over `pairs` pairs of the
/// depth, `b_v` the panel `v` (`b + v·b_panel`, 16 pairs per step); columns past `cols` are
/// neither read nor written (masked). Without `ADD`, the sums start from `bias[j]` when `bias`
/// is not null (the bits of writing the bias into `c` and adding to it), else from zero.
/// `A_STEP` is 1 for rows of pairs, 16 for rows of a left operand in panels ([`Lhs::Panels`]).
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; `a` readable at `r·lda + q·A_STEP`, each panel at
/// `q·16 .. q·16 + 16`, `c` writable at `r·ldc + j` and `bias` (when not null) readable at `j`
/// for `j < cols`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const ROWS: usize, const VECS: usize, const ADD: bool, const A_STEP: usize>(
    pairs: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    bias: *const f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let masks: [__mmask16; VECS] = std::array::from_fn(|v| {
            let valid = cols.saturating_sub(v * PANEL).min(PANEL);
            ((1u32 << valid) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); VECS]; ROWS];
        if ADD {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                    *acc_rv = _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + v * PANEL));
                }
            }
        } else if !bias.is_null() {
            let start: [__m512; VECS] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], bias.add(v * PANEL)));
            acc.iter_mut().for_each(|acc_r| *acc_r = start);
        }
        let a_rows: [*const u32; ROWS] = std::array::from_fn(|r| a.add(r * lda));
        for q in 0..pairs {
            let bv: [__m512bh; VECS] =
                std::array::from_fn(|v| std::mem::transmute(_mm512_loadu_si512(b.add(v * b_panel + q * PANEL).cast())));
            for r in 0..ROWS {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a_rows[r].add(q * A_STEP) as i32));
                for v in 0..VECS {
                    acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, bv[v]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, acc_rv) in acc_r.iter().enumerate() {
                _mm512_mask_storeu_ps(c.add(r * ldc + v * PANEL), masks[v], *acc_rv);
            }
        }
    }
}

/// `c[0..rows, 0..n] (+)= a · b` over `pairs` pairs of the depth: `a` rows of pairs `lda`
/// words apart, `b` panels of 16 columns `b_panel` words apart (16 words per pair), `c` rows
/// `ldc` apart. Column pairs of panels outside, blocks of [`MR`] rows inside, a last single
/// panel on its own; columns from `n` to the panel's end are neither read nor written. The
/// GEMM runs it per task of rows, and the flash kernel per tile (scores and `P·V`).
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; `a` readable at `r·lda + q` and `b` at
/// `(j / 16)·b_panel + q·16 + j % 16` for `r < rows`, `q < pairs`, `j < n` rounded up to 16;
/// `c` writable at `r·ldc + j`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile<const ADD: bool>(
    rows: usize,
    n: usize,
    pairs: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: the caller's contract; no bias.
    unsafe {
        let a_row = |r: usize| a.add(r * lda);
        tile_from::<ADD, 1>(
            rows,
            n,
            pairs,
            a_row,
            lda,
            b,
            b_panel,
            c,
            ldc,
            std::ptr::null(),
            2 * PANEL,
        )
    }
}

/// [`tile`] whose sums start from `bias[j]` (not null: `n` values) or from zero (null) when
/// not `ADD`, with the left operand anywhere: `a_row(r)` is row `r`'s first pair for each
/// block's first row `r` (a multiple of [`MR`]), the block's rows `lda` words apart and their
/// pairs `A_STEP` words apart. The columns go in groups of `group` (a multiple of 32): for each
/// group, the blocks of rows, each across the group's pairs of panels ([`tile`]'s order when
/// `group` is 32). The order of the blocks changes no sum.
///
/// # Safety
/// As [`tile`]'s, with `a_row(r) + i·lda + q·A_STEP` readable for the rows `r + i` of each
/// block and `q < pairs`, and `bias` (when not null) readable for `n` values.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_from<const ADD: bool, const A_STEP: usize>(
    rows: usize,
    n: usize,
    pairs: usize,
    a_row: impl Fn(usize) -> *const u32,
    lda: usize,
    b: *const u32,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    group: usize,
) {
    debug_assert!(group > 0 && group.is_multiple_of(2 * PANEL));
    let mut g0 = 0;
    while g0 < n {
        let g1 = (g0 + group).min(n);
        let mut r0 = 0;
        while r0 < rows {
            let mr = (rows - r0).min(MR);
            let mut j0 = g0;
            while j0 < g1 {
                let wide = g1 - j0 > PANEL;
                let cols = (g1 - j0).min(2 * PANEL);
                // SAFETY: rows `r0..r0 + mr` and columns `j0..j0 + cols` are inside `c`; the
                // panels of these columns are inside `b`.
                unsafe {
                    let (a_blk, b_blk, c_blk) = (a_row(r0), b.add(j0 / PANEL * b_panel), c.add(r0 * ldc + j0));
                    let bias_blk = if bias.is_null() { bias } else { bias.add(j0) };
                    macro_rules! run {
                        ($vecs:literal) => {
                            match mr {
                                1 => block::<1, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                                2 => block::<2, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                                3 => block::<3, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                                4 => block::<4, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                                5 => block::<5, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                                6 => block::<6, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                                7 => block::<7, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                                _ => block::<8, $vecs, ADD, A_STEP>(
                                    pairs, a_blk, lda, b_blk, b_panel, c_blk, ldc, cols, bias_blk,
                                ),
                            }
                        };
                    }
                    if wide {
                        run!(2)
                    } else {
                        run!(1)
                    }
                }
                j0 += cols;
            }
            r0 += mr;
        }
        g0 = g1;
    }
}
