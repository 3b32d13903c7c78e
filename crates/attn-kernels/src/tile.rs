//! The two small GEMMs of a flash tile, as register-blocked micro-kernels at each vector level.
//!
//! Shapes inside one tile: `q_tile: [R, D]` (rows packed, already scaled), `kt: [D, BK]` (a
//! key block packed transposed, zero past its `bc` keys), `scores: [R, BK]`; then
//! `p: [R, BK]` (the exp'd scores), `vp: [bc, DVP]` (a value block packed, zero past `Dv`),
//! `acc: [R, DVP]`. `BK` = [`BLOCK_KEYS`](crate::BLOCK_KEYS) and `DVP` is `Dv` rounded up to 16.
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

use crate::flash::SCORES_LD;

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
        // SAFETY: every access is within `rows × cols` of the two operands.
        unsafe {
            let (rows8, cols8) = (rows / 8 * 8, cols / 8 * 8);
            for j in (0..rows8).step_by(8) {
                for p in (0..cols8).step_by(8) {
                    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add((j + i) * ld_src + p)));
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
                    let out = [
                        _mm256_permute2f128_ps::<0x20>(u0, u4),
                        _mm256_permute2f128_ps::<0x20>(u1, u5),
                        _mm256_permute2f128_ps::<0x20>(u2, u6),
                        _mm256_permute2f128_ps::<0x20>(u3, u7),
                        _mm256_permute2f128_ps::<0x31>(u0, u4),
                        _mm256_permute2f128_ps::<0x31>(u1, u5),
                        _mm256_permute2f128_ps::<0x31>(u2, u6),
                        _mm256_permute2f128_ps::<0x31>(u3, u7),
                    ];
                    for (i, v) in out.iter().enumerate() {
                        _mm256_storeu_ps(dst.add((p + i) * ld_dst + j), *v);
                    }
                }
                for p in cols8..cols {
                    for i in 0..8 {
                        *dst.add(p * ld_dst + j + i) = *src.add((j + i) * ld_src + p);
                    }
                }
            }
            for j in rows8..rows {
                for p in 0..cols {
                    *dst.add(p * ld_dst + j) = *src.add(j * ld_src + p);
                }
            }
        }
    }
}

/// Scores of a few query rows against keys read in place, written once over the vector width:
/// `c[i·ldc + j] = Σ_p a[i·lda + p] · k[j·ldk + p]` for `i < ROWS`, `j < n`, `p < depth`.
/// `KEYS` keys at a time, so `ROWS × KEYS` independent sums are in flight (one query row against
/// one key would be a single dependent chain of FMAs). For short tiles (decoding) this beats
/// transposing the key block, which would cost as much as the whole product.
///
/// # Safety
/// `L`'s features must be enabled by the caller; every operand in bounds for those shapes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_block<L: crate::lanes::Lanes, const ROWS: usize, const KEYS: usize>(
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    k: *const f32,
    ldk: usize,
    c: *mut f32,
    ldc: usize,
) {
    let vecs = depth / L::N;
    // SAFETY: the caller guarantees the operands cover these shapes.
    unsafe {
        let mut j0 = 0;
        while j0 < n {
            let kb = (n - j0).min(KEYS);
            let keys: [*const f32; KEYS] = std::array::from_fn(|j| k.add((j0 + j.min(kb - 1)) * ldk));
            let mut acc = [[L::splat(0.0); KEYS]; ROWS];
            // Key after key, each read in order; the sums of different keys are independent,
            // so they overlap in the pipeline.
            for (j, &key) in keys.iter().enumerate() {
                for v in 0..vecs {
                    let kv = L::load(key.add(v * L::N));
                    for (i, acc_i) in acc.iter_mut().enumerate() {
                        acc_i[j] = L::fmadd(L::load(a.add(i * lda + v * L::N)), kv, acc_i[j]);
                    }
                }
            }
            for (i, acc_i) in acc.iter().enumerate() {
                for (j, &acc_ij) in acc_i.iter().enumerate().take(kb) {
                    let mut total = L::hsum(acc_ij);
                    for p in vecs * L::N..depth {
                        total += *a.add(i * lda + p) * *keys[j].add(p);
                    }
                    *c.add(i * ldc + j0 + j) = total;
                }
            }
            j0 += kb;
        }
    }
}

