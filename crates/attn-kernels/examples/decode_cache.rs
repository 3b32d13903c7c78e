//! Dev tool: decoding (or a short prefill) from a bf16 KV cache against an f32 one, in f32 and
//! in bf16, through the library (`attention_bf16_kv` on the bits, `attention` on the f32
//! values). S query rows per head (1 unless given: decoding), H 32, G 8, D 128, T keys (16384
//! unless given), 2 threads; the four cases alternated in each round, each the median of 15
//! calls. In bf16 on a CPU without bf16 instructions the library runs its f32 fallback (rounded
//! operands).
//! `cargo run --release -p attn-kernels --example decode_cache -- [ROUNDS] [T] [S]`
use attn_kernels::{
    attention, attention_bf16_kv, bf16_to_f32, f32_to_bf16, AttentionOptions, ForwardInputs, Par, Precision, View4,
    ViewMut4,
};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut number = |default: usize| -> Result<usize, String> {
        match args.next() {
            None => Ok(default),
            Some(a) => a
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("expected a positive number, got {a:?}")),
        }
    };
    let (rounds, t, s) = (number(5)?, number(16384)?, number(1)?);
    let (h, g, d) = (32, 8, 128);
    let q: Vec<f32> = (0..h * s * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let k: Vec<u16> = (0..g * t * d).map(|i| f32_to_bf16((i as f32 * 0.11).cos())).collect();
    let v: Vec<u16> = (0..g * t * d).map(|i| f32_to_bf16((i as f32 * 0.07).sin())).collect();
    let (kf, vf): (Vec<f32>, Vec<f32>) = (
        k.iter().map(|&x| bf16_to_f32(x)).collect(),
        v.iter().map(|&x| bf16_to_f32(x)).collect(),
    );
    let qv = View4::contiguous(&q, [1, h, s, d])?;
    let (kb, vb) = (
        View4::contiguous(&k, [1, g, t, d])?,
        View4::contiguous(&v, [1, g, t, d])?,
    );
    let values = ForwardInputs::new(
        qv,
        View4::contiguous(&kf, [1, g, t, d])?,
        View4::contiguous(&vf, [1, g, t, d])?,
    );
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    let mut out = vec![0.0f32; h * s * d];
    println!(
        "H {h} G {g} S {s} T {t} D {d}, 2 threads, SIMD {:?}, bf16 {:?}; median ms of 15 calls",
        attn_kernels::simd_level(),
        attn_kernels::bf16_level()
    );
    let cases = [
        ("f32, bf16 cache", Precision::F32, true),
        ("f32, f32 cache", Precision::F32, false),
        ("bf16, bf16 cache", Precision::Bf16, true),
        ("bf16, f32 cache", Precision::Bf16, false),
    ];
    for round in 0..rounds {
        let mut line = format!("round {round}:");
        for (name, precision, bits) in cases {
            let options = AttentionOptions {
                precision,
                ..Default::default()
            };
            let mut times = Vec::new();
            for _ in 0..15 {
                let o = ViewMut4::contiguous(&mut out, [1, h, s, d])?;
                let start = Instant::now();
                pool.install(|| {
                    if bits {
                        attention_bf16_kv(o, None, qv, kb, vb, &options, Par::Rayon)
                    } else {
                        attention(o, None, values, &options, Par::Rayon)
                    }
                })?;
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            line += &format!("  {name} {:.2}", times[times.len() / 2]);
        }
        println!("{line}");
    }
    Ok(())
}
