//! `cargo xtask bench`: the measured tables of docs/PERFORMANCE.md, interleaved rounds and medians.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::{cargo, flag, output, python, root, run};

struct Measured {
    median_s: f64,
    gflops: f64,
    peak_rss: Option<f64>,
}

fn attn_json(binary: &Path, args: &[String]) -> Result<Measured> {
    let text = output(Command::new(binary).args(args).arg("--json"))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
    let number = |key: &str| v[key].as_f64().with_context(|| format!("no number `{key}` in {text}"));
    Ok(Measured {
        median_s: number("median_s")?,
        gflops: number("gflops")?,
        peak_rss: number("peak_rss_bytes").ok(),
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn bench(args: &[String]) -> Result<()> {
    let rounds = flag(args, "--rounds", 5)?.max(1);
    let threads = flag(args, "--threads", 2)?.max(1);
    run(cargo().args(["build", "--release", "-p", "attn-cli"]))?;
    let binary = root().join("target/release/attn");
    if args.iter().any(|a| a == "--candle-only") {
        let table = candle_table(&binary, threads, rounds)?;
        println!("{table}");
        return Ok(());
    }
    let out_dir = root().join("bench-out");
    std::fs::create_dir_all(&out_dir)?;
    let mut report = String::new();

    for section in [
        gemm_section,
        scaling_section,
        memory_section,
        pytorch_section,
        sweep_section,
    ] {
        report.push_str(&section(&binary, threads, rounds)?);
    }
    if args.iter().any(|a| a == "--candle") {
        report.push_str(&candle_table(&binary, threads, rounds)?);
    }
    std::fs::write(out_dir.join("sdpa.md"), &report)?;
    println!("{report}");
    Ok(())
}

/// Attention kernels against faer's 1024³ GEMM, interleaved rounds.
fn gemm_section(binary: &Path, threads: usize, rounds: usize) -> Result<String> {
    let mut report = String::new();
    let t = threads.to_string();
    // 1. Attention against faer's GEMM, interleaved.
    report.push_str(&format!(
        "### Attention against GEMM ({threads} threads, {rounds} interleaved rounds, medians)\n\n"
    ));
    report.push_str("| kernel | kernel GFLOP/s | GEMM 1024³ GFLOP/s (same rounds) | ratio |\n|---|---|---|---|\n");
    let gemm_args = strings(&[
        "bench",
        "gemm",
        "--m",
        "1024",
        "--n",
        "1024",
        "--k",
        "1024",
        "--threads",
        &t,
    ]);
    let sdpa_shapes: [(&str, &[&str]); 3] = [
        (
            "flash B=1 H=8 S=T=2048 D=64",
            &["--batch", "1", "--heads", "8", "--seq", "2048", "--head-dim", "64"],
        ),
        (
            "flash B=1 H=8 S=T=4096 D=64",
            &["--batch", "1", "--heads", "8", "--seq", "4096", "--head-dim", "64"],
        ),
        (
            "unfused B=1 H=8 S=T=2048 D=64",
            &[
                "--batch",
                "1",
                "--heads",
                "8",
                "--seq",
                "2048",
                "--head-dim",
                "64",
                "--path",
                "unfused",
            ],
        ),
    ];
    for (label, shape) in sdpa_shapes {
        let mut sdpa_args = strings(&["bench", "sdpa", "--threads", &t]);
        sdpa_args.extend(strings(shape));
        let (mut g, mut s) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            g.push(attn_json(binary, &gemm_args)?.gflops);
            s.push(attn_json(binary, &sdpa_args)?.gflops);
        }
        let (g, s) = (median(g), median(s));
        report.push_str(&format!("| {label} | {s:.1} | {g:.1} | {:.2} |\n", s / g));
    }

    Ok(report)
}

/// 2 threads against 1, interleaved rounds.
fn scaling_section(binary: &Path, _threads: usize, rounds: usize) -> Result<String> {
    let mut report = String::new();
    // 2. Thread scaling, interleaved.
    report.push_str(&format!(
        "\n### 2 threads against 1 ({rounds} interleaved rounds, medians)\n\n"
    ));
    report.push_str("| shape | 1 thread ms | 2 threads ms | speed-up |\n|---|---|---|---|\n");
    let scaling: [(&str, &[&str]); 3] = [
        (
            "B=1 H=8 S=T=2048 D=64",
            &["--batch", "1", "--heads", "8", "--seq", "2048", "--head-dim", "64"],
        ),
        (
            "B=1 H=8 S=T=2048 D=64 causal",
            &[
                "--batch",
                "1",
                "--heads",
                "8",
                "--seq",
                "2048",
                "--head-dim",
                "64",
                "--causal",
            ],
        ),
        (
            "decode H=32 G=8 T=4096 D=128",
            &[
                "--batch",
                "1",
                "--heads",
                "32",
                "--kv-heads",
                "8",
                "--seq",
                "1",
                "--kv-seq",
                "4096",
                "--head-dim",
                "128",
            ],
        ),
    ];
    for (label, shape) in scaling {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for (n, acc) in [("1", &mut one), ("2", &mut two)] {
                let mut a = strings(&["bench", "sdpa", "--threads", n]);
                a.extend(strings(shape));
                acc.push(attn_json(binary, &a)?.median_s);
            }
        }
        let (one, two) = (median(one), median(two));
        report.push_str(&format!(
            "| {label} | {:.2} | {:.2} | {:.2}x |\n",
            one * 1e3,
            two * 1e3,
            one / two
        ));
    }

    Ok(report)
}

/// Peak memory of one long call.
fn memory_section(binary: &Path, threads: usize, _rounds: usize) -> Result<String> {
    let mut report = String::new();
    let t = threads.to_string();
    // 3. Peak memory of one long call.
    let long = strings(&[
        "bench",
        "sdpa",
        "--batch",
        "1",
        "--heads",
        "8",
        "--seq",
        "16384",
        "--head-dim",
        "64",
        "--threads",
        &t,
        "--min-runs",
        "1",
        "--min-seconds",
        "0",
    ]);
    let m = attn_json(binary, &long)?;
    let tensors = 4.0 * 8.0 * 16384.0 * 64.0 * 4.0;
    report.push_str(&format!(
        "\n### Peak memory, B=1 H=8 S=T=16384 D=64\n\nq, k, v and out: {:.0} MiB; peak resident set: {} MiB; budget 2×tensors + 64 MiB = {:.0} MiB ({:.2} s per call)\n",
        tensors / 1048576.0,
        m.peak_rss.map_or("n/a".to_string(), |b| format!("{:.0}", b / 1048576.0)),
        (2.0 * tensors) / 1048576.0 + 64.0,
        m.median_s
    ));

    Ok(report)
}

/// attn against PyTorch (SDPA, GEMM, embed, modules), when PyTorch is importable: each script
/// of `xtask/python` run as `SCRIPT BINARY THREADS ROUNDS [EXTRA]`, its table under a heading.
fn pytorch_section(binary: &Path, threads: usize, rounds: usize) -> Result<String> {
    let has_torch = Command::new(python())
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        return Ok(format!(
            "\n(PyTorch not importable by `{}`: set ATTN_PYTHON to a Python with torch)\n",
            python()
        ));
    }
    // The FMA ceiling that `bench_peak.py` measures the kernels against.
    run(cargo().args(["build", "--release", "-p", "attn-kernels", "--example", "fma_peak"]))?;
    let scripts: [(&str, &[&str], &str); 10] = [
        ("bench_compare.py", &[], "Against PyTorch scaled_dot_product_attention"),
        (
            "bench_compare.py",
            &["--ragged"],
            "The same on ragged lengths (the translator's and MiniLM's rows, not whole vectors)",
        ),
        (
            "bench_backward.py",
            &[],
            "Forward + backward against PyTorch's SDPA and its backward",
        ),
        ("bench_backward.py", &["--ragged"], "The same on ragged lengths"),
        (
            "bench_peak.py",
            &[],
            "attn and PyTorch as fractions of the f32 FMA ceiling (examples/fma_peak.rs)",
        ),
        (
            "bench_compare.py",
            &["--bf16"],
            "SDPA in bf16 against PyTorch's SDPA on bf16 tensors",
        ),
        (
            "bench_gemm.py",
            &["--bf16", "--faer", "--best"],
            "GEMM against PyTorch matmul (the layers' shapes)",
        ),
        (
            "bench_embed_bf16.py",
            &[],
            "attn embed in f32 and bf16 against sentence-transformers",
        ),
        (
            "bench_modules.py",
            &["--bf16"],
            "Modules against PyTorch (f32, and bf16 against autocast)",
        ),
        (
            "bench_train.py",
            &["--bf16"],
            "Training steps against PyTorch (f32, and mixed precision against autocast)",
        ),
    ];
    let mut report = String::new();
    for (script, extra, heading) in scripts {
        let table = output(
            Command::new(python())
                .arg(root().join("xtask/python").join(script))
                .arg(binary)
                .arg(threads.to_string())
                .arg(rounds.to_string())
                .args(extra),
        )?;
        report.push_str(&format!("\n### {heading}\n\n{table}"));
    }
    Ok(report)
}

