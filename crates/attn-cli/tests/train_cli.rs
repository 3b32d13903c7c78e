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
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("attn-train-test-{}-{name}", std::process::id()));
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

fn usage_error(args: &[&str]) -> String {
    let out = attn(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "attn {args:?} should be a usage error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn dates_are_tsv_pairs_of_the_eleven_styles_and_the_unanswerable() {
    let text = ok(&["dates", "--split", "test", "--count", "40", "--seed", "9"]);
    assert_eq!(text.lines().count(), 40);
    for line in text.lines() {
        let (source, target) = line.split_once('\t').unwrap();
        assert!(!source.trim().is_empty());
        assert_eq!(target.len(), 10, "{target}");
        assert_eq!(&target[4..5], "-");
    }
    let styled = ok(&[
        "dates", "--split", "test", "--count", "20", "--seed", "9", "--style", "7",
    ]);
    for line in styled.lines() {
        let (source, target) = line.split_once('\t').unwrap();
        // YYYY/MM/DD, with or without leading zeros, any spaces around.
        let parts: Vec<usize> = source.trim().split('/').map(|p| p.parse().unwrap()).collect();
        let want: Vec<usize> = target.split('-').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts, want, "{line}");
    }
    assert!(fails(&["dates", "--split", "test", "--count", "3", "--style", "11"]).contains("--style is 11"));
    for kind in [
        "feb29",
        "past-month-end",
        "bad-number",
        "out-of-range",
        "empty",
        "words",
        "characters",
        "digits",
        "partial",
        "junk",
    ] {
        let text = ok(&[
            "dates", "--split", "test", "--kind", kind, "--count", "20", "--seed", "3",
        ]);
        assert_eq!(text.lines().count(), 20, "{kind}");
        assert!(text.lines().all(|l| l.ends_with("\t?")), "{kind}: {text}");
    }
    let mixed = ok(&[
        "dates", "--split", "train", "--kind", "mixed", "--count", "400", "--seed", "3",
    ]);
    let unanswerable = mixed.lines().filter(|l| l.ends_with("\t?")).count();
    assert!((80..160).contains(&unanswerable), "{unanswerable} of 400");
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
    // A save interrupted between its two files (the state of step 6 written, the checkpoint
    // still step 3's): --resume takes the state that matches the checkpoint, the one kept as
    // `.state.prev`, and reaches the same bytes.
    let at3 = run("at3.safetensors", "2", &["--stop-after", "3"]);
    let torn = run("torn.safetensors", "2", &["--stop-after", "6", "--save-every", "3"]);
    std::fs::copy(&at3, &torn).unwrap();
    run("torn.safetensors", "1", &["--resume"]);
    assert_eq!(
        std::fs::read(&torn).unwrap(),
        std::fs::read(&one).unwrap(),
        "resume after a torn save"
    );
    // With no state that matches, --resume refuses rather than continue from the wrong one.
    let refuses_resume = |out: &Path| {
        let mut args = vec!["train", "--data", s(&train), "--valid", s(&valid), "--output", s(out)];
        args.extend(["--eval-every", "6", "--resume"]);
        args.extend(TINY);
        let err = fails(&args);
        assert!(
            err.contains("is not the checkpoint") && err.contains("cannot continue"),
            "{err}"
        );
    };
    let torn = run("torn2.safetensors", "2", &["--stop-after", "6", "--save-every", "3"]);
    std::fs::copy(&at3, &torn).unwrap();
    std::fs::remove_file(dir.join("torn2.safetensors.state.prev")).unwrap();
    refuses_resume(&torn);
    // Nor when the kept state is there but matches neither: a checkpoint from another save.
    let other = run("torn3.safetensors", "2", &["--stop-after", "6", "--save-every", "3"]);
    std::fs::copy(&one, &other).unwrap();
    assert!(dir.join("torn3.safetensors.state.prev").exists());
    refuses_resume(&other);
    // `--stop-after` at or before the checkpoint's step trains nothing but saves again: the
    // torn pair is whole after it, so `--resume` no longer needs the kept state.
    let mended = run("mended.safetensors", "2", &["--stop-after", "6", "--save-every", "3"]);
    std::fs::copy(&at3, &mended).unwrap();
    run("mended.safetensors", "1", &["--resume", "--stop-after", "3"]);
    std::fs::remove_file(dir.join("mended.safetensors.state.prev")).unwrap();
    run("mended.safetensors", "1", &["--resume"]);
    assert_eq!(
        std::fs::read(&mended).unwrap(),
        std::fs::read(&one).unwrap(),
        "resume after a mended save"
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

/// `--precision bf16` (mixed precision): the same bytes on 1 and 2 threads and after a stop and
/// `--resume` (the bf16 copies are packed again from the resumed f32 weights), an f32
/// checkpoint (every tensor F32), and other weights than the f32 run's. On a CPU without bf16
/// instructions it runs f32, says so, and gives the f32 run's bytes.
#[test]
fn mixed_precision_training_is_reproducible_and_saves_f32() {
    let dir = scratch("bf16-train");
    let (train, valid) = data(&dir);
    let run = |name: &str, threads: &str, extra: &[&str]| -> (PathBuf, String) {
        let out = dir.join(name);
        let mut args = vec!["train", "--data", s(&train), "--valid", s(&valid), "--output", s(&out)];
        args.extend(["--eval-every", "6", "--threads", threads]);
        args.extend(TINY);
        args.extend(extra);
        let output = attn(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        (out, String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (one, stderr) = run("one.safetensors", "1", &["--precision", "bf16"]);
    let (two, _) = run("two.safetensors", "2", &["--precision", "bf16"]);
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(bytes(&one), bytes(&two), "1 and 2 threads");
    let (resumed, _) = run(
        "resumed.safetensors",
        "2",
        &["--precision", "bf16", "--stop-after", "5"],
    );
    run("resumed.safetensors", "1", &["--precision", "bf16", "--resume"]);
    assert_eq!(bytes(&resumed), bytes(&one), "stop and --resume");
    // Every tensor of the checkpoint is f32: the master weights.
    let file = bytes(&one);
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + header_len]).unwrap();
    for (name, entry) in header.as_object().unwrap() {
        if name != "__metadata__" {
            assert_eq!(entry["dtype"], "F32", "{name}");
        }
    }
    let (f32_run, _) = run("f32.safetensors", "2", &[]);
    if attn_nn::core::kernels::bf16_level() == attn_nn::core::kernels::Bf16Level::None {
        // Once, naming the flag as it was given.
        assert_eq!(stderr.matches("attn: --precision bf16: ").count(), 1, "{stderr}");
        assert!(stderr.contains("running f32"), "{stderr}");
        assert_eq!(bytes(&one), bytes(&f32_run), "bf16 without the instructions is f32");
    } else {
        assert!(!stderr.contains("running f32"), "{stderr}");
        assert_ne!(bytes(&one), bytes(&f32_run), "bf16 gave the f32 run's weights");
    }
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
    // Models and batches past the memory cap are refused before anything is made (each of
    // these asked the allocator for terabytes and aborted), by `attn train` and `attn bench
    // train` alike; nothing is written.
    let huge = dir.join("huge.safetensors");
    for flags in [
        &["--d-model", "1000000", "--nhead", "1"][..],
        &["--dim-feedforward", "10000000000"],
        &["--encoder-layers", "100000000"],
        &["--batch-size", "100000000000"],
        &["--batch-size", "100000000000", "--micro-batch", "1"],
    ] {
        for command in [&["train", "--output", s(&huge)][..], &["bench", "train"]] {
            let mut args = command.to_vec();
            args.extend(["--data", s(&train), "--steps", "1"]);
            args.extend(flags);
            let err = fails(&args);
            assert!(
                err.contains(
                    "training (the weights, gradients and AdamW's moments, a micro-batch's activations) would need"
                ) && err.contains("over the memory limit"),
                "{args:?}: {err}"
            );
        }
    }
    assert!(!huge.exists());
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
    // Every spelling of the contract, and `?` where there is no answer (greedy and beam alike).
    for (source, want) in [
        ("08.05.1911", "1911-05-08"),
        ("8.5.1911", "1911-05-08"),
        ("1911/5/8", "1911-05-08"),
        ("2026-11-28", "2026-11-28"),
        ("  12   august    1975  ", "1975-08-12"),
        ("30 February 2001", "?"),
        ("31 April 2020", "?"),
        ("29 February 1900", "?"),
        ("1 January 1850", "?"),
        ("asdf qwerty", "?"),
        ("", "?"),
        ("12345", "?"),
    ] {
        assert_eq!(ok(&["translate", source]).trim_end_matches('\n'), want, "{source:?}");
        assert_eq!(
            ok(&["translate", "--beam", "3", source]).trim_end_matches('\n'),
            want,
            "beam: {source:?}"
        );
    }
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
    assert!(
        out.contains("30 February 2001  ->  ?  (not a date it can read)"),
        "{out}"
    );
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
    let out = ok(&["demo", "--plain", "--text", "asdf qwerty"]);
    assert!(out.contains("asdf qwerty  ->  ?  (not a date it can read)"), "{out}");
    assert!(out.contains("no part of an answer looked"), "{out}");

    // The last line points at the BERT view: at the model's folder when it holds a config
    // (`ATTN_MODEL_DIR`, else where `cargo xtask fetch-model` installs), else at how to get one.
    let dir = scratch("demo_hint");
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    for (folder, hint) in [
        (
            dir.clone(),
            format!("a BERT model's heads: attn demo --model {}", dir.display()),
        ),
        (
            dir.join("absent"),
            "a BERT model's heads: cargo xtask fetch-model, then attn demo --model DIR".to_string(),
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_attn"))
            .args(["demo", "--plain", "--text", "1 jan 2000"])
            .env("ATTN_MODEL_DIR", &folder)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().last().map(str::trim), Some(hint.as_str()), "{text}");
    }
}

/// A run that goes wrong says so and keeps what it had: a non-finite loss or gradient norm
/// stops it, naming the step and the quantity, and leaves the last good checkpoint; paths are
/// checked before step 1; flags out of range are usage errors; resuming with other flags names
/// them.
#[test]
fn training_never_saves_garbage() {
    let dir = scratch("garbage");
    let (train, _) = data(&dir);
    let out = dir.join("m.safetensors");
    let mut args = vec!["train", "--data", s(&train), "--output", s(&out), "--save-every", "1"];
    args.extend(TINY);
    args.extend(["--lr", "1e9"]);
    // The shared flags clip the gradients; without clipping a rate of 1e9 ruins the weights at once.
    let args: Vec<&str> = args
        .into_iter()
        .filter(|a| *a != "--clip-norm" && *a != "1.0")
        .collect();
    let err = fails(&args);
    assert!(
        err.contains("step 2: the") && (err.contains("NaN") || err.contains("inf")),
        "{err}"
    );
    assert!(err.contains("the weights were not updated"), "{err}");
    assert!(err.contains("of step 1 is intact"), "{err}");
    // Before any save, a failed step says that nothing was written, and nothing was.
    let unsaved = dir.join("unsaved.safetensors");
    let mut ruin = args.clone();
    ruin[4] = s(&unsaved);
    ruin[6] = "5";
    let err = fails(&ruin);
    assert!(
        err.contains("step 2: the") && err.contains("no checkpoint was written"),
        "{err}"
    );
    assert!(!unsaved.exists());
    // A resumed run names the step it resumed from as the one on disk.
    let resumed = dir.join("resumed.safetensors");
    let mut ruin = args.clone();
    ruin[4] = s(&resumed);
    ok(&[&ruin[..], &["--stop-after", "1"]].concat());
    let err = fails(&[&ruin[..], &["--resume"]].concat());
    assert!(
        err.contains("step 2: the") && err.contains("of step 1 is intact"),
        "{err}"
    );
    // The checkpoint on disk is step 1's, and every weight in it is finite.
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        let finite = view
            .data()
            .chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite());
        assert!(finite, "{name}");
    }

    // Paths that cannot be written are found before step 1: nothing is trained or written.
    let missing = dir.join("no/such/folder");
    for (flag, path) in [
        ("--output", missing.join("m.safetensors")),
        ("--log", missing.join("log.jsonl")),
        ("--plot", missing.join("curves.png")),
    ] {
        let fresh = dir.join("fresh.safetensors");
        let output = if flag == "--output" {
            path.clone()
        } else {
            fresh.clone()
        };
        let mut args = vec!["train", "--data", s(&train), "--output", s(&output)];
        if flag != "--output" {
            args.extend([flag, s(&path)]);
        }
        args.extend(TINY);
        let err = fails(&args);
        assert!(err.contains(flag) && err.contains("does not exist"), "{flag}: {err}");
        assert!(!fresh.exists(), "{flag}: nothing written");
    }
    let err = usage_error(&[
        "train",
        "--data",
        s(&train),
        "--output",
        s(&out),
        "--plot",
        "curves.svg",
    ]);
    assert!(err.contains("expected a .png file"), "{err}");
    let err = usage_error(&["train", "--data", s(&train), "--output", s(&out), "--steps", "0"]);
    assert!(err.contains("--steps") && err.contains("at least 1"), "{err}");
    let err = fails(&["train", "--data", s(&train), "--output", s(&out), "--lr=-0.001"]);
    assert!(err.contains("--lr is -0.001"), "{err}");

    // The closing line names everything written.
    let (log, plot, good) = (
        dir.join("log.jsonl"),
        dir.join("curves.png"),
        dir.join("good.safetensors"),
    );
    let mut args = vec![
        "train",
        "--data",
        s(&train),
        "--output",
        s(&good),
        "--log",
        s(&log),
        "--plot",
        s(&plot),
    ];
    args.extend(TINY);
    let started = std::time::Instant::now();
    let said = ok(&args);
    let wall = started.elapsed().as_secs_f64();
    for path in [&good, &dir.join("good.safetensors.state"), &log, &plot] {
        assert!(said.contains(s(path)), "{}: {said}", path.display());
        assert!(path.exists());
    }
    // Each step's rate is the tokens so far over the time since training began: at least
    // what the whole process's time allows, and nothing absurd.
    let mut tokens = 0.0;
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        tokens += line["tokens"].as_f64().unwrap();
        let rate = line["tokens_per_s"].as_f64().unwrap();
        assert!(
            rate >= tokens / wall && rate < 1e12,
            "{rate} tokens/s: {tokens} tokens in {wall} s"
        );
    }
    assert!(tokens > 0.0);
    // Resuming with other flags names each flag that differs.
    let mut args = vec!["train", "--data", s(&train), "--output", s(&good), "--resume"];
    args.extend(TINY);
    args.extend(["--lr", "0.002", "--weight-decay", "0.02"]);
    let err = fails(&args);
    assert!(err.contains("--lr: 0.001 -> 0.002"), "{err}");
    assert!(err.contains("--weight-decay: 0.01 -> 0.02"), "{err}");
}

