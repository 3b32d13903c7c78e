//! Modules are `Send + Sync`: one module shared by 8 threads gives the bits of sequential calls.

use attn_nn::core::kernels::Par;
use attn_nn::core::{KeyPadding, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights, Sequence};
use attn_nn::{BertModel, BlockMasks, Decoder, EncoderLayer, LayerConfig, SentenceEmbedder, Transformer};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn modules_are_send_and_sync() {
    assert_send_sync::<MultiHeadAttention>();
    assert_send_sync::<EncoderLayer>();
    assert_send_sync::<Decoder>();
    assert_send_sync::<Transformer>();
    assert_send_sync::<BertModel>();
    assert_send_sync::<SentenceEmbedder>();
}

fn input(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u64 + 1) * (seed * 2 + 1) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

#[test]
fn one_module_shared_by_eight_threads_matches_sequential_calls() {
    let (b, s, e) = (2, 37, 64);
    let mut config = MhaConfig::new(e, 8);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config, 3).unwrap();
    let mut layer_config = LayerConfig::new(e, 8);
    layer_config.dim_feedforward = 96;
    layer_config.batch_first = true;
    let layer = EncoderLayer::with_seed(layer_config, 4).unwrap();
    let lengths = [s, s - 5];
    let run = |seed: u64| {
        let x = input(b * s * e, seed);
        let options = MhaOptions {
            key_padding: KeyPadding::Lengths(&lengths),
            need_weights: NeedWeights::Averaged,
            ..Default::default()
        };
        let attended = mha
            .forward_self(Sequence::batch_first(&x, b, s, e), &options, Par::Seq)
            .unwrap();
        let masks = BlockMasks {
            key_padding: KeyPadding::Lengths(&lengths),
            is_causal: seed.is_multiple_of(2),
            ..Default::default()
        };
        let layered = layer
            .forward(Sequence::batch_first(&x, b, s, e), &masks, Par::Rayon)
            .unwrap();
        (attended.output, attended.weights, layered)
    };
    let sequential: Vec<_> = (0..8).map(run).collect();
    let parallel: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8).map(|seed| scope.spawn(move || run(seed))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sequential, parallel);
}
