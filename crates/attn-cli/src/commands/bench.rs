//! `attn bench`: timings of the kernels, as medians over repeated runs. The subcommands that
//! belong to another command (`run`, `embed`, `train`, `sweep`) live with it; what they all share
//! is in `timing.rs`.

use anyhow::{bail, Result};
use attn_nn::core::kernels::unfused_scratch_bytes;
use attn_nn::core::kernels::{
    bf16_level, gemm, gemm_bf16, gemm_bf16_route, gemm_packed, gemm_route, simd_level, Accum, Bf16Panels, F32Panels,
    Par, View2, ViewMut2,
};
use attn_nn::core::{f32_size_in_bytes, SdpaShape};
use serde_json::json;

use crate::support::dtype::Dtype;
use crate::support::threads::Threads;
use crate::support::timing::{measure, random_vec, BackwardChoice, BenchFlags, Budget, Path, SdpaBench};

/// `attn bench`: one subcommand per kind of work.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Times attention on random inputs: flops 4·B·H·S·T·D (halved when causal with S = T).
    #[command(
        after_help = "Examples:\n  attn bench sdpa --batch 1 --heads 8 --seq 2048 --head-dim 64 --causal\n  attn bench sdpa --batch 1 --heads 32 --kv-heads 8 --seq 1 --kv-seq 4096 --head-dim 128 --json"
    )]
    Sdpa(SdpaArgs),
    /// Times a module's forward pass exactly as `attn run` computes it (files read once, outside the timing).
    Run(crate::commands::run::BenchArgs),
    /// Times embedding every line of FILE, tokenisation included, model loading excluded.
    #[command(after_help = "Example:\n  attn bench embed --input sentences.txt --batch-size 32 --json")]
    Embed(crate::commands::embed::BenchArgs),
    /// Seconds per training step (batch, forward, backward, AdamW) and target tokens per second.
    #[command(after_help = "Example:\n  attn bench train --data train.tsv --batch-size 64 --steps 20 --json")]
    Train(crate::commands::train::BenchArgs),
    /// GFLOP/s against sequence length: flash, unfused and (when Python has torch) PyTorch.
    #[command(
        after_help = "Example:\n  attn bench sweep --seq 128,256,512,1024,2048,4096,8192 --png sweep.png\n\nPyTorch is measured when ATTN_PYTHON (default python3) can import torch."
    )]
    Sweep(crate::commands::sweep::Args),
    /// Times the f32 GEMM [M,K]·[K,N] (attn's own on Intel and Zen 4 at AVX-512 and Zen 3 at AVX2, faer's otherwise; `ATTN_GEMM=faer|own` forces one): flops 2·M·N·K.
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
        BenchCommand::Run(args) => crate::commands::run::bench(args),
        BenchCommand::Embed(args) => crate::commands::embed::bench(args),
        BenchCommand::Train(args) => crate::commands::train::bench(args),
        BenchCommand::Sweep(args) => crate::commands::sweep::main(args),
        BenchCommand::Gemm(args) => gemm_command(args),
        BenchCommand::Bandwidth(args) => bandwidth(args),
    }
}

/// `attn bench sdpa`.
#[derive(Debug, clap::Args)]
pub struct SdpaArgs {
    /// B, the batch (at least 1).
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
    batch: usize,
    /// H, query heads (at least 1).
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
    heads: usize,
    /// G, key/value heads; must divide --heads [default: --heads]
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
    kv_heads: Option<usize>,
    /// S, the query length (at least 1).
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
    seq: usize,
    /// T, the key length [default: --seq]
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
    kv_seq: Option<usize>,
    /// D, the head dim of queries, keys and values (at least 1).
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
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
    /// `bf16`: scaled queries, keys, values and probabilities rounded to bf16 (inside the
    /// timing), f32 sums, softmax and output; the flash path, forward only.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// `bf16`: K and V held as bf16 bits before the timing (a bf16 KV cache), read in place
    /// when decoding (at most 8 query rows per key/value head), packed straight from the bits
    /// otherwise; needs --dtype bf16.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    kv_dtype: Dtype,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    flags: BenchFlags,
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
    if args.dtype == Dtype::Bf16 && args.backward {
        bail!("--dtype bf16 is forward only: the backward computes in f32 (drop --backward or use --dtype f32)");
    }
    if args.dtype == Dtype::Bf16 && args.path == Path::Unfused {
        bail!("--dtype bf16 runs on the flash path: the unfused path computes in f32 (use --path flash)");
    }
    if args.kv_dtype == Dtype::Bf16 && args.dtype != Dtype::Bf16 {
        bail!("--kv-dtype bf16 needs --dtype bf16 (a bf16 KV cache feeds bf16 attention)");
    }
    let dtype = args.dtype.effective(true);
    let mut need = shape.input_bytes().saturating_add(shape.output_bytes());
    if args.path == Path::Flash {
        need = need.saturating_add(shape.packed_bytes());
    }
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
    crate::support::memory::check(need, "bench sdpa (q, k, v, out, packed k and v)")?;
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
        dtype,
        kv_bf16: args.kv_dtype == Dtype::Bf16,
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
    /// `bf16`: B rounded to bf16 and packed once (outside the timing, as a model's weights at
    /// load), A rounded while it is packed on every call (inside), f32 sums and output.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// B is the transpose of a row-major `[N, K]` weight (`x · Wᵀ`, every linear map's product)
    /// instead of a row-major `[K, N]` matrix; f32 only (bf16 packs B once either way).
    #[arg(long)]
    weight: bool,
    /// f32: B packed once before the timing (`F32Panels`, as a model set to f32 holds its
    /// weights where attn's own GEMM runs) and read in place by every call.
    #[arg(long)]
    packed: bool,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    flags: BenchFlags,
}

