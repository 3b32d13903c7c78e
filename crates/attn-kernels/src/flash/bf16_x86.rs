//! The flash kernel's bf16 vector kernels at the AVX512-BF16 level ([`super::bf16`]): pass 2's
//! fused `exp` (into AMX's A tiles or rows of pairs) and its shorter `exp`, rounding with a
//! factor, and the decoding kernels that round K and V as they load them.
use std::arch::x86_64::*;

/// `dst[i] = round_to_bf16(factor·src[i])` for a multiple of 16 values.
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn round_scaled(src: &[f32], factor: f32, dst: &mut [f32]) {
    assert!(src.len().is_multiple_of(16) && dst.len() >= src.len());
    let f = _mm512_set1_ps(factor);
    for (from, to) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        // SAFETY: each chunk holds 16 values.
        unsafe {
            let h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(from.as_ptr()), f));
            let wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(h)), 16);
            _mm512_storeu_si512(to.as_mut_ptr().cast(), wide);
        }
    }
}

/// `exp(x - m)` of each value of `row`, rounded to bf16 into `steps` A-tile rows (values
/// `32s .. 32s + 32` into the 16 words at `dst + s·stride`, zeros after `row`'s end);
/// returns the sum of the unrounded values. Two chains over whole steps, then a last
/// chunk of 16 and the tail padded with `-inf`, as `lanes::exp_sub_sum` at 16 lanes, with
/// [`exp_short`] for the `exp`.
///
/// # Safety
/// AVX-512F/BW/DQ and AVX512-BF16 must be available; `row.len() <= 32·steps`; `dst +
/// s·stride` writable for 16 words for every `s < steps`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,avx512bf16")]
pub(in crate::flash) unsafe fn exp_sub_sum_steps(
    row: &[f32],
    m: f32,
    steps: usize,
    dst: *mut f32,
    stride: usize,
) -> f32 {
    use crate::lanes::{Avx512, Lanes};
    let n = row.len();
    assert!(n <= 32 * steps);
    // SAFETY: whole chunks inside `row`, the tail masked; the stores inside `dst`'s steps
    // (the caller's contract); the transmutes are between 512-bit vectors.
    unsafe {
        let mv = _mm512_set1_ps(m);
        let exp = |x: __m512| exp_short(_mm512_sub_ps(x, mv));
        let put = |s: usize, lo: __m512, hi: __m512| {
            let words = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.add(s * stride).cast(), words);
        };
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let whole = n / 32;
        for s in 0..whole {
            let e0 = exp(_mm512_loadu_ps(row.as_ptr().add(32 * s)));
            let e1 = exp(_mm512_loadu_ps(row.as_ptr().add(32 * s + 16)));
            acc0 = _mm512_add_ps(acc0, e0);
            acc1 = _mm512_add_ps(acc1, e1);
            put(s, e0, e1);
        }
        let mut acc = _mm512_add_ps(acc0, acc1);
        let rest = n - 32 * whole;
        let tail = |from: usize, count: usize| {
            let pad = _mm512_set1_ps(f32::NEG_INFINITY);
            exp(_mm512_mask_loadu_ps(pad, mask16(count), row.as_ptr().add(from)))
        };
        if rest >= 16 {
            let e0 = exp(_mm512_loadu_ps(row.as_ptr().add(32 * whole)));
            acc = _mm512_add_ps(acc, e0);
            let e1 = if rest > 16 {
                let e1 = tail(32 * whole + 16, rest - 16);
                acc = _mm512_add_ps(acc, e1);
                e1
            } else {
                _mm512_setzero_ps()
            };
            put(whole, e0, e1);
        } else if rest > 0 {
            let e0 = tail(32 * whole, rest);
            acc = _mm512_add_ps(acc, e0);
            put(whole, e0, _mm512_setzero_ps());
        }
        for s in whole + usize::from(rest > 0)..steps {
            put(s, _mm512_setzero_ps(), _mm512_setzero_ps());
        }
        Avx512::hsum(acc)
    }
}