/// `attn bench train` times the steps after an untimed one and reports them: JSON with the
/// fields docs/CLI.md lists (the parameter count that of the checkpoint `attn train` writes with
/// the same flags), and two lines of text without `--json`.
#[test]
fn bench_train_times_steps_and_reports_them() {
    let dir = scratch("bench-train");
    let (train, _) = data(&dir);
    let flags: Vec<&str> = TINY
        .chunks(2)
        .filter(|pair| pair[0] != "--steps")
        .flatten()
        .copied()
        .filter(|flag| *flag != "--quiet")
        .collect();
    let mut args = vec!["bench", "train", "--data", s(&train), "--steps", "8", "--threads", "2"];
    args.extend(&flags);
    let started = std::time::Instant::now();
    let json: serde_json::Value = serde_json::from_str(&ok(&[&args[..], &["--json"]].concat())).unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(json["op"], "train");
    assert_eq!(json["runs"], 8);
    assert_eq!(json["threads"], 2);
    assert_eq!(json["processes"], 1);
    assert_eq!(json["dtype"], "f32");
    let (median, min) = (json["median_s"].as_f64().unwrap(), json["min_s"].as_f64().unwrap());
    // Eight steps timed to the nanosecond: the median is above the fastest.
    assert!(0.0 < min && min < median && median < 60.0, "{json}");
    // Each step trains 8 dates of 10 characters (plus at most 2 tokens each), in at most the
    // process's time, and the 8 steps take at least 4 times the fastest and 4 times the median.
    let rate = json["tokens_per_s"].as_f64().unwrap();
    assert!(
        rate >= 8.0 * 80.0 / wall && rate <= 8.0 * 96.0 / (4.0 * min + 4.0 * median),
        "{rate}: {json}"
    );
    // The tiny model's buffers are under 64 KiB, and the arena keeps what it took: a step asks
    // the allocator for nothing large, at the median.
    assert_eq!(json["large_allocations_per_step"], 0, "{json}");
    assert_eq!(json["large_allocated_bytes_per_step"], 0, "{json}");
    assert!(json["large_allocations_last_half"].as_u64().is_some(), "{json}");
    let resident = json["resident_bytes_first"].as_u64().unwrap() as f64 / (1u64 << 20) as f64;
    assert!(json["resident_bytes_last"].as_u64().unwrap() as f64 >= resident * (1u64 << 19) as f64);
    for field in ["communication_median_s", "optimizer_median_s", "simd", "bf16"] {
        assert!(json.get(field).is_some(), "{field}: {json}");
    }
    let out = dir.join("m.safetensors");
    let mut train_args = vec![
        "train",
        "--data",
        s(&train),
        "--output",
        s(&out),
        "--steps",
        "1",
        "--quiet",
    ];
    train_args.extend(&flags);
    ok(&train_args);
    let bytes = std::fs::read(&out).unwrap();
    let numel: usize = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors()
        .iter()
        .map(|(_, view)| view.shape().iter().product::<usize>())
        .sum();
    assert_eq!(json["parameters"].as_u64().unwrap() as usize, numel, "{json}");
    let text = ok(&args);
    assert!(
        text.contains("train (f32): median") && text.contains("(8 steps, 2 threads)"),
        "{text}"
    );
    assert!(
        text.contains("allocations of 64 KiB or more: median 0 per step (0.0 MiB)"),
        "{text}"
    );
    // The resident memory in MiB, as the JSON run (another process) measured it, within 2x.
    let before: f64 = text
        .split("resident memory ")
        .nth(1)
        .unwrap()
        .split(" MiB")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        before >= resident / 2.0 && before <= resident * 2.0,
        "{before} MiB against {resident}: {text}"
    );
}

