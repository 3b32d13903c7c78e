//! The `attn` binary; everything is in the library (`src/lib.rs`).

/// mimalloc keeps freed memory for reuse: without it every large buffer of a training step
/// (activations, gradients) came back from the kernel zero-filled, page by page. Large
/// allocations are counted for `attn bench train` (`attn_cli::allocations`).
#[global_allocator]
static ALLOCATOR: attn_cli::allocations::Counting<mimalloc::MiMalloc> =
    attn_cli::allocations::Counting(mimalloc::MiMalloc);

fn main() -> std::process::ExitCode {
    attn_cli::main()
}
