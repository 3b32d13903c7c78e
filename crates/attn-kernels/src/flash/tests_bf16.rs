//! The flash kernel in bf16 ([`crate::Precision::Bf16`]) against two f64 references, at this
//! machine's level: `tdpbf16ps` at `amx`, `vdpbf16ps` at `avx512bf16`, the rounded operands in
//! f32 elsewhere (CI runs these tests at `avx512bf16` on a machine with AMX, and at `avx2` and
//! `scalar`).
//!
//! # The bound
//! With `u = 2^-8` (bf16's unit roundoff) and `ε = 2^-24` (f32's), each score `ŝ_t` differs
//! from the exact `s_t` by at most
//! `Δ = (2u + u² + (D + 2)·ε)·Σ_i |scale·q_i·k_ti|` (the rounding of `scale·q` and `k`, the f32
//! sum) plus `2ε·|s_t|` (the mask's addition). A softmax of scores each off by at most `Δ`
//! changes every weight by a factor within `e^{±2Δ}`; the kernel then rounds each unnormalised
//! probability and each value to bf16 (`u` each) and sums `T` products in f32. So each output
//! element obeys
//! `|o~_c − o_c| ≤ (e^{2Δ}·(1 + u + 8ε + 2η)·(1 + u)·(1 + (T + 2)·ε) − 1) · Σ_t w_t·|v_tc|`,
//! `w` the exact weights, `8ε` the f32 `exp` and sum, `η` the relative error of the shorter
//! `exp` that AMX and `vdpbf16ps` prefill use (8.5e-6; 0 without bf16 instructions), which
//! enters each weight through `p` and `l`. Against the reference on the rounded
//! operands (`scale·q`, `k`, `v` rounded, products exact) the same bound holds with the input
//! roundings gone: `Δ = (D + 2)·ε·Σ|q̂·k̂| + 2ε·|ŝ|` and no factor `(1 + u)` for the values;
//! what is left is the probabilities' rounding, `u`. A wrong pair in a packed operand or a
//! dropped key block is an error of order one.

use super::tests::{bits_eq, row_major, view4, view4_mut, Case, CaseData, MaskKind, MaskShape, EPS};
use super::*;
use crate::{attention_reference, Causal, ForwardInputs};

const U: f64 = 1.0 / 256.0;
/// The relative error of the probabilities' `exp` beyond f32's few roundings: where AMX or
/// `vdpbf16ps` computes the products, the shorter `exp`'s (`PROBABILITY_EXP_ERROR`; taken at
/// both bf16 levels, which also covers their calls on the f32 kernels), elsewhere none. It
/// enters each weight twice, through `p` and through `l`.
fn probability_exp_error() -> f64 {
    if crate::bf16_level().has_avx512bf16() {
        PROBABILITY_EXP_ERROR
    } else {
        0.0
    }
}

/// The relative error of the bf16 levels' shorter `exp` (`x86::exp_short`): the polynomial's 2.9e-6 plus
/// `|x|·2^-24` from rounding `x·log2 e` (5.3e-6 at the smallest `x` whose `e^x` is not 0), plus
/// a few roundings of f32.
pub(super) const PROBABILITY_EXP_ERROR: f64 = 8.5e-6;

/// The per-row score error bound `Δ` of the module doc for `q: [B, H, S, D]`, `k: [B, G, T, D]`
/// (any values; `input_rounding` adds the `2u + u²` of rounding them).
fn score_bounds(
    q: &View4<'_, f32>,
    k: &View4<'_, f32>,
    scale: f64,
    max_abs_score: f64,
    input_rounding: bool,
) -> Vec<f64> {
    let [b, h, s, d] = q.shape();
    let [_, g, t, _] = k.shape();
    let per_product = if input_rounding { 2.0 * U + U * U } else { 0.0 } + (d as f64 + 2.0) * EPS;
    let mut bounds = Vec::with_capacity(b * h * s);
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                let worst = (0..t)
                    .map(|ti| {
                        (0..d)
                            .map(|i| (q.get([bi, hi, si, i]) as f64 * k.get([bi, hi / (h / g), ti, i]) as f64).abs())
                            .sum::<f64>()
                    })
                    .fold(0.0f64, f64::max);
                bounds.push(per_product * scale.abs() * worst + 2.0 * EPS * max_abs_score);
            }
        }
    }
    bounds
}

