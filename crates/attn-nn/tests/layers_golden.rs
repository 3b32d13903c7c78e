//! attn-nn's layers, stacks and models against PyTorch: golden files (`tests/fixtures`, written by
//! `cargo xtask codegen` from `nn.TransformerEncoderLayer`, `nn.TransformerDecoderLayer`, their
//! stacks, `nn.Transformer` and a tiny random `transformers.BertModel`). The cases cover both norm
//! orders, both activations, biases on and off, masks of every kind, and layer-norm epsilons
//! other than the default, so a layer that ignores its configured epsilon fails here.

use std::path::Path;

use attn_core::kernels::Par;
use attn_core::{Layout, Sequence};
use attn_nn::{
    BertConfig, BertModel, BlockMasks, Decoder, DecoderLayer, Encoder, EncoderLayer, LayerConfig, StackConfig,
    Transformer, TransformerConfig,
};

#[path = "../../attn-core/tests/golden/mod.rs"]
mod golden;
use golden::Golden;

/// Largest error measured over these cases, `|got - want| / (1 + |want|)`: 1.4e-6 on AVX2+FMA
/// and 1.6e-6 on the scalar path (the BERT cases: embeddings and two or three layers). The
/// bound is about 6× that; the layer-norm epsilons of the cases (1e-4 to 0.05, against the default
/// 1e-5) move outputs by 1e-4 and more, a residual added in the wrong place or a skipped bias
/// by far more.
const TOLERANCE: f64 = 1e-5;

type Config = serde_json::Map<String, serde_json::Value>;

fn parse<T: serde::de::DeserializeOwned>(name: &str, config: &Config) -> T {
    serde_json::from_value(config.clone().into()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The self-attention masks of a block: `NAME_mask`, `NAME_key_padding_mask` (or, for the
/// stacks, the names given) and the causal flag.
fn block<'a>(case: &'a Golden, mask: &str, padding: &str, is_causal: bool) -> BlockMasks<'a> {
    BlockMasks {
        mask: case.score_mask(mask),
        key_padding: case.key_padding(padding),
        is_causal,
        packing: None,
    }
}

/// Runs one case on `par` and returns the output to compare with `expected.output` (or
/// `expected.last_hidden_state`).
fn run(case: &Golden, par: Par) -> (&'static str, Vec<f32>) {
    let mut cfg = case.config.clone();
    let module = cfg.remove("module").unwrap().as_str().unwrap().to_string();
    let causal = golden::take_flag(&mut cfg, "is_causal", false);
    let tgt_causal = golden::take_flag(&mut cfg, "tgt_is_causal", false);
    let name = case.name.as_str();
    let output = match module.as_str() {
        "transformer_encoder_layer" => {
            let layer: LayerConfig = parse(name, &cfg);
            let (src, _) = case.sequence("src", Layout::from_batch_first(layer.batch_first));
            let module = EncoderLayer::from_state_dict(layer, case.params.clone()).unwrap();
            module.forward(src, &block(case, "src_mask", "src_key_padding_mask", causal), par)
        }
        "transformer_encoder" => {
            let stack: StackConfig = parse(name, &cfg);
            let (src, _) = case.sequence("src", Layout::from_batch_first(stack.layer.batch_first));
            let module = Encoder::from_state_dict(stack, case.params.clone()).unwrap();
            module.forward(src, &block(case, "src_mask", "src_key_padding_mask", causal), par)
        }
        "transformer_decoder_layer" | "transformer_decoder" => {
            let stack: Option<StackConfig> = (module == "transformer_decoder").then(|| parse(name, &cfg));
            let layer: LayerConfig = stack.as_ref().map_or_else(|| parse(name, &cfg), |s| s.layer.clone());
            let (tgt, _) = case.sequence("tgt", Layout::from_batch_first(layer.batch_first));
            let (memory, _) = case.sequence("memory", Layout::from_batch_first(layer.batch_first));
            let tgt_masks = block(case, "tgt_mask", "tgt_key_padding_mask", tgt_causal);
            let memory_masks = block(case, "memory_mask", "memory_key_padding_mask", false);
            match stack {
                Some(stack) => Decoder::from_state_dict(stack, case.params.clone()).unwrap().forward(
                    tgt,
                    memory,
                    &tgt_masks,
                    &memory_masks,
                    par,
                ),
                None => DecoderLayer::from_state_dict(layer, case.params.clone())
                    .unwrap()
                    .forward(tgt, memory, &tgt_masks, &memory_masks, par),
            }
        }
        "transformer" => {
            let config: TransformerConfig = parse(name, &cfg);
            let layout = Layout::from_batch_first(config.layer.batch_first);
            let (src, _) = case.sequence("src", layout);
            let (tgt, _) = case.sequence("tgt", layout);
            let module = Transformer::from_state_dict(config, case.params.clone()).unwrap();
            module.forward(
                src,
                tgt,
                &block(case, "src_mask", "src_key_padding_mask", false),
                &block(case, "tgt_mask", "tgt_key_padding_mask", tgt_causal),
                &block(case, "memory_mask", "memory_key_padding_mask", false),
                par,
            )
        }
        "bert" => return ("last_hidden_state", run_bert(case, &cfg, par)),
        other => panic!("{}: unknown module {other}", case.name),
    };
    ("output", output.unwrap_or_else(|e| panic!("{}: {e}", case.name)))
}

/// BERT on a right-padded batch: the real tokens' hidden states (padding rows zeroed, as in the
/// fixture, since they mean nothing).
fn run_bert(case: &Golden, cfg: &Config, par: Par) -> Vec<f32> {
    let config = BertConfig::from_json(&serde_json::Value::from(cfg.clone()).to_string()).unwrap();
    let e = config.hidden_size;
    let model = BertModel::from_state_dict(config, case.params.clone()).unwrap();
    let ids: Vec<u32> = case.f32("input_ids").iter().map(|&x| x as u32).collect();
    let lengths: Vec<usize> = case.f32("lengths").iter().map(|&x| x as usize).collect();
    let (batch, len) = (lengths.len(), ids.len() / lengths.len());
    let mut states = model.hidden_states(&ids, batch, len, &lengths, par).unwrap();
    for (row, chunk) in states.chunks_mut(e).enumerate() {
        if row % len >= lengths[row / len] {
            chunk.fill(0.0);
        }
    }
    states
}

#[test]
fn layers_stacks_and_models_match_pytorch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cases = golden::load_all(&dir);
    let mut kinds = std::collections::BTreeSet::new();
    for case in cases {
        kinds.insert(case.config["module"].as_str().unwrap().to_string());
        let (name, seq) = run(&case, Par::Seq);
        let error = case.error(name, &seq);
        eprintln!("{}: error {error:.2e}", case.name);
        assert!(error <= TOLERANCE, "{}: error {error:e}", case.name);
        // The parallel path gives the same bits.
        let (_, parallel) = run(&case, Par::Rayon);
        assert_eq!(seq, parallel, "{}: Par::Seq and Par::Rayon differ", case.name);
    }
    let all = [
        "bert",
        "transformer",
        "transformer_decoder",
        "transformer_decoder_layer",
        "transformer_encoder",
        "transformer_encoder_layer",
    ];
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), all);
}

