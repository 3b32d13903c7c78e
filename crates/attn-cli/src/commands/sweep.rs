//! `attn bench sweep`: GFLOP/s against sequence length for the flash kernel, the unfused path
//! and, when a Python with torch is there, PyTorch's `scaled_dot_product_attention`; as a table,
//! as JSON, and as a PNG plot. With `--dtype bf16`: the flash kernel on bf16 operands, no
//! unfused column (that path is f32 only), and PyTorch's SDPA on bf16 tensors.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use attn_nn::core::SdpaShape;
use serde_json::json;

use crate::support::dtype::Dtype;
use crate::support::plot::{log2_lines, Line};
use crate::support::timing::{Budget, Path as KernelPath, SdpaBench};
use plotters::style::RGBColor;

/// One sequence length's measurements, GFLOP/s.
pub struct Point {
    pub seq: usize,
    pub flash: f64,
    pub unfused: Option<f64>,
    pub torch: Option<f64>,
    /// The path the library's `attention` takes for this shape at this level.
    pub chosen: attn_nn::core::kernels::KernelPath,
}

const TORCH_SCRIPT: &str = r#"
import json, sys, time, statistics
import torch, torch.nn.functional as F
b, h, d, causal, threads = (int(x) for x in sys.argv[1:6])
dtype = torch.bfloat16 if sys.argv[7] == "bf16" else torch.float32
torch.set_num_threads(threads)
out = {}
for s in (int(x) for x in sys.argv[6].split(",")):
    q, k, v = (torch.rand(b, h, s, d, dtype=dtype) for _ in range(3))
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
        times, start = [], time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < 0.2 and len(times) < 100):
            t0 = time.perf_counter(); F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal)); times.append(time.perf_counter() - t0)
    out[s] = statistics.median(times)
print(json.dumps(out))
"#;