/// Without a terminal, each evaluation is one line on stderr unless `--quiet`; stdout has the
/// closing line either way.
#[test]
fn evaluations_are_reported_unless_quiet() {
    let dir = scratch("quiet");
    let (train, valid) = data(&dir);
    let out = dir.join("m.safetensors");
    let mut args = vec!["train", "--data", s(&train), "--valid", s(&valid), "--output", s(&out)];
    args.extend(["--eval-every", "6"]);
    args.extend(TINY.iter().filter(|a| **a != "--quiet"));
    let loud = attn(&args);
    assert!(loud.status.success(), "{}", String::from_utf8_lossy(&loud.stderr));
    let stderr = String::from_utf8_lossy(&loud.stderr);
    for step in [6, 12] {
        assert!(
            stderr.contains(&format!("step {step}: valid loss")) && stderr.contains("exact match"),
            "{stderr}"
        );
    }
    args.push("--quiet");
    let quiet = attn(&args);
    assert!(quiet.status.success());
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("valid loss"));
    for out in [&loud.stdout, &quiet.stdout] {
        assert!(String::from_utf8_lossy(out).starts_with("trained "));
    }
}

/// With `--no-shuffle`, step `s` trains on lines `(s − 1)·B …` of the file (each step's logged
/// target tokens are those lines' targets plus the same count per pair), and the logged rate is
/// `--lr` times the warm-up's `s / 100`.
#[test]
fn the_log_follows_the_file_order_and_the_warmup() {
    let dir = scratch("order");
    let data = dir.join("pairs.tsv");
    // Targets of 1 to 7 characters, so that every batch of 8 has its own token count.
    let targets: Vec<String> = (0..60)
        .map(|i| "abcdefg"[..1 + (i * i + 3 * i) % 7].to_string())
        .collect();
    let lines: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| format!("line {i}\t{t}"))
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let (out, log) = (dir.join("m.safetensors"), dir.join("log.jsonl"));
    let mut args = vec![
        "train",
        "--data",
        s(&data),
        "--output",
        s(&out),
        "--log",
        s(&log),
        "--no-shuffle",
    ];
    args.extend(TINY);
    ok(&args);
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 12);
    let chars = |step: usize| -> usize { (0..8).map(|j| targets[((step - 1) * 8 + j) % 60].len()).sum() };
    let tokens = |step: usize| steps[step - 1]["tokens"].as_u64().unwrap() as usize;
    let per_pair = (tokens(1) - chars(1)) / 8;
    assert!(per_pair <= 2 && tokens(1) == chars(1) + 8 * per_pair, "{}", tokens(1));
    for step in 1..=12 {
        assert_eq!(tokens(step), chars(step) + 8 * per_pair, "step {step}");
        let lr = steps[step - 1]["lr"].as_f64().unwrap();
        let want = 1e-3 * step as f64 / 100.0;
        assert!((lr - want).abs() <= 1e-6 * want, "step {step}: lr {lr}, want {want}");
    }
}

