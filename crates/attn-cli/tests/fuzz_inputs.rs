//! The fuzz entry points in the normal test suite: the committed libFuzzer corpus
//! (`fuzz/corpus/`, grown by `cargo xtask fuzz`) replayed, and a quick proptest fuzz of the
//! same entry points (and of `attn sdpa --backward` and `attn run` in bf16 and with the backward,
//! which the libFuzzer targets do not reach). Every input must give `Ok` or an error; a panic
//! fails the test, and the memory cap (64 MiB here) must refuse anything larger before it is
//! allocated.

use std::path::{Path, PathBuf};

use attn_cli::fuzzing;
use proptest::prelude::*;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Sets the memory cap the fuzz targets run under (every test here sets the same value).
fn cap_memory() {
    std::env::set_var("ATTN_MAX_MEMORY", "64M");
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = repo().join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

#[test]
fn committed_fuzz_corpus_replays_without_a_panic() {
    cap_memory();
    let mut counts = Vec::new();
    for target in ["tensor_file", "sdpa_input", "run_input", "bert_config", "embed_text"] {
        let inputs = corpus(target);
        assert!(!inputs.is_empty(), "fuzz/corpus/{target} is empty");
        let mut ok = 0;
        for (path, bytes) in &inputs {
            let result = match target {
                "tensor_file" => fuzzing::tensor_file(bytes),
                "sdpa_input" => match bytes.split_first() {
                    Some((&causal, file)) => fuzzing::sdpa(file, causal),
                    None => continue,
                },
                "run_input" => {
                    let [config, weights, input] = fuzzing::split_run_input(bytes);
                    fuzzing::run(config, weights, input)
                }
                "bert_config" => fuzzing::bert_config(bytes),
                _ => fuzzing::embed_text(bytes)
                    .unwrap_or_else(|| panic!("the model is not installed: run `cargo xtask fetch-model`")),
            };
            ok += result.is_ok() as usize;
            // An error must say something (one line for the CLI to print).
            if let Err(e) = result {
                assert!(!format!("{e:#}").trim().is_empty(), "{}: empty error", path.display());
            }
        }
        counts.push((target, inputs.len(), ok));
    }
    // The corpus is fixed, and so is what the entry points make of it: a change that starts
    // accepting malformed inputs, or rejecting valid ones, changes these counts. After
    // `cargo xtask fuzz --cmin` grows or shrinks the corpus, update them from this test's output.
    eprintln!("{counts:?}");
    assert_eq!(
        counts, REPLAY_COUNTS,
        "(target, inputs, accepted) of the committed corpus"
    );
}

/// `(target, inputs, accepted)` of the committed corpus in `fuzz/corpus/`.
const REPLAY_COUNTS: [(&str, usize, usize); 5] = [
    ("tensor_file", 967, 13),
    ("sdpa_input", 914, 164),
    ("run_input", 1232, 139),
    ("bert_config", 1875, 4),
    ("embed_text", 538, 534),
];

/// The input files of the golden SDPA cases (forward and backward: every one ends in
/// `.in.safetensors`).
fn sdpa_seeds() -> Vec<Vec<u8>> {
    sdpa_inputs(".in.safetensors")
}

/// The input files of the golden SDPA backward cases (with `grad.out`).
fn sdpa_backward_seeds() -> Vec<Vec<u8>> {
    sdpa_inputs(".backward.in.safetensors")
}

/// The golden SDPA files under 70 kB whose names end in `suffix`, sorted by their bytes.
fn sdpa_inputs(suffix: &str) -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(fixtures().join("sdpa"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(suffix) && path.metadata().unwrap().len() < 70_000)
        .map(|path| std::fs::read(path).unwrap())
        .collect();
    seeds.sort();
    seeds
}

fn module_seeds() -> Vec<[Vec<u8>; 3]> {
    named_module_seeds().into_iter().map(|(_, files)| files).collect()
}

/// [`module_seeds`] with the name of each golden case.
fn named_module_seeds() -> Vec<(String, [Vec<u8>; 3])> {
    let dir = fixtures().join("modules");
    let mut seeds = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && n != "cases.json")
        .collect();
    names.sort();
    for name in names {
        let stem = name.trim_end_matches(".json");
        let read = |suffix: &str| std::fs::read(dir.join(format!("{stem}{suffix}"))).unwrap();
        let files = [read(".json"), read(".weights.safetensors"), read(".in.safetensors")];
        if files[1].len() + files[2].len() < 120_000 {
            seeds.push((stem.to_string(), files));
        }
    }
    seeds
}

