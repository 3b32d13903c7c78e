//! The attention entry that picks its path by shape: [`attention`] runs the flash kernel or the
//! unfused path, whichever [`chosen_path`] names for the shapes and this machine's SIMD level.
//! The choice depends on shapes and the level only, never on timing or the thread count, so
//! results stay deterministic.
//!
//! Today the flash kernel is the choice at every level and shape. An earlier rule sent AVX2+FMA
//! to the unfused path for S from 256 to 1024 (two runs of `attn bench sweep` on a Zen 4 EPYC
//! held to AVX2, when the unfused path was ahead there by 1.02–1.44×). The flash kernel has
//! been re-blocked since, and on a Zen 3 EPYC (a CPU whose best level is AVX2) `attn bench
//! sweep` at 2 threads put it ahead at every length, in two runs: 1.04–1.17× at S = T = 256,
//! 512 and 1024 with D = 64 and 1.10–1.17× with D = 32, 1.74–1.95× causal
//! (docs/PERFORMANCE.md). The unfused path stays, for `attn sdpa --path unfused`, the sweep and
//! the tests.

use crate::flash::Plan;
use crate::{AttentionOptions, ForwardInputs, KernelError, Par, SimdLevel, ViewMut, ViewMut4};

/// Which implementation computes an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// The tiled flash kernel (with split keys for decoding).
    Flash,
    /// Full `S×T` scores per head, softmax, then `P·V`.
    Unfused,
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelPath::Flash => "flash",
            KernelPath::Unfused => "unfused",
        })
    }
}

/// The path [`attention`] takes for `q: [B, H, S, D]` and `k: [B, G, T, D]` at `level`:
/// [`KernelPath::Flash`] at every level and shape (see the module docs for the measurements
/// that retired the unfused rule at AVX2+FMA). The shapes and the level stay parameters, so a
/// rule can return without changing callers.
pub fn chosen_path(level: SimdLevel, q: [usize; 4], k: [usize; 2]) -> KernelPath {
    let _ = (level, q, k);
    KernelPath::Flash
}

/// Attention with the path picked by shape ([`chosen_path`]; bf16 always flash): `q: [B, H, S, D]`,
/// `k: [B, G, T, D]`, `v: [B, G, T, Dv]` -> `out: [B, H, S, Dv]`, `lse: [B, H, S]`. Both paths
/// have the same semantics (masks, causal alignments, key lengths, ALiBi, empty rows,
/// non-finite values) and agree to rounding; see [`crate::flash_attention`] for the rest.
pub fn attention(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    by_path(out, [lse, None], inputs, options, par)
}

/// [`attention`] for a training forward: `q: [B, H, S, D]`, `k: [B, G, T, D]`,
/// `v: [B, G, T, Dv]` -> `out: [B, H, S, Dv]`, `lse: [B, H, S]` and `lse_lo: [B, H, S]`, what
/// rounding each row's `lse` to f32 lost (`lse + lse_lo` is the log-sum-exp to about twice f32's
/// precision). Given to [`crate::attention_backward`] beside `lse`, it lets the backward
/// recompute the probabilities to f32 precision however large the logits, where `lse` alone is
/// off by up to half an ulp of the row's largest score.
pub fn attention_with_lse_lo(
    out: ViewMut4<'_, f32>,
    lse: ViewMut<'_, f32, 3>,
    lse_lo: ViewMut<'_, f32, 3>,
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    by_path(out, [Some(lse), Some(lse_lo)], inputs, options, par)
}

