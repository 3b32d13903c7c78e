//! Dev tool: is a weight still in cache right after AdamW updated it? The premise of the bf16
//! update's repacking (`AdamW::update_each`). 22 tensors of 4 MB (88 MB of weights, about the
//! d_model 512 training model's, with gradients and both moments beside them), 2 threads:
//! "whole" runs `adamw_update` over every tensor, then reads every weight (a vectorised sum, as
//! a packing reads it); "each" updates one tensor and reads it before the next. Prints, per
//! round, the update's time and the reads' rate for both.
//! `cargo run --release -p attn-kernels --example read_after_update`
use attn_kernels::{adamw_update, AdamWStep};
use rayon::prelude::*;
use std::time::Instant;

const CHUNK: usize = 1 << 14;

/// The sum of `x`, on rayon's threads: a read of every value.
fn read(x: &[f32]) -> f32 {
    x.par_chunks(CHUNK)
        .map(|c| {
            let mut s = [0.0f32; 16];
            for lanes in c.chunks_exact(16) {
                for i in 0..16 {
                    s[i] += lanes[i];
                }
            }
            s.iter().sum::<f32>()
        })
        .sum()
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let (per, count) = (1usize << 20, 22);
    let n = per * count;
    let (mut p, g, mut m, mut v) = (vec![0.5f32; n], vec![0.01f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let c = AdamWStep {
        b1: 0.9,
        b2: 0.98,
        eps: 1e-9,
        bias2_sqrt: 0.2,
        step_size: 1e-4,
        decay: 0.9999,
    };
    let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((x, g), m), v)| adamw_update(c, x, g, m, v).expect("equal lengths"));
    };
    let gb = (n * 4) as f64 / 1e9;
    pool.install(|| {
        let mut sink = 0.0f32;
        for round in 0..7 {
            let t0 = Instant::now();
            update(&mut p, &g, &mut m, &mut v);
            let t1 = Instant::now();
            (0..count).for_each(|k| sink += read(&p[k * per..(k + 1) * per]));
            let (whole_update, whole_read) = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
            let (mut each_update, mut each_read) = (0.0, 0.0);
            for k in 0..count {
                let r = k * per..(k + 1) * per;
                let t0 = Instant::now();
                update(&mut p[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r.clone()]);
                let t1 = Instant::now();
                sink += read(&p[r]);
                each_update += (t1 - t0).as_secs_f64();
                each_read += t1.elapsed().as_secs_f64();
            }
            println!(
                "round {round}: update whole {:.1} ms, each {:.1} ms; read after: whole {:.1} GB/s, each {:.1} GB/s",
                whole_update * 1e3,
                each_update * 1e3,
                gb / whole_read,
                gb / each_read
            );
        }
        // Keeps the reads from being optimised away.
        assert!(sink.is_finite());
    });
}
