//! The two small GEMMs of a flash tile, as register-blocked micro-kernels at each vector level.
//!
//! Shapes inside one tile: `q_tile: [R, D]` (rows packed, already scaled), `kt: [D, BK]` (a
//! key block packed transposed, zero past its `bc` keys), `scores: [R, BK]`; then
//! `p: [R, BK]` (the exp'd scores), `vp: [bc, DVP]` (a value block packed, zero past `Dv`),
//! `acc: [R, DVP]`. `BK` = [`BLOCK_KEYS`](crate::BLOCK_KEYS) (in f32; [`BF16_BLOCK_KEYS`](crate::BF16_BLOCK_KEYS)
//! for bf16 operands) and `DVP` is `Dv` rounded up to 16.
//!
//! The AVX2 kernel computes a 6×16 block of its output in twelve ymm accumulators (six broadcast
//! rows times two 8-lane vectors). The AVX-512 kernel computes an 8×32 block over two panels in
//! sixteen zmm accumulators: each broadcast of `a` feeds two FMAs, so a step of the depth loads
//! 2 vectors of `b` and 8 broadcasts for 16 FMAs (0.63 loads per FMA, within the two loads per
//! cycle of Intel's cores; the 16×16 block it replaces needed 1.06 and ran 20% slower on Zen 5).
//! A last single panel runs 16×16; smaller row counts take the tail. faer's general GEMM
//! packs its operands on every call; at these sizes (64×128×64) that overhead and its
//! dispatch cost a third of the time, which is why the tile has its own kernels. Machines without
//! AVX2+FMA run the same tile through faer (see `flash/tile.rs`).
//!
//! The backward's `dV += Pᵀ·dO` and `dK += dSᵀ·Q` run the same block with `a` read transposed
//! ([`gemm`]'s `A_T`). The decode kernels, for a few query rows against keys and values in
//! place, are in `decode.rs`.

use crate::flash::{BF16_SCORES_LD, SCORES_LD};
#[cfg(target_arch = "x86_64")]
use std::ptr::null_mut;

/// Output columns of one micro-kernel call.
pub(crate) const NR: usize = 16;
/// Output rows of one AVX2 micro-kernel call (twelve ymm accumulators).
pub(crate) const MR: usize = 6;
/// Output rows of one AVX-512 micro-kernel call over two panels (two zmm per row; 8, 10, 12 and
/// 14 rows measured within 3% on Zen 5, and 8 divides the 64-row tiles).
pub(crate) const MR_AVX512: usize = 8;

