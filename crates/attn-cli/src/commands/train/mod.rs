//! `attn train`: a sequence-to-sequence Transformer trained on TSV pairs, as
//! docs/CLI.md specifies, and `attn bench train`.
//!
//! One step: a batch, the forward with seeded dropout, `F.cross_entropy` with label smoothing,
//! the backward, optional clipping, one AdamW update. Everything a step does is a function of
//! the data, the flags, the seed and the step number (the batch order, the dropout masks), and
//! every kernel gives the same bits on any thread count, so a run is reproducible byte for byte
//! and `--resume` continues as if it had not stopped.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use attn_nn::layers::Activation;
use attn_nn::{Seq2Seq, Seq2SeqConfig};
use serde_json::json;

use crate::support::checkpoint;
use crate::support::ranks::Ranks;
use crate::support::threads::Threads;

mod bench;
mod files;
mod trainer;

use files::{check_checkpoint_path, check_writable, data_hash, resume, run_fingerprint, save, state_path};

pub use bench::{bench, BenchArgs};
pub use trainer::{evaluate, Trainer};

/// The model's shape: defaults when training from scratch; with `--init`, a flag given must
/// agree with the checkpoint.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelFlags {
    /// d_model [default: 128]
    #[arg(long)]
    d_model: Option<usize>,
    /// Attention heads [default: 4]
    #[arg(long)]
    nhead: Option<usize>,
    /// Encoder layers [default: 2]
    #[arg(long)]
    encoder_layers: Option<usize>,
    /// Decoder layers [default: 2]
    #[arg(long)]
    decoder_layers: Option<usize>,
    /// Feed-forward width [default: 512]
    #[arg(long)]
    dim_feedforward: Option<usize>,
    /// Dropout probability on embeddings, residual branches and the feed-forward block [default: 0.1]
    #[arg(long)]
    dropout: Option<f64>,
    /// relu or gelu [default: relu]
    #[arg(long, value_enum)]
    activation: Option<ActivationFlag>,
    /// Pre-norm layers [default: post-norm, as in the paper]
    #[arg(long)]
    norm_first: bool,
}

/// `--activation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivationFlag {
    /// max(x, 0).
    Relu,
    /// Exact GELU.
    Gelu,
}

/// `--schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleFlag {
    /// `--lr` after a linear warm-up of `--warmup` steps.
    Constant,
    /// `--lr · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)` ("Attention Is All You Need").
    Noam,
    /// Linear warm-up, then a half cosine down to zero at `--steps`.
    Cosine,
}

/// The optimisation flags (shared by `attn train` and `attn bench train`).
#[derive(Debug, Clone, clap::Args)]
pub struct OptimFlags {
    /// Sequences per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// AdamW's β1,β2.
    #[arg(long, default_value = "0.9,0.98", value_parser = parse_betas)]
    betas: (f32, f32),
    /// AdamW's epsilon.
    #[arg(long, default_value_t = 1e-9)]
    eps: f32,
    /// Decoupled weight decay on every tensor.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Steps of linear warm-up.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// The learning-rate schedule.
    #[arg(long, value_enum, default_value_t = ScheduleFlag::Constant)]
    schedule: ScheduleFlag,
    /// Clip the gradients' global 2-norm to this (off unless given).
    #[arg(long)]
    clip_norm: Option<f32>,
    /// Label smoothing of the cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Seeds the weights, the batch order and the dropout masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Batches in file order (batch i = lines i·B … i·B+B−1, wrapping), not a seeded shuffle per epoch.
    #[arg(long)]
    no_shuffle: bool,
    /// Sequences per micro-batch (default: the whole batch): the step's gradient is the sum of
    /// the micro-batches' in a fixed tree, the same bytes on any number of MPI processes (each
    /// computes whole micro-batches); at least one micro-batch per process.
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
    micro_batch: Option<usize>,
    /// Mixed precision: `bf16` runs the linear maps' products, forward and backward, on bf16
    /// copies of the f32 master weights, packed again after every update; attention, norms,
    /// the gradients and AdamW stay f32, and checkpoints are f32. Without bf16 instructions it
    /// runs f32 and says so once.
    #[arg(long, visible_alias = "dtype", value_enum, default_value_t = crate::support::dtype::Dtype::F32)]
    pub precision: crate::support::dtype::Dtype,
}

