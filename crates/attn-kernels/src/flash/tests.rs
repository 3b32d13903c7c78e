//! The flash kernel against the f64 reference and the unfused path: block edges, masks,
//! causal alignments, strides, split-KV, non-finite values, and a proptest over all of them.

use super::*;
use crate::testing::{assert_close, random_vec};
use crate::{attention_reference, attention_unfused, broadcast_to, Causal, ForwardInputs, Mask};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
pub(crate) enum MaskKind {
    None,
    /// Boolean, with the given shape selector.
    Allowed(MaskShape),
    /// Additive, with some `-inf` entries.
    Additive(MaskShape),
    /// Boolean, `true` = masked out.
    Disallowed(MaskShape),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum MaskShape {
    Full,
    TwoD,
    Padding,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Case {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) g: usize,
    pub(crate) s: usize,
    pub(crate) t: usize,
    pub(crate) d: usize,
    pub(crate) dv: usize,
    /// Store q, k, v and out as `[B, S, H, D]` and pass permuted views.
    pub(crate) bshd: bool,
    pub(crate) causal: Causal,
    pub(crate) mask: MaskKind,
    pub(crate) lengths: bool,
    /// A second, `[B, T]` key-padding mask (`true` = masked out).
    pub(crate) key_mask: bool,
    /// ALiBi slopes per head.
    pub(crate) alibi: bool,
    pub(crate) scale: Option<f32>,
    /// Multiplies q, for large logits.
    pub(crate) magnitude: f32,
}

impl Case {
    pub(crate) fn new(b: usize, h: usize, g: usize, s: usize, t: usize, d: usize, dv: usize) -> Self {
        Case {
            b,
            h,
            g,
            s,
            t,
            d,
            dv,
            bshd: false,
            causal: Causal::None,
            mask: MaskKind::None,
            lengths: false,
            key_mask: false,
            alibi: false,
            scale: None,
            magnitude: 1.0,
        }
    }
}

/// A `[B, X, L, W]` tensor, stored either as such or as `[B, L, X, W]`, seen as the former.
pub(crate) fn view4(data: &[f32], [b, x, l, w]: [usize; 4], bshd: bool) -> View4<'_, f32> {
    if bshd {
        View4::contiguous(data, [b, l, x, w])
            .unwrap()
            .permuted([0, 2, 1, 3])
            .unwrap()
    } else {
        View4::contiguous(data, [b, x, l, w]).unwrap()
    }
}

/// The `[B, X, L, W]` tensor of [`view4`] copied out row-major, whatever its storage.
pub(crate) fn row_major(data: &[f32], [b, x, l, w]: [usize; 4], bshd: bool) -> Vec<f32> {
    let view = view4(data, [b, x, l, w], bshd);
    (0..b * x * l * w)
        .map(|i| view.get([i / (x * l * w), i / (l * w) % x, i / w % l, i % w]))
        .collect()
}

/// f32's unit roundoff `ε = 2^-24`, in the bf16 tests' bounds.
pub(crate) const EPS: f64 = f32::EPSILON as f64 / 2.0;

/// Whether two `(out, lse)` pairs hold the same bits.
pub(crate) fn bits_eq(a: &(Vec<f32>, Vec<f32>), b: &(Vec<f32>, Vec<f32>)) -> bool {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    bits(&a.0) == bits(&b.0) && bits(&a.1) == bits(&b.1)
}

pub(crate) fn view4_mut(data: &mut [f32], [b, x, l, w]: [usize; 4], bshd: bool) -> ViewMut4<'_, f32> {
    if bshd {
        ViewMut4::contiguous(data, [b, l, x, w])
            .unwrap()
            .permuted([0, 2, 1, 3])
            .unwrap()
    } else {
        ViewMut4::contiguous(data, [b, x, l, w]).unwrap()
    }
}

type Output = (Vec<f32>, Vec<f32>);
type Kernel<'k> = dyn Fn(ViewMut4<'_, f32>, ViewMut<'_, f32, 3>, Par) + 'k;

/// The largest error against the f64 reference measured over these tests, as
/// `|got - want| / (1 + |want|)`: 1.2e-6 (additive masks of ±3 on the scores), on AVX2+FMA
/// and the scalar path, for scores of order 1 (larger scores add their own rounding, see
/// `check`). The bound is about 8× that. A flash rescale off by 1e-4, or a key block
/// dropped, is far outside.
const TOLERANCE: f64 = 1e-5;

/// Runs `case` through the reference, the flash kernel (sequential, 1, 2, 3, 8 threads and
/// the machine's count) and the unfused path; asserts agreement within [`TOLERANCE`] and
/// bit-identity of `out` and `lse` across thread counts.
/// The owned inputs of one case: q, k, v and every mask a case may use.
pub(crate) struct CaseData {
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) mask_shape: Vec<usize>,
    pub(crate) allowed: Vec<bool>,
    pub(crate) additive: Vec<f32>,
    pub(crate) padding: Vec<bool>,
    pub(crate) slopes: Vec<f32>,
    pub(crate) lengths: Vec<usize>,
}