/// `e^x` per lane for `x ≤ 0` with the relative error of [`crate::exp_poly::P1`]'s
/// polynomial (2.9e-6) plus that of rounding `x·log2 e` (`|x|·2^-24`, below 5.3e-6 where
/// the result is not 0): `2^n·2^f`, `n = round(x·log2 e)` by `vrndscaleps`, `f` the exact
/// remainder, `2^n` by `vscalefps`. `e^0` is exactly 1; `x < EXP_LO` (`-inf` included) gives
/// 0, NaN stays NaN. Ten operations where [`crate::lanes::softmax_exp`] takes twelve.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_short(x: __m512) -> __m512 {
    use crate::exp_poly::{EXP_LO, LOG2E, P1, P2, P3, P4};
    let t = _mm512_mul_ps(x, _mm512_set1_ps(LOG2E));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_fmadd_ps(_mm512_set1_ps(P4), f, _mm512_set1_ps(P3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(P2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(P1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
    // Lanes at or above EXP_LO, or NaN: `-inf` made `f` a NaN, which this drops.
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP_LO));
    _mm512_maskz_scalef_ps(keep, p, n)
}

/// [`exp_short`] of 16 values in place, for the tests.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(test)]
#[target_feature(enable = "avx512f")]
pub(in crate::flash) unsafe fn exp_short_16(xs: &mut [f32; 16]) {
    // SAFETY: 16 values, read and written once.
    unsafe { _mm512_storeu_ps(xs.as_mut_ptr(), exp_short(_mm512_loadu_ps(xs.as_ptr()))) }
}

/// The lowest `n` of 16 lanes.
fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// `x` rounded to bf16 per lane and widened back (`vcvtneps2bf16`: to nearest even,
/// subnormals to zero, NaN quiet: [`crate::round_to_bf16`]'s bits).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn round16(x: __m512) -> __m512 {
    // SAFETY: a transmute between 256-bit vectors.
    let h = unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)) };
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
}

/// What the decoding kernels read keys and values as: f32 values, rounded to bf16 as they are
/// loaded ([`round16`]), or bf16 bits (a bf16 KV cache), widened exactly. Bits of bf16
/// subnormals are read as zeros of their sign, as rounding their f32 values would give, so
/// the two give the same bits for the same values.
pub(crate) trait KvElement: Copy {
    /// 16 values from `p`, as bf16 values in f32 lanes.
    ///
    /// # Safety
    /// AVX-512F/BW/VL and AVX512-BF16 must be available; `p` readable for 16 elements.
    unsafe fn load16(p: *const Self) -> __m512;
    /// The lanes of `m` from `p` as [`KvElement::load16`] reads them, zeros elsewhere.
    ///
    /// # Safety
    /// As for [`KvElement::load16`], for the lanes of `m`.
    unsafe fn load16_masked(m: __mmask16, p: *const Self) -> __m512;
}

impl KvElement for f32 {
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        round16(unsafe { _mm512_loadu_ps(p) })
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn load16_masked(m: __mmask16, p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        round16(unsafe { _mm512_maskz_loadu_ps(m, p) })
    }
}

impl KvElement for u16 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn load16(p: *const u16) -> __m512 {
        // SAFETY: the caller's contract.
        widen_bits(unsafe { _mm256_loadu_si256(p.cast()) })
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn load16_masked(m: __mmask16, p: *const u16) -> __m512 {
        // SAFETY: the caller's contract.
        widen_bits(unsafe { _mm256_maskz_loadu_epi16(m, p.cast()) })
    }
}

/// 16 bf16 bit patterns as f32 lanes, subnormals (a zero exponent) as zeros of their sign.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn widen_bits(h: __m256i) -> __m512 {
    let normal = _mm256_test_epi16_mask(h, _mm256_set1_epi16(0x7F80));
    let h = _mm256_mask_blend_epi16(normal, _mm256_and_si256(h, _mm256_set1_epi16(i16::MIN)), h);
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
}

/// Decoding's scores with K read in place: `scores[r·ld + j] = q_r · round(k_j)` for
/// `r < rows`, `j < bc`, where `q` holds each row's `D` scaled query values already rounded
/// to bf16 (`ldq` apart) and key `j` is `k[j·ks .. j·ks + D]`, rounded to bf16 as it is
/// loaded. The products of bf16 values are exact in f32; each score is one FMA chain over
/// `D` in order per lane, then the lanes' sum. (f32 FMAs rather than `vdpbf16ps` here:
/// decoding is bound by reading K and V, and on Zen 5 the `vdpbf16ps` loops measured at
/// half the f32 kernels' bandwidth.)
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 must be available; `rows <= 8`; the operands must cover
/// those shapes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(in crate::flash) unsafe fn dot_rows<E: KvElement>(
    rows: usize,
    d: usize,
    q: *const f32,
    ldq: usize,
    k: *const E,
    ks: usize,
    bc: usize,
    scores: *mut f32,
    ld: usize,
) {
    let args = (d, q, ldq, k, ks, bc, scores, ld);
    // SAFETY: the caller's contract, for `rows` rows.
    unsafe {
        match rows {
            1 => dot_block::<E, 1>(args),
            2 => dot_block::<E, 2>(args),
            3 => dot_block::<E, 3>(args),
            4 => dot_block::<E, 4>(args),
            5 => dot_block::<E, 5>(args),
            6 => dot_block::<E, 6>(args),
            7 => dot_block::<E, 7>(args),
            8 => dot_block::<E, 8>(args),
            _ => panic!("dot_rows: {rows} rows, at most 8"),
        }
    }
}

