//! `AdamW`, `clip_grad_norm` and the noam `Schedule` against three steps of
//! `torch.optim.AdamW` + `clip_grad_norm_` + `LambdaLR` (`gen_crate_fixtures.py`,
//! `optim/adamw.safetensors`).

use std::collections::BTreeMap;

use attn_nn::{clip_grad_norm, AdamW, Param, Schedule};
use safetensors::SafeTensors;

fn read() -> BTreeMap<String, Vec<f32>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optim/adamw.safetensors");
    let bytes = std::fs::read(path).expect("run `cargo xtask codegen`");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, t)| {
            let data = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, data)
        })
        .collect()
}

#[test]
fn three_steps_equal_pytorch() {
    let tensors = read();
    let names = ["layer.weight", "layer.bias", "norm.weight"];
    let mut values: Vec<Vec<f32>> = names.iter().map(|n| tensors[&format!("init.{n}")].clone()).collect();
    let mut adam = AdamW::new((0.9, 0.98), 1e-8, 0.05).unwrap();
    let schedule = Schedule::Noam { d_model: 16, warmup: 2 };
    for step in 0..3 {
        let mut grads: Vec<Vec<f32>> = names
            .iter()
            .map(|n| tensors[&format!("grad.{step}.{n}")].clone())
            .collect();
        let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
        let norm = clip_grad_norm(&mut refs, 0.5);
        let want_norm = tensors[&format!("norm.{step}")][0];
        assert!(
            (norm - want_norm).abs() <= 1e-6 * want_norm,
            "step {step}: norm {norm} vs {want_norm}"
        );
        let lr = 3e-2 * schedule.factor(step as u64 + 1);
        let want_lr = tensors[&format!("lr.{step}")][0];
        assert!(
            (lr - want_lr).abs() <= 1e-7 * want_lr,
            "step {step}: lr {lr} vs {want_lr}"
        );
        let mut params: Vec<Param<'_>> = names
            .iter()
            .zip(values.iter_mut())
            .zip(&grads)
            .map(|((name, value), grad)| Param { name, value, grad })
            .collect();
        adam.step(&mut params, lr).unwrap();
        for (name, value) in names.iter().zip(&values) {
            let want = &tensors[&format!("after.{step}.{name}")];
            for (i, (&got, &w)) in value.iter().zip(want).enumerate() {
                // f32 arithmetic in PyTorch's order: measured at most 1 ulp apart.
                assert!(
                    (got - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "step {step} {name}[{i}]: {got} vs {w}"
                );
            }
        }
    }
    assert_eq!(adam.steps(), 3);
}

#[test]
fn bad_arguments_and_changed_sizes_are_typed_errors() {
    assert!(AdamW::new((1.0, 0.9), 1e-8, 0.0)
        .unwrap_err()
        .to_string()
        .contains("betas[0]"));
    assert!(AdamW::new((0.9, 0.9), -1.0, 0.0)
        .unwrap_err()
        .to_string()
        .contains("eps"));
    let mut adam = AdamW::new((0.9, 0.999), 1e-8, 0.01).unwrap();
    let (mut w, g) = (vec![1.0f32; 4], vec![0.5f32; 4]);
    adam.step(
        &mut [Param {
            name: "w",
            value: &mut w,
            grad: &g,
        }],
        1e-3,
    )
    .unwrap();
    let mut longer = vec![1.0f32; 5];
    let err = adam
        .step(
            &mut [Param {
                name: "w",
                value: &mut longer,
                grad: &[0.0; 5],
            }],
            1e-3,
        )
        .unwrap_err();
    assert!(err.to_string().contains("as at the optimizer's earlier steps"), "{err}");
    let err = adam
        .step(
            &mut [Param {
                name: "w",
                value: &mut w,
                grad: &g[..3],
            }],
            1e-3,
        )
        .unwrap_err();
    assert!(err.to_string().contains("grad.w"), "{err}");
    assert!(adam.step(&mut [], f32::NAN).is_err());
}

#[test]
fn schedules_have_their_shapes() {
    let constant = Schedule::Constant { warmup: 4 };
    assert_eq!([1, 2, 4, 100].map(|s| constant.factor(s)), [0.25, 0.5, 1.0, 1.0]);
    let noam = Schedule::Noam {
        d_model: 64,
        warmup: 100,
    };
    // Rises until `warmup`, then falls as step^-0.5.
    assert!(noam.factor(50) < noam.factor(100) && noam.factor(400) < noam.factor(100));
    assert!((noam.factor(400) - 64f32.powf(-0.5) / 20.0).abs() < 1e-7);
    let cosine = Schedule::Cosine {
        warmup: 10,
        total: 110,
        min_factor: 0.1,
    };
    assert_eq!(cosine.factor(5), 0.5);
    assert!((cosine.factor(60) - 0.55).abs() < 1e-6);
    assert!((cosine.factor(110) - 0.1).abs() < 1e-6 && (cosine.factor(500) - 0.1).abs() < 1e-6);
}