impl CaseData {
    pub(crate) fn new(case: &Case) -> Self {
        let Case {
            b, h, g, s, t, d, dv, ..
        } = *case;
        let mut q = random_vec(b * h * s * d, 11);
        q.iter_mut().for_each(|x| *x *= case.magnitude);
        let mask_shape: Vec<usize> = match case.mask {
            MaskKind::None => vec![],
            MaskKind::Allowed(sh) | MaskKind::Additive(sh) | MaskKind::Disallowed(sh) => match sh {
                MaskShape::Full => vec![b, h, s, t],
                MaskShape::TwoD => vec![s, t],
                MaskShape::Padding => vec![b, 1, 1, t],
            },
        };
        let raw = random_vec(mask_shape.iter().product(), 14);
        CaseData {
            q,
            k: random_vec(b * g * t * d, 12),
            v: random_vec(b * g * t * dv, 13),
            allowed: raw.iter().map(|&x| x > -0.5).collect(),
            additive: raw
                .iter()
                .map(|&x| if x < -0.8 { f32::NEG_INFINITY } else { x * 3.0 })
                .collect(),
            mask_shape,
            padding: random_vec(b * t, 15).iter().map(|&x| x > 0.6).collect(),
            slopes: (0..h).map(|i| 0.5f32.powi(i as i32 + 1)).collect(),
            lengths: (0..b).map(|i| (t * (i + 1) / (b + 1)).min(t)).collect(),
        }
    }

    pub(crate) fn options(&self, case: &Case) -> AttentionOptions<'_> {
        let target = [case.b, case.h, case.s, case.t];
        let shape = &self.mask_shape;
        let mask = match case.mask {
            MaskKind::None => Mask::None,
            MaskKind::Allowed(_) => Mask::Allowed(broadcast_to(&self.allowed, shape, target).unwrap()),
            MaskKind::Additive(_) => Mask::Additive(broadcast_to(&self.additive, shape, target).unwrap()),
            MaskKind::Disallowed(_) => Mask::Disallowed(broadcast_to(&self.allowed, shape, target).unwrap()),
        };
        let key_mask = if case.key_mask {
            Mask::Disallowed(broadcast_to(&self.padding, &[case.b, 1, 1, case.t], target).unwrap())
        } else {
            Mask::None
        };
        AttentionOptions {
            scale: case.scale,
            mask,
            causal: case.causal,
            key_lengths: case.lengths.then_some(&self.lengths[..]),
            key_mask,
            alibi_slopes: case.alibi.then_some(&self.slopes[..]),
            precision: crate::Precision::F32,
        }
    }
}

pub(crate) fn check(case: Case) {
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
    let (q, k, v) = (&data.q, &data.k, &data.v);
    let (qv, kv, vv) = (
        view4(q, [b, h, s, d], bshd),
        view4(k, [b, g, t, d], bshd),
        view4(v, [b, g, t, dv], bshd),
    );
    let reference = attention_reference(qv, kv, vv, &options);
    let mut want = vec![0.0f64; b * h * s * dv];
    // The reference is [B, H, S, Dv]; lay it out as the outputs are stored.
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                for j in 0..dv {
                    let src = ((bi * h + hi) * s + si) * dv + j;
                    let dst = if bshd { ((bi * s + si) * h + hi) * dv + j } else { src };
                    want[dst] = reference.out[src];
                }
            }
        }
    }

    let run = |f: &Kernel<'_>, par: Par| -> Output {
        let mut out = vec![f32::NAN; b * h * s * dv];
        let mut lse = vec![f32::NAN; b * h * s];
        f(
            view4_mut(&mut out, [b, h, s, dv], bshd),
            ViewMut::contiguous(&mut lse, [b, h, s]).unwrap(),
            par,
        );
        (out, lse)
    };
    let flash = |out: ViewMut4<'_, f32>, lse: ViewMut<'_, f32, 3>, par: Par| {
        flash_attention(out, Some(lse), ForwardInputs::new(qv, kv, vv), &options, par).unwrap()
    };
    let unfused = |out: ViewMut4<'_, f32>, lse: ViewMut<'_, f32, 3>, par: Par| {
        attention_unfused(out, Some(lse), ForwardInputs::new(qv, kv, vv), &options, par).unwrap()
    };
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let seq = run(&flash, Par::Seq);
    let one = pool(1).install(|| run(&flash, Par::Rayon));
    let two = pool(2).install(|| run(&flash, Par::Rayon));
    let fused_unfused = pool(2).install(|| run(&unfused, Par::Rayon));
    let what = format!("{case:?}");
    // The fast paths round scores to f32: an absolute error of up to half an ulp of the
    // largest score, which the softmax carries into the weights and the output (measured:
    // 2.7e-5 with ALiBi biases of -540 at T = 1100; 9.5e-5 in the weights with logits of
    // 1e4). The bound adds two epsilons of the largest visible score.
    let tol = TOLERANCE + 2.0 * f32::EPSILON as f64 * reference.max_abs_score;
    assert_close(&seq.0, &want, tol, tol, &format!("flash out {what}"));
    assert_close(&seq.1, &reference.lse, tol, tol, &format!("flash lse {what}"));
    assert_close(&fused_unfused.0, &want, tol, tol, &format!("unfused out {what}"));
    assert_close(
        &fused_unfused.1,
        &reference.lse,
        tol,
        tol,
        &format!("unfused lse {what}"),
    );
    let bits = |o: &Output| {
        (
            o.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            o.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(bits(&seq), bits(&one), "1 thread differs from sequential: {what}");
    assert_eq!(bits(&seq), bits(&two), "2 threads differ from sequential: {what}");
    // More threads than this machine's cores, and the machine's own count.
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    for n in [3, 8, machine] {
        let many = pool(n).install(|| run(&flash, Par::Rayon));
        assert_eq!(bits(&seq), bits(&many), "{n} threads differ from sequential: {what}");
    }
    assert!(seq.0.iter().all(|x| !x.is_nan()), "NaN in output: {what}");

    check_weights(&case, [qv, kv, vv], &seq.1, &options, &reference, tol);
}

/// Weights from the LSE, per head and averaged over heads, against the reference's; then
/// [`crate::attention_with_weights`] against [`crate::attention`] and those weights, bit for bit.
fn check_weights(
    case: &Case,
    [qv, kv, vv]: [View4<'_, f32>; 3],
    lse: &[f32],
    options: &AttentionOptions<'_>,
    reference: &crate::reference::ReferenceAttention,
    tol: f64,
) {
    let Case { b, h, s, t, .. } = *case;
    let what = format!("{case:?}");
    // Weights from the LSE, per head and averaged over heads.
    let lse_view = crate::View::contiguous(lse, [b, h, s]).unwrap();
    let mut per_head = vec![f32::NAN; b * h * s * t];
    let dst = crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut per_head, [b, h, s, t]).unwrap());
    crate::attention_weights(dst, qv, kv, lse_view, options, Par::Rayon).unwrap();
    assert_close(&per_head, &reference.weights, tol, tol, &format!("weights {what}"));
    let mut averaged = vec![f32::NAN; b * s * t];
    let dst = crate::WeightsDst::Averaged(ViewMut::contiguous(&mut averaged, [b, s, t]).unwrap());
    crate::attention_weights(dst, qv, kv, lse_view, options, Par::Rayon).unwrap();
    let mut want_avg = vec![0.0f64; b * s * t];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..s * t {
                want_avg[bi * s * t + i] += reference.weights[(bi * h + hi) * s * t + i] / h as f64;
            }
        }
    }
    assert_close(&averaged, &want_avg, tol, tol, &format!("averaged weights {what}"));
    check_with_weights(case, [qv, kv, vv], options);
}

