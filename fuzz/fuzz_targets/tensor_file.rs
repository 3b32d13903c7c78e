//! Any bytes as a safetensors file: `Ok` or a typed error, never a panic or an oversized
//! allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = attn_cli::fuzzing::tensor_file(data);
});
