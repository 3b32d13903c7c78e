//! Multi-head attention over padded sequences, and decoding with a KV cache, which gives what
//! one causal pass gives.
use attn_core::prelude::*;

fn main() -> Result<(), AttnError> {
    let (b, s, e) = (2, 5, 32);
    let mha = MultiHeadAttention::with_seed(MhaConfig::new(e, 4), 7)?;
    let x: Vec<f32> = (0..b * s * e).map(|i| (i as f32 * 0.3).sin()).collect();
    let padding = KeyPadding::Lengths(&[5, 3]); // the second sequence has 3 real tokens
    let padded = MhaOptions {
        key_padding: padding,
        need_weights: NeedWeights::Averaged,
        ..Default::default()
    };
    let weights = mha
        .forward_self(Sequence::batch_first(&x, b, s, e), &padded, Par::Rayon)?
        .weights;
    println!(
        "weight on a padded key: {}",
        weights.expect("asked for")[(s + 1) * s + 4]
    );
    let causal = MhaOptions {
        is_causal: true,
        ..Default::default()
    };
    let full = mha
        .forward_self(Sequence::batch_first(&x[..s * e], 1, s, e), &causal, Par::Seq)?
        .output;
    let mut cache = mha.new_cache(1, s);
    for (step, token) in x[..s * e].chunks(e).enumerate() {
        let out = mha.forward_append(
            Sequence::batch_first(token, 1, 1, e),
            &mut cache,
            &Default::default(),
            Par::Seq,
        )?;
        let diff = out
            .output
            .iter()
            .zip(&full[step * e..])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        println!("token {step}: cached against one causal pass, largest difference {diff:.1e}");
        assert!(diff < 1e-5);
    }
    Ok(())
}
