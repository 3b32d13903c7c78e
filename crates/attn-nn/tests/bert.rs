//! The BERT encoder's packed (no padding) and padded paths agree on every real token.

use attn_nn::core::kernels::Par;
use attn_nn::core::{FromSafetensors, StateDict, Tensor};
use attn_nn::{BertConfig, BertModel, Pooling, SentenceEmbedder};

mod common;
use common::random;

const TINY_CONFIG: &str = r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 24, "hidden_act": "gelu", "max_position_embeddings": 40, "pad_token_id": 0,
    "type_vocab_size": 2, "layer_norm_eps": 1e-12, "model_type": "bert", "architectures": ["BertModel"]}"#;

fn tiny_bert() -> BertModel {
    BertModel::from_state_dict(BertConfig::from_json(TINY_CONFIG).unwrap(), tiny_bert_weights()).unwrap()
}

fn tiny_bert_weights() -> StateDict {
    let (e, f) = (16, 24);
    let mut dict = StateDict::new();
    let mut seed = 0;
    let mut put = |name: &str, shape: Vec<usize>| {
        seed += 1;
        let n = shape.iter().product();
        let mut data = random(n, seed, 0.3);
        if name.ends_with("LayerNorm.weight") {
            data.iter_mut().for_each(|x| *x += 1.0);
        }
        dict.insert(name.to_string(), Tensor::new(name, shape, data).unwrap());
    };
    put("embeddings.word_embeddings.weight", vec![50, e]);
    put("embeddings.position_embeddings.weight", vec![40, e]);
    put("embeddings.token_type_embeddings.weight", vec![2, e]);
    put("embeddings.LayerNorm.weight", vec![e]);
    put("embeddings.LayerNorm.bias", vec![e]);
    for i in 0..2 {
        for part in ["query", "key", "value"] {
            put(&format!("encoder.layer.{i}.attention.self.{part}.weight"), vec![e, e]);
            put(&format!("encoder.layer.{i}.attention.self.{part}.bias"), vec![e]);
        }
        put(&format!("encoder.layer.{i}.attention.output.dense.weight"), vec![e, e]);
        put(&format!("encoder.layer.{i}.attention.output.dense.bias"), vec![e]);
        put(&format!("encoder.layer.{i}.attention.output.LayerNorm.weight"), vec![e]);
        put(&format!("encoder.layer.{i}.attention.output.LayerNorm.bias"), vec![e]);
        put(&format!("encoder.layer.{i}.intermediate.dense.weight"), vec![f, e]);
        put(&format!("encoder.layer.{i}.intermediate.dense.bias"), vec![f]);
        put(&format!("encoder.layer.{i}.output.dense.weight"), vec![e, f]);
        put(&format!("encoder.layer.{i}.output.dense.bias"), vec![e]);
        put(&format!("encoder.layer.{i}.output.LayerNorm.weight"), vec![e]);
        put(&format!("encoder.layer.{i}.output.LayerNorm.bias"), vec![e]);
    }
    put("pooler.dense.weight", vec![e, e]);
    put("pooler.dense.bias", vec![e]);
    dict
}

#[test]
fn packed_and_padded_paths_agree() {
    let model = tiny_bert();
    let e = 16;
    let sequences: Vec<Vec<u32>> = [7usize, 1, 23, 12, 2]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|t| ((i * 13 + t * 7) % 50) as u32).collect())
        .collect();
    let len = sequences.iter().map(Vec::len).max().unwrap();
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    let mut padded = vec![0u32; sequences.len() * len];
    for (b, s) in sequences.iter().enumerate() {
        padded[b * len..b * len + s.len()].copy_from_slice(s);
    }
    let dense = model
        .hidden_states(&padded, sequences.len(), len, &lengths, Par::Rayon)
        .unwrap();
    let ids: Vec<u32> = sequences.iter().flatten().copied().collect();
    let mut starts = vec![0];
    for s in &sequences {
        starts.push(starts.last().unwrap() + s.len());
    }
    let packed = model.hidden_states_packed(&ids, &starts, Par::Rayon).unwrap();
    for (b, s) in sequences.iter().enumerate() {
        for t in 0..s.len() {
            let a = &dense[(b * len + t) * e..(b * len + t + 1) * e];
            let p = &packed[(starts[b] + t) * e..(starts[b] + t + 1) * e];
            for (x, y) in a.iter().zip(p) {
                // Measured bit-identical at both SIMD levels (each sequence's rows go through the
                // same arithmetic); the bound leaves room for GEMM blocking by batch size.
                assert!((x - y).abs() < 1e-6, "sequence {b} token {t}: {x} vs {y}");
            }
        }
    }
    // Embedding in batches of 2 equals embedding one at a time.
    let embedder = SentenceEmbedder::new(model, Pooling::Mean, true);
    let all = embedder.embed(&sequences, 2, Par::Rayon, |_| {}).unwrap();
    let one = embedder.embed(&sequences, 1, Par::Seq, |_| {}).unwrap();
    for (x, y) in all.iter().zip(&one) {
        // Measured 1.2e-7 at both SIMD levels (unit vectors); the bound is about 8x.
        assert!((x - y).abs() < 1e-6);
    }
    let norm: f32 = all[..e].iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-6);
}