/// `x` rounded up to a multiple of [`NR`].
#[inline]
pub(crate) fn pad_to_nr(x: usize) -> usize {
    x.div_ceil(NR) * NR
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! The key-block transpose; it requires AVX2 (which every vector level has).
    use super::{F32Values, Stored};
    use crate::lanes::Avx2;
    use std::arch::x86_64::*;

    /// `dst[p·ld_dst + j] = src[j·ld_src + p]` for `j < rows`, `p < cols`: a transpose, 8×8
    /// blocks at a time in registers, the edges element by element.
    ///
    /// # Safety
    /// AVX2 must be available and both operands in bounds for those shapes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn transpose(
        rows: usize,
        cols: usize,
        src: *const f32,
        ld_src: usize,
        dst: *mut f32,
        ld_dst: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe { transpose_stored::<F32Values>(rows, cols, src, ld_src, dst, ld_dst) }
    }

    /// [`transpose`] of stored elements, each converted as it is loaded ([`Stored`]: bf16 bits
    /// widened, f32 values rounded to bf16): `dst[p·ld_dst + j] = S::value(src[j·ld_src + p])`.
    ///
    /// # Safety
    /// As for [`transpose`].
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn transpose_stored<S: Stored>(
        rows: usize,
        cols: usize,
        src: *const S::Elem,
        ld_src: usize,
        dst: *mut f32,
        ld_dst: usize,
    ) {
        // SAFETY: every access is within `rows × cols` of the two operands; AVX2 is enabled
        // for the loads.
        unsafe {
            let (rows8, cols8) = (rows / 8 * 8, cols / 8 * 8);
            for j in (0..rows8).step_by(8) {
                for p in (0..cols8).step_by(8) {
                    let r: [__m256; 8] = std::array::from_fn(|i| S::load::<Avx2>(src.add((j + i) * ld_src + p)));
                    let out = transpose8(r);
                    for (i, v) in out.iter().enumerate() {
                        _mm256_storeu_ps(dst.add((p + i) * ld_dst + j), *v);
                    }
                }
                for p in cols8..cols {
                    for i in 0..8 {
                        *dst.add(p * ld_dst + j + i) = S::value(*src.add((j + i) * ld_src + p));
                    }
                }
            }
            for j in rows8..rows {
                for p in 0..cols {
                    *dst.add(p * ld_dst + j) = S::value(*src.add(j * ld_src + p));
                }
            }
        }
    }

    /// `dst[i] = S::value(src[i])` for `i < n`: 8 elements at a time, each converted as
    /// [`Stored`] loads it, the tail one by one.
    ///
    /// # Safety
    /// AVX2 must be available, `src` readable and `dst` writable for `n` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn convert_row<S: Stored>(n: usize, src: *const S::Elem, dst: *mut f32) {
        // SAFETY: every access is below `n` of both operands; AVX2 is enabled for the loads.
        unsafe {
            let n8 = n / 8 * 8;
            for i in (0..n8).step_by(8) {
                _mm256_storeu_ps(dst.add(i), S::load::<Avx2>(src.add(i)));
            }
            for i in n8..n {
                *dst.add(i) = S::value(*src.add(i));
            }
        }
    }

    /// The transpose of the 8 × 8 block whose rows are `r`: element `j` of row `i` of the result
    /// is element `i` of `r[j]`.
    ///
    /// # Safety
    /// AVX must be available.
    #[inline(always)]
    pub(crate) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: the caller's contract.
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }
}

mod decode;
pub(crate) use decode::{axpy_rows, dot_rows, Bf16Bits, Bf16Rounded, F32Rounded, F32Values, Stored, DECODE_ROWS_MAX};

/// `c[0..ROWS, 0..PANELS·NR] (+)= Σ_p a[r·lda + p] · b_q[p·ldb .. p·ldb + NR]` for `p < depth`
/// over column panels `b_q = b + q·b_panel`, written once over the vector width: `VECS` vectors
/// per row, `PANELS = VECS · L::N / NR` panels (`VECS` is the parameter because stable Rust
/// cannot size an array from an expression of generic parameters). Every broadcast of `a` feeds
/// `VECS` FMAs, so the loads per FMA are `(VECS + ROWS) / (VECS · ROWS)`.
///
/// With `MAX`, each row's maximum over the block's columns is folded into the `L::N` lanes at
/// `maxes + r·L::N` (`max(lanes, columns)`, lane by lane; the caller starts them at `-inf`), so
/// the flash kernel has its rows' maxima without reading the scores again.
///
/// With `A_T`, `a` is read transposed: `a[p·lda + r]` instead of `a[r·lda + p]` (a
/// `[depth, ROWS]` operand stored step by step, such as a row-major tile whose transpose is
/// the left operand), so each step's broadcasts are `ROWS` consecutive floats.
///
/// `LDA`, when not zero, is `a`'s row stride as a constant (`lda` is then ignored): the
/// broadcasts of a step address `a + r·LDA + p` from one register with constant displacements.
/// With a stride known only at run time the compiler walks the rows with a chain of adds at
/// every step (`ROWS - 1` adds and a `lea` per `ROWS · VECS` FMAs, on the ports the FMAs use);
/// the constant strides made the flash forward 1.00–1.06× faster on an Intel Xeon
/// (docs/PERFORMANCE.md).
///
/// # Safety
/// `L`'s features must be enabled by the caller; `VECS · L::N` a multiple of `NR`; `a` must be
/// readable at `r·lda + p` (`p·lda + r` with `A_T`) for `r < ROWS`, `p < depth`; each panel
/// readable at `p·ldb .. p·ldb + NR`; `c` writable at `r·ldc .. r·ldc + VECS · L::N`; with
/// `MAX`, `maxes` readable and writable at `r·L::N .. (r + 1)·L::N`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<
    L: crate::lanes::Lanes,
    const ROWS: usize,
    const VECS: usize,
    const ACCUMULATE: bool,
    const A_T: bool,
    const LDA: usize,
    const MAX: bool,
