//! The BERT encoder's packed (no padding) and padded paths agree on every real token.

use attn_nn::core::kernels::Par;
use attn_nn::core::{StateDict, Tensor};
use attn_nn::{BertConfig, BertModel, Pooling, SentenceEmbedder};

mod common;
use common::random;

fn tiny_bert() -> BertModel {
    let config = BertConfig::from_json(
        r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 24, "hidden_act": "gelu", "max_position_embeddings": 40,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "model_type": "bert", "architectures": ["BertModel"]}"#,
    )
    .unwrap();
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
    BertModel::from_state_dict(config, dict).unwrap()
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
    let embedder = SentenceEmbedder {
        model,
        pooling: Pooling::Mean,
        normalize: true,
    };
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
    let embedder = SentenceEmbedder {
        model: tiny_bert(),
        pooling: Pooling::Mean,
        normalize: true,
    };
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
