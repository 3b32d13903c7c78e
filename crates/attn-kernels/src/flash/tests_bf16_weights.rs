//! bf16 attention's weights from [`crate::attention_with_weights`], which the flash kernel
//! writes from its own scores where it keeps them: checked from [`super::tests_bf16`]'s cases
//! against the bound of its module doc.

use super::tests::{bits_eq, row_major, view4_mut, Case, EPS};
use super::FORCE_VDPBF16PS;
use crate::{AttentionOptions, ForwardInputs, Par, ViewMut, ViewMut4};

/// The weights of `case` in bf16 (`options`), `seq` being [`crate::attention`]'s `(out, lse)`
/// (row-major), `rounded` the rounded operands' exact weights and `deltas` each row's score
/// bound `Δ`: [`crate::attention_weights`] from that LSE within `Δ + (T + 4)·ε` of the rounded
/// operands' softmax (scores and LSE), then [`check_kept_weights`].
pub(super) fn check_weights(
    case: &Case,
    options: &AttentionOptions<'_>,
    inputs: ForwardInputs<'_>,
    seq: &(Vec<f32>, Vec<f32>),
    rounded: &[f64],
    deltas: &[f64],
) {
    let Case { b, h, s, t, .. } = *case;
    let mut weights = vec![f32::NAN; b * h * s * t];
    let dst = crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut weights, [b, h, s, t]).unwrap());
    let lse_view = crate::View::contiguous(&seq.1, [b, h, s]).unwrap();
    crate::attention_weights(dst, inputs.q, inputs.k, lse_view, options, Par::Rayon).unwrap();
    let weight_bound = |i: usize, want: f64| {
        let factor = (2.0 * deltas[i / t.max(1)] + (t as f64 + 4.0) * EPS).exp();
        (factor - 1.0) * want + 2.0 * EPS
    };
    for (i, (&got, &want)) in weights.iter().zip(rounded).enumerate() {
        assert!(
            (got as f64 - want).abs() <= weight_bound(i, want),
            "{case:?}: weight {i} = {got}, want {want}"
        );
    }
    check_kept_weights(case, options, inputs, seq, &weights, rounded, weight_bound);
}

/// [`crate::attention_with_weights`] in bf16, per head and averaged, sequential and on 2 and 3
/// threads: `out` and `lse` are [`crate::attention`]'s bits (`seq`, row-major), and the weights,
/// which the flash kernel writes from its own scores where [`crate::path::flash_keeps_scores`] lets
/// it, are the rounded operands' softmax within the bound of [`crate::attention_weights`]'s
/// (`bound(i, want)` for weight `i`; averaged, the mean of the heads' bounds), and they are
/// [`crate::attention_weights`]'s bits from that LSE (`second_pass`, per head; averaged, its
/// average computed here), whose second pass runs the forward's own products at every level.
fn check_kept_weights(
    case: &Case,
    options: &AttentionOptions<'_>,
    inputs: ForwardInputs<'_>,
    seq: &(Vec<f32>, Vec<f32>),
    second_pass: &[f32],
    rounded: &[f64],
    bound: impl Fn(usize, f64) -> f64,
) {
    let Case {
        b, h, s, t, dv, bshd, ..
    } = *case;
    let forced = FORCE_VDPBF16PS.with(|f| f.get());
    let mut second_pass_mean = vec![f32::NAN; b * s * t];
    let dst = crate::WeightsDst::Averaged(ViewMut::contiguous(&mut second_pass_mean, [b, s, t]).unwrap());
    let lse_view = crate::View::contiguous(&seq.1, [b, h, s]).unwrap();
    crate::attention_weights(dst, inputs.q, inputs.k, lse_view, options, Par::Rayon).unwrap();
    for averaged in [false, true] {
        for threads in [0, 2, 3] {
            let what = format!("{case:?}, averaged {averaged}, {threads} threads (0: sequential)");
            let shape = if averaged { [b, 1, s, t] } else { [b, h, s, t] };
            let mut got = vec![f32::NAN; shape.iter().product()];
            let (mut out, mut lse) = (vec![f32::NAN; b * h * s * dv], vec![f32::NAN; b * h * s]);
            let mut call = |par: Par| {
                FORCE_VDPBF16PS.with(|f| f.set(forced));
                let dst = if averaged {
                    crate::WeightsDst::Averaged(ViewMut::contiguous(&mut got, [b, s, t]).unwrap())
                } else {
                    crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut got, [b, h, s, t]).unwrap())
                };
                let lse_view = ViewMut::contiguous(&mut lse, [b, h, s]).unwrap();
                let out_view = view4_mut(&mut out, [b, h, s, dv], bshd);
                crate::attention_with_weights(out_view, Some(lse_view), dst, inputs, options, par).unwrap();
            };
            match threads {
                0 => call(Par::Seq),
                n => rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
                    .install(|| call(Par::Rayon)),
            }
            let got_out = (row_major(&out, [b, h, s, dv], bshd), lse);
            assert!(bits_eq(seq, &got_out), "out or lse differ from attention(): {what}");
            for (i, &x) in got.iter().enumerate() {
                let (want, limit) = if averaged {
                    let (bi, row) = (i / (s * t), i % (s * t));
                    let at = |hi: usize| bi * h * s * t + hi * s * t + row;
                    let mean = (0..h).map(|hi| rounded[at(hi)]).sum::<f64>() / h as f64;
                    let limit = (0..h).map(|hi| bound(at(hi), rounded[at(hi)])).sum::<f64>() / h as f64;
                    (mean, limit + (h as f64 + 2.0) * EPS * mean)
                } else {
                    (rounded[i], bound(i, rounded[i]))
                };
                assert!(
                    (x as f64 - want).abs() <= limit,
                    "{what}: weight {i} = {x}, want {want}"
                );
                let second = if averaged { second_pass_mean[i] } else { second_pass[i] };
                assert_eq!(
                    x.to_bits(),
                    second.to_bits(),
                    "{what}: weight {i} is not the second pass's"
                );
            }
        }
    }
}
