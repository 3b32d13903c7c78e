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
use attn_nn::{LayerConfig, Seq2Seq, Seq2SeqConfig, TransformerConfig, Vocab};
use serde_json::json;

use crate::support::checkpoint;
use crate::support::ranks::Ranks;
use crate::support::tensors::write_f32_atomic;
use crate::support::threads::Threads;

mod bench;
mod trainer;

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
        let d_model = self.d_model.unwrap_or(128);
        let nhead = self.nhead.unwrap_or(4);
        let mut layer = LayerConfig::new(d_model, nhead);
        layer.dim_feedforward = self.dim_feedforward.unwrap_or(512);
        layer.dropout = self.dropout.unwrap_or(0.1);
        layer.activation = match self.activation.unwrap_or(ActivationFlag::Relu) {
            ActivationFlag::Relu => Activation::Relu,
            ActivationFlag::Gelu => Activation::Gelu,
        };
        layer.batch_first = true;
        layer.norm_first = self.norm_first;
        let longest = pairs
            .iter()
            .map(|(s, t)| s.chars().count().max(t.chars().count()))
            .max()
            .unwrap_or(0);
        let config = Seq2SeqConfig {
            transformer: TransformerConfig {
                layer,
                num_encoder_layers: self.encoder_layers.unwrap_or(2),
                num_decoder_layers: self.decoder_layers.unwrap_or(2),
            },
            // Room for inputs twice the longest seen (the sinusoids cost nothing).
            max_len: (2 * longest + 2).max(32),
            src_vocab: Vocab::from_texts(pairs.iter().map(|(s, _)| s.as_str())),
            tgt_vocab: Vocab::from_texts(pairs.iter().map(|(_, t)| t.as_str())),
        };
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

/// The file beside the checkpoint that holds the optimizer's state.
fn state_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".state");
    output.with_file_name(name)
}

/// The flags a resumed run must share with the run it continues.
/// FNV-1a of the pairs as their TSV lines.
fn data_hash(data: &[(String, String)]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (s, t) in data {
        for b in s.bytes().chain([b'\t']).chain(t.bytes()).chain([b'\n']) {
            hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    hash
}

/// The data and the flags that decide a run's bytes (not the thread or process count), as
/// JSON: `--resume` refuses a run whose fingerprint differs.
fn run_fingerprint(args: &Args, data: &[(String, String)]) -> String {
    let o = &args.optim;
    let mut run = json!({
        "data_fnv1a": format!("{:016x}", data_hash(data)),
        "batch_size": o.batch_size, "lr": o.lr, "betas": [o.betas.0, o.betas.1], "eps": o.eps,
        "weight_decay": o.weight_decay, "warmup": o.warmup, "schedule": o.schedule, "clip_norm": o.clip_norm,
        "label_smoothing": o.label_smoothing, "seed": o.seed, "no_shuffle": o.no_shuffle, "steps": args.steps,
    });
    // Only when it splits the batch, so that runs from before the flag resume.
    if let Some(m) = o.micro_batch.filter(|&m| m < o.batch_size) {
        run["micro_batch"] = json!(m);
    }
    run.to_string()
}

fn save(trainer: &Trainer, args: &Args, fingerprint: &str, step: u64) -> Result<()> {
    // A step that made a weight NaN or infinite fails here rather than overwrite the last good
    // checkpoint with it.
    for (name, t) in trainer.model.state_dict().iter() {
        if let Some(x) = t.data().iter().find(|x| !x.is_finite()) {
            bail!("step {step}: `{name}` holds {x}; the checkpoint was not written (try a lower --lr or --clip-norm)");
        }
    }
    // The checkpoint's only metadata is the configuration, so a rerun writes the same bytes.
    checkpoint::save(&args.output, &trainer.model, &[])?;
    let tensors = trainer.state();
    let refs: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
        .collect();
    let metadata = std::collections::HashMap::from([
        ("step".to_string(), step.to_string()),
        ("run".to_string(), fingerprint.to_string()),
    ]);
    write_f32_atomic(&state_path(&args.output), &refs, Some(metadata))
}

/// Fails unless a file can be created at `path`, naming `flag`: checked before step 1, so a
/// missing folder is found before the run rather than after it. Nothing is left behind.
fn check_writable(flag: &str, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("{flag} {}: the folder {} does not exist", path.display(), dir.display());
    }
    if path.is_dir() {
        bail!("{flag} {}: is a folder, expected a file name", path.display());
    }
    let probe = dir.join(format!(".attn-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{flag} {}: cannot write in {}", path.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The flags of the fingerprints `saved` and `now` that differ, as `name: saved -> now`.
fn differing_flags(saved: &str, now: &str) -> Vec<String> {
    let parse =
        |text: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).unwrap_or_default();
    let (saved, now) = (parse(saved), parse(now));
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| {
            // Floats were f32 flags: shown as the f32 the user typed, not its f64 widening.
            let show = |v: Option<&serde_json::Value>| match v {
                None => "(none)".to_string(),
                Some(v) if v.is_f64() => (v.as_f64().unwrap_or(f64::NAN) as f32).to_string(),
                Some(v) => v.to_string(),
            };
            let name = if k.as_str() == "data_fnv1a" {
                "--data (its pairs' hash)".to_string()
            } else {
                format!("--{}", k.replace('_', "-"))
            };
            format!("{name}: {} -> {}", show(saved.get(k)), show(now.get(k)))
        })
        .collect()
}

/// Runs `attn train`: one process, or every rank of an MPI job (`mpirun -np N attn train …`).
pub fn main(args: Args) -> Result<()> {
    let ranks = Ranks::join()?;
    ranks.or_abort(train(args, &ranks))
}

fn train(mut args: Args, ranks: &Ranks) -> Result<()> {
    if ranks.is_root() {
        check_writable("--output", &args.output)?;
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

/// Restores the optimizer's state saved beside `output`, after checking that it was saved by a
/// run of the same data and flags (`fingerprint`); returns the step it was saved at.
fn resume(trainer: &mut Trainer, output: &Path, fingerprint: &str) -> Result<u64> {
    let state = state_path(output);
    let bytes = std::fs::read(&state).with_context(|| format!("--resume needs {}", state.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let saved_run = header.metadata().as_ref().and_then(|m| m.get("run")).cloned();
    if saved_run.as_deref() != Some(fingerprint) {
        let saved = saved_run.unwrap_or_default();
        bail!(
            "--resume: the run saved in {} had other data or flags; they must be the same: {}",
            state.display(),
            differing_flags(&saved, fingerprint).join("; ")
        );
    }
    trainer.restore(&state)
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
