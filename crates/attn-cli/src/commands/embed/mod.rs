//! `attn embed`: sentence embeddings from a BERT-family checkpoint folder, as sentence-transformers
//! computes them for that model.
//!
//! The folder is Hugging Face-style: `config.json`, `model.safetensors`, `tokenizer.json`, and
//! where present `modules.json` (a `Normalize` module turns on L2 normalisation),
//! `1_Pooling/config.json` (the pooling mode) and `sentence_bert_config.json` (`max_seq_length`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use attn_nn::core::kernels::Par;
use attn_nn::{BertModel, EmbedOptions, TextEmbedder, MAX_BATCH_TOKENS};

mod output;
use output::Output;

use crate::support::dtype::Dtype;
use crate::support::ranks::Ranks;
use crate::support::text::{name_input, Lines};
use crate::support::threads::Threads;

pub use attn_nn::default_model_dir;

/// A loaded embedding pipeline: attn-nn's [`TextEmbedder`], with errors that name this
/// command's flags.
pub struct Embedder(TextEmbedder);

impl Embedder {
    /// Loads the folder `dir` to compute in `dtype` (the effective one: see
    /// [`Dtype::effective`]). In bf16 a BF16 `model.safetensors` is not widened to f32.
    pub fn load_as(dir: &Path, dtype: Dtype) -> Result<Self> {
        let missing = !dir.join("config.json").exists();
        // Only the default folder is one that fetch-model fills; a folder the user named is
        // theirs to fix, and the library's error says what it lacks.
        if missing && dir == default_model_dir() {
            bail!(
                "no model at the default folder {} (no config.json): run `cargo xtask fetch-model` to install all-MiniLM-L6-v2, or pass --model DIR",
                dir.display()
            );
        }
        match TextEmbedder::from_dir_in(dir, dtype.precision()) {
            Ok(embedder) => Ok(Embedder(embedder)),
            Err(e) if missing => bail!("--model {e}"),
            Err(e) => Err(e.into()),
        }
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.0.dim()
    }

    /// The token ids and token strings of one text (with `[CLS]` and `[SEP]`).
    pub fn tokens(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        Ok(self.0.tokens(text)?)
    }

    /// The model.
    pub fn model(&self) -> &BertModel {
        self.0.model()
    }

    /// Embeds `texts` -> `[N, E]` rows, tokenisation included.
    pub fn embed<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch_size: usize,
        par: Par,
        progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        let options = EmbedOptions { batch_size, par };
        Ok(self.0.embed_with(texts, &options, progress)?.data)
    }
}

/// Reads sentences: one per line of `file` (a final newline ends the last line rather than
/// starting another; a blank line is the empty sentence, as sentence-transformers embeds `""`,
/// and stderr says how many there were when `warn`), or the given texts.
pub fn read_inputs(file: Option<&Path>, texts: &[String], warn: bool) -> Result<Lines> {
    match file {
        Some(path) => {
            if !texts.is_empty() {
                bail!("give sentences either with --input FILE or as arguments, not both");
            }
            let lines = Lines::read(path)?;
            let blank = (0..lines.len()).filter(|&i| lines.get(i).trim().is_empty()).count();
            if blank > 0 && warn {
                eprintln!(
                    "{}: {blank} blank line{} embedded as the empty sentence",
                    path.display(),
                    if blank == 1 { "" } else { "s" }
                );
            }
            Ok(lines)
        }
        None if texts.is_empty() => bail!("nothing to embed: pass sentences as arguments or --input FILE"),
        None => Ok(Lines::from_texts(texts)),
    }
}

/// Sentences a process embeds between writes of the output: whole batches of `batch_size`,
/// about 4,096 sentences (6 MB of rows at E = 384), and never more than [`MAX_BATCH_TOKENS`],
/// the most one-token sentences a forward pass takes. The rows are the same bits whatever the
/// runs ([`attn_nn::SentenceEmbedder::embed`]).
fn run_size(batch_size: usize) -> usize {
    let batch = batch_size.clamp(1, MAX_BATCH_TOKENS);
    batch * (4096 / batch).max(1)
}

/// `attn embed`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  attn embed \"a cat sat on the mat\" \"the weather is nice\"\n  attn embed --input sentences.txt --output embeddings.safetensors --batch-size 64\n  attn embed \"a cat sat on the mat\" --json\n\nWithout --output or --json, prints a table: each sentence's first values and the cosine\nsimilarity of the first sentences. The default model folder is where `cargo xtask fetch-model`\ninstalls all-MiniLM-L6-v2."
)]
pub struct Args {
    /// A Hugging Face-style model folder [default: all-MiniLM-L6-v2 where fetch-model puts it]
    #[arg(long)]
    model: Option<PathBuf>,
    /// A UTF-8 file with one sentence per line.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Accepted for scripts written before blank lines were embedded by default; changes nothing.
    #[arg(long, hide = true)]
    keep_blank: bool,
    /// Sentences to embed.
    texts: Vec<String>,
    /// Write `embeddings` [N, E] to this safetensors file.
    #[arg(long, conflicts_with = "json")]
    output: Option<PathBuf>,
    /// Print {"embeddings": [[...], ...]} on stdout.
    #[arg(long)]
    json: bool,
    /// Sentences per batch.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Number format of the products (linear maps and attention): bf16 rounds the weights once
    /// and the activations as each product reads them, f32 sums (cosine ≥ 0.9999 to f32 on the
    /// MiniLM test sentences).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    threads: Threads,
}

