//! The backward passes of the encoder and decoder layers, their stacks and `nn.Transformer`
//! against PyTorch autograd in float64 (training mode, dropout 0), on the cases
//! `attn run --backward` is tested on (`crates/attn-cli/tests/fixtures/modules`, written by
//! `gen_module_fixtures.py`): every parameter's gradient under its state-dict name, and the
//! gradients of `src`, `tgt` and `memory`. Pre- and post-norm, ReLU and GELU, biases on and off,
//! both layouts, unbatched inputs, masks of every kind.

use std::path::PathBuf;

use attn_core::kernels::Par;
use attn_core::{Grads, Layout, Sequence};
use attn_nn::layers::Dropout;
use attn_nn::{
    BlockMasks, Decoder, DecoderLayer, Encoder, EncoderLayer, LayerConfig, StackConfig, Step, Transformer,
    TransformerConfig, TransformerMasks,
};

#[path = "../../attn-core/tests/golden/mod.rs"]
mod golden;
use golden::Golden;

/// Measured at most 2.1e-6 of the largest gradient (avx512; avx2 and scalar alike) over these
/// cases, the three-layer stack and the two-by-two Transformer included; the bound is about 10×
/// that, below the 1e-4 the issue asks for. A norm's gradient added in the wrong place or a
/// dropped residual branch is off by 1e-1 and more.
const TOLERANCE: f64 = 2e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../attn-cli/tests/fixtures/modules")
}

fn parse<T: serde::de::DeserializeOwned>(case: &Golden) -> T {
    serde_json::from_value(case.config.clone().into()).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

fn masks<'a>(case: &'a Golden, mask: &str, padding: &str, is_causal: bool) -> BlockMasks<'a> {
    BlockMasks {
        mask: case.score_mask(mask),
        key_padding: case.key_padding(padding),
        is_causal,
        packing: None,
    }
}