fn parse_betas(text: &str) -> std::result::Result<(f32, f32), String> {
    let parts: Vec<&str> = text.split(',').collect();
    let parse = |s: &str| {
        s.trim()
            .parse::<f32>()
            .map_err(|_| format!("`{text}`: expected two numbers, as 0.9,0.98"))
    };
    match parts.as_slice() {
        [a, b] => Ok((parse(a)?, parse(b)?)),
        _ => Err(format!("`{text}`: expected two numbers, as 0.9,0.98")),
    }
}

/// `attn train`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  attn dates --split train --count 20000 --seed 1 > train.tsv\n  attn dates --split valid --count 500 --seed 2 > valid.tsv\n  attn train --data train.tsv --valid valid.tsv --output dates.safetensors --steps 2000 --eval-every 500 --plot loss.png\n\nTSV: one pair a line, source TAB target. The checkpoint is PyTorch's nn.Transformer state_dict with\nsrc_embed, tgt_embed and generator beside it; its configuration and vocabularies are in the metadata."
)]
pub struct Args {
    /// Training pairs: source TAB target, one a line.
    #[arg(long)]
    data: PathBuf,
    /// Validation pairs: exact-match accuracy and loss every --eval-every steps and at the end.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// The checkpoint to write (atomically, at every --save-every steps and at the end).
    #[arg(long)]
    output: PathBuf,
    /// Start from this checkpoint: its configuration and vocabularies.
    #[arg(long)]
    init: Option<PathBuf>,
    #[command(flatten)]
    model: ModelFlags,
    /// Steps to train (at least 1).
    #[arg(long, default_value_t = 1000, value_parser = crate::support::flags::at_least_one_u64)]
    steps: u64,
    #[command(flatten)]
    optim: OptimFlags,
    /// Evaluate on --valid every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Write the checkpoint (and the optimizer's state, for --resume) every N steps [default: --eval-every]
    #[arg(long)]
    save_every: Option<u64>,
    /// Continue the run whose checkpoint is --output (and its OUTPUT.state file), as if it had
    /// not stopped; the flags must be the run's.
    #[arg(long)]
    resume: bool,
    /// Stop after this step, saving the checkpoint and the optimizer's state (continue later
    /// with --resume and the same flags).
    #[arg(long)]
    stop_after: Option<u64>,
    /// One JSON object a line: every step, and every evaluation.
    #[arg(long)]
    log: Option<PathBuf>,
    /// A PNG of the training and validation curves (a .png file).
    #[arg(long, value_parser = crate::support::flags::png)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    threads: Threads,
}

/// Pairs read from a TSV file: `source<TAB>target` a line. The source may be empty (the empty
/// string is a text like any other), the target may not; blank lines at the end of the file are
/// ignored, a blank line before a pair is an error, and so is a line that is not UTF-8.
pub fn read_pairs(path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    while lines
        .last()
        .is_some_and(|l| l.iter().all(|b| b.is_ascii_whitespace() && *b != b'\t'))
    {
        lines.pop();
    }
    let mut pairs = Vec::with_capacity(lines.len());
    for (i, raw) in lines.iter().enumerate() {
        let line = std::str::from_utf8(raw).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not UTF-8 (invalid byte at column {})",
                path.display(),
                i + 1,
                e.valid_up_to() + 1
            )
        })?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut fields = line.split('\t');
        match (fields.next(), fields.next(), fields.next()) {
            (Some(s), Some(t), None) if !t.is_empty() => pairs.push((s.to_string(), t.to_string())),
            _ => bail!(
                "{}:{}: expected `source<TAB>target` (two fields, the target not empty), got {line:?}",
                path.display(),
                i + 1
            ),
        }
    }
    if pairs.is_empty() {
        bail!("{}: no pairs (expected `source<TAB>target` lines)", path.display());
    }
    Ok(pairs)
}

