//! Multi-head attention with bf16 projections (`Precision::Bf16`): every projection path (fused
//! self-attention, separate key/value weights, appended key rows, the output projection, the
//! KV cache) stays within bf16's error of the f32 module, the cache and one causal pass agree,
//! and going back to f32 or handing the weights out mutably restores the f32 bits.

use attn_core::kernels::testing::random_vec as random;
use attn_core::kernels::{round_to_bf16, Bf16Panels, Par, View2, View4};
use attn_core::{
    sdpa, sdpa_backward, Grads, KvCache, KvView, MhaConfig, MhaInputs, MhaOptions, MultiHeadAttention, NeedWeights,
    ParamPath, Parameters, Precision, Rope, RopeStyle, SdpaOptions, Sequence,
};

/// `max |got - want| / (1 + max |want|)`: bf16's rounding error scales with the sums of
/// `|x·w|`, so it is taken relative to the output's scale.
fn scaled_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = 1.0 + want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs() / scale)
        .fold(0.0, f64::max)
}

/// Measured at most 4.6e-4 over these cases (E = 64, inputs in [-1, 1)); the bound is about
/// 10×. Reading a projection through another's packed weights is off by the whole scale.
const BF16_TOLERANCE: f64 = 5e-3;

fn config(e: usize, h: usize) -> MhaConfig {
    MhaConfig::new(e, h)
}

/// Self-attention and cross-attention on one module in f32 and in bf16.
fn outputs(mha: &MultiHeadAttention, [b, s, t]: [usize; 3], kdim: usize, vdim: usize) -> [Vec<f32>; 2] {
    let e = mha.dims()[0];
    let x = random(b * s * e, 1);
    let k = random(b * t * kdim, 2);
    let v = random(b * t * vdim, 3);
    let options = MhaOptions::default();
    let cross = mha
        .forward(
            Sequence::batch_first(&x, b, s, e),
            Sequence::batch_first(&k, b, t, kdim),
            Sequence::batch_first(&v, b, t, vdim),
            &options,
            Par::Rayon,
        )
        .unwrap()
        .output;
    let own = if kdim == e && vdim == e {
        mha.forward_self(Sequence::batch_first(&x, b, s, e), &options, Par::Rayon)
            .unwrap()
            .output
    } else {
        Vec::new()
    };
    [cross, own]
}

#[test]
fn every_projection_path_stays_within_bf16_error() {
    let (b, s, t) = (2, 37, 53);
    let cases: [(&str, MhaConfig); 4] = [
        ("fused", config(64, 4)),
        (
            "grouped heads",
            MhaConfig {
                num_kv_heads: Some(2),
                ..config(64, 4)
            },
        ),
        (
            "kdim and vdim",
            MhaConfig {
                kdim: Some(40),
                vdim: Some(24),
                ..config(64, 4)
            },
        ),
        (
            "bias_kv and zero_attn",
            MhaConfig {
                add_bias_kv: true,
                add_zero_attn: true,
                ..config(64, 4)
            },
        ),
    ];
    let mut worst = 0.0f64;
    for (name, cfg) in cases {
        let (kdim, vdim) = (cfg.kdim.unwrap_or(64), cfg.vdim.unwrap_or(64));
        let mut mha = MultiHeadAttention::with_seed(cfg, 7).unwrap();
        let want = outputs(&mha, [b, s, t], kdim, vdim);
        mha.set_precision(Precision::Bf16).unwrap();
        assert_eq!(mha.precision(), Precision::Bf16);
        let got = outputs(&mha, [b, s, t], kdim, vdim);
        for (what, (g, w)) in ["cross", "self"].iter().zip(got.iter().zip(&want)) {
            if w.is_empty() {
                continue;
            }
            let error = scaled_error(g, w);
            worst = worst.max(error);
            assert!(error <= BF16_TOLERANCE, "{name} {what}: {error:e}");
            assert_ne!(g, w, "{name} {what}: bf16 gave the f32 bits");
        }
        // Back to f32: the f32 bits.
        mha.set_precision(Precision::F32).unwrap();
        assert_eq!(outputs(&mha, [b, s, t], kdim, vdim), want, "{name}: back to f32");
    }
    eprintln!("bf16 against f32, worst scaled error: {worst:.2e}");
}