/// The three files of a module run, and the flags `(bf16, backward)` of [`fuzzing::run_with`].
type FlaggedSeed = ([Vec<u8>; 3], bool, bool);

/// The golden module cases as `attn run --dtype bf16 [--backward]` reads them: the config, the
/// weights as BF16 bits (each F32 tensor rounded to nearest even, as PyTorch's `.bfloat16()`)
/// and the input file of the forward or, where the case has one, of the backward (with
/// `grad.output`); each with the flags `(bf16, backward)` it is run under.
fn bf16_and_backward_seeds() -> &'static [FlaggedSeed] {
    static SEEDS: std::sync::OnceLock<Vec<FlaggedSeed>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = fixtures().join("modules");
        let mut seeds = Vec::new();
        for (name, [config, weights, input]) in named_module_seeds() {
            let bf16_weights = as_bf16(&weights);
            seeds.push(([config.clone(), bf16_weights.clone(), input], true, false));
            if let Ok(backward_input) = std::fs::read(dir.join(format!("{name}.backward.in.safetensors"))) {
                seeds.push(([config.clone(), weights, backward_input.clone()], false, true));
                seeds.push(([config, bf16_weights, backward_input], true, true));
            }
        }
        seeds
    })
}

/// A safetensors file with every F32 tensor rounded to BF16 bits (others as they are).
fn as_bf16(bytes: &[u8]) -> Vec<u8> {
    use attn_nn::core::kernels::f32_to_bf16;
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let file = SafeTensors::deserialize(bytes).unwrap();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| match view.dtype() {
            Dtype::F32 => {
                let bits = view
                    .data()
                    .chunks_exact(4)
                    .flat_map(|c| f32_to_bf16(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                    .collect();
                (name, Dtype::BF16, view.shape().to_vec(), bits)
            }
            dtype => (name, dtype, view.shape().to_vec(), view.data().to_vec()),
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| (name.as_str(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// The seeds of the bf16 and backward fuzz run as they are: each must succeed, or the fuzz
/// below would only ever exercise the parsers' errors, not the bf16 packing from bits, the
/// bf16 products and the backward it is there for.
#[test]
fn bf16_and_backward_seeds_run() {
    cap_memory();
    let seeds = bf16_and_backward_seeds();
    let backward = seeds.iter().filter(|(_, _, backward)| *backward).count();
    assert!(
        seeds.len() >= 40 && backward >= 20,
        "{} seeds, {backward} backward",
        seeds.len()
    );
    for ([config, weights, input], bf16, backward) in seeds {
        let result = fuzzing::run_with(config, weights, input, *bf16, *backward);
        assert!(
            result.is_ok(),
            "{} (bf16 {bf16}, backward {backward}): {result:?}",
            String::from_utf8_lossy(config)
        );
    }
}

/// The seeds of the SDPA backward fuzz run as they are (no causal mask besides their own): each
/// must succeed, so the fuzz below reaches the backward.
#[test]
fn sdpa_backward_seeds_run() {
    cap_memory();
    let seeds = sdpa_backward_seeds();
    assert!(seeds.len() >= 10, "{} seeds", seeds.len());
    for bytes in &seeds {
        let result = fuzzing::sdpa_with(bytes, 0, true);
        assert!(result.is_ok(), "{result:?}");
    }
}

/// Overwrites up to 8 bytes and may cut the end off.
fn mutate(bytes: &mut Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) {
    if bytes.is_empty() {
        return;
    }
    for &(at, value) in edits {
        let n = bytes.len();
        bytes[at % n] = value;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
}

/// Values a config field may be replaced with: wrong types, zero, negative, huge, fractional.
fn hostile_value(which: u8) -> Value {
    match which % 10 {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(1u64 << 40),
        3 => Value::from(u64::MAX),
        4 => Value::from(2.5),
        5 => Value::from(1e300),
        6 => Value::from("NaN"),
        7 => Value::Null,
        8 => Value::from(true),
        _ => Value::Array(vec![Value::from(1)]),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_sdpa_inputs_never_panic(
        seed in any::<prop::sample::Index>(),
        causal in 0u8..3,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        cap_memory();
        let seeds = sdpa_seeds();
        let mut bytes = seed.get(&seeds).clone();
        mutate(&mut bytes, &edits, cut);
        let _ = fuzzing::sdpa(&bytes, causal);
    }

    /// As above through `attn sdpa --backward` (`grad.out`, the three gradients).
    #[test]
    fn mutated_sdpa_backward_inputs_never_panic(
        seed in any::<prop::sample::Index>(),
        causal in 0u8..3,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        cap_memory();
        let seeds = sdpa_backward_seeds();
        let mut bytes = seed.get(&seeds).clone();
        mutate(&mut bytes, &edits, cut);
        let _ = fuzzing::sdpa_with(&bytes, causal, true);
    }

    #[test]
    fn mutated_run_inputs_never_panic(
        seed in any::<prop::sample::Index>(),
        file in 0usize..3,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        cap_memory();
        let seeds = module_seeds();
        let mut files = seed.get(&seeds).clone();
        mutate(&mut files[file], &edits, cut);
        let _ = fuzzing::run(&files[0], &files[1], &files[2]);
    }

    /// As above through `--dtype bf16` (BF16 weights packed from their bits, the products in
    /// bf16) and `--backward` (`grad.output`, every gradient).
    #[test]
    fn mutated_run_inputs_in_bf16_and_backward_never_panic(
        seed in any::<prop::sample::Index>(),
        file in 0usize..3,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        cap_memory();
        let seeds = bf16_and_backward_seeds();
        let (mut files, bf16, backward) = seed.get(seeds).clone();
        mutate(&mut files[file], &edits, cut);
        let _ = fuzzing::run_with(&files[0], &files[1], &files[2], bf16, backward);
    }

    #[test]
    fn hostile_config_values_are_errors_not_panics(
        seed in any::<prop::sample::Index>(),
        field in any::<prop::sample::Index>(),
        which in any::<u8>(),
    ) {
        cap_memory();
        let seeds = module_seeds();
        let files = seed.get(&seeds);
        let Value::Object(mut config) = serde_json::from_slice::<Value>(&files[0]).unwrap() else {
            panic!("module configs are JSON objects")
        };
        let keys: Vec<String> = config.keys().cloned().collect();
        let key = field.get(&keys).clone();
        config.insert(key, hostile_value(which));
        let text = serde_json::to_vec(&Value::Object(config)).unwrap();
        let _ = fuzzing::run(&text, &files[1], &files[2]);
    }

    #[test]
    fn hostile_bert_config_values_are_errors_not_panics(
        field in any::<prop::sample::Index>(),
        which in any::<u8>(),
    ) {
        let minimal = r#"{"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12}"#;
        let Value::Object(mut config) = serde_json::from_str::<Value>(minimal).unwrap() else { unreachable!() };
        let keys: Vec<String> = config.keys().cloned().collect();
        config.insert(field.get(&keys).clone(), hostile_value(which));
        let _ = fuzzing::bert_config(&serde_json::to_vec(&Value::Object(config)).unwrap());
    }
}
