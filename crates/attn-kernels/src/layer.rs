//! The row and pointwise kernels of a Transformer layer around attention: layer and RMS
//! normalisation with the residual add fused into the same pass, the bias add fused with the
//! activation (ReLU, exact GELU, tanh GELU), and the residual add alone.
//!
//! Written once over the vector width (`lanes.rs`) and dispatched at run time like the softmax
//! primitives ([`simd_level`](crate::simd_level)); the scalar level runs the same formulas one
//! element at a time. Rows are independent, and every row is computed by the same code
//! whatever the thread count, so results are bit-identical across `Par::Seq` and any rayon
//! pool at one level. Levels differ by FMA rounding and how a sum is split across lanes.
//!
//! # Accuracy (tests `norms_match_f64_at_every_level`, `activations_match_f64_at_every_level`)
//! - Norms: mean and variance are summed in f32 lanes over the row (two passes: the mean, then
//!   the squared deviations), `1/sqrt(var + eps)` in f64. Relative error against an f64
//!   evaluation below 1e-5 of the row's largest output for rows up to 4096 wide.
//! - GELU: `x·Φ(x)` with a rational `erf` (absolute error below 5e-7, [`erf`]); tanh GELU as
//!   `x / (1 + e^{-2u})`, `u = √(2/π)·(x + 0.044715·x³)`, through the same `exp` as softmax.
//!   Both within 2e-6 of f64 relative to `max(|x|, 1)`.
//! - ReLU keeps NaN (as PyTorch does); `max(x, 0)`.
//! - Infinite inputs: GELU (exact) of `±inf` is `+inf` and `0` here, NaN in PyTorch 2.15; the
//!   tanh GELU gives what PyTorch gives, `+inf` and NaN (`-inf / inf`).

use rayon::prelude::*;

use crate::error::check_len;
use crate::simd::{exp_scalar, simd_level, SimdLevel};
use crate::{KernelError, Par};

/// Rows per parallel task of the norms.
const ROW_CHUNK: usize = 16;
/// Elements per parallel task of the pointwise kernels (whole rows for the bias add).
const ELEMENT_CHUNK: usize = 16 * 1024;

/// Which normalisation a row gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) · weight + bias`, the biased variance (PyTorch's
    /// `nn.LayerNorm`).
    LayerNorm,
    /// `x / sqrt(mean(x²) + eps) · weight` (`nn.RMSNorm`).
    RmsNorm,
}

/// A row normalisation's parameters: `weight: [E]`, `bias: [E]` (layer norm only) and `eps`.
#[derive(Debug, Clone, Copy)]
pub struct NormParams<'a> {
    /// Layer or RMS.
    pub kind: NormKind,
    /// `[E]`, the row width.
    pub weight: &'a [f32],
    /// `[E]`; `None` for no bias. RMS norm takes none.
    pub bias: Option<&'a [f32]>,
    /// Added to the variance (or mean square) inside the square root: finite, at least 0.
    pub eps: f32,
}

/// The pointwise function after a bias add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `x`.
    #[default]
    Identity,
    /// `max(x, 0)`, NaN kept.
    Relu,
    /// `x·Φ(x)` with the exact `erf` (PyTorch's `gelu`).
    Gelu,
    /// The tanh approximation (`gelu(approximate="tanh")`).
    GeluTanh,
}

impl NormParams<'_> {
    /// The row width `E`, after checking the parameters and that `len` is whole rows.
    fn check(&self, op: &'static str, len: usize) -> Result<usize, KernelError> {
        let e = self.weight.len();
        if e == 0 {
            return Err(invalid(op, "the weight length", "0", "at least 1 (the row width)"));
        }
        if let Some(bias) = self.bias {
            if self.kind == NormKind::RmsNorm {
                return Err(invalid(op, "bias", "given", "none for RMS norm"));
            }
            if bias.len() != e {
                return Err(KernelError::shape(op, "bias", vec![e], vec![bias.len()]));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(invalid(op, "eps", &self.eps.to_string(), "finite and at least 0"));
        }
        if !len.is_multiple_of(e) {
            return Err(KernelError::shape(op, "x", vec![len.div_ceil(e), e], vec![len]));
        }
        Ok(e)
    }
}