/// Checks `got: [B, H, S, Dv]` (row-major) against `reference` with the element bound of the
/// module doc, `v: [B, G, T, Dv]` the values it weighs; returns the largest ratio of error to
/// bound. Rows the reference leaves empty must be exact zeros.
fn check_bound(
    got: &[f32],
    reference: &crate::reference::ReferenceAttention,
    [h, s]: [usize; 2],
    v: &View4<'_, f32>,
    deltas: &[f64],
    value_rounding: bool,
    what: &str,
) -> f64 {
    let [_, g, t, dv] = v.shape();
    let mut worst = 0.0f64;
    for (row, &delta) in deltas.iter().enumerate() {
        let (bi, hi) = (row / (h * s), row / s % h);
        let gi = hi / (h / g);
        for c in 0..dv {
            let (x, want) = (got[row * dv + c], reference.out[row * dv + c]);
            if reference.lse[row] == f64::NEG_INFINITY {
                assert_eq!(
                    x.to_bits(),
                    0,
                    "{what}: row {row} sees no key and must be +0.0, got {x}"
                );
                continue;
            }
            let mass: f64 = (0..t)
                .map(|ti| reference.weights[row * t + ti] * (v.get([bi, gi, ti, c]) as f64).abs())
                .sum();
            let factor = (2.0 * delta).exp()
                * (1.0 + U + 8.0 * EPS + 2.0 * probability_exp_error())
                * if value_rounding { 1.0 + U } else { 1.0 }
                * (1.0 + (t as f64 + 2.0) * EPS);
            let bound = (factor - 1.0) * mass;
            let err = (x as f64 - want).abs();
            assert!(
                err <= bound,
                "{what}: out[{row}, {c}] = {x}, want {want}: error {err:e} > bound {bound:e}"
            );
            if bound > 0.0 {
                worst = worst.max(err / bound);
            }
        }
    }
    worst
}

/// `flash_attention` or `attention`.
type Entry = fn(
    ViewMut4<'_, f32>,
    Option<ViewMut<'_, f32, 3>>,
    ForwardInputs<'_>,
    &AttentionOptions<'_>,
    Par,
) -> Result<(), KernelError>;

