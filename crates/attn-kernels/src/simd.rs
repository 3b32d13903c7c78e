//! Row primitives with run-time SIMD dispatch: max, `exp(x - m)` with its sum, scaling.
//!
//! The instruction set is detected once per process ([`simd_level`]): AVX-512 (F, BW, VL, DQ) or
//! AVX2+FMA on x86-64, a portable scalar path elsewhere. The vector bodies are written once over
//! the vector width (`lanes.rs`) and instantiated per level; all levels evaluate the same range
//! reduction and polynomial, so they differ only by FMA rounding and how a sum is split across
//! lanes. What this leaves out: a NEON path (the scalar path is what aarch64 runs today).
//!
//! # The `exp` used here
//! Cephes' reduction `x = n·ln2 + r` with `|r| ≤ ln2/2` (`ln2` in two parts), a degree-5
//! minimax polynomial for `e^r` (Cephes' `expf` uses degree 7; PyTorch's vectorised CPU `exp`
//! is about 20 ulp), and `2^n` built in the exponent bits (one `vscalefps` at AVX-512, the
//! same exact scaling, so both vector levels give the same bits): 14 vector operations at
//! AVX2 where the degree-7 form with an overflow blend took 18. Measured against f64 `exp` over
//! `[-87.3, 88.3]` the relative error is below 2.5e-7 (about 2 ulp; the test
//! `exp_error_bound` checks it). Softmax's `exp(x - max)` skips the `+inf` blend, which
//! cannot fire for `x - max ≤ 0`, and at the vector levels takes `ln 2` as one f32 in a single
//! FMA (`lanes::softmax_exp`): 13% less time per element on Zen 3, for a relative error below
//! 2.1e-7 on `[−20, 0]` and 4e-7 down to -87.3 (`softmax_exp_error_bound`). It also scales
//! as `2^n + (r·2^n)·q`, one FMA whose product is ready before the polynomial `q` is, where the
//! general `exp` multiplies `1 + r·q` by `2^n` after it (a dependent step less, one rounding
//! less; the same bits at both vector levels), and AVX2's row loop runs one chain where AVX-512
//! runs two (AVX2's 16 registers hold one chain and its constants, not two): together 0.292
//! against 0.358 ns per element on rows of 128, 0.249 against 0.305 on rows of 4096 (Zen 3,
//! `examples/exp_speed.rs`). Scaling by `2^n` with an integer add into the exponent field
//! instead of a multiply (exact for the normal results softmax keeps) measured 0.342 against
//! 0.355 ns per element, about 0.5% of the forward, once the add was kept from turning NaNs
//! into numbers; not kept. Folding `log2 e`
//! into the query scale, as FlashAttention does on GPUs, would also drop that FMA (`2^f` of the
//! exact `f = t − round(t)`): 0.270 ns per element against 0.326 in a scratch loop (not kept; Zen 3),
//! about 1% of the flash forward, for scores in base 2 through the masks, the kept scores and
//! the LSE; not done. Inputs below
//! -87.33654 (results under `f32::MIN_POSITIVE`) give exactly 0 (subnormals are flushed, so
//! they never slow the loop), inputs above 88.37626 give `+inf`, NaN gives NaN. Softmax only
//! feeds it `x - max(x) ≤ 0`.

use std::sync::OnceLock;

use crate::error::KernelError;
use crate::exp_poly::{E1, E2, E3, E4, E5, EXP_HI, EXP_LO, LN2_HI, LN2_LO, LOG2E};

/// The SIMD instruction set the kernels use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    /// x86-64 with AVX-512 F, BW, VL and DQ (and AVX2+FMA): 16 lanes of f32.
    Avx512,
    /// x86-64 with AVX2 and FMA: 8 lanes of f32.
    Avx2Fma,
    /// Portable scalar code.
    Scalar,
}

impl SimdLevel {
    /// Whether the vector micro-kernels run (every level but scalar).
    pub fn is_vector(self) -> bool {
        self != SimdLevel::Scalar
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx2Fma => "avx2+fma",
            SimdLevel::Scalar => "scalar",
        })
    }
}