impl ModelFlags {
    /// The configuration for training from scratch on `pairs`.
    fn config(&self, pairs: &[(String, String)]) -> Result<Seq2SeqConfig> {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
        // attn-nn's defaults for these pairs are this command's; the flags given replace them.
        let mut config = Seq2SeqConfig::for_pairs(&pairs);
        let layer = &mut config.transformer.layer;
        layer.d_model = self.d_model.unwrap_or(layer.d_model);
        layer.nhead = self.nhead.unwrap_or(layer.nhead);
        layer.dim_feedforward = self.dim_feedforward.unwrap_or(layer.dim_feedforward);
        layer.dropout = self.dropout.unwrap_or(layer.dropout);
        if let Some(activation) = self.activation {
            layer.activation = match activation {
                ActivationFlag::Relu => Activation::Relu,
                ActivationFlag::Gelu => Activation::Gelu,
            };
        }
        layer.norm_first = self.norm_first;
        let t = &mut config.transformer;
        t.num_encoder_layers = self.encoder_layers.unwrap_or(t.num_encoder_layers);
        t.num_decoder_layers = self.decoder_layers.unwrap_or(t.num_decoder_layers);
        config.validate()?;
        Ok(config)
    }

    /// Fails naming the first flag given that disagrees with `config` (from `--init`).
    fn check_against(&self, config: &Seq2SeqConfig) -> Result<()> {
        let t = &config.transformer;
        let l = &t.layer;
        let activation = self.activation.map(|a| match a {
            ActivationFlag::Relu => Activation::Relu,
            ActivationFlag::Gelu => Activation::Gelu,
        });
        let checks: [(&str, Option<String>, String); 7] = [
            ("--d-model", self.d_model.map(|x| x.to_string()), l.d_model.to_string()),
            ("--nhead", self.nhead.map(|x| x.to_string()), l.nhead.to_string()),
            (
                "--encoder-layers",
                self.encoder_layers.map(|x| x.to_string()),
                t.num_encoder_layers.to_string(),
            ),
            (
                "--decoder-layers",
                self.decoder_layers.map(|x| x.to_string()),
                t.num_decoder_layers.to_string(),
            ),
            (
                "--dim-feedforward",
                self.dim_feedforward.map(|x| x.to_string()),
                l.dim_feedforward.to_string(),
            ),
            (
                "--activation",
                activation.map(|a| format!("{a:?}")),
                format!("{:?}", l.activation),
            ),
            (
                "--norm-first",
                self.norm_first.then(|| "true".to_string()),
                l.norm_first.to_string(),
            ),
        ];
        for (flag, given, init) in checks {
            if let Some(given) = given {
                if given != init {
                    bail!("{flag} is {given}, but the --init checkpoint has {init}");
                }
            }
        }
        Ok(())
    }
}

/// Runs `attn train`: one process, or every rank of an MPI job (`mpirun -np N attn train …`).
pub fn main(args: Args) -> Result<()> {
    let ranks = Ranks::join()?;
    ranks.or_abort(train(args, &ranks))
}

