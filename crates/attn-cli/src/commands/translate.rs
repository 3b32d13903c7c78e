//! `attn translate`: greedy or beam decoding with a sequence-to-sequence checkpoint (by default
//! the date translator shipped inside the binary), batched, through the KV caches; JSON with
//! tokens, log-probabilities and logits; pictures of the cross-attention.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;
use attn_nn::core::Precision;
use attn_nn::Seq2Seq;
use serde_json::json;

use crate::support::checkpoint;
use crate::support::dtype::Dtype;
use crate::support::ranks::Ranks;
use crate::support::threads::Threads;

/// The date translator trained by `cargo xtask train-demo` (`attn train` alone).
pub const SHIPPED: &[u8] = include_bytes!("../../models/dates.safetensors");

/// The shipped model.
pub fn shipped() -> Result<Seq2Seq> {
    checkpoint::from_bytes(SHIPPED, "the shipped date model")
}

/// `attn translate`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  attn translate \"28 November 2026\" \"saturday 28 nov 2026\"\n  attn translate --input dates.txt --json\n  attn translate \"the 4th of July 1976\" --attention view.html\n  attn translate --export dates.safetensors"
)]
pub struct Args {
    /// A checkpoint written by `attn train` [default: the date translator inside the binary]
    #[arg(long)]
    model: Option<PathBuf>,
    /// A UTF-8 file with one input a line.
    #[arg(long, conflicts_with = "text")]
    input: Option<PathBuf>,
    /// Inputs on the command line.
    text: Vec<String>,
    /// Beam width (1: greedy).
    #[arg(long, default_value_t = 1, value_parser = crate::support::flags::at_least_one)]
    beam: usize,
    /// The most output tokens, at least 1 [default: the model's max_len]
    #[arg(long, value_parser = crate::support::flags::at_least_one)]
    max_len: Option<usize>,
    /// One JSON object: {"translations": [{"source", "output", "tokens", "log_prob"}]}.
    #[arg(long)]
    json: bool,
    /// With --json: the logits of every greedy step.
    #[arg(long)]
    logits: bool,
    /// Draw the cross-attention of the first input: OUT.png (averaged over layers and heads)
    /// or OUT.html (every layer and head, and the average).
    #[arg(long, value_parser = crate::support::flags::png_or_html)]
    attention: Option<PathBuf>,
    /// Write the model (the shipped one unless --model) to this checkpoint and stop.
    #[arg(long)]
    export: Option<PathBuf>,
    /// Number format of the products, linear maps and attention (bf16: weights rounded once,
    /// f32 sums; the shipped translator gives the same output as in f32 on 5,000 held-out dates).
    /// A BF16 --model checkpoint is read without widening.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    #[command(flatten)]
    threads: Threads,
}