/// PyTorch's median seconds per sequence length on `dtype` tensors, if `python` has torch.
fn torch_times(
    python: &str,
    [b, h, d]: [usize; 3],
    (causal, dtype): (bool, Dtype),
    threads: usize,
    seqs: &[usize],
) -> Option<Vec<f64>> {
    let list = seqs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let output = Command::new(python)
        .args(["-c", TORCH_SCRIPT])
        .args([
            b.to_string(),
            h.to_string(),
            d.to_string(),
            u8::from(causal).to_string(),
            threads.to_string(),
            list,
            dtype.name().to_string(),
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&output.stdout).ok()?;
    seqs.iter().map(|s| map.get(&s.to_string())?.as_f64()).collect()
}

/// `attn bench sweep`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sequence lengths S = T to measure: whole numbers of at least 1, comma-separated (as
    /// 128,256,512).
    #[arg(long, value_delimiter = ',', value_parser = crate::support::flags::at_least_one, default_values_t = [128usize, 256, 512, 1024, 2048, 4096])]
    seq: Vec<usize>,
    /// B, the batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// H, the heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// D, the head dim.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Top-left causal masking.
    #[arg(long)]
    causal: bool,
    /// Write a plot.
    #[arg(long)]
    png: Option<std::path::PathBuf>,
    /// Number format of the two products: bf16 times the flash kernel on bf16 operands (f32
    /// sums and softmax; no unfused column) against PyTorch on bf16 tensors. Without bf16
    /// instructions it runs f32 and says so.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    #[command(flatten)]
    threads: crate::support::threads::Threads,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs `attn bench sweep`: a table (or JSON) and optionally a plot.
pub fn main(args: Args) -> Result<()> {
    let Args {
        batch,
        heads,
        head_dim,
        causal,
        json,
        ..
    } = args;
    if batch == 0 || heads == 0 || head_dim == 0 {
        bail!("--batch, --heads and --head-dim must be at least 1");
    }
    let python = std::env::var("ATTN_PYTHON").unwrap_or_else(|_| "python3".into());
    let bar = (!args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| indicatif::ProgressBar::new(args.seq.len() as u64));
    let shape = [batch, heads, head_dim];
    let dtype = args.dtype.effective(true);
    let (points, n) = args.threads.install(|n| {
        let points = run(&args.seq, shape, (causal, dtype), n, Some(&python), |k| {
            if let Some(bar) = &bar {
                bar.inc(k as u64)
            }
        })?;
        Ok((points, n))
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        let mut value = to_json(&points, shape, causal, n);
        value["dtype"] = dtype.name().into();
        println!("{value}");
    } else {
        print!("{}", table(&points));
    }
    if let Some(path) = &args.png {
        let title = format!(
            "B={batch} H={heads} D={head_dim}{}, {n} threads{}",
            if causal { " causal" } else { "" },
            if dtype == Dtype::Bf16 { ", bf16" } else { "" }
        );
        write_png(&points, &title, path)?;
        if !json {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Measures every sequence length (`dtype` the effective one: bf16 only with the instructions).
pub fn run(
    seqs: &[usize],
    [b, h, d]: [usize; 3],
    (causal, dtype): (bool, Dtype),
    threads: usize,
    python: Option<&str>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Point>> {
    if seqs.is_empty() || seqs.contains(&0) {
        bail!("--seq needs sequence lengths of at least 1, like 128,256,512");
    }
    let budget = Budget {
        min_runs: 3,
        min_seconds: 0.2,
    };
    let mut points = Vec::new();
    for &seq in seqs {
        let mut spec = SdpaBench {
            batch: b,
            heads: h,
            kv_heads: h,
            seq,
            kv_seq: seq,
            head_dim: d,
            causal,
            path: KernelPath::Flash,
            backward: None,
            dtype,
            kv_bf16: false,
        };
        let shape = SdpaShape {
            b,
            h,
            g: h,
            s: seq,
            t: seq,
            d,
            dv: d,
        };
        crate::support::memory::check(
            shape
                .input_bytes()
                .saturating_add(shape.output_bytes())
                .saturating_add(shape.packed_bytes()),
            "bench sweep (q, k, v, out, packed k and v)",
        )?;
        let flash = spec.flops() / spec.run(budget)?.median_s / 1e9;
        // The unfused path holds S×S scores per worker; past 8192 it is skipped. It is f32 only.
        spec.path = KernelPath::Unfused;
        let unfused = if seq <= 8192 && dtype == Dtype::F32 {
            Some(spec.flops() / spec.run(budget)?.median_s / 1e9)
        } else {
            None
        };
        // `attention` runs bf16 on the flash path whatever the shape.
        let chosen = match dtype {
            Dtype::Bf16 => attn_nn::core::kernels::KernelPath::Flash,
            Dtype::F32 => {
                attn_nn::core::kernels::chosen_path(attn_nn::core::kernels::simd_level(), [b, h, seq, d], [h, seq])
            }
        };
        points.push(Point {
            seq,
            flash,
            unfused,
            torch: None,
            chosen,
        });
        progress(1);
    }
    if let Some(python) = python {
        if let Some(times) = torch_times(python, [b, h, d], (causal, dtype), threads, seqs) {
            for (p, t) in points.iter_mut().zip(times) {
                let spec = SdpaBench {
                    batch: b,
                    heads: h,
                    kv_heads: h,
                    seq: p.seq,
                    kv_seq: p.seq,
                    head_dim: d,
                    causal,
                    path: KernelPath::Flash,
                    backward: None,
                    dtype,
                    kv_bf16: false,
                };
                p.torch = Some(spec.flops() / t / 1e9);
            }
        }
    }
    Ok(points)
}

/// The table.
pub fn table(points: &[Point]) -> String {
    let mut out = String::from(
        "| S = T | flash GFLOP/s | unfused GFLOP/s | PyTorch GFLOP/s | attn chooses |\n|---|---|---|---|---|\n",
    );
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
    for p in points {
        out.push_str(&format!(
            "| {} | {:.1} | {} | {} | {} |\n",
            p.seq,
            p.flash,
            cell(p.unfused),
            cell(p.torch),
            p.chosen
        ));
    }
    out
}

/// The JSON object.
pub fn to_json(points: &[Point], [b, h, d]: [usize; 3], causal: bool, threads: usize) -> serde_json::Value {
    let rows: Vec<_> = points
        .iter()
        .map(|p| json!({"seq": p.seq, "flash_gflops": p.flash, "unfused_gflops": p.unfused, "torch_gflops": p.torch, "chosen": p.chosen.to_string()}))
        .collect();
    json!({"op": "sweep", "batch": b, "heads": h, "head_dim": d, "causal": causal, "threads": threads, "points": rows})
}

/// GFLOP/s against the sequence length (log2 axis): attn's flash and unfused paths and PyTorch's
/// SDPA where measured.
pub fn write_png(points: &[Point], title: &str, path: &Path) -> Result<()> {
    let line = |name, colour, value: fn(&Point) -> Option<f64>| Line {
        name,
        colour,
        points: points
            .iter()
            .filter_map(|p| value(p).map(|v| (p.seq as f64, v)))
            .collect(),
    };
    let lines: Vec<Line<'_>> = [
        line("attn flash", RGBColor(30, 90, 220), |p| Some(p.flash)),
        line("attn unfused", RGBColor(230, 140, 20), |p| p.unfused),
        line("PyTorch SDPA", RGBColor(200, 30, 30), |p| p.torch),
    ]
    .into_iter()
    .filter(|l| !l.points.is_empty())
    .collect();
    log2_lines(path, title, ["sequence length S = T", "GFLOP/s"], &lines)
        .with_context(|| format!("cannot write {}", path.display()))
}
