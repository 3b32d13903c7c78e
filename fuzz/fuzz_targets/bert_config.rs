//! Any bytes as a BERT `config.json`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = attn_cli::fuzzing::bert_config(data);
});