>(
    depth: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    maxes: *mut f32,
) {
    let per_panel = NR / L::N;
    // SAFETY: all pointer offsets stay within the ranges the caller guarantees.
    unsafe {
        let mut acc = [[L::splat(0.0); VECS]; ROWS];
        if ACCUMULATE {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                    *acc_rv = L::load(c.add(r * ldc + v * L::N));
                }
            }
        }
        let lda = if LDA > 0 { LDA } else { lda };
        let a_rows: [*const f32; ROWS] = std::array::from_fn(|r| a.add(r * lda));
        // Vector `v` of a row of `b` is lane group `v % per_panel` of panel `v / per_panel`.
        let b_vecs: [*const f32; VECS] = std::array::from_fn(|v| b.add(v / per_panel * b_panel + v % per_panel * L::N));
        for p in 0..depth {
            let bv: [L::V; VECS] = std::array::from_fn(|v| L::load(b_vecs[v].add(p * ldb)));
            for r in 0..ROWS {
                let x = L::splat(if A_T { *a.add(p * lda + r) } else { *a_rows[r].add(p) });
                for v in 0..VECS {
                    acc[r][v] = L::fmadd(x, bv[v], acc[r][v]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, acc_rv) in acc_r.iter().enumerate() {
                L::store(c.add(r * ldc + v * L::N), *acc_rv);
            }
        }
        if MAX {
            for (r, acc_r) in acc.iter().enumerate() {
                let m = acc_r[1..].iter().fold(acc_r[0], |m, &x| L::max(m, x));
                let lanes = maxes.add(r * L::N);
                L::store(lanes, L::max(L::load(lanes), m));
            }
        }
    }
}