/// Runs `case` in bf16: the flash kernel against the exact reference and the reference on the
/// rounded operands, both within their bounds; the same bits on any thread count, through
/// [`crate::attention`], and split or not. Returns the two largest error-to-bound ratios.
fn check(case: Case) -> [f64; 2] {
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
    let f32_options = data.options(&case);
    let options = AttentionOptions {
        precision: crate::Precision::Bf16,
        ..f32_options
    };
    let (qv, kv, vv) = (
        view4(&data.q, [b, h, s, d], bshd),
        view4(&data.k, [b, g, t, d], bshd),
        view4(&data.v, [b, g, t, dv], bshd),
    );
    let run = |par: Par, entry: Entry| {
        let mut out = vec![f32::NAN; b * h * s * dv];
        let mut lse = vec![f32::NAN; b * h * s];
        let lse_view = ViewMut::contiguous(&mut lse, [b, h, s]).unwrap();
        entry(
            view4_mut(&mut out, [b, h, s, dv], bshd),
            Some(lse_view),
            ForwardInputs::new(qv, kv, vv),
            &options,
            par,
        )
        .unwrap();
        (row_major(&out, [b, h, s, dv], bshd), lse)
    };
    let what = format!("{case:?}");
    let seq = run(Par::Seq, flash_attention);
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    // The calls on a pool's thread take this thread's choice of kernels.
    let forced = FORCE_VDPBF16PS.with(|f| f.get());
    let on_pool = |n, entry: Entry| {
        pool(n).install(|| {
            FORCE_VDPBF16PS.with(|f| f.set(forced));
            run(Par::Rayon, entry)
        })
    };
    for n in [1, 2, 3] {
        let many = on_pool(n, flash_attention);
        assert!(bits_eq(&seq, &many), "{n} threads differ from sequential: {what}");
    }
    let by_path = on_pool(2, crate::attention);
    assert!(
        bits_eq(&seq, &by_path),
        "attention() differs from flash_attention(): {what}"
    );

    // Against the exact result of the f32 inputs.
    let scale = crate::mask::resolve_scale(&options, d) as f64;
    let exact = attention_reference(qv, kv, vv, &f32_options);
    let deltas = score_bounds(&qv, &kv, scale, exact.max_abs_score, true);
    let to_exact = check_bound(&seq.0, &exact, [h, s], &vv, &deltas, true, &format!("exact {what}"));
    for (row, (&got, &want)) in seq.1.iter().zip(&exact.lse).enumerate() {
        let ok = if want == f64::NEG_INFINITY {
            got == f32::NEG_INFINITY
        } else {
            (got as f64 - want).abs() <= deltas[row] + 4.0 * EPS * (1.0 + want.abs())
        };
        assert!(ok, "{what}: lse[{row}] = {got}, want {want}");
    }

    // Against the exact result of the rounded operands: only the probabilities' rounding left.
    let copies = super::rounded_copies(&[(&qv, scale as f32), (&kv, 1.0), (&vv, 1.0)], Par::Seq);
    let (qr, rest) = copies.split_at(b * h * s * d);
    let (kr, vr) = rest.split_at(b * g * t * d);
    let (qr, kr, vr) = (
        View4::contiguous(qr, [b, h, s, d]).unwrap(),
        View4::contiguous(kr, [b, g, t, d]).unwrap(),
        View4::contiguous(vr, [b, g, t, dv]).unwrap(),
    );
    let rounded_options = AttentionOptions {
        scale: Some(1.0),
        ..f32_options
    };
    let rounded = attention_reference(qr, kr, vr, &rounded_options);
    let deltas = score_bounds(&qr, &kr, 1.0, rounded.max_abs_score, false);
    let to_rounded = check_bound(
        &seq.0,
        &rounded,
        [h, s],
        &vr,
        &deltas,
        false,
        &format!("rounded {what}"),
    );

    // The weights, from the forward's LSE and from the kernel's own scores.
    let inputs = ForwardInputs::new(qv, kv, vv);
    super::tests_bf16_weights::check_weights(&case, &options, inputs, &seq, &rounded.weights, &deltas);
    [to_exact, to_rounded]
}

/// The paths that compute in f32 only refuse bf16 with a typed error.
#[test]
fn f32_only_paths_refuse_bf16() {
    let (q, mut out, lse) = (vec![0.5f32; 32], vec![0.0f32; 32], vec![0.0f32; 8]);
    let view = View4::contiguous(&q, [1, 2, 4, 4]).unwrap();
    let options = AttentionOptions {
        precision: crate::Precision::Bf16,
        ..Default::default()
    };
    let err = crate::attention_unfused(
        ViewMut4::contiguous(&mut out, [1, 2, 4, 4]).unwrap(),
        None,
        ForwardInputs::new(view, view, view),
        &options,
        Par::Seq,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::InvalidArgument { what: "precision", .. }),
        "{err}"
    );
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; 32], vec![0.0f32; 32], vec![0.0f32; 32]);
    let grads = crate::Gradients {
        dq: ViewMut4::contiguous(&mut dq, [1, 2, 4, 4]).unwrap(),
        dk: ViewMut4::contiguous(&mut dk, [1, 2, 4, 4]).unwrap(),
        dv: ViewMut4::contiguous(&mut dv, [1, 2, 4, 4]).unwrap(),
    };
    let lse_view = crate::View::contiguous(&lse, [1, 2, 4]).unwrap();
    let inputs = crate::BackwardInputs {
        q: view,
        k: view,
        v: view,
        out: view,
        lse: lse_view,
        lse_lo: None,
        dout: view,
    };
    let err = crate::attention_backward(grads, inputs, &options, Par::Seq).unwrap_err();
    assert!(err.to_string().contains("precision is bf16"), "{err}");
}

/// Runs `check` as this CPU routes bf16 calls and, where the f32 kernel on rounded copies
/// serves calls that do not decode ([`rounds_into_f32`]: AVX512-BF16 on Intel), again with the
/// `vdpbf16ps` kernels forced, so that both are checked on such a machine.
pub(super) fn each_bf16_kernel(mut check: impl FnMut(&str)) {
    check("as routed");
    let level = crate::Bf16Level::Avx512Bf16;
    if crate::bf16_level() == level && crate::bf16::Route::of(level) == crate::bf16::Route::Widened {
        FORCE_VDPBF16PS.with(|f| f.set(true));
        check("vdpbf16ps forced");
        FORCE_VDPBF16PS.with(|f| f.set(false));
    }
}