/// [`attention`] that also writes the call's softmax weights to `weights`: every head's
/// `[B, H, S, T]`, or their mean `[B, S, T]` (as `nn.MultiheadAttention` returns with
/// `need_weights`). `out` and `lse` (optional) are [`attention`]'s, bit for bit, and the
/// weights are [`crate::attention_weights`]'s from that `lse`, bit for bit, on every path: the
/// probabilities the output weighed, `exp(s − lse)` of the forward's own scores.
///
/// On a call of the flash path with unsplit keys (not decoding) and at most 16,384 keys, the
/// flash kernel keeps each tile's masked scores and turns them into weights as each row
/// finishes, instead of a second pass that multiplies `q·kᵀ` again; when averaging it does so
/// only when every query row's heads fall in one task and there is a task per worker. Other
/// calls (decoding, longer keys, bf16 on AMX, the unfused path) run [`attention`], then
/// [`crate::attention_weights`].
///
/// In bf16 the second pass runs the forward's own products too (`vdpbf16ps`, decoding's dot
/// products against K in place, or f32 products of the rounded operands), except on AMX outside
/// decoding, where it multiplies the rounded operands in f32 and differs from the tiles' sums in
/// the last bits (both within the bound of docs/SEMANTICS.md's bf16 section).
///
/// Beyond [`attention`]'s errors, fails when `weights` has the wrong shape or D is 0.
pub fn attention_with_weights(
    out: ViewMut4<'_, f32>,
    lse: Option<ViewMut<'_, f32, 3>>,
    weights: crate::WeightsDst<'_>,
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let op = "attention_with_weights";
    let (q, k) = (inputs.q, inputs.k);
    let [b, h, g, s, t, d] = crate::softmax::validate_weights(op, &weights, &q, &k, options)?;
    let plan = Plan::for_precision([b, h, s, d], [g, t, inputs.v.shape()[3]], options.precision);
    if flash_keeps_scores(&plan, options, weights.averaged(), par) {
        let raw = Some(crate::weights::RawWeights::new(weights, h));
        return crate::flash::flash_impl(out, [lse, None], inputs, options, par, true, raw);
    }
    // Else the call, then the weights from its LSE (into the caller's `lse` if given).
    let mut own = Vec::new();
    let mut lse = match lse {
        Some(lse) => lse,
        None => {
            own.resize(b * h * s, 0.0f32);
            ViewMut::contiguous(&mut own[..], [b, h, s])?
        }
    };
    by_path(out, [Some(lse.rb_mut()), None], inputs, options, par)?;
    crate::softmax::weights_of_call(weights, [q, k], inputs.v.strides(), lse.rb(), options, par)
}

/// Whether the flash kernel writes the weights of a call of `plan` itself, keeping its masked
/// scores (otherwise they come from a second pass over the LSE). Calls with no empty
/// dimension qualify, f32 ones when [`chosen_path`] names the flash kernel and bf16 ones
/// (except at the AMX level, whose tiles take the second pass), with unsplit keys (not
/// decoding) and at most [`crate::flash::MAX_KEPT_KEYS`] keys; when averaging over heads, one
/// task holds every head of its query rows, so a row's heads must not straddle two row tiles
/// and there must be a task per worker. The unfused path never keeps its scores.
pub(crate) fn flash_keeps_scores(plan: &Plan, options: &AttentionOptions<'_>, averaged: bool, par: Par) -> bool {
    let sized = plan.b > 0 && plan.h > 0 && plan.s > 0 && plan.t > 0 && plan.d > 0;
    let flash = match options.precision {
        crate::Precision::F32 => {
            chosen_path(crate::simd_level(), [plan.b, plan.h, plan.s, plan.d], [plan.g, plan.t]) == KernelPath::Flash
        }
        // AMX's tiles keep theirs only once that has run on a CPU with AMX.
        crate::Precision::Bf16 => crate::bf16_level() != crate::Bf16Level::Amx,
    };
    let workers = match par {
        Par::Seq => 1,
        Par::Rayon => rayon::current_num_threads(),
    };
    let tasks_hold_rows = crate::BLOCK_ROWS.is_multiple_of(plan.rep) && plan.b * plan.row_tiles >= workers;
    sized && flash && plan.splits == 1 && plan.t <= crate::flash::MAX_KEPT_KEYS && (!averaged || tasks_hold_rows)
}