fn train(mut args: Args, ranks: &Ranks) -> Result<()> {
    if ranks.is_root() {
        check_writable("--output", &args.output)?;
        check_checkpoint_path("--output", &args.output)?;
        if let Some(path) = &args.log {
            check_writable("--log", path)?;
        }
        if let Some(path) = &args.plot {
            check_writable("--plot", path)?;
        }
    } else {
        args.quiet = true;
    }
    let pairs = read_pairs(&args.data)?;
    ranks.check_same("--data", data_hash(&pairs))?;
    // Only rank 0 evaluates.
    let valid = match &args.valid {
        Some(path) if ranks.is_root() => Some(read_pairs(path)?),
        _ => None,
    };
    let fingerprint = run_fingerprint(&args, &pairs);
    let model = initial_model(&args, &pairs, valid.as_deref())?;
    let save_every = args.save_every.unwrap_or(args.eval_every);
    let steps = args.steps;
    args.threads.install(|threads| {
        args.optim.precision.effective_for("--precision", ranks.is_root());
        let mut trainer = Trainer::new(model, pairs, args.optim.clone(), steps, ranks.size())?;
        let first = if args.resume {
            resume(&mut trainer, &args.output, &fingerprint)? + 1
        } else {
            1
        };
        let mut log = if ranks.is_root() { open_log(&args)? } else { None };
        let bar = progress(steps, first, args.quiet);
        let mut curve: Vec<(u64, f64)> = Vec::new();
        let mut valid_curve: Vec<(u64, f64, f64)> = Vec::new();
        let started = Instant::now();
        let mut tokens_done = 0usize;
        let stop = args.stop_after.unwrap_or(steps).min(steps);
        // The last step whose checkpoint is on disk (what survives a failed step).
        let mut saved_at = (first > 1).then_some(first - 1);
        for step in first..=stop {
            let report = trainer.step(step, ranks.comm()).map_err(|e| {
                let kept = match saved_at {
                    Some(at) => format!("the checkpoint {} of step {at} is intact", args.output.display()),
                    None => "no checkpoint was written".to_string(),
                };
                anyhow::anyhow!("{e:#}; {kept}")
            })?;
            tokens_done += report.tokens;
            let tokens_per_s = tokens_done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            curve.push((step, report.loss));
            if let Some(log) = &mut log {
                let line = json!({"step": step, "loss": report.loss, "lr": report.lr,
                                  "grad_norm": report.grad_norm, "tokens": report.tokens,
                                  "tokens_per_s": tokens_per_s});
                writeln!(log, "{line}")?;
            }
            if let Some(bar) = &bar {
                bar.set_position(step);
                bar.set_message(format!(
                    "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                    report.loss, report.lr, tokens_per_s
                ));
            }
            let last = step == steps;
            if let Some(valid) = &valid {
                if last || (args.eval_every > 0 && step % args.eval_every == 0) {
                    let (accuracy, loss) = evaluate(&trainer.model, valid, args.optim.label_smoothing)?;
                    valid_curve.push((step, loss, accuracy));
                    if let Some(log) = &mut log {
                        writeln!(
                            log,
                            "{}",
                            json!({"step": step, "valid_loss": loss, "valid_accuracy": accuracy})
                        )?;
                    }
                    let line = format!(
                        "step {step}: valid loss {loss:.4}, exact match {:.2}%",
                        100.0 * accuracy
                    );
                    match &bar {
                        Some(bar) => bar.println(line),
                        None if !args.quiet => eprintln!("{line}"),
                        None => {}
                    }
                }
            }
            if last || step == stop || (save_every > 0 && step % save_every == 0) {
                if ranks.is_root() {
                    save(&trainer, &args, &fingerprint, step)?;
                }
                saved_at = Some(step);
            }
        }
        if stop < first && ranks.is_root() {
            save(&trainer, &args, &fingerprint, stop)?;
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if let Some(log) = &mut log {
            log.flush()?;
        }
        if !ranks.is_root() {
            return Ok(());
        }
        let written = write_curves(&args, &curve, &valid_curve)?;
        let params = trainer.model.parameter_count();
        let processes = match ranks.size() {
            1 => String::new(),
            n => format!(" × {n} processes"),
        };
        println!(
            "trained {params} parameters, steps {first} to {stop} of {steps} on {threads} threads{processes} in {:.1} s; wrote {}",
            started.elapsed().as_secs_f64(),
            written.join(", ")
        );
        Ok(())
    })
}

/// The model a run starts from: the checkpoint at `--output` (`--resume`), the one at `--init`,
/// or a fresh one; every pair of `pairs` and `valid` must fit it (a clear error before any step).
fn initial_model(args: &Args, pairs: &[(String, String)], valid: Option<&[(String, String)]>) -> Result<Seq2Seq> {
    let model = if args.resume {
        checkpoint::load(&args.output).context("--resume reads the checkpoint at --output")?
    } else if let Some(init) = &args.init {
        let model = checkpoint::load(init)?;
        args.model.check_against(model.config())?;
        model
    } else {
        let config = args.model.config(pairs)?;
        trainer::check_memory(&config, &args.optim, pairs)?;
        Seq2Seq::with_seed(config, args.optim.seed)?
    };
    for (what, set) in [("--data", Some(pairs)), ("--valid", valid)] {
        for (i, (s, t)) in set.into_iter().flatten().enumerate() {
            model
                .batch(&[(s.as_str(), t.as_str())])
                .with_context(|| format!("{what} line {}", i + 1))?;
        }
    }
    Ok(model)
}

/// `--log`, opened for appending when resuming and truncated otherwise.
fn open_log(args: &Args) -> Result<Option<std::io::BufWriter<std::fs::File>>> {
    let Some(path) = &args.log else { return Ok(None) };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(args.resume)
        .write(true)
        .truncate(!args.resume)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(std::io::BufWriter::new(file)))
}

