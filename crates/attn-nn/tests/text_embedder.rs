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
    assert!(!e.is_empty());
    let debug = format!("{embedder:?}");
    assert!(
        debug.starts_with("TextEmbedder") && debug.contains("pipeline"),
        "{debug}"
    );
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
    // Batches bounded by tokens (here 9: one or two sentences at a time, a longer one alone)
    // give the same bits too.
    let (mut seen, mut calls) = (0, 0);
    let bounded = embedder
        .pipeline
        .embed_within(&ids, 32, 9, Par::Seq, |n| {
            seen += n;
            calls += 1
        })
        .unwrap();
    assert_eq!((bounded, seen), (e.data.clone(), 4));
    assert!(calls >= 3, "{calls} forward passes");
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
    let missing = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("attn-no-such-model-folder");
    let err = TextEmbedder::from_dir(&missing).unwrap_err().to_string();
    assert!(
        err.contains("attn-no-such-model-folder") && err.contains("does not exist"),
        "{err}"
    );
    let empty =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("attn-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = TextEmbedder::from_dir(&empty).unwrap_err().to_string();
    assert!(err.contains("has no config.json"), "{err}");
    std::fs::remove_dir(&empty).unwrap();
}

/// bf16 linear maps (the accuracy bar): every sentence of the MiniLM golden file keeps a
/// cosine of at least 0.9999 to its f32 embedding, and the ranking of a paraphrase over an
/// unrelated sentence holds. Where the CPU lacks AVX512-BF16 the same rounded values run
/// through the f32 GEMM, so the bound is checked on every machine.
#[test]
fn minilm_bf16_stays_within_cosine_of_f32() {
    let mut embedder = embedder();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../attn-cli/tests/fixtures/minilm/sentences.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let sentences: Vec<&str> = text.lines().collect();
    let f32_rows = embedder.embed(&sentences).unwrap();
    embedder.set_precision(attn_nn::core::Precision::Bf16).unwrap();
    assert_eq!(embedder.model().precision(), attn_nn::core::Precision::Bf16);
    let bf16_rows = embedder.embed(&sentences).unwrap();
    let mut worst = 1.0f64;
    for (i, (a, b)) in f32_rows.rows().zip(bf16_rows.rows()).enumerate() {
        let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let norms = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
            * b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / norms;
        worst = worst.min(cosine);
        assert!(cosine >= 0.9999, "sentence {i} ({:?}): cosine {cosine}", sentences[i]);
    }
    // Not the f32 numbers: the products really ran in bf16.
    assert!(worst < 1.0 - 1e-7, "bf16 gave the f32 embeddings exactly ({worst})");
    eprintln!(
        "bf16 against f32, worst cosine over {} sentences: {worst:.7}",
        sentences.len()
    );
    embedder.set_precision(attn_nn::core::Precision::F32).unwrap();
    assert_eq!(
        embedder.embed(&sentences).unwrap(),
        f32_rows,
        "back to f32, the f32 bits"
    );
}

/// A folder `attn-nn-{case}-{pid}` in the temporary directory holding copies of the model
/// folder's files `names`.
fn model_copy(case: &str, names: &[&str]) -> std::path::PathBuf {
    let source = default_model_dir();
    assert!(
        source.join("model.safetensors").exists(),
        "run `cargo xtask fetch-model`"
    );
    let dir = std::env::temp_dir().join(format!("attn-nn-{case}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    for name in names {
        std::fs::copy(source.join(name), dir.join(name)).unwrap();
    }
    dir
}

/// A copy of the model folder in which `change` edits the weights.
fn model_with_weights(case: &str, change: impl Fn(&str, &mut [f32])) -> std::path::PathBuf {
    let source = default_model_dir();
    let files = [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ];
    let dir = model_copy(case, &files);
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut data = view.data().to_vec();
            if view.dtype() == safetensors::Dtype::F32 {
                let mut values: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                change(&name, &mut values);
                data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            }
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let dtype = file.tensor(name).unwrap().dtype();
            (
                name.as_str(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    dir
}

/// No NaN embedding is handed back: a weight that is not finite is refused at load, naming the
/// tensor and where in it; finite weights large enough to overflow the activations fail the
/// sentence that overflows, naming it, rather than embedding it as NaN.
#[test]
fn weights_that_are_not_finite_or_overflow_give_no_embedding() {
    assert!(
        default_model_dir().join("model.safetensors").exists(),
        "run `cargo xtask fetch-model`"
    );
    let nan = model_with_weights("nan", |name, values| {
        if name == "encoder.layer.2.output.dense.weight" {
            values[3 * 1536 + 5] = f32::NAN;
        }
    });
    let err = TextEmbedder::from_dir(&nan).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "model.safetensors: tensor `encoder.layer.2.output.dense.weight` holds NaN at [3, 5]; a model whose weights are not finite has no embeddings to give"
        ),
        "{err}"
    );
    // Intermediate unit 0 of the first layer reads every input at 1e38: its sum overflows to
    // infinity for any sentence, and the output projection makes NaN of it.
    let huge = model_with_weights("huge", |name, values| {
        if name == "encoder.layer.0.intermediate.dense.weight" {
            values[..384].iter_mut().for_each(|v| *v = 1e38);
        }
    });
    let embedder = TextEmbedder::from_dir(&huge).unwrap();
    match embedder.embed(&["a cat sat on the mat", "hello"]) {
        Err(attn_nn::NnError::NonFinite { index, what }) => {
            assert_eq!(index, 0);
            assert!(what.contains("the model's activations overflowed"), "{what}");
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    std::fs::remove_dir_all(&nan).unwrap();
    std::fs::remove_dir_all(&huge).unwrap();
}

/// `do_lower_case` in `sentence_bert_config.json` lowercases every text before the tokenizer
/// reads it, as sentence-transformers does (a `Lowercase` normaliser put first): with a cased
/// copy of MiniLM's tokenizer, "Hello WORLD" then reads as "hello world", and without it does
/// not. A `do_lower_case` that is not a boolean is named.
#[test]
fn do_lower_case_lowercases_before_the_tokenizer() {
    let source = default_model_dir();
    let dir = model_copy(
        "lower",
        &[
            "config.json",
            "model.safetensors",
            "modules.json",
            "1_Pooling/config.json",
        ],
    );
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tokenizer["normalizer"]["lowercase"], true);
    tokenizer["normalizer"]["lowercase"] = false.into();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tokens = |lower: &str, text: &str| {
        let config = format!("{{\"max_seq_length\": 256, \"do_lower_case\": {lower}}}");
        std::fs::write(dir.join("sentence_bert_config.json"), config).unwrap();
        TextEmbedder::from_dir(&dir).map(|e| e.tokens(text).unwrap().1)
    };
    let lowered = tokens("true", "Hello WORLD").unwrap();
    assert_eq!(lowered, ["[CLS]", "hello", "world", "[SEP]"]);
    assert_eq!(tokens("true", "hello world").unwrap(), lowered);
    assert_ne!(tokens("false", "Hello WORLD").unwrap(), lowered);
    let err = tokens("\"yes\"", "x").unwrap_err().to_string();
    assert!(
        err.ends_with("sentence_bert_config.json: `do_lower_case` is \"yes\", expected true or false"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
