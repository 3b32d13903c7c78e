//! `attn run` on any config, weights and input (one fuzz input split in three by
//! `attn_cli::fuzzing::split_run_input`), under a 64 MiB memory cap.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        std::env::set_var("ATTN_MAX_MEMORY", "64M");
    },
    |data: &[u8]| {
        let [config, weights, input] = attn_cli::fuzzing::split_run_input(data);
        let _ = attn_cli::fuzzing::run(config, weights, input);
    }
);