/// Every shape edge of the bf16 packing (odd `D`, odd key blocks, ragged `Dv`), the masks, the
/// causal alignments, GQA, strided storage, large logits, decoding with split keys, and rows
/// that see no key.
#[test]
fn bf16_flash_is_within_its_bound() {
    let mut cases = vec![
        Case::new(1, 2, 2, 1, 1, 16, 16),
        Case::new(1, 2, 1, 17, 15, 1, 1),
        Case::new(2, 2, 1, 19, 37, 33, 17),
        Case::new(1, 4, 2, 130, 131, 64, 64),
        Case::new(1, 2, 2, 65, 257, 7, 130),
        Case::new(2, 8, 8, 64, 200, 128, 128),
        // Decoding (at most 8 query rows per key/value head: keys and values read in place),
        // keys split across tasks, odd and ragged head dims, padding, strided rows.
        Case::new(1, 32, 8, 1, 1100, 64, 64),
        Case::new(2, 4, 2, 1, 300, 33, 20),
        Case {
            lengths: true,
            ..Case::new(3, 2, 2, 1, 131, 16, 16)
        },
        Case {
            bshd: true,
            causal: Causal::BottomRight,
            ..Case::new(1, 8, 2, 2, 333, 72, 40)
        },
        // 12 rows per key/value head: packed.
        Case::new(1, 4, 1, 3, 2100, 16, 16),
        // Many rows and keys.
        Case::new(1, 2, 1, 520, 530, 16, 16),
    ];
    for causal in [Causal::TopLeft, Causal::BottomRight] {
        for (s, t) in [(70, 200), (200, 70), (129, 129), (70, 2 * BF16_BLOCK_KEYS + 5)] {
            cases.push(Case {
                causal,
                ..Case::new(1, 4, 2, s, t, 32, 32)
            });
        }
    }
    for mask in [
        MaskKind::Allowed(MaskShape::Full),
        MaskKind::Additive(MaskShape::TwoD),
        MaskKind::Disallowed(MaskShape::Padding),
    ] {
        cases.push(Case {
            mask,
            lengths: true,
            ..Case::new(2, 2, 2, 40, 150, 24, 24)
        });
    }
    cases.push(Case {
        key_mask: true,
        alibi: true,
        bshd: true,
        ..Case::new(2, 4, 2, 33, 140, 16, 20)
    });
    cases.push(Case {
        magnitude: 8.0,
        scale: Some(0.3),
        ..Case::new(1, 2, 1, 100, 300, 48, 16)
    });
    // Many `(b, g)`, more than the threads: a mask and strided storage.
    cases.push(Case {
        bshd: true,
        mask: MaskKind::Additive(MaskShape::Full),
        ..Case::new(32, 2, 1, 16, 40, 16, 16)
    });
    each_bf16_kernel(|route| {
        let mut worst = [0.0f64; 2];
        for case in cases.clone() {
            let ratios = check(case);
            worst = [worst[0].max(ratios[0]), worst[1].max(ratios[1])];
        }
        println!(
            "bf16 flash at {:?}, {route}: largest error / bound {:.3} (exact inputs), {:.3} (rounded operands)",
            crate::bf16_level(),
            worst[0],
            worst[1]
        );
        // The probabilities are rounded at every level: without that, the error against the
        // rounded operands would be f32's, a thousandth of the bound (measured 0.67 with it).
        assert!(
            worst[1] > 0.05,
            "{route}: the error against the rounded operands is f32's: P is not rounded to bf16"
        );
    });
}

/// A row that sees one key gives that key's value rounded to bf16, bit for bit: its probability
/// is exactly 1, so nothing but the values' rounding is left. Decoding (values read in place)
/// and prefill (values packed), at this machine's level.
#[test]
fn one_visible_key_gives_its_rounded_value() {
    each_bf16_kernel(|route| {
        eprintln!("one_visible_key_gives_its_rounded_value: {route}");
        one_visible_key_gives_its_rounded_value_once();
    });
}