/// GFLOP/s against sequence length, with the plot in docs/images/sweep.png.
fn sweep_section(binary: &Path, threads: usize, _rounds: usize) -> Result<String> {
    let mut report = String::new();
    let t = threads.to_string();
    // GFLOP/s against sequence length, with the plot.
    let sweep = output(
        Command::new(binary)
            .args([
                "bench",
                "sweep",
                "--quiet",
                "--seq",
                "128,256,512,1024,2048,4096",
                "--threads",
                &t,
                "--png",
            ])
            .arg(root().join("docs/images/sweep.png"))
            .env("ATTN_PYTHON", python()),
    )?;
    report.push_str(&format!(
        "\n### GFLOP/s against sequence length (B=1 H=8 D=64; plot in docs/images/sweep.png)\n\n{sweep}"
    ));
    Ok(report)
}

/// attn against candle's CPU flash attention (`bench/candle-compare`), interleaved.
fn candle_table(binary: &Path, threads: usize, rounds: usize) -> Result<String> {
    let manifest = root().join("bench/candle-compare/Cargo.toml");
    run(cargo().args(["build", "--release", "--manifest-path"]).arg(&manifest))?;
    let candle = root().join("bench/candle-compare/target/release/candle-compare");
    let t = threads.to_string();
    let mut table = format!(
        "\n### Against candle's CPU flash attention ({threads} threads, {rounds} interleaved rounds, medians)\n\n\
         | B,H,S=T,D | causal | attn ms | candle ms | attn GFLOP/s | candle GFLOP/s | attn / candle speed |\n|---|---|---|---|---|---|---|\n"
    );
    for (b, h, s, d, causal) in [(1, 8, 512, 64, false), (1, 8, 2048, 64, false), (1, 8, 2048, 64, true)] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let mut args = strings(&["bench", "sdpa", "--threads", &t, "--min-seconds", "0.5"]);
            args.extend(
                [b, h, s, d]
                    .iter()
                    .zip(["--batch", "--heads", "--seq", "--head-dim"])
                    .flat_map(|(v, f)| [f.to_string(), v.to_string()]),
            );
            if causal {
                args.push("--causal".into());
            }
            ours.push(attn_json(binary, &args)?.median_s);
            let text =
                output(Command::new(&candle).args([b, h, s, d, usize::from(causal), threads].map(|x| x.to_string())))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            theirs.push(v["median_s"].as_f64().context("candle-compare printed no median_s")?);
        }
        let (o, c) = (median(ours), median(theirs));
        let flops = 4.0 * (b * h * s * s * d) as f64 / if causal { 2.0 } else { 1.0 };
        table.push_str(&format!(
            "| {b},{h},{s},{d} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1}x |\n",
            if causal { "yes" } else { "no" },
            o * 1e3,
            c * 1e3,
            flops / o / 1e9,
            flops / c / 1e9,
            c / o
        ));
    }
    Ok(table)
}