/// [`crate::attention_with_weights`], per head and averaged, sequential and on 1, 2 and 3
/// threads (on 3 without an `lse` of the caller's): `out` and `lse` are [`crate::attention`]'s bits, and the weights those of
/// [`crate::attention_weights`] from that `lse`, whether the flash kernel keeps its scores or
/// not (the path [`crate::attention`] takes may be the unfused one, with its own `lse` bits).
fn check_with_weights(case: &Case, [qv, kv, vv]: [View4<'_, f32>; 3], options: &AttentionOptions<'_>) {
    let Case {
        b, h, s, t, dv, bshd, ..
    } = *case;
    let inputs = ForwardInputs::new(qv, kv, vv);
    let (mut out, mut lse) = (vec![f32::NAN; b * h * s * dv], vec![f32::NAN; b * h * s]);
    let lse_view = ViewMut::contiguous(&mut lse, [b, h, s]).unwrap();
    crate::attention(
        view4_mut(&mut out, [b, h, s, dv], bshd),
        Some(lse_view),
        inputs,
        options,
        Par::Seq,
    )
    .unwrap();
    let lse_view = crate::View::contiguous(&lse, [b, h, s]).unwrap();
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    for averaged in [false, true] {
        let shape = if averaged { vec![b, s, t] } else { vec![b, h, s, t] };
        fn dst(w: &mut [f32], averaged: bool, [b, h, s, t]: [usize; 4]) -> crate::WeightsDst<'_> {
            if averaged {
                crate::WeightsDst::Averaged(ViewMut::contiguous(w, [b, s, t]).unwrap())
            } else {
                crate::WeightsDst::PerHead(ViewMut4::contiguous(w, [b, h, s, t]).unwrap())
            }
        }
        let mut want = vec![f32::NAN; shape.iter().product()];
        crate::attention_weights(
            dst(&mut want, averaged, [b, h, s, t]),
            qv,
            kv,
            lse_view,
            options,
            Par::Seq,
        )
        .unwrap();
        for threads in [0, 1, 2, 3] {
            let par = if threads == 0 { Par::Seq } else { Par::Rayon };
            let what = format!("{case:?}, averaged {averaged}, {threads} threads (0: sequential)");
            let mut got = (
                vec![f32::NAN; out.len()],
                vec![f32::NAN; lse.len()],
                vec![f32::NAN; want.len()],
            );
            // On 3 threads the call gets no LSE and makes its own.
            let own_lse = threads == 3;
            let call = || {
                let out_view = view4_mut(&mut got.0, [b, h, s, dv], bshd);
                let lse_view = ViewMut::contiguous(&mut got.1, [b, h, s]).unwrap();
                crate::attention_with_weights(
                    out_view,
                    (!own_lse).then_some(lse_view),
                    dst(&mut got.2, averaged, [b, h, s, t]),
                    inputs,
                    options,
                    par,
                )
                .unwrap();
            };
            pool(threads.max(1)).install(call);
            assert_same_bits(&got.0, &out, &format!("out: {what}"));
            if !own_lse {
                assert_same_bits(&got.1, &lse, &format!("lse: {what}"));
            }
            assert_same_bits(&got.2, &want, &format!("weights: {what}"));
        }
    }
}

