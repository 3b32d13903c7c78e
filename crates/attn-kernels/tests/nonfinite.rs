//! The non-finite policy (crate docs, "Non-finite inputs") on every path: flash (sequential and
//! on 1, 2, 3 and 8 threads, tiled, decode and split-KV shapes), the unfused path and the
//! weights pass.
//!
//! Each case poisons a few entries of `q`, `k` and `v` with NaN or `±inf` (and, as padding
//! garbage does, every key and value past a batch's key length), runs each path on the poisoned
//! inputs and on the same inputs with the poison replaced by zeros, and checks, element by
//! element, that exactly the outputs the policy names are non-finite and that every other
//! output is bit-identical to the clean run. Which key a row sees comes from the f64 reference
//! on the clean inputs (`weight > 0`), not from the code under test.

use attn_kernels::testing::random_vec;
use attn_kernels::{
    attention_reference, attention_unfused, attention_weights, broadcast_to, flash_attention, AttentionOptions, Causal,
    ForwardInputs, Mask, Par, View, View4, ViewMut, ViewMut4, WeightsDst,
};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum MaskKind {
    None,
    /// `[S, T]` boolean, `true` = may attend.
    Allowed,
    /// `[B, H, S, T]` additive with some `-inf`.
    Additive,
}

#[derive(Debug, Clone)]
struct Case {
    b: usize,
    h: usize,
    g: usize,
    s: usize,
    t: usize,
    d: usize,
    dv: usize,
    causal: Causal,
    mask: MaskKind,
    lengths: bool,
    /// Poisoned entries: (tensor 0 = q, 1 = k, 2 = v; flat index; which value).
    poison: Vec<(u8, usize, u8)>,
    /// Poison every key and value row past each batch's key length (padding garbage).
    garbage_padding: bool,
    seed: u64,
}

const POISONS: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

/// The outputs of one path: out `[B, H, S, Dv]`, lse `[B, H, S]`.
type Output = (Vec<f32>, Vec<f32>);