/// Decoding with a KV cache in bf16, a token at a time, equals one causal pass in bf16 (the
/// projections of a row do not depend on the rows beside it).
#[test]
fn bf16_cache_decoding_equals_one_causal_pass() {
    let (b, s, e) = (2, 11, 64);
    let mut mha = MultiHeadAttention::with_seed(config(e, 4), 3).unwrap();
    mha.set_precision(Precision::Bf16).unwrap();
    let x = random(b * s * e, 9);
    let full = mha
        .forward_self(
            Sequence::batch_first(&x, b, s, e),
            &MhaOptions::default().causal(),
            Par::Rayon,
        )
        .unwrap()
        .output;
    let mut cache = mha.new_cache(b, s);
    let mut steps = vec![0.0f32; b * s * e];
    for i in 0..s {
        let token: Vec<f32> = (0..b)
            .flat_map(|bi| x[(bi * s + i) * e..(bi * s + i + 1) * e].to_vec())
            .collect();
        let out = mha
            .forward_append(
                Sequence::batch_first(&token, b, 1, e),
                &mut cache,
                &MhaOptions::default(),
                Par::Seq,
            )
            .unwrap()
            .output;
        for bi in 0..b {
            steps[(bi * s + i) * e..(bi * s + i + 1) * e].copy_from_slice(&out[bi * e..(bi + 1) * e]);
        }
    }
    // The attention kernels differ by path (decode against prefill), in f32 only.
    let error = scaled_error(&steps, &full);
    assert!(error < 1e-5, "{error:e}");
}

/// A bf16 module's cache holds bf16 bits, half the bytes of an f32 cache, and decoding over it
/// gives the bits of decoding over an f32 cache in the same module: keys and values are rounded
/// to bf16 when they are stored instead of when attention reads them, which is the same
/// rounding. Grouped heads, RoPE, averaged weights, a cross-attention memory and a beam's
/// reordering, at every step; the cache grows past its first capacity.
#[test]
fn bf16_cache_holds_bits_and_gives_the_f32_cache_bits() {
    let (b, e, steps, t_mem) = (3, 64, 13, 21);
    let mut cfg = config(e, 8);
    cfg.num_kv_heads = Some(2);
    let mut mha = MultiHeadAttention::with_seed(cfg.clone(), 5).unwrap();
    mha.set_precision(Precision::Bf16).unwrap();
    let mut cfg_rope = cfg;
    cfg_rope.rope = Some(Rope {
        style: RopeStyle::HalfRotation,
        base: 10_000.0,
    });
    let mut rope = MultiHeadAttention::with_seed(cfg_rope, 6).unwrap();
    rope.set_precision(Precision::Bf16).unwrap();
    let memory = random(b * t_mem * e, 7);
    let x = random(b * steps * e, 8);
    for module in [&mha, &rope] {
        let mut bits = module.new_cache(b, 4);
        let mut wide = KvCache::new(b, 2, e / 8, e / 8, 4);
        assert_eq!(bits.precision(), Precision::Bf16);
        assert_eq!(2 * bits.size_in_bytes(), wide.size_in_bytes());
        let (mut mem_bits, mut mem_wide) = (module.new_cache(b, t_mem), KvCache::new(b, 2, e / 8, e / 8, t_mem));
        for cache in [&mut mem_bits, &mut mem_wide] {
            let m = Sequence::batch_first(&memory, b, t_mem, e);
            module.append_to_cache(m, m, cache, Par::Rayon).unwrap();
        }
        let options = MhaOptions {
            need_weights: NeedWeights::Averaged,
            ..Default::default()
        };
        for i in 0..steps {
            let token: Vec<f32> = (0..b)
                .flat_map(|bi| x[(bi * steps + i) * e..(bi * steps + i + 1) * e].to_vec())
                .collect();
            let q = Sequence::batch_first(&token, b, 1, e);
            let got = module.forward_append(q, &mut bits, &options, Par::Rayon).unwrap();
            let want = module.forward_append(q, &mut wide, &options, Par::Rayon).unwrap();
            assert_eq!(got.output, want.output, "step {i}");
            assert_eq!(got.weights, want.weights, "weights at step {i}");
            let got = module.forward_over_cache(q, &mem_bits, &options, Par::Seq).unwrap();
            let want = module.forward_over_cache(q, &mem_wide, &options, Par::Seq).unwrap();
            assert_eq!(got.output, want.output, "memory at step {i}");
            if i == steps / 2 {
                bits.reorder(&[2, 0, 2]).unwrap();
                wide.reorder(&[2, 0, 2]).unwrap();
            }
        }
        assert!(bits.capacity() >= steps && bits.capacity() > 4, "grown");
        // What the cache holds: each stored value rounded to bf16, exactly.
        let (kb, kw) = (bits.keys(), wide.keys());
        assert!(matches!(kb, KvView::Bf16(_)) && matches!(kw, KvView::F32(_)));
        let (kb, kw) = (kb.to_f32(), kw.to_f32());
        assert!(kb.iter().zip(&kw).all(|(&x, &y)| x == round_to_bf16(y)));
        assert!(
            kb.iter().zip(&kw).any(|(x, y)| x != y),
            "the f32 cache holds unrounded values"
        );
    }
}

