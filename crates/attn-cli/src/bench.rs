//! `attn bench`: timings of the kernels, as medians over repeated runs.
//!
//! Each measurement warms up once, then runs at least `min_runs` times and until `min_seconds`
//! have passed (at most 1000 runs), and reports the median and the minimum.

use std::time::Instant;

use anyhow::{bail, Result};
use attn_nn::core::kernels::unfused_scratch_bytes;
use attn_nn::core::kernels::{
    attention_backward, attention_backward_path, BackwardInputs, BackwardPath, Gradients, View, ViewMut,
};
use attn_nn::core::kernels::{
    attention_unfused, flash_attention, gemm, simd_level, Accum, AttentionOptions, Causal, Par, View2, View4, ViewMut2,
    ViewMut4,
};
use attn_nn::core::{f32_bytes, SdpaShape};
use clap::ValueEnum;
use serde_json::json;

use crate::threads::Threads;

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

/// `attn bench`: one subcommand per kind of work.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Times attention on random inputs: flops 4·B·H·S·T·D (halved when causal with S = T).
    #[command(
        after_help = "Examples:\n  attn bench sdpa --batch 1 --heads 8 --seq 2048 --head-dim 64 --causal\n  attn bench sdpa --batch 1 --heads 32 --kv-heads 8 --seq 1 --kv-seq 4096 --head-dim 128 --json"
    )]
    Sdpa(SdpaArgs),
    /// Times a module's forward pass exactly as `attn run` computes it (files read once, outside the timing).
    Run(crate::run::BenchArgs),
    /// Times embedding every line of FILE, tokenisation included, model loading excluded.
    #[command(after_help = "Example:\n  attn bench embed --input sentences.txt --batch-size 32 --json")]
    Embed(crate::embed::BenchArgs),
    /// Seconds per training step (batch, forward, backward, AdamW) and target tokens per second.
    #[command(after_help = "Example:\n  attn bench train --data train.tsv --batch-size 64 --steps 20 --json")]
    Train(crate::train::BenchArgs),
    /// GFLOP/s against sequence length: flash, unfused and (when Python has torch) PyTorch.
    #[command(
        after_help = "Example:\n  attn bench sweep --seq 128,256,512,1024,2048,4096,8192 --png sweep.png\n\nPyTorch is measured when ATTN_PYTHON (default python3) can import torch."
    )]
    Sweep(crate::sweep::Args),
    /// Times faer's f32 GEMM [M,K]·[K,N]: flops 2·M·N·K.
    #[command(after_help = "Example:\n  attn bench gemm --m 1024 --n 1024 --k 1024 --json")]
    Gemm(GemmArgs),
    /// Read bandwidth: sums a buffer larger than the last-level cache on every thread (GB/s of
    /// reads), the ceiling for decoding, which reads each cached key and value once.
    #[command(after_help = "Example:\n  attn bench bandwidth --mib 512 --json")]
    Bandwidth(BandwidthArgs),
}

/// Runs `attn bench ...`.
pub fn main(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Sdpa(args) => sdpa(args),
        BenchCommand::Run(args) => crate::run::bench(args),
        BenchCommand::Embed(args) => crate::embed::bench(args),
        BenchCommand::Train(args) => crate::train::bench(args),
        BenchCommand::Sweep(args) => crate::sweep::main(args),
        BenchCommand::Gemm(args) => gemm_command(args),
        BenchCommand::Bandwidth(args) => bandwidth(args),
    }
}

/// `attn bench sdpa`.
#[derive(Debug, clap::Args)]
pub struct SdpaArgs {
    /// B, the batch (at least 1).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    batch: usize,
    /// H, query heads (at least 1).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    heads: usize,
    /// G, key/value heads; must divide --heads [default: --heads]
    #[arg(long, value_parser = crate::flags::at_least_one)]
    kv_heads: Option<usize>,
    /// S, the query length (at least 1).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    seq: usize,
    /// T, the key length [default: --seq]
    #[arg(long, value_parser = crate::flags::at_least_one)]
    kv_seq: Option<usize>,
    /// D, the head dim of queries, keys and values (at least 1).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    head_dim: usize,
    /// Top-left causal masking.
    #[arg(long)]
    causal: bool,
    /// Which implementation to time.
    #[arg(long, value_enum, default_value_t = Path::Flash)]
    path: Path,
    /// Time the forward and the backward together, as one training step runs them (flops 3.5×
    /// the forward's)
    #[arg(long)]
    backward: bool,
    /// With --backward: the backward's algorithm (`auto` chooses by shape, as training does).
    #[arg(long, value_enum, default_value_t = BackwardChoice::Auto)]
    backward_path: BackwardChoice,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    flags: BenchFlags,
}

/// `--backward-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackwardChoice {
    /// By shape (`attention_backward`).
    Auto,
    /// Row tiles of 64 over all keys at once.
    OnePass,
    /// A key pass and a query pass over blocks of 128 keys.
    TwoPass,
    /// Whole `[S, T]` matrices per head.
    Unfused,
}

