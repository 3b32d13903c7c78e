//! SIMD code written once over the vector width: the [`Lanes`] trait names the handful of vector
//! operations the row primitives and the tile and decode kernels need, [`Avx2`] (8 lanes) and
//! [`Avx512`] (16 lanes) implement it, and the generic bodies (the row primitives in `rows.rs`,
//! the kernels in `tile/`) are instantiated by each level's `#[target_feature]` entry points
//! (`simd.rs`, `tile.rs`).
//!
//! Every method is `unsafe` and `#[inline(always)]`: it requires the CPU features of its level,
//! which the entry point that inlines it guarantees. The generic bodies evaluate the same
//! operations in the same order at every width, so two levels differ only by how many lanes a
//! sum is split across.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// One SIMD width of f32 lanes.
pub(crate) trait Lanes {
    /// A vector of [`Lanes::N`] f32.
    type V: Copy;
    /// Lanes per vector.
    const N: usize;
    /// `[x; N]`.
    unsafe fn splat(x: f32) -> Self::V;
    /// `N` floats from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// `N` bf16 bit patterns from `p` (unaligned), widened exactly ([`crate::bf16_to_f32`]: a
    /// shift into the upper half of each lane); when `ROUNDED`, first made what rounding their
    /// values to bf16 gives ([`crate::round_to_bf16`]: subnormals to zeros of their sign, NaN
    /// made quiet).
    unsafe fn load_bits<const ROUNDED: bool>(p: *const u16) -> Self::V;
    /// `N` floats from `p` (unaligned), rounded to bf16 ([`crate::round_to_bf16`]'s bits).
    unsafe fn load_rounded(p: *const f32) -> Self::V;
    /// `N` floats to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n < N` lanes from the `n` floats at `p`, the others `fill`: a row's tail,
    /// read without touching memory past it (masked loads do not fault on masked-off lanes).
    unsafe fn load_part(p: *const f32, n: usize, fill: f32) -> Self::V;
    /// The first `n < N` lanes of `v` to the `n` floats at `p`; nothing past them is written.
    unsafe fn store_part(p: *mut f32, n: usize, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `b` where `a` or `b` is NaN (the x86 rule: NaN in the second operand propagates).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `b` where `a` or `b` is NaN.
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`, fused.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c - a·b`, fused.
    unsafe fn fnmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `p · 2^n` for an integer-valued `n` in `[-126, 128]`, given also as `z = n + 1.5·2^23`
    /// (the magic-number rounding of [`exp`]). Exact scaling, so every level gives the same
    /// bits: AVX2 builds `2^n` from the low mantissa bits of `z` (a shift and an add) and
    /// multiplies; AVX-512 does it in one `vscalefps` from `n`.
    unsafe fn times_pow2(p: Self::V, n: Self::V, z: Self::V) -> Self::V;
    /// `2^n` for an integer-valued `n` in `[-126, 128]`, given also as `z` (as in
    /// [`Lanes::times_pow2`]): AVX2 from the bits of `z`, AVX-512 by `vscalefps` of 1, so the
    /// same value at every level.
    unsafe fn pow2(n: Self::V, z: Self::V) -> Self::V;
    /// Whether softmax's row loop ([`exp_sub_sum`]) interleaves two `exp` chains: at AVX-512,
    /// whose 32 registers hold both chains and their constants; not at AVX2, whose 16 do not
    /// (the compiler spills and reloads, and one chain measured 13% faster per element on Zen 3).
    const TWO_EXP_CHAINS: bool;
    /// `y` where `x >= lo`, `0` where `x < lo` (ordered: NaN keeps `y`).
    unsafe fn zero_below(x: Self::V, lo: f32, y: Self::V) -> Self::V;
    /// [`Lanes::zero_below`] of `a·b + c` (fused): AVX-512 does both in one zero-masked FMA.
    unsafe fn fmadd_zero_below(a: Self::V, b: Self::V, c: Self::V, x: Self::V, lo: f32) -> Self::V;
    /// `y` where `x <= hi`, `+inf` where `x > hi` (ordered: NaN keeps `y`).
    unsafe fn inf_above(x: Self::V, hi: f32, y: Self::V) -> Self::V;
    /// The sum of the lanes, pairwise.
    unsafe fn hsum(v: Self::V) -> f32;
    /// The largest lane.
    unsafe fn hmax(v: Self::V) -> f32;
}

mod rows;
pub(crate) use rows::*;

/// AVX2+FMA: 8 lanes in a ymm register.
pub(crate) struct Avx2;

/// All ones in the 32-bit lanes `i < n` (`n < 8`), zero in the others: a `vmaskmovps` mask.
///
/// # Safety
/// AVX must be available.
#[inline(always)]
unsafe fn avx2_first(n: usize) -> __m256i {
    debug_assert!(n < 8);
    // SAFETY: the caller's contract.
    unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
}

impl Lanes for Avx2 {
    type V = __m256;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: AVX is enabled by the caller (for every method of this impl).
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: as above; `p` covers 8 floats by the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_rounded(p: *const f32) -> __m256 {
        // SAFETY: AVX2 is enabled by the caller; `p` covers 8 floats.
        unsafe { crate::bf16::round_avx2::round8(_mm256_loadu_ps(p)) }
    }
    #[inline(always)]
    unsafe fn load_bits<const ROUNDED: bool>(p: *const u16) -> __m256 {
        // SAFETY: AVX2 is enabled by the caller; `p` covers 8 bit patterns (16 bytes).
        unsafe {
            let mut h = _mm_loadu_si128(p.cast());
            if ROUNDED {
                // Subnormals (and zeros: a magnitude below the least normal, 0x0080) keep only
                // their sign; NaN (a magnitude above infinity's, 0x7F80) gets the quiet bit.
                let magnitude = _mm_and_si128(h, _mm_set1_epi16(0x7FFF));
                let tiny = _mm_cmpgt_epi16(_mm_set1_epi16(0x0080), magnitude);
                h = _mm_andnot_si128(_mm_and_si128(tiny, _mm_set1_epi16(0x7FFF)), h);
                let nan = _mm_cmpgt_epi16(magnitude, _mm_set1_epi16(0x7F80));
                h = _mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x0040)));
            }
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize, fill: f32) -> __m256 {
        // SAFETY: as above; `vmaskmovps` reads only the lanes whose mask is set, the first `n`.
        unsafe {
            let mask = avx2_first(n);
            _mm256_blendv_ps(
                _mm256_set1_ps(fill),
                _mm256_maskload_ps(p, mask),
                _mm256_castsi256_ps(mask),
            )
        }
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, n: usize, v: __m256) {
        // SAFETY: as above; only the first `n` lanes are written.
        unsafe { _mm256_maskstore_ps(p, avx2_first(n), v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe { _mm256_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: as above (FMA).
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: as above (FMA).
        unsafe { _mm256_fnmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn times_pow2(p: __m256, n: __m256, z: __m256) -> __m256 {
        // SAFETY: as above (AVX2).
        unsafe { _mm256_mul_ps(p, Self::pow2(n, z)) }
    }
    #[inline(always)]
    unsafe fn pow2(_n: __m256, z: __m256) -> __m256 {
        // SAFETY: as above (AVX2).
        unsafe {
            _mm256_castsi256_ps(_mm256_add_epi32(
                _mm256_slli_epi32::<23>(_mm256_castps_si256(z)),
                _mm256_set1_epi32(127 << 23),
            ))
        }
    }
    const TWO_EXP_CHAINS: bool = false;
    #[inline(always)]
    unsafe fn zero_below(x: __m256, lo: f32, y: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe { _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(lo)), y) }
    }
    #[inline(always)]
    unsafe fn fmadd_zero_below(a: __m256, b: __m256, c: __m256, x: __m256, lo: f32) -> __m256 {
        // SAFETY: as above (AVX2 and FMA).
        unsafe { Self::zero_below(x, lo, _mm256_fmadd_ps(a, b, c)) }
    }
    #[inline(always)]
    unsafe fn inf_above(x: __m256, hi: f32, y: __m256) -> __m256 {
        // SAFETY: as above.
        unsafe {
            let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(hi));
            _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over)
        }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: as above.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        // SAFETY: as above.
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
}

/// The lanes `i < n` of a 16-lane mask (`n < 16`).
#[inline(always)]
fn avx512_first(n: usize) -> __mmask16 {
    debug_assert!(n < 16);
    ((1u32 << n) - 1) as __mmask16
}

/// AVX-512 (F, BW, VL, DQ): 16 lanes in a zmm register.
pub(crate) struct Avx512;

impl Lanes for Avx512 {
    type V = __m512;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: AVX-512F is enabled by the caller (for every method of this impl).
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: as above; `p` covers 16 floats by the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_rounded(p: *const f32) -> __m512 {
        // SAFETY: AVX-512 F is enabled by the caller; `p` covers 16 floats.
        unsafe { crate::gemm::avx512::round_lanes(_mm512_loadu_ps(p)) }
    }
    #[inline(always)]
    unsafe fn load_bits<const ROUNDED: bool>(p: *const u16) -> __m512 {
        // SAFETY: as above (and AVX2, which every vector level has); `p` covers 16 bit patterns.
        unsafe {
            let mut h = _mm256_loadu_si256(p.cast());
            if ROUNDED {
                // As at AVX2, on twice the lanes (AVX2's integer operations).
                let magnitude = _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF));
                let tiny = _mm256_cmpgt_epi16(_mm256_set1_epi16(0x0080), magnitude);
                h = _mm256_andnot_si256(_mm256_and_si256(tiny, _mm256_set1_epi16(0x7FFF)), h);
                let nan = _mm256_cmpgt_epi16(magnitude, _mm256_set1_epi16(0x7F80));
                h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x0040)));
            }
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize, fill: f32) -> __m512 {
        // SAFETY: as above; a masked load reads (and may fault on) only the first `n` lanes.
        unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), avx512_first(n), p) }
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, n: usize, v: __m512) {
        // SAFETY: as above; only the first `n` lanes are written.
        unsafe { _mm512_mask_storeu_ps(p, avx512_first(n), v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_fnmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn times_pow2(p: __m512, n: __m512, _z: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_scalef_ps(p, n) }
    }
    #[inline(always)]
    unsafe fn pow2(n: __m512, _z: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_scalef_ps(_mm512_set1_ps(1.0), n) }
    }
    const TWO_EXP_CHAINS: bool = true;
    #[inline(always)]
    unsafe fn zero_below(x: __m512, lo: f32, y: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe {
            let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(lo));
            _mm512_mask_mov_ps(y, below, _mm512_setzero_ps())
        }
    }
    #[inline(always)]
    unsafe fn fmadd_zero_below(a: __m512, b: __m512, c: __m512, x: __m512, lo: f32) -> __m512 {
        // SAFETY: as above.
        unsafe {
            // Kept: `x >= lo` or unordered (NaN), the complement of `zero_below`'s mask.
            let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(lo));
            _mm512_maskz_fmadd_ps(keep, a, b, c)
        }
    }
    #[inline(always)]
    unsafe fn inf_above(x: __m512, hi: f32, y: __m512) -> __m512 {
        // SAFETY: as above.
        unsafe {
            let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(hi));
            _mm512_mask_mov_ps(y, over, _mm512_set1_ps(f32::INFINITY))
        }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        // SAFETY: as above (AVX-512DQ for the 256-bit extract); the halves are summed as the
        // 8-lane level sums its lanes, pairwise.
        unsafe {
            let half = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
            Avx2::hsum(half)
        }
    }
    #[inline(always)]
    unsafe fn hmax(v: __m512) -> f32 {
        // SAFETY: as above.
        unsafe {
            let half = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
            Avx2::hmax(half)
        }
    }
}
