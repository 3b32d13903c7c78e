//! The `attn` binary; everything is in the library (`src/lib.rs`).

fn main() -> std::process::ExitCode {
    attn_cli::main()
}
