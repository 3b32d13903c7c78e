//! `sdpa_backward` against PyTorch autograd in float64, on the golden cases of
//! `xtask/python/gen_sdpa_fixtures.py` (the same files `attn sdpa --backward` is tested on, so
//! a bug here fails this crate's tests, not only the CLI's).

use std::path::PathBuf;

use attn_core::kernels::{Causal, Par, View4};
use attn_core::{sdpa, sdpa_backward, BoolMeaning, ScoreMask, SdpaOptions};
use safetensors::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../attn-cli/tests/fixtures/sdpa")
}

fn floats(file: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = file.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

fn shape4(shape: &[usize]) -> [usize; 4] {
    shape.try_into().unwrap()
}

/// As in the CLI's test: 4.2e-7 measured for scores of order 1 (bound 1e-5), 5.6e-5 for
/// `large_logits`, whose scores near 1e3 carry their f32 rounding into the probabilities.
fn tolerance(name: &str) -> f64 {
    if name == "large_logits" {
        2e-4
    } else {
        1e-5
    }
}

#[test]
fn sdpa_backward_matches_pytorch_autograd() {
    let manifest: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap();
    assert!(manifest.len() >= 20, "fixtures missing: run `cargo xtask codegen`");
    for (name, flags) in &manifest {
        let flags: Vec<&str> = flags.as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        let flag = |key: &str| flags.iter().position(|f| *f == key).map(|i| flags[i + 1]);
        let causal = match flag("--causal") {
            None => Causal::None,
            Some("top-left") => Causal::TopLeft,
            Some(_) => Causal::BottomRight,
        };
        let scale = flag("--scale").map(|s| s.parse::<f32>().unwrap());
        let input = std::fs::read(fixtures().join(format!("{name}.backward.in.safetensors"))).unwrap();
        let input = SafeTensors::deserialize(&input).unwrap();
        let want = std::fs::read(fixtures().join(format!("{name}.backward.want.safetensors"))).unwrap();
        let want = SafeTensors::deserialize(&want).unwrap();
        let (q_shape, q) = floats(&input, "q");
        let (k_shape, k) = floats(&input, "k");
        let (v_shape, v) = floats(&input, "v");
        let (dout_shape, dout) = floats(&input, "grad.out");
        let bool_mask: Vec<bool>;
        let float_mask: (Vec<usize>, Vec<f32>);
        let mask_shape: Vec<usize>;
        let mask = match input.tensor("mask") {
            Err(_) => ScoreMask::None,
            Ok(t) if t.dtype() == Dtype::BOOL => {
                bool_mask = t.data().iter().map(|&b| b != 0).collect();
                mask_shape = t.shape().to_vec();
                ScoreMask::Bool {
                    data: &bool_mask,
                    shape: &mask_shape,
                    meaning: BoolMeaning::MayAttend,
                }
            }
            Ok(_) => {
                float_mask = floats(&input, "mask");
                ScoreMask::Additive {
                    data: &float_mask.1,
                    shape: &float_mask.0,
                }
            }
        };
        let options = SdpaOptions {
            scale,
            causal,
            mask,
            ..Default::default()
        };
        let (qv, kv, vv) = (
            View4::contiguous(&q, shape4(&q_shape)).unwrap(),
            View4::contiguous(&k, shape4(&k_shape)).unwrap(),
            View4::contiguous(&v, shape4(&v_shape)).unwrap(),
        );
        let forward = sdpa(qv, kv, vv, &options, Par::Rayon).unwrap();
        let dout = View4::contiguous(&dout, shape4(&dout_shape)).unwrap();
        let grads = sdpa_backward(qv, kv, vv, &forward, dout, &options, Par::Rayon).unwrap();
        for (tensor, got) in [("grad.q", &grads.dq), ("grad.k", &grads.dk), ("grad.v", &grads.dv)] {
            let (_, expected) = floats(&want, tensor);
            assert_eq!(got.len(), expected.len(), "{name}: {tensor}");
            let largest = expected.iter().fold(1.0f64, |m, &w| m.max((w as f64).abs()));
            let error = got
                .iter()
                .zip(&expected)
                .map(|(&g, &w)| (g as f64 - w as f64).abs() / largest)
                .fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
            assert!(
                error <= tolerance(name),
                "{name}: {tensor} error {error:e} of the largest gradient"
            );
        }
    }
}