fn invalid(op: &'static str, what: &'static str, got: &str, expected: &'static str) -> KernelError {
    KernelError::InvalidArgument {
        op,
        what,
        got: got.to_string(),
        expected,
    }
}

/// One row of a norm: `x = src (+ residual)`, stored in `sum` unless null; `dst = norm(x)`.
/// `dst` may equal `src` or `sum`.
type NormRow = unsafe fn(*const f32, *const f32, *mut f32, *mut f32, usize, &NormParams<'_>);
/// `x[i] = act(x[i] + bias[i])` over one row (`bias` may be null).
type BiasActRow = unsafe fn(*mut f32, *const f32, usize, Activation);

/// The running level's row kernels.
fn kernels() -> (NormRow, BiasActRow) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => (avx512::norm_row, avx512::bias_act_row),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2Fma => (avx2::norm_row, avx2::bias_act_row),
        _ => (scalar::norm_row, scalar::bias_act_row),
    }
}

/// `dst = norm(src)` row by row: `src`, `dst: [N, E]` with `E = weight.len()`.
pub fn norm_rows(dst: &mut [f32], src: &[f32], params: NormParams<'_>, par: Par) -> Result<(), KernelError> {
    let e = params.check("norm_rows", src.len())?;
    check_len("norm_rows", "dst", src.len(), dst.len())?;
    let row = kernels().0;
    let body = |(d, s): (&mut [f32], &[f32])| {
        for (d, s) in d.chunks_exact_mut(e).zip(s.chunks_exact(e)) {
            // SAFETY: both rows hold `e` floats; the level was detected.
            unsafe {
                row(
                    s.as_ptr(),
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    d.as_mut_ptr(),
                    e,
                    &params,
                )
            };
        }
    };
    let n = e * ROW_CHUNK;
    match par {
        Par::Seq => dst.chunks_mut(n).zip(src.chunks(n)).for_each(body),
        Par::Rayon => dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(body),
    }
    Ok(())
}

/// The residual add and the norm in one pass (post-norm): `x = norm(x + residual)`.
pub fn add_norm_rows(x: &mut [f32], residual: &[f32], params: NormParams<'_>, par: Par) -> Result<(), KernelError> {
    let e = params.check("add_norm_rows", x.len())?;
    check_len("add_norm_rows", "residual", x.len(), residual.len())?;
    let row = kernels().0;
    let body = |(xs, rs): (&mut [f32], &[f32])| {
        for (x, r) in xs.chunks_exact_mut(e).zip(rs.chunks_exact(e)) {
            let p = x.as_mut_ptr();
            // SAFETY: both rows hold `e` floats; the kernel reads each element of `x` before
            // writing it; the level was detected.
            unsafe { row(p, r.as_ptr(), p, p, e, &params) };
        }
    };
    let n = e * ROW_CHUNK;
    match par {
        Par::Seq => x.chunks_mut(n).zip(residual.chunks(n)).for_each(body),
        Par::Rayon => x.par_chunks_mut(n).zip(residual.par_chunks(n)).for_each(body),
    }
    Ok(())
}

/// The residual add and the next norm in one pass (pre-norm): `x += residual`, `dst = norm(x)`.
pub fn add_then_norm_rows(
    x: &mut [f32],
    residual: &[f32],
    dst: &mut [f32],
    params: NormParams<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let e = params.check("add_then_norm_rows", x.len())?;
    check_len("add_then_norm_rows", "residual", x.len(), residual.len())?;
    check_len("add_then_norm_rows", "dst", x.len(), dst.len())?;
    let row = kernels().0;
    let body = |(ds, (xs, rs)): (&mut [f32], (&mut [f32], &[f32]))| {
        for ((d, x), r) in ds
            .chunks_exact_mut(e)
            .zip(xs.chunks_exact_mut(e))
            .zip(rs.chunks_exact(e))
        {
            let p = x.as_mut_ptr();
            // SAFETY: the three rows hold `e` floats; `x` is read before it is written.
            unsafe { row(p, r.as_ptr(), p, d.as_mut_ptr(), e, &params) };
        }
    };
    let n = e * ROW_CHUNK;
    match par {
        Par::Seq => dst
            .chunks_mut(n)
            .zip(x.chunks_mut(n).zip(residual.chunks(n)))
            .for_each(body),
        Par::Rayon => dst
            .par_chunks_mut(n)
            .zip(x.par_chunks_mut(n).zip(residual.par_chunks(n)))
            .for_each(body),
    }
    Ok(())
}

