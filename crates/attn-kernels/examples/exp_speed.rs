//! Dev tool: nanoseconds per element of the vectorised `exp(x - m)` and sum over a 128-wide
//! score row (one key block), best of many short runs. `cargo run --release -p attn-kernels
//! --example exp_speed`
fn main() {
    let mut row = vec![0.0f32; 128];
    let mut best = f64::INFINITY;
    for _ in 0..300 {
        for (i, x) in row.iter_mut().enumerate() {
            *x = -(i as f32) * 0.01;
        }
        let t0 = std::time::Instant::now();
        let mut sum = 0.0;
        for _ in 0..1000 {
            sum += attn_kernels::__exp_sub_sum(&mut row, 0.001);
        }
        std::hint::black_box(sum);
        best = best.min(t0.elapsed().as_secs_f64() / 1000.0 / 128.0);
    }
    println!(
        "exp_sub_sum: {:.3} ns per element ({})",
        best * 1e9,
        attn_kernels::simd_level()
    );
}
