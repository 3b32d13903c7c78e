//! Multi-head attention over padded sequences, and decoding with a KV cache, which gives what
//! one causal pass gives.
use attn_core::prelude::*;

fn main() -> Result<(), AttnError> {
    let (b, s, e) = (2, 5, 32);
    let mha = MultiHeadAttention::with_seed(MhaConfig::new(e, 4), 7)?;
    let x: Vec<f32> = (0..b * s * e).map(|i| (i as f32 * 0.3).sin()).collect();
    let batch = Sequence::batch_first(&x, b, s, e);
    // The second sequence has 3 real tokens: its queries give its last 2 keys no weight.
    let padded = MhaOptions::default().key_padding(KeyPadding::Lengths(&[5, 3]));
    let out = mha.forward_self(batch, &padded.need_weights(NeedWeights::Averaged), Par::Rayon)?;
    assert_eq!(out.weights.expect("asked for")[(s + 1) * s + 4], 0.0); // [B, S, T]: b 1, s 1, t 4
                                                                       // Five steps through a KV cache against one causal pass.
    let causal = MhaOptions::default().causal();
    let causal = mha.forward_self(batch, &causal, Par::Rayon)?.output;
    let mut cache = mha.new_cache(b, s);
    for t in 0..s {
        let token = batch.positions(t..t + 1)?; // [B, 1, E]
        let step = Sequence::batch_first(&token, b, 1, e);
        let out = mha
            .forward_append(step, &mut cache, &Default::default(), Par::Seq)?
            .output;
        let want = Sequence::batch_first(&causal, b, s, e).positions(t..t + 1)?;
        let diff = out.iter().zip(&want).map(|(a, w)| (a - w).abs()).fold(0.0, f32::max);
        println!("step {t}: the cache against one causal pass, largest difference {diff:.1e}");
        assert!(diff < 1e-5);
    }
    Ok(())
}