/// Runs `attn embed`.
pub fn main(args: Args) -> Result<()> {
    let ranks = Ranks::join()?;
    ranks.or_abort(embed(args, &ranks))
}

/// `attn embed` on one process, or sharded over the ranks of an MPI job. The sentences go in
/// rounds of [`run_size`] a process: each rank embeds its run, rank 0 gathers the round's rows
/// in input order and writes them, so memory holds the input and one round, not every row
/// (ten million sentences are 15 GB of rows).
fn embed(args: Args, ranks: &Ranks) -> Result<()> {
    let sentences = read_inputs(args.input.as_deref(), &args.texts, ranks.is_root())?;
    let dir = args.model.clone().unwrap_or_else(default_model_dir);
    let embedder = Embedder::load_as(&dir, args.dtype.effective(ranks.is_root()))?;
    let (n, e) = (sentences.len(), embedder.dim());
    // Opened before any work: an output path that cannot be written fails at once.
    let mut output = match ranks.is_root() {
        true => Some(Output::open(args.output.as_deref(), args.json, n, e)?),
        false => None,
    };
    let batch_size = args.batch_size as usize;
    let run = run_size(batch_size);
    let bar = progress_bar(n, args.quiet || !ranks.is_root());
    let inc = |k: usize| {
        if let Some(bar) = &bar {
            bar.inc(k as u64)
        }
    };
    args.threads.install(|_| {
        let mut start = 0;
        // Every rank goes through the same rounds (one with no sentences left sends no rows).
        while start < n {
            let round = start..(start + run.saturating_mul(ranks.size())).min(n);
            let mine = ranks.shard(round.len(), run);
            let mine = round.start + mine.start..round.start + mine.end;
            let local = embedder
                .embed(&sentences.slice(mine.clone()), batch_size, Par::Rayon, inc)
                .map_err(|e| name_input(e, mine.start, args.input.as_deref()))?;
            if let Some(rows) = ranks.gather_f32(local) {
                inc(round.len() - mine.len());
                let output = output.as_mut().expect("rank 0 has the output");
                let write = |output: &mut Output| output.rows(&sentences.slice(round.clone()), &rows);
                match &bar {
                    // Rows on a terminal's stdout go out between the bar's redraws.
                    Some(bar) => bar.suspend(|| write(output).and_then(|()| output.flush()))?,
                    None => write(output)?,
                }
            }
            start = round.end;
        }
        Ok(())
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match output {
        Some(output) => output.finish(),
        None => Ok(()),
    }
}

/// A progress bar on stderr for long inputs when stderr is a terminal and not `quiet`.
pub fn progress_bar(total: usize, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || total < 256 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sentences ({per_sec}, {eta} left)")
            .expect("a valid template"),
    );
    Some(bar)
}

/// `attn bench embed`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A Hugging Face-style model folder [default: all-MiniLM-L6-v2 where fetch-model puts it]
    #[arg(long)]
    model: Option<PathBuf>,
    /// A UTF-8 file with one sentence per line (every line is embedded, blank ones included).
    #[arg(long)]
    input: PathBuf,
    /// Sentences per batch.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Number format of the linear maps (as `attn embed --dtype`).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    #[command(flatten)]
    threads: Threads,
    #[command(flatten)]
    flags: crate::support::timing::BenchFlags,
}

/// Times embedding every line of the file, tokenisation included, model loading excluded.
pub fn bench(args: BenchArgs) -> Result<()> {
    let flags = args.flags;
    let budget = flags.budget()?;
    let lines = read_inputs(Some(&args.input), &[], true)?;
    if lines.is_empty() {
        // A rate of nothing over nothing: refused rather than reported as 0 or NaN.
        bail!("{}: no lines to embed, so nothing to time", args.input.display());
    }
    let sentences = lines.all();
    let dtype = args.dtype.effective(true);
    let embedder = Embedder::load_as(&args.model.clone().unwrap_or_else(default_model_dir), dtype)?;
    let batch = args.batch_size as usize;
    let (stats, n) = args.threads.install(|n| {
        embedder.embed(&sentences, batch, Par::Rayon, |_| {})?;
        let stats = crate::support::timing::measure_warmed(budget, || {
            embedder
                .embed(&sentences, batch, Par::Rayon, |_| {})
                .expect("ran once above");
        });
        Ok((stats, n))
    })?;
    let what = format!("{} sentences, batch size {batch}", sentences.len());
    let mut text = crate::support::timing::report_plain("embed", &what, stats, n, flags.json);
    let per_second = sentences.len() as f64 / stats.median_s;
    if flags.json {
        let mut v: serde_json::Value = serde_json::from_str(&text)?;
        v["sentences"] = sentences.len().into();
        v["dtype"] = dtype.name().into();
        v["sentences_per_s"] = per_second.into();
        v["weights_bytes"] = embedder.model().bytes_held().into();
        text = v.to_string();
    } else {
        let mb = embedder.model().bytes_held() as f64 / 1e6;
        text.push_str(&format!("  {per_second:.1} sentences/s, weights {mb:.1} MB"));
    }
    println!("{text}");
    Ok(())
}
