//! Benchmarks of the kernels (divan): flash against unfused attention, and faer's GEMM.
//!
//! `cargo bench -p attn-kernels` (or `cargo xtask bench` for the interleaved comparison tables of
//! docs/PERFORMANCE.md). Timings live here, never in tests.

use attn_kernels::{
    attention_unfused, flash_attention, gemm, Accum, AttentionOptions, Causal, ForwardInputs, Par, View2, View4,
    ViewMut2, ViewMut4,
};

fn main() {
    divan::main();
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
        .collect()
}

/// `[1, 8, S, 64]` self-attention, flash or unfused, causal or not.
fn attention(bencher: divan::Bencher, seq: usize, unfused: bool, causal: bool) {
    let shape = [1, 8, seq, 64];
    let n = shape.iter().product();
    let (q, k, v) = (data(n, 1), data(n, 2), data(n, 3));
    let mut out = vec![0.0f32; n];
    let options = AttentionOptions {
        causal: if causal { Causal::TopLeft } else { Causal::None },
        ..Default::default()
    };
    let flops = 4 * 8 * seq * seq * 64 / if causal { 2 } else { 1 };
    bencher.counter(divan::counter::ItemsCount::new(flops)).bench_local(|| {
        let (qv, kv, vv) = (
            View4::contiguous(&q, shape).unwrap(),
            View4::contiguous(&k, shape).unwrap(),
            View4::contiguous(&v, shape).unwrap(),
        );
        let o = ViewMut4::contiguous(&mut out, shape).unwrap();
        if unfused {
            attention_unfused(o, None, ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).unwrap();
        } else {
            flash_attention(o, None, ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).unwrap();
        }
    });
}

#[divan::bench(args = [256, 1024, 2048])]
fn flash(bencher: divan::Bencher, seq: usize) {
    attention(bencher, seq, false, false);
}

#[divan::bench(args = [256, 1024, 2048])]
fn flash_causal(bencher: divan::Bencher, seq: usize) {
    attention(bencher, seq, false, true);
}

#[divan::bench(args = [256, 1024, 2048])]
fn unfused(bencher: divan::Bencher, seq: usize) {
    attention(bencher, seq, true, false);
}

#[divan::bench(args = [256, 1024])]
fn gemm_square(bencher: divan::Bencher, n: usize) {
    let (a, b) = (data(n * n, 1), data(n * n, 2));
    let mut c = vec![0.0f32; n * n];
    bencher
        .counter(divan::counter::ItemsCount::new(2 * n * n * n))
        .bench_local(|| {
            gemm(
                ViewMut2::contiguous(&mut c, [n, n]).unwrap(),
                Accum::Replace,
                View2::contiguous(&a, [n, n]).unwrap(),
                View2::contiguous(&b, [n, n]).unwrap(),
                1.0,
                Par::Rayon,
            )
            .unwrap();
        });
}