fn gemm_command(args: GemmArgs) -> Result<()> {
    let budget = args.flags.budget()?;
    let GemmArgs {
        m,
        n,
        k,
        weight,
        packed,
        ..
    } = args;
    if weight && args.dtype == Dtype::Bf16 {
        bail!("bench gemm: --weight is for --dtype f32 (bf16 packs B once, whatever its layout)");
    }
    if packed && args.dtype == Dtype::Bf16 {
        bail!("bench gemm: --packed is for --dtype f32 (bf16 always packs B once)");
    }
    let dtype = args.dtype.effective(true);
    let need = f32_size_in_bytes(&[m, k])
        .saturating_add(f32_size_in_bytes(&[k, n]))
        .saturating_add(f32_size_in_bytes(&[m, n]));
    crate::support::memory::check(need, "bench gemm (a, b, c)")?;
    let text = args
        .threads
        .install(|nt| gemm_bench([m, n, k], dtype, [weight, packed], nt, budget, args.flags.json))?;
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
    crate::support::memory::check(bytes as u128, "bench bandwidth (the buffer)")?;
    let words = bytes / 8;
    let (stats, n, checksum, read) = args.threads.install(|n| {
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
        // The bytes each timed run reads: the buffer's, which the report gives.
        Ok((stats, n, checksum, std::mem::size_of_val(&buffer[..])))
    })?;
    // The sum of 0..words modulo 2^64 (computed exactly, then reduced): every word was read.
    let want = ((words as u128) * (words as u128 - 1) / 2) as u64;
    anyhow::ensure!(checksum == want, "bandwidth: read {checksum}, expected {want}");
    let gbps = read as f64 / stats.median_s / 1e9;
    if args.flags.json {
        println!(
            "{}",
            json!({
                "op": "bandwidth", "bytes": read, "threads": n, "simd": simd_level().to_string(), "bf16": bf16_level().to_string(),
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

/// `bench gemm`: `[M, K] · [K, N]`, row-major operands (B the transpose of a row-major
/// weight with `weight`), all threads; in bf16, or in f32 with `packed`, B packed once before
/// the timing.
pub fn gemm_bench(
    [m, n, k]: [usize; 3],
    dtype: Dtype,
    [weight, f32_packed]: [bool; 2],
    threads: usize,
    budget: Budget,
    as_json: bool,
) -> Result<String> {
    let a = random_vec(m * k, 1);
    let b = random_vec(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    let lhs = View2::contiguous(&a, [m, k])?;
    // `--weight`: `b` holds a row-major `[N, K]` weight, read through its transpose.
    let rhs = if weight {
        View2::new(&b, [k, n], [1, k])?
    } else {
        View2::contiguous(&b, [k, n])?
    };
    let packed = (dtype == Dtype::Bf16).then(|| Bf16Panels::pack(rhs));
    let panels = (dtype == Dtype::F32 && f32_packed).then(|| F32Panels::pack(rhs));
    let product = |c: &mut [f32]| -> Result<()> {
        let dst = ViewMut2::contiguous(c, [m, n])?;
        match (&packed, &panels) {
            (Some(packed), _) => gemm_bf16(dst, Accum::Replace, lhs, packed, Par::Rayon)?,
            (None, Some(panels)) => gemm_packed(dst, lhs, rhs, panels, None, Par::Rayon)?,
            (None, None) => gemm(dst, Accum::Replace, lhs, rhs, 1.0, Par::Rayon)?,
        }
        Ok(())
    };
    product(&mut c)?;
    let stats = measure(budget, || product(&mut c).expect("shapes checked above"));
    let gflops = 2.0 * (m * n * k) as f64 / stats.median_s / 1e9;
    // The f32 GEMM that ran: products by panels packed once may take another than per call.
    let f32_route = match panels {
        Some(_) if F32Panels::read_by([m, k, n]) => "own",
        Some(_) => "faer",
        None => gemm_route([m, n, k]),
    };
    // The product that ran, not the one asked for.
    let dtype_name = if packed.is_some() { Dtype::Bf16 } else { Dtype::F32 }.name();
    Ok(if as_json {
        json!({
            "op": "gemm", "m": m, "n": n, "k": k, "dtype": dtype_name, "weight": weight, "packed": panels.is_some(),
            "threads": threads,
            "simd": simd_level().to_string(), "bf16": bf16_level().to_string(),
            "bf16_gemm": gemm_bf16_route(), "f32_gemm": f32_route,
            "median_s": stats.median_s, "min_s": stats.min_s, "runs": stats.runs, "gflops": gflops,
        })
        .to_string()
    } else {
        format!(
            "gemm M={m} N={n} K={k} {dtype_name}{}{} threads={threads}\n  median {:.3} ms  min {:.3} ms  runs {}  {:.1} GFLOP/s",
            if weight { " B=Wᵀ" } else { "" },
            if panels.is_some() { " B packed" } else { "" },
            stats.median_s * 1e3,
            stats.min_s * 1e3,
            stats.runs,
            gflops
        )
    })
}
