//! `attn bench train`: training steps timed, with what a step takes from the allocator.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use attn_nn::Seq2Seq;
use serde_json::json;

use crate::support::allocations;
use crate::support::ranks::Ranks;
use crate::support::threads::Threads;

use super::{read_pairs, ModelFlags, OptimFlags, Trainer};

/// `attn bench train`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Training pairs: source TAB target.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    model: ModelFlags,
    #[command(flatten)]
    optim: OptimFlags,
    /// Steps to time (after one untimed step).
    #[arg(long, default_value_t = 20)]
    steps: u64,
    #[command(flatten)]
    threads: Threads,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Times training steps (batch, forward, backward, AdamW), data loading excluded; under
/// `mpirun`, steps shared by the ranks (rank 0 reports).
pub fn bench(args: BenchArgs) -> Result<()> {
    let ranks = Ranks::join()?;
    ranks.or_abort(bench_ranks(args, &ranks))
}

fn bench_ranks(args: BenchArgs, ranks: &Ranks) -> Result<()> {
    let pairs = read_pairs(&args.data)?;
    let config = args.model.config(&pairs)?;
    super::trainer::check_memory(&config, &args.optim, &pairs)?;
    let model = Seq2Seq::with_seed(config, args.optim.seed)?;
    let steps = args.steps.max(1);
    args.threads.install(|threads| {
        let dtype = args.optim.precision.effective_for("--precision", ranks.is_root());
        let mut trainer = Trainer::new(model, pairs, args.optim.clone(), steps + 1, ranks.size())?;
        trainer.step(1, ranks.comm())?;
        let mut times = Vec::new();
        let mut optimizer = Vec::new();
        let mut communication = Vec::new();
        let mut tokens = 0usize;
        // Large allocations per timed step, and the resident memory after the first and the
        // last step: what a step takes from the allocator at steady state.
        let mut large = Vec::new();
        let rss_first = allocations::resident_bytes();
        for step in 2..=steps + 1 {
            let before = allocations::large();
            let t0 = Instant::now();
            let report = trainer.step(step, ranks.comm())?;
            times.push(t0.elapsed().as_secs_f64());
            let after = allocations::large();
            large.push((after.0 - before.0, after.1 - before.1));
            tokens += report.tokens;
            optimizer.push(report.optimizer_s);
            communication.push(report.communication_s);
        }
        if !ranks.is_root() {
            return Ok(());
        }
        communication.sort_by(f64::total_cmp);
        let communication_median = communication[communication.len() / 2];
        let processes = ranks.size();
        let rss_last = allocations::resident_bytes();
        // Over the last half of the steps: whether the arena has stopped growing.
        let late: u64 = large[large.len() / 2..].iter().map(|l| l.0).sum();
        large.sort_unstable();
        let (large_count, large_bytes) = large[large.len() / 2];
        optimizer.sort_by(f64::total_cmp);
        let optimizer_median = optimizer[optimizer.len() / 2];
        let parameters = trainer.model.store().layout().numel();
        let total: f64 = times.iter().sum();
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let tokens_per_s = tokens as f64 / total;
        if args.json {
            println!(
                "{}",
                json!({"op": "train", "median_s": median, "min_s": sorted[0], "runs": times.len(),
                       "tokens_per_s": tokens_per_s, "threads": threads, "processes": processes,
                       "communication_median_s": communication_median,
                       "optimizer_median_s": optimizer_median, "parameters": parameters,
                       "large_allocations_per_step": large_count, "large_allocated_bytes_per_step": large_bytes,
                       "large_allocations_last_half": late,
                       "resident_bytes_first": rss_first, "resident_bytes_last": rss_last,
                       "dtype": dtype.name(),
                       "simd": attn_nn::core::kernels::simd_level().to_string(),
                       "bf16": attn_nn::core::kernels::bf16_level().to_string()})
            );
        } else {
            let (across, passing) = match processes {
                1 => (String::new(), String::new()),
                n => (
                    format!(" × {n} processes"),
                    format!(", passing gradients between processes {:.3} ms", communication_median * 1e3),
                ),
            };
            println!(
                "train ({}): median {:.2} ms per step, {tokens_per_s:.0} target tokens/s ({} steps, {threads} threads{across}); \
                 of which clipping and AdamW over {parameters} parameters {:.3} ms{passing}",
                dtype.name(),
                median * 1e3,
                times.len(),
                optimizer_median * 1e3,
            );
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!(
                "allocations of {} KiB or more: median {large_count} per step ({:.1} MiB), {late} in all over the last half of the steps; resident memory {} before the timed steps, {} after them",
                allocations::LARGE >> 10,
                mib(large_bytes),
                rss_first.map_or("unknown".into(), |b| format!("{:.0} MiB", mib(b))),
                rss_last.map_or("unknown".into(), |b| format!("{:.0} MiB", mib(b))),
            );
        }
        Ok(())
    })
}