/// `c[i, 0..n] += Σ_j a[i·lda + j] · v[j·ldv .. j·ldv + n]` for `i < ROWS`, `j < depth`, `n` a
/// multiple of the vector width, written once over the width. When the rows are at most `PANEL`
/// vectors wide, their `ROWS × n` sums stay in registers over every key of the block: each
/// output vector is loaded and stored once per call, instead of a load, add and store per key.
/// Either way the value rows are read whole and in order, key after key, which is what keeps
/// decoding at memory speed (measured: panels of part of a row, each walking every key, ran
/// 0.7–0.8× as fast on memory-bound shapes).
///
/// # Safety
/// `L`'s features must be enabled by the caller; every operand in bounds for those shapes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_block<L: crate::lanes::Lanes, const ROWS: usize, const PANEL: usize>(
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    v: *const f32,
    ldv: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: the caller guarantees the operands cover these shapes.
    unsafe {
        let vectors = n / L::N;
        if vectors <= PANEL.min(8) {
            // The whole rows fit in registers: one panel, every key read once, in order.
            match vectors {
                1 => axpy_panel::<L, ROWS, 1>(depth, a, lda, v, ldv, c, ldc),
                2 => axpy_panel::<L, ROWS, 2>(depth, a, lda, v, ldv, c, ldc),
                3 => axpy_panel::<L, ROWS, 3>(depth, a, lda, v, ldv, c, ldc),
                4 => axpy_panel::<L, ROWS, 4>(depth, a, lda, v, ldv, c, ldc),
                5 => axpy_panel::<L, ROWS, 5>(depth, a, lda, v, ldv, c, ldc),
                6 => axpy_panel::<L, ROWS, 6>(depth, a, lda, v, ldv, c, ldc),
                7 => axpy_panel::<L, ROWS, 7>(depth, a, lda, v, ldv, c, ldc),
                _ => axpy_panel::<L, ROWS, 8>(depth, a, lda, v, ldv, c, ldc),
            }
            return;
        }
        // Wider rows: a load, add and store of the output per key, but the value rows are
        // still read whole and in order (narrower panels, each walking every key, would read
        // them a piece at a time, which the prefetcher follows badly).
        for j in 0..depth {
            let v_row = v.add(j * ldv);
            let w: [L::V; ROWS] = std::array::from_fn(|i| L::splat(*a.add(i * lda + j)));
            for col in (0..n).step_by(L::N) {
                let vv = L::load(v_row.add(col));
                for (i, &w_i) in w.iter().enumerate() {
                    let dst = c.add(i * ldc + col);
                    L::store(dst, L::fmadd(w_i, vv, L::load(dst)));
                }
            }
        }
    }
}

