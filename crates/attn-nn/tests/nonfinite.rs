//! Garbage in padded positions never reaches the real ones, through whole layers.
//!
//! A batch padded to a common length often carries NaN or infinities in its padding (an
//! uninitialised buffer, a division by a zero count). PyTorch spreads them to every row of the
//! same batch element (`0·NaN` in `p·v`; checked with PyTorch 2.15, see docs/RELIABILITY.md).
//! attn does not: each test below runs a module on a padded batch whose padding is NaN or
//! `±inf` and on the same batch padded with zeros, on every thread count, and asserts that every
//! real position gives the same bits.

use attn_nn::core::kernels::Par;
use attn_nn::core::{KeyPadding, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights, Sequence};
use attn_nn::{BlockMasks, EncoderLayer, LayerConfig};

const B: usize = 3;
const S: usize = 40;
const E: usize = 32;
const LENGTHS: [usize; B] = [40, 29, 7];

fn input(seed: u64) -> Vec<f32> {
    (0..B * S * E)
        .map(|i| (((i as u64 + 1) * (seed * 2 + 1) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// `x` with every padded position (past `LENGTHS[b]`) set by `fill(element index)`.
fn padded_with(x: &[f32], fill: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut x = x.to_vec();
    for (b, &len) in LENGTHS.iter().enumerate() {
        let start = (b * S + len) * E;
        for (i, e) in x[start..(b + 1) * S * E].iter_mut().enumerate() {
            *e = fill(start + i);
        }
    }
    x
}

/// The same padding told three ways: lengths (padded keys are never visited), a boolean mask
/// and an additive `-inf` mask (padded keys are visited and masked, so `0·NaN` would arise).
fn with_paddings(f: impl Fn(&str, KeyPadding<'_>)) {
    let flags: Vec<bool> = (0..B * S).map(|i| i % S >= LENGTHS[i / S]).collect();
    let additive: Vec<f32> = flags.iter().map(|&f| if f { f32::NEG_INFINITY } else { 0.0 }).collect();
    f("lengths", KeyPadding::Lengths(&LENGTHS));
    let meaning = attn_nn::core::BoolMeaning::MaskedOut;
    f("boolean mask", KeyPadding::Bool { data: &flags, meaning });
    f("additive mask", KeyPadding::Additive(&additive));
}

fn garbage(i: usize) -> f32 {
    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e38][i % 4]
}

/// Asserts that the real positions of two `[B, S, E]` outputs have the same bits, and that
/// they are finite.
#[track_caller]
fn assert_real_rows_equal(got: &[f32], want: &[f32], what: &str) {
    for (b, &len) in LENGTHS.iter().enumerate() {
        for i in b * S * E..(b * S + len) * E {
            assert!(got[i].is_finite(), "{what}: element {i} is {}", got[i]);
            assert_eq!(got[i].to_bits(), want[i].to_bits(), "{what}: element {i}");
        }
    }
}

fn pools() -> Vec<(String, Option<rayon::ThreadPool>)> {
    let mut pools = vec![("sequential".to_string(), None)];
    for n in [1, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        pools.push((format!("{n} threads"), Some(pool)));
    }
    pools
}

/// Runs `f(par)` sequentially and on every pool.
fn on_every_pool<T: Send>(f: impl Fn(Par) -> T + Sync) -> Vec<(String, T)> {
    pools()
        .into_iter()
        .map(|(name, pool)| match pool {
            None => (name, f(Par::Seq)),
            Some(pool) => (name, pool.install(|| f(Par::Rayon))),
        })
        .collect()
}

#[test]
fn encoder_layers_keep_padding_garbage_out_of_real_positions() {
    let mut config = LayerConfig::new(E, 4);
    config.dim_feedforward = 48;
    config.batch_first = true;
    let first = EncoderLayer::with_seed(config.clone(), 1).unwrap();
    config.norm_first = true;
    let second = EncoderLayer::with_seed(config, 2).unwrap();
    let x = input(5);
    with_paddings(|padding, key_padding| {
        for causal in [false, true] {
            let masks = BlockMasks {
                key_padding,
                is_causal: causal,
                ..Default::default()
            };
            let stack = |x: &[f32], par: Par| {
                let h = first.forward(Sequence::batch_first(x, B, S, E), &masks, par).unwrap();
                second.forward(Sequence::batch_first(&h, B, S, E), &masks, par).unwrap()
            };
            let clean = stack(&padded_with(&x, |_| 0.0), Par::Seq);
            let dirty = padded_with(&x, garbage);
            for (name, got) in on_every_pool(|par| stack(&dirty, par)) {
                let what = format!("two encoder layers, {padding}, causal {causal}, {name}");
                assert_real_rows_equal(&got, &clean, &what);
            }
        }
    });
}

#[test]
fn attention_and_its_weights_keep_padding_garbage_out() {
    let mut config = MhaConfig::new(E, 4);
    config.batch_first = true;
    config.num_kv_heads = Some(2);
    let mha = MultiHeadAttention::with_seed(config, 3).unwrap();
    let x = input(6);
    with_paddings(|padding, key_padding| {
        let options = MhaOptions {
            key_padding,
            need_weights: NeedWeights::PerHead,
            ..Default::default()
        };
        let run = |x: &[f32], par: Par| {
            mha.forward_self(Sequence::batch_first(x, B, S, E), &options, par)
                .unwrap()
        };
        let clean = run(&padded_with(&x, |_| 0.0), Par::Seq);
        let dirty = padded_with(&x, garbage);
        for (name, got) in on_every_pool(|par| run(&dirty, par)) {
            assert_real_rows_equal(
                &got.output,
                &clean.output,
                &format!("self-attention, {padding}, {name}"),
            );
            // Weights `[B, H, S, S]` of real query rows.
            let (w, w_clean) = (got.weights.unwrap(), clean.weights.clone().unwrap());
            for (b, &len) in LENGTHS.iter().enumerate() {
                for h in 0..4 {
                    for s in 0..len {
                        let row = ((b * 4 + h) * S + s) * S;
                        assert_eq!(w[row..row + S], w_clean[row..row + S], "weights, {padding}, {name}");
                    }
                }
            }
        }

        // Cross-attention to a padded memory, by a direct call and through a filled cache.
        let tgt = &input(7)[..B * 9 * E];
        let run_cross = |memory: &[f32], par: Par| {
            let query = Sequence::batch_first(tgt, B, 9, E);
            let mem = Sequence::batch_first(memory, B, S, E);
            let direct = mha.forward(query, mem, mem, &options, par).unwrap().output;
            let mut cache = mha.new_cache(B, S);
            mha.append_to_cache(mem, mem, &mut cache, par).unwrap();
            let cached = mha.forward_over_cache(query, &cache, &options, par).unwrap().output;
            (direct, cached)
        };
        let (clean_direct, clean_cached) = run_cross(&padded_with(&x, |_| 0.0), Par::Seq);
        for (name, (direct, cached)) in on_every_pool(|par| run_cross(&dirty, par)) {
            for (got, want, what) in [(&direct, &clean_direct, "direct"), (&cached, &clean_cached, "cached")] {
                assert!(
                    got.iter().all(|x| x.is_finite()),
                    "cross-attention {what}, {padding}, {name}: non-finite output"
                );
                assert_eq!(got, want, "cross-attention {what}, {padding}, {name}");
            }
        }
    });
}
