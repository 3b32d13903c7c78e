//! `Seq2SeqConfig::parameter_count` and `training_bytes` against the model: the count against
//! the model's tensors, the bound against what training allocates. This test binary's allocator
//! tracks the bytes live and their peak; the test (alone in the binary, on one thread) reads the
//! peak above the start while a model is made and trains two steps, its activation arena
//! emptied first (the kernels' per-thread buffers stay warm: they are not training's).

use attn_core::kernels::Par;
use attn_core::Precision;
use attn_nn::{AdamW, Seq2Seq, Seq2SeqConfig, TrainStep};

mod tracking;
use tracking::peak_above_start;

#[global_allocator]
static ALLOCATOR: tracking::Tracking = tracking::Tracking;

/// A model of `config` in `precision`, trained two steps on `pairs`.
fn train(config: &Seq2SeqConfig, precision: Precision, pairs: &[(&str, &str)]) {
    let mut model = Seq2Seq::with_seed(config.clone(), 1).unwrap();
    model.set_precision(precision).unwrap();
    let (mut adam, mut grads) = (AdamW::new((0.9, 0.98), 1e-9, 0.0).unwrap(), model.grads());
    for number in 1..3 {
        let settings = TrainStep {
            number,
            par: Par::Seq,
            ..Default::default()
        };
        model.train_step(pairs, &settings, &mut adam, &mut grads, 1e-3).unwrap();
    }
}

#[test]
fn parameter_count_and_training_bytes_bound_the_model() {
    let texts: Vec<(String, String)> = (0..256)
        .map(|i| {
            let (day, year) = (i % 28 + 1, 1900 + i);
            (format!("{day} March {year}"), format!("{year}-03-{day:02}"))
        })
        .collect();
    let pairs: Vec<(&str, &str)> = texts.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let mut worst = (f64::INFINITY, 0.0f64);
    for (e, ff, layers, batch, bias) in [
        (32, 64, 2, 8, true),
        (32, 64, 2, 64, false),
        (64, 256, 2, 32, true),
        (128, 512, 2, 64, true),
        (128, 512, 4, 16, true),
        (256, 1024, 1, 64, true),
        (64, 64, 2, 256, true),
    ] {
        let mut config = Seq2SeqConfig::for_pairs(&pairs);
        let layer = &mut config.transformer.layer;
        (layer.d_model, layer.nhead, layer.dim_feedforward, layer.bias) = (e, 4, ff, bias);
        (
            config.transformer.num_encoder_layers,
            config.transformer.num_decoder_layers,
        ) = (layers, layers + 1);
        let model = Seq2Seq::with_seed(config.clone(), 1).unwrap();
        assert_eq!(config.parameter_count(), model.parameter_count() as u128, "{config:?}");
        drop(model);
        let batch = &pairs[..batch];
        let tokens: usize = batch
            .iter()
            .map(|(s, t)| s.chars().count() + t.chars().count() + 2)
            .sum();
        for precision in [Precision::F32, Precision::Bf16] {
            // The kernels' per-thread buffers warm; the activation arena empty.
            train(&config, precision, batch);
            attn_core::kernels::arena::clear();
            let peak = peak_above_start(|| train(&config, precision, batch));
            let bound = config.training_bytes(tokens);
            let ratio = bound as f64 / peak as f64;
            assert!(
                (1.0..=3.0).contains(&ratio),
                "e {e} ff {ff} layers {layers} tokens {tokens} {precision:?}: bound {bound}, peak {peak}"
            );
            worst = (worst.0.min(ratio), worst.1.max(ratio));
        }
    }
    eprintln!("training_bytes over the peak: {:.2} to {:.2}", worst.0, worst.1);
    // No width overflows them: they saturate.
    let mut config = Seq2SeqConfig::for_pairs(&pairs);
    config.transformer.layer.d_model = usize::MAX;
    config.transformer.num_encoder_layers = usize::MAX;
    assert_eq!(config.parameter_count(), u128::MAX);
    assert_eq!(config.training_bytes(usize::MAX), u128::MAX);
    config.transformer.layer.d_model = 1 << 20;
    config.transformer.num_encoder_layers = 1;
    assert!(config.parameter_count() > 1 << 42 && config.parameter_count() < u128::MAX);
}