/// One panel of [`axpy_block`]: `PANEL` vectors of `ROWS` output rows, in registers over every
/// key.
///
/// # Safety
/// As for [`axpy_block`], with `v` and `c` at the panel's first column.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_panel<L: crate::lanes::Lanes, const ROWS: usize, const PANEL: usize>(
    depth: usize,
    a: *const f32,
    lda: usize,
    v: *const f32,
    ldv: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: the caller guarantees the operands cover these shapes.
    unsafe {
        let mut acc: [[L::V; PANEL]; ROWS] =
            std::array::from_fn(|i| std::array::from_fn(|p| L::load(c.add(i * ldc + p * L::N))));
        for j in 0..depth {
            let v_row = v.add(j * ldv);
            let vv: [L::V; PANEL] = std::array::from_fn(|p| L::load(v_row.add(p * L::N)));
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let w = L::splat(*a.add(i * lda + j));
                for p in 0..PANEL {
                    acc_i[p] = L::fmadd(w, vv[p], acc_i[p]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (p, &acc_ip) in acc_i.iter().enumerate() {
                L::store(c.add(i * ldc + p * L::N), acc_ip);
            }
        }
    }
}

/// One level's decode kernels: `dot_rows` (scores against keys in place, rows in blocks of up to
/// four, four keys at a time for one or two rows and two keys for three or four) and
/// `axpy_rows` (rows at most [`DECODE_ROWS_MAX`], `n` a multiple of the level's width).
macro_rules! decode_kernels {
    ($dot:ident, $axpy:ident, $lanes:ty, $features:literal, $p12:literal, $p34:literal, $p58:literal) => {
        /// # Safety
        /// The level's features must be available and every operand in bounds for the shapes.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $dot(
            rows: usize,
            n: usize,
            depth: usize,
            a: *const f32,
            lda: usize,
            k: *const f32,
            ldk: usize,
            c: *mut f32,
            ldc: usize,
        ) {
            let mut i0 = 0;
            while i0 < rows {
                let r = (rows - i0).min(4);
                // SAFETY: the caller guarantees the operands cover `rows × n` and `depth`; this
                // function enables the level's features.
                unsafe {
                    let (a_blk, c_blk) = (a.add(i0 * lda), c.add(i0 * ldc));
                    match r {
                        1 => dot_block::<$lanes, 1, 4>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
                        2 => dot_block::<$lanes, 2, 4>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
                        3 => dot_block::<$lanes, 3, 2>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
                        _ => dot_block::<$lanes, 4, 2>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
                    }
                }
                i0 += r;
            }
        }

        /// # Safety
        /// The level's features must be available and every operand in bounds for the shapes.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $axpy(
            rows: usize,
            n: usize,
            depth: usize,
            a: *const f32,
            lda: usize,
            v: *const f32,
            ldv: usize,
            c: *mut f32,
            ldc: usize,
        ) {
            // Whole vectors are stored, and the rows are kept in registers.
            let width = <$lanes as crate::lanes::Lanes>::N;
            assert!(
                rows <= DECODE_ROWS_MAX && n.is_multiple_of(width),
                "axpy_rows: rows = {rows} (at most {DECODE_ROWS_MAX}), n = {n} (a multiple of {width})"
            );
            // SAFETY: as above.
            unsafe {
                match rows {
                    0 => {}
                    1 => axpy_block::<$lanes, 1, $p12>(n, depth, a, lda, v, ldv, c, ldc),
                    2 => axpy_block::<$lanes, 2, $p12>(n, depth, a, lda, v, ldv, c, ldc),
                    3 => axpy_block::<$lanes, 3, $p34>(n, depth, a, lda, v, ldv, c, ldc),
                    4 => axpy_block::<$lanes, 4, $p34>(n, depth, a, lda, v, ldv, c, ldc),
                    5 => axpy_block::<$lanes, 5, $p58>(n, depth, a, lda, v, ldv, c, ldc),
                    6 => axpy_block::<$lanes, 6, $p58>(n, depth, a, lda, v, ldv, c, ldc),
                    7 => axpy_block::<$lanes, 7, $p58>(n, depth, a, lda, v, ldv, c, ldc),
                    _ => axpy_block::<$lanes, 8, $p58>(n, depth, a, lda, v, ldv, c, ldc),
                }
            }
        }
    };
}

/// The most query rows of a tile that the decode kernels take (longer tiles use the GEMM).
pub(crate) const DECODE_ROWS_MAX: usize = 8;

// Output vectors per panel of `axpy_rows` for 1–2, 3–4 and 5–8 rows: at most 8 accumulators
// of the 16 ymm registers, at most 16 of the 32 zmm registers.
decode_kernels!(dot_rows_avx2, axpy_rows_avx2, crate::lanes::Avx2, "avx2,fma", 4, 2, 1);
decode_kernels!(
    dot_rows_avx512,
    axpy_rows_avx512,
    crate::lanes::Avx512,
    "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma",
    8,
    4,
    2
);

