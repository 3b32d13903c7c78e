//! The layers' training passes with dropout on (which PyTorch's goldens cannot check, its masks
//! being its own): the backward against central differences of the forward under the same
//! seed (the masks are a function of the seed, the site and the index, so the forward is a
//! fixed function), for pre- and post-norm decoder layers; the same bits on any thread
//! count; and the tapes' size and recycling against a count from the design.

use attn_core::kernels::testing::SplitMix64;
use attn_core::kernels::{arena, Par};
use attn_core::{Grads, Parameters, Sequence};
use attn_nn::layers::{Activation, Dropout};
use attn_nn::{BlockMasks, DecoderLayer, LayerConfig, Step, Transformer, TransformerConfig, TransformerMasks};

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_signed()).collect()
}

/// The derivative from central differences `diff(step) = f(x + step) − f(x − step)` at `h` and
/// `h/2`, extrapolated (Richardson): truncation error of order `h⁴` instead of `h²`.
fn richardson(h: f32, mut diff: impl FnMut(f32) -> f64) -> f64 {
    let coarse = diff(h) / (2.0 * h as f64);
    let fine = diff(h / 2.0) / h as f64;
    (4.0 * fine - coarse) / 3.0
}

#[test]
fn decoder_layer_gradients_with_dropout_match_central_differences() {
    let (b, t, s, e) = (2, 4, 5, 8);
    for norm_first in [false, true] {
        let mut config = LayerConfig::new(e, 2);
        config.dim_feedforward = 12;
        config.batch_first = true;
        config.norm_first = norm_first;
        config.activation = Activation::Gelu;
        let mut layer = DecoderLayer::with_seed(config, 5).unwrap();
        let dropout = Dropout { p: 0.25, seed: 99 };
        let mut rng = SplitMix64::new(3);
        let tgt = random(&mut rng, b * t * e);
        let memory = random(&mut rng, b * s * e);
        let r = random(&mut rng, b * t * e);
        // Causal self-attention, no mask on the memory.
        let masks = TransformerMasks {
            tgt: BlockMasks {
                is_causal: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let forward = |layer: &DecoderLayer, tgt: &[f32], memory: &[f32], dropout: Dropout| {
            let mut unused = Grads::new();
            let (out, _) = layer
                .forward_train(
                    Sequence::batch_first(tgt, b, t, e),
                    Sequence::batch_first(memory, b, s, e),
                    &masks,
                    &mut Step::new(dropout, Par::Seq, &mut unused),
                )
                .unwrap();
            out
        };
        let loss = |layer: &DecoderLayer, tgt: &[f32], memory: &[f32]| -> f64 {
            let out = forward(layer, tgt, memory, dropout);
            out.iter().zip(&r).map(|(&o, &r)| o as f64 * r as f64).sum()
        };
        let run = |layer: &DecoderLayer, tgt: &[f32], memory: &[f32], par: Par| {
            let (tq, mq) = (
                Sequence::batch_first(tgt, b, t, e),
                Sequence::batch_first(memory, b, s, e),
            );
            let mut grads = Grads::new();
            let mut step = Step::new(dropout, par, &mut grads);
            let (out, tape) = layer.forward_train(tq, mq, &masks, &mut step).unwrap();
            let d = layer.backward(tq, mq, &masks, &tape, &r, &mut step).unwrap();
            (out, d, grads)
        };
        let (out, (d_tgt, d_memory), grads) = run(&layer, &tgt, &memory, Par::Seq);
        let (out_par, (d_tgt_par, d_memory_par), grads_par) = run(&layer, &tgt, &memory, Par::Rayon);
        assert_eq!((&out, &d_tgt, &d_memory), (&out_par, &d_tgt_par, &d_memory_par));
        for (n, g) in grads.iter() {
            assert_eq!(g.data(), grads_par.get(n).unwrap().data(), "{n}");
        }
        // Dropout is on: some of the output's elements differ from the dropout-free forward.
        let plain = forward(&layer, &tgt, &memory, Dropout::NONE);
        assert!(plain.iter().zip(&out).any(|(a, b)| (a - b).abs() > 1e-3));

        let largest = grads
            .iter()
            .flat_map(|(_, g)| g.data().iter())
            .chain(&d_tgt)
            .chain(&d_memory)
            .fold(0.0f32, |m, &g| m.max(g.abs())) as f64;
        // f32 central differences at steps 2e-2 and 1e-2, extrapolated: measured worst 1.6e-5 of
        // the largest gradient (GELU and LayerNorm are smooth); a dropout mask applied in the
        // forward and not the backward is off by a third of a gradient.
        let h = 2e-2f32;
        let tolerance = 2e-4 * largest;
        let mut worst = 0.0f64;
        for (which, grad) in [(0, &d_tgt), (1, &d_memory)] {
            for _ in 0..16 {
                let i = (rng.next_u64() as usize) % grad.len();
                let x0 = if which == 0 { tgt[i] } else { memory[i] };
                let numeric = richardson(h, |step| {
                    let at = |v: f32| {
                        let (mut tg, mut mem) = (tgt.clone(), memory.clone());
                        if which == 0 {
                            tg[i] = v;
                        } else {
                            mem[i] = v;
                        }
                        loss(&layer, &tg, &mem)
                    };
                    at(x0 + step) - at(x0 - step)
                });
                worst = worst.max((grad[i] as f64 - numeric).abs() / largest);
                assert!(
                    (grad[i] as f64 - numeric).abs() <= tolerance,
                    "norm_first {norm_first}: input {which}[{i}]: {} vs {numeric}",
                    grad[i]
                );
            }
        }
        let names: Vec<String> = layer.params_mut("").into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), grads.len());
        for name in names {
            let grad = grads.get(&name).unwrap().data().to_vec();
            for _ in 0..4 {
                let i = (rng.next_u64() as usize) % grad.len();
                let nudge = |layer: &mut DecoderLayer, by: f32| {
                    let mut params = layer.params_mut("");
                    let (_, p) = params.iter_mut().find(|(n, _)| *n == name).unwrap();
                    p.data_mut()[i] += by;
                };
                let numeric = richardson(h, |step| {
                    nudge(&mut layer, step);
                    let plus = loss(&layer, &tgt, &memory);
                    nudge(&mut layer, -2.0 * step);
                    let minus = loss(&layer, &tgt, &memory);
                    nudge(&mut layer, step);
                    plus - minus
                });
                worst = worst.max((grad[i] as f64 - numeric).abs() / largest);
                assert!(
                    (grad[i] as f64 - numeric).abs() <= tolerance,
                    "norm_first {norm_first}: {name}[{i}]: {} vs {numeric}",
                    grad[i]
                );
            }
        }
        eprintln!("norm_first {norm_first}: worst {worst:.2e} of the largest gradient");
    }
}

