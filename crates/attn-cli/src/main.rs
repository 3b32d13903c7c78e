//! The `attn` binary; everything is in the library (`src/lib.rs`).

/// mimalloc keeps freed memory for reuse: without it every large buffer of a training step
/// (activations, gradients) came back from the kernel zero-filled, page by page. Large
/// allocations are counted for `attn bench train` (`attn_cli::allocations`).
#[global_allocator]
static ALLOCATOR: attn_cli::allocations::Counting<mimalloc::MiMalloc> =
    attn_cli::allocations::Counting(mimalloc::MiMalloc);

/// mimalloc's `mi_option_purge_delay` (position 15 of `mi_option_t` in mimalloc.h, v2 and v3):
/// how long freed memory stays committed before it is returned to the OS, in ms; -1: never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Freed memory stays the process's. With the default 10 ms delay, the large buffers a layer
    // frees and takes again on every call (the feed-forward's hidden rows, the projections)
    // were handed back and came back from the kernel zero-filled, page by page: 5% of an
    // encoder layer's samples in `clear_page_erms`, and 7-12% more CPU time (`perf stat`,
    // `attn bench run` of an encoder layer, docs/PERFORMANCE.md). `attn` runs one job per
    // process, so its memory stays at that job's peak until it ends.
    // SAFETY: setting an option has no preconditions; mimalloc reads it when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    attn_cli::main()
}
