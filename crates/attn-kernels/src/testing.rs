//! Test helpers: deterministic random data and tolerance checks against f64 references.

pub use crate::rng::{random_vec, SplitMix64};

/// Asserts `|got - want| <= atol + rtol·|want|` elementwise; equal infinities and NaN in both
/// places count as equal.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if g == w || (g.is_nan() && w.is_nan()) {
            continue;
        }
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}: element {i}: got {g}, want {w} (error {err:e})"
        );
    }
}

/// The index and size of the largest error of `got` against `want`, measured as
/// `|got - want| / (1 + |want|)` (absolute near zero, relative for large values; an error
/// within `tol` here passes [`assert_close`] with `atol = rtol = tol`). Equal values, equal
/// infinities included, and NaN in both count as 0; NaN in one only counts as infinite.
pub fn worst_error(got: &[f32], want: &[f64]) -> (usize, f64) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let g = g as f64;
            if g == w || (g.is_nan() && w.is_nan()) {
                0.0
            } else {
                let e = (g - w).abs() / (1.0 + w.abs());
                if e.is_nan() {
                    f64::INFINITY
                } else {
                    e
                }
            }
        })
        .enumerate()
        .fold((0, 0.0), |best, (i, e)| if e > best.1 { (i, e) } else { best })
}

/// The size of the largest error of `got` against `want` ([`worst_error`]).
pub fn max_error(got: &[f32], want: &[f64]) -> f64 {
    worst_error(got, want).1
}