/// `x[n, j] = act(x[n, j] + bias[j])` over rows `x: [N, width]` (no bias: `act(x)`), in one
/// pass: the epilogue of a linear map.
pub fn bias_activation(
    x: &mut [f32],
    width: usize,
    bias: Option<&[f32]>,
    act: Activation,
    par: Par,
) -> Result<(), KernelError> {
    check_bias_activation(["bias_activation", "x"], x.len(), width, bias)?;
    if bias.is_none() && act == Activation::Identity {
        return Ok(());
    }
    let row = kernels().1;
    let body = |chunk: &mut [f32]| {
        let b = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        for r in chunk.chunks_exact_mut(width) {
            // SAFETY: the row and the bias hold `width` floats; the level was detected.
            unsafe { row(r.as_mut_ptr(), b, width, act) };
        }
    };
    let n = width * ELEMENT_CHUNK.div_ceil(width);
    match par {
        Par::Seq => x.chunks_mut(n).for_each(body),
        Par::Rayon => x.par_chunks_mut(n).for_each(body),
    }
    Ok(())
}

/// [`bias_activation`] from `src` into `dst` (both `[N, width]`): `dst[n, j] = act(src[n, j] +
/// bias[j])`, the same bits. Each row is copied and then activated while it is in L1, so the
/// input is read once, where a copy followed by [`bias_activation`] passes over memory twice.
pub fn bias_activation_from(
    dst: &mut [f32],
    src: &[f32],
    width: usize,
    bias: Option<&[f32]>,
    act: Activation,
    par: Par,
) -> Result<(), KernelError> {
    check_bias_activation(["bias_activation_from", "src"], src.len(), width, bias)?;
    check_len("bias_activation_from", "dst", src.len(), dst.len())?;
    let row = kernels().1;
    let body = |(d, s): (&mut [f32], &[f32])| {
        let b = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        for (r, x) in d.chunks_exact_mut(width).zip(s.chunks_exact(width)) {
            r.copy_from_slice(x);
            if !b.is_null() || act != Activation::Identity {
                // SAFETY: the row and the bias hold `width` floats; the level was detected.
                unsafe { row(r.as_mut_ptr(), b, width, act) };
            }
        }
    };
    let n = width * ELEMENT_CHUNK.div_ceil(width);
    match par {
        Par::Seq => dst.chunks_mut(n).zip(src.chunks(n)).for_each(body),
        Par::Rayon => dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(body),
    }
    Ok(())
}

/// Rows of `width` floats in the `len` of tensor `name`, and a bias of `width` when there is one.
fn check_bias_activation(
    [op, name]: [&'static str; 2],
    len: usize,
    width: usize,
    bias: Option<&[f32]>,
) -> Result<(), KernelError> {
    if width == 0 || !len.is_multiple_of(width) {
        return Err(KernelError::shape(
            op,
            name,
            vec![len.div_ceil(width.max(1)), width],
            vec![len],
        ));
    }
    if let Some(b) = bias {
        check_len(op, "bias", width, b.len())?;
    }
    Ok(())
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32], par: Par) -> Result<(), KernelError> {
    check_len("add_assign", "y", x.len(), y.len())?;
    // One addition per element, correctly rounded at every level: plain code vectorises.
    let body = |(a, b): (&mut [f32], &[f32])| a.iter_mut().zip(b).for_each(|(x, &y)| *x += y);
    match par {
        Par::Seq => x.chunks_mut(ELEMENT_CHUNK).zip(y.chunks(ELEMENT_CHUNK)).for_each(body),
        Par::Rayon => x
            .par_chunks_mut(ELEMENT_CHUNK)
            .zip(y.par_chunks(ELEMENT_CHUNK))
            .for_each(body),
    }
    Ok(())
}

