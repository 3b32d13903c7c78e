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
use attn_nn::{BertModel, EmbedOptions, TextEmbedder};

use crate::support::dtype::Dtype;
use crate::support::ranks::Ranks;
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
    pub fn embed(
        &self,
        texts: &[String],
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
pub fn read_inputs(file: Option<&Path>, texts: &[String], warn: bool) -> Result<Vec<String>> {
    match file {
        Some(path) => {
            if !texts.is_empty() {
                bail!("give sentences either with --input FILE or as arguments, not both");
            }
            let lines = crate::support::text::read_lines(path)?;
            let blank = lines.iter().filter(|l| l.trim().is_empty()).count();
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
        None => Ok(texts.to_vec()),
    }
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

/// `attn embed` on one process, or sharded over the ranks of an MPI job: each rank embeds a
/// contiguous run of whole batches (so every batch is the single process's), rank 0 gathers
/// the rows in input order and writes the one output.
fn embed(args: Args, ranks: &Ranks) -> Result<()> {
    let sentences = read_inputs(args.input.as_deref(), &args.texts, ranks.is_root())?;
    let dir = args.model.clone().unwrap_or_else(default_model_dir);
    let embedder = Embedder::load_as(&dir, args.dtype.effective(ranks.is_root()))?;
    let batch_size = args.batch_size as usize;
    let shard = ranks.shard(sentences.len(), batch_size);
    let bar = progress_bar(shard.len(), args.quiet || !ranks.is_root());
    let local = args.threads.install(|_| {
        embedder.embed(&sentences[shard.clone()], batch_size, Par::Rayon, |n| {
            if let Some(bar) = &bar {
                bar.inc(n as u64)
            }
        })
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let Some(vectors) = ranks.gather_f32(local) else {
        return Ok(());
    };
    let e = embedder.dim();
    match (&args.output, args.json) {
        (Some(path), _) => {
            crate::support::tensors::write_f32(path, &[("embeddings", &[sentences.len(), e], &vectors)])?;
            println!("wrote {}: embeddings {:?}", path.display(), [sentences.len(), e]);
        }
        (None, true) => {
            let rows: Vec<&[f32]> = vectors.chunks(e.max(1)).collect();
            println!("{}", serde_json::json!({ "embeddings": rows }));
        }
        (None, false) => print!("{}", table(&sentences, &vectors, e)),
    }
    Ok(())
}

/// A readable view of embeddings: each sentence with its first values, then the pairwise
/// cosine similarity of the first few sentences.
fn table(sentences: &[String], vectors: &[f32], e: usize) -> String {
    const SHOWN: usize = 6;
    const PAIRS: usize = 5;
    let clip = |s: &str| {
        let mut t: String = s.chars().take(40).collect();
        if s.chars().count() > 40 {
            t.push('…');
        }
        t
    };
    let mut text = format!(
        "{} sentences, {e} dimensions (--json or --output for every value)\n",
        sentences.len()
    );
    for (i, (sentence, v)) in sentences.iter().zip(vectors.chunks(e.max(1))).enumerate() {
        let head: Vec<String> = v.iter().take(SHOWN).map(|x| format!("{x:+.4}")).collect();
        text.push_str(&format!("{i:>3}  {:<41} [{}, …]\n", clip(sentence), head.join(", ")));
    }
    let n = sentences.len().min(PAIRS);
    if n >= 2 {
        text.push_str(&format!(
            "\ncosine similarity{}:\n     ",
            if sentences.len() > n { " of the first 5" } else { "" }
        ));
        text.push_str(&(0..n).map(|j| format!("{j:>7}")).collect::<String>());
        text.push('\n');
        for i in 0..n {
            text.push_str(&format!("{i:>3}  "));
            for j in 0..n {
                let (a, b) = (&vectors[i * e..(i + 1) * e], &vectors[j * e..(j + 1) * e]);
                let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
                let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                text.push_str(&format!("{:>7.3}", dot / (norm(a) * norm(b)).max(1e-30)));
            }
            text.push('\n');
        }
    }
    text
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
    let sentences = read_inputs(Some(&args.input), &[], true)?;
    if sentences.is_empty() {
        // A rate of nothing over nothing: refused rather than reported as 0 or NaN.
        bail!("{}: no lines to embed, so nothing to time", args.input.display());
    }
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
