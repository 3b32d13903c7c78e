//! The backward pass against its f64 definition (itself checked by finite differences), on both
//! paths, every option of the forward, and 1, 2, 3, 8 threads.

use super::*;
use crate::flash::tests::{arb_case, view4, view4_mut, Case, CaseData, MaskKind, MaskShape};
use crate::testing::random_vec;
use crate::{attention_backward_reference, attention_reference, flash_attention, Causal, ForwardInputs, ViewMut};
use proptest::prelude::*;

/// `[B, X, L, W]` row-major (the reference's layout) as the case stores it.
fn to_storage(want: &[f64], [b, x, l, w]: [usize; 4], bshd: bool) -> Vec<f64> {
    if !bshd {
        return want.to_vec();
    }
    let mut out = vec![0.0; want.len()];
    for bi in 0..b {
        for xi in 0..x {
            for li in 0..l {
                for c in 0..w {
                    out[((bi * l + li) * x + xi) * w + c] = want[((bi * x + xi) * l + li) * w + c];
                }
            }
        }
    }
    out
}

/// `max |got - want| / max(1, max |want|)`: the error relative to the largest value, NaN where
/// exactly one side is NaN counted as infinite.
fn relative_to_largest(got: &[f32], want: &[f64]) -> f64 {
    let scale = want
        .iter()
        .filter(|w| w.is_finite())
        .fold(1.0f64, |m, w| m.max(w.abs()));
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let g = g as f64;
            if g == w || (g.is_nan() && w.is_nan()) {
                0.0
            } else if g.is_nan() || w.is_nan() {
                f64::INFINITY
            } else {
                (g - w).abs() / scale
            }
        })
        .fold(0.0, f64::max)
}