/// The numerator coefficients of [`erf`] (in `x²`, highest first), Eigen's.
const ERF_A: [f32; 7] = [
    -2.726_142e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_6e-3,
    -1.609_603_3e-2,
];
/// The denominator coefficients of [`erf`].
const ERF_B: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329e-3,
    -1.426_474e-2,
];
/// Below this the exact GELU is 0: `erf` is clamped at `-4` here (`x = -4·√2`), where the
/// rational form leaves `1 + erf` a few ulp above 0 instead of `|x·Φ(x)| < 5e-8`, which a
/// huge `x` would multiply into a large wrong value.
const GELU_ZERO_BELOW: f32 = -5.656_854;
/// `√(2/π)`, for the tanh GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `erf(x)` in f32: a rational approximation `x·P(x²)/Q(x²)` on `[-4, 4]` (clamped outside,
/// where `|1 - |erf|| < 2e-8`), the one Eigen uses. The absolute error is below 5e-7 over the
/// real line; the vector levels evaluate the same polynomials.
#[inline]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ERF_A[1..].iter().fold(ERF_A[0], |acc, &c| acc * x2 + c) * x;
    let q = ERF_B[1..].iter().fold(ERF_B[0], |acc, &c| acc * x2 + c);
    p / q
}

/// The portable bodies: what [`SimdLevel::Scalar`] runs.
mod scalar;

/// The vector bodies, written once over the width.
#[cfg(target_arch = "x86_64")]
mod generic {
    use super::*;
    use crate::lanes::{exp, Lanes};

    /// `act(x)` per lane, the formulas of [`scalar::activate`].
    #[inline(always)]
    pub(super) unsafe fn activate<L: Lanes>(x: L::V, act: Activation) -> L::V {
        // SAFETY: the caller's entry point enables `L`'s features.
        unsafe {
            match act {
                Activation::Identity => x,
                // `max(0, x)` returns its second operand where either is NaN: NaN stays.
                Activation::Relu => L::max(L::splat(0.0), x),
                Activation::Gelu => {
                    let erf = erf::<L>(L::mul(x, L::splat(std::f32::consts::FRAC_1_SQRT_2)));
                    let y = L::mul(L::mul(L::splat(0.5), x), L::add(L::splat(1.0), erf));
                    L::zero_below(x, GELU_ZERO_BELOW, y)
                }
                Activation::GeluTanh => {
                    let x2 = L::mul(x, x);
                    let u = L::mul(
                        L::mul(L::splat(SQRT_2_OVER_PI), x),
                        L::fmadd(L::splat(0.044_715), x2, L::splat(1.0)),
                    );
                    let e = exp::<L>(L::mul(L::splat(-2.0), u));
                    L::div(x, L::add(L::splat(1.0), e))
                }
            }
        }
    }

    /// [`super::erf`] per lane.
    #[inline(always)]
    unsafe fn erf<L: Lanes>(x: L::V) -> L::V {
        // SAFETY: as above.
        unsafe {
            // `min(4, x)` keeps a NaN `x` (second operand), and so does the `max`.
            let x = L::max(L::splat(-4.0), L::min(L::splat(4.0), x));
            let x2 = L::mul(x, x);
            let mut p = L::splat(ERF_A[0]);
            for &c in &ERF_A[1..] {
                p = L::fmadd(p, x2, L::splat(c));
            }
            let mut q = L::splat(ERF_B[0]);
            for &c in &ERF_B[1..] {
                q = L::fmadd(q, x2, L::splat(c));
            }
            L::div(L::mul(p, x), q)
        }
    }

