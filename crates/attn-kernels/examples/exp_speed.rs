//! Dev tool: nanoseconds per element of the vectorised `exp(x - m)` and sum over score rows of
//! 128, 256 (one key block) and 4096 floats, best of many short runs. `cargo run --release -p
//! attn-kernels --example exp_speed`
fn main() {
    for len in [128usize, 256, 4096] {
        let mut row = vec![0.0f32; len];
        let calls = (128_000 / len).max(1);
        let mut best = f64::INFINITY;
        for _ in 0..300 {
            for (i, x) in row.iter_mut().enumerate() {
                *x = -((i % 128) as f32) * 0.01;
            }
            let t0 = std::time::Instant::now();
            let mut sum = 0.0;
            for _ in 0..calls {
                sum += attn_kernels::__exp_sub_sum(&mut row, 0.001);
            }
            std::hint::black_box(sum);
            best = best.min(t0.elapsed().as_secs_f64() / (calls * len) as f64);
        }
        println!(
            "exp_sub_sum, rows of {len}: {:.3} ns per element ({})",
            best * 1e9,
            attn_kernels::simd_level()
        );
    }
}
