//! The command line: the subcommands (each one's flags and body live in its module), dispatch,
//! exit codes.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::commands::{attend, bench, check, dates, demo, embed, run, sdpa, train, translate};

#[derive(Parser)]
#[command(
    name = "attn",
    version,
    about = "Attention on the CPU, with PyTorch's numbers",
    long_about = None,
    after_help = "Plain `attn`, with no command, runs `attn demo`.\nEvery command, flag and file format: docs/CLI.md; semantics: docs/SEMANTICS.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// scaled_dot_product_attention on tensors from a safetensors file (PyTorch semantics).
    Sdpa(sdpa::Args),
    /// Runs a module with PyTorch weights (nn.MultiheadAttention, ...) on safetensors inputs.
    Run(run::Args),
    /// Sentence embeddings from a BERT-family checkpoint (default: all-MiniLM-L6-v2).
    Embed(embed::Args),
    /// Pictures of a real model's attention: a PNG grid of a layer's heads, an HTML view of all.
    Attend(attend::Args),
    /// Runs every kernel and module path on random inputs against an f64 reference here.
    Check(check::Args),
    /// Measurements: medians of repeated runs.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Shows attention at work, offline, in a few seconds (what plain `attn` runs): the shipped
    /// date translator's cross-attention.
    Demo(demo::Args),
    /// The date-translation task as TSV pairs (the shipped model's data).
    Dates(dates::Args),
    /// Trains a sequence-to-sequence Transformer on TSV pairs (forward, backward, AdamW).
    Train(train::Args),
    /// Translates with a sequence-to-sequence checkpoint (default: the shipped date translator).
    Translate(translate::Args),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => demo::main(demo::Args::plain_attn()),
        Some(Command::Sdpa(args)) => sdpa::main(args),
        Some(Command::Run(args)) => run::main(args),
        Some(Command::Embed(args)) => embed::main(args),
        Some(Command::Attend(args)) => attend::main(args),
        Some(Command::Check(args)) => check::main(args),
        Some(Command::Bench(command)) => bench::main(command),
        Some(Command::Demo(args)) => demo::main(args),
        Some(Command::Dates(args)) => dates::main(args),
        Some(Command::Train(args)) => train::main(args),
        Some(Command::Translate(args)) => translate::main(args),
    }
}

/// Runs `attn` with the process's arguments: 0 success, 1 runtime error, 2 usage error.
pub fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let env = attn_nn::core::kernels::requested_simd_level()
        .map(drop)
        .and_then(|()| attn_nn::core::kernels::requested_gemm().map(drop));
    if let Err(e) = env {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
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
        // A reader that stopped reading (`attn demo | head -3`) is not an error of ours.
        Err(e) if is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Restores the default action of SIGPIPE, which Rust's runtime sets to "ignore": writing to a
/// pipe whose reader has gone (`attn demo | head -3`) then ends the process quietly, as it ends
/// `cat` or `grep`, instead of making every later `println!` panic. Files are written to paths,
/// never to pipes, so no checkpoint can be cut short by it.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: `signal` with SIG_DFL installs no handler of ours; it runs before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether `e` comes from writing to a closed pipe (where SIGPIPE is not delivered).
fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
