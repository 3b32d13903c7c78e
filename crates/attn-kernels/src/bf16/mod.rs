//! bf16 matrix products with f32 accumulation: the right operand (a layer's weights) rounded to
//! bf16 and packed once ([`Bf16Panels`]), the left operand (activations) rounded to bf16 while it
//! is packed on each call, the products summed in f32 and written as f32 ([`gemm_bf16`]).
//!
//! # Arithmetic
//! bf16 keeps f32's exponent and 8 significant bits (7 stored), so rounding to nearest even
//! changes a value by at most `u = 2^-8` relative. The product of two bf16 values has at most 16 significant bits
//! and is exact in f32, so the only errors are the two input roundings and the f32 sums:
//! `|C_bf16 − A·B| ≤ (2u + u²)·Σ_p |a_p·b_p| + γ_K·Σ_p |â_p·b̂_p|`, with `γ_K ≈ K·2^-24` in the
//! worst case (`√K·2^-24` typically). The tests check the kernel against an f64 sum of the
//! rounded inputs with the second term, and against the f32 product with both.
//!
//! The product takes one of four routes ([`gemm_bf16_route`] names this CPU's). At the
//! AVX512-BF16 level ([`crate::Bf16Level::Avx512Bf16`]) on AMD the kernel is the flash tile's
//! shape, 8 rows × two zmm of columns: `vdpbf16ps` adds two products (`k` and `k + 1`) to each
//! f32 lane, so one instruction does the work of two FMAs, and the right operand is packed as
//! pairs of rows: `[N / 16 panels][K / 2 pairs][16 columns][2]`. `vdpbf16ps` treats bf16
//! subnormals (below 1.2e-38) as zero, and so does the conversion here ([`f32_to_bf16`]). At
//! the AMX level ([`crate::Bf16Level::Amx`]) the same panels are AMX B tiles as they are, and
//! `tdpbf16ps` adds 16 × 16 × 32 products per instruction into f32 tiles (`amx.rs`): the
//! same bound, another order of additions inside an instruction, so other last bits. At the
//! AVX512-BF16 level on Intel, and at the AVX-512 level without bf16 instructions, the panels
//! are widened to f32 as attn's own f32 GEMM packs them and the left operand is rounded as it
//! is packed, so the products run on FMAs: Intel's `vdpbf16ps` takes about four times an FMA's
//! issue slot for twice its products, half the f32 rate, where FMAs on the bf16 values keep
//! the f32 rate (and the weights' half-size storage). The bits are those of that GEMM on the
//! rounded values. Below AVX-512 the rounded values are copied into f32 and multiplied by
//! [`crate::gemm`]. Either way: the same bound, another order of additions.

use crate::{Accum, Bf16Level, KernelError, Par, View2, ViewMut2};

/// Columns per panel of [`Bf16Panels`] (one zmm of f32 lanes).
pub(crate) const PANEL: usize = 16;
/// Pairs of the depth per AMX step: one A tile row of 64 bytes, one B tile of 16 pair rows.
pub(crate) const AMX_STEP_PAIRS: usize = 16;
/// Rows of the left operand per parallel task.
const TASK_ROWS: usize = 64;

/// The number format of a computation's products.
///
/// - `F32`: f32 operands and sums (the default).
/// - `Bf16`: the operands of each product rounded to bf16 ([`f32_to_bf16`]), the products
///   summed in f32 and the results f32. In attention ([`crate::AttentionOptions::precision`])
///   that is the scaled queries `scale·q`, the keys, the values and the softmax's unnormalised
///   probabilities; the scores, masks, softmax, online rescaling and LSE stay f32. Where the
///   CPU has AMX, matrix products run on its tiles (several times the f32 rate); with
///   AVX512-BF16 on AMD they run on `vdpbf16ps`, at about twice the f32 rate. On an Intel
///   CPU without AMX, whose `vdpbf16ps` runs at half the f32 rate, [`gemm_bf16`] and attention
///   outside decoding run the rounded values on FMAs at the f32 rate; without bf16
///   instructions ([`Precision::runs_natively`] false) the rounded values are multiplied in
///   f32. Every route has the same error bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 operands, f32 sums and outputs.
    Bf16,
}

