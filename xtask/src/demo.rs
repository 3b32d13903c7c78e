//! `cargo xtask train-demo`: trains, checks and evaluates the date translator shipped in the binary.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{cargo, root, run};

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
pub fn train_demo(check: bool, evaluate: bool, bf16: bool) -> Result<()> {
    if bf16 && (check || evaluate) {
        bail!(
            "train-demo --precision bf16 trains a model to compare, not the shipped one: without --check or --evaluate"
        );
    }
    run(cargo().args(["build", "--release", "-p", "attn-cli"]))?;
    let attn = root().join("target/release/attn");
    let dir = root().join(if bf16 {
        "target/train-demo-bf16"
    } else {
        "target/train-demo"
    });
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
    let plot = if check || bf16 {
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
        .args(DEMO_TRAIN)
        .args(if bf16 { &["--precision", "bf16"][..] } else { &[] });
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
    if !bf16 {
        std::fs::copy(&model, &shipped)?;
    }
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
