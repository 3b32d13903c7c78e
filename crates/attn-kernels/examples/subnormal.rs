//! Do subnormal numbers slow the kernels? Times each path on ordinary inputs and on the same
//! inputs made subnormal, interleaved, and prints the median time of each and their ratio.
//!
//! `cargo run --release -p attn-kernels --example subnormal [ROUNDS]`
//!
//! Three inputs per path: ordinary values in [-1, 1); values, keys and queries scaled into
//! the subnormal range (|x| < 1.2e-38, so every product and sum is subnormal or zero); and
//! ordinary q, k with subnormal values (the weighted sum `p·v` accumulates subnormals).
use attn_kernels::testing::random_vec;
use attn_kernels::{attention_unfused, flash_attention, AttentionOptions, Causal, ForwardInputs, Par, View4, ViewMut4};
use std::time::Instant;

/// A named `(q, k, v)`.
type Input<'a> = (&'a str, &'a [f32], &'a [f32], &'a [f32]);

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(15);
    let (b, h, s, t, d) = (2, 8, 512, 512, 64);
    let q = random_vec(b * h * s * d, 1);
    let k = random_vec(b * h * t * d, 2);
    let v = random_vec(b * h * t * d, 3);
    let tiny = |x: &[f32]| x.iter().map(|&e| e * 1e-39).collect::<Vec<f32>>();
    let (tq, tk, tv) = (tiny(&q), tiny(&k), tiny(&v));
    assert!(tv.iter().any(|x| x.is_subnormal()), "the scaled inputs are subnormal");
    let inputs: [Input<'_>; 3] = [
        ("ordinary", &q, &k, &v),
        ("all subnormal", &tq, &tk, &tv),
        ("subnormal values", &q, &k, &tv),
    ];
    let mut out = vec![0.0f32; b * h * s * d];
    println!(
        "[{b}, {h}, {s}, {d}] x T={t}, {} threads, {}, median of {rounds} interleaved rounds",
        rayon::current_num_threads(),
        attn_kernels::simd_level()
    );
    println!("| path | input | median ms | ratio to ordinary |");
    println!("|---|---|---|---|");
    for (path, causal, fused) in [
        ("flash", Causal::None, true),
        ("flash causal", Causal::TopLeft, true),
        ("unfused", Causal::None, false),
    ] {
        let options = AttentionOptions {
            causal,
            ..Default::default()
        };
        let mut times = vec![Vec::new(); inputs.len()];
        for round in 0..=rounds {
            for (i, (_, q, k, v)) in inputs.iter().enumerate() {
                let qv = View4::contiguous(q, [b, h, s, d]).unwrap();
                let kv = View4::contiguous(k, [b, h, t, d]).unwrap();
                let vv = View4::contiguous(v, [b, h, t, d]).unwrap();
                let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).unwrap();
                let t0 = Instant::now();
                if fused {
                    flash_attention(o, None, ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).unwrap();
                } else {
                    attention_unfused(o, None, ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).unwrap();
                }
                // Round 0 warms up.
                if round > 0 {
                    times[i].push(t0.elapsed().as_secs_f64());
                }
                std::hint::black_box(&out);
            }
        }
        let base = median(times[0].clone());
        for (i, (input, ..)) in inputs.iter().enumerate() {
            let m = median(times[i].clone());
            println!("| {path} | {input} | {:.2} | {:.2} |", m * 1e3, m / base);
        }
    }
}