/// The largest error measured over these tests, relative to the largest gradient, for scores of
/// order 1: 9.8e-7 (Zen 4 at avx512; 4.9e-7 at avx2, 5.5e-7 scalar). The bound is about 10×
/// that. Large scores add their own rounding (2.6e-5 with ALiBi scores of 549), bounded by the
/// score term in `check`.
const TOLERANCE: f64 = 1e-5;

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Runs `case` forward (the flash kernel), then backward on both paths (sequential and on 1, 2,
/// 3 and 8 threads), against the f64 reference; bit-identity across thread counts.
fn check(case: Case) {
    let Case {
        b,
        h,
        g,
        s,
        t,
        d,
        dv,
        bshd,
        ..
    } = case;
    let data = CaseData::new(&case);
    let options = data.options(&case);
    let (qv, kv, vv) = (
        view4(&data.q, [b, h, s, d], bshd),
        view4(&data.k, [b, g, t, d], bshd),
        view4(&data.v, [b, g, t, dv], bshd),
    );
    let mut out = vec![f32::NAN; b * h * s * dv];
    let mut lse = vec![f32::NAN; b * h * s];
    let mut lse_lo = vec![f32::NAN; b * h * s];
    // The forward as training runs it: `lse` with its rounding error beside it.
    crate::flash::flash_impl(
        view4_mut(&mut out, [b, h, s, dv], bshd),
        [
            Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
            Some(ViewMut::contiguous(&mut lse_lo, [b, h, s]).unwrap()),
        ],
        ForwardInputs::new(qv, kv, vv),
        &options,
        Par::Rayon,
        true,
        None,
    )
    .unwrap();
    let dout = random_vec(b * h * s * dv, 21);
    let inputs = BackwardInputs {
        q: qv,
        k: kv,
        v: vv,
        out: view4(&out, [b, h, s, dv], bshd),
        lse: View::contiguous(&lse, [b, h, s]).unwrap(),
        lse_lo: Some(View::contiguous(&lse_lo, [b, h, s]).unwrap()),
        dout: view4(&dout, [b, h, s, dv], bshd),
    };
    let reference = attention_backward_reference(qv, kv, vv, inputs.dout, &options);
    let want = [
        to_storage(&reference.dq, [b, h, s, d], bshd),
        to_storage(&reference.dk, [b, g, t, d], bshd),
        to_storage(&reference.dv, [b, g, t, dv], bshd),
    ];
    let run = |path: BackwardPath, par: Par| -> Grads {
        let mut dq = vec![f32::NAN; b * h * s * d];
        let mut dk = vec![f32::NAN; b * g * t * d];
        let mut dvv = vec![f32::NAN; b * g * t * dv];
        let grads = Gradients {
            dq: view4_mut(&mut dq, [b, h, s, d], bshd),
            dk: view4_mut(&mut dk, [b, g, t, d], bshd),
            dv: view4_mut(&mut dvv, [b, g, t, dv], bshd),
        };
        attention_backward_path(grads, inputs, &options, par, path).unwrap();
        (dq, dk, dvv)
    };
    let what = format!("{case:?}");
    // As in the forward's tests, f32 scores carry half an ulp of the largest score.
    let forward = attention_reference(qv, kv, vv, &options);
    let tol = TOLERANCE + 4.0 * f32::EPSILON as f64 * forward.max_abs_score;
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let bits = |g: &Grads| [&g.0, &g.1, &g.2].map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    let mut by_path = Vec::new();
    for path in [BackwardPath::OnePass, BackwardPath::TwoPass, BackwardPath::Unfused] {
        let seq = run(path, Par::Seq);
        for (name, got, want) in [
            ("dq", &seq.0, &want[0]),
            ("dk", &seq.1, &want[1]),
            ("dv", &seq.2, &want[2]),
        ] {
            let err = relative_to_largest(got, want);
            assert!(err <= tol, "{path:?} {name}: error {err:e} > {tol:e}: {what}");
        }
        for n in [1, 2, 3, 8] {
            let many = pool(n).install(|| run(path, Par::Rayon));
            assert_eq!(
                bits(&seq),
                bits(&many),
                "{path:?}: {n} threads differ from sequential: {what}"
            );
        }
        by_path.push(seq);
    }
    // The one pass in smaller blocks of keys (a block of 48 is an odd number of panels): the
    // bits of its default block where the tile kernel computes every product, which takes each
    // sum from memory and adds in order; within rounding where faer's GEMM computes some.
    let k_contiguous = inputs.k.strides()[3] == 1;
    let all_on_tile = crate::scores::ScoreKernel::for_call(s * h / g, k_contiguous) == crate::scores::ScoreKernel::Tile
        && k_contiguous
        && d % crate::tile::NR == 0
        && dv % crate::tile::NR == 0;
    for keys in [16, 48] {
        let run_blocks = |par: Par| -> Grads {
            let mut dq = vec![f32::NAN; b * h * s * d];
            let mut dk = vec![f32::NAN; b * g * t * d];
            let mut dvv = vec![f32::NAN; b * g * t * dv];
            let grads = Gradients {
                dq: view4_mut(&mut dq, [b, h, s, d], bshd),
                dk: view4_mut(&mut dk, [b, g, t, d], bshd),
                dv: view4_mut(&mut dvv, [b, g, t, dv], bshd),
            };
            backward_in_blocks(grads, inputs, &options, par, BackwardPath::OnePass, keys).unwrap();
            (dq, dk, dvv)
        };
        let blocks = run_blocks(Par::Seq);
        assert_eq!(
            bits(&blocks),
            bits(&pool(3).install(|| run_blocks(Par::Rayon))),
            "one pass in blocks of {keys}: 3 threads differ from sequential: {what}"
        );
        if all_on_tile {
            assert_eq!(
                bits(&blocks),
                bits(&by_path[0]),
                "one pass in blocks of {keys}: other bits than its default block: {what}"
            );
        }
        for (name, got, want) in [
            ("dq", &blocks.0, &want[0]),
            ("dk", &blocks.1, &want[1]),
            ("dv", &blocks.2, &want[2]),
        ] {
            let err = relative_to_largest(got, want);
            assert!(
                err <= tol,
                "one pass in blocks of {keys} {name}: error {err:e} > {tol:e}: {what}"
            );
        }
    }
    // The fused paths against the unfused one, directly.
    let unfused = &by_path[2];
    for fused in &by_path[..2] {
        for (name, got, want) in [
            ("dq", &fused.0, &unfused.0),
            ("dk", &fused.1, &unfused.1),
            ("dv", &fused.2, &unfused.2),
        ] {
            let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            let err = relative_to_largest(got, &want);
            assert!(err <= 2.0 * tol, "fused vs unfused {name}: error {err:e}: {what}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn backward_matches_reference_for_every_shape(case in arb_case()) {
        check(case);
    }
}

/// The path is a function of the shape alone, by the thresholds its constants document: unfused
/// up to 128 × 128 scores, one pass up to 512 keys, and at any length when it makes 4 tasks
/// (from 4 `(b, g)`, or fewer with their rows in chunks, one per 256 rows, or past 512 keys per
/// 128 and then per 64 where larger ones make too few, whose partial sums fit the budget), two
/// passes otherwise. The paths agree only within rounding, so moving a threshold changes the
/// bits some shapes get.
#[test]
fn the_path_follows_the_documented_thresholds() {
    use BackwardPath::{OnePass, TwoPass, Unfused};
    for (groups, s, t, widths, want, chunks) in [
        (1, 128, 128, 128, Unfused, 1),
        (64, 1, 16_384, 128, Unfused, 1),
        (1, 129, 128, 128, OnePass, 1),
        (1, 1024, 512, 128, OnePass, 4),
        (1, usize::MAX, 2, 128, OnePass, 8),
        (8, 1024, 513, 128, OnePass, 1),
        (1000, 1 << 20, 1 << 20, 128, OnePass, 1),
        // Beyond 512 keys: 4 tasks or two passes; chunks of 128 rows where 256 make too few,
        // of 64 where 128 do.
        (1, 512, 1024, 128, OnePass, 4),
        (1, 385, 1024, 128, OnePass, 4),
        (1, 384, 1024, 128, OnePass, 6),
        (1, 193, 1024, 128, OnePass, 4),
        (1, 192, 1024, 128, TwoPass, 3),
        (1, 1024, 1024, 128, OnePass, 4),
        (1, 8192, 1024, 128, OnePass, 8),
        (2, 129, 2048, 128, OnePass, 2),
        (2, 128, 2048, 128, OnePass, 2),
        (2, 65, 2048, 128, OnePass, 2),
        (2, 64, 2048, 128, TwoPass, 1),
        (3, 256, 4096, 128, OnePass, 2),
        (3, 257, 4096, 128, OnePass, 2),
        (3, 65, 4096, 128, OnePass, 2),
        (3, 64, 4096, 128, TwoPass, 1),
        (4, 64, 4096, 128, OnePass, 1),
        (7, 1024, 513, 128, OnePass, 2),
        // Partial sums of 2^16 keys: 8 chunks take 2^25 floats at 64 columns (the budget), 4
        // at 128; at 2^17 keys 2 chunks fit.
        (1, 4096, 1 << 16, 64, OnePass, 8),
        (1, 4096, 1 << 16, 128, OnePass, 4),
        (1, 4096, 1 << 17, 128, TwoPass, 2),
        (3, 1024, 1 << 20, 128, TwoPass, 1),
        (7, 1024, 1 << 20, 128, OnePass, 1),
    ] {
        let what = format!("B·G {groups}, S {s}, T {t}, D + Dv {widths}");
        assert_eq!(backward_path(groups, s, t, widths), want, "{what}");
        assert_eq!(row_chunks(groups, s, t, widths), chunks, "{what}");
    }
}

#[test]
fn block_edges_gqa_and_dv() {
    for (s, t) in [(1, 1), (15, 17), (63, 65), (64, 128), (65, 129), (127, 257), (129, 600)] {
        check(Case::new(1, 4, 2, s, t, 16, 24));
    }
    check(Case::new(2, 6, 3, 65, 129, 17, 5));
    check(Case::new(1, 8, 1, 33, 700, 64, 64));
    // Rows in 4 chunks (2 `(b, g)`), keys in 3 blocks: the partial sums and their reduction.
    check(Case::new(1, 4, 2, 777, 600, 32, 16));
    // One `(b, g)`, 200 rows past 512 keys: 4 chunks of a row tile each, the last of 8 rows.
    check(Case::new(1, 2, 1, 200, 600, 16, 16));
}

#[test]
fn causal_masks_lengths_alibi_scale_and_strides() {
    for causal in [Causal::TopLeft, Causal::BottomRight] {
        for (s, t) in [(100, 100), (70, 600), (600, 70), (900, 700)] {
            let mut case = Case::new(1, 2, 1, s, t, 16, 16);
            case.causal = causal;
            check(case);
        }
    }
    let mut case = Case::new(2, 4, 2, 40, 300, 8, 8);
    case.mask = MaskKind::Additive(MaskShape::Full);
    case.lengths = true;
    case.key_mask = true;
    case.alibi = true;
    case.scale = Some(0.3);
    case.bshd = true;
    check(case);
    let mut case = Case::new(2, 2, 2, 17, 600, 8, 8);
    case.mask = MaskKind::Allowed(MaskShape::Padding);
    check(case);
}

/// Central differences of `L = Σ out ∘ dout` through the f64 forward reference, against the
/// f64 backward reference, for a few elements of q, k and v (masks, GQA, causal and ALiBi on).
#[test]
fn reference_gradients_match_finite_differences() {
    let (b, h, g, s, t, d, dv) = (1, 4, 2, 5, 7, 3, 2);
    let mut case = Case::new(b, h, g, s, t, d, dv);
    case.causal = Causal::BottomRight;
    case.mask = MaskKind::Additive(MaskShape::TwoD);
    case.alibi = true;
    let mut data = CaseData::new(&case);
    let dout = random_vec(b * h * s * dv, 22);
    let loss = |data: &CaseData| -> f64 {
        let options = data.options(&case);
        let q = View4::contiguous(&data.q, [b, h, s, d]).unwrap();
        let k = View4::contiguous(&data.k, [b, g, t, d]).unwrap();
        let v = View4::contiguous(&data.v, [b, g, t, dv]).unwrap();
        let r = attention_reference(q, k, v, &options);
        r.out.iter().zip(&dout).map(|(o, &w)| o * w as f64).sum()
    };
    let grads = {
        let options = data.options(&case);
        attention_backward_reference(
            View4::contiguous(&data.q, [b, h, s, d]).unwrap(),
            View4::contiguous(&data.k, [b, g, t, d]).unwrap(),
            View4::contiguous(&data.v, [b, g, t, dv]).unwrap(),
            View4::contiguous(&dout, [b, h, s, dv]).unwrap(),
            &options,
        )
    };
    let step = 2f32.powi(-10);
    let mut worst = 0.0f64;
    for (tensor, analytic) in [("q", &grads.dq), ("k", &grads.dk), ("v", &grads.dv)] {
        for (i, &grad) in analytic.iter().enumerate() {
            let original = tensor_mut(&mut data, tensor)[i];
            let (up, down) = (original + step, original - step);
            tensor_mut(&mut data, tensor)[i] = up;
            let l_up = loss(&data);
            tensor_mut(&mut data, tensor)[i] = down;
            let l_down = loss(&data);
            tensor_mut(&mut data, tensor)[i] = original;
            let numeric = (l_up - l_down) / (up as f64 - down as f64);
            let err = (numeric - grad).abs() / (1.0 + grad.abs());
            worst = worst.max(err);
            // Central differences with a step of 2^-10: measured at most 5.3e-9 here.
            assert!(err < 1e-7, "d{tensor}[{i}]: numeric {numeric}, analytic {grad}");
        }
    }
    assert!(worst > 0.0, "the comparison compared nothing");
}

fn tensor_mut<'a>(data: &'a mut CaseData, name: &str) -> &'a mut Vec<f32> {
    match name {
        "q" => &mut data.q,
        "k" => &mut data.k,
        _ => &mut data.v,
    }
}

fn contiguous(x: &[f32], shape: [usize; 4]) -> View4<'_, f32> {
    View4::contiguous(x, shape).unwrap()
}

