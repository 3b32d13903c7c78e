//! Row primitives with run-time SIMD dispatch: max, `exp(x - m)` with its sum, scaling.
//!
//! The instruction set is detected once per process ([`simd_level`]); AVX2+FMA on x86-64, a
//! portable scalar path elsewhere. Both evaluate the same range reduction and polynomial, so
//! they differ only by FMA rounding. What this leaves out: AVX-512 and NEON paths (the scalar
//! path is what aarch64 runs today).
//!
//! # The `exp` used here
//! Cephes' `expf`: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for `e^r`, and
//! `2^n` built in the exponent bits. Measured against f64 `exp` over `[-87.3, 88.3]` the relative
//! error is below 2.5e-7 (about 2 ulp; the test `exp_error_bound` checks it). Inputs below
//! -87.33654 (results under `f32::MIN_POSITIVE`) give exactly 0 (subnormals are flushed, so
//! they never slow the loop), inputs above 88.37626 give `+inf`, NaN gives NaN. Softmax only
//! feeds it `x - max(x) ≤ 0`.

use std::sync::OnceLock;

/// The SIMD instruction set the kernels use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    /// x86-64 with AVX2 and FMA: 8 lanes of f32.
    Avx2Fma,
    /// Portable scalar code.
    Scalar,
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SimdLevel::Avx2Fma => "avx2+fma",
            SimdLevel::Scalar => "scalar",
        })
    }
}

/// The SIMD level detected on this machine (once per process). Setting the environment variable
/// `ATTN_SIMD=scalar` before the first call forces the scalar path, for testing and comparison.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var("ATTN_SIMD").is_ok_and(|v| v == "scalar") {
            return SimdLevel::Scalar;
        }
        detect()
    })
}

fn detect() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return SimdLevel::Avx2Fma;
        }
    }
    SimdLevel::Scalar
}

const EXP_HI: f32 = 88.376_26;
const EXP_LO: f32 = -87.336_54;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;

/// `e^x` in f32 by the scalar path of the vectorised kernel (same reduction and polynomial).
#[inline]
pub fn exp_scalar(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < EXP_LO {
        return 0.0;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = (((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5) * z + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// `max(row)`, or `-inf` for an empty row. NaN elements may or may not win; callers that must
/// propagate NaN rely on `exp(NaN) = NaN` in [`exp_sub_sum`].
#[inline]
pub fn row_max(row: &[f32]) -> f32 {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::row_max(row) },
        _ => scalar::row_max(row),
    }
}

/// Replaces each `x` of `row` by `exp(x - m)` and returns the sum of the results.
#[inline]
pub fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::exp_sub_sum(row, m) },
        _ => scalar::exp_sub_sum(row, m),
    }
}

/// `row[i] *= alpha`.
#[inline]
pub fn scale_row(row: &mut [f32], alpha: f32) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::scale_row(row, alpha) },
        _ => scalar::scale_row(row, alpha),
    }
}

/// `dst[i] = src[i] * alpha`.
#[inline]
pub fn scale_into(dst: &mut [f32], src: &[f32], alpha: f32) {
    debug_assert_eq!(dst.len(), src.len());
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::scale_into(dst, src, alpha) },
        _ => scalar::scale_into(dst, src, alpha),
    }
}

/// The portable bodies of the row primitives: what [`SimdLevel::Scalar`] runs, and what the
/// tests compare on every machine whatever its level.
mod scalar {
    use super::exp_scalar;

    pub(super) fn row_max(row: &[f32]) -> f32 {
        row.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }

    pub(super) fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            *x = exp_scalar(*x - m);
            sum += *x;
        }
        sum
    }

    pub(super) fn scale_row(row: &mut [f32], alpha: f32) {
        row.iter_mut().for_each(|x| *x *= alpha);
    }

    pub(super) fn scale_into(dst: &mut [f32], src: &[f32], alpha: f32) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s * alpha);
    }
}

