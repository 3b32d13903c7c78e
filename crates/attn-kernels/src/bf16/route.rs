//! Which kernel computes a bf16 product on this CPU ([`Route`]), and the route that widens the
//! bf16 values into attn's own f32 GEMM.

#[cfg(target_arch = "x86_64")]
use super::amx;
use super::{padded_pairs, Bf16Panels, PANEL};
use crate::{Accum, Bf16Level, Par, View2, ViewMut2};

/// The kernel that computes a bf16 product ([`Route::of`] a level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// `vdpbf16ps` on pairs of rows.
    Dpbf16,
    /// attn's own f32 GEMM at the AVX-512 level, the left operand rounded as it is packed and
    /// the panels widened as they are packed: FMAs on the bf16 values.
    Widened,
    /// The rounded values copied into f32 and multiplied by [`crate::gemm`].
    Fallback,
}

impl Route {
    /// The route of a product at `level`. AVX512-BF16 on an Intel CPU is [`Route::Widened`]: there
    /// `vdpbf16ps` takes about four times an FMA's issue slot for twice its products (measured
    /// on a Xeon of family 6 model 207: 1.6–2.8 reference cycles per instruction against 0.44
    /// for `vfmadd231ps`, whatever the number of independent sums), so the bf16 products run
    /// at half the f32 rate, and on FMAs at the f32 rate; on AMD's Zen 4 and 5 it issues as
    /// an FMA does, at twice the f32 rate. Without bf16 instructions the AVX-512 level is
    /// `Widened` too; below it the fallback.
    pub(crate) fn of(level: Bf16Level) -> Route {
        #[cfg(target_arch = "x86_64")]
        let (intel, avx512) = (
            crate::gemm::own::intel(),
            crate::simd::simd_level() == crate::SimdLevel::Avx512,
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (intel, avx512) = (false, false);
        match level {
            Bf16Level::Amx => Route::Amx,
            Bf16Level::Avx512Bf16 if intel => Route::Widened,
            Bf16Level::Avx512Bf16 => Route::Dpbf16,
            Bf16Level::None if avx512 => Route::Widened,
            Bf16Level::None => Route::Fallback,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Route::Amx => "amx",
            Route::Dpbf16 => "vdpbf16ps",
            Route::Widened => "widened to f32 FMAs",
            Route::Fallback => "f32 fallback",
        })
    }
}

/// The route [`gemm_bf16`](super::gemm_bf16) takes on this CPU: `"amx"`, `"vdpbf16ps"`, `"widened to f32 FMAs"`
/// or `"f32 fallback"` (for `attn check` and the benchmarks' reports).
pub fn gemm_bf16_route() -> String {
    Route::of(crate::bf16_level()).to_string()
}