/// Backward inputs over contiguous buffers, every head its own key/value head: `q`, `out` and
/// `dout` `[B, H, S, D]`, `k` and `v` `[B, H, T, D]`, `lse` `[B, H, S]`, no `lse_lo`.
fn contiguous_inputs<'a>(
    [q, k, v, out, dout]: [&'a [f32]; 5],
    lse: &'a [f32],
    [b, h, s, t, d]: [usize; 5],
) -> BackwardInputs<'a> {
    BackwardInputs {
        q: contiguous(q, [b, h, s, d]),
        k: contiguous(k, [b, h, t, d]),
        v: contiguous(v, [b, h, t, d]),
        out: contiguous(out, [b, h, s, d]),
        lse: View::contiguous(lse, [b, h, s]).unwrap(),
        lse_lo: None,
        dout: contiguous(dout, [b, h, s, d]),
    }
}

/// A row with nothing to attend to (key length 0, or every key masked) passes no gradient:
/// zeros in its `dQ`, nothing in `dK` and `dV`. A NaN row (a NaN query) spreads NaN to its own
/// `dQ` and to the keys it sees, never to the keys hidden from it.
/// With no keys at all (T = 0) every row sees nothing: `dQ` is zero on every path, whatever
/// the destination held, and `dK`, `dV` are empty. With no rows (S = 0) `dK` and `dV` are zero.
#[test]
fn no_keys_or_no_rows_give_zero_gradients() {
    for (b, h, g, s, t) in [
        (1, 2, 1, 3, 0),
        (2, 8, 8, 300, 0),
        (1, 1, 1, 1000, 0),
        (1, 2, 1, 0, 5),
        (1, 1, 1, 0, 1000),
    ] {
        let d = 16;
        let q = random_vec(b * h * s * d, 1);
        let (k, v) = (random_vec(b * g * t * d, 2), random_vec(b * g * t * d, 3));
        let dout = random_vec(b * h * s * d, 4);
        let options = AttentionOptions::default();
        let (mut out, mut lse) = (vec![f32::NAN; b * h * s * d], vec![f32::NAN; b * h * s]);
        let (qv, kv, vv) = (
            contiguous(&q, [b, h, s, d]),
            contiguous(&k, [b, g, t, d]),
            contiguous(&v, [b, g, t, d]),
        );
        flash_attention(
            ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
            Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
            ForwardInputs::new(qv, kv, vv),
            &options,
            Par::Seq,
        )
        .unwrap();
        let inputs = BackwardInputs {
            q: qv,
            k: kv,
            v: vv,
            out: contiguous(&out, [b, h, s, d]),
            lse: View::contiguous(&lse, [b, h, s]).unwrap(),
            lse_lo: None,
            dout: contiguous(&dout, [b, h, s, d]),
        };
        for path in [BackwardPath::OnePass, BackwardPath::TwoPass, BackwardPath::Unfused] {
            let (dq, dk, dv) = gradients_on_path(inputs, &options, path, Par::Rayon);
            for (name, grad) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
                assert!(
                    grad.iter().all(|&x| x == 0.0),
                    "{path:?}, B {b} H {h} G {g} S {s} T {t}: {name} not zero"
                );
            }
        }
    }
}