/// Scores of a few query rows against keys in place with the running level's kernel (see
/// [`dot_block`]).
///
/// # Safety
/// The level must be a vector level, and every operand in bounds for those shapes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dot_rows(
    rows: usize,
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    k: *const f32,
    ldk: usize,
    c: *mut f32,
    ldc: usize,
) {
    match crate::simd::simd_level() {
        // SAFETY: `Avx512` is only reported when the CPU has AVX-512 F/BW/VL/DQ; operands by the
        // caller's contract.
        crate::SimdLevel::Avx512 => unsafe { dot_rows_avx512(rows, n, depth, a, lda, k, ldk, c, ldc) },
        // SAFETY: every vector level has AVX2 and FMA; operands by the caller's contract.
        _ => unsafe { dot_rows_avx2(rows, n, depth, a, lda, k, ldk, c, ldc) },
    }
}

/// `c[i, 0..n] += Σ_j a[i, j] · v[j, 0..n]` for a few rows with the running level's kernel (see
/// [`axpy_block`]); `n` a multiple of [`NR`].
///
/// # Safety
/// The level must be a vector level, and every operand in bounds for those shapes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn axpy_rows(
    rows: usize,
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    v: *const f32,
    ldv: usize,
    c: *mut f32,
    ldc: usize,
) {
    match crate::simd::simd_level() {
        // SAFETY: as for `dot_rows`.
        crate::SimdLevel::Avx512 => unsafe { axpy_rows_avx512(rows, n, depth, a, lda, v, ldv, c, ldc) },
        // SAFETY: as for `dot_rows`.
        _ => unsafe { axpy_rows_avx2(rows, n, depth, a, lda, v, ldv, c, ldc) },
    }
}

/// `c[0..ROWS, 0..PANELS·NR] (+)= Σ_p a[r·lda + p] · b_q[p·ldb .. p·ldb + NR]` for `p < depth`
/// over column panels `b_q = b + q·b_panel`, written once over the vector width: `VECS` vectors
/// per row, `PANELS = VECS · L::N / NR` panels (`VECS` is the parameter because stable Rust
/// cannot size an array from an expression of generic parameters). Every broadcast of `a` feeds
/// `VECS` FMAs, so the loads per FMA are `(VECS + ROWS) / (VECS · ROWS)`.
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
/// readable at `r·lda + p` for `r < ROWS`, `p < depth`; each panel readable at `p·ldb .. p·ldb +
/// NR`; `c` writable at `r·ldc .. r·ldc + VECS · L::N`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<
    L: crate::lanes::Lanes,
    const ROWS: usize,
    const VECS: usize,
    const ACCUMULATE: bool,
    const LDA: usize,
>(
    depth: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
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
                let x = L::splat(*a_rows[r].add(p));
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
    }
}