/// Measured at most 2.9e-3 over the outputs and gradients of `training_in_bf16_...` (the
/// weight gradients sum 18–26 token rows of rounded products); the bound is about 10×. A
/// gradient through the wrong packed weight is off by the whole scale.
const BF16_TRAIN_TOLERANCE: f64 = 3e-2;

/// The output, the query's gradient and every parameter gradient by name.
type Trained = (Vec<f32>, Vec<f32>, Vec<(String, Vec<f32>)>);

/// The module of the training tests: E = 32, 2 heads, seed 5, with key and value weights of
/// width 24 when `separate`.
fn training_module(separate: bool) -> MultiHeadAttention {
    let cfg = if separate {
        MhaConfig {
            kdim: Some(24),
            vdim: Some(24),
            ..config(32, 2)
        }
    } else {
        config(32, 2)
    };
    MultiHeadAttention::with_seed(cfg, 5).unwrap()
}

/// Mixed-precision training: one forward and backward of a module in bf16 (bf16 projections
/// forward and backward, f32 attention, f32 gradients), self-attention (fused weights) and
/// cross-attention: key and value rows of width `kv` (`None`: self-attention).
fn train_once(mha: &MultiHeadAttention, kv: Option<usize>, par: Par) -> Trained {
    let e = mha.dims()[0];
    let (b, s, t) = (2, 9, 13);
    let x = random(b * s * e, 4);
    let width = kv.unwrap_or(e);
    let memory = random(b * t * width, 5);
    let inputs = MhaInputs {
        query: Sequence::batch_first(&x, b, s, e),
        key_value: kv.map(|_| {
            (
                Sequence::batch_first(&memory, b, t, width),
                Sequence::batch_first(&memory, b, t, width),
            )
        }),
        options: MhaOptions::default(),
        packing: None,
    };
    let (out, tape) = mha.forward_train(&inputs, par).unwrap();
    let d_out = random(out.output.len(), 6);
    let mut grads = Grads::new();
    let d = mha
        .backward(&inputs, &tape, &d_out, &mut grads, &ParamPath::ROOT, par)
        .unwrap();
    let named = grads
        .iter()
        .map(|(name, g)| (name.to_string(), g.data().to_vec()))
        .collect();
    (out.output, d.query, named)
}