/// On a terminal `attn train` draws a progress bar (steps, loss, tokens per second) with the
/// evaluations printed above it, and `--quiet` draws nothing. The terminal is a pseudo-terminal
/// from `script` (util-linux); where `script` is missing the test says so and passes.
#[test]
fn a_terminal_gets_a_progress_bar_unless_quiet() {
    if Command::new("script").arg("--version").output().is_err() {
        println!("skipped: no `script` (util-linux) for a pseudo-terminal");
        return;
    }
    let dir = scratch("terminal");
    let (train, valid) = data(&dir);
    let out = dir.join("m.safetensors");
    let mut args = vec![
        env!("CARGO_BIN_EXE_attn"),
        "train",
        "--data",
        s(&train),
        "--valid",
        s(&valid),
    ];
    args.extend(["--output", s(&out), "--eval-every", "6"]);
    args.extend(TINY.iter().filter(|a| **a != "--quiet"));
    let on_terminal = |args: &[&str]| -> String {
        // Each argument single-quoted for `script`'s shell, a quote inside it closed and escaped.
        let line: Vec<String> = args.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect();
        let out = Command::new("script")
            .args(["-qec", &line.join(" "), "/dev/null"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        text
    };
    let loud = on_terminal(&args);
    for shown in [
        "12/12 steps",
        "tok/s",
        "step 6: valid loss",
        "step 12: valid loss",
        "trained",
    ] {
        assert!(loud.contains(shown), "{shown}: {loud}");
    }
    args.push("--quiet");
    let quiet = on_terminal(&args);
    assert!(quiet.contains("trained"), "{quiet}");
    for hidden in ["/12 steps", "tok/s", "valid loss"] {
        assert!(!quiet.contains(hidden), "{hidden}: {quiet}");
    }
}

/// TSV: blank lines at the end are ignored, an empty source is a text like any other, a line
/// that is not UTF-8 is named.
#[test]
fn tsv_edges() {
    let dir = scratch("tsv");
    let data = dir.join("pairs.tsv");
    std::fs::write(&data, "28 Nov 2026\t2026-11-28\n\t?\nasdf\t?\n\n\n").unwrap();
    let out = dir.join("m.safetensors");
    let mut args = vec!["train", "--data", s(&data), "--output", s(&out)];
    args.extend(TINY);
    ok(&args);
    std::fs::write(&data, b"28 Nov 2026\t2026-11-28\n\xff\t?\n").unwrap();
    let err = fails(&args);
    assert!(err.contains("pairs.tsv:2: not UTF-8"), "{err}");
    std::fs::write(&data, "28 Nov 2026\t2026-11-28\n\nasdf\t?\n").unwrap();
    let err = fails(&args);
    assert!(err.contains("pairs.tsv:2: expected `source<TAB>target`"), "{err}");
}

/// `attn translate` says what it cannot read: characters outside the vocabulary (which, and on
/// how many lines), a line longer than the model reads (by number, not echoed); counts of 0 are
/// usage errors.
#[test]
fn translate_reports_what_it_cannot_read() {
    let out = attn(&[
        "translate",
        "28 novembre 2026 \u{e9}",
        "1 janvier 2000 \u{e9}\u{20ac}",
        "3 May 2001",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 arguments (the first: argument 1) have characters the model does not know"),
        "{err}"
    );
    assert!(
        err.contains("'\u{e9}' (2×)") && err.contains("'\u{20ac}' (1×)"),
        "{err}"
    );
    let dir = scratch("translate");
    let long = dir.join("long.txt");
    std::fs::write(&long, format!("28 Nov 2026\n{}\n", "7".repeat(10_001))).unwrap();
    let err = fails(&["translate", "--input", s(&long)]);
    assert!(
        err.contains("line 2 is 10,001 characters, the model reads at most"),
        "{err}"
    );
    assert!(!err.contains("777777"), "the line is not echoed: {err}");
    // At the edge: the shipped model's positions hold 102, the source and its `<eos>`, so 101
    // characters are read and 102 are refused.
    ok(&["translate", &"7".repeat(101)]);
    let err = fails(&["translate", &"7".repeat(102)]);
    assert!(
        err.contains("argument 1 is 102 characters, the model reads at most 101"),
        "{err}"
    );
    // Decoding's caches past the memory cap are refused before they are allocated (a beam of
    // a billion was killed by the kernel, out of memory).
    let err = fails(&["translate", "--beam", "1000000000", "3 May 2001"]);
    assert!(
        err.contains("beam search (caches of every hypothesis) would need") && err.contains("over the memory limit"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["translate", "3 May 2001"])
        .env("ATTN_MAX_MEMORY", "100K")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("greedy decoding (caches of a batch) would need"),
        "{err}"
    );
    // A checkpoint whose `max_len` no file backs (the position table is made from it) is an
    // error naming the field, not an abort.
    let exported = dir.join("exported.safetensors");
    ok(&["translate", "--export", s(&exported)]);
    let huge = dir.join("huge-max-len.safetensors");
    std::fs::write(&huge, with_max_len(&std::fs::read(&exported).unwrap(), 1 << 40)).unwrap();
    let err = fails(&["translate", "--model", s(&huge), "3 May 2001"]);
    assert!(
        err.contains("max_len") && err.contains("at most 2097152 at d_model 128"),
        "{err}"
    );
    assert!(usage_error(&["translate", "--beam", "0", "x"]).contains("--beam"));
    assert!(usage_error(&["translate", "--max-len", "0", "x"]).contains("--max-len"));
    assert!(usage_error(&["translate", "x", "--attention", "x.svg"]).contains(".png or .html"));
}

/// `checkpoint` with `max_len` set to `max_len` in its `attn.seq2seq` metadata.
fn with_max_len(checkpoint: &[u8], max_len: u64) -> Vec<u8> {
    let file = safetensors::SafeTensors::deserialize(checkpoint).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(checkpoint).unwrap();
    let mut metadata = header.metadata().clone().unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&metadata["attn.seq2seq"]).unwrap();
    config["max_len"] = max_len.into();
    metadata.insert("attn.seq2seq".into(), config.to_string());
    safetensors::serialize(file.tensors(), Some(metadata)).unwrap()
}

/// The demo's flags that do not apply are refused before any work, a closed pipe ends
/// `attn` quietly, and a bad `ATTN_SIMD` or `ATTN_GEMM` is a usage error.
#[test]
fn demo_flags_and_closed_pipes() {
    for args in [
        vec!["demo", "--head", "3"],
        vec!["demo", "--layer", "1"],
        vec!["demo", "--attention", "x.svg"],
        vec!["attend", "--text", "a cat", "--png", "x.jpg"],
        vec!["attend", "--text", "a cat", "--html", "x.htm"],
        vec![
            "bench",
            "sdpa",
            "--batch",
            "0",
            "--heads",
            "2",
            "--seq",
            "8",
            "--head-dim",
            "8",
        ],
        vec!["bench", "sweep", "--seq", "128,0"],
    ] {
        usage_error(&args);
    }
    let help = ok(&["demo", "--help"]);
    assert!(
        help.contains("date translator") && help.contains("docs/CLI.md"),
        "{help}"
    );
    for args in [
        vec!["demo", "--plain"],
        vec!["check", "--threads", "1"],
        // Streamed: 10^14 pairs once asked for 7 PB up front and aborted.
        vec!["dates", "--split", "train", "--count", "100000000000000"],
    ] {
        use std::io::Read;
        let mut child = Command::new(env!("CARGO_BIN_EXE_attn"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 16];
        child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked") && !err.contains("error"), "{args:?}: {err}");
        // Killed by SIGPIPE, as `cat` is, or finished before it wrote again.
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert!(
                out.status.success() || out.status.signal() == Some(13),
                "{args:?}: {:?}",
                out.status
            );
        }
    }
    // One line on stderr, exit 2, before any work.
    for (var, value, want) in [
        (
            "ATTN_SIMD",
            "sse",
            "error: simd_level: ATTN_SIMD is \"sse\", expected one of scalar, avx2, avx512, avx512bf16, amx",
        ),
        (
            "ATTN_GEMM",
            "mkl",
            "error: gemm: ATTN_GEMM is \"mkl\", expected faer or own",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_attn"))
            .args(["check"])
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), want);
    }
}

/// Started by an MPI launcher as one of several processes, an attn built without the `mpi`
/// feature refuses (each process would train the whole run and write the same files) and
/// writes nothing; as the only process it runs.
#[test]
#[cfg(not(feature = "mpi"))]
fn without_mpi_several_launched_processes_are_refused() {
    let dir = scratch("launched");
    let (train, _) = data(&dir);
    let out = dir.join("m.safetensors");
    let mut args = vec!["train", "--data", s(&train), "--output", s(&out)];
    args.extend(TINY);
    let run = |size: &str| {
        Command::new(env!("CARGO_BIN_EXE_attn"))
            .args(&args)
            .env("OMPI_COMM_WORLD_SIZE", size)
            .output()
            .unwrap()
    };
    let refused = run("2");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("one of 2 MPI processes") && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!out.exists());
    assert!(run("1").status.success());
    assert!(out.exists());
}

