//! The decode kernels of the flash tile: a few query rows (at most [`DECODE_ROWS_MAX`])
//! against keys and values read in place, written once over the vector width, where
//! transposing or packing the key block would cost as much as the whole product.

/// How K and V are stored where the decode kernels read them in place, and what the kernels
/// multiply: f32 values as they are ([`F32Values`]) or rounded to bf16 as they are loaded
/// ([`F32Rounded`]), or bf16 bits (a bf16 KV cache) widened as they are loaded, exactly
/// ([`Bf16Bits`]) or as rounding their values to bf16 would give them ([`Bf16Rounded`]), so
/// each gives the bits of the f32 kernels on the values it stands for.
pub(crate) trait Stored {
    /// The element in memory.
    type Elem: Copy;
    /// [`crate::lanes::Lanes::N`] values from `p`, as f32 lanes.
    ///
    /// # Safety
    /// `L`'s features must be enabled; `p` readable for `L::N` elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load<L: crate::lanes::Lanes>(p: *const Self::Elem) -> L::V;
    /// One element's value.
    fn value(x: Self::Elem) -> f32;
}

/// f32 values, as they are.
pub(crate) struct F32Values;

/// bf16 bits, widened exactly ([`crate::bf16_to_f32`]).
pub(crate) struct Bf16Bits;

/// bf16 bits, widened as rounding their widened values to bf16 gives them
/// ([`crate::round_to_bf16`]: subnormals to zeros of their sign, NaN made quiet), the operands
/// of the f32 kernels in bf16 without bf16 instructions.
pub(crate) struct Bf16Rounded;

/// f32 values rounded to bf16 as they are loaded ([`crate::round_to_bf16`]), the operands of
/// the f32 kernels in bf16 without bf16 instructions.
pub(crate) struct F32Rounded;

impl Stored for F32Rounded {
    type Elem = f32;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: crate::lanes::Lanes>(p: *const f32) -> L::V {
        // SAFETY: the caller's contract.
        unsafe { L::load_rounded(p) }
    }
    #[inline(always)]
    fn value(x: f32) -> f32 {
        crate::round_to_bf16(x)
    }
}

impl Stored for F32Values {
    type Elem = f32;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: crate::lanes::Lanes>(p: *const f32) -> L::V {
        // SAFETY: the caller's contract.
        unsafe { L::load(p) }
    }
    #[inline(always)]
    fn value(x: f32) -> f32 {
        x
    }
}

impl Stored for Bf16Bits {
    type Elem = u16;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: crate::lanes::Lanes>(p: *const u16) -> L::V {
        // SAFETY: the caller's contract.
        unsafe { L::load_bits::<false>(p) }
    }
    #[inline(always)]
    fn value(x: u16) -> f32 {
        crate::bf16_to_f32(x)
    }
}

