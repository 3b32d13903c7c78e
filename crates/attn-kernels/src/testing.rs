//! Test helpers: deterministic random data and tolerance checks against f64 references.

/// The one pseudo-random generator of the workspace (splitmix64): test data, benchmark inputs
/// and seeded weights (`attn_core::WeightInit`) all draw from it, the same on every machine.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next value in `[-1, 1)`, on a grid of 2^-23.
    pub fn next_signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// `n` values in `[-1, 1)` from [`SplitMix64`] with `seed`.
pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.next_signed()).collect()
}

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