/// Gradients of the inputs, by their file names, and of the parameters.
type Result = (Vec<(&'static str, Vec<f32>)>, Grads);

fn run(case: &mut Golden, par: Par) -> Result {
    let module = case.config.remove("module").unwrap();
    let module = module.as_str().unwrap();
    let flag = |case: &mut Golden, name| golden::take_flag(&mut case.config, name, false);
    let mut grads = Grads::new();
    let mut step = Step::new(Dropout::NONE, par, &mut grads);
    let result = match module {
        "transformer_encoder_layer" | "transformer_encoder" => {
            let is_causal = flag(case, "is_causal");
            let case = &*case;
            let d_output = case.f32("grad.output");
            let m = masks(case, "src_mask", "src_key_padding_mask", is_causal);
            let d_src = if module == "transformer_encoder_layer" {
                let config: LayerConfig = parse(case);
                let (src, _) = case.sequence("src", Layout::from_batch_first(config.batch_first));
                let layer = EncoderLayer::from_state_dict(config, case.params.clone()).unwrap();
                let (_, tape) = layer.forward_train(src, &m, &mut step).unwrap();
                layer.backward(src, &m, &tape, d_output, &mut step).unwrap()
            } else {
                let config: StackConfig = parse(case);
                let (src, _) = case.sequence("src", Layout::from_batch_first(config.layer.batch_first));
                let stack = Encoder::from_state_dict(config, case.params.clone()).unwrap();
                let (_, tape) = stack.forward_train(src, &m, &mut step).unwrap();
                stack.backward(src, &m, &tape, d_output, &mut step).unwrap()
            };
            vec![("grad.src", d_src)]
        }
        "transformer_decoder_layer" | "transformer_decoder" => {
            let tgt_causal = flag(case, "tgt_is_causal");
            let memory_causal = flag(case, "memory_is_causal");
            let case = &*case;
            let d_output = case.f32("grad.output");
            let m = TransformerMasks {
                src: Default::default(),
                tgt: masks(case, "tgt_mask", "tgt_key_padding_mask", tgt_causal),
                memory: masks(case, "memory_mask", "memory_key_padding_mask", memory_causal),
            };
            let (d_tgt, d_memory) = if module == "transformer_decoder_layer" {
                let config: LayerConfig = parse(case);
                let layout = Layout::from_batch_first(config.batch_first);
                let (tgt, _) = case.sequence("tgt", layout);
                let (memory, _) = case.sequence("memory", layout);
                let layer = DecoderLayer::from_state_dict(config, case.params.clone()).unwrap();
                let (_, tape) = layer.forward_train(tgt, memory, &m, &mut step).unwrap();
                layer.backward(tgt, memory, &m, &tape, d_output, &mut step).unwrap()
            } else {
                let config: StackConfig = parse(case);
                let layout = Layout::from_batch_first(config.layer.batch_first);
                let (tgt, _) = case.sequence("tgt", layout);
                let (memory, _) = case.sequence("memory", layout);
                let stack = Decoder::from_state_dict(config, case.params.clone()).unwrap();
                let (_, tape) = stack.forward_train(tgt, memory, &m, &mut step).unwrap();
                stack.backward(tgt, memory, &m, &tape, d_output, &mut step).unwrap()
            };
            vec![("grad.tgt", d_tgt), ("grad.memory", d_memory)]
        }
        "transformer" => {
            let src_causal = flag(case, "src_is_causal");
            let tgt_causal = flag(case, "tgt_is_causal");
            let case = &*case;
            let config: TransformerConfig = parse(case);
            let layout = Layout::from_batch_first(config.layer.batch_first);
            let (src, _): (Sequence<'_>, _) = case.sequence("src", layout);
            let (tgt, _) = case.sequence("tgt", layout);
            let m = TransformerMasks {
                src: masks(case, "src_mask", "src_key_padding_mask", src_causal),
                tgt: masks(case, "tgt_mask", "tgt_key_padding_mask", tgt_causal),
                memory: masks(case, "memory_mask", "memory_key_padding_mask", false),
            };
            let model = Transformer::from_state_dict(config, case.params.clone()).unwrap();
            let (_, tape) = model.forward_train(src, tgt, &m, &mut step).unwrap();
            let (d_src, d_tgt) = model
                .backward(src, tgt, &m, &tape, case.f32("grad.output"), &mut step)
                .unwrap();
            vec![("grad.src", d_src), ("grad.tgt", d_tgt)]
        }
        other => panic!("{}: module {other}", case.name),
    };
    (result, grads)
}

#[test]
fn layers_stacks_and_transformer_backward_match_pytorch_autograd() {
    let names: Vec<String> = golden::module_case_names(&fixtures())
        .into_iter()
        .filter(|n| !n.starts_with("mha_"))
        .collect();
    assert!(names.len() >= 13, "{names:?}");
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for name in &names {
        let case = golden::load_backward(&fixtures(), name);
        let (inputs, grads) = run(&mut golden::load_backward(&fixtures(), name), Par::Seq);
        let (inputs_par, grads_par) = run(&mut golden::load_backward(&fixtures(), name), Par::Rayon);
        for ((n, a), (_, b)) in inputs.iter().zip(&inputs_par) {
            assert_eq!(a, b, "{name}: the thread count changed {n}");
        }
        let mut check = |what: String, error: f64| {
            worst = worst.max(error);
            if error > TOLERANCE {
                failures.push(format!("{name}: {what} error {error:.2e}"));
            }
        };
        for (n, got) in &inputs {
            check(n.to_string(), case.grad_error(n, got));
        }
        let mut want: Vec<&String> = case.expected.keys().collect();
        want.retain(|k| !inputs.iter().any(|(n, _)| n == k));
        let got: Vec<String> = grads.iter().map(|(n, _)| format!("grad.{n}")).collect();
        assert_eq!(
            got.iter().collect::<Vec<_>>(),
            want,
            "{name}: parameter gradients by name"
        );
        for (n, t) in grads.iter() {
            assert_eq!(
                t.data(),
                grads_par.get(n).unwrap().data(),
                "{name}: the thread count changed {n}"
            );
            check(format!("grad.{n}"), case.grad_error(&format!("grad.{n}"), t.data()));
        }
    }
    eprintln!("worst gradient error {worst:.2e} over {} cases", names.len());
    assert!(failures.is_empty(), "{failures:#?}");
}