/// Draws `--plot` and names every file the run wrote.
fn write_curves(args: &Args, curve: &[(u64, f64)], valid_curve: &[(u64, f64, f64)]) -> Result<Vec<String>> {
    let mut written = vec![
        format!("{} (the model)", args.output.display()),
        format!(
            "{} (the optimizer's state, for --resume)",
            state_path(&args.output).display()
        ),
    ];
    if let Some(path) = &args.log {
        written.push(format!("{} (the log)", path.display()));
    }
    if let Some(path) = &args.plot {
        crate::support::plot::training_curves(path, curve, valid_curve)?;
        written.push(format!("{} (the curves)", path.display()));
    }
    Ok(written)
}

fn progress(steps: u64, first: u64, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  {eta} left")
            .expect("a valid template"),
    );
    bar.set_position(first.saturating_sub(1));
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--betas` is two numbers and a comma, spaces allowed around each; anything else is
    /// refused with the text and an example.
    #[test]
    fn betas_are_two_numbers() {
        assert_eq!(parse_betas("0.9,0.98"), Ok((0.9, 0.98)));
        assert_eq!(parse_betas(" 0.5 , 0.25"), Ok((0.5, 0.25)));
        for bad in ["0.9", "0.9,0.98,0.999", "a,0.9", "0.9,", ""] {
            let err = parse_betas(bad).expect_err(bad);
            assert!(
                err.contains(&format!("`{bad}`")) && err.contains("expected two numbers"),
                "{err}"
            );
        }
    }

    fn pairs_of(name: &str, text: &[u8]) -> Result<Vec<(String, String)>> {
        let path = std::env::temp_dir().join(format!("attn-read-pairs-{}-{name}.tsv", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let pairs = read_pairs(&path);
        std::fs::remove_file(&path).unwrap();
        pairs
    }

    /// Trailing lines of spaces, carriage returns or nothing are ignored; a trailing line of a
    /// tab is a pair with an empty target, and so refused like any empty target; a third field
    /// is refused.
    #[test]
    fn read_pairs_ignores_trailing_blank_lines_but_not_empty_targets() {
        let pairs = pairs_of("blank", b"a\tb\r\n\tc\n  \n\r\n\n").unwrap();
        assert_eq!(pairs, [("a".into(), "b".into()), (String::new(), "c".into())]);
        for (name, text, line) in [
            ("tab", &b"a\tb\n\t\n"[..], 2),
            ("empty-target", b"a\tb\nc\t\nd\te\n", 2),
            ("three", b"a\tb\tc\n", 1),
            ("one", b"a\n", 1),
        ] {
            let err = pairs_of(name, text).expect_err(name).to_string();
            assert!(
                err.contains(&format!(".tsv:{line}: expected `source<TAB>target`")),
                "{name}: {err}"
            );
        }
        let err = pairs_of("none", b"\n \n").expect_err("no pairs").to_string();
        assert!(err.contains("no pairs"), "{err}");
    }
}