/// One level's tile GEMM entry: `c[R, N] (+)= a[R, depth] · b[depth, N]`, `a` row-major with
/// leading dim `lda`, `N` a multiple of [`NR`]. `b` is read as `N / NR` column panels of `NR`
/// values per row: panel `p` starts at `b + p·b_panel` and its rows are `ldb` apart. A
/// row-major `b` is `(ldb, b_panel) = (ld, NR)`; panels packed contiguously (the layout a GEMM
/// library packs into, which no power-of-two row stride can push out of L1) are `(NR,
/// NR·depth)`. Columns `$vecs` vectors at a time outside (a last single panel on its own, at
/// `$vecs1` vectors), row blocks of at most `$mr` (`$mr1`) rows inside: the panels stay in L1
/// while every row block of `a` passes over them.
macro_rules! tile_gemm {
    ($name:ident, $lanes:ty, $features:literal,
     wide: [$vecs:literal, $mr:expr, $($rows:literal)*],
     single: [$vecs1:literal, $mr1:expr, $($rows1:literal)*]) => {
        /// # Safety
        /// The level's features must be available and every operand in bounds for the shapes.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $name<const ACCUMULATE: bool>(
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
                        let (a_blk, b_blk, c_blk) = (a.add(r0 * lda), b.add(j0 / NR * b_panel), c.add(r0 * ldc + j0));
                        // The row blocks of the wide columns, with `a`'s row stride as the
                        // constant `$lda` (0: `lda` at run time).
                        macro_rules! wide {
                            ($lda:expr) => {
                                match mr {
                                    $($rows => block::<$lanes, $rows, $vecs, ACCUMULATE, { $lda }>(depth, a_blk, lda, b_blk, ldb, b_panel, c_blk, ldc),)*
                                    _ => unreachable!("at most {} rows", $mr),
                                }
                            };
                        }
                        match (wide, lda) {
                            // The strides of the query tiles of common head sizes, and of the
                            // probabilities (`SCORES_LD`).
                            (true, 32) => wide!(32),
                            (true, 64) => wide!(64),
                            (true, 128) => wide!(128),
                            (true, SCORES_LD) => wide!(SCORES_LD),
                            (true, _) => wide!(0),
                            (false, _) => match mr {
                                $($rows1 => block::<$lanes, $rows1, $vecs1, ACCUMULATE, 0>(depth, a_blk, lda, b_blk, ldb, b_panel, c_blk, ldc),)*
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
/// multiple of [`NR`]; `b` in panels as [`gemm_avx2`] reads it).
///
/// # Safety
/// The level must be a vector level (`simd_level().is_vector()`), and every operand in bounds
/// for those shapes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<const ACCUMULATE: bool>(
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
            gemm_avx512::<ACCUMULATE>(rows, n, depth, a, lda, b, ldb, b_panel, c, ldc)
        },
        // SAFETY: every vector level has AVX2 and FMA; operands by the caller's contract.
        _ => unsafe { gemm_avx2::<ACCUMULATE>(rows, n, depth, a, lda, b, ldb, b_panel, c, ldc) },
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
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
            unsafe { super::gemm_avx2::<false>(2, 8, 4, a.as_ptr(), 16, b.as_ptr(), 16, 16, c.as_mut_ptr(), 16) }
        });
        assert!(ragged_gemm.is_err(), "gemm accepted n = 8");
        let ragged_axpy = std::panic::catch_unwind(move || {
            // SAFETY: as above.
            unsafe { super::axpy_rows_avx2(2, 12, 4, a.as_ptr(), 16, b.as_ptr(), 16, c.as_mut_ptr(), 16) }
        });
        assert!(ragged_axpy.is_err(), "axpy_rows accepted n = 12");
        let tall_axpy = std::panic::catch_unwind(move || {
            // SAFETY: as above.
            unsafe { super::axpy_rows_avx2(9, 8, 4, a.as_ptr(), 16, b.as_ptr(), 16, c.as_mut_ptr(), 16) }
        });
        assert!(tall_axpy.is_err(), "axpy_rows accepted 9 rows");
    }

    /// The decode kernels of every vector level this CPU has against their definitions in f64:
    /// row counts 1–8 (every block shape), key counts with a partial block of keys, depths with
    /// and without a tail, and leading dimensions wider than the rows.
    #[test]
    fn decode_kernels_match_their_definitions_at_every_level() {
        type Kernel = unsafe fn(usize, usize, usize, *const f32, usize, *const f32, usize, *mut f32, usize);
        let mut levels: Vec<(&str, Kernel, Kernel, usize)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            levels.push(("avx2", super::dot_rows_avx2, super::axpy_rows_avx2, 8));
        }
        if crate::simd::detect() == crate::SimdLevel::Avx512 {
            levels.push(("avx512", super::dot_rows_avx512, super::axpy_rows_avx512, 16));
        }
        for (name, dot, axpy, width) in levels {
            for rows in 1..=8 {
                for (n, depth) in [(1, 64), (7, 17), (13, 128), (32, 5), (9, 33)] {
                    let (lda, ldk, ldc) = (depth + 3, depth + 5, n + 2);
                    let a = crate::testing::random_vec(rows * lda, 11);
                    let k = crate::testing::random_vec(n * ldk, 12);
                    let mut c = vec![f32::NAN; rows * ldc];
                    // SAFETY: the level was detected; `a` is [rows, lda], `k` [n, ldk], `c` [rows, ldc].
                    unsafe { dot(rows, n, depth, a.as_ptr(), lda, k.as_ptr(), ldk, c.as_mut_ptr(), ldc) };
                    for i in 0..rows {
                        for j in 0..n {
                            let want: f64 = (0..depth).map(|p| a[i * lda + p] as f64 * k[j * ldk + p] as f64).sum();
                            let err = (c[i * ldc + j] as f64 - want).abs();
                            assert!(
                                err < 2e-5,
                                "{name} dot_rows rows {rows} n {n} depth {depth} [{i}, {j}]: {err:e}"
                            );
                        }
                    }
                    // axpy: `n` columns of values rounded to the width, `depth` keys.
                    let cols = (n * width).div_ceil(width) * width;
                    let ldv = cols + 16;
                    let v = crate::testing::random_vec(depth * ldv, 13);
                    let start = crate::testing::random_vec(rows * cols, 14);
                    let mut c = start.clone();
                    // SAFETY: as above; `v` is [depth, ldv], `c` [rows, cols].
                    unsafe {
                        axpy(
                            rows,
                            cols,
                            depth,
                            a.as_ptr(),
                            lda,
                            v.as_ptr(),
                            ldv,
                            c.as_mut_ptr(),
                            cols,
                        )
                    };
                    for i in 0..rows {
                        for col in 0..cols {
                            let want = start[i * cols + col] as f64
                                + (0..depth)
                                    .map(|j| a[i * lda + j] as f64 * v[j * ldv + col] as f64)
                                    .sum::<f64>();
                            let err = (c[i * cols + col] as f64 - want).abs();
                            // Sums of at most 128 products of values in [-1, 1): about 1e-6.
                            assert!(
                                err < 2e-5,
                                "{name} axpy_rows rows {rows} depth {depth} [{i}, {col}]: {err:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The tile GEMM of every vector level this CPU has against the definition in f64: row
    /// counts across each level's block heights (6; 8 over two panels, 16 over one), three
    /// panels (a pair and a last single one), depths with and without a tail, replacing and
    /// accumulating.
    #[test]
    fn tile_gemm_matches_its_definition_at_every_level() {
        type Gemm = unsafe fn(usize, usize, usize, *const f32, usize, *const f32, usize, usize, *mut f32, usize);
        let mut levels: Vec<(&str, Gemm, Gemm)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            levels.push(("avx2", super::gemm_avx2::<false>, super::gemm_avx2::<true>));
        }
        if crate::simd::detect() == crate::SimdLevel::Avx512 {
            levels.push(("avx512", super::gemm_avx512::<false>, super::gemm_avx512::<true>));
        }
        for (name, replace, accumulate) in levels {
            // `a`'s row stride: its depth, and each stride the kernel takes as a constant.
            let strides = |depth: usize| {
                let mut all = vec![depth, 32, 64, 128, super::SCORES_LD];
                all.retain(|&lda| lda >= depth);
                all.dedup();
                all
            };
            for (rows, depth) in [1, 5, 6, 7, 8, 9, 15, 16, 17, 33]
                .into_iter()
                .flat_map(|rows| [1, 8, 17, 64].map(|depth| (rows, depth)))
            {
                for lda in strides(depth) {
                    let n = 48;
                    let a = crate::testing::random_vec(rows * lda, 1);
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
                    for ((mode, kernel), (layout, b_data, ldb, b_panel)) in
                        [("replace", replace), ("accumulate", accumulate)]
                            .into_iter()
                            .zip(layouts)
                            .chain(
                                [("replace", replace), ("accumulate", accumulate)]
                                    .into_iter()
                                    .zip(layouts.into_iter().rev()),
                            )
                    {
                        let mut c = start.clone();
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
                            )
                        };
                        for r in 0..rows {
                            for j in 0..n {
                                let mut want: f64 =
                                    (0..depth).map(|p| a[r * lda + p] as f64 * b[p * n + j] as f64).sum();
                                if mode == "accumulate" {
                                    want += start[r * n + j] as f64;
                                }
                                let err = (c[r * n + j] as f64 - want).abs();
                                // f32 sums of at most 64 products of values in [-1, 1): about
                                // 1e-6; a wrong row or lane is off by 0.1 or more.
                                assert!(
                                    err < 2e-5,
                                    "{name} {mode} {layout} rows {rows} depth {depth} lda {lda} [{r}, {j}]: {err:e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
