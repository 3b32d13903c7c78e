//! Properties of multi-head attention that must hold for every shape: it is the composition of
//! single-head attentions, cached decoding equals one causal pass, layouts and thread counts do
//! not change the numbers.

use attn_core::kernels::testing::max_error;
use attn_core::kernels::Par;
use attn_core::{
    Attention, AttentionConfig, BoolMeaning, KeyPadding, Layout, MhaConfig, MhaOptions, MultiHeadAttention,
    NeedWeights, Precision, Rope, RopeStyle, ScoreMask, Sequence, StateDict, Tensor,
};
use proptest::prelude::*;

use attn_core::kernels::testing::random_vec as random;

#[track_caller]
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol + tol * w.abs(), "{what}: [{i}] {g} vs {w}");
    }
}

fn rows(t: &Tensor, range: std::ops::Range<usize>) -> Vec<f32> {
    let width = t.shape()[1];
    t.data()[range.start * width..range.end * width].to_vec()
}

/// A single head of width `d` over inputs of width `e`, with biases.
fn head_config(e: usize, d: usize) -> AttentionConfig {
    AttentionConfig {
        embed_dim: e,
        kdim: e,
        vdim: e,
        head_dim: d,
        v_head_dim: d,
        bias: true,
    }
}

/// MHA output, rebuilt from `H` single-head `Attention`s sharing its weights plus its output
/// projection.
fn composed(mha: &MultiHeadAttention, q: &Sequence<'_>, kv: &Sequence<'_>, options: &MhaOptions<'_>) -> Vec<f32> {
    let [e, h, g, d] = mha.dims();
    let state = mha.state_dict();
    let w = &state["in_proj_weight"];
    let bias = &state["in_proj_bias"];
    let rep = h / g;
    let (b, s) = (q.batch, q.len);
    let mut concat = vec![0.0f32; b * s * e];
    for head in 0..h {
        let group = head / rep;
        let (q_rows, k_rows, v_rows) = (
            head * d..(head + 1) * d,
            e + group * d..e + (group + 1) * d,
            e + g * d + group * d..e + g * d + (group + 1) * d,
        );
        let mut dict = StateDict::new();
        dict.insert(
            "q_proj_weight".into(),
            Tensor::new("q", vec![d, e], rows(w, q_rows.clone())).unwrap(),
        );
        dict.insert(
            "k_proj_weight".into(),
            Tensor::new("k", vec![d, e], rows(w, k_rows.clone())).unwrap(),
        );
        dict.insert(
            "v_proj_weight".into(),
            Tensor::new("v", vec![d, e], rows(w, v_rows.clone())).unwrap(),
        );
        let mut b_all = bias.data()[q_rows].to_vec();
        b_all.extend_from_slice(&bias.data()[k_rows]);
        b_all.extend_from_slice(&bias.data()[v_rows]);
        dict.insert("in_proj_bias".into(), Tensor::new("b", vec![3 * d], b_all).unwrap());
        let config = head_config(e, d);
        let single = Attention::from_state_dict(config, dict).unwrap();
        let mut head_options = *options;
        head_options.need_weights = NeedWeights::No;
        // A per-head slice of a [B·H, S, T] mask.
        let out = single.forward(*q, *kv, *kv, &head_options, Par::Seq).unwrap().output;
        for token in 0..b * s {
            concat[token * e + head * d..token * e + (head + 1) * d].copy_from_slice(&out[token * d..(token + 1) * d]);
        }
    }
    let w_out = &state["out_proj.weight"];
    let b_out = &state["out_proj.bias"];
    let mut result = vec![0.0f32; b * s * e];
    for token in 0..b * s {
        for o in 0..e {
            let mut acc = b_out.data()[o] as f64;
            for i in 0..e {
                acc += concat[token * e + i] as f64 * w_out.data()[o * e + i] as f64;
            }
            result[token * e + o] = acc as f32;
        }
    }
    result
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn mha_is_the_composition_of_single_heads(
        (h, g) in prop::sample::select(vec![(1usize, 1usize), (2, 2), (4, 4), (4, 2), (4, 1)]),
        d in prop::sample::select(vec![2usize, 4, 8]),
        b in 1usize..3,
        s in 1usize..20,
        t in 1usize..40,
        causal in any::<bool>(),
        padding in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let e = h * d;
        let mut config = MhaConfig::new(e, h);
        config.num_kv_heads = Some(g);
        config.batch_first = true;
        let mha = MultiHeadAttention::with_seed(config, seed).unwrap();
        let t = if causal { s } else { t };
        let q = random(b * s * e, seed + 1);
        let kv = random(b * t * e, seed + 2);
        let lengths: Vec<usize> = (0..b).map(|i| t - i.min(t - 1)).collect();
        let options = MhaOptions {
            is_causal: causal,
            key_padding: if padding { KeyPadding::Lengths(&lengths) } else { KeyPadding::None },
            ..Default::default()
        };
        let qs = Sequence::batch_first(&q, b, s, e);
        let kvs = Sequence::batch_first(&kv, b, t, e);
        let got = mha.forward(qs, kvs, kvs, &options, Par::Seq).unwrap().output;
        let want = composed(&mha, &qs, &kvs, &options);
        // Measured 1.1e-7 (relative to 1 + |want|) at both SIMD levels; the bound is about 10x.
        assert_close(&got, &want, 1e-6, "mha vs composed heads");
    }

    #[test]
    fn cached_decoding_equals_one_causal_pass(
        (h, g) in prop::sample::select(vec![(1usize, 1usize), (4, 2), (4, 1)]),
        n in 1usize..24,
        b in 1usize..3,
        rope in 0usize..3,
        alibi in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let d = 8;
        let e = h * d;
        let mut config = MhaConfig::new(e, h);
        config.num_kv_heads = Some(g);
        config.batch_first = true;
        config.rope = [None, Some(Rope { style: RopeStyle::HalfRotation, base: 10_000.0 }), Some(Rope { style: RopeStyle::Interleaved, base: 500.0 })][rope];
        config.alibi = alibi;
        let mha = MultiHeadAttention::with_seed(config, seed).unwrap();
        let x = random(b * n * e, seed + 3);
        let options = MhaOptions { is_causal: true, ..Default::default() };
        let full = mha.forward_self(Sequence::batch_first(&x, b, n, e), &options, Par::Seq).unwrap().output;
        // Start small so the cache must grow on the way.
        let mut cache = mha.new_cache(b, 2);
        for step in 0..n {
            let token: Vec<f32> = (0..b).flat_map(|bi| x[(bi * n + step) * e..(bi * n + step + 1) * e].to_vec()).collect();
            let out = mha.forward_append(Sequence::batch_first(&token, b, 1, e), &mut cache, &MhaOptions::default(), Par::Seq).unwrap().output;
            for bi in 0..b {
                let want = &full[(bi * n + step) * e..(bi * n + step + 1) * e];
                // Measured 1.3e-7 at both SIMD levels; the bound is about 10x.
                assert_close(&out[bi * e..(bi + 1) * e], want, 1.5e-6, &format!("step {step} batch {bi}"));
            }
        }
        prop_assert_eq!(cache.len(), n);
    }
}