/// One level's tile GEMM entry: `c[R, N] (+)= a[R, depth] · b[depth, N]`, `a` row-major with
/// leading dim `lda` (with `A_T`, `a[r, p]` at `p·lda + r`: the transpose of a row-major
/// `[depth, R]`), `N` a multiple of [`NR`]. `b` is read as `N / NR` column panels of `NR`
/// values per row: panel `p` starts at `b + p·b_panel` and its rows are `ldb` apart. A
/// row-major `b` is `(ldb, b_panel) = (ld, NR)`; panels packed contiguously (the layout a GEMM
/// library packs into, which no power-of-two row stride can push out of L1) are `(NR,
/// NR·depth)`. Columns `$vecs` vectors at a time outside (a last single panel on its own, at
/// `$vecs1` vectors), row blocks of at most `$mr` (`$mr1`) rows inside: the panels stay in L1
/// while every row block of `a` passes over them. With `MAX`, each row's maximum over `N`
/// columns is folded into the `L::N` lanes at `maxes + r·L::N` ([`block`]).
macro_rules! tile_gemm {
    ($name:ident, $lanes:ty, $features:literal,
     wide: [$vecs:literal, $mr:expr, $($rows:literal)*],
     single: [$vecs1:literal, $mr1:expr, $($rows1:literal)*]) => {
        /// # Safety
        /// The level's features must be available and every operand in bounds for the shapes.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $name<const ACCUMULATE: bool, const A_T: bool, const MAX: bool>(
            rows: usize,
            n: usize,
            depth: usize,
            a: *const f32,
            lda: usize,
            b: *const f32,
            ldb: usize,
            b_panel: usize,
            c: *mut f32,
            ldc: usize,
            maxes: *mut f32,
        ) {
            // The kernel stores whole panels: a ragged `n` would write past `c`'s rows.
            assert_eq!(n % NR, 0, "gemm: n = {n} is not a multiple of {NR}");
            let width = <$lanes as crate::lanes::Lanes>::N;
            let wide_cols = $vecs * width;
            let mut j0 = 0;
            while j0 < n {
                let wide = n - j0 >= wide_cols;
                let mut r0 = 0;
                while r0 < rows {
                    let mr = (rows - r0).min(if wide { $mr } else { $mr1 });
                    // SAFETY: the caller guarantees the operands cover `rows × n` and `depth`;
                    // this function enables the level's features.
                    unsafe {
                        let a_blk = if A_T { a.add(r0) } else { a.add(r0 * lda) };
                        let (b_blk, c_blk) = (b.add(j0 / NR * b_panel), c.add(r0 * ldc + j0));
                        let m_blk = maxes.wrapping_add(r0 * <$lanes as crate::lanes::Lanes>::N);
                        // The row blocks of the wide columns, with `a`'s row stride as the
                        // constant `$lda` (0: `lda` at run time).
                        macro_rules! wide {
                            ($lda:expr) => {
                                match mr {
                                    $($rows => block::<$lanes, $rows, $vecs, ACCUMULATE, A_T, { $lda }, MAX>(depth, a_blk, lda, b_blk, ldb, b_panel, c_blk, ldc, m_blk),)*
                                    _ => unreachable!("at most {} rows", $mr),
                                }
                            };
                        }
                        match (wide, lda) {
                            // The strides of the query tiles of common head sizes, and of the
                            // probabilities (`SCORES_LD`, and `BF16_SCORES_LD` where the f32
                            // kernel multiplies bf16-rounded operands). Not the latter read
                            // transposed, where it is the stride of the backward's `P` and `dS`
                            // of 256 keys: with both constants the forward + backward measured
                            // 0.92× on Zen 3, with this one alone 1.00× (how the code was laid
                            // out, not the stride); at run time there, 1.00× (PERFORMANCE.md).
                            (true, 32) => wide!(32),
                            (true, 64) => wide!(64),
                            (true, 128) => wide!(128),
                            (true, SCORES_LD) => wide!(SCORES_LD),
                            (true, BF16_SCORES_LD) if !A_T => wide!(BF16_SCORES_LD),
                            (true, _) => wide!(0),
                            (false, _) => match mr {
                                $($rows1 => block::<$lanes, $rows1, $vecs1, ACCUMULATE, A_T, 0, MAX>(depth, a_blk, lda, b_blk, ldb, b_panel, c_blk, ldc, m_blk),)*
                                _ => unreachable!("at most {} rows", $mr1),
                            },
                        }
                    }
                    r0 += mr;
                }
                j0 += if wide { wide_cols } else { NR };
            }
        }
    };
}

// AVX2: 6 rows × two ymm, a panel at a time (twelve accumulators; 3 rows × four ymm over two
// panels measured half as fast). AVX-512: 8 rows × two zmm over two panels (sixteen
// accumulators: 2 loads of `b` and 8 broadcasts per 16 FMAs), and 16 rows × one zmm for a last
// single panel.
tile_gemm!(gemm_avx2, crate::lanes::Avx2, "avx2,fma",
    wide: [2, MR, 1 2 3 4 5 6],
    single: [2, MR, 1 2 3 4 5 6]);
tile_gemm!(gemm_avx512, crate::lanes::Avx512, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma",
    wide: [2, MR_AVX512, 1 2 3 4 5 6 7 8],
    single: [1, 16, 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16]);

