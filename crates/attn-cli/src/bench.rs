//! `attn bench`: timings of the kernels, as medians over repeated runs.
//!
//! Each measurement warms up once, then runs at least `min_runs` times and until `min_seconds`
//! have passed (at most 1000 runs), and reports the median and the minimum.

use std::time::Instant;

use anyhow::Result;
use attn_nn::core::kernels::{
    attention_unfused, flash_attention, gemm, simd_level, Accum, AttentionOptions, Causal, Par, View2, View4, ViewMut2,
    ViewMut4,
};
use serde_json::json;

/// Timing statistics of one measurement.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median_s: f64,
    pub min_s: f64,
    pub runs: usize,
}

/// How long to measure.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub min_runs: usize,
    pub min_seconds: f64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            min_runs: 5,
            min_seconds: 1.0,
        }
    }
}

/// Times `f` per [`Budget`].
pub fn measure(budget: Budget, mut f: impl FnMut()) -> Stats {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < budget.min_runs || (start.elapsed().as_secs_f64() < budget.min_seconds && times.len() < 1000) {
        let t0 = Instant::now();
        f();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Stats {
        median_s: times[times.len() / 2],
        min_s: times[0],
        runs: times.len(),
    }
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes, where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Deterministic pseudo-random values in `[-1, 1)`.
pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Which attention implementation `bench sdpa` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Path {
    /// The tiled flash kernel (what `attn sdpa` runs).
    Flash,
    /// The unfused path: full S×T scores per head, softmax, then P·V.
    Unfused,
}

#[derive(Debug, Clone, Copy)]
pub struct SdpaBench {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub kv_seq: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub path: Path,
}

impl SdpaBench {
    /// Flops as the contract defines them: 4·B·H·S·T·D, halved when causal with S = T.
    pub fn flops(&self) -> f64 {
        let f = 4.0 * (self.batch * self.heads * self.seq * self.kv_seq * self.head_dim) as f64;
        if self.causal && self.seq == self.kv_seq {
            f / 2.0
        } else {
            f
        }
    }

    /// Bytes of q, k, v read and out written.
    pub fn bytes(&self) -> f64 {
        let q = self.batch * self.heads * self.seq * self.head_dim;
        let kv = 2 * self.batch * self.kv_heads * self.kv_seq * self.head_dim;
        (4 * (2 * q + kv)) as f64
    }

    pub fn run(&self, budget: Budget) -> Result<Stats> {
        let SdpaBench {
            batch: b,
            heads: h,
            kv_heads: g,
            seq: s,
            kv_seq: t,
            head_dim: d,
            ..
        } = *self;
        let q = random_vec(b * h * s * d, 1);
        let k = random_vec(b * g * t * d, 2);
        let v = random_vec(b * g * t * d, 3);
        let mut out = vec![0.0f32; b * h * s * d];
        let options = AttentionOptions {
            causal: if self.causal { Causal::TopLeft } else { Causal::None },
            ..Default::default()
        };
        let qv = View4::contiguous(&q, [b, h, s, d])?;
        let kv = View4::contiguous(&k, [b, g, t, d])?;
        let vv = View4::contiguous(&v, [b, g, t, d])?;
        // One checked call surfaces shape errors before timing.
        let kernel = match self.path {
            Path::Flash => flash_attention,
            Path::Unfused => attention_unfused,
        };
        kernel(
            ViewMut4::contiguous(&mut out, [b, h, s, d])?,
            None,
            qv,
            kv,
            vv,
            &options,
            Par::Rayon,
        )?;
        Ok(measure(budget, || {
            let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).expect("shape checked above");
            kernel(o, None, qv, kv, vv, &options, Par::Rayon).expect("shapes checked above");
        }))
    }

    pub fn report(&self, stats: Stats, threads: usize, as_json: bool) -> String {
        let gflops = self.flops() / stats.median_s / 1e9;
        let gbps = self.bytes() / stats.median_s / 1e9;
        if as_json {
            json!({
                "op": "sdpa",
                "path": format!("{:?}", self.path).to_lowercase(),
                "batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads,
                "seq": self.seq, "kv_seq": self.kv_seq, "head_dim": self.head_dim, "causal": self.causal,
                "threads": threads, "simd": simd_level().to_string(),
                "median_s": stats.median_s, "min_s": stats.min_s, "runs": stats.runs,
                "gflops": gflops, "gbps": gbps, "peak_rss_bytes": peak_rss_bytes(),
            })
            .to_string()
        } else {
            format!(
                "sdpa {:?} B={} H={} G={} S={} T={} D={}{} threads={} simd={}\n  median {:.3} ms  min {:.3} ms  runs {}  {:.1} GFLOP/s  {:.2} GB/s",
                self.path,
                self.batch,
                self.heads,
                self.kv_heads,
                self.seq,
                self.kv_seq,
                self.head_dim,
                if self.causal { " causal" } else { "" },
                threads,
                simd_level(),
                stats.median_s * 1e3,
                stats.min_s * 1e3,
                stats.runs,
                gflops,
                gbps
            )
        }
    }
}

/// A report for a measurement without a flop count.
pub fn report_plain(op: &str, what: &str, stats: Stats, threads: usize, as_json: bool) -> String {
    if as_json {
        json!({
            "op": op, "what": what, "threads": threads,
            "median_s": stats.median_s, "min_s": stats.min_s, "runs": stats.runs,
            "peak_rss_bytes": peak_rss_bytes(),
        })
        .to_string()
    } else {
        format!(
            "{op} {what} threads={threads}\n  median {:.3} ms  min {:.3} ms  runs {}",
            stats.median_s * 1e3,
            stats.min_s * 1e3,
            stats.runs
        )
    }
}

/// `bench gemm`: `[M, K] · [K, N]`, row-major operands, all threads.
pub fn gemm_bench(m: usize, n: usize, k: usize, threads: usize, budget: Budget, as_json: bool) -> Result<String> {
    let a = random_vec(m * k, 1);
    let b = random_vec(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    let lhs = View2::contiguous(&a, [m, k])?;
    let rhs = View2::contiguous(&b, [k, n])?;
    gemm(
        ViewMut2::contiguous(&mut c, [m, n])?,
        Accum::Replace,
        lhs,
        rhs,
        1.0,
        Par::Rayon,
    )?;
    let stats = measure(budget, || {
        let dst = ViewMut2::contiguous(&mut c, [m, n]).expect("shape checked above");
        gemm(dst, Accum::Replace, lhs, rhs, 1.0, Par::Rayon).expect("shapes checked above");
    });
    let gflops = 2.0 * (m * n * k) as f64 / stats.median_s / 1e9;
    Ok(if as_json {
        json!({
            "op": "gemm", "m": m, "n": n, "k": k, "threads": threads,
            "median_s": stats.median_s, "min_s": stats.min_s, "runs": stats.runs, "gflops": gflops,
        })
        .to_string()
    } else {
        format!(
            "gemm M={m} N={n} K={k} threads={threads}\n  median {:.3} ms  min {:.3} ms  runs {}  {:.1} GFLOP/s",
            stats.median_s * 1e3,
            stats.min_s * 1e3,
            stats.runs,
            gflops
        )
    })
}