/// Training a module in bf16 stays within bf16's error of f32 in its output, its input
/// gradient and every parameter gradient, gives other bits than f32, and the same bits on any
/// thread count; handing the weights out mutably returns it to f32.
#[test]
fn training_in_bf16_stays_within_bf16_error_of_f32() {
    let mut worst = 0.0f64;
    // Self-attention (fused weights), cross-attention with separate key and value weights, and
    // cross-attention through fused weights (as a decoder's, whose memory has the model's width).
    for (separate, kv) in [(false, None), (true, Some(24)), (false, Some(32))] {
        let cross = kv.is_some();
        let mut mha = training_module(separate);
        let want = train_once(&mha, kv, Par::Seq);
        mha.set_precision(Precision::Bf16).unwrap();
        // The first backward packs `W` of each matrix it reads (self-attention: the fused
        // `[3E, E]`, not its three parts; cross-attention: the three parts, even of fused
        // weights), and the output's.
        let held = mha.bytes_held();
        let got = train_once(&mha, kv, Par::Seq);
        let packed = |rows: usize, cols: usize| {
            let w = vec![0.0f32; rows * cols];
            Bf16Panels::pack(View2::contiguous(&w, [rows, cols]).unwrap()).size_in_bytes()
        };
        let e = mha.dims()[0];
        let backward_packs = if separate {
            2 * packed(e, e) + 2 * packed(e, 24)
        } else if cross {
            // Three parts and the output for the backward, and the forward's three parts of
            // `Wᵀ` (packed at the first call that is not self-attention).
            4 * packed(e, e) + 3 * packed(e, e)
        } else {
            packed(3 * e, e) + packed(e, e)
        };
        assert_eq!(mha.bytes_held() - held, backward_packs, "kv {kv:?}");
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let threaded = pool.install(|| train_once(&mha, kv, Par::Rayon));
            assert_eq!(got, threaded, "{threads} threads change bf16 training");
        }
        for (what, g, w) in [("output", &got.0, &want.0), ("d_query", &got.1, &want.1)] {
            let error = scaled_error(g, w);
            worst = worst.max(error);
            assert!(error <= BF16_TRAIN_TOLERANCE && g != w, "{what} (kv {kv:?}): {error:e}");
        }
        assert_eq!(got.2.len(), want.2.len());
        for ((name, g), (_, w)) in got.2.iter().zip(&want.2) {
            let error = scaled_error(g, w);
            worst = worst.max(error);
            // `out_proj.bias` gets `Σ d_output`, the same in both; every other gradient went
            // through a bf16 product.
            let same_allowed = name == "out_proj.bias";
            assert!(
                error <= BF16_TRAIN_TOLERANCE && (same_allowed || g != w),
                "grad {name} (kv {kv:?}): {error:e}"
            );
        }
        mha.visit_params(&ParamPath::ROOT, &mut |_, _| {});
        assert_eq!(mha.precision(), Precision::F32);
        assert_eq!(train_once(&mha, kv, Par::Seq), want, "back to f32");
    }
    eprintln!("bf16 training against f32, worst scaled error: {worst:.2e}");
}

/// `Parameters::update_params` changes the weights in place and keeps the module's precision:
/// in bf16 it packs again every copy the module held (the forward's, the backward's made at
/// its first backward, a fused matrix's parts made at the first cross-attention call), with
/// the bits of `visit_params`, `set_precision` and the same calls after; in f32 it is
/// `visit_params`.
#[test]
fn an_update_in_place_packs_again_what_the_module_held() {
    let change = |_: &ParamPath<'_>, t: &mut attn_core::Tensor| {
        for (i, x) in t.data_mut().iter_mut().enumerate() {
            *x += 1e-2 * ((i % 7) as f32 - 3.0);
        }
    };
    for (separate, kv) in [(false, None), (true, Some(24)), (false, Some(32))] {
        let mut mha = training_module(separate);
        let f32_before = train_once(&mha, kv, Par::Seq);
        let (mut by_visit, mut in_place) = (mha.clone(), mha.clone());
        by_visit.visit_params(&ParamPath::ROOT, &mut |p, t| change(p, t));
        in_place
            .update_params(&ParamPath::ROOT, &mut |p, t| change(p, t))
            .unwrap();
        assert_eq!(in_place.precision(), Precision::F32);
        let f32_after = train_once(&by_visit, kv, Par::Seq);
        assert_eq!(train_once(&in_place, kv, Par::Seq), f32_after, "f32, kv {kv:?}");
        assert_ne!(f32_after, f32_before);

        mha.set_precision(Precision::Bf16).unwrap();
        let before = train_once(&mha, kv, Par::Seq);
        let held = mha.bytes_held();
        let (mut by_visit, mut in_place) = (mha.clone(), mha.clone());
        by_visit.visit_params(&ParamPath::ROOT, &mut |p, t| change(p, t));
        by_visit.set_precision(Precision::Bf16).unwrap();
        in_place
            .update_params(&ParamPath::ROOT, &mut |p, t| change(p, t))
            .unwrap();
        assert_eq!(in_place.precision(), Precision::Bf16);
        // Everything packed again at once, where `set_precision` packs the forward's copies.
        assert_eq!(in_place.bytes_held(), held, "kv {kv:?}");
        assert!(by_visit.bytes_held() < held, "kv {kv:?}");
        let want = train_once(&by_visit, kv, Par::Seq);
        assert_eq!(by_visit.bytes_held(), held);
        assert_eq!(train_once(&in_place, kv, Par::Seq), want, "bf16, kv {kv:?}");
        assert_eq!(in_place.bytes_held(), held);
        assert_ne!(want, before);
    }
}

