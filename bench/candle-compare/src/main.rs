//! Times `candle_nn::attention::flash_attn` (candle's CPU flash attention) on one shape and prints
//! `{"median_s": ..., "min_s": ..., "runs": ...}`: the candle side of `cargo xtask bench --candle`.
//!
//! Usage: candle-compare B H S D CAUSAL(0|1) THREADS

use candle_core::{Device, Tensor};
use candle_nn::attention::{flash_attn, AttnMask};

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let [b, h, s, d, causal, threads] = args[..] else { panic!("usage: candle-compare B H S D CAUSAL THREADS") };
    rayon_threads(threads);
    let device = Device::Cpu;
    // candle's layout: (B, S, H, D).
    let q = Tensor::rand(-1f32, 1f32, (b, s, h, d), &device)?;
    let k = Tensor::rand(-1f32, 1f32, (b, s, h, d), &device)?;
    let v = Tensor::rand(-1f32, 1f32, (b, s, h, d), &device)?;
    let scale = 1.0 / (d as f32).sqrt();
    let mask = || if causal == 1 { AttnMask::causal() } else { AttnMask::None };
    flash_attn::<f32>(&q, &k, &v, scale, mask(), None, None)?;
    let mut times = Vec::new();
    let start = std::time::Instant::now();
    while times.len() < 3 || (start.elapsed().as_secs_f64() < 0.5 && times.len() < 1000) {
        let t0 = std::time::Instant::now();
        let out = flash_attn::<f32>(&q, &k, &v, scale, mask(), None, None)?;
        std::hint::black_box(out);
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!("{}", serde_json::json!({"median_s": times[times.len() / 2], "min_s": times[0], "runs": times.len()}));
    Ok(())
}

/// candle's CPU kernels use rayon's global pool.
fn rayon_threads(n: usize) {
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}