/// Runs `attn translate`.
pub fn main(args: Args) -> Result<()> {
    // In bf16 a BF16 checkpoint is read without widening (an export writes f32).
    let load_precision = match &args.export {
        Some(_) => Precision::F32,
        None => args.dtype.effective(false).precision(),
    };
    let mut model = match &args.model {
        Some(path) => checkpoint::load_in(path, load_precision)?,
        None => shipped()?,
    };
    if let Some(path) = &args.export {
        checkpoint::save(path, &model, &[])?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    if args.logits && (!args.json || args.beam != 1) {
        bail!("--logits needs --json and greedy decoding (--beam 1)");
    }
    let ranks = Ranks::join()?;
    let precision = args.dtype.effective(ranks.is_root()).precision();
    let set = if model.precision() == precision {
        Ok(())
    } else {
        model.set_precision(precision)
    };
    let run = set
        .map_err(anyhow::Error::from)
        .and_then(|()| translate(&args, &model, &ranks));
    ranks.or_abort(run)
}

/// Greedy decoding's batch: the unit of work, and of a rank's share under MPI.
const GREEDY_BATCH: usize = 256;

/// Decodes the inputs, on one process or sharded over the ranks of an MPI job: each rank a
/// contiguous run of whole batches (rank 0 the first), rank 0 gathering the results in input
/// order and writing the one output.
fn translate(args: &Args, model: &Seq2Seq, ranks: &Ranks) -> Result<()> {
    let inputs = read_inputs(args)?;
    check_inputs(model, &inputs, args.input.is_some(), ranks.is_root())?;
    let max_len = args.max_len.unwrap_or(model.config().max_len);
    let shard = ranks.shard(inputs.len(), GREEDY_BATCH);
    // Decoding allocates its caches whole when it starts: a width or length past the memory
    // cap is refused first.
    let longest = inputs[shard.clone()]
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0);
    let (rows, what) = if args.beam == 1 {
        (shard.len().min(GREEDY_BATCH), "greedy decoding (caches of a batch)")
    } else {
        (args.beam, "beam search (caches of every hypothesis)")
    };
    crate::support::memory::check(model.decoding_bytes(rows, longest, max_len), what)?;
    args.threads.install(|_| {
        let sources: Vec<&str> = inputs[shard.clone()].iter().map(String::as_str).collect();
        let decoded = if args.beam == 1 {
            let mut all = Vec::with_capacity(sources.len());
            for (k, chunk) in sources.chunks(GREEDY_BATCH).enumerate() {
                let first = shard.start + k * GREEDY_BATCH;
                let decoded = model.greedy(chunk, max_len, args.logits, Par::Rayon);
                all.extend(
                    decoded.map_err(|e| crate::support::text::name_input(e.into(), first, args.input.as_deref()))?,
                );
            }
            all
        } else {
            let decoded = model.beam(&sources, args.beam, max_len, Par::Rayon);
            decoded.map_err(|e| crate::support::text::name_input(e.into(), shard.start, args.input.as_deref()))?
        };
        let vocab = &model.config().tgt_vocab;
        let outputs: Vec<String> = decoded.iter().map(|d| vocab.decode(&d.tokens)).collect();
        if let (Some(path), true) = (&args.attention, ranks.is_root()) {
            let attention = cross_attention(model, &inputs[0], &outputs[0])?;
            draw_attention(model, path, &inputs[0], &outputs[0], &attention)?;
        }
        // Each rank's part of the output: JSON items joined by commas, or lines.
        let part = if args.json {
            let items: Vec<String> = inputs[shard.clone()]
                .iter()
                .zip(&decoded)
                .zip(&outputs)
                .map(|((source, d), output)| {
                    let mut item =
                        json!({"source": source, "output": output, "tokens": d.tokens, "log_prob": d.log_prob});
                    if args.logits {
                        item["logits"] = json!(d.logits);
                    }
                    item.to_string()
                })
                .collect();
            items.join(",")
        } else {
            outputs.iter().map(|o| format!("{o}\n")).collect()
        };
        let Some(parts) = ranks.gather(part.into_bytes()) else {
            return Ok(());
        };
        let parts: Vec<String> = parts
            .into_iter()
            .map(|p| String::from_utf8(p).context("a rank's output is not UTF-8"))
            .collect::<Result<_>>()?;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        if args.json {
            let items: Vec<&String> = parts.iter().filter(|p| !p.is_empty()).collect();
            let items: Vec<&str> = items.iter().map(|p| p.as_str()).collect();
            writeln!(out, "{{\"translations\":[{}]}}", items.join(","))?;
        } else {
            out.write_all(parts.concat().as_bytes())?;
        }
        out.flush()?;
        Ok(())
    })
}

/// The inputs: the lines of `--input` (a final newline ends the last line rather than starting
/// another) or the TEXT arguments.
fn read_inputs(args: &Args) -> Result<Vec<String>> {
    let inputs: Vec<String> = match &args.input {
        Some(path) => crate::support::text::read_lines(path)?,
        None => args.text.clone(),
    };
    if inputs.is_empty() {
        bail!("nothing to translate: give TEXT arguments or --input FILE");
    }
    Ok(inputs)
}

