//! Times a training step of `attn bench train`'s larger model (d_model 512, 8 heads, 3 + 3
//! layers, feed-forward 2048, 32 pairs a step) through the library, in f32 or bf16, on any CPU:
//! `attn bench train --precision bf16` runs f32 where the CPU has no bf16 instructions, the
//! library runs the bf16 model there by its f32 fallback route. Prints one JSON line: the
//! median step, and the median of the optimizer's part of it (`Seq2Seq::update`: AdamW and,
//! in bf16, packing the weights' bf16 copies again).
//!
//! `cargo run --release -p attn-nn --example train_step_parts -- [f32|bf16] [STEPS]`
use std::time::Instant;

use attn_nn::core::Precision;
use attn_nn::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let precision = match args.next().as_deref() {
        None | Some("bf16") => Precision::Bf16,
        Some("f32") => Precision::F32,
        Some(other) => return Err(format!("the precision is {other:?}, expected f32 or bf16").into()),
    };
    let steps: u64 = match args.next() {
        None => 10,
        Some(s) => match s.parse() {
            Ok(n) if n >= 1 => n,
            _ => return Err(format!("STEPS is {s:?}, expected a whole number of at least 1").into()),
        },
    };
    // Reversed strings of 10 to 29 letters: the pairs' lengths of `attn dates`, about.
    let mut state = 1u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let sources: Vec<String> = (0..32 * 8)
        .map(|_| {
            (0..10 + next() % 20)
                .map(|_| (b'a' + (next() % 26) as u8) as char)
                .collect()
        })
        .collect();
    let targets: Vec<String> = sources.iter().map(|s| s.chars().rev().collect()).collect();
    let pairs: Vec<(&str, &str)> = sources
        .iter()
        .map(String::as_str)
        .zip(targets.iter().map(String::as_str))
        .collect();
    let mut config = Seq2SeqConfig::for_pairs(&pairs);
    config.transformer.layer = LayerConfig::new(512, 8);
    config.transformer.layer.dim_feedforward = 2048;
    config.transformer.num_encoder_layers = 3;
    config.transformer.num_decoder_layers = 3;
    let mut model = Seq2Seq::with_seed(config, 0)?;
    model.set_precision(precision)?;
    let (mut adam, mut grads) = (AdamW::new((0.9, 0.98), 1e-9, 0.01)?, model.grads());
    let (mut step_s, mut update_s) = (Vec::new(), Vec::new());
    for number in 1..=steps + 1 {
        let batch = &pairs[(number as usize % 8) * 32..][..32];
        let t0 = Instant::now();
        model.train_step(batch, &TrainStep::at(number), &mut adam, &mut grads, 1e-4)?;
        let t1 = Instant::now();
        // The update again, alone (the gradients of the step just taken).
        model.update(&mut adam, &grads, 1e-4)?;
        if number > 1 {
            step_s.push((t1 - t0).as_secs_f64());
            update_s.push(t1.elapsed().as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{{\"precision\": \"{precision:?}\", \"steps\": {steps}, \"step_median_s\": {}, \"update_median_s\": {}, \"parameters\": {}}}",
        median(&mut step_s),
        median(&mut update_s),
        model.store().layout().numel()
    );
    Ok(())
}