/// Fails, naming the first differing element, unless `got` and `want` hold the same bits.
fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} is {} where {} was expected", got[i], want[i]);
    }
}

/// The flash kernel keeps its scores for the weights where [`crate::path::flash_keeps_scores`]
/// says, so the bit checks of [`check_with_weights`] cover that route, not only the second pass.
#[test]
fn the_kernels_keep_their_scores_for_usual_shapes() {
    use crate::path::flash_keeps_scores as keeps;
    let f32_options = AttentionOptions::default();
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (q, kv) in [
        ([2, 4, 70, 16], [2, 300, 16]),
        ([1, 8, 128, 8], [8, 128, 8]),
        ([2, 4, 40, 16], [1, 257, 16]),
    ] {
        let plan = Plan::new(q, kv);
        for averaged in [false, true] {
            assert!(keeps(&plan, &f32_options, averaged, Par::Seq), "{q:?} {kv:?}");
            let on_two = two.install(|| keeps(&plan, &f32_options, averaged, Par::Rayon));
            assert!(on_two, "{q:?} {kv:?}");
        }
    }
    // Decoding splits its keys; one row tile cannot feed two workers an average; a group of 3
    // heads straddles row tiles; bf16 keeps its scores in the flash kernel, except on AMX.
    let plan = |q, kv| Plan::new(q, kv);
    assert!(!keeps(
        &plan([1, 8, 1, 16], [8, 4096, 16]),
        &f32_options,
        false,
        Par::Seq
    ));
    let one_tile = plan([1, 8, 50, 16], [8, 100, 16]);
    assert!(!two.install(|| keeps(&one_tile, &f32_options, true, Par::Rayon)));
    assert!(!keeps(
        &plan([1, 6, 50, 16], [2, 100, 16]),
        &f32_options,
        true,
        Par::Seq
    ));
    let bf16 = AttentionOptions {
        precision: crate::Precision::Bf16,
        ..AttentionOptions::default()
    };
    let bf16_keeps = crate::bf16_level() != crate::Bf16Level::Amx;
    let bf16_plan = |q, kv| Plan::for_precision(q, kv, crate::Precision::Bf16);
    for averaged in [false, true] {
        assert_eq!(
            keeps(&bf16_plan([2, 4, 70, 16], [2, 300, 16]), &bf16, averaged, Par::Seq),
            bf16_keeps
        );
    }
    assert!(!keeps(&bf16_plan([1, 8, 1, 16], [8, 4096, 16]), &bf16, false, Par::Seq));
    // f32 takes the flash kernel at every level ([`chosen_path`]), which keeps its scores at
    // S = T = 256, and averaged on two workers too (two row tiles of one batch element).
    let shape = plan([2, 8, 256, 64], [8, 256, 64]);
    for averaged in [false, true] {
        assert!(keeps(&shape, &f32_options, averaged, Par::Seq));
    }
    let single = plan([1, 8, 256, 64], [8, 256, 64]);
    let averaged_on_two = two.install(|| keeps(&single, &f32_options, true, Par::Rayon));
    assert!(averaged_on_two);
    // bf16 runs the flash kernel whatever the level.
    assert_eq!(keeps(&shape, &bf16, false, Par::Seq), bf16_keeps);
}

/// Rows and keys at each edge of a row tile and a key block, and keys past two blocks.
#[test]
fn block_edges() {
    let k = BLOCK_KEYS;
    for &n in &[1, 15, 16, 17, 63, 64, 65, 129, k - 1, k, k + 1] {
        check(Case::new(1, 2, 2, n, n, 16, 16));
        check(Case::new(1, 1, 1, n, k + 2, 7, 5));
    }
    check(Case::new(1, 1, 1, 70, 2 * k + 3, 16, 16));
}

#[test]
fn odd_head_dims_and_dv() {
    for &(d, dv) in &[(1, 1), (3, 9), (33, 17), (64, 128), (129, 3)] {
        check(Case::new(2, 2, 1, 19, 37, d, dv));
    }
}

#[test]
fn causal_alignments() {
    for causal in [Causal::TopLeft, Causal::BottomRight] {
        let k = BLOCK_KEYS;
        for &(s, t) in &[
            (1, 1),
            (1, 300),
            (70, 70),
            (70, 200),
            (200, 70),
            (129, 129),
            (k + 1, k + 1),
            (70, 2 * k + 5),
        ] {
            let mut case = Case::new(1, 4, 2, s, t, 16, 16);
            case.causal = causal;
            check(case);
        }
    }
}