#[test]
fn bad_checkpoints_are_named() {
    let err = BertConfig::from_json(
        r#"{"vocab_size": 5, "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 8, "max_position_embeddings": 8, "model_type": "gpt2"}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("model_type"), "{err}");
    let err = BertConfig::from_json(r#"{"hidden_size": 4}"#).unwrap_err();
    assert!(err.to_string().contains("vocab_size"), "{err}");
    let model = tiny_bert();
    let err = model.hidden_states_packed(&[3, 99], &[0, 2], Par::Seq).unwrap_err();
    assert!(
        err.to_string().contains("token id") && err.to_string().contains("99"),
        "{err}"
    );
}

#[test]
fn bert_is_deterministic_across_thread_counts() {
    let embedder = SentenceEmbedder::new(tiny_bert(), Pooling::Mean, true);
    let sequences: Vec<Vec<u32>> = (0..9usize)
        .map(|i| (0..(i * 5) % 17 + 1).map(|t| ((i * 11 + t * 3) % 50) as u32).collect())
        .collect();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| embedder.embed(&sequences, 4, Par::Rayon, |_| {}).unwrap())
    };
    let one = run(1);
    let sequential = embedder.embed(&sequences, 4, Par::Seq, |_| {}).unwrap();
    assert_eq!(one, sequential, "1 thread differs from sequential");
    // 2 threads, more than this machine's cores, and the machine's own count.
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [2, 3, 8, machine] {
        assert_eq!(one, run(threads), "1 and {threads} threads differ");
    }
}

/// Ids padded by a tokenizer (MiniLM's tokenizer.json pads to 128 with `[PAD]` = 0) embed as the
/// unpadded sequence: the padding is stripped, not attended to and pooled. Before, the padded
/// ids gave a different vector (cosine 0.836 against the CLI's with the real model).
#[test]
fn padded_token_ids_embed_as_the_unpadded_sequence() {
    let embedder = SentenceEmbedder::new(tiny_bert(), Pooling::Mean, true);
    let ids = vec![1u32, 7, 9, 13, 2];
    let mut padded = ids.clone();
    padded.resize(32, 0);
    let want = embedder.embed(std::slice::from_ref(&ids), 8, Par::Seq, |_| {}).unwrap();
    let got = embedder.embed(&[padded, ids], 8, Par::Seq, |_| {}).unwrap();
    assert_eq!(&got[..16], &want[..], "padded");
    assert_eq!(&got[16..], &want[..], "unpadded, packed after a padded one");
    let too_long = vec![5u32; 41];
    let err = embedder.embed(&[too_long], 8, Par::Seq, |_| {}).unwrap_err();
    assert!(err.to_string().contains("max_seq_length = 40"), "{err}");
}

