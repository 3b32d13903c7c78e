//! `attn dates`, `attn train`, `attn translate` and the date demo end to end: a tiny model
//! trains reproducibly (the same bytes on 1 and 2 threads, and through a stop and `--resume`),
//! writes its log and plot, and refuses bad input by name; the shipped translator answers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn attn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attn")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = attn(args);
    assert!(
        out.status.success(),
        "attn {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = attn(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "attn {args:?} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("attn-train-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny model's flags: a few seconds of training.
const TINY: &[&str] = &[
    "--d-model",
    "16",
    "--nhead",
    "2",
    "--encoder-layers",
    "1",
    "--decoder-layers",
    "1",
    "--dim-feedforward",
    "32",
    "--batch-size",
    "8",
    "--steps",
    "12",
    "--seed",
    "5",
    "--clip-norm",
    "1.0",
    "--label-smoothing",
    "0.1",
    "--quiet",
];

fn data(dir: &Path) -> (PathBuf, PathBuf) {
    let (train, valid) = (dir.join("train.tsv"), dir.join("valid.tsv"));
    std::fs::write(
        &train,
        ok(&["dates", "--split", "train", "--count", "60", "--seed", "1"]),
    )
    .unwrap();
    std::fs::write(
        &valid,
        ok(&["dates", "--split", "valid", "--count", "10", "--seed", "2"]),
    )
    .unwrap();
    (train, valid)
}

#[test]
fn dates_are_tsv_pairs_of_the_ten_styles() {
    let text = ok(&["dates", "--split", "test", "--count", "40", "--seed", "9"]);
    assert_eq!(text.lines().count(), 40);
    for line in text.lines() {
        let (source, target) = line.split_once('\t').unwrap();
        assert!(!source.is_empty());
        assert_eq!(target.len(), 10, "{target}");
        assert_eq!(&target[4..5], "-");
    }
    let styled = ok(&[
        "dates", "--split", "test", "--count", "3", "--seed", "9", "--style", "7",
    ]);
    for line in styled.lines() {
        let (source, target) = line.split_once('\t').unwrap();
        assert_eq!(source.replace('/', "-"), target, "style 7 is YYYY/MM/DD");
    }
    assert!(fails(&["dates", "--split", "test", "--count", "3", "--style", "10"]).contains("--style is 10"));
}

#[test]
fn training_is_reproducible_across_threads_and_resume() {
    let dir = scratch("repro");
    let (train, valid) = data(&dir);
    let run = |name: &str, threads: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let log = dir.join(format!("{name}.jsonl"));
        let mut args = vec!["train", "--data", s(&train), "--valid", s(&valid), "--output", s(&out)];
        args.extend(["--log", s(&log), "--eval-every", "6", "--threads", threads]);
        args.extend(TINY);
        args.extend(extra);
        ok(&args);
        out
    };
    let one = run("one.safetensors", "1", &[]);
    let two = run("two.safetensors", "2", &[]);
    assert_eq!(
        std::fs::read(&one).unwrap(),
        std::fs::read(&two).unwrap(),
        "1 and 2 threads"
    );
    // Stopped after step 5, then resumed: the same bytes as the uninterrupted run.
    let resumed = run("resumed.safetensors", "2", &["--stop-after", "5"]);
    assert_ne!(std::fs::read(&resumed).unwrap(), std::fs::read(&one).unwrap());
    run("resumed.safetensors", "1", &["--resume"]);
    assert_eq!(
        std::fs::read(&resumed).unwrap(),
        std::fs::read(&one).unwrap(),
        "stop and --resume"
    );
    // The log: one line a step, and the evaluations at steps 6 and 12.
    let log = std::fs::read_to_string(dir.join("one.safetensors.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 12);
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("valid_accuracy").is_some()).collect();
    assert_eq!(
        evals.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![6, 12]
    );
    assert!(lines[0]["lr"].as_f64().unwrap() > 0.0 && lines[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    // The checkpoint translates, and --init continues from it.
    let out = ok(&["translate", "--model", s(&one), "28 Nov 2026", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["translations"][0]["source"], "28 Nov 2026");
    let err = fails(&[
        "train",
        "--data",
        s(&train),
        "--output",
        s(&dir.join("x.safetensors")),
        "--init",
        s(&one),
        "--d-model",
        "32",
    ]);
    assert!(
        err.contains("--d-model is 32, but the --init checkpoint has 16"),
        "{err}"
    );
}

#[test]
fn the_plot_is_a_png_and_bad_input_is_named() {
    let dir = scratch("plot");
    let (train, valid) = data(&dir);
    let out = dir.join("m.safetensors");
    let plot = dir.join("curves.png");
    let mut args = vec![
        "train",
        "--data",
        s(&train),
        "--valid",
        s(&valid),
        "--output",
        s(&out),
        "--plot",
        s(&plot),
    ];
    args.extend(TINY);
    ok(&args);
    assert_eq!(&std::fs::read(&plot).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let bad = dir.join("bad.tsv");
    std::fs::write(&bad, "28 Nov 2026\t2026-11-28\nno tab here\n").unwrap();
    let err = fails(&["train", "--data", s(&bad), "--output", s(&out)]);
    assert!(err.contains("bad.tsv:2: expected `source<TAB>target`"), "{err}");
    let err = fails(&[
        "train",
        "--data",
        s(&train),
        "--output",
        s(&dir.join("none.safetensors")),
        "--resume",
    ]);
    assert!(err.contains("--resume"), "{err}");
    let err = fails(&["translate", "--model", s(&train), "x"]);
    assert!(err.contains("train.tsv"), "{err}");
}

#[test]
fn the_shipped_translator_answers_and_draws() {
    let out = ok(&[
        "translate",
        "28 November 2026",
        "saturday 28 nov 2026",
        "the 4th of July 1976",
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["2026-11-28", "2026-11-28", "1976-07-04"]
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["translate", "31.12.1999", "--json", "--logits"])).unwrap();
    let t = &json["translations"][0];
    assert_eq!(t["output"], "1999-12-31");
    let tokens = t["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 11, "ten characters and <eos>");
    assert_eq!(tokens.last().unwrap(), 2);
    assert_eq!(t["logits"].as_array().unwrap().len(), 11);
    assert!(t["log_prob"].as_f64().unwrap() <= 0.0);
    let beam = ok(&["translate", "Nov 28, 2026", "--beam", "4"]);
    assert_eq!(beam.trim(), "2026-11-28");
    let dir = scratch("shipped");
    let (png, html, export) = (dir.join("a.png"), dir.join("a.html"), dir.join("m.safetensors"));
    ok(&["translate", "28 Nov 2026", "--attention", s(&png)]);
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    ok(&["translate", "28 Nov 2026", "--attention", s(&html)]);
    let page = std::fs::read_to_string(&html).unwrap();
    for needle in [
        "28 Nov 2026",
        "2026-11-28",
        "layer 1, head 3",
        "mean of all layers and heads",
        "legend",
    ] {
        assert!(page.contains(needle), "{needle}");
    }
    // In a real browser (when Chromium is there; `cargo xtask ci` installs it): the matrix of
    // the mean view has a cell per output and source position.
    if let Some(chromium) = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok())
    {
        let dom = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(format!("file://{}", html.display()))
            .output()
            .unwrap();
        let dom = String::from_utf8_lossy(&dom.stdout);
        // "28 Nov 2026" + <eos> = 12 source positions; "2026-11-28" + <eos> = 11 output positions.
        assert_eq!(
            dom.split("<td title=\"")
                .skip(1)
                .filter(|c| !c.starts_with("${"))
                .count(),
            12 * 11,
            "{dom}"
        );
        assert!(
            dom.contains(r#"class="on""#),
            "the token view marks the first output character"
        );
    }
    ok(&["translate", "--export", s(&export)]);
    let again = ok(&["translate", "--model", s(&export), "28 November 2026"]);
    assert_eq!(again.trim(), "2026-11-28");
    assert!(fails(&["translate", "x", "--logits"]).contains("--logits needs --json"));
}

#[test]
fn the_demo_translates_draws_and_checks() {
    let out = ok(&["demo", "--plain"]);
    for needle in [
        "Saturday, 28 November 2026  ->  2026-11-28",
        "cross-attention of",
        "<- '",
        "check: incremental decoding",
        "ok)",
        "--text",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    let out = ok(&["demo", "--plain", "--text", "1 jan 2000"]);
    assert!(out.contains("1 jan 2000  ->  2000-01-01"), "{out}");
}
