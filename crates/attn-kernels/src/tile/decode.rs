//! The decode kernels of the flash tile: a few query rows (at most [`DECODE_ROWS_MAX`])
//! against keys and values read in place, written once over the vector width, where
//! transposing or packing the key block would cost as much as the whole product.

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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
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
}
