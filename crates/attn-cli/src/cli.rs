//! The command line: flags (clap), dispatch to the subcommands, exit codes.

use crate::{attend, bench, check, demo, embed, heatmap, memory, run, sdpa, sweep, tensors};

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "attn", version, about = "Attention on the CPU, with PyTorch's numbers", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// scaled_dot_product_attention on tensors from a safetensors file (PyTorch semantics).
    #[command(
        after_help = "Examples:\n  attn sdpa --input qkv.safetensors --output out.safetensors\n  attn sdpa --input qkv.safetensors --output out.safetensors --causal bottom-right --threads 2\n\nIN holds q [B,H,S,D], k [B,G,T,D], v [B,G,T,Dv] (F32) and an optional mask broadcastable to\n[B,H,S,T]: BOOL (true = may attend) or F32 (added to the scaled scores).\nOUT holds out [B,H,S,Dv] and lse [B,H,S]."
    )]
    Sdpa {
        /// Input safetensors file with q, k, v and optionally mask.
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors file for out and lse.
        #[arg(long)]
        output: PathBuf,
        /// Causal masking: top-left (PyTorch is_causal=True) or bottom-right (last query sees every key).
        #[arg(long, value_parser = ["top-left", "bottom-right"])]
        causal: Option<String>,
        /// Scale of q·k (default 1/sqrt(D)).
        #[arg(long, allow_negative_numbers = true)]
        scale: Option<f32>,
        #[command(flatten)]
        threads: Threads,
    },
    /// Runs a module with PyTorch weights (nn.MultiheadAttention, ...) on safetensors inputs.
    #[command(
        after_help = "Example:\n  attn run --config mha.json --weights mha.safetensors --input in.safetensors --output out.safetensors\n\nMODULE.json: {\"module\": \"multihead_attention\", \"embed_dim\": 16, \"num_heads\": 4, \"need_weights\": false}\nwith PyTorch's constructor fields and defaults; WEIGHTS is the module's state_dict()."
    )]
    Run {
        /// MODULE.json: {"module": KIND, constructor fields..., forward flags...}.
        #[arg(long)]
        config: PathBuf,
        /// The module's state_dict() as safetensors.
        #[arg(long)]
        weights: PathBuf,
        /// The forward's inputs, under PyTorch's argument names.
        #[arg(long)]
        input: PathBuf,
        /// Where the outputs go.
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        threads: Threads,
    },
    /// Sentence embeddings from a BERT-family checkpoint (default: all-MiniLM-L6-v2).
    #[command(
        after_help = "Examples:\n  attn embed \"a cat sat on the mat\" \"the weather is nice\" --json\n  attn embed --input sentences.txt --output embeddings.safetensors --batch-size 64\n\nThe default model folder is where `cargo xtask fetch-model` installs all-MiniLM-L6-v2."
    )]
    Embed {
        /// A Hugging Face-style model folder.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A UTF-8 file with one sentence per line.
        #[arg(long)]
        input: Option<PathBuf>,
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
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        threads: Threads,
    },
    /// Pictures of a real model's attention: a PNG grid of a layer's heads, an HTML view of all.
    #[command(
        after_help = "Examples:\n  attn attend --text \"the bank of the river\" --png heads.png --html view.html\n  attn attend --text \"a cat sat on the mat\" --layer 2 --head 5\n\nNeeds a BERT-family model folder: all-MiniLM-L6-v2 from `cargo xtask fetch-model`, or --model DIR."
    )]
    Attend {
        /// The sentence.
        #[arg(long)]
        text: String,
        /// A BERT-family model folder (default: all-MiniLM-L6-v2 where fetch-model puts it).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The layer of the PNG and the terminal view (default: the last).
        #[arg(long)]
        layer: Option<usize>,
        /// The head of the terminal view (default: 0).
        #[arg(long, default_value_t = 0)]
        head: usize,
        /// Write a grid of every head of the layer, with token labels.
        #[arg(long)]
        png: Option<PathBuf>,
        /// Write a self-contained HTML page with every layer and head.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Plain characters in the terminal view.
        #[arg(long)]
        plain: bool,
        #[command(flatten)]
        threads: Threads,
    },
    /// Runs every kernel and module path on random inputs against an f64 reference here.
    #[command(
        after_help = "Example:\n  attn check --threads 2\n\nExits 1 if any path is outside its tolerance on this machine."
    )]
    Check {
        #[command(flatten)]
        threads: Threads,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Measurements: medians of repeated runs.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Shows attention at work on a sentence, offline, in a few seconds.
    #[command(
        after_help = "Examples:\n  attn demo\n  attn demo --text \"the bank of the river\" --layer 2 --head 5\n\nWith all-MiniLM-L6-v2 fetched (cargo xtask fetch-model) or --model DIR, the view shows that\nmodel's attention; otherwise four hand-set heads whose jobs can be checked by eye."
    )]
    Demo {
        /// The sentence to look at.
        #[arg(long, default_value = demo::DEFAULT_TEXT)]
        text: String,
        /// A BERT-family model folder (default: all-MiniLM-L6-v2 where fetch-model puts it).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The hand-set heads even when a model is there.
        #[arg(long, conflicts_with = "model")]
        toy: bool,
        /// The model's layer to show (default: the last).
        #[arg(long)]
        layer: Option<usize>,
        /// The model's head to draw (default: 0).
        #[arg(long, default_value_t = 0)]
        head: usize,
        /// Plain characters instead of colour, whatever the terminal.
        #[arg(long)]
        plain: bool,
        #[command(flatten)]
        threads: Threads,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Times attention on random inputs: flops 4·B·H·S·T·D (halved when causal with S = T).
    #[command(
        after_help = "Examples:\n  attn bench sdpa --batch 1 --heads 8 --seq 2048 --head-dim 64 --causal\n  attn bench sdpa --batch 1 --heads 32 --kv-heads 8 --seq 1 --kv-seq 4096 --head-dim 128 --json"
    )]
    Sdpa {
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        heads: usize,
        /// Key/value heads (default: --heads); must divide --heads.
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long)]
        seq: usize,
        /// Key length (default: --seq).
        #[arg(long)]
        kv_seq: Option<usize>,
        #[arg(long)]
        head_dim: usize,
        /// Top-left causal masking.
        #[arg(long)]
        causal: bool,
        /// Which implementation to time.
        #[arg(long, value_enum, default_value_t = bench::Path::Flash)]
        path: bench::Path,
        #[command(flatten)]
        threads: Threads,
        /// Minimum number of timed runs.
        #[arg(long, default_value_t = 5)]
        min_runs: usize,
        /// Keep running until this many seconds have passed.
        #[arg(long, default_value_t = 1.0)]
        min_seconds: f64,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Times a module's forward pass exactly as `attn run` computes it (files read once, outside the timing).
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[command(flatten)]
        threads: Threads,
        #[arg(long, default_value_t = 5)]
        min_runs: usize,
        #[arg(long, default_value_t = 1.0)]
        min_seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// Times embedding every line of FILE, tokenisation included, model loading excluded.
    #[command(after_help = "Example:\n  attn bench embed --input sentences.txt --batch-size 32 --json")]
    Embed {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
        #[command(flatten)]
        threads: Threads,
        #[arg(long, default_value_t = 3)]
        min_runs: usize,
        #[arg(long, default_value_t = 1.0)]
        min_seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// GFLOP/s against sequence length: flash, unfused and (when Python has torch) PyTorch.
    #[command(
        after_help = "Example:\n  attn bench sweep --seq 128,256,512,1024,2048,4096,8192 --png sweep.png\n\nPyTorch is measured when ATTN_PYTHON (default python3) can import torch."
    )]
    Sweep {
        /// Sequence lengths S = T, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [128usize, 256, 512, 1024, 2048, 4096])]
        seq: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 8)]
        heads: usize,
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        #[arg(long)]
        causal: bool,
        /// Write a plot.
        #[arg(long)]
        png: Option<PathBuf>,
        #[command(flatten)]
        threads: Threads,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[arg(long)]
        json: bool,
    },
    /// Times faer's f32 GEMM [M,K]·[K,N]: flops 2·M·N·K.
    #[command(after_help = "Example:\n  attn bench gemm --m 1024 --n 1024 --k 1024 --json")]
    Gemm {
        #[arg(long)]
        m: usize,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        k: usize,
        #[command(flatten)]
        threads: Threads,
        #[arg(long, default_value_t = 5)]
        min_runs: usize,
        #[arg(long, default_value_t = 1.0)]
        min_seconds: f64,
        #[arg(long)]
        json: bool,
    },
}