fn sdpa(args: SdpaArgs) -> Result<()> {
    let budget = args.flags.budget()?;
    let SdpaArgs {
        batch,
        heads,
        seq,
        head_dim,
        ..
    } = args;
    let kv_heads = args.kv_heads.unwrap_or(heads);
    let kv_seq = args.kv_seq.unwrap_or(seq);
    let shape = SdpaShape::check(
        &[batch, heads, seq, head_dim],
        &[batch, kv_heads, kv_seq, head_dim],
        &[batch, kv_heads, kv_seq, head_dim],
    )
    .map_err(|e| anyhow::anyhow!("{e} (from --heads {heads} --kv-heads {kv_heads} --head-dim {head_dim})"))?;
    if !args.backward && args.backward_path != BackwardChoice::Auto {
        bail!("--backward-path needs --backward");
    }
    let mut need = shape.input_bytes().saturating_add(shape.output_bytes());
    if args.backward {
        // dout, and dq, dk, dv: the outputs' and the inputs' sizes again.
        need = need
            .saturating_add(shape.input_bytes())
            .saturating_add(shape.output_bytes());
    }
    if args.path == Path::Unfused {
        let workers = rayon::current_num_threads().max(2);
        need = need.saturating_add(unfused_scratch_bytes([batch, heads, seq, head_dim], kv_seq, workers));
    }
    crate::memory::check(need, "bench sdpa (q, k, v, out)")?;
    let spec = SdpaBench {
        batch,
        heads,
        kv_heads,
        seq,
        kv_seq,
        head_dim,
        causal: args.causal,
        path: args.path,
        backward: args.backward.then_some(args.backward_path),
    };
    let (stats, n) = args.threads.install(|n| Ok((spec.run(budget)?, n)))?;
    println!("{}", spec.report(stats, n, args.flags.json));
    Ok(())
}

/// `attn bench gemm`.
#[derive(Debug, clap::Args)]
pub struct GemmArgs {
    /// Rows of A and C.
    #[arg(long)]
    m: usize,
    /// Columns of B and C.
    #[arg(long)]
    n: usize,
    /// Columns of A, rows of B.
    #[arg(long)]
    k: usize,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    flags: BenchFlags,
}

fn gemm_command(args: GemmArgs) -> Result<()> {
    let budget = args.flags.budget()?;
    let GemmArgs { m, n, k, .. } = args;
    let need = f32_bytes(&[m, k])
        .saturating_add(f32_bytes(&[k, n]))
        .saturating_add(f32_bytes(&[m, n]));
    crate::memory::check(need, "bench gemm (a, b, c)")?;
    let text = args
        .threads
        .install(|nt| gemm_bench(m, n, k, nt, budget, args.flags.json))?;
    println!("{text}");
    Ok(())
}

/// `attn bench bandwidth`.
#[derive(Debug, clap::Args)]
pub struct BandwidthArgs {
    /// Buffer size in MiB: well above the last-level cache so reads come from memory.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..=65536))]
    mib: u32,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    flags: BenchFlags,
}

/// Sums the buffer's words on every thread (each thread its own contiguous part), the way the
/// decode kernel streams K and V; reports bytes read per second.
fn bandwidth(args: BandwidthArgs) -> Result<()> {
    use rayon::prelude::*;
    let budget = args.flags.budget()?;
    let bytes = args.mib as usize * 1024 * 1024;
    crate::memory::check(bytes as u128, "bench bandwidth (the buffer)")?;
    let words = bytes / 8;
    let (stats, n, checksum) = args.threads.install(|n| {
        // Written once, so every page is backed by memory before the timing.
        let buffer: Vec<u64> = (0..words as u64).collect();
        let chunk = words.div_ceil(n);
        let sum = || {
            buffer
                .par_chunks(chunk)
                .map(|part| part.iter().fold(0u64, |acc, &x| acc.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add)
        };
        let checksum = sum();
        let stats = measure(budget, || {
            std::hint::black_box(sum());
        });
        Ok((stats, n, checksum))
    })?;
    // The sum of 0..words modulo 2^64 (computed exactly, then reduced): every word was read.
    let want = ((words as u128) * (words as u128 - 1) / 2) as u64;
    anyhow::ensure!(checksum == want, "bandwidth: read {checksum}, expected {want}");
    let gbps = bytes as f64 / stats.median_s / 1e9;
    if args.flags.json {
        println!(
            "{}",
            json!({
                "op": "bandwidth", "bytes": bytes, "threads": n, "simd": simd_level().to_string(),
                "median_s": stats.median_s, "min_s": stats.min_s, "runs": stats.runs, "gbps": gbps,
            })
        );
    } else {
        println!(
            "bandwidth {} MiB threads={n}\n  median {:.3} ms  min {:.3} ms  runs {}  {gbps:.1} GB/s read",
            args.mib,
            stats.median_s * 1e3,
            stats.min_s * 1e3,
            stats.runs
        );
    }
    Ok(())
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

pub use attn_nn::core::kernels::testing::random_vec;

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
        if let Some(choice) = self.backward {
            return self.run_backward(budget, [qv, kv, vv], &options, choice);
        }
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
                q,
                k,
                v,
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
                "threads": threads, "simd": simd_level().to_string(),
                "median_s": stats.median_s, "min_s": stats.min_s, "runs": stats.runs,
                "gflops": gflops, "gbps": gbps, "peak_rss_bytes": peak_rss_bytes(),
            })
            .to_string()
        } else {
            format!(
                "sdpa {:?}{} B={} H={} G={} S={} T={} D={}{} threads={} simd={}\n  median {:.3} ms  min {:.3} ms  runs {}  {:.1} GFLOP/s  {:.2} GB/s",
                self.path,
                if self.backward.is_some() { " forward+backward" } else { "" },
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