fn check(case: &Case) {
    let Case {
        b, h, g, s, t, d, dv, ..
    } = *case;
    let lengths: Vec<usize> = (0..b).map(|i| (t * (i + 2) / (b + 2)).max(1).min(t)).collect();
    let [q, k, v] = poisoned_inputs(case, &lengths);
    // The clean inputs are the poisoned ones with every non-finite entry zeroed.
    let zeroed = |x: &[f32]| {
        x.iter()
            .map(|&e| if e.is_finite() { e } else { 0.0 })
            .collect::<Vec<_>>()
    };
    let (zq, zk, zv) = (zeroed(&q), zeroed(&k), zeroed(&v));

    let target = [b, h, s, t];
    let allowed: Vec<bool> = random_vec(s * t, case.seed + 3).iter().map(|&x| x > -0.6).collect();
    let additive: Vec<f32> = random_vec(b * h * s * t, case.seed + 4)
        .iter()
        .map(|&x| if x < -0.7 { f32::NEG_INFINITY } else { x * 2.0 })
        .collect();
    let mask = match case.mask {
        MaskKind::None => Mask::None,
        MaskKind::Allowed => Mask::Allowed(broadcast_to(&allowed, &[s, t], target).unwrap()),
        MaskKind::Additive => Mask::Additive(broadcast_to(&additive, &[b, h, s, t], target).unwrap()),
    };
    let options = AttentionOptions {
        mask,
        causal: case.causal,
        key_lengths: case.lengths.then_some(&lengths[..]),
        ..Default::default()
    };
    fn view(x: &[f32], shape: [usize; 4]) -> View4<'_, f32> {
        View4::contiguous(x, shape).unwrap()
    }
    let (cq, ck, cv) = (
        view(&zq, [b, h, s, d]),
        view(&zk, [b, g, t, d]),
        view(&zv, [b, g, t, dv]),
    );
    let (pq, pk, pv) = (view(&q, [b, h, s, d]), view(&k, [b, g, t, d]), view(&v, [b, g, t, dv]));

    // What the policy predicts, from the reference on the clean inputs.
    let reference = attention_reference(cq, ck, cv, &options);
    let (row_nan, bad) = predicted(case, &reference.weights, [&q, &k, &v]);

    type Run<'r> = dyn Fn(ViewMut4<'_, f32>, ViewMut<'_, f32, 3>, bool) + 'r;
    let run = |f: &Run<'_>, poisoned: bool| -> Output {
        let mut out = vec![-7.0f32; b * h * s * dv];
        let mut lse = vec![-7.0f32; b * h * s];
        f(
            ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap(),
            ViewMut::contiguous(&mut lse, [b, h, s]).unwrap(),
            poisoned,
        );
        (out, lse)
    };
    let pick = |poisoned: bool| if poisoned { (pq, pk, pv) } else { (cq, ck, cv) };
    let flash = |par: Par| {
        move |out: ViewMut4<'_, f32>, lse: ViewMut<'_, f32, 3>, poisoned: bool| {
            let (q, k, v) = pick(poisoned);
            flash_attention(out, Some(lse), ForwardInputs::new(q, k, v), &options, par).unwrap()
        }
    };
    let unfused = |out: ViewMut4<'_, f32>, lse: ViewMut<'_, f32, 3>, poisoned: bool| {
        let (q, k, v) = pick(poisoned);
        attention_unfused(out, Some(lse), ForwardInputs::new(q, k, v), &options, Par::Rayon).unwrap()
    };
    let pool = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let mut paths: Vec<(String, Output, Output)> = Vec::new();
    let seq = flash(Par::Seq);
    paths.push(("flash seq".into(), run(&seq, false), run(&seq, true)));
    for threads in [1, 2, 3, 8] {
        let f = flash(Par::Rayon);
        let (clean, poisoned) = pool(threads).install(|| (run(&f, false), run(&f, true)));
        paths.push((format!("flash {threads} threads"), clean, poisoned));
        assert_eq!(
            bits(&paths[0].2 .0),
            bits(&paths.last().unwrap().2 .0),
            "{threads} threads differ from sequential: {case:?}"
        );
    }
    paths.push(("unfused".into(), run(&unfused, false), run(&unfused, true)));

    for (name, clean, poisoned) in &paths {
        compare_path(case, name, clean, poisoned, &row_nan, &bad);
    }

    // The weights pass: a NaN row is NaN on the keys it sees and zero elsewhere; every other
    // row is as on clean inputs (values play no part).
    let weights = |q: View4<'_, f32>, k: View4<'_, f32>, lse: &[f32]| {
        let mut w = vec![-7.0f32; b * h * s * t];
        let lse = View::contiguous(lse, [b, h, s]).unwrap();
        let dst = WeightsDst::PerHead(ViewMut4::contiguous(&mut w, [b, h, s, t]).unwrap());
        attention_weights(dst, q, k, lse, &options, Par::Rayon).unwrap();
        w
    };
    let (_, clean, poisoned) = &paths[0];
    let w_clean = weights(cq, ck, &clean.1);
    let w_poisoned = weights(pq, pk, &poisoned.1);
    for (i, (&got, &want)) in w_poisoned.iter().zip(&w_clean).enumerate() {
        let (row, ti) = (i / t, i % t);
        let (bi, hi, si) = (row / (h * s), row / s % h, row % s);
        let visible = reference.weights[((bi * h + hi) * s + si) * t + ti] > 0.0;
        if row_nan[row] && visible {
            assert!(got.is_nan(), "weights[{row}, {ti}] = {got}, want NaN: {case:?}");
        } else if row_nan[row] {
            assert_eq!(got, 0.0, "weights[{row}, {ti}] of a hidden key: {case:?}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "weights[{row}, {ti}] differs: {case:?}");
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|e| e.to_bits()).collect()
}

fn case(b: usize, h: usize, g: usize, s: usize, t: usize, d: usize, dv: usize) -> Case {
    Case {
        b,
        h,
        g,
        s,
        t,
        d,
        dv,
        causal: Causal::None,
        mask: MaskKind::None,
        lengths: false,
        poison: Vec::new(),
        garbage_padding: false,
        seed: 1,
    }
}

#[test]
fn padding_garbage_never_reaches_the_real_rows() {
    // Prefill (several row tiles, K packed once), decode (dot-product rows) and split-KV.
    for (s, t) in [(150, 300), (4, 200), (1, 2100)] {
        let c = Case {
            lengths: true,
            garbage_padding: true,
            ..case(2, 4, 2, s, t, 32, 24)
        };
        check(&c);
        check(&Case {
            causal: Causal::BottomRight,
            mask: MaskKind::Additive,
            ..c.clone()
        });
    }
}

#[test]
fn poison_in_hidden_and_visible_positions() {
    let mut c = case(2, 2, 1, 70, 260, 16, 20);
    c.causal = Causal::TopLeft;
    c.mask = MaskKind::Allowed;
    // A NaN query row, NaN keys early (seen by most rows) and late (hidden by causality from
    // most), and values of every kind.
    c.poison = vec![
        (0, 5 * 16, 0),
        (1, 3 * 16 + 2, 0),
        (1, 250 * 16, 0),
        (2, 7 * 20 + 3, 0),
        (2, 100 * 20 + 1, 1),
    ];
    c.poison
        .extend([(2, 100 * 20 + 2, 2), (2, 259 * 20 + 19, 1), (2, (260 + 9) * 20, 2)]);
    check(&c);
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        (
            1usize..3,
            prop::sample::select(vec![(1usize, 1usize), (2, 1), (2, 2), (4, 2)]),
        ),
        (1usize..90, 1usize..300, 1usize..40, 1usize..40),
        (0usize..3, 0usize..3, any::<bool>(), any::<bool>()),
        prop::collection::vec((0u8..3, any::<usize>(), 0u8..3), 0..6),
        any::<u64>(),
    )
        .prop_map(
            |((b, (h, g)), (s, t, d, dv), (causal, mask, lengths, garbage), poison, seed)| Case {
                causal: [Causal::None, Causal::TopLeft, Causal::BottomRight][causal],
                mask: [MaskKind::None, MaskKind::Allowed, MaskKind::Additive][mask],
                lengths,
                garbage_padding: garbage,
                poison,
                seed: seed % 1000,
                ..case(b, h, g, s, t, d, dv)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn non_finite_inputs_reach_only_what_the_policy_names(c in arb_case()) {
        check(&c);
    }
}

/// Runs one `[1, 1, S, D]` call through flash (sequential and parallel) and the unfused path,
/// returning each path's output `[S, D]` and lse `[S]`, and checks the weights pass on the
/// flash lse.
fn all_paths(q: &[f32], k: &[f32], v: &[f32], s: usize, t: usize, d: usize) -> Vec<(&'static str, Output)> {
    let (qv, kv, vv) = (
        View4::contiguous(q, [1, 1, s, d]).unwrap(),
        View4::contiguous(k, [1, 1, t, d]).unwrap(),
        View4::contiguous(v, [1, 1, t, d]).unwrap(),
    );
    let options = AttentionOptions::default();
    let mut results = Vec::new();
    for (name, par, fused) in [
        ("flash seq", Par::Seq, true),
        ("flash rayon", Par::Rayon, true),
        ("unfused", Par::Rayon, false),
    ] {
        let mut out = vec![-7.0f32; s * d];
        let mut lse = vec![-7.0f32; s];
        let o = ViewMut4::contiguous(&mut out, [1, 1, s, d]).unwrap();
        let l = ViewMut::contiguous(&mut lse, [1, 1, s]).unwrap();
        if fused {
            flash_attention(o, Some(l), ForwardInputs::new(qv, kv, vv), &options, par).unwrap();
        } else {
            attention_unfused(o, Some(l), ForwardInputs::new(qv, kv, vv), &options, par).unwrap();
        }
        results.push((name, (out, lse)));
    }
    results
}

#[test]
fn overflowing_scores_behave_as_in_pytorch_on_every_path() {
    // Each row and key lives in its own block of 4 dimensions, so every score is set alone;
    // the scale is 1/sqrt(16) = 1/4.
    let (s, t, d) = (3, 4, 16);
    let mut q = vec![0.0f32; s * d];
    let mut k = vec![0.0f32; t * d];
    let v: Vec<f32> = (0..t * d).map(|i| (i / d) as f32).collect();
    let block = |x: &mut [f32], row: usize, b: usize, value: f32| x[row * d + 4 * b..row * d + 4 * b + 4].fill(value);
    // Row 0: (q/4)·k1 = 5e18·5e18·4 = 1e38 is finite, though q·k1 = 4e38 is not: every path
    // scales q first (PyTorch scales q and k by 1/2 each, to the same effect). Key 1 wins over
    // key 0 (5e37) outright.
    block(&mut q, 0, 0, 2e19);
    block(&mut k, 0, 0, 2.5e18);
    block(&mut k, 1, 0, 5e18);
    // Row 1: (q/4)·k2 = 2.5e19·1e20·4 overflows to +inf: its softmax is NaN, so is the row.
    block(&mut q, 1, 1, 1e20);
    block(&mut k, 2, 1, 1e20);
    // Row 2: (q/4)·k3 overflows to -inf: key 3 gets a weight of exactly 0; keys 0-2 score 0.
    block(&mut q, 2, 2, -1e20);
    block(&mut k, 3, 2, 1e20);
    for (name, (out, lse)) in all_paths(&q, &k, &v, s, t, d) {
        assert!(out[..d].iter().all(|&x| x == 1.0), "{name}: row 0 {:?}", &out[..d]);
        assert_eq!(lse[0], 1e38, "{name}: lse[0]");
        assert!(
            out[d..2 * d].iter().all(|x| x.is_nan()),
            "{name}: row 1 {:?}",
            &out[d..2 * d]
        );
        assert!(lse[1].is_nan(), "{name}: lse[1] = {}", lse[1]);
        // The mean of values 0, 1 and 2.
        assert!(
            out[2 * d..].iter().all(|&x| (x - 1.0).abs() < 1e-6),
            "{name}: row 2 {:?}",
            &out[2 * d..]
        );
        assert!((lse[2] - 3f32.ln()).abs() < 1e-6, "{name}: lse[2] = {}", lse[2]);
    }
}

/// The case's inputs with its poison applied: NaN only in q and k (an infinity there gives a
/// sign-dependent score, which the policy leaves to IEEE arithmetic), NaN and infinities in v;
/// with `garbage_padding`, NaN keys and infinite values past each key length.
fn poisoned_inputs(case: &Case, lengths: &[usize]) -> [Vec<f32>; 3] {
    let Case {
        b, h, g, s, t, d, dv, ..
    } = *case;
    let clean_q = random_vec(b * h * s * d, case.seed);
    let clean_k = random_vec(b * g * t * d, case.seed + 1);
    let clean_v = random_vec(b * g * t * dv, case.seed + 2);
    let (mut q, mut k, mut v) = (clean_q.clone(), clean_k.clone(), clean_v.clone());
    for &(tensor, index, which) in &case.poison {
        let (target, value) = match tensor {
            0 => (&mut q, f32::NAN),
            1 => (&mut k, f32::NAN),
            _ => (&mut v, POISONS[which as usize % 3]),
        };
        let n = target.len();
        if n > 0 {
            target[index % n] = value;
        }
    }
    if case.garbage_padding && case.lengths {
        for (bi, &length) in lengths.iter().enumerate() {
            for gi in 0..g {
                for ti in length..t {
                    let kr = ((bi * g + gi) * t + ti) * d;
                    k[kr..kr + d].fill(f32::NAN);
                    let vr = ((bi * g + gi) * t + ti) * dv;
                    v[vr..vr + dv].fill(f32::INFINITY);
                }
            }
        }
    }
    [q, k, v]
}

/// Which rows the policy says are NaN, and which output elements are not as on clean inputs:
/// a row is NaN when it sees a key and its query or a key it sees is non-finite; an element is
/// off when its row is NaN or a value it sees is non-finite.
fn predicted(case: &Case, weights: &[f64], [q, k, v]: [&[f32]; 3]) -> (Vec<bool>, Vec<bool>) {
    let Case {
        b, h, g, s, t, d, dv, ..
    } = *case;
    let rep = h / g;
    let visible = |bi: usize, hi: usize, si: usize, ti: usize| weights[((bi * h + hi) * s + si) * t + ti] > 0.0;
    let mut row_nan = vec![false; b * h * s];
    let mut bad = vec![false; b * h * s * dv];
    for bi in 0..b {
        for hi in 0..h {
            let gi = hi / rep;
            for si in 0..s {
                let row = (bi * h + hi) * s + si;
                let any_visible = (0..t).any(|ti| visible(bi, hi, si, ti));
                let q_bad = q[row * d..(row + 1) * d].iter().any(|x| !x.is_finite());
                let k_bad = (0..t).any(|ti| {
                    let kr = ((bi * g + gi) * t + ti) * d;
                    visible(bi, hi, si, ti) && k[kr..kr + d].iter().any(|x| !x.is_finite())
                });
                row_nan[row] = any_visible && (q_bad || k_bad);
                for c in 0..dv {
                    let v_bad =
                        (0..t).any(|ti| visible(bi, hi, si, ti) && !v[((bi * g + gi) * t + ti) * dv + c].is_finite());
                    bad[row * dv + c] = row_nan[row] || v_bad;
                }
            }
        }
    }

    (row_nan, bad)
}

/// One path's outputs on poisoned inputs against its outputs on clean ones, as the policy
/// predicts (`row_nan`, `bad` from [`predicted`]).
fn compare_path(case: &Case, name: &str, clean: &Output, poisoned: &Output, row_nan: &[bool], bad: &[bool]) {
    let dv = case.dv;
    for (i, (&got, &want)) in poisoned.0.iter().zip(&clean.0).enumerate() {
        let (row, c) = (i / dv, i % dv);
        if bad[i] {
            assert!(
                !got.is_finite(),
                "{name}: out[{row}, {c}] = {got}, want non-finite: {case:?}"
            );
            if row_nan[row] {
                assert!(got.is_nan(), "{name}: out[{row}, {c}] = {got}, want NaN: {case:?}");
            }
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{name}: out[{row}, {c}] = {got}, want {want} as on clean inputs: {case:?}"
            );
        }
    }
    for (row, (&got, &want)) in poisoned.1.iter().zip(&clean.1).enumerate() {
        if row_nan[row] {
            assert!(got.is_nan(), "{name}: lse[{row}] = {got}, want NaN: {case:?}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{name}: lse[{row}] differs: {case:?}");
        }
    }
}
