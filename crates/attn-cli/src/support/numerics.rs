//! Comparing computed values with references: what `attn check` and the demo's checks share.

/// The largest `|got - want|`; equal values (infinities included) count as 0, and a NaN on one
/// side makes the result NaN, so it can never pass a tolerance.
pub fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| if g as f64 == w { 0.0 } else { (g as f64 - w).abs() })
        .fold(0.0, |worst, e| if e.is_nan() || e > worst { e } else { worst })
}

#[cfg(test)]
mod tests {
    use super::max_abs;

    #[test]
    fn a_nan_anywhere_is_never_within_tolerance() {
        assert_eq!(max_abs(&[1.0, 2.0], &[1.0, 2.5]), 0.5);
        assert!(max_abs(&[f32::NAN, 2.0], &[1.0, 2.0]).is_nan());
        assert!(max_abs(&[1.0, f32::NAN, 2.0], &[1.0, 2.0, 9.0]).is_nan());
        assert_eq!(max_abs(&[f32::INFINITY], &[f64::INFINITY]), 0.0);
    }
}