    /// # Safety
    /// `L`'s features enabled; as for [`NormRow`].
    #[inline(always)]
    pub(super) unsafe fn norm_row<L: Lanes>(
        src: *const f32,
        residual: *const f32,
        sum: *mut f32,
        dst: *mut f32,
        e: usize,
        p: &NormParams<'_>,
    ) {
        let body = e / L::N * L::N;
        let center = p.kind == NormKind::LayerNorm;
        // SAFETY: every pointer covers `e` floats (the caller's contract).
        unsafe {
            // Pass 1: x (+ residual), stored in `sum` when given; its sum, or sum of squares.
            let (mut acc0, mut acc1) = (L::splat(0.0), L::splat(0.0));
            let mut i = 0;
            while i < body {
                let mut v = L::load(src.add(i));
                if !residual.is_null() {
                    v = L::add(v, L::load(residual.add(i)));
                }
                if !sum.is_null() {
                    L::store(sum.add(i), v);
                }
                acc0 = if center { L::add(acc0, v) } else { L::fmadd(v, v, acc0) };
                std::mem::swap(&mut acc0, &mut acc1);
                i += L::N;
            }
            let mut total = L::hsum(L::add(acc0, acc1));
            for i in body..e {
                let mut v = *src.add(i);
                if !residual.is_null() {
                    v += *residual.add(i);
                }
                if !sum.is_null() {
                    *sum.add(i) = v;
                }
                total = if center { total + v } else { v.mul_add(v, total) };
            }
            let x: *const f32 = if sum.is_null() { src } else { sum };
            // Pass 2 (layer norm): the squared deviations from the mean.
            let (mean, var) = if center {
                let mean = total / e as f32;
                let mv = L::splat(mean);
                let (mut acc0, mut acc1) = (L::splat(0.0), L::splat(0.0));
                let mut i = 0;
                while i < body {
                    let c = L::sub(L::load(x.add(i)), mv);
                    acc0 = L::fmadd(c, c, acc0);
                    std::mem::swap(&mut acc0, &mut acc1);
                    i += L::N;
                }
                let mut dev = L::hsum(L::add(acc0, acc1));
                for i in body..e {
                    let c = *x.add(i) - mean;
                    dev = c.mul_add(c, dev);
                }
                (mean, dev / e as f32)
            } else {
                (0.0, total / e as f32)
            };
            let inv = (1.0 / (var as f64 + p.eps as f64).sqrt()) as f32;
            // Pass 3: `(x - mean) · inv · w (+ b)`.
            let (mv, iv) = (L::splat(mean), L::splat(inv));
            let w = p.weight.as_ptr();
            let mut i = 0;
            while i < body {
                let y = L::mul(L::mul(L::sub(L::load(x.add(i)), mv), iv), L::load(w.add(i)));
                let y = match p.bias {
                    Some(b) => L::add(y, L::load(b.as_ptr().add(i))),
                    None => y,
                };
                L::store(dst.add(i), y);
                i += L::N;
            }
            for i in body..e {
                let y = (*x.add(i) - mean) * inv * *w.add(i);
                *dst.add(i) = match p.bias {
                    Some(b) => y + b[i],
                    None => y,
                };
            }
        }
    }

    /// # Safety
    /// `L`'s features enabled; as for [`BiasActRow`].
    #[inline(always)]
    pub(super) unsafe fn bias_act_row<L: Lanes>(x: *mut f32, bias: *const f32, n: usize, act: Activation) {
        let body = n / L::N * L::N;
        // SAFETY: `x` (and `bias` unless null) cover `n` floats.
        unsafe {
            let mut i = 0;
            while i < body {
                let mut v = L::load(x.add(i));
                if !bias.is_null() {
                    v = L::add(v, L::load(bias.add(i)));
                }
                L::store(x.add(i), activate::<L>(v, act));
                i += L::N;
            }
            if body < n {
                // The tail through the same vector code on a padded copy.
                let mut buf = [0.0f32; 16];
                for (k, slot) in buf.iter_mut().enumerate().take(n - body) {
                    let b = if bias.is_null() { 0.0 } else { *bias.add(body + k) };
                    *slot = *x.add(body + k) + b;
                }
                L::store(buf.as_mut_ptr(), activate::<L>(L::load(buf.as_ptr()), act));
                for (k, &v) in buf.iter().enumerate().take(n - body) {
                    *x.add(body + k) = v;
                }
            }
        }
    }
}

/// One vector level's entry points.
macro_rules! layer_level {
    ($module:ident, $lanes:ty, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::*;

            /// # Safety
            /// The level's features must be available; as for [`NormRow`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn norm_row(
                src: *const f32,
                residual: *const f32,
                sum: *mut f32,
                dst: *mut f32,
                e: usize,
                p: &NormParams<'_>,
            ) {
                // SAFETY: this function enables the level's features; pointers by contract.
                unsafe { generic::norm_row::<$lanes>(src, residual, sum, dst, e, p) }
            }

            /// # Safety
            /// The level's features must be available; as for [`BiasActRow`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn bias_act_row(x: *mut f32, bias: *const f32, n: usize, act: Activation) {
                // SAFETY: as above.
                unsafe { generic::bias_act_row::<$lanes>(x, bias, n, act) }
            }
        }
    };
}

layer_level!(avx2, crate::lanes::Avx2, "avx2,fma");
layer_level!(
    avx512,
    crate::lanes::Avx512,
    "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
);

#[cfg(test)]
mod tests;
