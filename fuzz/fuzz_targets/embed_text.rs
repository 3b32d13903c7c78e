//! `attn embed --input FILE` on any bytes as the file, with all-MiniLM-L6-v2 (installed by
//! `cargo xtask fetch-model`; the target refuses to run without it).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let result = attn_cli::fuzzing::embed_text(data);
    assert!(result.is_some(), "the model is not installed: run `cargo xtask fetch-model`");
});