/// `e^x` for each element, through the dispatched path (for tests and `attn check`).
pub fn exp_slice(xs: &mut [f32]) {
    exp_sub_sum(xs, 0.0);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2+FMA bodies of the row primitives; each function requires both features.
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        // Round-to-nearest `n = round(x·log2 e)` by the magic-number trick: adding 1.5·2^23
        // leaves `n` in the low mantissa bits of `z`, which also give `2^n` by one shift.
        // Lanes outside [EXP_LO, EXP_HI] compute garbage that the two masks below replace;
        // NaN stays NaN through every step.
        let magic = _mm256_set1_ps(12_582_912.0);
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), magic);
        let n = _mm256_sub_ps(z, magic);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let r2 = _mm256_mul_ps(r, r);
        let mut p = _mm256_set1_ps(P0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
        p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let pow2 = _mm256_castsi256_ps(_mm256_add_epi32(
            _mm256_slli_epi32::<23>(_mm256_castps_si256(z)),
            _mm256_set1_epi32(127 << 23),
        ));
        let y = _mm256_mul_ps(p, pow2);
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
        let overflow = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXP_HI));
        let y = _mm256_andnot_ps(underflow, y);
        _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), overflow)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_max_ps(lo, hi);
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn row_max(row: &[f32]) -> f32 {
        let chunks = row.chunks_exact(8);
        let tail = chunks.remainder();
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in chunks {
            // SAFETY: `c` has exactly 8 elements.
            let x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            m = _mm256_max_ps(m, x);
        }
        tail.iter().fold(hmax(m), |m, &x| if x > m { x } else { m })
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
        let mv = _mm256_set1_ps(m);
        // Two independent chains of 8 lanes give the out-of-order core work to overlap.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut pairs = row.chunks_exact_mut(16);
        for c in &mut pairs {
            // SAFETY: `c` has exactly 16 elements.
            unsafe {
                let e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
                let e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr().add(8)), mv));
                _mm256_storeu_ps(c.as_mut_ptr(), e0);
                _mm256_storeu_ps(c.as_mut_ptr().add(8), e1);
                acc0 = _mm256_add_ps(acc0, e0);
                acc1 = _mm256_add_ps(acc1, e1);
            }
        }
        let mut acc = _mm256_add_ps(acc0, acc1);
        let mut chunks = pairs.into_remainder().chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` has exactly 8 elements.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            // The tail goes through the same 8-lane code on a padded copy, so every element of a
            // row sees the same arithmetic.
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..tail.len()].copy_from_slice(tail);
            // SAFETY: `buf` has 8 elements.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), mv));
                _mm256_storeu_ps(buf.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
            tail.copy_from_slice(&buf[..tail.len()]);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scale_row(row: &mut [f32], alpha: f32) {
        let a = _mm256_set1_ps(alpha);
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` has exactly 8 elements.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), a)) };
        }
        chunks.into_remainder().iter_mut().for_each(|x| *x *= alpha);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scale_into(dst: &mut [f32], src: &[f32], alpha: f32) {
        let a = _mm256_set1_ps(alpha);
        let mut d = dst.chunks_exact_mut(8);
        let mut s = src.chunks_exact(8);
        for (dc, sc) in (&mut d).zip(&mut s) {
            // SAFETY: both chunks have exactly 8 elements.
            unsafe { _mm256_storeu_ps(dc.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(sc.as_ptr()), a)) };
        }
        d.into_remainder()
            .iter_mut()
            .zip(s.remainder())
            .for_each(|(d, &s)| *d = s * alpha);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(got: f32, want: f64) -> f64 {
        ((got as f64 - want) / want).abs()
    }

    #[test]
    fn exp_error_bound() {
        let n = 200_001;
        let xs: Vec<f32> = (0..n)
            .map(|i| -87.3 + (88.3 + 87.3) * i as f32 / (n - 1) as f32)
            .collect();
        let mut ys = xs.clone();
        exp_slice(&mut ys);
        let mut worst = 0.0f64;
        for (&x, &y) in xs.iter().zip(&ys) {
            worst = worst.max(rel_err(y, (x as f64).exp()));
            worst = worst.max(rel_err(exp_scalar(x), (x as f64).exp()));
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_edges() {
        let mut xs = [
            f32::NEG_INFINITY,
            -1e30,
            -88.0,
            0.0,
            89.0,
            f32::INFINITY,
            f32::NAN,
            -0.0,
            1.0,
        ];
        exp_slice(&mut xs);
        assert_eq!(&xs[..6], &[0.0, 0.0, 0.0, 1.0, f32::INFINITY, f32::INFINITY]);
        assert!(xs[6].is_nan());
        assert_eq!(xs[7], 1.0);
        assert!(rel_err(xs[8], 1f64.exp()) < 2.5e-7);
        assert!(exp_scalar(f32::NAN).is_nan());
        assert_eq!(exp_scalar(-100.0), 0.0);
    }

    /// The row primitives of one level, as plain function pointers.
    struct Level {
        name: &'static str,
        row_max: fn(&[f32]) -> f32,
        exp_sub_sum: fn(&mut [f32], f32) -> f32,
        scale_row: fn(&mut [f32], f32),
        scale_into: fn(&mut [f32], &[f32], f32),
    }

    /// Every level this CPU can run: the scalar bodies always, AVX2+FMA when detected.
    fn levels() -> Vec<Level> {
        let mut levels = vec![Level {
            name: "scalar",
            row_max: scalar::row_max,
            exp_sub_sum: scalar::exp_sub_sum,
            scale_row: scalar::scale_row,
            scale_into: scalar::scale_into,
        }];
        #[cfg(target_arch = "x86_64")]
        if detect() == SimdLevel::Avx2Fma {
            levels.push(Level {
                name: "avx2+fma",
                // SAFETY: AVX2 and FMA were just detected (for this and the three below).
                row_max: |row| unsafe { avx2::row_max(row) },
                // SAFETY: as above.
                exp_sub_sum: |row, m| unsafe { avx2::exp_sub_sum(row, m) },
                // SAFETY: as above.
                scale_row: |row, alpha| unsafe { avx2::scale_row(row, alpha) },
                // SAFETY: as above.
                scale_into: |dst, src, alpha| unsafe { avx2::scale_into(dst, src, alpha) },
            });
        }
        levels
    }

    /// Each primitive at every level against its definition in f64, on lengths around the
    /// vector width (tails included).
    #[test]
    fn row_primitives_match_their_definitions_at_every_level() {
        for level in levels() {
            let name = level.name;
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65] {
                let row: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
                let want_max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!((level.row_max)(&row), want_max, "{name} len {len}");
                let mut e = row.clone();
                let s = (level.exp_sub_sum)(&mut e, want_max);
                let mut want_sum = 0.0f64;
                for (i, &x) in row.iter().enumerate() {
                    let w = ((x - want_max) as f64).exp();
                    want_sum += w;
                    assert!(rel_err(e[i], w) < 3e-7, "{name} len {len} i {i}");
                }
                if len > 0 {
                    assert!(rel_err(s, want_sum) < 1e-6, "{name} len {len}");
                } else {
                    assert_eq!(s, 0.0);
                }
                let mut scaled = row.clone();
                (level.scale_row)(&mut scaled, 0.3);
                let mut into = vec![0.0; len];
                (level.scale_into)(&mut into, &row, 0.3);
                for i in 0..len {
                    assert_eq!(scaled[i], row[i] * 0.3, "{name} len {len}");
                    assert_eq!(into[i], row[i] * 0.3, "{name} len {len}");
                }
            }
            // The maximum is found wherever it stands, and -inf rows stay -inf.
            let mut row = vec![-3.0f32; 19];
            for at in [0, 8, 18] {
                row[at] = 2.5;
                assert_eq!((level.row_max)(&row), 2.5, "{name} max at {at}");
                row[at] = -3.0;
            }
            assert_eq!((level.row_max)(&[f32::NEG_INFINITY; 9]), f32::NEG_INFINITY, "{name}");
        }
    }

    /// The dispatcher runs the level it reports: `exp_sub_sum`'s sum (a different order of
    /// additions, and FMA, per level) has the bits of that level's body.
    #[test]
    fn dispatch_runs_the_reported_level() {
        let row: Vec<f32> = (0..67).map(|i| ((i * 29 % 13) as f32 - 6.0) * 0.37).collect();
        let level = levels()
            .into_iter()
            .find(|l| l.name == simd_level().to_string())
            .expect("the reported level is one this CPU runs");
        let (mut a, mut b) = (row.clone(), row.clone());
        let want = (level.exp_sub_sum)(&mut a, 1.5);
        assert_eq!(exp_sub_sum(&mut b, 1.5).to_bits(), want.to_bits(), "{}", level.name);
        assert_eq!(a, b, "{}", level.name);
    }
}