/// `c[R, N] (+)= a[R, depth] · b[depth, N]` with the micro-kernel of the running level (`N` a
/// multiple of [`NR`]; `b` in panels as [`gemm_avx2`] reads it). With `A_T`, `a` is read
/// transposed (`a[p·lda + r]`, a row-major `[depth, R]`), without a transposed copy: the
/// backward's `Pᵀ·dO` and `dSᵀ·Q`.
///
/// # Safety
/// The level must be a vector level (`simd_level().is_vector()`), and every operand in bounds
/// for those shapes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<const ACCUMULATE: bool, const A_T: bool>(
    rows: usize,
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
) {
    match crate::simd::simd_level() {
        // SAFETY: `Avx512` is only reported when the CPU has AVX-512 F/BW/VL/DQ; operands by the
        // caller's contract.
        crate::SimdLevel::Avx512 => unsafe {
            gemm_avx512::<ACCUMULATE, A_T, false>(rows, n, depth, a, lda, b, ldb, b_panel, c, ldc, null_mut())
        },
        // SAFETY: every vector level has AVX2 and FMA; operands by the caller's contract.
        _ => unsafe {
            gemm_avx2::<ACCUMULATE, A_T, false>(rows, n, depth, a, lda, b, ldb, b_panel, c, ldc, null_mut())
        },
    }
}

/// Lanes per row of [`gemm_max`]'s maxima at the running level: the level's vector width.
pub(crate) fn max_lanes() -> usize {
    match crate::simd::simd_level() {
        crate::SimdLevel::Avx512 => 16,
        _ => 8,
    }
}

