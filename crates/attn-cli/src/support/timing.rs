//! Timing shared by `attn bench` and the commands that time themselves (`bench run`, `bench
//! embed`, `bench sweep`, the demo): how long to measure ([`Budget`], [`BenchFlags`]),
//! [`measure`], reports, and the attention timing of `bench sdpa` ([`SdpaBench`]).
//!
//! Each measurement warms up once, then runs at least `min_runs` times and until `min_seconds`
//! have passed (at most 1000 runs), and reports the median and the minimum.

use std::time::Instant;

use anyhow::Result;
use attn_nn::core::kernels::{
    attention_backward, attention_backward_path, BackwardInputs, BackwardPath, Gradients, View, ViewMut,
};
use attn_nn::core::kernels::{
    attention_bf16_kv, attention_unfused, bf16_level, f32_to_bf16, flash_attention, simd_level, AttentionOptions,
    Causal, ForwardInputs, Par, View4, ViewMut4,
};
use clap::ValueEnum;
use serde_json::json;

use crate::support::dtype::Dtype;

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

/// The flags every timed bench shares: how long to measure and how to report.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BenchFlags {
    /// Minimum number of timed runs.
    #[arg(long, default_value_t = 5)]
    pub min_runs: usize,
    /// Keep running until this many seconds have passed.
    #[arg(long, default_value_t = 1.0)]
    pub min_seconds: f64,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

impl BenchFlags {
    /// The budget, checked.
    pub fn budget(&self) -> Result<Budget> {
        let (min_runs, min_seconds) = (self.min_runs, self.min_seconds);
        if min_runs == 0 || !(0.0..=3600.0).contains(&min_seconds) {
            anyhow::bail!(
                "--min-runs must be at least 1 and --min-seconds within 0..3600 (got {min_runs}, {min_seconds})"
            );
        }
        Ok(Budget { min_runs, min_seconds })
    }
}

/// `--backward-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackwardChoice {
    /// By shape (`attention_backward`).
    Auto,
    /// A task per key/value head (its rows in chunks when there are few) over all its keys, in
    /// blocks of 256; row tiles of 64.
    OnePass,
    /// A key pass and a query pass over blocks of 128 keys.
    TwoPass,
    /// Whole `[S, T]` matrices per head.
    Unfused,
}

/// Times `f` per [`Budget`], after one untimed call.
pub fn measure(budget: Budget, mut f: impl FnMut()) -> Stats {
    f();
    measure_warmed(budget, f)
}

/// [`measure`] for a caller that has just made the untimed call itself (to return its error).
pub fn measure_warmed(budget: Budget, mut f: impl FnMut()) -> Stats {
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

pub use attn_nn::core::kernels::rng::random_vec;

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
    /// The forward and the backward (on this path) together.
    pub backward: Option<BackwardChoice>,
    /// The number format of the two products (bf16: the flash path, forward only).
    pub dtype: Dtype,
    /// K and V held as bf16 bits (a bf16 KV cache), read by `attention_bf16_kv`.
    pub kv_bf16: bool,
}

impl SdpaBench {
    /// Flops as the contract defines them: 4·B·H·S·T·D, halved when causal with S = T; 3.5×
    /// that with the backward (FlashAttention-2's count: the backward recomputes the scores).
    pub fn flops(&self) -> f64 {
        let f = 4.0 * (self.batch * self.heads * self.seq * self.kv_seq * self.head_dim) as f64;
        let f = if self.causal && self.seq == self.kv_seq {
            f / 2.0
        } else {
            f
        };
        if self.backward.is_some() {
            3.5 * f
        } else {
            f
        }
    }