/// A layer's `batch_first` is honoured or refused, never ignored: an input laid out the other
/// way fails with an error naming `batch_first` (the decoder's attention modules check alike).
#[test]
fn layers_refuse_inputs_laid_out_against_batch_first() {
    let x = vec![0.5f32; 2 * 3 * 8];
    for batch_first in [true, false] {
        let mut config = LayerConfig::new(8, 2);
        config.dim_feedforward = 16;
        config.batch_first = batch_first;
        let wrong = Sequence {
            data: &x,
            batch: 2,
            len: 3,
            dim: 8,
            layout: Layout::from_batch_first(!batch_first),
        };
        let right = Sequence {
            layout: Layout::from_batch_first(batch_first),
            ..wrong
        };
        let encoder = EncoderLayer::with_seed(config.clone(), 1).unwrap();
        let err = encoder.forward(wrong, &BlockMasks::default(), Par::Seq).unwrap_err();
        assert!(err.to_string().contains("batch_first"), "{err}");
        encoder.forward(right, &BlockMasks::default(), Par::Seq).unwrap();
    }
}

/// `TransformerConfig` is a `LayerConfig` plus the depths, read flat as PyTorch's keyword
/// arguments, with `nn.Transformer`'s defaults; unknown and out-of-domain fields are named.
#[test]
fn transformer_config_is_a_layer_config_and_depths() {
    let config: TransformerConfig = serde_json::from_str(r#"{"num_encoder_layers": 2, "norm_first": true}"#).unwrap();
    assert_eq!((config.layer.d_model, config.layer.nhead), (512, 8));
    assert_eq!((config.num_encoder_layers, config.num_decoder_layers), (2, 6));
    assert_eq!(config.layer.dim_feedforward, 2048);
    assert!(config.layer.norm_first);
    let err = serde_json::from_str::<TransformerConfig>(r#"{"nheads": 2}"#).unwrap_err();
    assert!(err.to_string().contains("nheads"), "{err}");
    let err = serde_json::from_str::<TransformerConfig>(r#"{"num_decoder_layers": -1}"#).unwrap_err();
    assert!(err.to_string().contains("num_decoder_layers"), "{err}");
    let mut layer = LayerConfig::new(16, 5);
    let err = layer.validate().unwrap_err().to_string();
    assert!(err.contains("`nhead` is 5") && err.contains("d_model = 16"), "{err}");
    layer.nhead = 4;
    layer.validate().unwrap();
}
