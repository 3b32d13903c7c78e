//! The portable bodies of the row kernels: what [`SimdLevel::Scalar`] runs, and the formulas
//! the vector bodies follow.

use super::*;

pub(super) fn activate(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Identity => x,
        Activation::Relu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            if x < GELU_ZERO_BELOW {
                0.0
            } else {
                0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
            }
        }
        Activation::GeluTanh => {
            let u = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
            x / (1.0 + exp_scalar(-2.0 * u))
        }
    }
}

/// # Safety
/// As for [`NormRow`]: every pointer covers `e` floats (or is null where allowed).
pub(super) unsafe fn norm_row(
    src: *const f32,
    residual: *const f32,
    sum: *mut f32,
    dst: *mut f32,
    e: usize,
    p: &NormParams<'_>,
) {
    // SAFETY: the caller guarantees `e` floats behind each non-null pointer.
    unsafe {
        let x = |i: usize| {
            let v = *src.add(i);
            if residual.is_null() {
                v
            } else {
                v + *residual.add(i)
            }
        };
        let center = p.kind == NormKind::LayerNorm;
        let mut total = 0.0f32;
        for i in 0..e {
            let v = x(i);
            if !sum.is_null() {
                *sum.add(i) = v;
            }
            total = if center { total + v } else { total + v * v };
        }
        let stored = |i: usize| if sum.is_null() { *src.add(i) } else { *sum.add(i) };
        let (mean, var) = if center {
            let mean = total / e as f32;
            let mut dev = 0.0f32;
            for i in 0..e {
                let c = stored(i) - mean;
                dev += c * c;
            }
            (mean, dev / e as f32)
        } else {
            (0.0, total / e as f32)
        };
        let inv = (1.0 / (var as f64 + p.eps as f64).sqrt()) as f32;
        for i in 0..e {
            let y = (stored(i) - mean) * inv * p.weight[i];
            *dst.add(i) = match p.bias {
                Some(b) => y + b[i],
                None => y,
            };
        }
    }
}

/// # Safety
/// As for [`BiasActRow`].
pub(super) unsafe fn bias_act_row(x: *mut f32, bias: *const f32, n: usize, act: Activation) {
    // SAFETY: the caller guarantees `n` floats behind `x` (and `bias` unless null).
    unsafe {
        for i in 0..n {
            let b = if bias.is_null() { 0.0 } else { *bias.add(i) };
            *x.add(i) = activate(*x.add(i) + b, act);
        }
    }
}