/// The SIMD level the kernels use (decided once per process): the best this machine has, or a
/// lower one named by the environment variable `ATTN_SIMD` (`scalar`, `avx2` or `avx512`) before
/// the first call, for testing and comparison. A level above the machine's leaves the machine's
/// level; so does a value that names no level (a program that wants it refused calls
/// [`requested_simd_level`] first, as the `attn` command does).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| capped(detect(), std::env::var("ATTN_SIMD").ok().as_deref()))
}

/// The values `ATTN_SIMD` accepts. `avx512bf16` is the `avx512` f32 level with the bf16 dot
/// products of AVX512-BF16 ([`bf16_level`]), `amx` that with AMX's tile products for
/// [`crate::gemm_bf16`]; the three others leave bf16 off.
pub const SIMD_LEVEL_NAMES: [&str; 5] = ["scalar", "avx2", "avx512", "avx512bf16", "amx"];

/// The bf16 instructions the bf16 kernels use on this machine ([`bf16_level`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Level {
    /// AMX-BF16 (with AVX512-BF16 and the `avx512` f32 level): [`crate::gemm_bf16`], the bf16
    /// weight gradient and the flash kernel's prefill products on `tdpbf16ps`, 8,192 bf16
    /// products per instruction; everything else as `Avx512Bf16`.
    Amx,
    /// AVX512-BF16 (with the `avx512` f32 level): `vdpbf16ps`, 32 bf16 products per instruction,
    /// and the conversions. On Intel, where `vdpbf16ps` runs at half the f32 FMA rate,
    /// [`crate::gemm_bf16`] multiplies the bf16 values on FMAs instead ([`crate::gemm_bf16_route`]).
    Avx512Bf16,
    /// No bf16 instructions: bf16 work runs in f32 on the bf16-rounded values.
    None,
}

impl std::fmt::Display for Bf16Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bf16Level::Amx => "amx",
            Bf16Level::Avx512Bf16 => "avx512bf16",
            Bf16Level::None => "none",
        })
    }
}

impl Bf16Level {
    /// Whether the AVX512-BF16 kernels run (at `Avx512Bf16` and at `Amx`).
    pub fn has_avx512bf16(self) -> bool {
        self != Bf16Level::None
    }
}

/// The bf16 level the kernels use (decided once per process): AMX when the CPU has AMX-TILE,
/// AMX-BF16 and AVX512-BF16 and Linux grants the tile state, else AVX512-BF16 when the CPU has
/// it and the f32 level is `avx512`; `ATTN_SIMD` lowers it: `avx512bf16` leaves AMX off, and the
/// levels without bf16 (`scalar`, `avx2`, `avx512`) turn bf16 off.
pub fn bf16_level() -> Bf16Level {
    static LEVEL: OnceLock<Bf16Level> = OnceLock::new();
    *LEVEL.get_or_init(|| capped_bf16(detect_bf16(), std::env::var("ATTN_SIMD").ok().as_deref()))
}

/// `detected`, or none when `request` names a level without bf16.
fn capped_bf16(detected: Bf16Level, request: Option<&str>) -> Bf16Level {
    match request {
        Some("scalar" | "avx2" | "avx512") => Bf16Level::None,
        Some("avx512bf16") if detected == Bf16Level::Amx => Bf16Level::Avx512Bf16,
        _ => detected,
    }
}

/// The bf16 level this CPU runs.
pub(crate) fn detect_bf16() -> Bf16Level {
    #[cfg(target_arch = "x86_64")]
    if detect() == SimdLevel::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16") {
        if crate::bf16::amx::available() {
            return Bf16Level::Amx;
        }
        return Bf16Level::Avx512Bf16;
    }
    Bf16Level::None
}

/// The level the environment variable `ATTN_SIMD` names: `Ok(None)` when it is unset or empty,
/// an [`KernelError::InvalidArgument`] naming the accepted values when it names no level.
pub fn requested_simd_level() -> Result<Option<SimdLevel>, KernelError> {
    let expected = "one of scalar, avx2, avx512, avx512bf16, amx";
    env_choice(
        ("simd_level", "ATTN_SIMD", expected),
        std::env::var("ATTN_SIMD"),
        parse_level,
    )
}