/// `--threads N`, shared by every command that computes.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Threads {
    /// Worker threads, 1 to 8 × this machine's cores [default: all cores]
    #[arg(long = "threads", value_name = "N", value_parser = parse_threads)]
    threads: Option<u16>,
}

/// The most worker threads a command takes: 8 × this machine's cores. Past the cores more
/// threads only add switching (results do not depend on the count); thousands of them made
/// `attn check` take minutes instead of a fraction of a second.
fn max_threads() -> usize {
    8 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_threads(text: &str) -> std::result::Result<u16, String> {
    let max = max_threads();
    let expected = format!("expected 1 to {max} (8 × this machine's {} cores)", max / 8);
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n as u16),
        Ok(n) => Err(format!("{n} threads; {expected}")),
        Err(_) => Err(format!("`{text}` is not a number of threads; {expected}")),
    }
}

/// Runs `f` on a rayon pool of `threads` workers (all cores by default); returns the count too.
fn with_threads<T: Send>(threads: Threads, f: impl FnOnce(usize) -> Result<T> + Send) -> Result<T> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads.threads {
        builder = builder.num_threads(n as usize);
    }
    let pool = builder.build()?;
    let n = pool.current_num_threads();
    pool.install(|| f(n))
}

fn check_budget(min_runs: usize, min_seconds: f64) -> Result<bench::Budget> {
    if min_runs == 0 || !(0.0..=3600.0).contains(&min_seconds) {
        anyhow::bail!("--min-runs must be at least 1 and --min-seconds within 0..3600 (got {min_runs}, {min_seconds})");
    }
    Ok(bench::Budget { min_runs, min_seconds })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command.unwrap_or(Command::Demo {
        text: demo::DEFAULT_TEXT.into(),
        model: None,
        toy: false,
        layer: None,
        head: 0,
        plain: false,
        threads: Threads { threads: None },
    }) {
        Command::Sdpa {
            input,
            output,
            causal,
            scale,
            threads,
        } => {
            let causal = sdpa::parse_causal(causal.as_deref())?;
            with_threads(threads, |_| sdpa::run(&input, &output, causal, scale))
        }
        Command::Embed {
            model,
            input,
            texts,
            output,
            json: _,
            batch_size,
            quiet,
            threads,
        } => {
            let sentences = embed::read_inputs(input.as_deref(), &texts)?;
            let dir = model.unwrap_or_else(embed::default_model_dir);
            let embedder = embed::Embedder::load(&dir)?;
            let bar = embed::progress_bar(sentences.len(), quiet);
            let vectors = with_threads(threads, |_| {
                embedder.embed(
                    &sentences,
                    batch_size as usize,
                    attn_nn::core::kernels::Par::Rayon,
                    |n| {
                        if let Some(bar) = &bar {
                            bar.inc(n as u64)
                        }
                    },
                )
            })?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let e = embedder.dim();
            match output {
                Some(path) => tensors::write_f32(&path, &[("embeddings", &[sentences.len(), e], &vectors)]),
                // `--json` (the contract's flag) and the default without `--output` are the same:
                // JSON on stdout.
                None => {
                    let rows: Vec<&[f32]> = vectors.chunks(e.max(1)).collect();
                    println!("{}", serde_json::json!({ "embeddings": rows }));
                    Ok(())
                }
            }
        }
        Command::Run {
            config,
            weights,
            input,
            output,
            threads,
        } => with_threads(threads, |_| run::run(&config, &weights, &input, &output)),
        Command::Bench(BenchCommand::Run {
            config,
            weights,
            input,
            threads,
            min_runs,
            min_seconds,
            json,
        }) => {
            let budget = check_budget(min_runs, min_seconds)?;
            let prepared = run::prepare(&config, &weights, &input)?;
            let (stats, n) = with_threads(threads, |n| {
                prepared.execute(attn_nn::core::kernels::Par::Rayon)?;
                let stats = bench::measure(budget, || {
                    prepared
                        .execute(attn_nn::core::kernels::Par::Rayon)
                        .expect("ran once above");
                });
                Ok((stats, n))
            })?;
            println!(
                "{}",
                bench::report_plain("run", &config.display().to_string(), stats, n, json)
            );
            Ok(())
        }
        Command::Bench(BenchCommand::Embed {
            model,
            input,
            batch_size,
            threads,
            min_runs,
            min_seconds,
            json,
        }) => {
            let budget = check_budget(min_runs, min_seconds)?;
            let sentences = embed::read_inputs(Some(&input), &[])?;
            let embedder = embed::Embedder::load(&model.unwrap_or_else(embed::default_model_dir))?;
            let par = attn_nn::core::kernels::Par::Rayon;
            let (stats, n) = with_threads(threads, |n| {
                embedder.embed(&sentences, batch_size as usize, par, |_| {})?;
                let stats = bench::measure(budget, || {
                    embedder
                        .embed(&sentences, batch_size as usize, par, |_| {})
                        .expect("ran once above");
                });
                Ok((stats, n))
            })?;
            let what = format!("{} sentences, batch size {batch_size}", sentences.len());
            let mut text = bench::report_plain("embed", &what, stats, n, json);
            let per_second = sentences.len() as f64 / stats.median_s;
            if json {
                let mut v: serde_json::Value = serde_json::from_str(&text)?;
                v["sentences"] = sentences.len().into();
                v["sentences_per_s"] = per_second.into();
                text = v.to_string();
            } else {
                text.push_str(&format!("  {per_second:.1} sentences/s"));
            }
            println!("{text}");
            Ok(())
        }
        Command::Bench(BenchCommand::Sweep {
            seq,
            batch,
            heads,
            head_dim,
            causal,
            png,
            threads,
            quiet,
            json,
        }) => {
            if batch == 0 || heads == 0 || head_dim == 0 {
                anyhow::bail!("--batch, --heads and --head-dim must be at least 1");
            }
            let python = std::env::var("ATTN_PYTHON").unwrap_or_else(|_| "python3".into());
            let bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .then(|| indicatif::ProgressBar::new(seq.len() as u64));
            let shape = [batch, heads, head_dim];
            let (points, n) = with_threads(threads, |n| {
                let points = sweep::run(&seq, shape, causal, n, Some(&python), |k| {
                    if let Some(bar) = &bar {
                        bar.inc(k as u64)
                    }
                })?;
                Ok((points, n))
            })?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if json {
                println!("{}", sweep::to_json(&points, shape, causal, n));
            } else {
                print!("{}", sweep::table(&points));
            }
            if let Some(path) = png {
                let title = format!(
                    "B={batch} H={heads} D={head_dim}{}, {n} threads",
                    if causal { " causal" } else { "" }
                );
                sweep::write_png(&points, &title, &path)?;
                if !json {
                    println!("wrote {}", path.display());
                }
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Sdpa {
            batch,
            heads,
            kv_heads,
            seq,
            kv_seq,
            head_dim,
            causal,
            path,
            threads,
            min_runs,
            min_seconds,
            json,
        }) => {
            let budget = check_budget(min_runs, min_seconds)?;
            let kv_heads = kv_heads.unwrap_or(heads);
            let kv_seq = kv_seq.unwrap_or(seq);
            let shape = attn_nn::core::SdpaShape::check(
                &[batch, heads, seq, head_dim],
                &[batch, kv_heads, kv_seq, head_dim],
                &[batch, kv_heads, kv_seq, head_dim],
            )
            .map_err(|e| anyhow::anyhow!("{e} (from --heads {heads} --kv-heads {kv_heads} --head-dim {head_dim})"))?;
            let mut need = shape.input_bytes().saturating_add(shape.output_bytes());
            if path == bench::Path::Unfused {
                need = need.saturating_add(attn_nn::core::kernels::unfused_scratch_bytes(
                    [batch, heads, seq, head_dim],
                    kv_seq,
                    rayon::current_num_threads().max(2),
                ));
            }
            memory::check(need, "bench sdpa (q, k, v, out)")?;
            let spec = bench::SdpaBench {
                batch,
                heads,
                kv_heads,
                seq,
                kv_seq,
                head_dim,
                causal,
                path,
            };
            let (stats, n) = with_threads(threads, |n| Ok((spec.run(budget)?, n)))?;
            println!("{}", spec.report(stats, n, json));
            Ok(())
        }
        Command::Bench(BenchCommand::Gemm {
            m,
            n,
            k,
            threads,
            min_runs,
            min_seconds,
            json,
        }) => {
            let budget = check_budget(min_runs, min_seconds)?;
            let need = memory::f32_bytes(&[m, k])
                .saturating_add(memory::f32_bytes(&[k, n]))
                .saturating_add(memory::f32_bytes(&[m, n]));
            memory::check(need, "bench gemm (a, b, c)")?;
            let text = with_threads(threads, |nt| bench::gemm_bench(m, n, k, nt, budget, json))?;
            println!("{text}");
            Ok(())
        }
        Command::Check { threads, json } => with_threads(threads, |n| check::run(n, json)),
        Command::Attend {
            text,
            model,
            layer,
            head,
            png,
            html,
            plain,
            threads,
        } => with_threads(threads, |_| {
            let dir = model.unwrap_or_else(embed::default_model_dir);
            let embedder = embed::Embedder::load(&dir)?;
            let maps = attend::maps(&embedder, &text)?;
            let n_layers = maps.layers.len();
            let layer = layer.unwrap_or(n_layers.saturating_sub(1));
            if layer >= n_layers {
                anyhow::bail!(
                    "--layer is {layer}, expected 0 to {} (the model has {n_layers} layers)",
                    n_layers - 1
                );
            }
            if head >= maps.heads {
                anyhow::bail!(
                    "--head is {head}, expected 0 to {} (the model has {} heads)",
                    maps.heads - 1,
                    maps.heads
                );
            }
            let s = maps.tokens.len();
            println!("layer {layer}, head {head}   (rows: queries, columns: keys)");
            let style = heatmap::Style::detect(plain);
            print!(
                "{}",
                heatmap::render(
                    &maps.tokens,
                    &maps.tokens,
                    &maps.layers[layer][head * s * s..(head + 1) * s * s],
                    style
                )
            );
            if let Some(path) = &png {
                attend::write_png(&maps, layer, path)?;
                println!("wrote {} (every head of layer {layer})", path.display());
            }
            if let Some(path) = &html {
                attend::write_html(&maps, &text, path)?;
                println!(
                    "wrote {} (every layer and head; open it in a browser, no network needed)",
                    path.display()
                );
            }
            Ok(())
        }),
        Command::Demo {
            text,
            model,
            toy,
            layer,
            head,
            plain,
            threads,
        } => with_threads(threads, |_| demo::run(&text, model.as_deref(), toy, layer, head, plain)),
    }
}

/// Runs `attn` with the process's arguments: 0 success, 1 runtime error, 2 usage error.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