fn one_visible_key_gives_its_rounded_value_once() {
    for (h, g, s, t, d) in [(4, 2, 1, 300, 24), (2, 1, 100, 300, 40), (8, 8, 3, 50, 16)] {
        let q = crate::testing::random_vec(h * s * d, 1);
        let k = crate::testing::random_vec(g * t * d, 2);
        let v = crate::testing::random_vec(g * t * d, 3);
        let mut out = vec![f32::NAN; h * s * d];
        let options = AttentionOptions {
            key_lengths: Some(&[1]),
            precision: crate::Precision::Bf16,
            ..Default::default()
        };
        let inputs = ForwardInputs::new(
            View4::contiguous(&q, [1, h, s, d]).unwrap(),
            View4::contiguous(&k, [1, g, t, d]).unwrap(),
            View4::contiguous(&v, [1, g, t, d]).unwrap(),
        );
        let out_view = ViewMut4::contiguous(&mut out, [1, h, s, d]).unwrap();
        flash_attention(out_view, None, inputs, &options, Par::Rayon).unwrap();
        for hi in 0..h {
            let key0 = &v[(hi / (h / g)) * t * d..][..d];
            for si in 0..s {
                let row = &out[(hi * s + si) * d..][..d];
                let want: Vec<f32> = key0.iter().map(|&x| crate::round_to_bf16(x)).collect();
                assert_eq!(row, &want[..], "h = {hi}, s = {si} of [{h}, {g}, {s}, {t}, {d}]");
            }
        }
    }
}

/// The non-finite policy ([`crate::nonfinite`]) holds in bf16 too: a NaN or infinite key or
/// value past a batch's key length gives the output of zeros there, bit for bit, at this
/// machine's level. (AMX multiplies whole steps of 32 keys, so a length inside a step reads
/// the values past it against zero probabilities, and an odd length splits a pair.)
#[test]
fn bf16_keeps_the_non_finite_policy_past_the_key_length() {
    each_bf16_kernel(|route| {
        eprintln!("bf16_keeps_the_non_finite_policy_past_the_key_length: {route}");
        bf16_keeps_the_non_finite_policy_past_the_key_length_once();
    });
}

fn bf16_keeps_the_non_finite_policy_past_the_key_length_once() {
    for (s, t, d, lengths) in [(70, 200, 64, [37, 130]), (3, 90, 24, [33, 64]), (130, 150, 40, [1, 95])] {
        let (b, h) = (2, 2);
        let q = crate::testing::random_vec(b * h * s * d, 4);
        let clean_k = crate::testing::random_vec(b * h * t * d, 5);
        let clean_v = crate::testing::random_vec(b * h * t * d, 6);
        let spoil = |x: &[f32], bad: f32, clean: f32| -> Vec<f32> {
            let mut x = x.to_vec();
            for (i, value) in x.iter_mut().enumerate() {
                let (bi, ti) = (i / (h * t * d), i / d % t);
                if ti >= lengths[bi] {
                    *value = if ti % 2 == 0 { bad } else { clean };
                }
            }
            x
        };
        let run = |k: &[f32], v: &[f32], precision| {
            let mut out = vec![0.0f32; b * h * s * d];
            let options = AttentionOptions {
                key_lengths: Some(&lengths),
                precision,
                ..Default::default()
            };
            let inputs = ForwardInputs::new(
                View4::contiguous(&q, [b, h, s, d]).unwrap(),
                View4::contiguous(k, [b, h, t, d]).unwrap(),
                View4::contiguous(v, [b, h, t, d]).unwrap(),
            );
            flash_attention(
                ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
                None,
                inputs,
                &options,
                Par::Rayon,
            )
            .unwrap();
            out
        };
        for precision in [crate::Precision::F32, crate::Precision::Bf16] {
            let zeros = run(&spoil(&clean_k, 0.0, 0.0), &spoil(&clean_v, 0.0, 0.0), precision);
            assert!(zeros.iter().all(|x| x.is_finite()));
            for bad in [f32::NAN, f32::INFINITY] {
                let spoilt = run(&spoil(&clean_k, bad, -bad), &spoil(&clean_v, bad, -bad), precision);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&spoilt) == bits(&zeros),
                    "{precision:?} [{s}, {t}, {d}] lengths {lengths:?}: {bad} past the length changed the output"
                );
            }
        }
    }
}