#[test]
fn masks_and_padding() {
    for mask in [
        MaskKind::Allowed(MaskShape::Full),
        MaskKind::Allowed(MaskShape::TwoD),
        MaskKind::Allowed(MaskShape::Padding),
        MaskKind::Additive(MaskShape::Full),
        MaskKind::Additive(MaskShape::TwoD),
        MaskKind::Additive(MaskShape::Padding),
        MaskKind::Disallowed(MaskShape::Full),
        MaskKind::Disallowed(MaskShape::TwoD),
    ] {
        let mut case = Case::new(2, 4, 2, 33, 150, 8, 8);
        case.mask = mask;
        check(case);
        case.lengths = true;
        case.causal = Causal::BottomRight;
        check(case);
        case.key_mask = true;
        case.alibi = true;
        check(case);
    }
}

#[test]
fn strided_layout_and_custom_scale() {
    let mut case = Case::new(2, 6, 3, 40, 70, 12, 20);
    case.bshd = true;
    case.scale = Some(0.3);
    case.causal = Causal::TopLeft;
    check(case);
}

#[test]
fn operands_with_non_unit_inner_strides() {
    // Q stored as [B, H, D, S], K as [B, G, D, T], V as [B, G, Dv, T] and the masks as
    // [B, H, T, S]: all seen through transposed views, on prefill tiles, decoding tiles
    // (keys read in place by dot products), value widths that are and are not a multiple of
    // the micro-kernel width, and split-KV; the output, and the weights from its LSE.
    for &(b, h, g, s, t, d, dv) in &[
        (2, 4, 2, 70, 150, 12, 10),
        (1, 2, 1, 70, 150, 8, 16),
        (2, 2, 2, 1, 150, 12, 16),
        (1, 2, 1, 3, 1100, 8, 16),
    ] {
        let q_store = random_vec(b * h * d * s, 1);
        let k_store = random_vec(b * g * d * t, 2);
        let v_store = random_vec(b * g * dv * t, 3);
        let transposed = |data, shape| View4::contiguous(data, shape).unwrap().permuted([0, 1, 3, 2]).unwrap();
        let (qv, kv, vv) = (
            transposed(&q_store, [b, h, d, s]),
            transposed(&k_store, [b, g, d, t]),
            transposed(&v_store, [b, g, dv, t]),
        );
        let raw = random_vec(b * h * t * s, 4);
        let additive: Vec<f32> = raw.iter().map(|&x| x * 2.0).collect();
        let allowed: Vec<bool> = raw.iter().map(|&x| x > -0.6).collect();
        let masks = [
            Mask::None,
            Mask::Additive(transposed(&additive, [b, h, t, s])),
            Mask::Allowed(
                View4::contiguous(&allowed, [b, h, t, s])
                    .unwrap()
                    .permuted([0, 1, 3, 2])
                    .unwrap(),
            ),
        ];
        for (causal, mask) in [Causal::None, Causal::BottomRight]
            .into_iter()
            .flat_map(|c| masks.iter().map(move |m| (c, m)))
        {
            let options = AttentionOptions {
                causal,
                mask: *mask,
                ..Default::default()
            };
            let want = attention_reference(qv, kv, vv, &options);
            let (mut out, mut lse) = (vec![0.0f32; b * h * s * dv], vec![0.0f32; b * h * s]);
            flash_attention(
                ViewMut4::contiguous(&mut out, [b, h, s, dv]).unwrap(),
                Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
                ForwardInputs::new(qv, kv, vv),
                &options,
                Par::Rayon,
            )
            .unwrap();
            let tol = TOLERANCE + 2.0 * f32::EPSILON as f64 * want.max_abs_score;
            let what = format!("transposed q, k, v, mask: {:?}", (b, h, g, s, t, d, dv, causal));
            assert_close(&out, &want.out, tol, tol, &what);
            // The weights from that LSE, reading the same transposed Q and K.
            let mut weights = vec![f32::NAN; b * h * s * t];
            crate::attention_weights(
                crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut weights, [b, h, s, t]).unwrap()),
                qv,
                kv,
                crate::View::contiguous(&lse, [b, h, s]).unwrap(),
                &options,
                Par::Rayon,
            )
            .unwrap();
            assert_close(&weights, &want.weights, tol, tol, &format!("weights of {what}"));
        }
    }
}