/// A training forward keeps what the backward needs, counted here from the design (the module
/// docs of `transformer::train`), and `bytes` says so; `recycle` hands all of it back to the
/// activation arena. Per layer of `N` tokens: the residual walk keeps each block's input after
/// the first and each block's sum (post-norm); attention keeps its projected queries, keys and
/// values, its output, and two floats per query row and head (the log-sum-exp and what
/// rounding it lost); the feed-forward block one `[N, F]` buffer (its output after dropout with ReLU, its
/// pre-activation otherwise). Each stack keeps
/// every layer's output (the next layer's or the final norm's input), and the model the
/// encoder's output (the memory).
#[test]
fn tapes_count_what_they_keep_and_give_it_back() {
    // 128 tokens a side at d_model 128: every kept [N, E] buffer is at least the arena's
    // KEEP_FLOATS, so recycling it shows in `kept_floats`.
    let (b, s, t, e, h, f) = (2, 64, 64, 128, 4, 256);
    let mut layer = LayerConfig::new(e, h);
    layer.dim_feedforward = f;
    layer.batch_first = true;
    let config = TransformerConfig {
        layer,
        num_encoder_layers: 2,
        num_decoder_layers: 1,
    };
    let model = Transformer::with_seed(config, 0).unwrap();
    let mut rng = SplitMix64::new(4);
    let (src, tgt) = (random(&mut rng, b * s * e), random(&mut rng, b * t * e));
    let mut grads = Grads::new();
    let mut step = Step::new(Dropout::NONE, Par::Seq, &mut grads);
    let (_, tape) = model
        .forward_train(
            Sequence::batch_first(&src, b, s, e),
            Sequence::batch_first(&tgt, b, t, e),
            &TransformerMasks::default(),
            &mut step,
        )
        .unwrap();
    // The memory is the encoder's output as inference computes it: the same arithmetic in the
    // same order (inference fuses the residual add into the norm's pass), so the same bits.
    let encoded = model
        .encoder
        .forward(Sequence::batch_first(&src, b, s, e), &BlockMasks::default(), Par::Seq)
        .unwrap();
    assert!(tape.memory() == encoded, "the memory is not the encoder's output");
    let (ns, nt) = (b * s, b * t);
    // Queries and output of `n_q` rows, keys and values of `n_kv`, two floats a row and head.
    let attention = |n_q: usize, n_kv: usize| 2 * n_q * e + 2 * n_kv * e + 2 * n_q * h;
    let encoder_layer = 3 * ns * e + attention(ns, ns) + ns * f;
    let decoder_layer = 5 * nt * e + attention(nt, nt) + attention(nt, ns) + nt * f;
    let floats = 2 * (encoder_layer + ns * e) + ns * e + (decoder_layer + nt * e);
    assert_eq!(tape.bytes(), 4 * floats);
    // A gradient of the wrong length is a typed error naming it, before any work.
    let short = vec![0.0f32; nt * e - 1];
    let err = model
        .backward(
            Sequence::batch_first(&src, b, s, e),
            Sequence::batch_first(&tgt, b, t, e),
            &TransformerMasks::default(),
            &tape,
            &short,
            &mut step,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("d_output") && err.contains(&format!("{} elements", nt * e)),
        "{err}"
    );
    // Everything but the log-sum-exp rows (below KEEP_FLOATS) comes back to the arena.
    let small = 2 * (2 * ns * h) + 2 * (2 * nt * h);
    assert!(2 * nt * h < arena::KEEP_FLOATS && ns * e >= arena::KEEP_FLOATS);
    arena::clear();
    tape.recycle();
    let kept = arena::kept_floats();
    assert!(kept >= floats - small, "{kept} floats kept of {}", floats - small);
}
