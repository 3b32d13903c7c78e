//! `MultiHeadAttention::backward` against PyTorch autograd in float64 (`nn.MultiheadAttention`
//! in training mode, dropout 0), on the `mha_*` cases `attn run --backward` is tested on
//! (`crates/attn-cli/tests/fixtures/modules`, written by `gen_module_fixtures.py`): every
//! parameter's gradient under its state-dict name and the gradients of query, key and value,
//! with masks, key padding, `add_bias_kv`, `add_zero_attn`, `kdim`/`vdim`, both layouts,
//! unbatched inputs and a query row with nothing to attend to.

use std::path::PathBuf;

use attn_core::kernels::Par;
use attn_core::{Grads, Layout, MhaConfig, MhaInputs, MhaOptions, MultiHeadAttention, NeedWeights, ParamPath};

mod golden;

/// Measured at most 2.0e-6 of the largest gradient at avx512 (1.9e-6 at avx2, 2.2e-6 scalar),
/// the fused self-attention path included; the bound is about 10× that, below the 1e-4 the
/// issue asks for. A dropped bias gradient or a lost mask term gives 1e-2 and more.
const TOLERANCE: f64 = 2e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../attn-cli/tests/fixtures/modules")
}

#[test]
fn multi_head_attention_backward_matches_pytorch_autograd() {
    let names: Vec<String> = golden::module_case_names(&fixtures())
        .into_iter()
        .filter(|n| n.starts_with("mha_"))
        .collect();
    assert!(names.len() >= 16, "{names:?}");
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for name in &names {
        let mut case = golden::load_backward(&fixtures(), name);
        let need = golden::take_flag(&mut case.config, "need_weights", true);
        let average = golden::take_flag(&mut case.config, "average_attn_weights", true);
        let is_causal = golden::take_flag(&mut case.config, "is_causal", false);
        assert_eq!(case.config.remove("module"), Some("multihead_attention".into()));
        let config: MhaConfig = serde_json::from_value(case.config.clone().into()).unwrap();
        let layout = Layout::from_batch_first(config.batch_first);
        let mha = MultiHeadAttention::from_state_dict(config, case.params.clone()).unwrap();
        let options = MhaOptions {
            attn_mask: case.score_mask("attn_mask"),
            key_padding: case.key_padding("key_padding_mask"),
            is_causal,
            need_weights: match (need, average) {
                (false, _) => NeedWeights::No,
                (true, true) => NeedWeights::Averaged,
                (true, false) => NeedWeights::PerHead,
            },
        };
        let (query, _) = case.sequence("query", layout);
        let (key, _) = case.sequence("key", layout);
        let (value, _) = case.sequence("value", layout);
        let d_output = case.f32("grad.output");
        // Each file tensor its own input (cross-attention path), and, where the three hold the
        // same values, one input through the fused self-attention path.
        let same = query.data == key.data && query.data == value.data;
        let mut paths = vec![Some((key, value))];
        if same {
            paths.push(None);
        }
        for key_value in paths {
            let inputs = MhaInputs {
                query,
                key_value,
                options,
                packing: None,
            };
            let mut runs = Vec::new();
            for par in [Par::Seq, Par::Rayon] {
                let (_, tape) = mha.forward_train(&inputs, par).unwrap();
                let mut grads = Grads::new();
                let d = mha
                    .backward(&inputs, &tape, d_output, &mut grads, &ParamPath::ROOT, par)
                    .unwrap();
                runs.push((d, grads));
            }
            let (d, grads) = &runs[0];
            let (d_par, grads_par) = &runs[1];
            assert_eq!(d.query, d_par.query, "{name}: thread count changed d_query");
            for (n, t) in grads.iter() {
                assert_eq!(
                    t.data(),
                    grads_par.get(n).unwrap().data(),
                    "{name}: thread count changed {n}"
                );
            }
            let path = if key_value.is_some() { "cross" } else { "self" };
            let mut check = |what: String, error: f64| {
                worst = worst.max(error);
                if error > TOLERANCE {
                    failures.push(format!("{name} ({path}): {what} error {error:.2e}"));
                }
            };
            match (&d.key, &d.value) {
                (Some(dk), Some(dv)) => {
                    check("grad.query".into(), case.grad_error("grad.query", &d.query));
                    check("grad.key".into(), case.grad_error("grad.key", dk));
                    check("grad.value".into(), case.grad_error("grad.value", dv));
                }
                _ => {
                    // One tensor: its gradient is the sum of the three.
                    let sum: Vec<f32> = ["grad.query", "grad.key", "grad.value"]
                        .iter()
                        .map(|n| &case.expected[*n].1)
                        .fold(vec![0.0f32; d.query.len()], |acc, g| {
                            acc.iter().zip(g).map(|(a, b)| a + b).collect()
                        });
                    check(
                        "grad.query (= q + k + v)".into(),
                        golden::relative_to_largest(&d.query, &sum),
                    );
                }
            }
            let want: Vec<&String> = case
                .expected
                .keys()
                .filter(|k| !["grad.query", "grad.key", "grad.value"].contains(&k.as_str()))
                .collect();
            let got: Vec<String> = grads.iter().map(|(n, _)| format!("grad.{n}")).collect();
            assert_eq!(
                got.iter().collect::<Vec<_>>(),
                want,
                "{name}: parameter gradients by name"
            );
            for (n, t) in grads.iter() {
                check(format!("grad.{n}"), case.grad_error(&format!("grad.{n}"), t.data()));
            }
        }
    }
    eprintln!("worst gradient error {worst:.2e} over {} cases", names.len());
    assert!(failures.is_empty(), "{failures:#?}");
}
