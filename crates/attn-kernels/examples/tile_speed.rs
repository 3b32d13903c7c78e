//! Dev tool: GFLOP/s of the flash tile micro-kernel on one core, best of many short runs (the
//! best run is the one the machine's neighbours disturbed least), with `a`'s rows a stride the
//! kernel takes as a constant (64 or 128, the query tiles' `D`, or `SCORES_LD` = 272, the
//! probabilities') and 8 floats further apart, a stride it reads at run time. The two strides
//! also lay `a` out differently in the cache, so the comparison is rough; `bench_ab.py` on
//! `attn bench sdpa` is the measurement that counts. `cargo run --release -p attn-kernels
//! --example tile_speed`
fn main() {
    for (rows, n, depth, constant) in [
        (64, 256, 64, 64),
        (64, 64, 256, 272),
        (64, 128, 64, 64),
        (64, 128, 128, 128),
    ] {
        let flops = 2.0 * (rows * n * depth) as f64;
        let run_time = attn_kernels::__tile_gemm_min_seconds(rows, n, depth, constant + 8, 300);
        let fixed = attn_kernels::__tile_gemm_min_seconds(rows, n, depth, constant, 300);
        println!(
            "[{rows}, {depth}] · [{depth}, {n}]: {:.1} GFLOP/s with a's stride {constant} (a constant), {:.1} with {} (read at run time)",
            flops / fixed / 1e9,
            flops / run_time / 1e9,
            constant + 8
        );
    }
}