    /// Bytes of q, k, v read and out written.
    pub fn bytes(&self) -> f64 {
        let q = self.batch * self.heads * self.seq * self.head_dim;
        let kv = 2 * self.batch * self.kv_heads * self.kv_seq * self.head_dim;
        let kv_bytes = if self.kv_bf16 { 2 } else { 4 };
        (4 * 2 * q + kv_bytes * kv) as f64
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
            precision: self.dtype.precision(),
            ..Default::default()
        };
        let qv = View4::contiguous(&q, [b, h, s, d])?;
        let kv = View4::contiguous(&k, [b, g, t, d])?;
        let vv = View4::contiguous(&v, [b, g, t, d])?;
        if let Some(choice) = self.backward {
            return self.run_backward(budget, [qv, kv, vv], &options, choice);
        }
        if self.kv_bf16 {
            let [kb, vb] = [&k, &v].map(|x| x.iter().map(|&x| f32_to_bf16(x)).collect::<Vec<u16>>());
            let (kb, vb) = (
                View4::contiguous(&kb, [b, g, t, d])?,
                View4::contiguous(&vb, [b, g, t, d])?,
            );
            let mut call = || {
                attention_bf16_kv(
                    ViewMut4::contiguous(&mut out, [b, h, s, d])?,
                    None,
                    qv,
                    kb,
                    vb,
                    &options,
                    Par::Rayon,
                )
            };
            // One checked call surfaces shape errors before timing.
            call()?;
            return Ok(measure(budget, || call().expect("shapes checked above")));
        }
        // One checked call surfaces shape errors before timing.
        let kernel = match self.path {
            Path::Flash => flash_attention,
            Path::Unfused => attention_unfused,
        };
        kernel(
            ViewMut4::contiguous(&mut out, [b, h, s, d])?,
            None,
            ForwardInputs::new(qv, kv, vv),
            &options,
            Par::Rayon,
        )?;
        Ok(measure(budget, || {
            let o = ViewMut4::contiguous(&mut out, [b, h, s, d]).expect("shape checked above");
            kernel(o, None, ForwardInputs::new(qv, kv, vv), &options, Par::Rayon).expect("shapes checked above");
        }))
    }

    /// Times the forward on `self.path` (keeping the LSE) and the backward on `choice` together.
    fn run_backward(
        &self,
        budget: Budget,
        [q, k, v]: [View4<'_, f32>; 3],
        options: &AttentionOptions<'_>,
        choice: BackwardChoice,
    ) -> Result<Stats> {
        let forward = match self.path {
            Path::Flash => flash_attention,
            Path::Unfused => attention_unfused,
        };
        let ([b, h, s, d], [_, g, t, _]) = (q.shape(), k.shape());
        let mut out = vec![0.0f32; b * h * s * d];
        let mut lse = vec![0.0f32; b * h * s];
        // Zeros: with `lse_lo` given, the backward runs the training path's extra subtraction.
        let lse_lo = vec![0.0f32; b * h * s];
        let dout = random_vec(b * h * s * d, 4);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; q.data().len()],
            vec![0.0f32; k.data().len()],
            vec![0.0f32; v.data().len()],
        );
        let mut step = || -> Result<()> {
            forward(
                ViewMut4::contiguous(&mut out, [b, h, s, d])?,
                Some(ViewMut::contiguous(&mut lse, [b, h, s])?),
                ForwardInputs::new(q, k, v),
                options,
                Par::Rayon,
            )?;
            let grads = Gradients {
                dq: ViewMut4::contiguous(&mut dq, [b, h, s, d])?,
                dk: ViewMut4::contiguous(&mut dk, [b, g, t, d])?,
                dv: ViewMut4::contiguous(&mut dv, [b, g, t, d])?,
            };
            let inputs = BackwardInputs {
                q,
                k,
                v,
                out: View4::contiguous(&out, [b, h, s, d])?,
                lse: View::contiguous(&lse, [b, h, s])?,
                lse_lo: Some(View::contiguous(&lse_lo, [b, h, s])?),
                dout: View4::contiguous(&dout, [b, h, s, d])?,
            };
            let path = match choice {
                BackwardChoice::Auto => None,
                BackwardChoice::OnePass => Some(BackwardPath::OnePass),
                BackwardChoice::TwoPass => Some(BackwardPath::TwoPass),
                BackwardChoice::Unfused => Some(BackwardPath::Unfused),
            };
            match path {
                None => attention_backward(grads, inputs, options, Par::Rayon)?,
                Some(path) => attention_backward_path(grads, inputs, options, Par::Rayon, path)?,
            }
            Ok(())
        };
        // One checked step surfaces shape errors before timing.
        step()?;
        Ok(measure(budget, || step().expect("shapes checked above")))
    }

    pub fn report(&self, stats: Stats, threads: usize, as_json: bool) -> String {
        let gflops = self.flops() / stats.median_s / 1e9;
        let gbps = self.bytes() / stats.median_s / 1e9;
        if as_json {
            json!({
                "op": "sdpa",
                "path": format!("{:?}", self.path).to_lowercase(),
                "backward": self.backward.is_some(),
                "backward_path": self.backward.and_then(|c| c.to_possible_value()).map(|v| v.get_name().to_string()),
                "batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads,
                "seq": self.seq, "kv_seq": self.kv_seq, "head_dim": self.head_dim, "causal": self.causal,
                "threads": threads, "simd": simd_level().to_string(), "bf16": bf16_level().to_string(),
                "dtype": self.dtype.name(), "kv_dtype": if self.kv_bf16 { "bf16" } else { "f32" },
                "median_s": stats.median_s, "min_s": stats.min_s, "runs": stats.runs,
                "gflops": gflops, "gbps": gbps, "peak_rss_bytes": peak_rss_bytes(),
            })
            .to_string()
        } else {
            format!(
                "sdpa {:?}{} B={} H={} G={} S={} T={} D={}{} {} threads={} simd={}\n  median {:.3} ms  min {:.3} ms  runs {}  {:.1} GFLOP/s  {:.2} GB/s",
                self.path,
                if self.backward.is_some() { " forward+backward" } else { "" },
                self.batch,
                self.heads,
                self.kv_heads,
                self.seq,
                self.kv_seq,
                self.head_dim,
                if self.causal { " causal" } else { "" },
                self.dtype.name(),
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
            "simd": simd_level().to_string(), "bf16": bf16_level().to_string(),
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
