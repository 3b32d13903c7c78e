//! Multi-head attention set to `Precision::F32` packs its weights once where attn's own f32
//! GEMM reads them (Intel and Zen 4 at AVX-512, Zen 3 at AVX2, at the first product of enough rows; elsewhere,
//! and before, it holds no copy): the bits of the unpacked
//! module on every projection path, and handing the weights out mutably drops the copies, so a
//! changed weight is what the next forward uses, never a stale copy.

use attn_core::kernels::testing::random_vec as random;
use attn_core::kernels::{F32Panels, Par};
use attn_core::{MhaConfig, MhaOptions, MultiHeadAttention, Parameters, Precision, Sequence};

/// Cross-attention (query, key and value differ: each projection on its own) and
/// self-attention (the fused projection, when the weights are fused), as bits.
fn outputs(mha: &MultiHeadAttention, kdim: usize, vdim: usize) -> Vec<u32> {
    // 2 × 40 rows and 256 columns: products big enough for attn's own GEMM.
    let (b, s, t, e) = (2, 40, 30, mha.dims()[0]);
    let (x, k, v) = (random(b * s * e, 1), random(b * t * kdim, 2), random(b * t * vdim, 3));
    let options = MhaOptions::default();
    let (query, key, value) = (
        Sequence::batch_first(&x, b, s, e),
        Sequence::batch_first(&k, b, t, kdim),
        Sequence::batch_first(&v, b, t, vdim),
    );
    let mut out = mha.forward(query, key, value, &options, Par::Rayon).unwrap().output;
    if kdim == e && vdim == e {
        out.extend(mha.forward_self(query, &options, Par::Rayon).unwrap().output);
    }
    out.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn packed_f32_weights_give_the_unpacked_bits_and_never_go_stale() {
    let e = 256;
    let cases = [
        ("fused", MhaConfig::new(e, 4)),
        (
            "kdim and vdim",
            MhaConfig {
                kdim: Some(96),
                vdim: Some(64),
                ..MhaConfig::new(e, 4)
            },
        ),
        (
            "bias_kv and grouped heads",
            MhaConfig {
                add_bias_kv: true,
                num_kv_heads: Some(2),
                ..MhaConfig::new(e, 4)
            },
        ),
    ];
    for (name, cfg) in cases {
        let (kdim, vdim) = (cfg.kdim.unwrap_or(e), cfg.vdim.unwrap_or(e));
        let plain = MultiHeadAttention::with_seed(cfg.clone(), 7).unwrap();
        let want = outputs(&plain, kdim, vdim);
        let mut packed = plain.clone();
        packed.set_precision(Precision::F32).unwrap();
        assert_eq!(packed.precision(), Precision::F32, "{name}");
        // Nothing is packed before a product reads it, and decoding's single rows never do.
        assert_eq!(packed.bytes_held(), plain.bytes_held(), "{name}: packed before use");
        let row = random(2 * e, 4);
        let one = Sequence::batch_first(&row, 2, 1, e);
        let decode = |m: &MultiHeadAttention| m.forward_self(one, &MhaOptions::default(), Par::Rayon).unwrap().output;
        if kdim == e && vdim == e {
            assert_eq!(decode(&packed), decode(&plain), "{name}: decoding");
            assert_eq!(packed.bytes_held(), plain.bytes_held(), "{name}: decoding packed");
        }
        assert!(
            outputs(&packed, kdim, vdim) == want,
            "{name}: the packed copies changed the bits"
        );
        let copies = packed.bytes_held() - plain.bytes_held();
        assert_eq!(
            copies > 0,
            F32Panels::worth_packing([e, e]),
            "{name}: {copies} bytes of copies"
        );
        assert!(
            outputs(&packed, kdim, vdim) == want,
            "{name}: the packed copies, read again, changed the bits"
        );
        // Halve every weight matrix through the mutable hand-out: the copies go with it.
        for (param, tensor) in packed.params_mut("") {
            if param.ends_with("weight") {
                tensor.data_mut().iter_mut().for_each(|x| *x *= 0.5);
            }
        }
        assert_eq!(packed.bytes_held(), plain.bytes_held(), "{name}: copies kept");
        let changed = MultiHeadAttention::from_state_dict(cfg.clone(), packed.state_dict()).unwrap();
        let want_changed = outputs(&changed, kdim, vdim);
        assert!(want_changed != want, "{name}: halving the weights changed nothing");
        assert!(outputs(&packed, kdim, vdim) == want_changed, "{name}: stale weights");
        // Packed again, from the new weights.
        packed.set_precision(Precision::F32).unwrap();
        assert!(outputs(&packed, kdim, vdim) == want_changed, "{name}: repacked");
    }
}

/// Self-attention packs the fused `[3E, E]` and the output `[E, E]` weights at its first large
/// call, each copy at least its weight's floats and at most the column padding more (panels of
/// 48 columns); a cross-attention call then packs the Q, K and V rows on their own as well.
#[test]
fn self_attention_packs_fused_and_output_weights_and_cross_attention_the_parts() {
    let e = 256;
    if !F32Panels::worth_packing([e, e]) {
        eprintln!("skipped: attn's own GEMM is not this CPU's default, so nothing is packed");
        return;
    }
    let plain = MultiHeadAttention::with_seed(MhaConfig::new(e, 4), 7).unwrap();
    let mut packed = plain.clone();
    packed.set_precision(Precision::F32).unwrap();
    let (b, s, t) = (2, 40, 30);
    let (x, kv) = (random(b * s * e, 1), random(b * t * e, 2));
    let query = Sequence::batch_first(&x, b, s, e);
    packed.forward_self(query, &MhaOptions::default(), Par::Rayon).unwrap();
    let self_copies = packed.bytes_held() - plain.bytes_held();
    let weights = 4 * (3 * e * e + e * e);
    assert!(
        self_copies >= weights && self_copies <= weights * 9 / 8,
        "{self_copies} bytes for {weights} bytes of weights"
    );
    let memory = Sequence::batch_first(&kv, b, t, e);
    packed
        .forward(query, memory, memory, &MhaOptions::default(), Par::Rayon)
        .unwrap();
    let parts = packed.bytes_held() - plain.bytes_held() - self_copies;
    assert!(
        parts >= 4 * 3 * e * e && parts <= 4 * 3 * e * e * 9 / 8,
        "{parts} bytes for the Q, K and V rows"
    );
}