/// With identity projections and zero biases, a bf16 module's self-attention is the bf16
/// attention of the inputs rounded to bf16, rounded again by the output projection: the same
/// bits as `sdpa` in bf16 on those inputs, and not those of f32 attention on them (so attention
/// itself runs in the module's precision, not only its projections), batched and packed.
#[test]
fn attention_runs_in_the_module_precision() {
    let (b, s, e, h) = (2, 40, 32, 4);
    let d = e / h;
    let mut mha = MultiHeadAttention::with_seed(config(e, h), 3).unwrap();
    for (name, tensor) in mha.params_mut("") {
        let cols = tensor.shape().last().copied().unwrap_or(1);
        for (i, x) in tensor.data_mut().iter_mut().enumerate() {
            let identity = name.ends_with("weight") && i % cols == (i / cols) % e;
            *x = if identity { 1.0 } else { 0.0 };
        }
    }
    mha.set_precision(Precision::Bf16).unwrap();
    let x = random(b * s * e, 9);
    let got = mha
        .forward_self(Sequence::batch_first(&x, b, s, e), &MhaOptions::default(), Par::Rayon)
        .unwrap()
        .output;
    // The heads of round(x) as [B, H, S, D], attention in each precision, back to [B, S, E].
    let rounded: Vec<f32> = x.iter().map(|&v| round_to_bf16(v)).collect();
    let heads = View4::new(&rounded, [b, h, s, d], [s * e, d, e, 1]).unwrap();
    let attend = |precision| {
        let options = SdpaOptions::default().precision(precision);
        let out = sdpa(heads, heads, heads, &options, Par::Rayon).unwrap().output;
        let mut rows = vec![0.0f32; b * s * e];
        for (i, &v) in out.iter().enumerate() {
            let (bi, hi, si, di) = (i / (h * s * d), i / (s * d) % h, i / d % s, i % d);
            rows[(bi * s + si) * e + hi * d + di] = round_to_bf16(v);
        }
        rows
    };
    // The packed path (sequences back to back, as BERT's embedder runs them) too.
    let packed = mha.forward_self_packed(&x, &[0, s, 2 * s], false, Par::Rayon).unwrap();
    for (path, got) in [("batched", &got), ("packed", &packed)] {
        let differing = |want: Vec<f32>| {
            got.iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count()
        };
        assert_eq!(
            differing(attend(Precision::Bf16)),
            0,
            "{path}: elements off the module's bf16 attention"
        );
        assert!(
            differing(attend(Precision::F32)) > 0,
            "{path}: f32 attention inside a bf16 module"
        );
    }
}

/// `sdpa` in bf16 stays within bf16's error of f32 and gives other bits; its backward, which
/// computes in f32, refuses it.
#[test]
fn sdpa_in_bf16_is_forward_only() {
    let (b, h, s, d) = (1, 2, 50, 16);
    let q = random(b * h * s * d, 5);
    let view = View4::contiguous(&q, [b, h, s, d]).unwrap();
    let bf16 = SdpaOptions::default().precision(Precision::Bf16);
    let f32 = sdpa(view, view, view, &SdpaOptions::default(), Par::Seq).unwrap();
    let got = sdpa(view, view, view, &bf16, Par::Seq).unwrap();
    let error = scaled_error(&got.output, &f32.output);
    assert!(error <= BF16_TRAIN_TOLERANCE && got.output != f32.output, "{error:e}");
    let refused = sdpa_backward(view, view, view, &got, view, &bf16, Par::Seq).unwrap_err();
    assert!(refused.to_string().contains("precision is bf16"), "{refused}");
}