/// The rows' maxima that the score kernel folds as it stores the scores (each row's maximum
/// in the level's lanes) give the bits of the `row_max` pass over the stored scores: whole
/// key blocks and a ragged last one (which takes the pass), rows that the causal mask or the
/// key lengths cut inside a block (the pass) and rows they leave alone (the folded maxima),
/// an additive mask (the pass everywhere), several row tiles and GQA. A folded maximum taken
/// from the wrong row or lane changes the rows' bits.
#[test]
fn folded_row_maxima_give_the_bits_of_the_row_max_pass() {
    use super::tile_blocks::FORCE_ROW_MAX_PASS;
    let lengths = [1000, 700];
    let additive = random_vec(2 * 4 * 130 * 1000, 9);
    for (s, t, causal, with_lengths, mask) in [
        (70, BLOCK_KEYS + 64, Causal::None, false, false),
        (130, 1000, Causal::TopLeft, false, false),
        (130, 1000, Causal::BottomRight, true, false),
        (64, 2 * BLOCK_KEYS, Causal::None, true, false),
        (130, 1000, Causal::None, false, true),
    ] {
        let (b, h, g, d) = (2, 4, 2, 32);
        let q = random_vec(b * h * s * d, 1);
        // Scores spread over tens, so that a wrong maximum rounds differently.
        let k: Vec<f32> = random_vec(b * g * t * d, 2).iter().map(|x| 8.0 * x).collect();
        let v = random_vec(b * g * t * d, 3);
        let options = AttentionOptions {
            causal,
            key_lengths: with_lengths.then_some(&lengths[..]),
            mask: if mask {
                Mask::Additive(View4::contiguous(&additive[..b * h * s * t], [b, h, s, t]).unwrap())
            } else {
                Mask::None
            },
            ..Default::default()
        };
        let run = |forced: bool| {
            FORCE_ROW_MAX_PASS.with(|f| f.set(forced));
            let (mut out, mut lse) = (vec![0.0f32; b * h * s * d], vec![0.0f32; b * h * s]);
            flash_attention(
                ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
                Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap()),
                ForwardInputs::new(
                    View4::contiguous(&q, [b, h, s, d]).unwrap(),
                    View4::contiguous(&k, [b, g, t, d]).unwrap(),
                    View4::contiguous(&v, [b, g, t, d]).unwrap(),
                ),
                &options,
                Par::Seq,
            )
            .unwrap();
            FORCE_ROW_MAX_PASS.with(|f| f.set(false));
            (out, lse)
        };
        let (folded, pass) = (run(false), run(true));
        assert!(folded.0.iter().all(|x| x.is_finite()));
        assert!(
            bits_eq(&folded, &pass),
            "S {s}, T {t}, {causal:?}, lengths {with_lengths}, mask {mask}"
        );
    }
}

/// The split-KV merge keeps the non-finite policy: a NaN query makes its row NaN, and so does
/// a split whose every visible key has a NaN score, though the other split is finite.
#[test]
fn split_kv_rows_with_nan_scores_are_nan() {
    let (s, t, d) = (1, 1100, 8);
    let plan = Plan::new([1, 1, s, d], [1, t, d]);
    assert_eq!(plan.splits, 2, "expected two splits");
    let split = plan.keys_per_split;
    let v = random_vec(t * d, 3);
    for nan_query in [true, false] {
        let mut q = random_vec(s * d, 1);
        let mut k = random_vec(t * d, 2);
        if nan_query {
            q[3] = f32::NAN;
        } else {
            k[split * d..].iter_mut().step_by(d).for_each(|x| *x = f32::NAN);
        }
        let (mut out, mut lse) = (vec![0.0f32; s * d], vec![0.0f32; s]);
        flash_attention(
            ViewMut4::contiguous(&mut out, [1, 1, s, d]).unwrap(),
            Some(ViewMut::contiguous(&mut lse, [1, 1, s]).unwrap()),
            ForwardInputs::new(
                View4::contiguous(&q, [1, 1, s, d]).unwrap(),
                View4::contiguous(&k, [1, 1, t, d]).unwrap(),
                View4::contiguous(&v, [1, 1, t, d]).unwrap(),
            ),
            &AttentionOptions::default(),
            Par::Seq,
        )
        .unwrap();
        assert!(out.iter().all(|x| x.is_nan()), "nan_query={nan_query}: {out:?}");
        assert!(lse[0].is_nan(), "nan_query={nan_query}: lse {}", lse[0]);
    }
}

#[test]
fn decode_split_kv() {
    // One query per head, few heads, long keys: the split-KV path.
    for &(h, g, t) in &[(1, 1, 5000), (8, 2, 4096), (4, 4, 1025)] {
        let mut case = Case::new(1, h, g, 1, t, 32, 32);
        assert!(
            Plan::new([1, h, 1, 32], [g, t, 32]).splits > 1,
            "expected a split plan for {case:?}"
        );
        check(case);
        case.lengths = true;
        case.mask = MaskKind::Additive(MaskShape::Padding);
        check(case);
    }
}

#[test]
fn fully_masked_rows_give_zeros_and_neg_inf_lse() {
    let (b, h, s, t, d) = (1, 1, 3, 200, 8);
    let q = random_vec(b * h * s * d, 1);
    let k = random_vec(b * h * t * d, 2);
    // Row 1 may attend nothing.
    let allowed: Vec<bool> = (0..s * t).map(|i| i / t != 1).collect();
    let options = AttentionOptions {
        mask: Mask::Allowed(broadcast_to(&allowed, &[s, t], [b, h, s, t]).unwrap()),
        ..Default::default()
    };
    let qv = View4::contiguous(&q, [b, h, s, d]).unwrap();
    let kv = View4::contiguous(&k, [b, h, t, d]).unwrap();
    for unfused in [false, true] {
        let mut out = vec![f32::NAN; b * h * s * d];
        let mut lse = vec![0.0f32; s];
        let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
        let l = Some(ViewMut::contiguous(&mut lse, [b, h, s]).unwrap());
        if unfused {
            attention_unfused(o, l, ForwardInputs::new(qv, kv, kv), &options, Par::Seq).unwrap();
        } else {
            flash_attention(o, l, ForwardInputs::new(qv, kv, kv), &options, Par::Seq).unwrap();
        }
        assert!(
            out[d..2 * d].iter().all(|&x| x == 0.0),
            "unfused={unfused}: {:?}",
            &out[d..2 * d]
        );
        assert_eq!(lse[1], f32::NEG_INFINITY);
        assert!(lse[0].is_finite() && lse[2].is_finite());
        assert!(out.iter().all(|x| x.is_finite()));
    }
    // No keys at all.
    let mut out = vec![f32::NAN; b * h * s * d];
    let empty: [f32; 0] = [];
    let ke = View4::contiguous(&empty, [b, h, 0, d]).unwrap();
    flash_attention(
        ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
        None,
        ForwardInputs::new(qv, ke, ke),
        &AttentionOptions::default(),
        Par::Seq,
    )
    .unwrap();
    assert!(out.iter().all(|&x| x == 0.0));
}