/// `SentenceEmbedder::from_dir` reads a sentence-transformers folder: weights (here F16, widened
/// exactly), pooling, normalisation and `max_seq_length`; missing files and bad fields are
/// named.
#[test]
fn sentence_embedder_reads_a_model_folder() {
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("attn-bert-folder-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let err = SentenceEmbedder::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("missing"), "{err}");
    std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
    // Weights stored as F16 values, so the F16 file and the F32 model hold the same numbers.
    let weights = tiny_bert_weights();
    let file = common::half_safetensors(&weights, safetensors::Dtype::F16, f32_to_f16_bits, None);
    std::fs::write(dir.join("model.safetensors"), &file).unwrap();
    std::fs::write(
        dir.join("modules.json"),
        r#"[{"type": "sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    std::fs::write(dir.join("1_Pooling/config.json"), r#"{"pooling_mode_cls_token": true}"#).unwrap();
    std::fs::write(dir.join("sentence_bert_config.json"), r#"{"max_seq_length": 10}"#).unwrap();
    let embedder = SentenceEmbedder::from_dir(&dir).unwrap();
    assert_eq!(
        (embedder.pooling, embedder.normalize, embedder.max_seq_length),
        (Pooling::Cls, true, 10)
    );
    // The same numbers in F32 (the F16 widening itself is tested in attn-core).
    let rounded = StateDict::from_safetensors(&file).unwrap();
    assert!(weights.iter().all(|(name, t)| t
        .data()
        .iter()
        .zip(rounded[name].data())
        .all(|(&x, &y)| (x - y).abs() <= 1e-3 * x.abs() + 6.2e-5)));
    let model = BertModel::from_state_dict(BertConfig::from_json(TINY_CONFIG).unwrap(), rounded).unwrap();
    let by_hand = SentenceEmbedder::new(model, Pooling::Cls, true);
    let ids = [vec![1u32, 4, 8, 2], vec![1, 3, 2, 0, 0]];
    assert_eq!(
        embedder.embed(&ids, 4, Par::Seq, |_| {}).unwrap(),
        by_hand.embed(&ids, 4, Par::Seq, |_| {}).unwrap()
    );
    let err = embedder.embed(&[vec![3; 11]], 4, Par::Seq, |_| {}).unwrap_err();
    assert!(err.to_string().contains("max_seq_length = 10"), "{err}");
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{"pooling_mode_weightedmean_tokens": true}"#,
    )
    .unwrap();
    let err = SentenceEmbedder::from_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("1_Pooling/config.json") && err.contains("pooling mode"),
        "{err}"
    );
    // An optional file that is there but cannot be read is an error, not an absent file: read
    // as absent, this `modules.json` would drop the normalisation without a word.
    std::fs::write(dir.join("1_Pooling/config.json"), r#"{"pooling_mode_cls_token": true}"#).unwrap();
    std::fs::remove_file(dir.join("modules.json")).unwrap();
    std::fs::create_dir(dir.join("modules.json")).unwrap();
    let err = SentenceEmbedder::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("modules.json") && err.contains("cannot read"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Round to the nearest F16; values below its normal range (|x| < 2^-14) become zero.
fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if x.abs() < 2f32.powi(-14) {
        return sign;
    }
    let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exponent), "{x} is outside F16's normal range");
    let mantissa = bits & 0x7f_ffff;
    let rounded = (((exponent as u32) << 10) | (mantissa >> 13)) + u32::from(mantissa & 0x1fff > 0x1000);
    sign | rounded as u16
}

/// A BF16 `model.safetensors` read for bf16 (`SentenceEmbedder::from_dir_in`) is never widened:
/// the weight matrices go from the file's bits to their packs and the embedding tables are read
/// a row at a time, so after embedding the model holds 2 bytes per value (4 only for the
/// biases and norm weights the forward reads), 2 bytes per value less than the same file
/// widened, and it computes the same bits as the widened file in bf16.
#[test]
fn bf16_files_load_without_widening_in_bf16() {
    use attn_nn::core::kernels::f32_to_bf16;
    use attn_nn::core::Precision;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("attn-bert-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
    let weights = tiny_bert_weights();
    // The pooler is not part of the model.
    let counted = weights.iter().filter(|(name, _)| !name.starts_with("pooler."));
    let values: usize = counted.clone().map(|(_, t)| t.len()).sum();
    let small: usize = counted
        .filter(|(_, t)| t.shape().len() == 1)
        .map(|(_, t)| t.len())
        .sum();
    std::fs::write(
        dir.join("model.safetensors"),
        common::half_safetensors(&weights, safetensors::Dtype::BF16, f32_to_bf16, None),
    )
    .unwrap();

    let kept = SentenceEmbedder::from_dir_in(&dir, Precision::Bf16).unwrap();
    let mut widened = SentenceEmbedder::from_dir(&dir).unwrap();
    widened.model.set_precision(Precision::Bf16).unwrap();
    assert_eq!(kept.model.precision(), Precision::Bf16);
    let ids = [vec![1u32, 4, 8, 2], vec![1, 3, 9, 17, 44, 2], vec![1, 2]];
    for par in [Par::Seq, Par::Rayon] {
        let got = kept.embed(&ids, 2, par, |_| {}).unwrap();
        assert_eq!(got, widened.embed(&ids, 2, par, |_| {}).unwrap(), "{par:?}");
    }
    assert_eq!(
        kept.model.bytes_held(),
        widened.model.bytes_held() - 2 * values + 4 * small,
        "the f32 model holds 4 bytes per value; the kept one 2, and 4 more for the vectors it read"
    );
    // Computing in f32 widens what it reads, exactly: the widened file's f32 bits.
    let mut kept_f32 = kept.clone();
    kept_f32.model.set_precision(Precision::F32).unwrap();
    widened.model.set_precision(Precision::F32).unwrap();
    assert_eq!(
        kept_f32.embed(&ids, 2, Par::Seq, |_| {}).unwrap(),
        widened.embed(&ids, 2, Par::Seq, |_| {}).unwrap()
    );
    // In f32 a BF16 file is widened at load, as before.
    let f32_load = SentenceEmbedder::from_dir_in(&dir, Precision::F32).unwrap();
    assert_eq!(f32_load.model.bytes_held(), 4 * values);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config that leaves out `hidden_act`, `type_vocab_size` and `layer_norm_eps` gets BERT's
/// defaults; a zero size, heads that do not divide the width, a non-positive or non-finite
/// epsilon and an unknown activation are refused, each naming its field, whether the config
/// comes from JSON or is built by hand.
#[test]
fn bert_configs_take_defaults_and_name_bad_fields() {
    let minimal = r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 24, "max_position_embeddings": 40}"#;
    let config = BertConfig::from_json(minimal).unwrap();
    assert_eq!(config.hidden_act, "gelu");
    assert_eq!(config.type_vocab_size, 2);
    assert_eq!(config.layer_norm_eps, 1e-12);
    assert_eq!(config.pad_token_id, 0);
    let mut json: serde_json::Value = serde_json::from_str(TINY_CONFIG).unwrap();
    let refused = |field: &str, value: serde_json::Value| {
        let mut edited = json.clone();
        edited[field] = value.clone();
        let err = BertConfig::from_json(&edited.to_string()).unwrap_err();
        assert!(err.to_string().contains(field), "{field} = {value}: {err}");
    };
    for field in [
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "type_vocab_size",
    ] {
        refused(field, 0.into());
    }
    refused("num_attention_heads", 5.into());
    refused("layer_norm_eps", 0.0.into());
    refused("layer_norm_eps", (-1e-12).into());
    refused("hidden_act", "swish".into());
    for act in ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"] {
        json["hidden_act"] = act.into();
        BertConfig::from_json(&json.to_string()).unwrap_or_else(|e| panic!("{act}: {e}"));
    }
    // Built by hand, not parsed: `from_state_dict` checks it too.
    let good = BertConfig::from_json(TINY_CONFIG).unwrap();
    for (what, config) in [
        (
            "hidden_size",
            BertConfig {
                hidden_size: 0,
                ..good.clone()
            },
        ),
        (
            "layer_norm_eps",
            BertConfig {
                layer_norm_eps: f64::INFINITY,
                ..good.clone()
            },
        ),
        (
            "layer_norm_eps",
            BertConfig {
                layer_norm_eps: f64::NAN,
                ..good.clone()
            },
        ),
        (
            "hidden_act",
            BertConfig {
                hidden_act: "tanh".into(),
                ..good.clone()
            },
        ),
    ] {
        let err = BertModel::from_state_dict(config, tiny_bert_weights()).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    assert_eq!(tiny_bert().num_layers(), 2);
}

/// Every check of the padded and packed inputs, each alone (the others satisfied), and the
/// limits themselves accepted: sequences of exactly `max_position_embeddings` tokens.
#[test]
fn bert_inputs_are_checked_one_by_one() {
    let model = tiny_bert();
    let ids = |n: usize| -> Vec<u32> { (0..n).map(|t| (t * 7 % 50) as u32).collect() };
    let message = |r: attn_nn::Result<Vec<f32>>| r.unwrap_err().to_string();
    // Padded: ids for [B, L], one length per sequence, L within the position table.
    let two = ids(2 * 40);
    model.hidden_states(&two, 2, 40, &[40, 17], Par::Seq).unwrap();
    let err = message(model.hidden_states(&two[..79], 2, 40, &[40, 17], Par::Seq));
    assert!(err.contains("input_ids"), "{err}");
    let err = message(model.hidden_states(&two, 2, 40, &[40], Par::Seq));
    assert!(err.contains("input_ids"), "{err}");
    let err = message(model.hidden_states(&ids(41), 1, 41, &[41], Par::Seq));
    assert!(err.contains("sequence length") && err.contains("41"), "{err}");
    let err = message(model.hidden_states(&two, 2, 40, &[40, 41], Par::Seq));
    assert!(err.contains("length") && err.contains("41"), "{err}");
    // Packed: starts from 0 to N, never decreasing, each sequence within the table.
    let n = ids(50);
    model.hidden_states_packed(&n, &[0, 30, 50], Par::Seq).unwrap();
    model.hidden_states_packed(&n[..40], &[0, 40], Par::Seq).unwrap();
    for bad in [&[1, 30, 50][..], &[0, 30, 49], &[0, 31, 30, 50]] {
        let err = message(model.hidden_states_packed(&n, bad, Par::Seq));
        // The model's own refusal: the layers would refuse these starts too, in the same words
        // but under their own name.
        assert!(
            err.starts_with("bert: `starts`") && err.contains("0 = starts[0] <= ... <= starts[last] = N = 50"),
            "{bad:?}: {err}"
        );
    }
    let err = message(model.hidden_states_packed(&n[..46], &[0, 5, 46], Par::Seq));
    assert!(err.contains("sequence length") && err.contains("41"), "{err}");
    let err = message(model.attention_map(&n[..5], 2, Par::Seq));
    assert!(err.contains("layer") && err.contains('2'), "{err}");
}

/// `attention_map` against an f64 reference: the softmax of each head's scaled query-key
/// products, computed from the hidden states entering the layer (those of the model cut to
/// its first `layer` layers) and the checkpoint's query and key weights.
#[test]
fn attention_maps_match_an_f64_reference() {
    let (e, h) = (16, 4);
    let d = e / h;
    let model = tiny_bert();
    let weights = tiny_bert_weights();
    let ids: Vec<u32> = vec![1, 17, 4, 33, 8, 2];
    let l = ids.len();
    let mut worst = 0.0f64;
    for layer in 0..2 {
        // The states entering `layer`: a model of the first `layer` layers.
        let mut cut = weights.clone();
        cut.retain(|name, _| (layer..2).all(|i| !name.starts_with(&format!("encoder.layer.{i}."))));
        let config = BertConfig {
            num_hidden_layers: layer,
            ..BertConfig::from_json(TINY_CONFIG).unwrap()
        };
        let x = BertModel::from_state_dict(config, cut)
            .unwrap()
            .hidden_states_packed(&ids, &[0, l], Par::Seq)
            .unwrap();
        let project = |part: &str| -> Vec<f64> {
            let w = weights[&format!("encoder.layer.{layer}.attention.self.{part}.weight")].data();
            let b = weights[&format!("encoder.layer.{layer}.attention.self.{part}.bias")].data();
            (0..l * e)
                .map(|i| {
                    let (t, j) = (i / e, i % e);
                    b[j] as f64 + (0..e).map(|k| x[t * e + k] as f64 * w[j * e + k] as f64).sum::<f64>()
                })
                .collect()
        };
        let (q, k) = (project("query"), project("key"));
        let got = model.attention_map(&ids, layer, Par::Seq).unwrap();
        assert_eq!(got.len(), h * l * l, "layer {layer}: [H, L, L]");
        for head in 0..h {
            for i in 0..l {
                let scores: Vec<f64> = (0..l)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|c| q[i * e + head * d + c] * k[j * e + head * d + c]).sum();
                        dot / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let want = (s - max).exp() / z;
                    let error = (got[(head * l + i) * l + j] as f64 - want).abs();
                    worst = worst.max(error);
                    // Measured 1.1e-7.
                    assert!(error < 1e-6, "layer {layer} head {head} [{i}, {j}]: {error:e}");
                }
            }
        }
    }
    eprintln!("worst attention-map error {worst:.1e}");
}
