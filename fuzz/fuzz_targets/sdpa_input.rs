//! `attn sdpa` on any input file (first byte: the causal alignment), under a 64 MiB memory
//! cap: shapes, masks, broadcasting and the kernel.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        std::env::set_var("ATTN_MAX_MEMORY", "64M");
    },
    |data: &[u8]| {
        if let Some((&causal, file)) = data.split_first() {
            let _ = attn_cli::fuzzing::sdpa(file, causal);
        }
    }
);