#[test]
fn chunked_prefill_then_decoding_equals_one_causal_pass() {
    let (b, n, e, h) = (2, 37, 32, 4);
    let mut config = MhaConfig::new(e, h);
    config.batch_first = true;
    config.rope = Some(Rope {
        style: RopeStyle::HalfRotation,
        base: 10_000.0,
    });
    let mha = MultiHeadAttention::with_seed(config, 5).unwrap();
    let x = random(b * n * e, 9);
    let options = MhaOptions {
        is_causal: true,
        ..Default::default()
    };
    let full = mha
        .forward_self(Sequence::batch_first(&x, b, n, e), &options, Par::Seq)
        .unwrap()
        .output;
    let mut cache = mha.new_cache(b, 64);
    let mut start = 0;
    for chunk in [20, 1, 1, 15] {
        let part: Vec<f32> = (0..b)
            .flat_map(|bi| x[(bi * n + start) * e..(bi * n + start + chunk) * e].to_vec())
            .collect();
        let out = mha
            .forward_append(
                Sequence::batch_first(&part, b, chunk, e),
                &mut cache,
                &MhaOptions::default(),
                Par::Rayon,
            )
            .unwrap()
            .output;
        for bi in 0..b {
            assert_close(
                &out[bi * chunk * e..(bi + 1) * chunk * e],
                &full[(bi * n + start) * e..(bi * n + start + chunk) * e],
                // Measured 2.5e-8 at both SIMD levels; the bound is about 10x.
                3e-7,
                &format!("chunk at {start}"),
            );
        }
        start += chunk;
    }
}

