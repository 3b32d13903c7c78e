//! The layers' training passes with dropout on (which PyTorch's goldens cannot check, its masks
//! being its own): the backward against central differences of the forward under the same
//! seed (the masks are a function of the seed, the site and the index, so the forward is a
//! fixed function), for pre- and post-norm decoder layers; and the same bits on any thread
//! count.

use attn_core::kernels::testing::SplitMix64;
use attn_core::kernels::Par;
use attn_core::{Grads, Parameters, Sequence};
use attn_nn::layers::{Activation, Dropout};
use attn_nn::{BlockMasks, DecoderLayer, LayerConfig, Step, TransformerMasks};

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