impl Precision {
    /// Whether this CPU computes in this precision with its own instructions (always for
    /// `F32`; for `Bf16`, when [`crate::bf16_level`] is not `None`).
    pub fn runs_natively(self) -> bool {
        match self {
            Precision::F32 => true,
            Precision::Bf16 => crate::bf16_level() != Bf16Level::None,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = KernelError;
    fn from_str(text: &str) -> Result<Self, KernelError> {
        match text {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(KernelError::InvalidArgument {
                op: "precision",
                what: "precision",
                got: format!("{other:?}"),
                expected: "\"f32\" or \"bf16\"",
            }),
        }
    }
}

/// Refuses a call in [`Precision::Bf16`] to `op`, an attention path that computes in f32 only.
pub(crate) fn require_f32(op: &'static str, options: &crate::AttentionOptions<'_>) -> Result<(), KernelError> {
    match options.precision {
        Precision::F32 => Ok(()),
        Precision::Bf16 => Err(KernelError::InvalidArgument {
            op,
            what: "precision",
            got: "bf16".into(),
            expected: "f32 (this path computes in f32 only; flash_attention and attention take bf16)",
        }),
    }
}

/// `x` rounded to bf16 (to nearest, ties to even), as the bits of the bf16 value: the upper half
/// of an f32. NaN stays NaN (made quiet), infinities stay, values too large for bf16 become
/// infinities, and subnormals become zeros of the same sign (as AVX512-BF16's conversions do).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    if x.is_subnormal() {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// `h` as rounding its f32 value gives it back: `f32_to_bf16(bf16_to_f32(h))` (a subnormal
/// becomes a zero of its sign, a NaN is made quiet, every other value is kept), so that K and
/// V packed straight from bf16 bits hold the words of K and V widened and then packed.
#[inline]
pub(crate) fn canonical(h: u16) -> u16 {
    match h & 0x7F80 {
        0 => h & 0x8000,
        0x7F80 if h & 0x007F != 0 => h | 0x0040,
        _ => h,
    }
}

/// The f32 value of bf16 bits (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16 and widened back: the value the bf16 kernels multiply.
pub fn round_to_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// Two bf16 values in one 32-bit lane, `lo` (row `2q`) in the low half: the operand layout of
/// `vdpbf16ps`.
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    f32_to_bf16(lo) as u32 | (f32_to_bf16(hi) as u32) << 16
}

/// `out[i] = pair(lo[i], hi[i])` for 16 lanes, as f32 slots: two rows' values rounded and
/// interleaved into `vdpbf16ps` pairs, by one `vcvtne2ps2bf16` and one `vpermw` at the
/// AVX512-BF16 level. The packing of row pairs: values in the flash kernel, both operands of the
/// weight gradient.
pub(crate) fn pair_rows(lo: &[f32], hi: &[f32], out: &mut [f32]) {
    assert!(lo.len() >= PANEL && hi.len() >= PANEL && out.len() >= PANEL);
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        // SAFETY: the level was detected; the three slices hold 16 values (asserted).
        unsafe { avx512bf16::interleave16(lo.as_ptr(), hi.as_ptr(), out.as_mut_ptr()) };
        return;
    }
    for i in 0..PANEL {
        out[i] = f32::from_bits(pair(lo[i], hi[i]));
    }
}

/// `dst = lhs · rhs` (or `+=`, by `accum`) with `lhs: [M, K]` rounded to bf16, `rhs` packed
/// bf16, f32 sums and f32 output (see the module documentation for the error bound). Any
/// strides for `lhs` and `dst`. Each element of `dst` is one chain of additions over the depth
/// in order, so the result does not depend on the thread count.
///
/// ```
/// use attn_kernels::{gemm_bf16, Accum, Bf16Panels, Par, View2, ViewMut2};
/// let w = [1.0f32, 2.0, 3.0, 4.0]; // [[1, 2], [3, 4]]
/// let packed = Bf16Panels::pack(View2::contiguous(&w, [2, 2]).unwrap());
/// let x = [1.0f32, 0.5];
/// let mut y = [0.0f32; 2];
/// gemm_bf16(
///     ViewMut2::contiguous(&mut y, [1, 2]).unwrap(),
///     Accum::Replace,
///     View2::contiguous(&x, [1, 2]).unwrap(),
///     &packed,
///     Par::Seq,
/// )
/// .unwrap();
/// assert_eq!(y, [2.5, 4.0]); // small integers and halves are exact in bf16
/// ```
pub fn gemm_bf16(
    dst: ViewMut2<'_, f32>,
    accum: Accum,
    lhs: View2<'_, f32>,
    rhs: &Bf16Panels,
    par: Par,
) -> Result<(), KernelError> {
    gemm_bf16_at(Route::of(crate::bf16_level()), dst, accum, lhs, rhs, par)
}

/// `dst[i, j] = bias[j] + Σ_p lhs[i, p] · rhs[p, j]`: [`gemm_bf16`] whose sums start from a
/// row of `N` biases. The bits are those of writing the bias into every row of `dst` and
/// calling [`gemm_bf16`] with [`Accum::Add`], without that pass over `dst` (at the AMX level
/// the sums' tiles start from the bias row).
///
/// ```
/// use attn_kernels::{gemm_bf16_bias, Bf16Panels, Par, View2, ViewMut2};
/// let w = [1.0f32, 2.0, 3.0, 4.0]; // [[1, 2], [3, 4]]
/// let packed = Bf16Panels::pack(View2::contiguous(&w, [2, 2]).unwrap());
/// let x = [1.0f32, 0.5];
/// let mut y = [0.0f32; 2];
/// gemm_bf16_bias(
///     ViewMut2::contiguous(&mut y, [1, 2]).unwrap(),
///     &[0.5, -1.0],
///     View2::contiguous(&x, [1, 2]).unwrap(),
///     &packed,
///     Par::Seq,
/// )
/// .unwrap();
/// assert_eq!(y, [3.0, 3.0]);
/// ```
pub fn gemm_bf16_bias(
    dst: ViewMut2<'_, f32>,
    bias: &[f32],
    lhs: View2<'_, f32>,
    rhs: &Bf16Panels,
    par: Par,
) -> Result<(), KernelError> {
    product_at(
        Route::of(crate::bf16_level()),
        dst,
        Accum::Replace,
        Some(bias),
        lhs,
        rhs,
        par,
    )
}

/// [`gemm_bf16`] by a given route (the tests run every route the CPU has).
pub(crate) fn gemm_bf16_at(
    route: Route,
    dst: ViewMut2<'_, f32>,
    accum: Accum,
    lhs: View2<'_, f32>,
    rhs: &Bf16Panels,
    par: Par,
) -> Result<(), KernelError> {
    product_at(route, dst, accum, None, lhs, rhs, par)
}