#[test]
fn thread_count_and_layout_do_not_change_results() {
    let (b, s, t, e, h) = (3, 70, 130, 64, 8);
    let mut config = MhaConfig::new(e, h);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config.clone(), 11).unwrap();
    // The same weights for sequence-first inputs.
    config.batch_first = false;
    let mha_seq_first = MultiHeadAttention::from_state_dict(config, mha.state_dict()).unwrap();
    let q_bf = random(b * s * e, 1);
    let kv_bf = random(b * t * e, 2);
    let padding: Vec<bool> = random(b * t, 3).iter().map(|&x| x > 0.5).collect();
    let options = MhaOptions {
        key_padding: KeyPadding::Bool {
            data: &padding,
            meaning: BoolMeaning::MaskedOut,
        },
        need_weights: NeedWeights::Averaged,
        ..Default::default()
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            mha.forward(
                Sequence::batch_first(&q_bf, b, s, e),
                Sequence::batch_first(&kv_bf, b, t, e),
                Sequence::batch_first(&kv_bf, b, t, e),
                &options,
                Par::Rayon,
            )
            .unwrap()
        })
    };
    let one = run(1);
    // 2 threads, more than this machine's cores, and the machine's own count.
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [2, 3, 8, machine] {
        let many = run(threads);
        assert_eq!(
            one.output, many.output,
            "output differs between 1 and {threads} threads"
        );
        assert_eq!(
            one.weights, many.weights,
            "weights differ between 1 and {threads} threads"
        );
    }
    let seq = mha
        .forward(
            Sequence::batch_first(&q_bf, b, s, e),
            Sequence::batch_first(&kv_bf, b, t, e),
            Sequence::batch_first(&kv_bf, b, t, e),
            &options,
            Par::Seq,
        )
        .unwrap();
    assert_eq!(one.output, seq.output, "Par::Seq differs");

    // The same data stored sequence-first gives the same numbers, transposed.
    let transpose = |x: &[f32], l: usize| -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        for bi in 0..b {
            for li in 0..l {
                out[(li * b + bi) * e..(li * b + bi + 1) * e]
                    .copy_from_slice(&x[(bi * l + li) * e..(bi * l + li + 1) * e]);
            }
        }
        out
    };
    let (q_sf, kv_sf) = (transpose(&q_bf, s), transpose(&kv_bf, t));
    let q_seq = Sequence {
        data: &q_sf,
        batch: b,
        len: s,
        dim: e,
        layout: Layout::SeqFirst,
    };
    let kv_seq = Sequence {
        data: &kv_sf,
        batch: b,
        len: t,
        dim: e,
        layout: Layout::SeqFirst,
    };
    let seq_first = mha_seq_first
        .forward(q_seq, kv_seq, kv_seq, &options, Par::Rayon)
        .unwrap();
    // Measured bit-identical at both SIMD levels (the same arithmetic through other strides);
    // the bound leaves room for a GEMM that blocks strided inputs differently.
    assert_close(
        &transpose_back(&seq_first.output, b, s, e),
        &one.output,
        1e-7,
        "seq-first layout",
    );
    assert_close(
        seq_first.weights.as_ref().unwrap(),
        one.weights.as_ref().unwrap(),
        1e-7,
        "seq-first weights",
    );
}

fn transpose_back(x: &[f32], b: usize, l: usize, e: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for li in 0..l {
            out[(bi * l + li) * e..(bi * l + li + 1) * e].copy_from_slice(&x[(li * b + bi) * e..(li * b + bi + 1) * e]);
        }
    }
    out
}

#[test]
fn bad_inputs_are_typed_errors_naming_the_tensor() {
    let mut config = MhaConfig::new(16, 4);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config, 1).unwrap();
    let x = random(2 * 3 * 16, 1);
    let short = &x[..2 * 3 * 8];
    let err = mha
        .forward_self(Sequence::batch_first(short, 2, 3, 8), &MhaOptions::default(), Par::Seq)
        .unwrap_err();
    assert!(
        err.to_string().contains("`query`") && err.to_string().contains("E = 16"),
        "{err}"
    );
    let mask = vec![true; 5];
    let options = MhaOptions {
        attn_mask: ScoreMask::Bool {
            data: &mask,
            shape: &[5],
            meaning: BoolMeaning::MaskedOut,
        },
        ..Default::default()
    };
    let err = mha
        .forward_self(Sequence::batch_first(&x, 2, 3, 16), &options, Par::Seq)
        .unwrap_err();
    assert!(
        err.to_string().contains("`attn_mask`") && err.to_string().contains("[S, T] = [3, 3]"),
        "{err}"
    );
    // A mask of the right shape and too few elements (bool and additive): the tensor named,
    // with its shape, the count it needs and the count it has.
    let few = vec![false; 8];
    let few_additive = vec![0.0f32; 8];
    for attn_mask in [
        ScoreMask::Bool {
            data: &few,
            shape: &[3, 3],
            meaning: BoolMeaning::MaskedOut,
        },
        ScoreMask::Additive {
            data: &few_additive,
            shape: &[3, 3],
        },
    ] {
        let options = MhaOptions {
            attn_mask,
            ..Default::default()
        };
        let err = mha
            .forward_self(Sequence::batch_first(&x, 2, 3, 16), &options, Par::Seq)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attn_mask") && err.contains("[3, 3]") && err.contains('9') && err.contains('8'),
            "{err}"
        );
    }
    let lengths = [4usize, 1];
    let options = MhaOptions {
        key_padding: KeyPadding::Lengths(&lengths),
        ..Default::default()
    };
    let err = mha
        .forward_self(Sequence::batch_first(&x, 2, 3, 16), &options, Par::Seq)
        .unwrap_err();
    assert!(err.to_string().contains("key_lengths"), "{err}");
    let mut dict = mha.state_dict();
    dict.remove("out_proj.bias");
    let err = MultiHeadAttention::from_state_dict(MhaConfig::new(16, 4), dict).unwrap_err();
    assert_eq!(err.to_string(), "missing tensor `out_proj.bias`, expected shape [16]");
    let mut dict = mha.state_dict();
    dict.insert("extra".into(), Tensor::zeros(vec![1]));
    let err = MultiHeadAttention::from_state_dict(MhaConfig::new(16, 4), dict).unwrap_err();
    assert!(err.to_string().contains("unexpected tensor `extra`"), "{err}");
    let mut config = MhaConfig::new(16, 4);
    config.num_kv_heads = Some(3);
    let err = MultiHeadAttention::with_seed(config, 1).unwrap_err();
    assert!(err.to_string().contains("num_kv_heads"), "{err}");
}