/// The value of an environment variable that names one of a few choices (`(op, name,
/// expected)`), as `parse` reads it: `Ok(None)` when it is unset or empty, an
/// [`KernelError::InvalidArgument`] naming the variable, its value and `expected` when `parse`
/// knows no such name or the value is not UTF-8.
pub(crate) fn env_choice<T>(
    (op, what, expected): (&'static str, &'static str, &'static str),
    var: Result<String, std::env::VarError>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, KernelError> {
    let got = match var {
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Ok(text) if text.is_empty() => return Ok(None),
        Ok(text) => match parse(&text) {
            Some(choice) => return Ok(Some(choice)),
            None => format!("{text:?}"),
        },
        Err(std::env::VarError::NotUnicode(text)) => format!("{text:?}"),
    };
    Err(KernelError::InvalidArgument {
        op,
        what,
        got,
        expected,
    })
}

fn parse_level(text: &str) -> Option<SimdLevel> {
    match text {
        "scalar" => Some(SimdLevel::Scalar),
        "avx2" => Some(SimdLevel::Avx2Fma),
        "avx512" | "avx512bf16" | "amx" => Some(SimdLevel::Avx512),
        _ => None,
    }
}

/// `detected`, or the lower level `request` names.
fn capped(detected: SimdLevel, request: Option<&str>) -> SimdLevel {
    let rank = |l: SimdLevel| match l {
        SimdLevel::Scalar => 0,
        SimdLevel::Avx2Fma => 1,
        SimdLevel::Avx512 => 2,
    };
    let Some(wanted) = request.and_then(parse_level) else {
        return detected;
    };
    if rank(wanted) < rank(detected) {
        wanted
    } else {
        detected
    }
}

/// The best level this CPU runs.
pub(crate) fn detect() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            return SimdLevel::Avx512;
        }
        if avx2 {
            return SimdLevel::Avx2Fma;
        }
    }
    SimdLevel::Scalar
}

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
    let p = ((((E5 * r + E4) * r + E3) * r + E2) * r + E1) * r + 1.0;
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::row_max(row) },
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::exp_sub_sum(row, m) },
        _ => scalar::exp_sub_sum(row, m),
    }
}

/// Replaces each `x` of `row` by `exp((x - m) - lo)` and returns the sum: [`exp_sub_sum`] for a
/// shift held as two floats (the backward's `lse` and `lse_lo`).
#[inline]
pub(crate) fn exp_sub2_sum(row: &mut [f32], m: f32, lo: f32) -> f32 {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::exp_sub2_sum(row, m, lo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::exp_sub2_sum(row, m, lo) },
        _ => scalar::exp_sub2_sum(row, m, lo),
    }
}

/// `row[i] *= alpha`.
#[inline]
pub fn scale_row(row: &mut [f32], alpha: f32) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::scale_row(row, alpha) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::scale_row(row, alpha) },
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::scale_into(dst, src, alpha) },
        _ => scalar::scale_into(dst, src, alpha),
    }
}

/// `dst[i] = src[i] * alpha`, and whether every `dst[i]` is finite (an output row of the flash
/// kernel and its check for the non-finite repair, in one pass).
#[inline]
pub(crate) fn scale_into_finite(dst: &mut [f32], src: &[f32], alpha: f32) -> bool {
    debug_assert_eq!(dst.len(), src.len());
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::scale_into_finite(dst, src, alpha) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::scale_into_finite(dst, src, alpha) },
        _ => scalar::scale_into_finite(dst, src, alpha),
    }
}

/// The softmax's backward on one row: `p[i] = p[i]·(dp[i] − delta)`, 0 where `p[i]` is 0.
#[inline]
pub(crate) fn softmax_grad_row(p: &mut [f32], dp: &[f32], delta: f32) {
    debug_assert_eq!(p.len(), dp.len());
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::softmax_grad_row(p, dp, delta) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::softmax_grad_row(p, dp, delta) },
        _ => p
            .iter_mut()
            .zip(dp)
            .for_each(|(p, &d)| *p = if *p == 0.0 { 0.0 } else { *p * (d - delta) }),
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

    pub(super) fn exp_sub2_sum(row: &mut [f32], m: f32, lo: f32) -> f32 {
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            *x = exp_scalar((*x - m) - lo);
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

    pub(super) fn scale_into_finite(dst: &mut [f32], src: &[f32], alpha: f32) -> bool {
        let mut finite = true;
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s * alpha;
            finite &= d.is_finite();
        }
        finite
    }
}