/// [`gemm`] writing `c = a · b` (no accumulation, `a` row-major) that also folds each row's
/// maximum over its `N` columns into `maxes[r·W .. (r + 1)·W]`, `W` = [`max_lanes`], lane by
/// lane: `maxes` starts at `-inf` (or a running maximum) and the row's maximum is that of its
/// `W` lanes afterwards. NaN columns may or may not win, as in [`crate::simd::row_max`].
///
/// # Safety
/// As for [`gemm`], and `maxes` holds `rows · max_lanes()` floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_max(
    rows: usize,
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    maxes: *mut f32,
) {
    match crate::simd::simd_level() {
        // SAFETY: as for `gemm`; `maxes` by the caller's contract.
        crate::SimdLevel::Avx512 => unsafe {
            gemm_avx512::<false, false, true>(rows, n, depth, a, lda, b, ldb, b_panel, c, ldc, maxes)
        },
        // SAFETY: as for `gemm`; `maxes` by the caller's contract.
        _ => unsafe { gemm_avx2::<false, false, true>(rows, n, depth, a, lda, b, ldb, b_panel, c, ldc, maxes) },
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// The key-block transpose writes `dst[p·ld_dst + j] = src[j·ld_src + p]` for every
    /// `j < rows`, `p < cols` and nothing else of `dst`: every row and column count from 0 to 17
    /// (whole 8×8 blocks, the last rows and the last columns alone and together), with padded
    /// strides on both sides.
    #[test]
    fn transpose_writes_the_transpose_and_nothing_else() {
        if !std::arch::is_x86_feature_detected!("avx2") || !std::arch::is_x86_feature_detected!("fma") {
            eprintln!("transpose_writes_the_transpose_and_nothing_else: no AVX2+FMA here, skipped");
            return;
        }
        for rows in 0..=17 {
            for cols in 0..=17 {
                let (ld_src, ld_dst) = (cols + 3, rows + 5);
                let src: Vec<f32> = (0..rows.max(1) * ld_src).map(|i| i as f32 + 0.5).collect();
                let mut dst = vec![f32::NAN; cols.max(1) * ld_dst + 8];
                // SAFETY: AVX2 and FMA were detected; `src` holds `rows` rows of `ld_src >= cols`
                // floats and `dst` `cols` rows of `ld_dst >= rows`.
                unsafe { super::avx2::transpose(rows, cols, src.as_ptr(), ld_src, dst.as_mut_ptr(), ld_dst) };
                for (i, &x) in dst.iter().enumerate() {
                    let (p, j) = (i / ld_dst, i % ld_dst);
                    if p < cols && j < rows {
                        assert_eq!(x, src[j * ld_src + p], "{rows}×{cols}: dst[{p}, {j}]");
                    } else {
                        assert!(x.is_nan(), "{rows}×{cols}: dst[{p}, {j}] written outside the transpose");
                    }
                }
            }
        }
    }

    /// The micro-kernels store whole vectors, so their shape preconditions are checked in
    /// release builds too: a ragged width is refused before anything is written.
    #[test]
    fn micro_kernels_refuse_ragged_widths() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return;
        }
        // Buffers wide enough for a full panel, so nothing is out of bounds even if a kernel ran.
        let a = [1.0f32; 16 * 16];
        let b = [1.0f32; 16 * 16];
        let mut c = [0.0f32; 16 * 16];
        let ragged_gemm = std::panic::catch_unwind(move || {
            // SAFETY: AVX2 and FMA were detected; every operand holds 16×16 values.
            unsafe {
                super::gemm_avx2::<false, false, false>(
                    2,
                    8,
                    4,
                    a.as_ptr(),
                    16,
                    b.as_ptr(),
                    16,
                    16,
                    c.as_mut_ptr(),
                    16,
                    std::ptr::null_mut(),
                )
            }
        });
        assert!(ragged_gemm.is_err(), "gemm accepted n = 8");
        let ragged_axpy = std::panic::catch_unwind(move || {
            // SAFETY: as above.
            unsafe {
                super::decode::axpy_rows_avx2::<super::F32Values>(
                    2,
                    12,
                    4,
                    a.as_ptr(),
                    16,
                    b.as_ptr(),
                    16,
                    c.as_mut_ptr(),
                    16,
                )
            }
        });
        assert!(ragged_axpy.is_err(), "axpy_rows accepted n = 12");
        let tall_axpy = std::panic::catch_unwind(move || {
            // SAFETY: as above.
            unsafe {
                super::decode::axpy_rows_avx2::<super::F32Values>(
                    9,
                    8,
                    4,
                    a.as_ptr(),
                    16,
                    b.as_ptr(),
                    16,
                    c.as_mut_ptr(),
                    16,
                )
            }
        });
        assert!(tall_axpy.is_err(), "axpy_rows accepted 9 rows");
    }

    /// The tile GEMM of every vector level this CPU has against the definition in f64: row
    /// counts across each level's block heights (6; 8 over two panels, 16 over one), three
    /// panels (a pair and a last single one), depths with and without a tail, replacing and
    /// accumulating, `a` read as it is and transposed (`A_T`); and replacing with each row's
    /// maximum folded into the level's lanes (`MAX`, as the flash forward's scores take it):
    /// the lanes' maximum is exactly that of the row's outputs.
    #[test]
    fn tile_gemm_matches_its_definition_at_every_level() {
        type Gemm =
            unsafe fn(usize, usize, usize, *const f32, usize, *const f32, usize, usize, *mut f32, usize, *mut f32);
        let mut levels: Vec<(&str, bool, [Gemm; 3], usize)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            levels.push((
                "avx2",
                false,
                [
                    super::gemm_avx2::<false, false, false>,
                    super::gemm_avx2::<true, false, false>,
                    super::gemm_avx2::<false, false, true>,
                ],
                8,
            ));
            levels.push((
                "avx2",
                true,
                [
                    super::gemm_avx2::<false, true, false>,
                    super::gemm_avx2::<true, true, false>,
                    super::gemm_avx2::<false, true, true>,
                ],
                8,
            ));
        }
        if crate::simd::detect() == crate::SimdLevel::Avx512 {
            levels.push((
                "avx512",
                false,
                [
                    super::gemm_avx512::<false, false, false>,
                    super::gemm_avx512::<true, false, false>,
                    super::gemm_avx512::<false, false, true>,
                ],
                16,
            ));
            levels.push((
                "avx512",
                true,
                [
                    super::gemm_avx512::<false, true, false>,
                    super::gemm_avx512::<true, true, false>,
                    super::gemm_avx512::<false, true, true>,
                ],
                16,
            ));
        }
        for (name, a_t, [replace, accumulate, with_max], lanes) in levels {
            // `a`'s row stride (its step stride with `a_t`): the length of what it strides
            // over, and each stride the kernel takes as a constant.
            let strides = |len: usize| {
                let mut all = vec![len, 32, 64, 128, super::SCORES_LD, super::BF16_SCORES_LD];
                all.retain(|&lda| lda >= len);
                all.dedup();
                all
            };
            for (rows, depth) in [1, 5, 6, 7, 8, 9, 15, 16, 17, 33]
                .into_iter()
                .flat_map(|rows| [1, 8, 17, 64].map(|depth| (rows, depth)))
            {
                let (outer, inner) = if a_t { (depth, rows) } else { (rows, depth) };
                // `a[r, p]`: row-major `[rows, lda]`, or with `a_t` `[depth, lda]` read transposed.
                let at = |r: usize, p: usize, lda: usize| if a_t { p * lda + r } else { r * lda + p };
                for lda in strides(inner) {
                    let n = 48;
                    let a = crate::testing::random_vec(outer * lda, 1);
                    let b = crate::testing::random_vec(depth * n, 2);
                    let start = crate::testing::random_vec(rows * n, 3);
                    // `b` as panels packed contiguously: `[n / 16, depth, 16]`.
                    let panels: Vec<f32> = (0..n * depth)
                        .map(|i| {
                            let (panel, p, lane) = (i / (16 * depth), (i / 16) % depth, i % 16);
                            b[p * n + panel * 16 + lane]
                        })
                        .collect();
                    let layouts = [
                        ("row-major", &b, n, super::NR),
                        ("panels", &panels, super::NR, super::NR * depth),
                    ];
                    let modes = [("replace", replace), ("accumulate", accumulate), ("max", with_max)];
                    for ((mode, kernel), (layout, b_data, ldb, b_panel)) in modes
                        .into_iter()
                        .zip(layouts.into_iter().cycle())
                        .chain(modes.into_iter().zip(layouts.into_iter().rev().cycle()))
                    {
                        let mut c = start.clone();
                        let mut maxes = vec![f32::NEG_INFINITY; rows * lanes];
                        // SAFETY: the level was detected; `a` is [rows, depth], `b` [depth, 48]
                        // in either layout, `c` [rows, 48].
                        unsafe {
                            kernel(
                                rows,
                                n,
                                depth,
                                a.as_ptr(),
                                lda,
                                b_data.as_ptr(),
                                ldb,
                                b_panel,
                                c.as_mut_ptr(),
                                n,
                                maxes.as_mut_ptr(),
                            )
                        };
                        for r in 0..rows {
                            let row_max = c[r * n..(r + 1) * n].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                            let lanes_max = maxes[r * lanes..(r + 1) * lanes]
                                .iter()
                                .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                            let want = if mode == "max" { row_max } else { f32::NEG_INFINITY };
                            assert_eq!(
                                lanes_max, want,
                                "{name} a_t {a_t} {mode} {layout} rows {rows} depth {depth} lda {lda}: row {r}'s maximum"
                            );
                        }
                        for r in 0..rows {
                            for j in 0..n {
                                let mut want: f64 =
                                    (0..depth).map(|p| a[at(r, p, lda)] as f64 * b[p * n + j] as f64).sum();
                                if mode == "accumulate" {
                                    want += start[r * n + j] as f64;
                                }
                                let err = (c[r * n + j] as f64 - want).abs();
                                // f32 sums of at most 64 products of values in [-1, 1): about
                                // 1e-6; a wrong row or lane is off by 0.1 or more.
                                assert!(
                                    err < 2e-5,
                                    "{name} a_t {a_t} {mode} {layout} rows {rows} depth {depth} lda {lda} [{r}, {j}]: {err:e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