/// The operands of [`dot_rows`] after `rows`.
type DotArgs<E> = (usize, *const f32, usize, *const E, usize, usize, *mut f32, usize);

/// Keys per step of [`dot_block`]: their chains are independent, so they overlap in the
/// pipeline.
const KEYS: usize = 4;

/// [`dot_rows`] for `ROWS` rows, [`KEYS`] keys at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn dot_block<E: KvElement, const ROWS: usize>((d, q, ldq, k, ks, bc, scores, ld): DotArgs<E>) {
    let (full, tail) = (d / 16 * 16, d % 16);
    // SAFETY: whole vectors inside each key's and each row's `D` values, the tail masked;
    // the stores inside `scores` (the caller's contract).
    unsafe {
        let mut j0 = 0;
        while j0 < bc {
            let kb = (bc - j0).min(KEYS);
            let keys: [*const E; KEYS] = std::array::from_fn(|j| k.add((j0 + j.min(kb - 1)) * ks));
            let mut acc = [[_mm512_setzero_ps(); KEYS]; ROWS];
            for (j, &key) in keys.iter().enumerate() {
                for c in (0..full).step_by(16) {
                    let kv = E::load16(key.add(c));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        acc_r[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(r * ldq + c)), kv, acc_r[j]);
                    }
                }
                if tail > 0 {
                    let m = mask16(tail);
                    let kv = E::load16_masked(m, key.add(full));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        acc_r[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q.add(r * ldq + full)), kv, acc_r[j]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (j, acc_rj) in acc_r.iter().enumerate().take(kb) {
                    *scores.add(r * ld + j0 + j) = _mm512_reduce_add_ps(*acc_rj);
                }
            }
            j0 += kb;
        }
    }
}

/// Decoding's `acc += P·V` with V read in place: `acc[r·ldc + c] += Σ_j p_rj · round(v_jc)`
/// for `r < rows`, `c < dv`, `j < bc`, where `p` holds each row's probabilities already
/// rounded to bf16 (`ldp` apart) and value row `j` is `v[j·vs .. j·vs + dv]`, rounded as it
/// is loaded. The value rows are read whole and in order; the sums stay in `acc` (L1).
///
/// # Safety
/// As for [`dot_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(in crate::flash) unsafe fn axpy_rows<E: KvElement>(
    rows: usize,
    dv: usize,
    bc: usize,
    p: *const f32,
    ldp: usize,
    v: *const E,
    vs: usize,
    acc: *mut f32,
    ldc: usize,
) {
    let args = (dv, bc, p, ldp, v, vs, acc, ldc);
    // SAFETY: the caller's contract, for `rows` rows.
    unsafe {
        match rows {
            1 => axpy_block::<E, 1>(args),
            2 => axpy_block::<E, 2>(args),
            3 => axpy_block::<E, 3>(args),
            4 => axpy_block::<E, 4>(args),
            5 => axpy_block::<E, 5>(args),
            6 => axpy_block::<E, 6>(args),
            7 => axpy_block::<E, 7>(args),
            8 => axpy_block::<E, 8>(args),
            _ => panic!("axpy_rows: {rows} rows, at most 8"),
        }
    }
}

/// The operands of [`axpy_rows`] after `rows`.
type AxpyArgs<E> = (usize, usize, *const f32, usize, *const E, usize, *mut f32, usize);

/// [`axpy_rows`] for `ROWS` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn axpy_block<E: KvElement, const ROWS: usize>((dv, bc, p, ldp, v, vs, acc, ldc): AxpyArgs<E>) {
    let (full, tail) = (dv / 16 * 16, dv % 16);
    // SAFETY: whole vectors inside `dv` columns of each row, the tail masked (the caller's
    // contract).
    unsafe {
        for j in 0..bc {
            let x: [__m512; ROWS] = std::array::from_fn(|r| _mm512_set1_ps(*p.add(r * ldp + j)));
            let row = v.add(j * vs);
            for c0 in (0..full).step_by(16) {
                let vv = E::load16(row.add(c0));
                for (r, &xr) in x.iter().enumerate() {
                    let out = acc.add(r * ldc + c0);
                    _mm512_storeu_ps(out, _mm512_fmadd_ps(xr, vv, _mm512_loadu_ps(out)));
                }
            }
            if tail > 0 {
                // Masked, and only here: a masked store costs several plain ones on Zen 5.
                let m = mask16(tail);
                let vv = E::load16_masked(m, row.add(full));
                for (r, &xr) in x.iter().enumerate() {
                    let out = acc.add(r * ldc + full);
                    _mm512_mask_storeu_ps(out, m, _mm512_fmadd_ps(xr, vv, _mm512_maskz_loadu_ps(m, out)));
                }
            }
        }
    }
}