#[test]
fn large_logits_neither_overflow_nor_lose_the_row() {
    let mut case = Case::new(1, 2, 2, 17, 300, 16, 16);
    // |q·k|·scale reaches the order of 1e4.
    case.magnitude = 1e4;
    check(case);
    case.causal = Causal::TopLeft;
    case.mask = MaskKind::Additive(MaskShape::Full);
    check(case);
}

#[test]
fn huge_finite_mask_values_behave_as_in_pytorch() {
    // A row whose every score is pushed to -1e30 by an additive mask is still a softmax over
    // equal values (uniform weights), as in PyTorch; only -inf (or a boolean) empties a row.
    // Scores of +1e30 win outright without overflowing.
    let (s, t, d) = (3, 5, 4);
    let q = random_vec(s * d, 1);
    let k = random_vec(t * d, 2);
    let v: Vec<f32> = (0..t * d).map(|i| (i / d) as f32).collect(); // value row j is all j
    let mut mask = vec![0.0f32; s * t];
    mask[..t].fill(-1e30); // row 0: every key at -1e30
    mask[t + 3] = 1e30; // row 1: key 3 at +1e30
    mask[2 * t..3 * t].fill(f32::NEG_INFINITY); // row 2: nothing visible
    let options = AttentionOptions {
        mask: Mask::Additive(View4::contiguous(&mask, [1, 1, s, t]).unwrap()),
        ..Default::default()
    };
    let (qv, kv, vv) = (
        View4::contiguous(&q, [1, 1, s, d]).unwrap(),
        View4::contiguous(&k, [1, 1, t, d]).unwrap(),
        View4::contiguous(&v, [1, 1, t, d]).unwrap(),
    );
    for unfused in [false, true] {
        let mut out = vec![f32::NAN; s * d];
        let o = ViewMut4::contiguous(&mut out, [1, 1, s, d]).unwrap();
        if unfused {
            attention_unfused(o, None, ForwardInputs::new(qv, kv, vv), &options, Par::Seq).unwrap();
        } else {
            flash_attention(o, None, ForwardInputs::new(qv, kv, vv), &options, Par::Seq).unwrap();
        }
        // Uniform over values 0..5: mean 2 (to the rounding of scores near -1e30).
        assert!(
            out[..d].iter().all(|&x| (x - 2.0).abs() < 1e-3),
            "unfused={unfused}: {:?}",
            &out[..d]
        );
        assert!(
            out[d..2 * d].iter().all(|&x| x == 3.0),
            "unfused={unfused}: {:?}",
            &out[d..2 * d]
        );
        assert!(
            out[2 * d..].iter().all(|&x| x == 0.0),
            "unfused={unfused}: {:?}",
            &out[2 * d..]
        );
    }
}

#[test]
fn shape_errors_name_the_tensor() {
    let x = [0.0f32; 64];
    let q = View4::contiguous(&x[..48], [1, 3, 4, 4]).unwrap();
    let k = View4::contiguous(&x[..32], [1, 2, 4, 4]).unwrap();
    let mut o = [0.0f32; 48];
    let err = flash_attention(
        ViewMut4::contiguous(&mut o, [1, 3, 4, 4]).unwrap(),
        None,
        ForwardInputs::new(q, k, k),
        &Default::default(),
        Par::Seq,
    )
    .unwrap_err();
    assert_eq!(
        err,
        KernelError::HeadsNotDivisible {
            op: "flash_attention",
            n_heads: 3,
            n_kv_heads: 2
        }
    );
    let k = View4::contiguous(&x[..48], [1, 3, 4, 4]).unwrap();
    let v = View4::contiguous(&x[..36], [1, 3, 3, 4]).unwrap();
    let err = flash_attention(
        ViewMut4::contiguous(&mut o, [1, 3, 4, 4]).unwrap(),
        None,
        ForwardInputs::new(q, k, v),
        &Default::default(),
        Par::Seq,
    )
    .unwrap_err();
    assert_eq!(
        err,
        KernelError::ShapeMismatch {
            op: "flash_attention",
            tensor: "v",
            expected: vec![1, 3, 4, 4],
            got: vec![1, 3, 3, 4]
        }
    );
    let lengths = [5usize];
    let options = AttentionOptions {
        key_lengths: Some(&lengths),
        ..Default::default()
    };
    let err = flash_attention(
        ViewMut4::contiguous(&mut o, [1, 3, 4, 4]).unwrap(),
        None,
        ForwardInputs::new(q, k, k),
        &options,
        Par::Seq,
    )
    .unwrap_err();
    assert_eq!(
        err,
        KernelError::KeyLengthTooLarge {
            op: "flash_attention",
            batch: 0,
            length: 5,
            n_keys: 4
        }
    );
}