impl Stored for Bf16Rounded {
    type Elem = u16;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: crate::lanes::Lanes>(p: *const u16) -> L::V {
        // SAFETY: the caller's contract.
        unsafe { L::load_bits::<true>(p) }
    }
    #[inline(always)]
    fn value(x: u16) -> f32 {
        crate::bf16_to_f32(crate::bf16::canonical(x))
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
unsafe fn dot_block<L: crate::lanes::Lanes, S: Stored, const ROWS: usize, const KEYS: usize>(
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    k: *const S::Elem,
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
            let keys: [*const S::Elem; KEYS] = std::array::from_fn(|j| k.add((j0 + j.min(kb - 1)) * ldk));
            let mut acc = [[L::splat(0.0); KEYS]; ROWS];
            // Key after key, each read in order; the sums of different keys are independent,
            // so they overlap in the pipeline.
            for (j, &key) in keys.iter().enumerate() {
                for v in 0..vecs {
                    let kv = S::load::<L>(key.add(v * L::N));
                    for (i, acc_i) in acc.iter_mut().enumerate() {
                        acc_i[j] = L::fmadd(L::load(a.add(i * lda + v * L::N)), kv, acc_i[j]);
                    }
                }
            }
            for (i, acc_i) in acc.iter().enumerate() {
                for (j, &acc_ij) in acc_i.iter().enumerate().take(kb) {
                    let mut total = L::hsum(acc_ij);
                    for p in vecs * L::N..depth {
                        total += *a.add(i * lda + p) * S::value(*keys[j].add(p));
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
unsafe fn axpy_block<L: crate::lanes::Lanes, S: Stored, const ROWS: usize, const PANEL: usize>(
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    v: *const S::Elem,
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
                1 => axpy_panel::<L, S, ROWS, 1>(depth, a, lda, v, ldv, c, ldc),
                2 => axpy_panel::<L, S, ROWS, 2>(depth, a, lda, v, ldv, c, ldc),
                3 => axpy_panel::<L, S, ROWS, 3>(depth, a, lda, v, ldv, c, ldc),
                4 => axpy_panel::<L, S, ROWS, 4>(depth, a, lda, v, ldv, c, ldc),
                5 => axpy_panel::<L, S, ROWS, 5>(depth, a, lda, v, ldv, c, ldc),
                6 => axpy_panel::<L, S, ROWS, 6>(depth, a, lda, v, ldv, c, ldc),
                7 => axpy_panel::<L, S, ROWS, 7>(depth, a, lda, v, ldv, c, ldc),
                _ => axpy_panel::<L, S, ROWS, 8>(depth, a, lda, v, ldv, c, ldc),
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
                let vv = S::load::<L>(v_row.add(col));
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
unsafe fn axpy_panel<L: crate::lanes::Lanes, S: Stored, const ROWS: usize, const PANEL: usize>(
    depth: usize,
    a: *const f32,
    lda: usize,
    v: *const S::Elem,
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
            let vv: [L::V; PANEL] = std::array::from_fn(|p| S::load::<L>(v_row.add(p * L::N)));
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
        pub(crate) unsafe fn $dot<S: Stored>(
            rows: usize,
            n: usize,
            depth: usize,
            a: *const f32,
            lda: usize,
            k: *const S::Elem,
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
                        1 => dot_block::<$lanes, S, 1, 4>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
                        2 => dot_block::<$lanes, S, 2, 4>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
                        3 => dot_block::<$lanes, S, 3, 2>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
                        _ => dot_block::<$lanes, S, 4, 2>(n, depth, a_blk, lda, k, ldk, c_blk, ldc),
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
        pub(crate) unsafe fn $axpy<S: Stored>(
            rows: usize,
            n: usize,
            depth: usize,
            a: *const f32,
            lda: usize,
            v: *const S::Elem,
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
                    1 => axpy_block::<$lanes, S, 1, $p12>(n, depth, a, lda, v, ldv, c, ldc),
                    2 => axpy_block::<$lanes, S, 2, $p12>(n, depth, a, lda, v, ldv, c, ldc),
                    3 => axpy_block::<$lanes, S, 3, $p34>(n, depth, a, lda, v, ldv, c, ldc),
                    4 => axpy_block::<$lanes, S, 4, $p34>(n, depth, a, lda, v, ldv, c, ldc),
                    5 => axpy_block::<$lanes, S, 5, $p58>(n, depth, a, lda, v, ldv, c, ldc),
                    6 => axpy_block::<$lanes, S, 6, $p58>(n, depth, a, lda, v, ldv, c, ldc),
                    7 => axpy_block::<$lanes, S, 7, $p58>(n, depth, a, lda, v, ldv, c, ldc),
                    _ => axpy_block::<$lanes, S, 8, $p58>(n, depth, a, lda, v, ldv, c, ldc),
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
pub(crate) unsafe fn dot_rows<S: Stored>(
    rows: usize,
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    k: *const S::Elem,
    ldk: usize,
    c: *mut f32,
    ldc: usize,
) {
    match crate::simd::simd_level() {
        // SAFETY: `Avx512` is only reported when the CPU has AVX-512 F/BW/VL/DQ; operands by the
        // caller's contract.
        crate::SimdLevel::Avx512 => unsafe { dot_rows_avx512::<S>(rows, n, depth, a, lda, k, ldk, c, ldc) },
        // SAFETY: every vector level has AVX2 and FMA; operands by the caller's contract.
        _ => unsafe { dot_rows_avx2::<S>(rows, n, depth, a, lda, k, ldk, c, ldc) },
    }
}

/// `c[i, 0..n] += Σ_j a[i, j] · v[j, 0..n]` for a few rows with the running level's kernel (see
/// [`axpy_block`]); `n` a multiple of [`NR`].
///
/// # Safety
/// The level must be a vector level, and every operand in bounds for those shapes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn axpy_rows<S: Stored>(
    rows: usize,
    n: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    v: *const S::Elem,
    ldv: usize,
    c: *mut f32,
    ldc: usize,
) {
    match crate::simd::simd_level() {
        // SAFETY: as for `dot_rows`.
        crate::SimdLevel::Avx512 => unsafe { axpy_rows_avx512::<S>(rows, n, depth, a, lda, v, ldv, c, ldc) },
        // SAFETY: as for `dot_rows`.
        _ => unsafe { axpy_rows_avx2::<S>(rows, n, depth, a, lda, v, ldv, c, ldc) },
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{Bf16Bits, Bf16Rounded, F32Rounded, F32Values};

    type Kernel<E> = unsafe fn(usize, usize, usize, *const f32, usize, *const E, usize, *mut f32, usize);

    /// A level's `dot_rows` and `axpy_rows` on f32 values as they are and rounded, on bf16 bits
    /// widened exactly and rounded, and its width.
    type Level = (&'static str, [[Kernel<f32>; 2]; 2], [[Kernel<u16>; 2]; 2], usize);

    /// The decode kernels of every vector level this CPU has against their definitions in f64:
    /// row counts 1–8 (every block shape), key counts with a partial block of keys, depths with
    /// and without a tail, and leading dimensions wider than the rows. On bf16 bits (every sort:
    /// subnormals, zeros, the largest finite, infinities, NaN), widened exactly or as rounding
    /// gives them: the bits of the f32 kernels on those values.
    #[test]
    fn decode_kernels_match_their_definitions_at_every_level() {
        let mut levels: Vec<Level> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            levels.push((
                "avx2",
                [
                    [super::dot_rows_avx2::<F32Values>, super::axpy_rows_avx2::<F32Values>],
                    [super::dot_rows_avx2::<F32Rounded>, super::axpy_rows_avx2::<F32Rounded>],
                ],
                [
                    [super::dot_rows_avx2::<Bf16Bits>, super::axpy_rows_avx2::<Bf16Bits>],
                    [
                        super::dot_rows_avx2::<Bf16Rounded>,
                        super::axpy_rows_avx2::<Bf16Rounded>,
                    ],
                ],
                8,
            ));
        }
        if crate::simd::detect() != crate::SimdLevel::Avx512 {
            eprintln!("note: no AVX-512 on this CPU; its decode kernels are not checked");
        } else {
            levels.push((
                "avx512",
                [
                    [
                        super::dot_rows_avx512::<F32Values>,
                        super::axpy_rows_avx512::<F32Values>,
                    ],
                    [
                        super::dot_rows_avx512::<F32Rounded>,
                        super::axpy_rows_avx512::<F32Rounded>,
                    ],
                ],
                [
                    [super::dot_rows_avx512::<Bf16Bits>, super::axpy_rows_avx512::<Bf16Bits>],
                    [
                        super::dot_rows_avx512::<Bf16Rounded>,
                        super::axpy_rows_avx512::<Bf16Rounded>,
                    ],
                ],
                16,
            ));
        }
        for (name, [[dot, axpy], [dot_rounded, axpy_rounded]], on_bits, width) in levels {
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
                    // f32 K and V rounded as they are loaded: the bits of the kernels on the
                    // rounded values (specials among them).
                    let what = format!("{name} rows {rows} n {n} depth {depth}");
                    let (_, k_special) = bits_and_values(&k, false);
                    let k_mixed: Vec<f32> = k
                        .iter()
                        .zip(&k_special)
                        .enumerate()
                        .map(|(i, (&x, &s))| if i % 11 == 5 { s } else { x })
                        .collect();
                    let k_want: Vec<f32> = k_mixed.iter().map(|&x| crate::round_to_bf16(x)).collect();
                    let [mut got, mut want] = [0, 1].map(|_| vec![f32::NAN; rows * ldc]);
                    // SAFETY: as above, `k_mixed` and `k_want` [n, ldk].
                    unsafe {
                        let (a, ka, kb) = (a.as_ptr(), k_mixed.as_ptr(), k_want.as_ptr());
                        dot_rounded(rows, n, depth, a, lda, ka, ldk, got.as_mut_ptr(), ldc);
                        dot(rows, n, depth, a, lda, kb, ldk, want.as_mut_ptr(), ldc);
                    }
                    assert!(same_bits(&got, &want), "dot_rows rounding f32: {what}");
                    let v_want: Vec<f32> = v.iter().map(|&x| crate::round_to_bf16(x)).collect();
                    let [mut got, mut want] = [0, 1].map(|_| start.clone());
                    // SAFETY: as above, `v` and `v_want` [depth, ldv].
                    unsafe {
                        let (a, va, vb) = (a.as_ptr(), v.as_ptr(), v_want.as_ptr());
                        axpy_rounded(rows, cols, depth, a, lda, va, ldv, got.as_mut_ptr(), cols);
                        axpy(rows, cols, depth, a, lda, vb, ldv, want.as_mut_ptr(), cols);
                    }
                    assert!(same_bits(&got, &want), "axpy_rows rounding f32: {what}");
                    // K and V as bf16 bits, read as their values (exact, or rounded).
                    for (rounded, [dot_bits, axpy_bits]) in [false, true].into_iter().zip(on_bits) {
                        let what = format!("{name} rows {rows} n {n} depth {depth} rounded {rounded}");
                        let (k_bits, k_values) = bits_and_values(&k, rounded);
                        let [mut got, mut want] = [0, 1].map(|_| vec![f32::NAN; rows * ldc]);
                        // SAFETY: as above, `k_bits` and `k_values` [n, ldk].
                        unsafe {
                            let (a, ka, kb) = (a.as_ptr(), k_bits.as_ptr(), k_values.as_ptr());
                            dot_bits(rows, n, depth, a, lda, ka, ldk, got.as_mut_ptr(), ldc);
                            dot(rows, n, depth, a, lda, kb, ldk, want.as_mut_ptr(), ldc);
                        }
                        assert!(same_bits(&got, &want), "dot_rows on bits: {what}");
                        let (v_bits, v_values) = bits_and_values(&v, rounded);
                        let [mut got, mut want] = [0, 1].map(|_| start.clone());
                        // SAFETY: as above, `v_bits` and `v_values` [depth, ldv].
                        unsafe {
                            let (a, va, vb) = (a.as_ptr(), v_bits.as_ptr(), v_values.as_ptr());
                            axpy_bits(rows, cols, depth, a, lda, va, ldv, got.as_mut_ptr(), cols);
                            axpy(rows, cols, depth, a, lda, vb, ldv, want.as_mut_ptr(), cols);
                        }
                        assert!(same_bits(&got, &want), "axpy_rows on bits: {what}");
                    }
                }
            }
        }
    }

    /// Every one of the 65,536 bit patterns loads as its value at every vector level this CPU
    /// has: widened exactly ([`crate::bf16_to_f32`]), or rounded ([`crate::round_to_bf16`] of
    /// that value), as the scalar tails read them ([`super::Stored::value`]); and f32 values
    /// rounded as they load, five around each bf16 value.
    #[test]
    fn bits_load_as_their_values_at_every_level() {
        use super::Stored;
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let check = |name: &str, loaded: &[f32], rounded: bool| {
            for (&h, x) in all.iter().zip(loaded) {
                let want = crate::bf16_to_f32(h);
                let want = if rounded { crate::round_to_bf16(want) } else { want };
                assert_eq!(x.to_bits(), want.to_bits(), "{name}, rounded {rounded}: {h:#06x}");
                let scalar = if rounded {
                    Bf16Rounded::value(h)
                } else {
                    Bf16Bits::value(h)
                };
                assert_eq!(scalar.to_bits(), want.to_bits(), "value, rounded {rounded}: {h:#06x}");
            }
        };
        #[target_feature(enable = "avx2,fma")]
        fn avx2<S: Stored>(all: &[S::Elem]) -> Vec<f32> {
            let mut out = vec![0.0f32; all.len()];
            for (from, to) in all.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                // SAFETY: AVX2 is enabled here; 8 elements each.
                unsafe {
                    use crate::lanes::Lanes;
                    crate::lanes::Avx2::store(to.as_mut_ptr(), S::load::<crate::lanes::Avx2>(from.as_ptr()))
                }
            }
            out
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn avx512<S: Stored>(all: &[S::Elem]) -> Vec<f32> {
            let mut out = vec![0.0f32; all.len()];
            for (from, to) in all.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                // SAFETY: AVX-512 is enabled here; 16 elements each.
                unsafe {
                    use crate::lanes::Lanes;
                    crate::lanes::Avx512::store(to.as_mut_ptr(), S::load::<crate::lanes::Avx512>(from.as_ptr()))
                }
            }
            out
        }
        // f32 values rounded as they load: every bf16 pattern's value and its neighbours
        // (ties at both parities, carries), and the specials among them.
        let floats: Vec<f32> = all
            .iter()
            .flat_map(|&h| {
                let x = (h as u32) << 16;
                [x, x | 0x7FFF, x | 0x8000, x | 0x8001, x | 0xFFFF].map(f32::from_bits)
            })
            .collect();
        let check_rounded = |name: &str, loaded: &[f32]| {
            for (x, y) in floats.iter().zip(loaded) {
                let want = crate::round_to_bf16(*x).to_bits();
                assert_eq!(y.to_bits(), want, "{name}, rounding {:#010x}", x.to_bits());
                assert_eq!(
                    F32Rounded::value(*x).to_bits(),
                    want,
                    "value, rounding {:#010x}",
                    x.to_bits()
                );
            }
        };
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: detected just above.
            unsafe {
                check("avx2", &avx2::<Bf16Bits>(&all), false);
                check("avx2", &avx2::<Bf16Rounded>(&all), true);
                check_rounded("avx2", &avx2::<F32Rounded>(&floats));
            }
        }
        if crate::simd::detect() != crate::SimdLevel::Avx512 {
            eprintln!("note: no AVX-512 on this CPU; its loads of bits and rounded floats are not checked");
        } else {
            // SAFETY: detected just above.
            unsafe {
                check("avx512", &avx512::<Bf16Bits>(&all), false);
                check("avx512", &avx512::<Bf16Rounded>(&all), true);
                check_rounded("avx512", &avx512::<F32Rounded>(&floats));
            }
        }
    }

    /// `x` as bf16 bits, every 11th a special (subnormals, signed zeros, the largest finite,
    /// infinities, quiet and signalling NaN), and the values the kernels should read: the
    /// bits widened, rounded to bf16 again when `rounded`.
    fn bits_and_values(x: &[f32], rounded: bool) -> (Vec<u16>, Vec<f32>) {
        const SPECIAL: [u16; 10] = [
            0x0001, 0x8040, 0x8000, 0x0000, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81,
        ];
        let bits: Vec<u16> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if i % 11 == 5 {
                    SPECIAL[i / 11 % SPECIAL.len()]
                } else {
                    crate::f32_to_bf16(v)
                }
            })
            .collect();
        let value = |h: u16| {
            let wide = crate::bf16_to_f32(h);
            if rounded {
                crate::round_to_bf16(wide)
            } else {
                wide
            }
        };
        let values = bits.iter().map(|&h| value(h)).collect();
        (bits, values)
    }

    /// The same bits, a NaN for a NaN: which of several NaN operands a sum propagates depends
    /// on the order the compiler gives a fused multiply-add's operands, which it may choose
    /// differently for two instantiations of one kernel.
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }
}
