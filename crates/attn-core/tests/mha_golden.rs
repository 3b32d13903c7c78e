//! `MultiHeadAttention` against `nn.MultiheadAttention`: golden files from PyTorch
//! (`tests/fixtures/mha`, written by `cargo xtask codegen`), through the fused self-attention
//! path when query, key and value are one tensor (as PyTorch takes its own), else the general
//! path; outputs and attention weights (averaged and per head).

use std::path::Path;

use attn_core::kernels::Par;
use attn_core::{Layout, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights};

mod golden;

/// Largest error measured over these cases, `|got - want| / (1 + |want|)`: 3.8e-6 on AVX2+FMA
/// and 5.5e-6 on the scalar path for the E = 64, S = 130 case (sums over 64 inputs, two flash
/// row tiles), 1e-6 or less for the rest; weights 2.2e-7. The bound is about 7× the largest; a
/// swapped head, a lost mask or a skipped bias gives errors of 1e-2 and more.
const TOLERANCE: f64 = 4e-5;

#[test]
fn multi_head_attention_matches_pytorch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mha");
    let cases = golden::load_all(&dir);
    assert!(cases.len() >= 34, "{} cases", cases.len());
    let mut fused_cases = 0;
    let mut failures = Vec::new();
    for mut case in cases {
        let need = golden::take_flag(&mut case.config, "need_weights", true);
        let average = golden::take_flag(&mut case.config, "average_attn_weights", true);
        let is_causal = golden::take_flag(&mut case.config, "is_causal", false);
        assert_eq!(case.config.remove("module"), Some("multihead_attention".into()));
        let config: MhaConfig = serde_json::from_value(case.config.clone().into()).unwrap();
        let layout = if config.batch_first {
            Layout::BatchFirst
        } else {
            Layout::SeqFirst
        };
        let mha = MultiHeadAttention::from_state_dict(config, case.params.clone()).unwrap();
        let need_weights = match (need, average) {
            (false, _) => NeedWeights::No,
            (true, true) => NeedWeights::Averaged,
            (true, false) => NeedWeights::PerHead,
        };
        let options = MhaOptions {
            attn_mask: case.score_mask("attn_mask"),
            key_padding: case.key_padding("key_padding_mask"),
            is_causal,
            need_weights,
        };
        let (query, _) = case.sequence("query", layout);
        for par in [Par::Seq, Par::Rayon] {
            let result = if case.self_attention {
                mha.forward_self(query, &options, par)
            } else {
                let (key, _) = case.sequence("key", layout);
                let (value, _) = case.sequence("value", layout);
                mha.forward(query, key, value, &options, par)
            };
            let result = match result {
                Ok(result) => result,
                Err(e) => {
                    failures.push(format!("{}: {e}", case.name));
                    break;
                }
            };
            let error = case.error("output", &result.output);
            eprintln!("{}: output error {error:.2e}", case.name);
            if error > TOLERANCE {
                failures.push(format!("{}: output error {error:e}", case.name));
            }
            match (&result.weights, case.expected.contains_key("attn_weights")) {
                (Some(weights), true) => {
                    let error = case.error("attn_weights", weights);
                    eprintln!("{}: weights error {error:.2e}", case.name);
                    if error > TOLERANCE {
                        failures.push(format!("{}: weights error {error:e}", case.name));
                    }
                }
                (None, false) => {}
                (got, want) => failures.push(format!(
                    "{}: weights returned {}, expected {want}",
                    case.name,
                    got.is_some()
                )),
            }
        }
        fused_cases += case.self_attention as usize;
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(fused_cases >= 5, "only {fused_cases} cases take the fused path");
}