/// Query lengths around the row-tile edges (64 rows; 128 and 256 rows, two and four tiles).
const QUERY_LENGTHS: [usize; 14] = [1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257];
/// Key lengths around the key-block edges (256 keys, bf16's blocks, and 512, f32's: a partial
/// last block, the online rescale across blocks), and past `2·MIN_KEYS_PER_SPLIT`, where calls
/// with few tasks split the keys and merge the partial results.
const KEY_LENGTHS: [usize; 19] = [
    1, 2, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1100,
];

pub(crate) fn arb_case() -> impl Strategy<Value = Case> {
    (
        (
            1usize..3,
            prop::sample::select(vec![(1usize, 1usize), (2, 1), (2, 2), (4, 1), (6, 3)]),
        ),
        (
            prop::sample::select(QUERY_LENGTHS.to_vec()),
            prop::sample::select(KEY_LENGTHS.to_vec()),
            prop::sample::select(vec![1usize, 3, 8, 17, 64]),
        ),
        (
            any::<bool>(),
            0usize..3,
            0usize..8,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((b, (h, g)), (s, t, d), (bshd, causal, mask, lengths, key_mask, alibi))| {
                let mut case = Case::new(b, h, g, s, t, d, if d % 2 == 0 { d } else { d + 2 });
                case.bshd = bshd;
                case.causal = [Causal::None, Causal::TopLeft, Causal::BottomRight][causal];
                case.mask = match mask {
                    0 => MaskKind::None,
                    1 => MaskKind::Allowed(MaskShape::Full),
                    2 => MaskKind::Allowed(MaskShape::TwoD),
                    3 => MaskKind::Allowed(MaskShape::Padding),
                    4 => MaskKind::Additive(MaskShape::Full),
                    5 => MaskKind::Additive(MaskShape::TwoD),
                    6 => MaskKind::Disallowed(MaskShape::Full),
                    _ => MaskKind::Additive(MaskShape::Padding),
                };
                case.lengths = lengths;
                case.key_mask = key_mask;
                case.alibi = alibi;
                case
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn flash_matches_reference_for_every_shape(case in arb_case()) {
        check(case);
    }
}

#[test]
fn packed_keys_and_values_are_sized_by_the_real_key_count() {
    // Before, every block was `[D, BLOCK_KEYS]`: 32× the size of K at T = 4.
    let k = BLOCK_KEYS;
    for (t, kb) in [
        (1, 16),
        (4, 16),
        (16, 16),
        (17, 32),
        (100, 112),
        (k - 1, k),
        (k, k),
        (k + 1, k),
        (2 * k + 44, k),
    ] {
        let (d, dv) = (8, 20);
        let plan = Plan::new([2, 4, 200, d], [2, t, dv]);
        assert_eq!(plan.kb_pad, kb, "T = {t}");
        let k_data = random_vec(2 * 2 * t * d, t as u64);
        let k = View4::contiguous(&k_data, [2, 2, t, d]).unwrap();
        let v_data = random_vec(2 * 2 * t * dv, t as u64 + 1);
        let v = View4::contiguous(&v_data, [2, 2, t, dv]).unwrap();
        let blocks = t.div_ceil(BLOCK_KEYS);
        let packed = pack_keys_transposed(&plan, &k, Par::Seq);
        assert_eq!(packed.len(), 2 * 2 * blocks * d * kb, "T = {t}");
        let values = super::tile::pack_values_rounded(&plan, super::Kv::F32(v), false, Par::Seq);
        assert_eq!(values.len(), 2 * 2 * blocks * 32 * kb, "T = {t}");
        // Each key block holds its keys in transposed panels of 16, zeros past T; each value
        // block its values in panels of 16 columns, zeros past Dv.
        for (bg, j, p) in [(0, 0, 0), (3, t - 1, 7), (1, t / 2, 3)] {
            let index = bg * blocks + j / BLOCK_KEYS;
            let jb = j % BLOCK_KEYS;
            let got = packed[index * d * kb + (jb / 16) * d * 16 + p * 16 + jb % 16];
            assert_eq!(got, k_data[(bg * t + j) * d + p], "T = {t}, key {j}, dim {p}");
            for c in [0, 15, 16, 19] {
                let got = values[index * 32 * kb + (c / 16) * kb * 16 + jb * 16 + c % 16];
                assert_eq!(got, v_data[(bg * t + j) * dv + c], "T = {t}, value {j}, column {c}");
            }
            assert_eq!(
                values[index * 32 * kb + kb * 16 + jb * 16 + 4],
                0.0,
                "T = {t}: Dv padding"
            );
        }
        if t % 16 != 0 && t < BLOCK_KEYS {
            let last = (t / 16) * d * 16;
            assert_eq!(packed[last + t % 16], 0.0, "T = {t}: the key padding is zero");
        }
        crate::buffer::give(packed);
        crate::buffer::give(values);
    }
}