/// `e^x` for each element, through the dispatched path (for tests and `attn check`): the
/// vector `exp` with its `+inf` blend, which softmax's `exp(x - max)` leaves out.
pub fn exp_slice(xs: &mut [f32]) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2Fma` is only returned when the CPU reports AVX2 and FMA.
        SimdLevel::Avx2Fma => unsafe { avx2::exp_in_place(xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only returned when the CPU reports AVX-512 F/BW/VL/DQ.
        SimdLevel::Avx512 => unsafe { avx512::exp_in_place(xs) },
        _ => xs.iter_mut().for_each(|x| *x = exp_scalar(*x)),
    }
}

/// The entry points of one vector level: `#[target_feature]` functions that instantiate the
/// width-generic bodies of `lanes.rs` with that level's [`Lanes`](crate::lanes::Lanes).
macro_rules! vector_level {
    ($module:ident, $lanes:ty, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        pub(crate) mod $module {
            //! Row primitives at this level; each function requires the level's features.
            use crate::lanes;

            #[target_feature(enable = $features)]
            pub(crate) fn row_max(row: &[f32]) -> f32 {
                // SAFETY: the features `lanes` needs are enabled on this function.
                unsafe { lanes::row_max::<$lanes>(row) }
            }

            #[target_feature(enable = $features)]
            pub(crate) fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
                // SAFETY: as above.
                unsafe { lanes::exp_sub_sum::<$lanes>(row, m) }
            }

            #[target_feature(enable = $features)]
            pub(crate) fn exp_sub2_sum(row: &mut [f32], m: f32, lo: f32) -> f32 {
                // SAFETY: as above.
                unsafe { lanes::exp_sub2_sum::<$lanes>(row, m, lo) }
            }

            #[target_feature(enable = $features)]
            pub(crate) fn softmax_grad_row(p: &mut [f32], dp: &[f32], delta: f32) {
                // SAFETY: as above.
                unsafe { lanes::softmax_grad_row::<$lanes>(p, dp, delta) }
            }

            #[target_feature(enable = $features)]
            pub(crate) fn exp_in_place(xs: &mut [f32]) {
                // SAFETY: as above.
                unsafe { lanes::exp_in_place::<$lanes>(xs) }
            }

            #[target_feature(enable = $features)]
            pub(crate) fn scale_row(row: &mut [f32], alpha: f32) {
                // SAFETY: as above.
                unsafe { lanes::scale_row::<$lanes>(row, alpha) }
            }

            #[target_feature(enable = $features)]
            pub(crate) fn scale_into(dst: &mut [f32], src: &[f32], alpha: f32) {
                // SAFETY: as above.
                unsafe { lanes::scale_into::<$lanes>(dst, src, alpha) }
            }

            #[target_feature(enable = $features)]
            pub(crate) fn scale_into_finite(dst: &mut [f32], src: &[f32], alpha: f32) -> bool {
                // SAFETY: as above.
                unsafe { lanes::scale_into_finite::<$lanes>(dst, src, alpha) }
            }
        }
    };
}