/// Transposed views of Q, K and V (inner strides of `S`, `T`) give the bits of the same values
/// stored contiguously, at this machine's level, in the output and in
/// [`crate::attention_weights`]: the strided packings round the same values into the same
/// layouts. Packed shapes with odd head dims, and a few rows per key/value head with only Q
/// strided (decoding reads contiguous K and V in place with f32 sums, so strided K and V,
/// packed, would differ in the last bits there: not compared).
#[test]
fn bf16_strided_operands_give_the_contiguous_bits() {
    each_bf16_kernel(|route| {
        eprintln!("bf16_strided_operands_give_the_contiguous_bits: {route}");
        bf16_strided_operands_give_the_contiguous_bits_once();
    });
}

fn bf16_strided_operands_give_the_contiguous_bits_once() {
    // The fourth with many `(b, g)`, more than the threads; the last decodes (six query rows per
    // key/value head: three queries of two heads), with only Q transposed, so K and V are still
    // read in place.
    let shapes = [
        (2, 4, 2, 70, 150, 40),
        (1, 2, 1, 33, 200, 7),
        (1, 4, 2, 12, 90, 64),
        (16, 4, 2, 40, 150, 40),
        (2, 4, 2, 3, 150, 40),
    ];
    for (b, h, g, s, t, d) in shapes {
        let decodes = s * h / g <= crate::DECODE_ROWS;
        let q = crate::testing::random_vec(b * h * d * s, 11);
        let k = crate::testing::random_vec(b * g * d * t, 12);
        let v = crate::testing::random_vec(b * g * d * t, 13);
        let transposed = |data, shape| View4::contiguous(data, shape).unwrap().permuted([0, 1, 3, 2]).unwrap();
        let kv_view = |data, [b, g, d, t]: [usize; 4]| match decodes {
            true => View4::contiguous(data, [b, g, t, d]).unwrap(),
            false => transposed(data, [b, g, d, t]),
        };
        let views = [
            transposed(&q, [b, h, d, s]),
            kv_view(&k, [b, g, d, t]),
            kv_view(&v, [b, g, d, t]),
        ];
        let copies: Vec<Vec<f32>> = views
            .iter()
            .map(|x| {
                let [n0, n1, n2, n3] = x.shape();
                (0..n0 * n1 * n2 * n3)
                    .map(|i| x.get([i / (n1 * n2 * n3), i / (n2 * n3) % n1, i / n3 % n2, i % n3]))
                    .collect()
            })
            .collect();
        let options = AttentionOptions {
            precision: crate::Precision::Bf16,
            ..Default::default()
        };
        // The output, then the weights of `attention_weights`' second pass from the LSE.
        let run = |inputs: ForwardInputs<'_>| {
            let (mut out, mut lse) = (vec![0.0f32; b * h * s * d], vec![0.0f32; b * h * s]);
            let view = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
            let lse_view = crate::ViewMut::contiguous(&mut lse, [b, h, s]).unwrap();
            flash_attention(view, Some(lse_view), inputs, &options, Par::Rayon).unwrap();
            let mut weights = vec![0.0f32; b * h * s * t];
            let dst = crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut weights, [b, h, s, t]).unwrap());
            let lse_view = crate::View::contiguous(&lse, [b, h, s]).unwrap();
            crate::attention_weights(dst, inputs.q, inputs.k, lse_view, &options, Par::Rayon).unwrap();
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (bits(&out), bits(&weights))
        };
        let strided = run(ForwardInputs::new(views[0], views[1], views[2]));
        let contiguous = run(ForwardInputs::new(
            View4::contiguous(&copies[0], [b, h, s, d]).unwrap(),
            View4::contiguous(&copies[1], [b, g, t, d]).unwrap(),
            View4::contiguous(&copies[2], [b, g, t, d]).unwrap(),
        ));
        assert!(
            strided.0 == contiguous.0,
            "[{b}, {h}, {g}, {s}, {t}, {d}]: strided views differ"
        );
        assert!(
            strided.1 == contiguous.1,
            "[{b}, {h}, {g}, {s}, {t}, {d}]: strided views give other weights"
        );
    }
}