#[test]
fn rows_that_see_nothing_pass_no_gradient() {
    // 200 keys: one block of the one pass; 600: blocks of 256, the first of which batch 0's
    // rows do not see either.
    for t in [200, 600] {
        let (b, h, s, d) = (2, 2, 70, 8);
        let mut q = random_vec(b * h * s * d, 1);
        // Row 5 of batch 1, head 0.
        let nan_row = ((h * s) + 5) * d;
        q[nan_row] = f32::NAN;
        let k = random_vec(b * h * t * d, 2);
        let v = random_vec(b * h * t * d, 3);
        let dout = random_vec(b * h * s * d, 4);
        // Batch 0 sees nothing; batch 1 sees its first 100 keys.
        let lengths = [0, 100];
        let options = AttentionOptions {
            key_lengths: Some(&lengths),
            ..Default::default()
        };
        let mut out = vec![0.0; b * h * s * d];
        let mut lse = vec![0.0; b * h * s];
        flash_attention(
            ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
            Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
            ForwardInputs::new(
                contiguous(&q, [b, h, s, d]),
                contiguous(&k, [b, h, t, d]),
                contiguous(&v, [b, h, t, d]),
            ),
            &options,
            Par::Seq,
        )
        .unwrap();
        let inputs = contiguous_inputs([&q, &k, &v, &out, &dout], &lse, [b, h, s, t, d]);
        for path in [BackwardPath::OnePass, BackwardPath::TwoPass, BackwardPath::Unfused] {
            let (dq, dk, dv) = gradients_on_path(inputs, &options, path, Par::Rayon);
            let half = h * s * d;
            assert!(dq[..half].iter().all(|&x| x == 0.0), "{path:?}: batch 0 dq");
            assert!(dk[..h * t * d].iter().all(|&x| x == 0.0), "{path:?}: batch 0 dk");
            assert!(dv[..h * t * d].iter().all(|&x| x == 0.0), "{path:?}: batch 0 dv");
            // Batch 1: keys 100.. are hidden from every row; head 0 has the NaN row.
            for hi in 0..h {
                let base = (h + hi) * t * d;
                for (name, grad) in [("dk", &dk), ("dv", &dv)] {
                    let (visible, hidden) = grad[base..base + t * d].split_at(100 * d);
                    assert!(hidden.iter().all(|&x| x == 0.0), "{path:?}: {name} of hidden keys");
                    if hi == 0 {
                        assert!(
                            visible.iter().all(|x| x.is_nan()),
                            "{path:?}: {name} of keys the NaN row sees"
                        );
                    } else {
                        assert!(
                            visible.iter().all(|x| x.is_finite()),
                            "{path:?}: {name} of visible keys"
                        );
                        assert!(visible.iter().any(|&x| x != 0.0), "{path:?}: {name} of visible keys");
                    }
                }
            }
            let (before, rest) = dq[half..].split_at(nan_row - half);
            let (row, after) = rest.split_at(d);
            assert!(row.iter().all(|x| x.is_nan()), "{path:?}: dq of the NaN row");
            for others in [before, after] {
                assert!(others.iter().all(|x| x.is_finite()) && others.iter().any(|&x| x != 0.0));
            }
        }
    }
}