vector_level!(avx2, lanes::Avx2, "avx2,fma");
vector_level!(avx512, lanes::Avx512, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma");

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

    /// Softmax's `exp(x − m)` at every level against f64 over its whole range, `EXP_LO` to 0 in
    /// steps of about 1e-4: the vector levels reduce with `ln 2` as one f32 (measured 2.0e-7 on
    /// `[−20, 0]` and 3.9e-7 at −86.35, where `n·(ln 2 − LN2)` adds 2.4e-7), the scalar level
    /// with it split (1.7e-7, `exp_scalar`).
    #[test]
    fn softmax_exp_error_bound() {
        let xs: Vec<f32> = (0..873_366).map(|i| -(i as f32) * 1e-4).chain([EXP_LO]).collect();
        for level in levels() {
            let mut ys = xs.clone();
            (level.exp_sub_sum)(&mut ys, 0.0);
            let (mut near, mut far) = (0.0f64, 0.0f64);
            for (&x, &y) in xs.iter().zip(&ys) {
                let err = rel_err(y, (x as f64).exp());
                if x >= -20.0 {
                    near = near.max(err);
                } else {
                    far = far.max(err);
                }
            }
            assert!(
                near < 2.1e-7,
                "{}: worst relative error on [-20, 0] {near:e}",
                level.name
            );
            assert!(far < 4e-7, "{}: worst relative error below -20 {far:e}", level.name);
        }
    }

    #[test]
    fn scale_into_finite_has_the_scalar_bits_and_flag() {
        for n in 0..70 {
            let src: Vec<f32> = (0..n).map(|i| (i as f32 - 20.0) * 1.7e37 / 40.0 + 0.3).collect();
            // Every position spoiled in turn by an infinity, a NaN, or a product that
            // overflows; and the row untouched.
            let mut cases = vec![(src.clone(), 2.0)];
            for at in 0..n {
                for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 3e38] {
                    let mut row = src.clone();
                    row[at] = bad;
                    cases.push((row, 2.0));
                }
            }
            for (row, alpha) in cases {
                let mut want = vec![0.0; n];
                let want_finite = scalar::scale_into_finite(&mut want, &row, alpha);
                let mut got = vec![0.0; n];
                let got_finite = scale_into_finite(&mut got, &row, alpha);
                assert_eq!(got_finite, want_finite, "{} n {n}: {row:?}", simd_level());
                assert_eq!(want_finite, want.iter().all(|x| x.is_finite()));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{} n {n}", simd_level());
            }
        }
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

    /// NaN stays NaN in softmax's exp at every level, whatever its payload and sign: the
    /// payload rides through the rounding into the bits `2^n` is built from, so a scaling that
    /// added them to the result's exponent would turn some NaNs into finite numbers (a row that
    /// should spread NaN summing to a confident value), as a tried exponent add did.
    #[test]
    fn softmax_exp_keeps_every_nan() {
        let payloads = [0, 1, 0x7f, 0x80, 0x123, 0x1ff, 0x3f_ffff];
        let nans: Vec<f32> = payloads
            .iter()
            .flat_map(|&p| [0x7fc0_0000 | p, 0xffc0_0000 | p, 0x7f80_0000 | p.max(1)])
            .map(f32::from_bits)
            .collect();
        assert!(nans.iter().all(|x| x.is_nan()));
        for level in levels() {
            let mut row = nans.clone();
            let sum = (level.exp_sub_sum)(&mut row, 0.0);
            for (x, y) in nans.iter().zip(&row) {
                assert!(
                    y.is_nan(),
                    "{}: exp of NaN {:#010x} gave {y:e}",
                    level.name,
                    x.to_bits()
                );
            }
            assert!(sum.is_nan(), "{}: sum {sum:e}", level.name);
            let mut row = nans.clone();
            (level.exp_sub2_sum)(&mut row, 0.0, 1e-8);
            assert!(row.iter().all(|y| y.is_nan()), "{}: exp_sub2_sum {row:?}", level.name);
        }
    }

    /// The row primitives of one level, as plain function pointers.
    struct Level {
        name: &'static str,
        row_max: fn(&[f32]) -> f32,
        exp_sub_sum: fn(&mut [f32], f32) -> f32,
        exp_sub2_sum: fn(&mut [f32], f32, f32) -> f32,
        scale_row: fn(&mut [f32], f32),
        scale_into: fn(&mut [f32], &[f32], f32),
    }

    /// Every level this CPU can run: the scalar bodies always, AVX2+FMA and AVX-512 when
    /// detected.
    fn levels() -> Vec<Level> {
        let mut levels = vec![Level {
            name: "scalar",
            row_max: scalar::row_max,
            exp_sub_sum: scalar::exp_sub_sum,
            exp_sub2_sum: scalar::exp_sub2_sum,
            scale_row: scalar::scale_row,
            scale_into: scalar::scale_into,
        }];
        #[cfg(target_arch = "x86_64")]
        if detect() != SimdLevel::Scalar {
            levels.push(Level {
                name: "avx2+fma",
                // SAFETY: AVX2 and FMA were just detected (for this and the three below).
                row_max: |row| unsafe { avx2::row_max(row) },
                // SAFETY: as above.
                exp_sub_sum: |row, m| unsafe { avx2::exp_sub_sum(row, m) },
                // SAFETY: as above.
                exp_sub2_sum: |row, m, lo| unsafe { avx2::exp_sub2_sum(row, m, lo) },
                // SAFETY: as above.
                scale_row: |row, alpha| unsafe { avx2::scale_row(row, alpha) },
                // SAFETY: as above.
                scale_into: |dst, src, alpha| unsafe { avx2::scale_into(dst, src, alpha) },
            });
        }
        #[cfg(target_arch = "x86_64")]
        if detect() == SimdLevel::Avx512 {
            levels.push(Level {
                name: "avx512",
                // SAFETY: AVX-512 F/BW/VL/DQ were just detected (for this and the three below).
                row_max: |row| unsafe { avx512::row_max(row) },
                // SAFETY: as above.
                exp_sub_sum: |row, m| unsafe { avx512::exp_sub_sum(row, m) },
                // SAFETY: as above.
                exp_sub2_sum: |row, m, lo| unsafe { avx512::exp_sub2_sum(row, m, lo) },
                // SAFETY: as above.
                scale_row: |row, alpha| unsafe { avx512::scale_row(row, alpha) },
                // SAFETY: as above.
                scale_into: |dst, src, alpha| unsafe { avx512::scale_into(dst, src, alpha) },
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

    /// The vector levels' row tails (masked loads and stores) read and write only the row, and
    /// give each tail element the bits it gets in a whole vector: every primitive on rows of
    /// every length up to three vectors, inside a buffer whose guard values around the row must
    /// come back untouched (and, for the maximum, must not win), against the same row padded to
    /// whole vectors.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_tails_touch_only_the_row_and_match_whole_vectors() {
        type Prims = (
            fn(&mut [f32], f32) -> f32,
            fn(&mut [f32], f32, f32) -> f32,
            fn(&mut [f32]),
            fn(&mut [f32], f32),
            fn(&mut [f32], &[f32], f32),
            fn(&mut [f32], &[f32], f32) -> bool,
            fn(&mut [f32], &[f32], f32),
            fn(&[f32]) -> f32,
        );
        // The primitives of the level module `$m`, whose features the caller has detected.
        macro_rules! prims {
            ($m:ident) => {
                (
                    // SAFETY: the caller detected the features of `$m` (and for each closure below).
                    |r, m| unsafe { $m::exp_sub_sum(r, m) },
                    // SAFETY: as above.
                    |r, m, lo| unsafe { $m::exp_sub2_sum(r, m, lo) },
                    // SAFETY: as above.
                    |r| unsafe { $m::exp_in_place(r) },
                    // SAFETY: as above.
                    |r, a| unsafe { $m::scale_row(r, a) },
                    // SAFETY: as above.
                    |d, s, a| unsafe { $m::scale_into(d, s, a) },
                    // SAFETY: as above.
                    |d, s, a| unsafe { $m::scale_into_finite(d, s, a) },
                    // SAFETY: as above.
                    |p, dp, delta| unsafe { $m::softmax_grad_row(p, dp, delta) },
                    // SAFETY: as above.
                    |r| unsafe { $m::row_max(r) },
                )
            };
        }
        let mut levels: Vec<(&str, usize, Prims)> = Vec::new();
        if detect() != SimdLevel::Scalar {
            levels.push(("avx2+fma", 8, prims!(avx2)));
        }
        if detect() == SimdLevel::Avx512 {
            levels.push(("avx512", 16, prims!(avx512)));
        } else {
            eprintln!("note: no AVX-512 here; its masked tails are not checked");
        }
        const GUARD: f32 = -7.25;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (name, n, (exp_sub_sum, exp_sub2_sum, exp_in_place, scale_row, scale_into, finite, grad, row_max)) in levels
        {
            for len in 0..=3 * n {
                let whole = len.div_ceil(n) * n;
                let row: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
                let other: Vec<f32> = (0..len).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.45).collect();
                // `f(buffer, padded)`: runs one primitive on the row in place inside guards,
                // and on a copy padded to whole vectors with `pad`.
                let check = |what: &str, pad: f32, f: &dyn Fn(&mut [f32])| {
                    let mut buf = vec![GUARD; len + 2 * n];
                    buf[n..n + len].copy_from_slice(&row);
                    f(&mut buf[n..n + len]);
                    assert!(
                        buf[..n].iter().chain(&buf[n + len..]).all(|&x| x == GUARD),
                        "{name} {what} len {len}: wrote outside the row"
                    );
                    let mut padded = row.clone();
                    padded.resize(whole, pad);
                    f(&mut padded);
                    assert_eq!(bits(&buf[n..n + len]), bits(&padded[..len]), "{name} {what} len {len}");
                };
                check("exp_sub_sum", f32::NEG_INFINITY, &|r| {
                    exp_sub_sum(r, 0.5);
                });
                check("exp_sub2_sum", f32::NEG_INFINITY, &|r| {
                    exp_sub2_sum(r, 0.5, 1e-8);
                });
                check("exp_in_place", 0.0, &|r| exp_in_place(r));
                check("scale_row", 0.0, &|r| scale_row(r, 0.3));
                check("scale_into", 0.0, &|r| {
                    let src: Vec<f32> = r.iter().map(|x| x + 1.0).collect();
                    scale_into(r, &src, 0.3);
                });
                check("scale_into_finite", 0.0, &|r| {
                    let src: Vec<f32> = r.iter().map(|x| x + 1.0).collect();
                    assert!(finite(r, &src, 0.3));
                });
                check("softmax_grad_row", 0.0, &|r| {
                    // Probabilities with some zeros, against `dp` padded as the row is.
                    r.iter_mut()
                        .for_each(|x| *x = if *x < 0.0 { 0.0 } else { x.exp() * 0.01 });
                    let dp: Vec<f32> = other
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(0.0))
                        .take(r.len())
                        .collect();
                    grad(r, &dp, 0.2);
                });
                // The maximum sees only the row, with larger values on both sides of it.
                let mut fenced = vec![1e30f32; len + 2 * n];
                fenced[n..n + len].copy_from_slice(&row);
                let want = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(row_max(&fenced[n..n + len]), want, "{name} row_max len {len}");
                // The sums over a tail count only the row's own elements.
                let mut a = row.clone();
                let sum = exp_sub_sum(&mut a, 0.5);
                let want: f64 = row.iter().map(|&x| ((x - 0.5) as f64).exp()).sum();
                assert!(
                    len == 0 && sum == 0.0 || rel_err(sum, want) < 1e-6,
                    "{name} sum len {len}"
                );
            }
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

    /// `ATTN_SIMD` names a level or nothing: each accepted name parses, a lower level caps the
    /// detected one, a higher one or an unknown value leaves it.
    #[test]
    fn requested_levels() {
        for name in SIMD_LEVEL_NAMES {
            assert!(parse_level(name).is_some(), "{name}");
        }
        assert_eq!(parse_level("AVX2"), None);
        assert_eq!(parse_level("sse"), None);
        assert_eq!(capped(SimdLevel::Avx512, Some("avx2")), SimdLevel::Avx2Fma);
        assert_eq!(capped(SimdLevel::Avx2Fma, Some("avx512")), SimdLevel::Avx2Fma);
        assert_eq!(capped(SimdLevel::Avx2Fma, Some("scalar")), SimdLevel::Scalar);
        assert_eq!(capped(SimdLevel::Avx512, Some("sse")), SimdLevel::Avx512);
        assert_eq!(capped(SimdLevel::Avx512, None), SimdLevel::Avx512);
        assert_eq!(capped(SimdLevel::Avx512, Some("avx512bf16")), SimdLevel::Avx512);
        assert_eq!(capped(SimdLevel::Avx2Fma, Some("avx512bf16")), SimdLevel::Avx2Fma);
        // bf16: the f32-only names turn it off, `avx512bf16` and nothing keep what was detected.
        for name in ["scalar", "avx2", "avx512"] {
            assert_eq!(
                capped_bf16(Bf16Level::Avx512Bf16, Some(name)),
                Bf16Level::None,
                "{name}"
            );
        }
        assert_eq!(
            capped_bf16(Bf16Level::Avx512Bf16, Some("avx512bf16")),
            Bf16Level::Avx512Bf16
        );
        assert_eq!(capped_bf16(Bf16Level::Avx512Bf16, None), Bf16Level::Avx512Bf16);
        assert_eq!(capped_bf16(Bf16Level::None, Some("avx512bf16")), Bf16Level::None);
        // AMX: `avx512bf16` lowers it to AVX512-BF16, `amx` and nothing keep it, and `amx`
        // cannot raise a lower level.
        assert_eq!(capped_bf16(Bf16Level::Amx, Some("avx512bf16")), Bf16Level::Avx512Bf16);
        assert_eq!(capped_bf16(Bf16Level::Amx, Some("amx")), Bf16Level::Amx);
        assert_eq!(capped_bf16(Bf16Level::Amx, None), Bf16Level::Amx);
        assert_eq!(capped_bf16(Bf16Level::Amx, Some("avx512")), Bf16Level::None);
        assert_eq!(capped_bf16(Bf16Level::Avx512Bf16, Some("amx")), Bf16Level::Avx512Bf16);
        assert_eq!(capped(SimdLevel::Avx512, Some("amx")), SimdLevel::Avx512);
    }

    /// The vector levels evaluate one formula with FMA, so their `exp` has the same bits
    /// everywhere: AVX-512 scales by `2^n` with `vscalefps`, AVX2 by building `2^n` and
    /// multiplying, both exact. Swept over the whole range in steps of about 1e-4, both ends,
    /// the subnormal and overflow edges, and special values.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_levels_have_the_same_exp_bits() {
        if detect() != SimdLevel::Avx512 {
            eprintln!("note: no AVX-512 here; the AVX2 exp is checked against its definition only");
            return;
        }
        let mut xs: Vec<f32> = (0..1_800_000).map(|i| -90.0 + i as f32 * 1e-4).collect();
        xs.extend([
            EXP_LO,
            EXP_LO.next_down(),
            EXP_LO.next_up(),
            EXP_HI,
            EXP_HI.next_down(),
            EXP_HI.next_up(),
            -0.0,
            0.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::MIN_POSITIVE,
        ]);
        let (mut a, mut b) = (xs.clone(), xs.clone());
        // SAFETY: AVX-512 (and with it AVX2 and FMA) was detected.
        unsafe {
            avx2::exp_in_place(&mut a);
            avx512::exp_in_place(&mut b);
        }
        for ((x, p), q) in xs.iter().zip(&a).zip(&b) {
            assert_eq!(p.to_bits(), q.to_bits(), "exp({x}): avx2 {p:e}, avx512 {q:e}");
        }
        // Softmax's exp (arguments at most 0; the sums add in different orders per width).
        let shifted: Vec<f32> = xs.iter().map(|x| x.min(0.0)).collect();
        let mut rows = (shifted.clone(), shifted);
        // SAFETY: as above.
        unsafe {
            avx2::exp_sub_sum(&mut rows.0, 0.0);
            avx512::exp_sub_sum(&mut rows.1, 0.0);
        }
        assert!(rows.0.iter().zip(&rows.1).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    /// `exp((x - m) - lo)` at every level: with `lo = 0` the bits of `exp_sub_sum`, and with a
    /// shift held as two floats (`m` near 300, `lo` its rounding error) within the exp's bound of
    /// the f64 value of `exp(x - (m + lo))`, on lengths around the vector width.
    #[test]
    fn exp_of_a_two_float_shift() {
        let m = 300.123_46f32;
        let lo = (300.123_456_789f64 - m as f64) as f32;
        for level in levels() {
            for len in [1, 7, 8, 15, 16, 17, 33, 64, 67] {
                let row: Vec<f32> = (0..len).map(|i| m - 0.37 * i as f32).collect();
                let (mut a, mut b) = (row.clone(), row.clone());
                let sum_a = (level.exp_sub_sum)(&mut a, m);
                let sum_b = (level.exp_sub2_sum)(&mut b, m, 0.0);
                assert_eq!(sum_a.to_bits(), sum_b.to_bits(), "{} len {len}", level.name);
                assert_eq!(a, b, "{} len {len}", level.name);
                let mut c = row.clone();
                (level.exp_sub2_sum)(&mut c, m, lo);
                for (i, (&got, &x)) in c.iter().zip(&row).enumerate() {
                    let want = (x as f64 - (m as f64 + lo as f64)).exp();
                    let err = (got as f64 - want).abs() / want;
                    assert!(
                        err < 5e-7,
                        "{} len {len} [{i}]: {got} vs {want} ({err:.1e})",
                        level.name
                    );
                }
            }
        }
    }
}