/// [`gemm_bf16`] (`bias` `None`) or [`gemm_bf16_bias`] (`accum` [`Accum::Replace`]) by `route`.
pub(crate) fn product_at(
    route: Route,
    mut dst: ViewMut2<'_, f32>,
    mut accum: Accum,
    bias: Option<&[f32]>,
    lhs: View2<'_, f32>,
    rhs: &Bf16Panels,
    par: Par,
) -> Result<(), KernelError> {
    let [m, n] = dst.shape();
    let [lm, k] = lhs.shape();
    let [rk, rn] = rhs.shape();
    if lm != m || k != rk {
        return Err(KernelError::ShapeMismatch {
            op: "gemm_bf16",
            tensor: "lhs",
            expected: vec![m, rk],
            got: vec![lm, k],
        });
    }
    if rn != n {
        return Err(KernelError::ShapeMismatch {
            op: "gemm_bf16",
            tensor: "rhs",
            expected: vec![k, n],
            got: vec![rk, rn],
        });
    }
    if let Some(bias) = bias {
        crate::error::check_len("gemm_bf16_bias", "bias", n, bias.len())?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(route, Route::Amx | Route::Widened) && dst.strides()[1] == 1 && k > 0 {
        route::packed_product(route, dst, accum, bias, lhs, rhs, par);
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if route == Route::Dpbf16 && dst.strides()[1] == 1 && k > 0 {
        let level = Bf16Level::Avx512Bf16;
        let ldc = dst.strides()[0];
        let (pairs, b_panel) = (k.div_ceil(2), padded_pairs(k) * PANEL);
        let c = dst.data_mut().as_mut_ptr();
        // Each task of rows rounds its own rows into its thread's buffer just before its tiles
        // read them (in cache, and no pass of its own over `lhs`).
        let round = |i: usize, row: &mut [f32]| round_row(level, lhs, i, row);
        // SAFETY: the level was detected; `round` writes row `i`'s `pairs` words, `rhs` holds
        // its panels `b_panel` words apart, `dst` is `[m, n]` with unit column stride and row
        // stride `ldc` (a checked view), and a bias holds `n` values (checked) and comes with
        // `Replace`. The sums start from the bias in registers: the bits of writing it into
        // every row and adding to it (what the AMX tiles do), without that pass over `dst`.
        unsafe {
            avx512bf16::gemm(
                m,
                n,
                pairs,
                avx512bf16::Lhs::Rounded(&round),
                rhs.words(),
                b_panel,
                c,
                ldc,
                accum,
                bias,
                par,
            )
        };
        return Ok(());
    }
    if let Some(bias) = bias {
        // The bias written into every row, then added to: the bits the AMX tiles give.
        let cs = dst.strides()[1];
        for i in 0..m {
            let start = dst.offset([i, 0]);
            let data = dst.data_mut();
            if cs == 1 {
                data[start..start + n].copy_from_slice(bias);
            } else {
                bias.iter().enumerate().for_each(|(j, &b)| data[start + j * cs] = b);
            }
        }
        accum = Accum::Add;
    }
    // No bf16 instructions, a strided destination or an empty depth (zeros, or `dst` kept):
    // the rounded values in f32.
    let _ = route;
    let rounded: Vec<f32> = (0..m * k).map(|i| round_to_bf16(lhs.get([i / k, i % k]))).collect();
    let b = rhs.widened();
    crate::gemm(
        dst,
        accum,
        View2::contiguous(&rounded, [m, k])?,
        View2::contiguous(&b, [k, n])?,
        1.0,
        par,
    )
}

/// Row `i` of `lhs: [M, K]` rounded to bf16 as a row of pairs, `row[q] = pair(lhs[i, 2q],
/// lhs[i, 2q + 1])` stored in f32 slots (the kernel reads them as 32-bit words; `row` holds
/// `ceil(K / 2)`). In memory a row of pairs is the row's bf16 values in order, so a contiguous
/// row is converted 16 values at a time by the level's instruction (the same bits as
/// [`f32_to_bf16`], tested).
fn round_row(level: Bf16Level, lhs: View2<'_, f32>, i: usize, row: &mut [f32]) {
    let [_, k] = lhs.shape();
    let [rs, cs] = lhs.strides();
    let data = lhs.data();
    #[cfg(target_arch = "x86_64")]
    if level.has_avx512bf16() && cs == 1 {
        // SAFETY: the level was detected; the source row holds `k` values (a checked view)
        // and `row` holds `ceil(k / 2)` words, i.e. room for `k` rounded up to even bf16
        // values.
        unsafe { avx512bf16::convert_row(&data[i * rs..i * rs + k], row) };
        return;
    }
    let _ = (level, cs, rs, data);
    for (q, out) in row.iter_mut().enumerate() {
        let lo = lhs.get([i, 2 * q]);
        let hi = if 2 * q + 1 < k { lhs.get([i, 2 * q + 1]) } else { 0.0 };
        *out = f32::from_bits(pair(lo, hi));
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
mod panels;
pub(crate) use panels::padded_pairs;
pub use panels::Bf16Panels;
mod route;
#[cfg(test)]
pub(crate) use route::available_routes;
pub use route::gemm_bf16_route;
pub(crate) use route::{round_in_place, Route};
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512bf16;
#[cfg(target_arch = "x86_64")]
pub(crate) mod round_avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    /// A precision's name reads back as itself; another name is an error naming what is
    /// accepted; bf16 runs natively exactly when the CPU has a bf16 level.
    #[test]
    fn precisions_parse_print_and_say_whether_they_run_natively() {
        for precision in [Precision::F32, Precision::Bf16] {
            assert_eq!(precision.to_string().parse::<Precision>().unwrap(), precision);
        }
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        for bad in ["", "F32", "fp16", "bf16 "] {
            let err = bad.parse::<Precision>().unwrap_err().to_string();
            assert!(err.contains("\"f32\" or \"bf16\""), "{bad:?}: {err}");
        }
        assert!(Precision::F32.runs_natively());
        assert_eq!(Precision::Bf16.runs_natively(), crate::bf16_level() != Bf16Level::None);
    }

    /// `canonical` is rounding the widened value, for every one of the 65,536 bit patterns.
    #[test]
    fn canonical_bits_are_those_of_rounding_the_widened_value() {
        for h in 0..=u16::MAX {
            assert_eq!(canonical(h), f32_to_bf16(bf16_to_f32(h)), "{h:#06x}");
        }
    }

    /// Rounding to nearest even at the bf16 boundary, and the special values.
    #[test]
    fn conversion_rounds_to_nearest_even() {
        let u = 2f32.powi(-7); // bf16's spacing just above 1
        assert_eq!(round_to_bf16(1.0), 1.0);
        assert_eq!(round_to_bf16(1.0 + u / 2.0), 1.0, "a tie rounds to the even neighbour");
        assert_eq!(
            round_to_bf16(1.0 + 3.0 * u / 2.0),
            1.0 + 2.0 * u,
            "a tie rounds to the even neighbour"
        );
        assert_eq!(
            round_to_bf16(1.0 + u / 2.0 + 2f32.powi(-20)),
            1.0 + u,
            "above the tie rounds up"
        );
        assert_eq!(round_to_bf16(-1.0 - u / 4.0), -1.0);
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY, "past bf16's largest value");
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_to_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!(round_to_bf16(f32::NAN).is_nan());
        // A NaN whose payload sits only in the low half stays NaN (not infinity).
        assert!(round_to_bf16(f32::from_bits(0x7F80_0001)).is_nan());
        assert_eq!(round_to_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(round_to_bf16(1e-40).to_bits(), 0, "subnormals flush to zero");
        assert_eq!(round_to_bf16(-1e-40).to_bits(), (-0.0f32).to_bits());
        // Relative error at most 2^-8 (half the spacing) over a sweep of normal values.
        for i in 0..100_000 {
            let x = (i as f32 * 0.123_456_7 - 6000.0) * 1.37e-3;
            if x != 0.0 {
                assert!(((round_to_bf16(x) - x) / x).abs() <= 2f32.powi(-8), "{x}");
            }
        }
    }

    /// The AVX512-BF16 conversion gives the bits of [`f32_to_bf16`]: a sweep of values, ties,
    /// subnormals, infinities, NaNs, and lengths around the vector width (an odd one padded).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_conversion_has_the_scalar_bits() {
        if !crate::simd::detect_bf16().has_avx512bf16() {
            eprintln!("note: no AVX512-BF16 on this CPU; the vector conversion is not checked");
            return;
        }
        let mut xs: Vec<f32> = (0..200_003)
            .map(|i| f32::from_bits((i as u32).wrapping_mul(2_654_435_761)))
            .collect();
        xs.extend([
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            1e-40,
            -1e-40,
            f32::MAX,
            f32::NAN,
            -f32::INFINITY,
        ]);
        xs.push(f32::from_bits(0x7F80_0001));
        for len in [xs.len(), 1, 15, 16, 17, 33] {
            let src = &xs[..len];
            let mut words = vec![f32::NAN; len.div_ceil(2)];
            // SAFETY: the level was detected; `words` holds ceil(len / 2) words.
            unsafe { avx512bf16::convert_row(src, &mut words) };
            for (q, w) in words.iter().enumerate() {
                let bits = w.to_bits();
                let want_lo = f32_to_bf16(src[2 * q]);
                let want_hi = src.get(2 * q + 1).map_or(0, |&x| f32_to_bf16(x));
                assert_eq!(bits as u16, want_lo, "{:e} ({:#x})", src[2 * q], src[2 * q].to_bits());
                assert_eq!((bits >> 16) as u16, want_hi, "len {len} word {q}");
            }
            // The same words by A-tile steps of 32 values, 16 words apart here, zeros after.
            let steps = len.div_ceil(32) + 1;
            let mut tiles = vec![f32::NAN; 32 * steps];
            // SAFETY: the level was detected; `len <= 32·steps`; `tiles` holds 16 words at
            // each step's offset `32·s`.
            unsafe { avx512bf16::convert_row_steps(src, 1.0, steps, tiles.as_mut_ptr(), 32) };
            let by_steps: Vec<u32> = tiles
                .chunks(32)
                .flat_map(|step| &step[..16])
                .map(|w| w.to_bits())
                .collect();
            let mut want: Vec<u32> = words.iter().map(|w| w.to_bits()).collect();
            want.resize(16 * steps, 0);
            assert!(by_steps == want, "convert_row_steps, len {len}");
            assert!(
                tiles.chunks(32).all(|step| step[16..].iter().all(|w| w.is_nan())),
                "wrote past a step"
            );
        }
    }

    /// Every level this CPU runs: the f32 fallback always, AVX512-BF16 when detected.
    /// Packing a row-major, a transposed and a strided view of the same matrix, and one whose
    /// rows have gaps between them, gives the same words, and they widen back to each value
    /// rounded to bf16 (zeros in the padding), into fresh or kept storage alike.
    #[test]
    fn packing_reads_any_strides() {
        for (k, n) in [(1, 1), (7, 5), (33, 16), (64, 48), (300, 260)] {
            let m = random_vec(k * n, 21);
            let row_major = Bf16Panels::pack(View2::contiguous(&m, [k, n]).unwrap());
            let t: Vec<f32> = (0..n * k).map(|i| m[(i % k) * n + i / k]).collect();
            let transposed = Bf16Panels::pack(View2::new(&t, [k, n], [1, k]).unwrap());
            let wide: Vec<f32> = m.iter().flat_map(|&x| [x, f32::NAN]).collect();
            let strided = Bf16Panels::pack(View2::new(&wide, [k, n], [2 * n, 2]).unwrap());
            // Contiguous rows 3 values apart: the row-major panels, a panel at a time.
            let padded: Vec<f32> = m
                .chunks(n)
                .flat_map(|row| row.iter().copied().chain([f32::NAN; 3]))
                .collect();
            let spaced = Bf16Panels::pack(View2::new(&padded, [k, n], [n + 3, 1]).unwrap());
            assert_eq!(row_major.words(), transposed.words(), "[{k}, {n}] transposed");
            assert_eq!(row_major.words(), strided.words(), "[{k}, {n}] strided");
            assert_eq!(row_major.words(), spaced.words(), "[{k}, {n}] spaced rows");
            let want: Vec<f32> = m.iter().map(|&x| round_to_bf16(x)).collect();
            assert_eq!(row_major.widened(), want, "[{k}, {n}]");
            let pairs = padded_pairs(k);
            for (i, &word) in row_major.words().iter().enumerate() {
                let (j, q, half) = ((i / (pairs * PANEL)) * PANEL + i % PANEL, i / PANEL % pairs, word);
                if j >= n {
                    assert_eq!(half, 0, "padding column {j} of [{k}, {n}]");
                } else if 2 * q >= k {
                    assert_eq!(half, 0, "padding pair {q} of [{k}, {n}]");
                } else if 2 * q + 1 >= k {
                    assert_eq!(half >> 16, 0, "padding row of [{k}, {n}]");
                }
            }
        }
        // Packing into kept storage (the first packing's, dropped) gives the same words.
        let m = random_vec(200 * 300, 22);
        let first = Bf16Panels::pack(View2::contiguous(&m, [200, 300]).unwrap());
        let words = first.words().to_vec();
        drop(first);
        let again = Bf16Panels::pack(View2::contiguous(&m, [200, 300]).unwrap());
        assert_eq!(again.words(), words);
        // Packed words start on a cache line, in a clone too.
        let copy = again.clone();
        assert_eq!(copy.words(), words);
        for packed in [&again, &copy] {
            assert_eq!(packed.words().as_ptr() as usize % 64, 0);
        }
    }

    /// Storage kept from a dropped packing holds that packing's words: a packing of another
    /// shape into it (its padding pairs and columns where the first had values) still has each
    /// value rounded to bf16 and zeros in all of its padding, from values or from bits.
    #[test]
    fn kept_storage_leaves_nothing_of_its_last_packing() {
        // [416, 160]: no padding, every word non-zero; [399, 150]: 8 padding pairs and 10
        // padding columns, in as many words (33,280), so it takes the first one's storage.
        let (k, n) = (399, 150);
        let m = random_vec(k * n, 31);
        for from_bits in [false, true] {
            for _ in 0..3 {
                let full: Vec<f32> = random_vec(416 * 160, 32).iter().map(|x| x + 3.0).collect();
                drop(Bf16Panels::pack(View2::contiguous(&full, [416, 160]).unwrap()));
                let packed = if from_bits {
                    let bits: Vec<u16> = m.iter().map(|&x| f32_to_bf16(x)).collect();
                    Bf16Panels::from_bits(View2::contiguous(&bits, [k, n]).unwrap())
                } else {
                    Bf16Panels::pack(View2::contiguous(&m, [k, n]).unwrap())
                };
                let want: Vec<f32> = m.iter().map(|&x| round_to_bf16(x)).collect();
                assert_eq!(packed.widened(), want, "from bits: {from_bits}");
                let pairs = padded_pairs(k);
                for (i, &word) in packed.words().iter().enumerate() {
                    let (j, q) = ((i / (pairs * PANEL)) * PANEL + i % PANEL, i / PANEL % pairs);
                    if j >= n || 2 * q >= k {
                        assert_eq!(
                            word, 0,
                            "padding word {i} (column {j}, pair {q}), from bits: {from_bits}"
                        );
                    } else if 2 * q + 1 >= k {
                        assert_eq!(word >> 16, 0, "padding row in word {i}, from bits: {from_bits}");
                    }
                }
            }
        }
    }

    /// Packing bf16 bits gives the words of packing their widened values, in both layouts (a
    /// weight's `Wᵀ` is the transposed one), over odd depths, ragged panels and the values the
    /// conversion changes: subnormals (flushed to signed zeros), NaNs (made quiet), infinities.
    #[test]
    fn packing_bits_matches_packing_their_values() {
        let specials = [
            0x0001u16, 0x8001, 0x007F, 0x7F81, 0xFF80, 0x7F80, 0x8000, 0x0000, 0x7FC1,
        ];
        // The last shape has more than 2^16 words: packed in parallel.
        for (k, n) in [(1, 1), (7, 5), (33, 16), (64, 48), (300, 260), (601, 300)] {
            let mut bits: Vec<u16> = random_vec(k * n, 23).iter().map(|&x| f32_to_bf16(x)).collect();
            for (i, &h) in specials.iter().enumerate() {
                if let Some(slot) = bits.get_mut(i * 3) {
                    *slot = h;
                }
            }
            let values: Vec<f32> = bits.iter().map(|&h| bf16_to_f32(h)).collect();
            let want = Bf16Panels::pack(View2::contiguous(&values, [k, n]).unwrap());
            let row_major = Bf16Panels::from_bits(View2::contiguous(&bits, [k, n]).unwrap());
            assert_eq!(row_major.words(), want.words(), "[{k}, {n}] row-major");
            let t: Vec<u16> = (0..n * k).map(|i| bits[(i % k) * n + i / k]).collect();
            let transposed = Bf16Panels::from_bits(View2::new(&t, [k, n], [1, k]).unwrap());
            assert_eq!(transposed.words(), want.words(), "[{k}, {n}] transposed");
            assert_eq!(transposed.shape(), [k, n]);
        }
        let zeros: [u16; 0] = [];
        assert_eq!(
            Bf16Panels::from_bits(View2::contiguous(&zeros, [0, 3]).unwrap()).shape(),
            [0, 3]
        );
    }

    use route::available_routes as routes;

    /// The GEMM at every level against an f64 sum of the bf16-rounded inputs (the kernel's own
    /// arithmetic: f32 sums, bound `K·2^-24·Σ|â·b̂|`) and against the f32 inputs (adding the
    /// rounding of the inputs, `(2u + u²)·Σ|a·b|`), over row and column counts across the 8 × 32
    /// block and its tails, odd and even depths, replacing and accumulating, a transposed
    /// (weight-like) right operand and a strided destination.
    #[test]
    fn gemm_bf16_bias_has_the_bits_of_the_bias_then_an_added_product() {
        for route in routes() {
            // Tails of rows and columns, several column parts and row tasks, a depth of one
            // partial step and of many, contiguous and strided destinations.
            for (m, n, k, ld_pad) in [
                (1, 1, 1, 0),
                (9, 17, 17, 3),
                (33, 48, 64, 0),
                (130, 300, 257, 5),
                (200, 40, 9, 0),
            ] {
                let a = random_vec(m * k, 4);
                let w = random_vec(n * k, 5);
                let bias = random_vec(n, 6);
                let packed = Bf16Panels::pack(View2::contiguous(&w, [n, k]).unwrap().permuted([1, 0]).unwrap());
                let lhs = View2::contiguous(&a, [m, k]).unwrap();
                let ld = n + ld_pad;
                let mut want = vec![f32::NAN; m * ld];
                for i in 0..m {
                    want[i * ld..i * ld + n].copy_from_slice(&bias);
                }
                let dst = ViewMut2::new(&mut want, [m, n], [ld, 1]).unwrap();
                gemm_bf16_at(route, dst, Accum::Add, lhs, &packed, Par::Rayon).unwrap();
                let mut got = vec![f32::NAN; m * ld];
                let dst = ViewMut2::new(&mut got, [m, n], [ld, 1]).unwrap();
                product_at(route, dst, Accum::Replace, Some(&bias), lhs, &packed, Par::Rayon).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{route} {m}x{n}x{k} ld {ld}");
                // A column-major destination (the bias written column by column; another
                // kernel, so its own reference).
                let mut want_t: Vec<f32> = bias.iter().flat_map(|&b| std::iter::repeat_n(b, m)).collect();
                let dst = ViewMut2::new(&mut want_t, [m, n], [1, m]).unwrap();
                gemm_bf16_at(route, dst, Accum::Add, lhs, &packed, Par::Rayon).unwrap();
                let mut got_t = vec![f32::NAN; m * n];
                let dst = ViewMut2::new(&mut got_t, [m, n], [1, m]).unwrap();
                product_at(route, dst, Accum::Replace, Some(&bias), lhs, &packed, Par::Rayon).unwrap();
                assert_eq!(bits(&got_t), bits(&want_t), "{route} {m}x{n}x{k} column-major");
            }
        }
        let packed = Bf16Panels::pack(View2::contiguous(&[1.0f32; 6], [2, 3]).unwrap());
        let mut c = [0.0f32; 3];
        let err = gemm_bf16_bias(
            ViewMut2::contiguous(&mut c, [1, 3]).unwrap(),
            &[1.0, 2.0],
            View2::contiguous(&[1.0f32, 2.0], [1, 2]).unwrap(),
            &packed,
            Par::Seq,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
    }

    #[test]
    fn gemm_bf16_matches_its_bound_at_every_level() {
        let u = 2f64.powi(-8);
        for route in routes() {
            for (m, n, k) in [
                (1, 1, 1),
                (7, 15, 2),
                (8, 16, 3),
                (9, 17, 17),
                (17, 33, 64),
                (70, 48, 257),
                (64, 100, 40),
                (130, 32, 9),
                // 35 blocks of 32 rows: tasks of 3 and 4 blocks, the last one ragged.
                (1100, 40, 33),
                (4, 5, 0),
                (3, 0, 5),
                (0, 5, 3),
            ] {
                for (accum, transposed, strided) in [
                    (Accum::Replace, false, false),
                    (Accum::Add, true, false),
                    (Accum::Replace, true, true),
                ] {
                    let a = random_vec(m * k, 1);
                    let b_data = random_vec(k * n, 2);
                    // The right operand as a weight `[N, K]` read transposed, or `[K, N]`.
                    let b = if transposed {
                        View2::contiguous(&b_data, [n, k]).unwrap().permuted([1, 0]).unwrap()
                    } else {
                        View2::contiguous(&b_data, [k, n]).unwrap()
                    };
                    let packed = Bf16Panels::pack(b);
                    let start = random_vec(m * n, 3);
                    let ld = if strided { n + 5 } else { n };
                    let mut c = vec![f32::NAN; m * ld];
                    for i in 0..m {
                        c[i * ld..i * ld + n].copy_from_slice(&start[i * n..(i + 1) * n]);
                    }
                    let lhs = View2::contiguous(&a, [m, k]).unwrap();
                    let dst = ViewMut2::new(&mut c, [m, n], [ld, 1]).unwrap();
                    gemm_bf16_at(route, dst, accum, lhs, &packed, Par::Rayon).unwrap();
                    let widened = packed.widened();
                    for i in 0..m {
                        for j in 0..n {
                            let (mut exact, mut rounded, mut abs, mut abs_rounded) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
                            for p in 0..k {
                                let (x, y) = (a[i * k + p] as f64, b.get([p, j]) as f64);
                                let (xr, yr) = (round_to_bf16(a[i * k + p]) as f64, widened[p * n + j] as f64);
                                exact += x * y;
                                rounded += xr * yr;
                                abs += (x * y).abs();
                                abs_rounded += (xr * yr).abs();
                            }
                            let base = if accum == Accum::Add {
                                start[i * n + j] as f64
                            } else {
                                0.0
                            };
                            let got = c[i * ld + j] as f64;
                            // The f32 sums (and the start value's addition) only.
                            let sums = (k + 1) as f64 * 2f64.powi(-24) * (abs_rounded + base.abs());
                            let err = (got - (base + rounded)).abs();
                            assert!(
                                err <= sums,
                                "{route} {m}x{n}x{k} [{i}, {j}]: {err:e} > {sums:e} from the rounded inputs"
                            );
                            let bound = (2.0 * u + u * u) * abs + sums;
                            let err = (got - (base + exact)).abs();
                            assert!(
                                err <= bound,
                                "{route} {m}x{n}x{k} [{i}, {j}]: {err:e} > {bound:e} from the f32 inputs"
                            );
                        }
                        // The padding of a strided destination is never written.
                        assert!(c[i * ld + n..(i + 1) * ld].iter().all(|x| x.is_nan()));
                    }
                }
            }
        }
    }

    /// One chain of additions per element: the same bits on one thread and on all of them, and
    /// the AVX512-BF16 kernel's results equal for any row split (the task and block tails).
    #[test]
    fn gemm_bf16_does_not_depend_on_threads() {
        let (m, n, k) = (200, 72, 130);
        let a = random_vec(m * k, 4);
        let b = random_vec(k * n, 5);
        let packed = Bf16Panels::pack(View2::contiguous(&b, [k, n]).unwrap());
        for route in routes() {
            let mut outs = Vec::new();
            for par in [Par::Seq, Par::Rayon] {
                let mut c = vec![0.0f32; m * n];
                let dst = ViewMut2::contiguous(&mut c, [m, n]).unwrap();
                gemm_bf16_at(
                    route,
                    dst,
                    Accum::Replace,
                    View2::contiguous(&a, [m, k]).unwrap(),
                    &packed,
                    par,
                )
                .unwrap();
                outs.push(c);
            }
            assert_eq!(outs[0], outs[1], "{route}");
            // Rows computed alone (another task and block split) match.
            let mut one = vec![0.0f32; n];
            let row = 137;
            gemm_bf16_at(
                route,
                ViewMut2::contiguous(&mut one, [1, n]).unwrap(),
                Accum::Replace,
                View2::contiguous(&a[row * k..(row + 1) * k], [1, k]).unwrap(),
                &packed,
                Par::Seq,
            )
            .unwrap();
            assert_eq!(one, outs[0][row * n..(row + 1) * n], "{route}");
        }
    }

    /// Destination rows a multiple of 4 KiB apart send the `vdpbf16ps` GEMM across groups of
    /// columns (192 here, at a depth of 600) instead of one pair of panels at a time: the same
    /// bits as the product into rows 16 floats further apart, from zero, from the destination
    /// and from a bias, with a ragged last group and row block, on one thread and on all.
    #[test]
    fn gemm_bf16_gives_the_same_bits_in_groups_of_columns() {
        let (m, n, k) = (75, 1000, 600);
        let a = random_vec(m * k, 6);
        let packed = Bf16Panels::pack(View2::contiguous(&random_vec(k * n, 7), [k, n]).unwrap());
        let (bias, start) = (random_vec(n, 8), random_vec(m * n, 9));
        let lhs = View2::contiguous(&a, [m, k]).unwrap();
        for route in routes() {
            for par in [Par::Seq, Par::Rayon] {
                for (accum, bias) in [
                    (Accum::Replace, None),
                    (Accum::Add, None),
                    (Accum::Replace, Some(&bias[..])),
                ] {
                    let outs: Vec<Vec<f32>> = [1024, 1040]
                        .into_iter()
                        .map(|ldc| {
                            let mut c = vec![f32::NAN; m * ldc];
                            for (row, from) in c.chunks_exact_mut(ldc).zip(start.chunks_exact(n)) {
                                row[..n].copy_from_slice(from);
                            }
                            let dst = ViewMut2::new(&mut c, [m, n], [ldc, 1]).unwrap();
                            product_at(route, dst, accum, bias, lhs, &packed, par).unwrap();
                            c.chunks_exact(ldc).flat_map(|row| &row[..n]).copied().collect()
                        })
                        .collect();
                    let same = outs[0].iter().zip(&outs[1]).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{route}, {par:?}, {accum:?}, bias {}", bias.is_some());
                    assert!(
                        outs[0].iter().all(|x| x.is_finite()),
                        "{route}: a column left unwritten"
                    );
                }
            }
        }
    }

    /// The widened route is attn's own f32 GEMM of the left operand rounded to bf16 and the
    /// panels widened: the same bits, from zero, from the destination and from a bias, on one
    /// and two threads (bands by rows and by columns), over odd depths, several depth blocks
    /// (384) and column blocks (512), ragged panels, a transposed left operand, and values the
    /// rounding changes (subnormals, NaNs, ties, overflow to infinity).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_widened_route_is_the_f32_gemm_of_the_rounded_values() {
        use crate::gemm::avx512::{gemm, LhsValues, Operand, Rhs, Start};
        if crate::simd::detect() != crate::SimdLevel::Avx512 {
            eprintln!("note: no AVX-512 on this CPU; the widened bf16 route is not checked");
            return;
        }
        let specials = [
            f32::from_bits(0x0000_0001),
            -1e-39,
            f32::from_bits(0x7FA0_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.4e38,
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            -0.0,
        ];
        for (m, n, k) in [(1, 1, 1), (13, 17, 3), (50, 530, 401), (20, 1100, 64), (130, 48, 800)] {
            let mut a = random_vec(m * k, 31);
            for (i, &x) in specials.iter().enumerate() {
                if let Some(slot) = a.get_mut(i * 7) {
                    *slot = x;
                }
            }
            let b = random_vec(k * n, 32);
            let packed = Bf16Panels::pack(View2::contiguous(&b, [k, n]).unwrap());
            let rounded: Vec<f32> = a.iter().map(|&x| round_to_bf16(x)).collect();
            let widened = packed.widened();
            let bias = random_vec(n, 33);
            let t: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
            for (start, accum) in [
                (Start::Zero, Accum::Replace),
                (Start::Dst, Accum::Add),
                (Start::Bias(bias.as_ptr()), Accum::Replace),
            ] {
                let with_bias = matches!(start, Start::Bias(_));
                let before = random_vec(m * n, 34);
                let mut want = before.clone();
                // SAFETY: AVX-512 F was detected; the operands and `want` are `[m, k]`,
                // `[k, n]` and `[m, n]` row-major, the bias `[n]`.
                unsafe {
                    gemm(
                        want.as_mut_ptr(),
                        n,
                        [m, n, k],
                        start,
                        (
                            Operand {
                                ptr: rounded.as_ptr(),
                                rs: k,
                                cs: 1,
                            },
                            LhsValues::F32,
                        ),
                        Rhs::F32(Operand {
                            ptr: widened.as_ptr(),
                            rs: n,
                            cs: 1,
                        }),
                        1.0,
                        Par::Seq,
                    )
                };
                for (lhs, layout) in [
                    (View2::contiguous(&a, [m, k]).unwrap(), "row-major"),
                    (View2::new(&t, [m, k], [1, m]).unwrap(), "transposed"),
                ] {
                    for par in [Par::Seq, Par::Rayon] {
                        let mut got = before.clone();
                        let dst = ViewMut2::contiguous(&mut got, [m, n]).unwrap();
                        let bias = with_bias.then_some(&bias[..]);
                        product_at(Route::Widened, dst, accum, bias, lhs, &packed, par).unwrap();
                        let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{m}x{n}x{k} {layout} {par:?} bias {with_bias} {accum:?}");
                    }
                }
            }
        }
    }

    /// A left operand read through strides (a transposed view: the packings' element-by-element
    /// branch) gives the bits of the same values stored contiguously, at every level.
    #[test]
    fn gemm_bf16_reads_a_strided_left_operand() {
        for route in routes() {
            for (m, n, k) in [(1, 16, 5), (37, 40, 70), (130, 33, 257)] {
                let a = random_vec(m * k, 9);
                let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                let packed = Bf16Panels::pack(View2::contiguous(&random_vec(k * n, 8), [k, n]).unwrap());
                let run = |lhs: View2<'_, f32>| {
                    let mut c = vec![0.0f32; m * n];
                    let dst = ViewMut2::contiguous(&mut c, [m, n]).unwrap();
                    gemm_bf16_at(route, dst, Accum::Replace, lhs, &packed, Par::Rayon).unwrap();
                    c
                };
                let contiguous = run(View2::contiguous(&a, [m, k]).unwrap());
                let strided = run(View2::new(&a_t, [m, k], [1, m]).unwrap());
                assert_eq!(contiguous, strided, "{route} {m}x{n}x{k}");
            }
        }
    }

    #[test]
    fn gemm_bf16_shape_errors() {
        let packed = Bf16Panels::pack(View2::contiguous(&[0.0f32; 6], [2, 3]).unwrap());
        let a = [0.0f32; 6];
        let mut c = [0.0f32; 6];
        let err = gemm_bf16(
            ViewMut2::contiguous(&mut c, [2, 3]).unwrap(),
            Accum::Replace,
            View2::contiguous(&a, [2, 3]).unwrap(),
            &packed,
            Par::Seq,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::ShapeMismatch {
                op: "gemm_bf16",
                tensor: "lhs",
                expected: vec![2, 2],
                got: vec![2, 3]
            }
        );
        let err = gemm_bf16(
            ViewMut2::contiguous(&mut c[..4], [2, 2]).unwrap(),
            Accum::Replace,
            View2::contiguous(&a[..4], [2, 2]).unwrap(),
            &packed,
            Par::Seq,
        )
        .unwrap_err();
        assert!(
            matches!(err, KernelError::ShapeMismatch { tensor: "rhs", .. }),
            "{err:?}"
        );
    }
}
