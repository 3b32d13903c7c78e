//! Dev tool: GFLOP/s of the flash tile micro-kernel on one core, best of many short runs (the
//! best run is the one the machine's neighbours disturbed least). `cargo run --release -p
//! attn-kernels --example tile_speed`
fn main() {
    for (rows, n, depth) in [(64, 128, 64), (64, 64, 128), (64, 128, 128)] {
        let t = attn_kernels::__tile_gemm_min_seconds(rows, n, depth, 300);
        println!(
            "[{rows}, {depth}] · [{depth}, {n}]: {:.1} GFLOP/s",
            2.0 * (rows * n * depth) as f64 / t / 1e9
        );
    }
}