/// `dst = lhs · rhs` (or `+=` by `accum`, or from `bias`) by [`Route::Widened`] (attn's own f32
/// GEMM, `lhs` rounded to bf16 and `rhs`'s panels widened as they are packed) or
/// [`Route::Amx`] (AMX tiles).
///
/// # Panics
/// For another route; without AVX-512 F (widened) or AMX; for a destination whose columns are
/// not contiguous, an empty depth, or shapes [`super::product_at`] has not checked (`lhs: [m,
/// k]`, `rhs: [k, n]`, `dst: [m, n]`, a bias of `n`).
#[cfg(target_arch = "x86_64")]
pub(super) fn packed_product(
    route: Route,
    mut dst: ViewMut2<'_, f32>,
    accum: Accum,
    bias: Option<&[f32]>,
    lhs: View2<'_, f32>,
    rhs: &Bf16Panels,
    par: Par,
) {
    use crate::gemm::avx512::{gemm, LhsValues, Operand, Rhs, Start};
    let ([m, n], [lm, k]) = (dst.shape(), lhs.shape());
    assert!(dst.strides()[1] == 1 && k > 0);
    assert!(lm == m && rhs.shape() == [k, n] && bias.is_none_or(|b| b.len() == n));
    let (ldc, c) = (dst.strides()[0], dst.data_mut().as_mut_ptr());
    let panel = padded_pairs(k) * PANEL;
    match route {
        Route::Widened => {
            assert!(std::arch::is_x86_feature_detected!("avx512f"));
            let start = match (bias, accum) {
                (Some(bias), _) => Start::Bias(bias.as_ptr()),
                (None, Accum::Add) => Start::Dst,
                (None, Accum::Replace) => Start::Zero,
            };
            let [rs, cs] = lhs.strides();
            let a = Operand {
                ptr: lhs.data().as_ptr(),
                rs,
                cs,
            };
            let b = Rhs::Bf16 {
                words: rhs.words().as_ptr(),
                panel,
            };
            // SAFETY: AVX-512 F (asserted); `lhs` is `[m, k]` (asserted, a checked view), `rhs`
            // holds `⌈n / 16⌉` panels of `padded_pairs(k) ≥ ⌈k / 2⌉` pair rows, a bias holds
            // `n` values, and `dst` is `[m, n]` with unit column stride and row stride `ldc`,
            // borrowed mutably (so it overlaps nothing).
            unsafe { gemm(c, ldc, [m, n, k], start, (a, LhsValues::Bf16), b, 1.0, par) };
        }
        Route::Amx => {
            assert!(amx::available());
            let init = match (bias, accum) {
                (Some(bias), _) => amx::Init::Row(bias.as_ptr()),
                (None, Accum::Add) => amx::Init::Dst,
                (None, Accum::Replace) => amx::Init::Zero,
            };
            let steps = padded_pairs(k) / amx::STEP_PAIRS;
            // SAFETY: AMX was detected (asserted); `lhs` is `[m, k]` (asserted), `rhs` its
            // panels `panel` words apart (zeros past the depth), `dst` is `[m, n]` with unit
            // column stride and row stride `ldc` (a checked view), and a bias holds `n` values.
            unsafe {
                amx::gemm(
                    [m, n, steps],
                    amx::Lhs::Rows(lhs),
                    rhs.words(),
                    panel,
                    c,
                    ldc,
                    init,
                    par,
                )
            };
        }
        Route::Dpbf16 | Route::Fallback => panic!("{route} is not a packed product's route"),
    }
}

/// Rounds every value of `row` to bf16 in place (the bits of [`crate::round_to_bf16`]): 16 at a
/// time where the CPU has AVX-512, 8 at AVX2.
pub(crate) fn round_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match crate::simd::simd_level() {
        // SAFETY: the level has AVX-512 F.
        crate::SimdLevel::Avx512 => return unsafe { crate::gemm::avx512::round_row_to_bf16(row) },
        // SAFETY: every other vector level has AVX2.
        level if level.is_vector() => return unsafe { super::round_avx2::round_row(row) },
        _ => {}
    }
    row.iter_mut().for_each(|p| *p = crate::round_to_bf16(*p));
}

/// Every route this CPU runs, for the tests: the f32 fallback always, the widened one at the
/// AVX-512 level, `vdpbf16ps` with AVX512-BF16 (whichever [`Route::of`] picks for the level)
/// and AMX; each one missing is said on stderr.
#[cfg(test)]
pub(crate) fn available_routes() -> Vec<Route> {
    let mut routes = vec![Route::Fallback];
    if crate::simd::detect() == crate::SimdLevel::Avx512 {
        routes.push(Route::Widened);
    } else {
        eprintln!("note: no AVX-512 on this CPU; the widened bf16 route is not checked");
    }
    let detected = crate::simd::detect_bf16();
    if detected.has_avx512bf16() {
        routes.push(Route::Dpbf16);
    } else {
        eprintln!("note: no AVX512-BF16 on this CPU; vdpbf16ps is not checked");
    }
    if detected == Bf16Level::Amx {
        routes.push(Route::Amx);
    } else {
        eprintln!("note: no AMX on this CPU (or Linux refused its tile state); AMX is not checked");
    }
    routes
}
