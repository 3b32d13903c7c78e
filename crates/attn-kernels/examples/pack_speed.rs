//! Dev tool: how fast [`Bf16Panels::pack`] rounds and packs a weight, as mixed-precision
//! training does after every update, for a weight's `Wᵀ` (the forward's packing, a transposed
//! view) and `W` (the backward's, row-major). "cold": each call packs the next of about 100 MB
//! of weights, so every read comes from memory, as after AdamW has streamed the whole store;
//! "warm": the same weight again and again. GB/s counts 4 bytes read and 2 written per value;
//! medians of 5 and 21 runs, on 2 threads. `cargo run --release -p attn-kernels --example
//! pack_speed`
use attn_kernels::{Bf16Panels, View2};
use std::time::Instant;

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    println!("bf16 level {}", attn_kernels::bf16_level());
    pool.install(|| {
        for (rows, cols) in [(2048usize, 512usize), (512, 2048), (1536, 512), (512, 512)] {
            let count = (100 << 20) / (rows * cols * 4);
            let weights: Vec<Vec<f32>> = (0..count)
                .map(|i| (0..rows * cols).map(|j| ((i * 7 + j) % 97) as f32 * 0.01).collect())
                .collect();
            for (label, transposed) in [("Wt", true), ("W ", false)] {
                let view = |w: &[f32]| {
                    let v = if transposed {
                        View2::new(w, [cols, rows], [1, cols])
                    } else {
                        View2::contiguous(w, [rows, cols])
                    };
                    std::hint::black_box(Bf16Panels::pack(v.unwrap()));
                };
                let cold = median(
                    (0..5)
                        .map(|_| {
                            let t0 = Instant::now();
                            weights.iter().for_each(|w| view(w));
                            t0.elapsed().as_secs_f64() / count as f64
                        })
                        .collect(),
                );
                let warm = median(
                    (0..21)
                        .map(|_| {
                            let t0 = Instant::now();
                            view(&weights[0]);
                            t0.elapsed().as_secs_f64()
                        })
                        .collect(),
                );
                let bytes = (rows * cols * 6) as f64;
                println!(
                    "W [{rows}, {cols}] {label}: cold {:.3} ms ({:.1} GB/s), warm {:.3} ms ({:.1} GB/s)",
                    cold * 1e3,
                    bytes / cold / 1e9,
                    warm * 1e3,
                    bytes / warm / 1e9
                );
            }
        }
    });
}
