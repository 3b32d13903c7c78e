//! The public linear maps of token rows (`linear`, `linear_packed`, `linear_bf16`) against an
//! f64 reference: a sub-range of a weight's rows, strided input rows, a destination wider than
//! the output (the columns past it untouched), with and without a bias, on a product small
//! enough for faer's GEMM and one large enough for attn's own where the CPU runs it.

use attn_core::kernels::testing::random_vec as random;
use attn_core::kernels::{round_to_bf16, Par, View2};
use attn_core::{linear, linear_bf16, linear_packed, pack_weight, pack_weight_f32, Tensor};

/// `x[r, :] · w[rows, :]ᵀ (+ bias)` in f64, `x` read with row stride `x_stride`.
fn reference(
    x: &[f32],
    x_stride: usize,
    n: usize,
    w: &[f32],
    rows: std::ops::Range<usize>,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(n * rows.len());
    for r in 0..n {
        for (j, o) in rows.clone().enumerate() {
            let dot: f64 = (0..k).map(|i| x[r * x_stride + i] as f64 * w[o * k + i] as f64).sum();
            out.push(dot + bias.map_or(0.0, |b| b[j] as f64));
        }
    }
    out
}

/// The largest difference of the `out` columns of each `dst` row from `want`, and whether
/// every column past them kept its sentinel.
fn compare(dst: &[f32], stride: usize, n: usize, out: usize, want: &[f64]) -> (f64, bool) {
    let mut worst = 0.0f64;
    let mut kept = true;
    for r in 0..n {
        for c in 0..stride {
            let got = dst[r * stride + c];
            if c < out {
                worst = worst.max((got as f64 - want[r * out + c]).abs());
            } else {
                kept &= got == -7.0;
            }
        }
    }
    (worst, kept)
}

#[test]
fn linear_maps_match_the_f64_reference() {
    // [n, k] · rows 8..8+out of a [out + 16, k] weight: 9 x 40 x 24 (faer) and 96 x 128 x 160
    // (2.0M multiply-adds: attn's own GEMM where it is the default).
    for (n, k, out) in [(9usize, 40usize, 24usize), (96, 128, 160)] {
        let w = random((out + 16) * k, 1);
        let rows = 8..8 + out;
        let bias_values = random(out, 2);
        let x_stride = k + 3;
        let x_data = random(n * x_stride, 3);
        let x = View2::new(&x_data, [n, k], [x_stride, 1]).unwrap();
        let stride = out + 5;
        let weight = Tensor::new("w", vec![out + 16, k], w.clone()).unwrap();
        let f32_panels = pack_weight_f32(&weight, rows.clone()).unwrap();
        let bf16_panels = pack_weight(&w, rows.clone(), k).unwrap();
        let rounded = |v: &[f32]| v.iter().map(|&a| round_to_bf16(a)).collect::<Vec<f32>>();
        let (w_bf16, x_bf16) = (rounded(&w), rounded(&x_data));
        for bias in [None, Some(&bias_values[..])] {
            let want = reference(&x_data, x_stride, n, &w, rows.clone(), k, bias);
            let want_bf16 = reference(&x_bf16, x_stride, n, &w_bf16, rows.clone(), k, bias);
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let run = |name: &str, f: &dyn Fn(&mut [f32]), want: &[f64], tol: f64| {
                let mut dst = vec![-7.0f32; n * stride];
                f(&mut dst);
                let (worst, kept) = compare(&dst, stride, n, out, want);
                let what = format!("{name} {n}x{k}x{out}, bias {}", bias.is_some());
                assert!(worst <= tol * scale, "{what}: off by {worst:e}");
                assert!(kept, "{what}: wrote past the output columns");
            };
            // Measured at most 1.5e-7 of the largest output (f32 and bf16, both GEMMs); about 10x.
            run(
                "linear",
                &|d| linear(d, stride, x, &w, rows.clone(), k, bias, Par::Rayon).unwrap(),
                &want,
                2e-6,
            );
            let panels = (&w[..], rows.clone(), k);
            run(
                "linear_packed",
                &|d| linear_packed(d, stride, x, panels.clone(), Some(&f32_panels), bias, Par::Rayon).unwrap(),
                &want,
                2e-6,
            );
            // bf16: the rounded operands' exact products, summed in f32.
            run(
                "linear_bf16",
                &|d| linear_bf16(d, stride, x, &bf16_panels, bias, Par::Rayon).unwrap(),
                &want_bf16,
                2e-6,
            );
        }
        // A destination too short for the rows, and an input of another width: typed errors.
        let mut short = vec![0.0f32; (n - 1) * stride + out - 1];
        assert!(linear(&mut short, stride, x, &w, rows.clone(), k, None, Par::Rayon).is_err());
        let narrow = View2::new(&x_data, [n, k - 1], [x_stride, 1]).unwrap();
        let mut dst = vec![0.0f32; n * stride];
        assert!(linear(&mut dst, stride, narrow, &w, rows.clone(), k, None, Par::Rayon).is_err());
    }
}
