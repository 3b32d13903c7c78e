//! The layer kernels of every level this CPU has against f64 evaluations of their definitions,
//! and the public entries against the row kernels (thread-count independence, shapes, errors).

use super::*;
use crate::testing::random_vec;

/// The row kernels of one level.
struct Level {
    name: &'static str,
    norm: NormRow,
    bias_act: BiasActRow,
}

fn levels() -> Vec<Level> {
    let mut out = vec![Level {
        name: "scalar",
        norm: scalar::norm_row,
        bias_act: scalar::bias_act_row,
    }];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            out.push(Level {
                name: "avx2",
                norm: avx2::norm_row,
                bias_act: avx2::bias_act_row,
            });
        }
        if crate::simd::detect() == SimdLevel::Avx512 {
            out.push(Level {
                name: "avx512",
                norm: avx512::norm_row,
                bias_act: avx512::bias_act_row,
            });
        }
    }
    out
}

/// `norm(x)` in f64.
fn norm_f64(x: &[f64], p: &NormParams<'_>) -> Vec<f64> {
    let e = x.len() as f64;
    let (mean, var) = match p.kind {
        NormKind::LayerNorm => {
            let mean = x.iter().sum::<f64>() / e;
            (mean, x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / e)
        }
        NormKind::RmsNorm => (0.0, x.iter().map(|v| v * v).sum::<f64>() / e),
    };
    let inv = 1.0 / (var + p.eps as f64).sqrt();
    (0..x.len())
        .map(|i| (x[i] - mean) * inv * p.weight[i] as f64 + p.bias.map_or(0.0, |b| b[i] as f64))
        .collect()
}

#[test]
fn norms_match_f64_at_every_level() {
    for level in levels() {
        for e in [1, 7, 16, 33, 384, 4096] {
            // Rows offset from zero, so a mean that is not subtracted shows.
            let src: Vec<f32> = random_vec(e, 1).iter().map(|v| 3.0 + 2.0 * v).collect();
            let residual = random_vec(e, 2);
            let weight = random_vec(e, 3);
            let bias = random_vec(e, 4);
            for kind in [NormKind::LayerNorm, NormKind::RmsNorm] {
                // An eps far from the default, so a kernel that ignores it shows at e = 1.
                let p = NormParams {
                    kind,
                    weight: &weight,
                    bias: (kind == NormKind::LayerNorm).then_some(&bias[..]),
                    eps: 0.25,
                };
                for with_residual in [false, true] {
                    let x64: Vec<f64> = (0..e)
                        .map(|i| src[i] as f64 + if with_residual { residual[i] as f64 } else { 0.0 })
                        .collect();
                    let want = norm_f64(&x64, &p);
                    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                    let mut sum = vec![f32::NAN; e];
                    let mut dst = vec![f32::NAN; e];
                    let r = if with_residual {
                        residual.as_ptr()
                    } else {
                        std::ptr::null()
                    };
                    // SAFETY: the level was detected; every buffer holds `e` floats.
                    unsafe { (level.norm)(src.as_ptr(), r, sum.as_mut_ptr(), dst.as_mut_ptr(), e, &p) };
                    for i in 0..e {
                        let err = (dst[i] as f64 - want[i]).abs() / scale;
                        // Measured below 1e-6 at e = 4096.
                        assert!(
                            err < 1e-5,
                            "{} {kind:?} e {e} residual {with_residual} [{i}]: {} vs {} ({err:e})",
                            level.name,
                            dst[i],
                            want[i]
                        );
                        let x = if with_residual { src[i] + residual[i] } else { src[i] };
                        assert_eq!(sum[i], x, "{} the stored sum [{i}]", level.name);
                    }
                }
            }
        }
    }
}

fn activate_f64(x: f64, act: Activation) -> f64 {
    match act {
        Activation::Identity => x,
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + inner.tanh())
        }
    }
}

