//! `TextEmbedder`, text in and embeddings out, on all-MiniLM-L6-v2 where `cargo xtask
//! fetch-model` installs it (`default_model_dir`). The numbers themselves are compared with
//! sentence-transformers by attn-cli's `embed_cli.rs`, which goes through this type.

use attn_nn::core::kernels::Par;
use attn_nn::{default_model_dir, EmbedOptions, TextEmbedder};

fn embedder() -> TextEmbedder {
    let dir = default_model_dir();
    assert!(
        dir.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 not found at {}: run `cargo xtask fetch-model`",
        dir.display()
    );
    TextEmbedder::default_model().unwrap()
}

#[test]
fn text_embeds_as_its_token_ids_do() {
    let embedder = embedder();
    let texts = [
        "a cat sat on the mat",
        "a kitten rested on a rug",
        "the stock market fell today",
        "",
    ];
    let e = embedder.embed(&texts).unwrap();
    assert_eq!((e.len(), e.dim, embedder.dim()), (4, 384, 384));
    // The tokenizer's ids through the pipeline: the same bits, in any batch size.
    let ids = embedder.tokenize(&texts).unwrap();
    assert_eq!(ids[0].first(), Some(&101), "[CLS] first");
    let direct = embedder.pipeline.embed(&ids, 3, Par::Seq, |_| {}).unwrap();
    assert_eq!(e.data, direct);
    let mut seen = 0;
    let one_at_a_time = EmbedOptions {
        batch_size: 1,
        par: Par::Rayon,
    };
    let again = embedder.embed_with(&texts, &one_at_a_time, |n| seen += n).unwrap();
    assert_eq!((again, seen), (e.clone(), 4));
    // Normalised rows; the paraphrase is nearer than the unrelated sentence.
    for row in e.rows() {
        let norm: f64 = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    assert!(
        e.cosine(0, 1) > e.cosine(0, 2) + 0.2,
        "{} vs {}",
        e.cosine(0, 1),
        e.cosine(0, 2)
    );
    let (_, tokens) = embedder.tokens("a cat").unwrap();
    assert_eq!(tokens, ["[CLS]", "a", "cat", "[SEP]"]);
}

#[test]
fn a_folder_that_is_not_a_model_is_named() {
    let missing = std::env::temp_dir().join("attn-no-such-model-folder");
    let err = TextEmbedder::from_dir(&missing).unwrap_err().to_string();
    assert!(
        err.contains("attn-no-such-model-folder") && err.contains("does not exist"),
        "{err}"
    );
    let empty = std::env::temp_dir().join(format!("attn-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = TextEmbedder::from_dir(&empty).unwrap_err().to_string();
    assert!(err.contains("has no config.json"), "{err}");
    std::fs::remove_dir(&empty).unwrap();
}