/// `count` held-out dates' sources (`attn dates --split test`), one per line, in `dir`.
fn held_out_sources(dir: &Path, count: usize, seed: u64) -> PathBuf {
    let (count, seed) = (count.to_string(), seed.to_string());
    let pairs = ok(&["dates", "--split", "test", "--count", &count, "--seed", &seed]);
    let sources: String = pairs
        .lines()
        .map(|l| format!("{}\n", l.split('\t').next().unwrap()))
        .collect();
    let input = dir.join("sources.txt");
    std::fs::write(&input, sources).unwrap();
    input
}

/// The shipped translator in bf16 (`--dtype bf16`): the same output as in f32 on 5,000 held-out
/// dates, log-probabilities within 6e-4 of f32's (measured 5.8e-5) but not equal to them (the products ran in bf16,
/// where the CPU has the instructions; elsewhere it runs f32 and says so).
#[test]
fn the_shipped_translator_in_bf16_gives_the_f32_answers() {
    let dir = scratch("bf16");
    let input = held_out_sources(&dir, 5000, 11);
    let parse = |text: String| -> Vec<(String, f64)> {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["translations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["output"].as_str().unwrap().to_string(),
                    t["log_prob"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let f32_out = parse(ok(&["translate", "--input", s(&input), "--json"]));
    let bf16 = attn(&["translate", "--input", s(&input), "--json", "--dtype", "bf16"]);
    assert!(bf16.status.success(), "{}", String::from_utf8_lossy(&bf16.stderr));
    let native = !String::from_utf8_lossy(&bf16.stderr).contains("running f32");
    let bf16_out = parse(String::from_utf8(bf16.stdout).unwrap());
    assert_eq!(f32_out.len(), 5000);
    let mut differs = 0;
    for (i, ((a, pa), (b, pb))) in f32_out.iter().zip(&bf16_out).enumerate() {
        assert_eq!(a, b, "input {i}");
        assert!((pa - pb).abs() < 6e-4, "input {i}: log_prob {pa} against {pb}");
        differs += usize::from(pa != pb);
    }
    if native {
        assert!(differs > 0, "bf16 gave f32's log-probabilities exactly");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A BF16 checkpoint (the shipped translator's weights rounded to bf16, as PyTorch's
/// `model.to(torch.bfloat16)` saves them) runs under `--dtype bf16` without being widened
/// (`Seq2Seq::from_checkpoint_in`, tested in attn-nn) and gives the shipped model's answers on
/// 500 held-out dates; under `--dtype f32` it is widened and gives them too.
#[test]
fn a_bf16_checkpoint_translates_in_bf16() {
    use attn_nn::core::kernels::f32_to_bf16;
    use safetensors::tensor::TensorView;
    let dir = scratch("bf16-checkpoint");
    let exported = dir.join("dates.safetensors");
    ok(&["translate", "--export", s(&exported)]);
    let bytes = std::fs::read(&exported).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let halves: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let words = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
            let half = words.flat_map(|x| f32_to_bf16(x).to_le_bytes()).collect();
            (name, view.shape().to_vec(), half)
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = halves
        .iter()
        .map(|(n, shape, b)| {
            (
                n.as_str(),
                TensorView::new(safetensors::Dtype::BF16, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    let bf16_file = dir.join("dates-bf16.safetensors");
    std::fs::write(
        &bf16_file,
        safetensors::serialize(views, header.metadata().clone()).unwrap(),
    )
    .unwrap();
    assert!(std::fs::metadata(&bf16_file).unwrap().len() < bytes.len() as u64 * 6 / 10);

    let input = held_out_sources(&dir, 500, 12);
    let shipped = ok(&["translate", "--input", s(&input)]);
    assert_eq!(shipped.lines().count(), 500);
    for dtype in ["bf16", "f32"] {
        let got = ok(&[
            "translate",
            "--input",
            s(&input),
            "--model",
            s(&bf16_file),
            "--dtype",
            dtype,
        ]);
        assert_eq!(got, shipped, "--dtype {dtype}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--resume` continues only the run it was saved by: other data, or a micro-batch that splits
/// the batch differently (which changes the bytes), is refused with what differs named; a
/// micro-batch of the whole batch is no split, and resumes a run saved without the flag.
#[test]
fn resume_refuses_other_data_and_another_split_of_the_batch() {
    let dir = scratch("resume-fingerprint");
    let (train, valid) = data(&dir);
    let other = dir.join("other.tsv");
    std::fs::write(
        &other,
        ok(&["dates", "--split", "train", "--count", "60", "--seed", "9"]),
    )
    .unwrap();
    let args = |data: &Path, out: &Path, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["train", "--data", s(data), "--valid", s(&valid), "--output", s(out)];
        args.extend(TINY);
        args.extend(extra);
        args.into_iter().map(String::from).collect()
    };
    let run = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let refused = |args: Vec<String>| fails(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let split = dir.join("split.safetensors");
    run(args(&train, &split, &["--micro-batch", "4", "--stop-after", "3"]));
    let err = refused(args(&other, &split, &["--micro-batch", "4", "--resume"]));
    assert!(
        err.contains("had other data or flags") && err.contains("--data (its pairs' hash)"),
        "{err}"
    );
    let err = refused(args(&train, &split, &["--resume"]));
    assert!(
        err.contains("had other data or flags") && err.contains("--micro-batch"),
        "{err}"
    );
    run(args(&train, &split, &["--micro-batch", "4", "--resume"]));

    // Mixed precision gives other bytes: an f32 run does not resume a bf16 one.
    let mixed = dir.join("mixed.safetensors");
    run(args(&train, &mixed, &["--precision", "bf16", "--stop-after", "3"]));
    let err = refused(args(&train, &mixed, &["--resume"]));
    assert!(
        err.contains("had other data or flags") && err.contains("--precision"),
        "{err}"
    );

    // A micro-batch of the whole batch splits nothing: the run without the flag resumes it.
    let whole = dir.join("whole.safetensors");
    run(args(&train, &whole, &["--micro-batch", "8", "--stop-after", "3"]));
    run(args(&train, &whole, &["--resume"]));
    let plain = dir.join("plain.safetensors");
    run(args(&train, &plain, &[]));
    assert_eq!(std::fs::read(&whole).unwrap(), std::fs::read(&plain).unwrap());

    // The fingerprint names the micro-batch and the precision only when they change the bytes,
    // so that a run saved before those flags existed resumes.
    let fingerprint = |out: &Path| -> serde_json::Value {
        let mut state = out.as_os_str().to_owned();
        state.push(".state");
        let bytes = std::fs::read(&state).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        serde_json::from_str(&header.metadata().as_ref().unwrap()["run"]).unwrap()
    };
    let keys = |run: &serde_json::Value| -> Vec<String> { run.as_object().unwrap().keys().cloned().collect() };
    for out in [&plain, &whole] {
        let run = fingerprint(out);
        assert!(
            run.get("micro_batch").is_none() && run.get("precision").is_none(),
            "{:?}",
            keys(&run)
        );
    }
    assert_eq!(fingerprint(&split)["micro_batch"], 4);
    assert_eq!(fingerprint(&mixed)["precision"], "bf16");
}