#[test]
fn activations_match_f64_at_every_level() {
    let n = 20_003;
    let x: Vec<f32> = (0..n).map(|i| -12.0 + 24.0 * i as f32 / (n - 1) as f32).collect();
    let bias: Vec<f32> = random_vec(n, 5).iter().map(|v| 0.25 * v).collect();
    for level in levels() {
        for act in [
            Activation::Identity,
            Activation::Relu,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            for with_bias in [false, true] {
                let mut got = x.clone();
                let b = if with_bias { bias.as_ptr() } else { std::ptr::null() };
                // SAFETY: the level was detected; `got` and `bias` hold `n` floats.
                unsafe { (level.bias_act)(got.as_mut_ptr(), b, n, act) };
                for i in 0..n {
                    let input = x[i] + if with_bias { bias[i] } else { 0.0 };
                    let want = activate_f64(input as f64, act);
                    let err = (got[i] as f64 - want).abs() / (input.abs() as f64).max(1.0);
                    // Measured below 6e-7 (the erf and exp approximations plus f32 rounding).
                    assert!(
                        err < 2e-6,
                        "{} {act:?} bias {with_bias} x = {input}: {} vs {want} ({err:e})",
                        level.name,
                        got[i]
                    );
                }
            }
        }
    }
}

/// Non-finite and huge inputs: what PyTorch 2.15 gives (`F.relu`, `F.gelu`, both
/// approximations), except the exact GELU of `±inf`, which is NaN there and the limits here.
#[test]
fn activations_of_non_finite_and_huge_values_at_every_level() {
    let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, 1e30, -1e30, -20.0];
    let nan = f32::NAN;
    let expected = [
        (Activation::Relu, [nan, f32::INFINITY, 0.0, 0.0, 1e30, 0.0, 0.0]),
        (Activation::Gelu, [nan, f32::INFINITY, 0.0, 0.0, 1e30, 0.0, 0.0]),
        (Activation::GeluTanh, [nan, f32::INFINITY, nan, 0.0, 1e30, 0.0, 0.0]),
    ];
    for level in levels() {
        for (act, want) in expected {
            let mut got = special;
            // SAFETY: the level was detected; `got` holds 7 floats.
            unsafe { (level.bias_act)(got.as_mut_ptr(), std::ptr::null(), special.len(), act) };
            for i in 0..special.len() {
                // Within one ulp (the exact GELU of 1e30 is 1 - 6e-8 of it).
                let close = (got[i] - want[i]).abs() <= want[i].abs() * f32::EPSILON;
                let same = (got[i].is_nan() && want[i].is_nan()) || got[i] == want[i] || close;
                assert!(
                    same,
                    "{} {act:?}({}) = {}, expected {}",
                    level.name, special[i], got[i], want[i]
                );
            }
        }
    }
}

#[test]
fn erf_is_accurate() {
    let mut worst = 0.0f64;
    for i in -80_000..=80_000 {
        let x = i as f64 / 10_000.0;
        worst = worst.max((erf(x as f32) as f64 - libm::erf(x)).abs());
    }
    assert!(worst < 5e-7, "worst absolute error {worst:e}");
    assert_eq!(erf(f32::INFINITY), erf(4.0));
}