/// Fails on an input longer than the model reads (naming its line and length, not echoing it);
/// warns once on stderr (when `warn`: rank 0 of a job) about characters outside the source vocabulary, which the model reads
/// as `<unk>`: which characters, and on how many lines.
fn check_inputs(model: &Seq2Seq, inputs: &[String], from_file: bool, warn: bool) -> Result<()> {
    let what = if from_file { "line" } else { "argument" };
    // The source and its `<eos>` must fit the position table.
    let most = model.config().max_len - 1;
    for (i, text) in inputs.iter().enumerate() {
        let n = text.chars().count();
        if n > most {
            bail!(
                "{what} {} is {} characters, the model reads at most {most}",
                i + 1,
                crate::support::flags::thousands(n)
            );
        }
    }
    let unknown = unknown_characters(model, inputs);
    if let (Some(first), true) = (unknown.lines.first(), warn) {
        let list: Vec<String> = unknown.chars.iter().map(|(c, n)| format!("{c:?} ({n}×)")).collect();
        let n = unknown.lines.len();
        let (plural, verb) = if n == 1 { ("", "has") } else { ("s", "have") };
        eprintln!(
            "warning: {n} {what}{plural} (the first: {what} {first}) {verb} characters the model does not know, read as <unk>: {}",
            list.join(", ")
        );
    }
    Ok(())
}

/// Characters of the inputs outside a model's source vocabulary.
struct Unknown {
    /// Each character and how often it occurs, in order of first occurrence.
    chars: Vec<(char, usize)>,
    /// The 1-based numbers of the inputs that have one.
    lines: Vec<usize>,
}

fn unknown_characters(model: &Seq2Seq, inputs: &[String]) -> Unknown {
    let vocab = &model.config().src_vocab;
    let mut unknown = Unknown {
        chars: Vec::new(),
        lines: Vec::new(),
    };
    for (i, text) in inputs.iter().enumerate() {
        let mut here = false;
        for (c, id) in text.chars().zip(vocab.encode(text)) {
            if id == attn_nn::seq2seq::UNK {
                here = true;
                match unknown.chars.iter_mut().find(|(k, _)| *k == c) {
                    Some((_, n)) => *n += 1,
                    None => unknown.chars.push((c, 1)),
                }
            }
        }
        if here {
            unknown.lines.push(i + 1);
        }
    }
    unknown
}

/// Row labels, column labels and each layer's weights `[H, T, S]`.
pub type CrossAttention = (Vec<String>, Vec<String>, Vec<Vec<f32>>);

/// Labels of the decoder positions (each labelled by what it predicted: the output's
/// characters, then `<eos>`) and of the source positions (characters, then `<eos>`), and each
/// layer's weights `[H, T, S]`.
pub fn cross_attention(model: &Seq2Seq, source: &str, output: &str) -> Result<CrossAttention> {
    let weights = model.cross_attention(source, output, Par::Rayon)?;
    let cols: Vec<String> = source
        .chars()
        .map(|c| c.to_string())
        .chain(["<eos>".to_string()])
        .collect();
    let rows: Vec<String> = output
        .chars()
        .map(|c| c.to_string())
        .chain(["<eos>".to_string()])
        .collect();
    Ok((rows, cols, weights))
}

/// Writes the cross-attention of `source` -> `output` (from [`cross_attention`]) to `path`:
/// a `.png` of the mean over layers and heads, or an `.html` page of every layer and head.
pub fn draw_attention(
    model: &Seq2Seq,
    path: &Path,
    source: &str,
    output: &str,
    attention: &CrossAttention,
) -> Result<()> {
    let (rows, cols, weights) = attention;
    let (t, s) = (rows.len(), cols.len());
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match extension {
        "png" => {
            let c = &model.config().transformer;
            let title = format!(
                "Transformer (d_model {}, {} heads, {}+{} layers): cross-attention, mean of layers and heads: {source:?} -> {output:?}",
                c.layer.d_model, c.layer.nhead, c.num_encoder_layers, c.num_decoder_layers
            );
            crate::support::plot::heatmap(
                path,
                &title,
                rows,
                cols,
                &crate::support::seq2seq_html::averaged(weights, t, s),
            )?;
        }
        "html" => {
            let html = crate::support::seq2seq_html::page(model, source, output, rows, cols, weights);
            std::fs::write(path, html).with_context(|| format!("cannot write {}", path.display()))?;
        }
        _ => bail!("--attention {}: expected a .png or .html file", path.display()),
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}
