//! Hostile checkpoints: `Seq2Seq::from_checkpoint_in` on a sequence-to-sequence checkpoint with
//! one configuration field replaced by a hostile value, or with bytes overwritten, in f32 and in
//! bf16 (from F32 and from BF16 files), then a greedy decode. Each gives the model or an error,
//! never a panic or an abort (an abort ends this test binary, which fails it: a `max_len` of 2^40
//! once asked the position table for 512 TiB).

use std::collections::HashMap;

use attn_core::kernels::{f32_to_bf16, Par};
use attn_core::{FromSafetensors, Precision, StateDict};
use attn_nn::Seq2Seq;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::{json, Value};

fn tiny() -> Vec<u8> {
    let path = format!("{}/tests/fixtures/seq2seq/tiny.safetensors", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run `cargo xtask codegen`)"))
}

/// `checkpoint`'s tensors (as BF16 bits when `bf16`) with `metadata`.
fn rewritten(checkpoint: &[u8], metadata: HashMap<String, String>, bf16: bool) -> Vec<u8> {
    let dict = StateDict::from_safetensors(checkpoint).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = dict
        .iter()
        .map(|(name, t)| {
            let data = if bf16 {
                t.data().iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect()
            } else {
                t.data().iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            (name.clone(), t.shape().to_vec(), data)
        })
        .collect();
    let dtype = if bf16 { Dtype::BF16 } else { Dtype::F32 };
    let views: Vec<(&str, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, shape, data)| (name.as_str(), TensorView::new(dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize(views, Some(metadata)).unwrap()
}

fn metadata(checkpoint: &[u8]) -> HashMap<String, String> {
    let (_, header) = SafeTensors::read_metadata(checkpoint).unwrap();
    header.metadata().clone().unwrap()
}

/// Loads `bytes` in `precision` and decodes two sources: `Ok`, or the error's text.
fn load_and_decode(bytes: &[u8], precision: Precision) -> Result<(), String> {
    let model = Seq2Seq::from_checkpoint_in(bytes, precision).map_err(|e| e.to_string())?;
    model
        .greedy(&["ab", ""], 8, false, Par::Seq)
        .map(drop)
        .map_err(|e| e.to_string())
}

const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::Bf16];

/// Every field of the configuration replaced by each hostile value, in both precisions and both
/// file dtypes: the model or an error that names something.
#[test]
fn hostile_configuration_values_are_errors_not_panics() {
    let original = tiny();
    let meta = metadata(&original);
    let config: Value = serde_json::from_str(&meta["attn.seq2seq"]).unwrap();
    let hostile = [
        json!(0),
        json!(-1),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(2.5),
        json!(1e300),
        json!("NaN"),
        Value::Null,
        json!(true),
        json!([1]),
        json!(1),
        json!(3),
        json!(256),
        json!([]),
        json!(["<pad>"]),
    ];
    let (mut accepted, mut refused) = (0, 0);
    for field in config.as_object().unwrap().keys() {
        for value in &hostile {
            let mut changed = config.clone();
            changed[field] = value.clone();
            let mut meta = meta.clone();
            meta.insert("attn.seq2seq".into(), changed.to_string());
            for bf16 in [false, true] {
                let bytes = rewritten(&original, meta.clone(), bf16);
                for precision in PRECISIONS {
                    match load_and_decode(&bytes, precision) {
                        Ok(()) => accepted += 1,
                        Err(e) => {
                            assert!(!e.trim().is_empty(), "{field} = {value}: an empty error");
                            refused += 1;
                        }
                    }
                }
            }
        }
    }
    // Most hostile values are refused; a few are valid (`nhead` 1, a `dropout` of 0, ...).
    assert!(
        refused > 10 * accepted && accepted > 0,
        "accepted {accepted}, refused {refused}"
    );
    // The huge `max_len` is refused by name, before the position table is made.
    let mut changed = config.clone();
    changed["max_len"] = json!(1u64 << 40);
    let mut huge = meta.clone();
    huge.insert("attn.seq2seq".into(), changed.to_string());
    let err = load_and_decode(&rewritten(&original, huge, false), Precision::F32).unwrap_err();
    assert!(err.contains("max_len") && err.contains("position table"), "{err}");
}

/// Bytes overwritten anywhere (half the edits in the header, where the configuration is), F32
/// and BF16 files, both precisions: the model or an error.
#[test]
fn overwritten_checkpoint_bytes_are_errors_not_panics() {
    let original = tiny();
    let meta = metadata(&original);
    let files = [
        rewritten(&original, meta.clone(), false),
        rewritten(&original, meta, true),
    ];
    for file in &files {
        for precision in PRECISIONS {
            load_and_decode(file, precision).unwrap();
        }
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..600 {
        let mut bytes = files[case % 2].clone();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for _ in 0..1 + next() % 4 {
            let at = if next() % 2 == 0 {
                8 + next() as usize % (header_end - 8)
            } else {
                next() as usize % bytes.len()
            };
            bytes[at] = if next() % 2 == 0 {
                next() as u8
            } else {
                b"0123456789-.e,:\"[]{}"[next() as usize % 20]
            };
        }
        match load_and_decode(&bytes, PRECISIONS[(case / 2) % 2]) {
            Ok(()) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(accepted > 0 && refused > 0, "accepted {accepted}, refused {refused}");
}
