//! Rounding f32 values to bf16 at the AVX2 level, eight lanes at a time with the bits of
//! [`crate::round_to_bf16`]: the f32 fallback's rounding of its operands and probabilities (bf16
//! without bf16 instructions), which the scalar conversion, a branch per value, made slower than
//! the products it feeds.

use std::arch::x86_64::*;

/// `dst[i] = round_to_bf16(factor·src[i])` for `i < n`; with `SCALED` false, `factor` is not
/// applied (not even as a multiplication by 1).
///
/// # Safety
/// AVX2 must be available; `src` readable and `dst` writable for `n` values (they may be the
/// same).
#[target_feature(enable = "avx2")]
unsafe fn round_raw<const SCALED: bool>(src: *const f32, factor: f32, dst: *mut f32, n: usize) {
    let f = _mm256_set1_ps(factor);
    let whole = n / 8 * 8;
    // SAFETY: whole vectors inside the `n` values (the caller's contract).
    unsafe {
        for i in (0..whole).step_by(8) {
            let mut x = _mm256_loadu_ps(src.add(i));
            if SCALED {
                x = _mm256_mul_ps(x, f);
            }
            _mm256_storeu_ps(dst.add(i), round8(x));
        }
        for i in whole..n {
            let x = *src.add(i);
            *dst.add(i) = crate::round_to_bf16(if SCALED { x * factor } else { x });
        }
    }
}

/// Each lane of `x` rounded to bf16, with the bits of [`crate::round_to_bf16`].
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn round8(x: __m256) -> __m256 {
    let bits = _mm256_castps_si256(x);
    let upper = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    // To nearest, ties to even: add 0x7FFF plus the kept part's lowest bit, cut.
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_and_si256(
        _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)),
        upper,
    );
    // Subnormals (and zeros) keep their sign; NaN is made quiet, not rounded.
    let exponent = _mm256_and_si256(bits, _mm256_set1_epi32(0x7F80_0000));
    let tiny = _mm256_cmpeq_epi32(exponent, _mm256_setzero_si256());
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    let sign = _mm256_set1_epi32(0x8000_0000u32 as i32);
    let out = _mm256_blendv_epi8(rounded, _mm256_and_si256(bits, sign), tiny);
    let quieted = _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000)), upper);
    _mm256_castsi256_ps(_mm256_blendv_epi8(out, quieted, nan))
}

/// Rounds every value of `row` to bf16 in place.
///
/// # Safety
/// AVX2 must be available.
pub(crate) unsafe fn round_row(row: &mut [f32]) {
    // SAFETY: AVX2 by the caller; the row is read and written in place.
    unsafe { round_raw::<false>(row.as_ptr(), 1.0, row.as_mut_ptr(), row.len()) }
}

/// `dst[i] = round_to_bf16(factor·src[i])` for every value of `src` (`dst` at least as long).
///
/// # Safety
/// AVX2 must be available.
pub(crate) unsafe fn round_scaled(src: &[f32], factor: f32, dst: &mut [f32]) {
    assert!(dst.len() >= src.len());
    // SAFETY: AVX2 by the caller; both slices hold `src.len()` values.
    unsafe { round_raw::<true>(src.as_ptr(), factor, dst.as_mut_ptr(), src.len()) }
}

#[cfg(test)]
mod tests {
    /// The bits of [`crate::round_to_bf16`] (of `factor·x` when scaled): ties at both parities,
    /// carries into the exponent and to infinity, subnormals, zeros, infinities, NaN (quiet and
    /// signalling), and a million random bit patterns; rows with and without a tail.
    #[test]
    fn avx2_rounding_gives_the_bits_of_round_to_bf16() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("note: no AVX2 on this CPU; its bf16 rounding is not checked");
            return;
        }
        let mut rng = crate::rng::SplitMix64::new(43);
        let mut values: Vec<f32> = (0..1_000_000)
            .map(|_| f32::from_bits((rng.next_u64() >> 32) as u32))
            .collect();
        values.extend(
            [
                0x0000_0001u32,
                0x807F_FFFF,
                0x0000_8000,
                0x3F80_8000,
                0x3F81_8000,
                0x3F80_8001,
                0x3F80_7FFF,
                0x7F7F_FFFF,
                0xFF7F_8000,
                0x7F80_0000,
                0xFF80_0001,
                0x7F80_0001,
                0x7FC0_0000,
                0x8000_0000,
                0x0000_0000,
            ]
            .map(f32::from_bits),
        );
        for len in [values.len(), values.len() - 3] {
            let values = &values[..len];
            let mut got = values.to_vec();
            // SAFETY: AVX2 was detected.
            unsafe { super::round_row(&mut got) };
            for (x, y) in values.iter().zip(&got) {
                assert_eq!(y.to_bits(), crate::round_to_bf16(*x).to_bits(), "{:#010x}", x.to_bits());
            }
            for factor in [1.0f32, 0.125, 0.3, -3.0] {
                let mut got = vec![0.0f32; len];
                // SAFETY: AVX2 was detected.
                unsafe { super::round_scaled(values, factor, &mut got) };
                for (x, y) in values.iter().zip(&got) {
                    let want = crate::round_to_bf16(x * factor).to_bits();
                    assert_eq!(y.to_bits(), want, "{factor} · {:#010x}", x.to_bits());
                }
            }
        }
    }
}