/// The one dispatch of [`attention`] and [`attention_with_lse_lo`]: the path [`chosen_path`]
/// names, with the non-finite repair on.
fn by_path(
    out: ViewMut4<'_, f32>,
    lse: [Option<ViewMut<'_, f32, 3>>; 2],
    inputs: ForwardInputs<'_>,
    options: &AttentionOptions<'_>,
    par: Par,
) -> Result<(), KernelError> {
    let [_, g, t, _] = inputs.k.shape();
    // bf16 products run in the flash kernel only.
    let path = match options.precision {
        crate::Precision::Bf16 => KernelPath::Flash,
        crate::Precision::F32 => chosen_path(crate::simd_level(), inputs.q.shape(), [g, t]),
    };
    match path {
        KernelPath::Flash => crate::flash::flash_impl(out, lse, inputs, options, par, true, None),
        KernelPath::Unfused => crate::softmax::unfused_impl(out, lse, inputs, options, par, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;
    use crate::{attention_unfused, flash_attention, View4};

    /// Bad operands of `attention_with_weights` and `attention_weights` are typed errors
    /// naming the tensor and the shape expected, never a panic, and leave the weights alone.
    #[test]
    fn weights_calls_refuse_bad_operands_with_typed_errors() {
        let (b, h, s, t, d) = (2, 4, 70, 300, 16);
        let q = random_vec(b * h * s * d, 1);
        let k = random_vec(b * h * t * d, 2);
        let v_short = random_vec(b * h * (t - 1) * d, 3);
        let qv = View4::contiguous(&q, [b, h, s, d]).unwrap();
        let kv = View4::contiguous(&k, [b, h, t, d]).unwrap();
        let v = View4::contiguous(&k, [b, h, t, d]).unwrap();
        let options = AttentionOptions::default();
        let mut out = vec![0.0f32; b * h * s * d];
        let shape_of = |e: KernelError| match e {
            KernelError::ShapeMismatch {
                op,
                tensor,
                expected,
                got,
            } => (op, tensor, expected, got),
            other => panic!("expected a shape mismatch, got {other:?}"),
        };
        // Weights one key short, per head and averaged.
        for averaged in [false, true] {
            let (want, got) = if averaged {
                (vec![b, s, t], vec![b, s, t - 1])
            } else {
                (vec![b, h, s, t], vec![b, h, s, t - 1])
            };
            let mut w = vec![7.0f32; got.iter().product()];
            let dst = if averaged {
                crate::WeightsDst::Averaged(ViewMut::contiguous(&mut w, [b, s, t - 1]).unwrap())
            } else {
                crate::WeightsDst::PerHead(ViewMut4::contiguous(&mut w, [b, h, s, t - 1]).unwrap())
            };
            let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
            let e = attention_with_weights(o, None, dst, ForwardInputs::new(qv, kv, v), &options, Par::Seq);
            assert_eq!(
                shape_of(e.unwrap_err()),
                ("attention_with_weights", "weights", want, got)
            );
            assert!(w.iter().all(|&x| x == 7.0), "weights written on an error");
        }
        let mut w = vec![0.0f32; b * s * t];
        fn averaged(w: &mut [f32], [b, s, t]: [usize; 3]) -> crate::WeightsDst<'_> {
            crate::WeightsDst::Averaged(ViewMut::contiguous(w, [b, s, t]).unwrap())
        }
        // Values one key short, and an LSE of the wrong shape: the attention call's own errors.
        let vs = View4::contiguous(&v_short, [b, h, t - 1, d]).unwrap();
        let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
        let e = attention_with_weights(
            o,
            None,
            averaged(&mut w, [b, s, t]),
            ForwardInputs::new(qv, kv, vs),
            &options,
            Par::Seq,
        );
        assert!(
            matches!(e, Err(KernelError::ShapeMismatch { tensor: "v", .. })),
            "{e:?}"
        );
        let mut lse = vec![0.0f32; b * h * (s - 1)];
        let l = ViewMut::contiguous(&mut lse, [b, h, s - 1]).unwrap();
        let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
        let e = attention_with_weights(
            o,
            Some(l),
            averaged(&mut w, [b, s, t]),
            ForwardInputs::new(qv, kv, v),
            &options,
            Par::Seq,
        );
        assert!(
            matches!(e, Err(KernelError::ShapeMismatch { tensor: "lse", .. })),
            "{e:?}"
        );
        let lse = vec![0.0f32; b * h * (s - 1)];
        let l = crate::View::contiguous(&lse, [b, h, s - 1]).unwrap();
        let e = crate::attention_weights(averaged(&mut w, [b, s, t]), qv, kv, l, &options, Par::Seq).unwrap_err();
        assert_eq!(
            shape_of(e),
            ("attention_weights", "lse", vec![b, h, s], vec![b, h, s - 1])
        );
        // A head dim of 0.
        let (q0, k0) = (
            View4::contiguous(&[], [b, h, s, 0]).unwrap(),
            View4::contiguous(&[], [b, h, t, 0]).unwrap(),
        );
        let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
        let e = attention_with_weights(
            o,
            None,
            averaged(&mut w, [b, s, t]),
            ForwardInputs::new(q0, k0, v),
            &options,
            Par::Seq,
        );
        assert!(
            matches!(
                e,
                Err(KernelError::InvalidArgument {
                    op: "attention_with_weights",
                    what: "head dim D",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn the_flash_kernel_is_chosen_at_every_level() {
        for level in [SimdLevel::Avx512, SimdLevel::Avx2Fma, SimdLevel::Scalar] {
            for (q, k) in [
                ([1, 8, 256, 64], [8, 256]),
                ([1, 8, 1024, 64], [8, 1024]),
                ([1, 32, 1, 128], [8, 1024]),
            ] {
                assert_eq!(chosen_path(level, q, k), KernelPath::Flash, "{level:?} {q:?}");
            }
        }
    }

    /// `attention` gives the bits of the path it names, here at this machine's level.
    #[test]
    fn attention_runs_the_chosen_path() {
        for (s, t) in [(64, 64), (256, 256), (300, 700), (1, 1100)] {
            let (b, h, g, d) = (1, 4, 2, 16);
            let q = random_vec(b * h * s * d, 1);
            let k = random_vec(b * g * t * d, 2);
            let v = random_vec(b * g * t * d, 3);
            let (qv, kv, vv) = (
                View4::contiguous(&q, [b, h, s, d]).unwrap(),
                View4::contiguous(&k, [b, g, t, d]).unwrap(),
                View4::contiguous(&v, [b, g, t, d]).unwrap(),
            );
            let options = AttentionOptions::default();
            let run = |f: &dyn Fn(ViewMut4<'_, f32>, ViewMut<'_, f32, 3>)| {
                let (mut out, mut lse) = (vec![0.0f32; b * h * s * d], vec![0.0f32; b * h * s]);
                f(
                    ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap(),
                    ViewMut::contiguous(&mut lse, [b, h, s]).unwrap(),
                );
                (out, lse)
            };
            let got = run(&|o, l| attention(o, Some(l), ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).unwrap());
            let want = match chosen_path(crate::simd_level(), [b, h, s, d], [g, t]) {
                KernelPath::Flash => run(&|o, l| {
                    flash_attention(o, Some(l), ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).unwrap()
                }),
                KernelPath::Unfused => run(&|o, l| {
                    attention_unfused(o, Some(l), ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).unwrap()
                }),
            };
            assert_eq!(got, want, "S = {s}, T = {t}");
        }
    }

    /// The mean over no heads (H = 0, one key/value head) is zeros, written over whatever the
    /// destination held, by both weights calls.
    #[test]
    fn averaged_weights_over_no_heads_are_zeros() {
        let (b, s, t, d) = (2, 3, 5, 4);
        let none: [f32; 0] = [];
        let q = View4::contiguous(&none, [b, 0, s, d]).unwrap();
        let kv = vec![0.5f32; b * t * d];
        let k = View4::contiguous(&kv, [b, 1, t, d]).unwrap();
        let options = AttentionOptions::default();
        let mut w = vec![f32::NAN; b * s * t];
        let dst = crate::WeightsDst::Averaged(ViewMut::contiguous(&mut w, [b, s, t]).unwrap());
        let lse = crate::View::contiguous(&none, [b, 0, s]).unwrap();
        crate::attention_weights(dst, q, k, lse, &options, Par::Seq).unwrap();
        assert!(w.iter().all(|&x| x == 0.0), "attention_weights: {w:?}");
        let mut w = vec![f32::NAN; b * s * t];
        let dst = crate::WeightsDst::Averaged(ViewMut::contiguous(&mut w, [b, s, t]).unwrap());
        let mut out: [f32; 0] = [];
        let o = ViewMut4::contiguous(&mut out, [b, 0, s, d]).unwrap();
        attention_with_weights(o, None, dst, ForwardInputs::new(q, k, k), &options, Par::Seq).unwrap();
        assert!(w.iter().all(|&x| x == 0.0), "attention_with_weights: {w:?}");
    }

    /// The flash kernel keeps its scores up to `MAX_KEPT_KEYS` keys (`[64, T]` floats per
    /// worker) and hands longer calls to the second pass (32 tasks, so the keys are not split; S = 64, the
    /// flash path at every level).
    #[test]
    fn scores_are_kept_up_to_the_bound_on_keys() {
        let options = AttentionOptions::default();
        // The bound `attention_with_weights`' rustdoc states: 16,384 keys.
        let most = 16 * 1024;
        for averaged in [false, true] {
            let at =
                |t: usize| flash_keeps_scores(&Plan::new([32, 1, 64, 16], [1, t, 16]), &options, averaged, Par::Seq);
            assert!(at(most), "T = {most}");
            assert!(!at(most + 1), "T = {}", most + 1);
        }
    }

    /// The names the paths print under (`attn bench sweep`'s chosen path, the demo).
    #[test]
    fn paths_print_their_names() {
        assert_eq!(KernelPath::Flash.to_string(), "flash");
        assert_eq!(KernelPath::Unfused.to_string(), "unfused");
    }
}