/// The public entries: the running level's row kernel on every row, the same bits on this
/// thread and on the pool, the fused forms equal to the unfused ones.
#[test]
fn entries_are_row_kernels_and_thread_count_independent() {
    let (rows, e) = (37, 96);
    let x = random_vec(rows * e, 6);
    let residual = random_vec(rows * e, 7);
    let weight = random_vec(e, 8);
    let bias = random_vec(e, 9);
    let p = NormParams {
        kind: NormKind::LayerNorm,
        weight: &weight,
        bias: Some(&bias),
        eps: 1e-5,
    };
    let sum: Vec<f32> = x.iter().zip(&residual).map(|(a, b)| a + b).collect();
    let mut want = vec![0.0; rows * e];
    norm_rows(&mut want, &sum, p, Par::Seq).unwrap();
    let row = kernels().0;
    for r in 0..rows {
        let mut one = vec![0.0; e];
        // SAFETY: the running level was detected; rows hold `e` floats.
        unsafe {
            row(
                sum[r * e..].as_ptr(),
                std::ptr::null(),
                std::ptr::null_mut(),
                one.as_mut_ptr(),
                e,
                &p,
            )
        };
        assert_eq!(one, want[r * e..(r + 1) * e], "row {r}");
    }
    let mut want_y = sum.clone();
    bias_activation(&mut want_y, e, Some(&bias), Activation::Gelu, Par::Seq).unwrap();
    for (i, v) in want_y.iter().enumerate() {
        let input = sum[i] as f64 + bias[i % e] as f64;
        assert!(
            (*v as f64 - activate_f64(input, Activation::Gelu)).abs() < 2e-6,
            "gelu [{i}]"
        );
    }
    for par in [Par::Seq, Par::Rayon] {
        let mut got = vec![0.0; rows * e];
        norm_rows(&mut got, &sum, p, par).unwrap();
        assert_eq!(got, want, "norm_rows {par:?}");
        let mut post = x.clone();
        add_norm_rows(&mut post, &residual, p, par).unwrap();
        assert_eq!(post, want, "add_norm_rows {par:?}");
        let (mut pre, mut out) = (x.clone(), vec![0.0; rows * e]);
        add_then_norm_rows(&mut pre, &residual, &mut out, p, par).unwrap();
        assert_eq!((&pre, &out), (&sum, &want), "add_then_norm_rows {par:?}");
        let mut added = x.clone();
        add_assign(&mut added, &residual, par).unwrap();
        assert_eq!(added, sum, "add_assign {par:?}");
        let mut y = sum.clone();
        bias_activation(&mut y, e, Some(&bias), Activation::Gelu, par).unwrap();
        assert_eq!(y, want_y, "bias_activation {par:?}");
        // From another buffer: the same bits, every element written, the source untouched.
        let mut from = vec![f32::NAN; rows * e];
        bias_activation_from(&mut from, &sum, e, Some(&bias), Activation::Gelu, par).unwrap();
        assert_eq!(from, want_y, "bias_activation_from {par:?}");
        for (act, bias) in [
            (Activation::Relu, None),
            (Activation::Identity, None),
            (Activation::Identity, Some(&bias)),
        ] {
            let mut want = sum.clone();
            bias_activation(&mut want, e, bias.map(|b| &b[..]), act, par).unwrap();
            let mut got = vec![f32::NAN; rows * e];
            bias_activation_from(&mut got, &sum, e, bias.map(|b| &b[..]), act, par).unwrap();
            assert_eq!(got, want, "bias_activation_from {act:?}, bias {}", bias.is_some());
        }
    }
}

#[test]
fn bad_shapes_and_parameters_are_typed_errors() {
    let w = [1.0f32; 4];
    let p = NormParams {
        kind: NormKind::LayerNorm,
        weight: &w,
        bias: None,
        eps: 1e-5,
    };
    let x = [0.0f32; 10];
    let mut dst = [0.0f32; 10];
    let err = norm_rows(&mut dst, &x, p, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("norm_rows: `x` has shape [10]"), "{err}");
    let mut short = [0.0f32; 8];
    let err = norm_rows(&mut short, &x[..8], NormParams { eps: -1.0, ..p }, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("eps is -1"), "{err}");
    let b = [0.0f32; 3];
    let err = norm_rows(&mut short, &x[..8], NormParams { bias: Some(&b), ..p }, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("`bias` has shape [3], expected [4]"), "{err}");
    let rms_bias = NormParams {
        kind: NormKind::RmsNorm,
        bias: Some(&w),
        ..p
    };
    assert!(norm_rows(&mut short, &x[..8], rms_bias, Par::Seq).is_err());
    let mut y = [0.0f32; 8];
    let err = add_norm_rows(&mut y, &x, p, Par::Seq).unwrap_err();
    assert!(
        err.to_string().contains("`residual` has shape [10], expected [8]"),
        "{err}"
    );
    let err = bias_activation(&mut y, 3, None, Activation::Relu, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("bias_activation"), "{err}");
    let err = bias_activation(&mut y, 4, Some(&b), Activation::Relu, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("`bias` has shape [3], expected [4]"), "{err}");
    assert!(add_assign(&mut y, &x, Par::Seq).is_err());
    let err = bias_activation_from(&mut y, &x[..9], 3, None, Activation::Relu, Par::Seq).unwrap_err();
    assert!(
        err.to_string()
            .contains("bias_activation_from: `dst` has shape [8], expected [9]"),
        "{err}"
    );
    let err = bias_activation_from(&mut y, &x[..8], 3, None, Activation::Relu, Par::Seq).unwrap_err();
    assert!(
        err.to_string().contains("bias_activation_from: `src` has shape [8]"),
        "{err}"
    );
    let err = bias_activation_from(&mut y, &x[..8], 4, Some(&b), Activation::Relu, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("`bias` has shape [3], expected [4]"), "{err}");
    assert_eq!(y, [0.0; 8], "written after an error");
}
