//! Soak run: 10,000 forward calls with shapes drawn at random (multi-head attention with and
//! without weights, encoder layers, cached decoding that starts over now and then) in one
//! process, printing the resident memory after warm-up and at the end, and failing when it grew
//! by more than [`GROWTH_BOUND_KIB`] after warm-up.
//!
//! `cargo run --release -p attn-nn --example soak [CALLS]`; figures in docs/RELIABILITY.md.

use attn_nn::core::kernels::Par;
use attn_nn::core::{KeyPadding, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights, Sequence};
use attn_nn::{BlockMasks, EncoderLayer, LayerConfig};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let e = 64;
    let mut config = MhaConfig::new(e, 8);
    config.batch_first = true;
    config.num_kv_heads = Some(2);
    let mha = MultiHeadAttention::with_seed(config, 1).expect("valid config");
    let mut layer_config = LayerConfig::new(e, 4);
    layer_config.dim_feedforward = 128;
    layer_config.batch_first = true;
    let layer = EncoderLayer::with_seed(layer_config, 2).expect("valid config");
    let mut cache = mha.new_cache(2, 8);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n) as usize
    };
    let warm_up = calls / 10;
    let (mut after_warm_up, mut peak) = (0, 0);
    let started = std::time::Instant::now();
    for call in 0..calls {
        let (b, s) = (1 + next(3), 1 + next(96));
        let x: Vec<f32> = (0..b * s * e)
            .map(|i| ((i * 31 + call) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let lengths: Vec<usize> = (0..b).map(|i| s - (i * s / 4)).collect();
        match call % 4 {
            0 => {
                let options = MhaOptions {
                    key_padding: KeyPadding::Lengths(&lengths),
                    need_weights: NeedWeights::PerHead,
                    ..Default::default()
                };
                mha.forward_self(Sequence::batch_first(&x, b, s, e), &options, Par::Rayon)
                    .expect("valid shapes");
            }
            1 => {
                let masks = BlockMasks {
                    is_causal: true,
                    ..Default::default()
                };
                layer
                    .forward(Sequence::batch_first(&x, b, s, e), &masks, Par::Rayon)
                    .expect("valid shapes");
            }
            _ => {
                // Decoding: one token per call, starting over every 500 tokens.
                if cache.len() >= 500 {
                    cache.clear();
                }
                let token: Vec<f32> = (0..2 * e).map(|i| ((i * 17 + call) % 89) as f32 / 45.0 - 1.0).collect();
                mha.forward_append(
                    Sequence::batch_first(&token, 2, 1, e),
                    &mut cache,
                    &MhaOptions::default(),
                    Par::Rayon,
                )
                .expect("valid shapes");
            }
        }
        let rss = rss_kib();
        peak = peak.max(rss);
        if call + 1 == warm_up {
            after_warm_up = rss;
        }
    }
    let end = rss_kib();
    let growth = end as i64 - after_warm_up as i64;
    println!(
        "{calls} calls in {:.1} s: resident memory {after_warm_up} KiB after {warm_up} calls of warm-up, {end} KiB at the end, peak {peak} KiB; growth after warm-up {growth} KiB (bound {GROWTH_BOUND_KIB} KiB)",
        started.elapsed().as_secs_f64(),
    );
    assert!(end > 0, "cannot read VmRSS from /proc/self/status");
    assert!(
        growth <= GROWTH_BOUND_KIB,
        "resident memory grew by {growth} KiB after warm-up, more than {GROWTH_BOUND_KIB} KiB: a leak"
    );
}

/// The most the resident memory may grow after warm-up, whatever the number of calls. Measured:
/// 76 KiB after 10,000 calls and 68 KiB after 50,000 (allocator noise, it does not scale with
/// the calls); a leak of 64 bytes a call exceeds it within 10,000 calls.
const GROWTH_BOUND_KIB: i64 = 512;