#[test]
fn shape_errors_name_the_tensor() {
    let (b, h, s, t, d) = (1, 2, 3, 4, 5);
    let q = vec![0.0f32; b * h * s * d];
    let k = vec![0.0f32; b * h * t * d];
    let lse = vec![0.0f32; b * h * s];
    let inputs = contiguous_inputs([&q, &k, &k, &q, &q], &lse, [b, h, s, t, d]);
    let (mut dq, mut dk, mut dv) = (q.clone(), k.clone(), k.clone());
    let mut wrong = vec![0.0f32; b * h * (t - 1) * d];
    let err = attention_backward(
        Gradients {
            dq: ViewMut4::contiguous(&mut dq, [b, h, s, d]).unwrap(),
            dk: ViewMut4::contiguous(&mut wrong, [b, h, t - 1, d]).unwrap(),
            dv: ViewMut4::contiguous(&mut dv, [b, h, t, d]).unwrap(),
        },
        inputs,
        &AttentionOptions::default(),
        Par::Seq,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("`dk` has shape [1, 2, 3, 5], expected [1, 2, 4, 5]"),
        "{err}"
    );
    let short_dout = vec![0.0f32; b * h * (s - 1) * d];
    let err = attention_backward(
        Gradients {
            dq: ViewMut4::contiguous(&mut dq, [b, h, s, d]).unwrap(),
            dk: ViewMut4::contiguous(&mut dk, [b, h, t, d]).unwrap(),
            dv: ViewMut4::contiguous(&mut dv, [b, h, t, d]).unwrap(),
        },
        BackwardInputs {
            dout: contiguous(&short_dout, [b, h, s - 1, d]),
            ..inputs
        },
        &AttentionOptions::default(),
        Par::Seq,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`dout` has shape [1, 2, 2, 5]"), "{err}");
    // `lse_lo` must be the shape of `lse`, in the backward and in the forward that writes it.
    let short_lo = vec![0.0f32; b * h * (s - 1)];
    let err = attention_backward(
        Gradients {
            dq: ViewMut4::contiguous(&mut dq, [b, h, s, d]).unwrap(),
            dk: ViewMut4::contiguous(&mut dk, [b, h, t, d]).unwrap(),
            dv: ViewMut4::contiguous(&mut dv, [b, h, t, d]).unwrap(),
        },
        BackwardInputs {
            lse_lo: Some(View::contiguous(&short_lo, [b, h, s - 1]).unwrap()),
            ..inputs
        },
        &AttentionOptions::default(),
        Par::Seq,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("`lse_lo` has shape [1, 2, 2], expected [1, 2, 3]"),
        "{err}"
    );
    let (mut out, mut lse_out, mut lo) = (q.clone(), lse.clone(), short_lo.clone());
    let err = crate::attention_with_lse_lo(
        ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
        ViewMut::contiguous(&mut lse_out, [b, h, s]).unwrap(),
        ViewMut::contiguous(&mut lo, [b, h, s - 1]).unwrap(),
        ForwardInputs::new(inputs.q, inputs.k, inputs.v),
        &AttentionOptions::default(),
        Par::Seq,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("`lse_lo` has shape [1, 2, 2], expected [1, 2, 3]"),
        "{err}"
    );
}

/// The three gradients of one backward path into contiguous buffers that start as NaN, so a
/// gradient element the path does not write shows.
fn gradients_on_path(
    inputs: BackwardInputs<'_>,
    options: &AttentionOptions<'_>,
    path: BackwardPath,
    par: Par,
) -> Grads {
    let (q_shape, k_shape, v_shape) = (inputs.q.shape(), inputs.k.shape(), inputs.v.shape());
    let len = |shape: [usize; 4]| shape.iter().product::<usize>();
    let mut dq = vec![f32::NAN; len(q_shape)];
    let mut dk = vec![f32::NAN; len(k_shape)];
    let mut dvv = vec![f32::NAN; len(v_shape)];
    let grads = Gradients {
        dq: ViewMut4::contiguous(&mut dq, q_shape).unwrap(),
        dk: ViewMut4::contiguous(&mut dk, k_shape).unwrap(),
        dv: ViewMut4::contiguous(&mut dvv, v_shape).unwrap(),
    };
    attention_backward_path(grads, inputs, options, par, path).unwrap();
    (dq, dk, dvv)
}

/// A row whose only visible key holds all its weight gets `P = 1` exactly in the backward, as
/// in the forward: the backward recomputes each score with the forward's arithmetic
/// (`crate::scores`), so `exp(s − lse) = exp(0)`. Row `i` sees key `i` alone (a bool mask), with
/// logits in the hundreds, so that any other rounding of a score would move `P` by about
/// `|s|·ε`: `dV[i]` must be `dO[i]` to the bit and the unseen keys' `dV` zero. On both forward
/// paths (flash, unfused), every backward path, and every score kernel (few rows: dot products;
/// many: the tile GEMM; the portable sum when run at `ATTN_SIMD=scalar`).
#[test]
fn a_single_visible_key_gets_all_the_weight_exactly() {
    for (b, h, s, t, d, dv) in [(3, 2, 17, 20, 80, 80), (1, 2, 5, 9, 16, 24), (1, 1, 70, 130, 33, 16)] {
        let mut q = random_vec(b * h * s * d, 31);
        q.iter_mut().for_each(|x| *x *= 60.0);
        let k = random_vec(b * h * t * d, 32);
        let v = random_vec(b * h * t * dv, 33);
        let dout = random_vec(b * h * s * dv, 34);
        let allowed: Vec<bool> = (0..b * h * s * t).map(|n| (n / t) % s == n % t).collect();
        let options = AttentionOptions {
            mask: crate::Mask::Allowed(View4::contiguous(&allowed, [b, h, s, t]).unwrap()),
            ..Default::default()
        };
        let (qv, kv, vv) = (
            View4::contiguous(&q, [b, h, s, d]).unwrap(),
            View4::contiguous(&k, [b, h, t, d]).unwrap(),
            View4::contiguous(&v, [b, h, t, dv]).unwrap(),
        );
        for unfused in [false, true] {
            let mut out = vec![f32::NAN; b * h * s * dv];
            let mut lse = vec![f32::NAN; b * h * s];
            let (o, l) = (
                ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap(),
                Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
            );
            if unfused {
                crate::attention_unfused(o, l, ForwardInputs::new(qv, kv, vv), &options, Par::Seq).unwrap();
            } else {
                flash_attention(o, l, ForwardInputs::new(qv, kv, vv), &options, Par::Seq).unwrap();
            }
            let inputs = BackwardInputs {
                q: qv,
                k: kv,
                v: vv,
                out: View4::contiguous(&out, [b, h, s, dv]).unwrap(),
                lse: View::contiguous(&lse, [b, h, s]).unwrap(),
                lse_lo: None,
                dout: View4::contiguous(&dout, [b, h, s, dv]).unwrap(),
            };
            for path in [BackwardPath::OnePass, BackwardPath::TwoPass, BackwardPath::Unfused] {
                let dvv = gradients_on_path(inputs, &options, path, Par::Seq).2;
                for bh in 0..b * h {
                    for j in 0..t {
                        let got = &dvv[(bh * t + j) * dv..(bh * t + j + 1) * dv];
                        if j < s {
                            let want = &dout[(bh * s + j) * dv..(bh * s + j + 1) * dv];
                            assert_eq!(
                                got, want,
                                "unfused forward {unfused}, {path:?}, [{b},{h},{s},{t}]: dV of key {j}"
                            );
                        } else {
                            assert!(got.iter().all(|&x| x == 0.0), "{path:?}: key {j} is seen by no row");
                        }
                    }
                }
            }
        }
    }
}

/// With large logits the backward's probabilities are exact to f32 when the forward's `lse_lo`
/// is given: row `i` sees keys `i` and `i + 1` (a bool mask) with scores in the hundreds that
/// differ by a few units, so both probabilities are far from 0 and 1. The f32 scores themselves
/// (the call's score kernel, `crate::scores`) are the ground truth here: `dV` must equal
/// `Pᵀ·dO` with `P` the softmax of those scores taken in f64. `lse` alone is off by up to half an
/// ulp of a score near 300 (1.5e-5), which `P = exp(s − lse)` passes on; `exp((s − lse) −
/// lse_lo)` does not. On both forward paths and every backward path.
#[test]
fn large_logits_get_exact_probabilities_from_the_split_lse() {
    let (b, h, s, d, dv) = (1, 2, 40, 16, 8);
    let t = s + 1;
    // Scores in the hundreds that differ between a row's two keys by a few units: every key is
    // one common direction plus a little noise, and q is large.
    let mut q = random_vec(b * h * s * d, 41);
    q.iter_mut().for_each(|x| *x = 100.0 * x.abs() + 20.0);
    let common = random_vec(d, 45);
    let noise = random_vec(b * h * t * d, 42);
    let k: Vec<f32> = noise
        .iter()
        .enumerate()
        .map(|(i, &n)| 0.5 * common[i % d].abs() + 0.01 * n)
        .collect();
    let v = random_vec(b * h * t * dv, 43);
    let dout = random_vec(b * h * s * dv, 44);
    let allowed: Vec<bool> = (0..b * h * s * t)
        .map(|n| {
            let (row, key) = ((n / t) % s, n % t);
            key == row || key == row + 1
        })
        .collect();
    let options = AttentionOptions {
        mask: crate::Mask::Allowed(View4::contiguous(&allowed, [b, h, s, t]).unwrap()),
        ..Default::default()
    };
    let (qv, kv, vv) = (
        View4::contiguous(&q, [b, h, s, d]).unwrap(),
        View4::contiguous(&k, [b, h, t, d]).unwrap(),
        View4::contiguous(&v, [b, h, t, dv]).unwrap(),
    );
    // The f32 scores every path computes (the scale 1/4 is exact), then `Pᵀ·dO` in f64.
    let kernel = crate::scores::ScoreKernel::for_call(s, true);
    let ld = kernel.min_ld(t);
    let mut want = vec![0.0f64; b * h * t * dv];
    for bh in 0..b * h {
        let q_scaled: Vec<f32> = q[bh * s * d..(bh + 1) * s * d].iter().map(|x| x * 0.25).collect();
        let mut scores = vec![0.0f32; s * ld];
        let keys = crate::scores::Keys {
            keys: &k[bh * t * d..],
            row_stride: d,
            col_stride: 1,
            bc: t,
        };
        crate::scores::scores_into(kernel, &mut scores, ld, &q_scaled, [s, d], keys, &mut Vec::new());
        for i in 0..s {
            let (a, c) = (scores[i * ld + i] as f64, scores[i * ld + i + 1] as f64);
            let m = a.max(c);
            let (ea, ec) = ((a - m).exp(), (c - m).exp());
            for (key, p) in [(i, ea / (ea + ec)), (i + 1, ec / (ea + ec))] {
                for col in 0..dv {
                    want[(bh * t + key) * dv + col] += p * dout[(bh * s + i) * dv + col] as f64;
                }
            }
        }
    }
    let largest = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut worst = [0.0f64; 2];
    for unfused in [false, true] {
        let mut out = vec![f32::NAN; b * h * s * dv];
        let mut lse = vec![f32::NAN; b * h * s];
        let mut lse_lo = vec![f32::NAN; b * h * s];
        let (o, l, lo) = (
            ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap(),
            Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
            Some(ViewMut::contiguous(&mut lse_lo, [b, h, s]).unwrap()),
        );
        let inputs = ForwardInputs::new(qv, kv, vv);
        if unfused {
            crate::softmax::unfused_impl(o, [l, lo], inputs, &options, Par::Seq, true)
        } else {
            crate::flash::flash_impl(o, [l, lo], inputs, &options, Par::Seq, true, None)
        }
        .unwrap();
        for (with_lo, slot) in [(true, 0), (false, 1)] {
            let inputs = BackwardInputs {
                q: qv,
                k: kv,
                v: vv,
                out: View4::contiguous(&out, [b, h, s, dv]).unwrap(),
                lse: View::contiguous(&lse, [b, h, s]).unwrap(),
                lse_lo: with_lo.then(|| View::contiguous(&lse_lo, [b, h, s]).unwrap()),
                dout: View4::contiguous(&dout, [b, h, s, dv]).unwrap(),
            };
            for path in [BackwardPath::OnePass, BackwardPath::TwoPass, BackwardPath::Unfused] {
                let dvv = gradients_on_path(inputs, &options, path, Par::Seq).2;
                let error = dvv
                    .iter()
                    .zip(&want)
                    .map(|(&g, &w)| (g as f64 - w).abs())
                    .fold(0.0f64, f64::max)
                    / largest;
                worst[slot] = worst[slot].max(error);
            }
        }
    }
    eprintln!(
        "dV error relative to the largest: {:.1e} with lse_lo, {:.1e} without",
        worst[0], worst[1]
    );
    // Measured 1.2e-7 with `lse_lo` (exp's and dV's own f32 rounding), 2.5e-6 without.
    assert!(worst[0] < 1e-6, "with lse_lo: {:.1e}", worst[0]);
}

/// The three blocks `(offset, shape, strides)` of a fused `[B·S, q|k|v]` buffer, batch-first.
fn fused_blocks([b, h, g, s, d, dv]: [usize; 6]) -> [(usize, [usize; 4], [usize; 4]); 3] {
    let w = h * d + g * d + g * dv;
    [
        (0, [b, h, s, d], [s * w, d, w, 1]),
        (h * d, [b, g, s, d], [s * w, d, w, 1]),
        (h * d + g * d, [b, g, s, dv], [s * w, dv, w, 1]),
    ]
}

/// The gradients written straight into the columns of a fused buffer are the bits the separate
/// buffers get, on the unfused, one-pass and two-pass paths and under a causal mask; the fused
/// buffer's other bytes are not touched. Both calls take the path [`backward_path`] names for
/// the shape: the last case (B·G = 8 tasks, 520 keys) is one pass, where 6 tasks would be two,
/// and the two give other bits.
#[test]
fn fused_gradients_are_the_separate_gradients_in_place() {
    for &(b, h, g, s, d, dv, causal) in &[
        (2, 4, 2, 9, 8, 8, false),
        (1, 2, 1, 300, 16, 8, true),
        (1, 2, 2, 1100, 8, 8, false),
        (2, 8, 4, 520, 8, 8, false),
    ] {
        let w = h * d + g * d + g * dv;
        let qkv = random_vec(b * s * w, 5);
        let blocks = fused_blocks([b, h, g, s, d, dv]);
        let view = |i: usize| {
            let (offset, shape, strides) = blocks[i];
            View4::new(&qkv[offset..], shape, strides).unwrap()
        };
        let options = AttentionOptions {
            causal: if causal { Causal::TopLeft } else { Causal::None },
            ..Default::default()
        };
        let mut out = vec![0.0f32; b * h * s * dv];
        let mut lse = vec![0.0f32; b * h * s];
        flash_attention(
            ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap(),
            Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
            ForwardInputs::new(view(0), view(1), view(2)),
            &options,
            Par::Rayon,
        )
        .unwrap();
        let dout = random_vec(out.len(), 6);
        let inputs = || BackwardInputs {
            q: view(0),
            k: view(1),
            v: view(2),
            out: View4::contiguous(&out, [b, h, s, dv]).unwrap(),
            lse: View::contiguous(&lse, [b, h, s]).unwrap(),
            lse_lo: None,
            dout: View4::contiguous(&dout, [b, h, s, dv]).unwrap(),
        };
        let (mut dq, mut dk, mut dv_sep) = (
            vec![0.0; b * h * s * d],
            vec![0.0; b * g * s * d],
            vec![0.0; b * g * s * dv],
        );
        attention_backward(
            Gradients {
                dq: ViewMut4::contiguous(&mut dq, [b, h, s, d]).unwrap(),
                dk: ViewMut4::contiguous(&mut dk, [b, g, s, d]).unwrap(),
                dv: ViewMut4::contiguous(&mut dv_sep, [b, g, s, dv]).unwrap(),
            },
            inputs(),
            &options,
            Par::Rayon,
        )
        .unwrap();
        // A sentinel column past the blocks is left alone.
        let mut fused = vec![f32::NAN; b * s * w + 1];
        attention_backward_fused(
            FusedGradients::new(&mut fused, blocks).unwrap(),
            inputs(),
            &options,
            Par::Rayon,
        )
        .unwrap();
        assert!(fused[b * s * w].is_nan());
        for (i, (want, width, heads)) in [(&dq, d, h), (&dk, d, g), (&dv_sep, dv, g)].into_iter().enumerate() {
            let (offset, _, _) = blocks[i];
            for bi in 0..b {
                for x in 0..heads {
                    for si in 0..s {
                        for c in 0..width {
                            let got = fused[offset + (bi * s + si) * w + x * width + c];
                            let want = want[((bi * heads + x) * s + si) * width + c];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "block {i} [{bi}, {x}, {si}, {c}] at S {s}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `q`, `out` and `dout` at any strides give the bits of contiguous rows: a strided query row
/// is scaled element by element as `scale_into` scales a contiguous one, and the row sums
/// `Σ dO·O` add in the same order whichever way the rows are read. Each is stored transposed
/// in its last two dimensions, alone and with the others, with few rows (dot-product scores)
/// and many (the tile kernel), and head sizes that are whole 16-column panels (`dV` and `dK` on
/// the tile kernel, a strided `dO` made contiguous for it) and that are not.
#[test]
fn strided_q_out_and_dout_give_the_bits_of_contiguous_rows() {
    for (s, d, dv) in [(4, 8, 12), (20, 8, 12), (20, 16, 32), (70, 32, 16)] {
        let (b, h, t) = (2, 2, 30);
        let q = random_vec(b * h * s * d, 41);
        let k = random_vec(b * h * t * d, 42);
        let v = random_vec(b * h * t * dv, 43);
        let dout = random_vec(b * h * s * dv, 44);
        let options = AttentionOptions::default();
        let (q_shape, o_shape) = ([b, h, s, d], [b, h, s, dv]);
        let (kv, vv) = (contiguous(&k, [b, h, t, d]), contiguous(&v, [b, h, t, dv]));
        let mut out = vec![0.0f32; b * h * s * dv];
        let mut lse = vec![0.0f32; b * h * s];
        flash_attention(
            ViewMut4::contiguous(&mut out, o_shape).unwrap(),
            Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
            ForwardInputs::new(contiguous(&q, q_shape), kv, vv),
            &options,
            Par::Seq,
        )
        .unwrap();
        // `[B, H, W, S]` copies of `[B, H, S, W]` rows, read back with a column stride of S.
        let transposed = |x: &[f32], w: usize| -> Vec<f32> {
            let mut y = vec![0.0f32; x.len()];
            for (n, &value) in x.iter().enumerate() {
                let (row, c) = (n / w, n % w);
                let (bh, r) = (row / s, row % s);
                y[(bh * w + c) * s + r] = value;
            }
            y
        };
        let (q_t, out_t, dout_t) = (transposed(&q, d), transposed(&out, dv), transposed(&dout, dv));
        fn strided(x: &[f32], [b, h, s, w]: [usize; 4]) -> View4<'_, f32> {
            View4::new(x, [b, h, s, w], [h * w * s, w * s, 1, s]).unwrap()
        }
        let gradients = |[q, out, dout]: [View4<'_, f32>; 3]| -> Vec<u32> {
            let (mut dq, mut dk, mut dvv) = (vec![0.0; q_t.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(
                Gradients {
                    dq: ViewMut4::contiguous(&mut dq, q_shape).unwrap(),
                    dk: ViewMut4::contiguous(&mut dk, [b, h, t, d]).unwrap(),
                    dv: ViewMut4::contiguous(&mut dvv, [b, h, t, dv]).unwrap(),
                },
                BackwardInputs {
                    q,
                    k: kv,
                    v: vv,
                    out,
                    lse: View::contiguous(&lse, [b, h, s]).unwrap(),
                    lse_lo: None,
                    dout,
                },
                &options,
                Par::Seq,
            )
            .unwrap();
            [dq, dk, dvv].concat().iter().map(|x| x.to_bits()).collect()
        };
        let plain = [
            contiguous(&q, q_shape),
            contiguous(&out, o_shape),
            contiguous(&dout, o_shape),
        ];
        let want = gradients(plain);
        let [q_s, out_s, dout_s] = [
            strided(&q_t, q_shape),
            strided(&out_t, o_shape),
            strided(&dout_t, o_shape),
        ];
        // `dout` every other float of a buffer twice its size: neither stride is 1.
        let spread: Vec<f32> = dout.iter().flat_map(|&x| [x, f32::NAN]).collect();
        let dout_spread = View4::new(&spread, o_shape, [2 * h * s * dv, 2 * s * dv, 2 * dv, 2]).unwrap();
        for (name, views) in [
            ("q", [q_s, plain[1], plain[2]]),
            ("out", [plain[0], out_s, plain[2]]),
            ("dout", [plain[0], plain[1], dout_s]),
            ("dout spread", [plain[0], plain[1], dout_spread]),
            ("all", [q_s, out_s, dout_s]),
        ] {
            assert!(gradients(views) == want, "S {s}, {name} strided: other bits");
        }
    }
}

/// Blocks that share columns, leave their rows, or run past the buffer are refused.
#[test]
fn fused_gradients_refuse_overlapping_or_short_buffers() {
    let [b, h, g, s, d, dv] = [1, 2, 1, 4, 4, 4];
    let w = h * d + g * d + g * dv;
    let mut buf = vec![0.0f32; b * s * w];
    let mut blocks = fused_blocks([b, h, g, s, d, dv]);
    blocks[1].0 -= 1;
    assert!(matches!(
        FusedGradients::new(&mut buf, blocks),
        Err(KernelError::OverlappingDestination { .. })
    ));
    let mut blocks = fused_blocks([b, h, g, s, d, dv]);
    blocks[0].2[2] = w - 1;
    assert!(FusedGradients::new(&mut buf, blocks).is_err());
    let mut short = vec![0.0f32; b * s * w - 1];
    assert!(matches!(
        FusedGradients::new(&mut short, fused_blocks([b, h, g, s, d, dv])),
        Err(KernelError::OutOfBounds { .. })
    ));
    assert!(FusedGradients::new(&mut buf, fused_blocks([b, h, g, s, d, dv])).is_ok());
}