#[test]
fn state_dict_round_trips() {
    let mut config = MhaConfig::new(12, 3);
    config.kdim = Some(5);
    config.vdim = Some(7);
    config.add_bias_kv = true;
    let mha = MultiHeadAttention::with_seed(config.clone(), 3).unwrap();
    let names: Vec<String> = mha.state_dict().keys().cloned().collect();
    assert_eq!(
        names,
        [
            "bias_k",
            "bias_v",
            "in_proj_bias",
            "k_proj_weight",
            "out_proj.bias",
            "out_proj.weight",
            "q_proj_weight",
            "v_proj_weight"
        ]
    );
    let again = MultiHeadAttention::from_state_dict(config, mha.state_dict()).unwrap();
    assert_eq!(again.state_dict(), mha.state_dict());
}

/// Multi-head attention in f64, from its definition: `x: [B, S, E]` batch-first, self-attention
/// with the fused `in_proj_weight: [E + 2·G·D, E]` (query heads, then key heads, then value
/// heads), `out_proj`, top-left causal masking and key lengths. Returns the output `[B, S, E]`
/// and the per-head weights `[B, H, S, S]`.
fn reference_self_attention(
    mha: &MultiHeadAttention,
    x: &[f32],
    b: usize,
    s: usize,
    causal: bool,
    lengths: Option<&[usize]>,
) -> (Vec<f64>, Vec<f64>) {
    let [e, h, g, d] = mha.dims();
    let state = mha.state_dict();
    let (w_in, b_in) = (state["in_proj_weight"].data(), state["in_proj_bias"].data());
    let (w_out, b_out) = (state["out_proj.weight"].data(), state["out_proj.bias"].data());
    let rows = e + 2 * g * d;
    // Projections: proj[token][r] = b_in[r] + Σ_i x[token][i]·w_in[r][i].
    let proj: Vec<f64> = (0..b * s)
        .flat_map(|token| {
            (0..rows).map(move |r| {
                b_in[r] as f64
                    + (0..e)
                        .map(|i| x[token * e + i] as f64 * w_in[r * e + i] as f64)
                        .sum::<f64>()
            })
        })
        .collect();
    let at = |bi: usize, pos: usize, row: usize| proj[(bi * s + pos) * rows + row];
    let scale = 1.0 / (d as f64).sqrt();
    let mut heads = vec![0.0f64; b * s * e];
    let mut weights = vec![0.0f64; b * h * s * s];
    for bi in 0..b {
        for head in 0..h {
            let group = head / (h / g);
            let (q0, k0, v0) = (head * d, e + group * d, e + g * d + group * d);
            for i in 0..s {
                let visible = |j: usize| (!causal || j <= i) && lengths.is_none_or(|l| j < l[bi]);
                let scores: Vec<f64> = (0..s)
                    .map(|j| {
                        if visible(j) {
                            scale * (0..d).map(|c| at(bi, i, q0 + c) * at(bi, j, k0 + c)).sum::<f64>()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue; // nothing to attend to: zeros
                }
                let sum: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
                for j in 0..s {
                    let p = (scores[j] - max).exp() / sum;
                    weights[((bi * h + head) * s + i) * s + j] = p;
                    for c in 0..d {
                        heads[(bi * s + i) * e + head * d + c] += p * at(bi, j, v0 + c);
                    }
                }
            }
        }
    }
    let out = (0..b * s)
        .flat_map(|token| {
            let heads = &heads;
            (0..e).map(move |o| {
                b_out[o] as f64
                    + (0..e)
                        .map(|i| heads[token * e + i] * w_out[o * e + i] as f64)
                        .sum::<f64>()
            })
        })
        .collect();
    (out, weights)
}

/// Largest error measured against the f64 reference over five runs of the proptest below
/// (240 cases): outputs 2.2e-7, weights 7.1e-8, on AVX2+FMA and the scalar path. The bound is
/// about 10× the output error; a swapped or misplaced head is off by 1e-1.
const REFERENCE_TOLERANCE: f64 = 2e-6;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The fused self-attention path (`forward_self`: one `[E + 2·G·D, E]` projection, heads as
    /// strided views) and the general path on `(x, x, x)` both equal the f64 definition, in
    /// either layout, with averaged and per-head weights.
    #[test]
    fn self_attention_equals_the_f64_definition(
        (h, g) in prop::sample::select(vec![(1usize, 1usize), (2, 2), (3, 3), (4, 2), (4, 1), (6, 3)]),
        d in prop::sample::select(vec![1usize, 2, 5, 8, 16]),
        b in 1usize..3,
        s in prop::sample::select(vec![1usize, 2, 7, 16, 17, 63, 65]),
        causal in any::<bool>(),
        padding in any::<bool>(),
        per_head in any::<bool>(),
        seq_first in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let e = h * d;
        let mut config = MhaConfig::new(e, h);
        config.num_kv_heads = Some(g);
        config.batch_first = !seq_first;
        let mha = MultiHeadAttention::with_seed(config, seed).unwrap();
        let x = random(b * s * e, seed + 7);
        let lengths: Vec<usize> = (0..b).map(|i| s - i.min(s - 1)).collect();
        let (want_out, want_weights) =
            reference_self_attention(&mha, &x, b, s, causal, padding.then_some(&lengths[..]));
        let options = MhaOptions {
            is_causal: causal,
            key_padding: if padding { KeyPadding::Lengths(&lengths) } else { KeyPadding::None },
            need_weights: if per_head { NeedWeights::PerHead } else { NeedWeights::Averaged },
            ..Default::default()
        };
        let want_weights: Vec<f64> = if per_head {
            want_weights
        } else {
            (0..b * s * s)
                .map(|i| {
                    let (bi, rest) = (i / (s * s), i % (s * s));
                    (0..h).map(|head| want_weights[(bi * h + head) * s * s + rest]).sum::<f64>() / h as f64
                })
                .collect()
        };
        let stored = if seq_first { transpose_back(&x, s, b, e) } else { x.clone() };
        let seq = Sequence {
            data: &stored,
            batch: b,
            len: s,
            dim: e,
            layout: if seq_first { Layout::SeqFirst } else { Layout::BatchFirst },
        };
        for (path, result) in [
            ("forward_self", mha.forward_self(seq, &options, Par::Rayon).unwrap()),
            ("forward", mha.forward(seq, seq, seq, &options, Par::Seq).unwrap()),
        ] {
            let out = if seq_first { transpose_back(&result.output, b, s, e) } else { result.output };
            let error = max_error(&out, &want_out);
            prop_assert!(error <= REFERENCE_TOLERANCE, "{path} output error {error:e}");
            let error = max_error(result.weights.as_ref().unwrap(), &want_weights);
            prop_assert!(error <= REFERENCE_TOLERANCE, "{path} weights error {error:e}");
        }
    }
}

/// Packed sequences (no padding) give each sequence's own self-attention: causal or not, with
/// ALiBi and RoPE, which the packed path must apply per sequence.
#[test]
fn packed_self_attention_equals_each_sequence_alone() {
    let (e, h) = (24, 4);
    let mut config = MhaConfig::new(e, h);
    config.num_kv_heads = Some(2);
    config.alibi = true;
    config.rope = Some(Rope {
        style: RopeStyle::HalfRotation,
        base: 10_000.0,
    });
    let mha = MultiHeadAttention::with_seed(config, 21).unwrap();
    let lengths = [5usize, 1, 9, 3];
    let starts: Vec<usize> = std::iter::once(0)
        .chain(lengths.iter().scan(0, |end, &l| {
            *end += l;
            Some(*end)
        }))
        .collect();
    let n = starts[lengths.len()];
    let x = random(n * e, 22);
    for causal in [false, true] {
        let packed = mha.forward_self_packed(&x, &starts, causal, Par::Rayon).unwrap();
        for (i, &len) in lengths.iter().enumerate() {
            let rows = starts[i] * e..starts[i + 1] * e;
            let options = MhaOptions {
                is_causal: causal,
                ..Default::default()
            };
            let alone = mha
                .forward_self(Sequence::batch_first(&x[rows.clone()], 1, len, e), &options, Par::Seq)
                .unwrap()
                .output;
            // The same arithmetic on the same rows, blocked differently by the GEMM: measured
            // 6e-8 apart; the bound is about 10x.
            assert_close(&packed[rows], &alone, 6e-7, &format!("sequence {i}, causal {causal}"));
        }
    }
}

/// Empty batches and empty sequences are valid inputs with empty outputs, on every path.
#[test]
fn empty_inputs_give_empty_outputs() {
    let (e, h) = (16, 4);
    let mut config = MhaConfig::new(e, h);
    config.batch_first = true;
    let mha = MultiHeadAttention::with_seed(config, 3).unwrap();
    let x = random(2 * 3 * e, 4);
    let options = MhaOptions {
        need_weights: NeedWeights::Averaged,
        ..Default::default()
    };
    for (b, s, t) in [(0, 3, 3), (2, 0, 3), (2, 3, 0), (2, 0, 0)] {
        let q = Sequence::batch_first(&x[..b * s * e], b, s, e);
        let kv = Sequence::batch_first(&x[..b * t * e], b, t, e);
        let out = mha.forward(q, kv, kv, &options, Par::Seq).unwrap();
        assert_eq!(out.output.len(), b * s * e, "{:?}", (b, s, t));
        assert_eq!(out.weights.map(|w| w.len()), Some(b * s * t), "{:?}", (b, s, t));
        if t == 0 {
            // Nothing to attend to: zeros through the output projection, its bias.
            let bias = mha.state_dict()["out_proj.bias"].data().to_vec();
            assert!(out.output.chunks(e).all(|row| row == bias), "{:?}", (b, s, t));
        }
        if s == t {
            let out = mha.forward_self(q, &options, Par::Rayon).unwrap();
            assert_eq!(out.output.len(), b * s * e, "{:?}", (b, s, t));
        }
    }
}

/// `batch_first` in the config and the layout of the input must agree: a `[L, B, E]` input to
/// a `batch_first = true` module (or the reverse) is refused, naming the field, not silently
/// read in the input's layout. `B = 1` and `L = 1` have one memory layout and pass either way.
#[test]
fn a_layout_that_disagrees_with_batch_first_is_refused() {
    let x = [0.25f32; 2 * 3 * 8];
    for batch_first in [true, false] {
        let mut config = MhaConfig::new(8, 2);
        config.batch_first = batch_first;
        let mha = MultiHeadAttention::with_seed(config, 3).unwrap();
        let wrong = if batch_first {
            Layout::SeqFirst
        } else {
            Layout::BatchFirst
        };
        let seq = |layout, batch, len| Sequence {
            data: &x[..batch * len * 8],
            batch,
            len,
            dim: 8,
            layout,
        };
        let options = MhaOptions::default();
        let err = mha.forward_self(seq(wrong, 2, 3), &options, Par::Seq).unwrap_err();
        assert!(err.to_string().contains("batch_first"), "{err}");
        let err = mha
            .forward(seq(wrong, 2, 3), seq(wrong, 2, 3), seq(wrong, 2, 3), &options, Par::Seq)
            .unwrap_err();
        assert!(err.to_string().contains("batch_first"), "{err}");
        let mut cache = mha.new_cache(2, 4);
        assert!(mha
            .forward_append(seq(wrong, 2, 3), &mut cache, &options, Par::Seq)
            .is_err());
        assert!(mha
            .append_to_cache(seq(wrong, 2, 3), seq(wrong, 2, 3), &mut cache, Par::Seq)
            .is_err());
        let right = Layout::from_batch_first(batch_first);
        mha.forward_self(seq(right, 2, 3), &options, Par::Seq).unwrap();
        mha.forward_self(seq(wrong, 1, 3), &options, Par::Seq).unwrap();
        mha.forward_self(seq(wrong, 2, 1), &options, Par::Seq).unwrap();
    }
}

/// Cross-attention over a memory appended to a cache (in two parts, with GQA, two sequences,
/// keys and values of their own, with and without RoPE) equals `forward` over the memory, and
/// the bytes and sizes the module reports are those of its weights and buffers.
#[test]
fn cross_attention_over_an_appended_memory_equals_forward() {
    let (b, s, t, e, h, g) = (2, 3, 5, 16, 4, 2);
    for rope in [
        None,
        Some(Rope {
            style: RopeStyle::Interleaved,
            base: 100.0,
        }),
    ] {
        let mut config = MhaConfig::new(e, h);
        config.num_kv_heads = Some(g);
        config.batch_first = true;
        config.rope = rope;
        let mha = MultiHeadAttention::with_seed(config, 11).unwrap();
        let (query, key, value) = (random(b * s * e, 1), random(b * t * e, 2), random(b * t * e, 3));
        fn seq(x: &[f32], n: usize) -> Sequence<'_> {
            Sequence::batch_first(x, 2, n, 16)
        }
        let want = mha
            .forward(
                seq(&query, s),
                seq(&key, t),
                seq(&value, t),
                &MhaOptions::default(),
                Par::Seq,
            )
            .unwrap()
            .output;
        let mut cache = mha.new_cache(b, 1);
        let mut start = 0;
        for part in [2, 3] {
            let rows = |x: &[f32]| -> Vec<f32> {
                (0..b)
                    .flat_map(|bi| x[(bi * t + start) * e..(bi * t + start + part) * e].to_vec())
                    .collect()
            };
            let (k, v) = (rows(&key), rows(&value));
            mha.append_to_cache(seq(&k, part), seq(&v, part), &mut cache, Par::Seq)
                .unwrap();
            start += part;
        }
        assert_eq!(cache.len(), t);
        // Keys and values of other lengths (or batch sizes) are refused, naming `value`.
        for (vb, vt) in [(b, 2), (1, 3)] {
            let err = mha
                .append_to_cache(
                    seq(&key[..b * 3 * e], 3),
                    Sequence::batch_first(&value[..vb * vt * e], vb, vt, e),
                    &mut cache,
                    Par::Seq,
                )
                .unwrap_err()
                .to_string();
            assert!(err.contains("`value`") && err.contains("[B, T] = [2, 3]"), "{err}");
        }
        assert_eq!(cache.len(), t);
        let got = mha
            .forward_over_cache(seq(&query, s), &cache, &MhaOptions::default(), Par::Seq)
            .unwrap()
            .output;
        // Measured 0 (the same bits) at the avx512, avx2 and scalar levels; the bound allows
        // another GEMM route for two rows than for five.
        assert_close(&got, &want, 1e-6, &format!("rope {rope:?}"));
    }
}

/// What a module says it will allocate, per part: queries `[B, S, H, D]`, keys and values
/// `[B, T, G, D + Dv]`, the attention output `[B, S, H, Dv]`, the output `[B, S, E]` and the
/// flash kernel's packed keys and values (`[B, G]` blocks of 512 keys, `D` plus `Dv` rounded up
/// to 16 wide), plus the weights asked for and their `[B, H, S]` row sums, 4 bytes a float.
#[test]
fn forward_bytes_count_every_buffer() {
    let mut config = MhaConfig::new(16, 4);
    config.num_kv_heads = Some(2);
    let mha = MultiHeadAttention::with_seed(config, 1).unwrap();
    let (b, s, t) = (2, 3, 5);
    let packed = b * 2 * 512 * (4 + 16);
    let base = 4 * (b * s * 4 * 4 + b * t * 2 * 8 + b * s * 4 * 4 + b * s * 16 + packed) as u128;
    assert_eq!(mha.forward_bytes(b, s, t, NeedWeights::No), base);
    let sums = 4 * (b * 4 * s) as u128;
    assert_eq!(
        mha.forward_bytes(b, s, t, NeedWeights::Averaged),
        base + 4 * (b * s * t) as u128 + sums
    );
    assert_eq!(
        mha.forward_bytes(b, s, t, NeedWeights::PerHead),
        base + 4 * (b * 4 * s * t) as u128 + sums
    );
}

/// A single head's precision: bf16 packs copies of its weights (more bytes held) and changes
/// its numbers by bf16's rounding; back in f32 the copies are dropped and the bits are f32's.
#[test]
fn a_single_heads_precision_is_set_and_reported() {
    let (e, d) = (8, 4);
    let mut dict = StateDict::new();
    for (i, name) in ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        .into_iter()
        .enumerate()
    {
        dict.insert(
            name.into(),
            Tensor::new(name, vec![d, e], random(d * e, i as u64)).unwrap(),
        );
    }
    dict.insert(
        "in_proj_bias".into(),
        Tensor::new("b", vec![3 * d], random(3 * d, 7)).unwrap(),
    );
    let config = head_config(e, d);
    let mut head = Attention::from_state_dict(config, dict).unwrap();
    let x = random(2 * 3 * e, 9);
    let seq = Sequence::batch_first(&x, 2, 3, e);
    let run = |head: &Attention| {
        head.forward(seq, seq, seq, &MhaOptions::default(), Par::Seq)
            .unwrap()
            .output
    };
    let f32_out = run(&head);
    assert_eq!(head.precision(), Precision::F32);
    assert_eq!(head.bytes_held(), 4 * (3 * d * e + 3 * d));
    head.set_precision(Precision::Bf16).unwrap();
    assert_eq!(head.precision(), Precision::Bf16);
    assert!(head.bytes_held() > 4 * (3 * d * e + 3 * d), "{}", head.bytes_held());
    let bf16_out = run(&head);
    assert_ne!(bf16_out, f32_out);
    // bf16 rounding of the inputs: measured 3.3e-3 (relative to 1 + |f32|) at the amx level;
    // the bound is about 10x.
    assert_close(&bf16_out, &f32_out, 3e-2, "bf16 against f32");
    head.set_precision(Precision::F32).unwrap();
    assert_eq!(head.bytes_held(), 4 * (3 * d * e + 3 * d));
    assert_eq!(run(&head), f32_out);
}

/// The cache methods' old names still work, for one release, and do what the new ones do.
#[test]
#[allow(deprecated)]
fn the_old_cache_method_names_do_what_the_new_ones_do() {
    let mha = MultiHeadAttention::with_seed(MhaConfig::new(8, 2), 3).unwrap();
    let x: Vec<f32> = (0..3 * 8).map(|i| (i as f32 * 0.7).cos()).collect();
    let seq = |n: usize| Sequence::batch_first(&x[..n * 8], 1, n, 8);
    let (mut old, mut new) = (mha.new_cache(1, 4), mha.new_cache(1, 4));
    let a = mha
        .forward_cached(seq(1), &mut old, &MhaOptions::default(), Par::Seq)
        .unwrap();
    let b = mha
        .forward_append(seq(1), &mut new, &MhaOptions::default(), Par::Seq)
        .unwrap();
    assert_eq!(a.output, b.output);
    mha.fill_cache(seq(3), seq(3), &mut old, Par::Seq).unwrap();
    mha.append_to_cache(seq(3), seq(3), &mut new, Par::Seq).unwrap();
    assert_eq!(old.len(), new.len());
    let a = mha
        .forward_with_cache(seq(2), &old, &MhaOptions::default(), Par::Seq)
        .unwrap();
    let b = mha
        .forward_over_cache(seq(2), &new, &MhaOptions::default(), Par::Seq)
        .unwrap();
    assert_eq!(a.output, b.output);
}

/// `Sequence::positions` copies the same positions out of either layout, batch-first, and
/// refuses a range past the end.
#[test]
fn positions_copy_out_a_step_of_every_sequence() {
    let (b, s, e) = (2, 3, 4);
    // Element (b, l, c) holds 100·b + 10·l + c in both layouts.
    let value = |bi: usize, l: usize, c: usize| (100 * bi + 10 * l + c) as f32;
    let bf: Vec<f32> = (0..b * s * e).map(|i| value(i / (s * e), i / e % s, i % e)).collect();
    let sf: Vec<f32> = (0..s * b * e).map(|i| value(i / e % b, i / (b * e), i % e)).collect();
    let seq_first = Sequence {
        data: &sf,
        batch: b,
        len: s,
        dim: e,
        layout: Layout::SeqFirst,
    };
    let want: Vec<f32> = (0..b)
        .flat_map(|bi| (1..3).flat_map(move |l| (0..e).map(move |c| value(bi, l, c))))
        .collect();
    assert_eq!(Sequence::batch_first(&bf, b, s, e).positions(1..3).unwrap(), want);
    assert_eq!(seq_first.positions(1..3).unwrap(), want);
    let err = seq_first.positions(2..4).unwrap_err().to_string();
    assert!(err.contains("within 0..3"), "{err}");
}

/// The options' builder methods set what their names say and leave the rest.
#[test]
fn option_builders_set_one_field_each() {
    let lengths = [2, 1];
    let built = MhaOptions::default()
        .causal()
        .key_padding(KeyPadding::Lengths(&lengths))
        .need_weights(NeedWeights::PerHead);
    assert!(built.is_causal && built.need_weights == NeedWeights::PerHead);
    assert!(matches!(built.key_padding, KeyPadding::Lengths(l) if l == lengths));
    assert!(matches!(built.attn_mask, ScoreMask::None));
    let sdpa = attn_core::SdpaOptions::default().causal(attn_core::kernels::Causal::BottomRight);
    assert!(sdpa.causal == attn_core::kernels::Causal::BottomRight && sdpa.scale.is_none());
}
