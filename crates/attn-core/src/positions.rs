//! Positions: rotary embeddings (RoPE) applied in place to projected queries and keys, and ALiBi
//! slopes.
//!
//! RoPE rotates pairs of a head's features by `θ_i = position · base^(-2i/D)`. The half-rotation
//! style (GPT-NeoX, LLaMA's Hugging Face form) pairs feature `i` with `i + D/2`; the interleaved
//! style (GPT-J, the original paper) pairs `2i` with `2i + 1`. Angles are computed in f64.

use serde::{Deserialize, Serialize};

/// Which features RoPE pairs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Feature `i` with `i + D/2`.
    HalfRotation,
    /// Feature `2i` with `2i + 1`.
    Interleaved,
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rope {
    /// Pairing of features.
    pub style: RopeStyle,
    /// The base of the angle frequencies; 10000 in the paper.
    #[serde(default = "default_base")]
    pub base: f64,
}

fn default_base() -> f64 {
    10_000.0
}

impl Rope {
    /// Rotates, in place, the heads of `rows` rows of `data`: row `r` starts at `r·row_stride`,
    /// head `h` at `col0 + h·head_dim` within it, and sits at `positions[r]`.
    ///
    /// `head_dim` must be even.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &self,
        data: &mut [f32],
        row_stride: usize,
        col0: usize,
        n_heads: usize,
        head_dim: usize,
        positions: impl Fn(usize) -> usize,
        rows: usize,
    ) {
        self.rotate(data, [row_stride, col0, n_heads, head_dim], positions, rows, 1.0);
    }

    /// The transpose of [`Rope::apply`] (rotation by `-θ`): the backward of RoPE, which maps
    /// the gradient of rotated features to the gradient of the features before rotation.
    pub(crate) fn apply_inverse(
        &self,
        data: &mut [f32],
        [row_stride, col0, n_heads, head_dim]: [usize; 4],
        positions: impl Fn(usize) -> usize,
        rows: usize,
    ) {
        self.rotate(data, [row_stride, col0, n_heads, head_dim], positions, rows, -1.0);
    }

    /// Rotation by `sign·θ`.
    fn rotate(
        &self,
        data: &mut [f32],
        [row_stride, col0, n_heads, head_dim]: [usize; 4],
        positions: impl Fn(usize) -> usize,
        rows: usize,
        sign: f64,
    ) {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| self.base.powf(-(2.0 * i as f64) / head_dim as f64))
            .collect();
        let mut cos_sin = vec![(0.0f32, 0.0f32); half];
        for r in 0..rows {
            let position = positions(r) as f64;
            for (cs, f) in cos_sin.iter_mut().zip(&inv_freq) {
                let angle = sign * position * f;
                *cs = (angle.cos() as f32, angle.sin() as f32);
            }
            for h in 0..n_heads {
                let start = r * row_stride + col0 + h * head_dim;
                let head = &mut data[start..start + head_dim];
                for (i, &(c, s)) in cos_sin.iter().enumerate() {
                    let (a, b) = match self.style {
                        RopeStyle::HalfRotation => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x, y) = (head[a], head[b]);
                    head[a] = x * c - y * s;
                    head[b] = x * s + y * c;
                }
            }
        }
    }
}

/// ALiBi slopes for `n_heads` heads, as in the paper's reference code: a geometric sequence
/// starting at `2^(-8/n)` for the largest power of two `n <= n_heads`, with the odd terms of the
/// sequence for `2n` filling the remaining heads.
///
/// ```
/// let slopes = attn_core::alibi_slopes(8);
/// assert_eq!(slopes[0], 0.5);
/// assert_eq!(slopes[7], 1.0 / 256.0);
/// ```
pub fn alibi_slopes(n_heads: usize) -> Vec<f32> {
    fn power_of_two(n: usize) -> Vec<f32> {
        let start = 2f64.powf(-8.0 / n as f64);
        (0..n).map(|i| start.powi(i as i32 + 1) as f32).collect()
    }
    if n_heads == 0 {
        return Vec::new();
    }
    let closest = 1usize << (usize::BITS - 1 - n_heads.leading_zeros());
    let mut slopes = power_of_two(closest);
    if closest < n_heads {
        let extra = power_of_two(2 * closest);
        slopes.extend(extra.iter().step_by(2).take(n_heads - closest));
    }
    slopes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() {
        for style in [RopeStyle::HalfRotation, RopeStyle::Interleaved] {
            let rope = Rope { style, base: 10_000.0 };
            let original: Vec<f32> = (0..2 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut data = original.clone();
            rope.apply(&mut data, 8, 0, 2, 4, |r| r + 3, 1);
            // Position 3: each pair keeps its length.
            for h in 0..2 {
                let pairs: [(usize, usize); 2] = if style == RopeStyle::HalfRotation {
                    [(0, 2), (1, 3)]
                } else {
                    [(0, 1), (2, 3)]
                };
                for (a, b) in pairs {
                    let (a, b) = (h * 4 + a, h * 4 + b);
                    let before = original[a].hypot(original[b]);
                    let after = data[a].hypot(data[b]);
                    assert!((before - after).abs() < 1e-6);
                }
            }
            // The first pair turns by exactly 3 radians (frequency 1).
            let (a, b) = if style == RopeStyle::HalfRotation {
                (0, 2)
            } else {
                (0, 1)
            };
            let want = (original[b].atan2(original[a]) as f64 + 3.0).rem_euclid(std::f64::consts::TAU);
            let got = (data[b].atan2(data[a]) as f64).rem_euclid(std::f64::consts::TAU);
            assert!((want - got).abs() < 1e-5, "{want} {got}");
            // The second row (position unused here) is untouched.
            assert_eq!(&data[8..], &original[8..]);
        }
    }

    /// The textbook rotation in f64: pair `(a, b)` of feature `i` turned by
    /// `sign · position · base^(-2i/D)`.
    fn rotated_f64(head: &[f32], style: RopeStyle, base: f64, position: usize, sign: f64) -> Vec<f64> {
        let d = head.len();
        let mut out: Vec<f64> = head.iter().map(|&x| f64::from(x)).collect();
        for i in 0..d / 2 {
            let (a, b) = match style {
                RopeStyle::HalfRotation => (i, i + d / 2),
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            };
            let angle = sign * position as f64 * base.powf(-2.0 * i as f64 / d as f64);
            let (x, y) = (out[a], out[b]);
            out[a] = x * angle.cos() - y * angle.sin();
            out[b] = x * angle.sin() + y * angle.cos();
        }
        out
    }

    /// Every head of every row, at its own position, against the f64 rotation; the columns
    /// outside the heads (before `col0`, after the last head) untouched; and the inverse turns
    /// the other way, so it undoes `apply`.
    #[test]
    fn rope_matches_the_f64_rotation_at_every_row_head_and_frequency() {
        let (rows, stride, col0, heads, d) = (3, 29, 3, 2, 8);
        let original: Vec<f32> = (0..rows * stride).map(|i| (i as f32 * 0.61).sin() + 0.1).collect();
        let positions = [5usize, 0, 1_000];
        for style in [RopeStyle::HalfRotation, RopeStyle::Interleaved] {
            for base in [10_000.0, 500_000.0] {
                let rope = Rope { style, base };
                for sign in [1.0, -1.0] {
                    let mut data = original.clone();
                    if sign > 0.0 {
                        rope.apply(&mut data, stride, col0, heads, d, |r| positions[r], rows);
                    } else {
                        rope.apply_inverse(&mut data, [stride, col0, heads, d], |r| positions[r], rows);
                    }
                    for (r, &position) in positions.iter().enumerate() {
                        let row = r * stride;
                        assert_eq!(data[row..row + col0], original[row..row + col0]);
                        let end = row + col0 + heads * d;
                        assert_eq!(data[end..row + stride], original[end..row + stride]);
                        for h in 0..heads {
                            let start = row + col0 + h * d;
                            let want = rotated_f64(&original[start..start + d], style, base, position, sign);
                            for (j, (&got, want)) in data[start..start + d].iter().zip(want).enumerate() {
                                assert!(
                                    (f64::from(got) - want).abs() < 2e-6,
                                    "{style:?} base {base} sign {sign} row {r} head {h} feature {j}: {got} {want}"
                                );
                            }
                        }
                    }
                    if sign > 0.0 {
                        rope.apply_inverse(&mut data, [stride, col0, heads, d], |r| positions[r], rows);
                        for (got, want) in data.iter().zip(&original) {
                            assert!((got - want).abs() < 2e-6, "{got} {want}");
                        }
                    }
                }
            }
        }
    }

    /// The paper's reference code (`get_slopes`), in f64.
    fn paper_slopes(n: usize) -> Vec<f64> {
        let power_of_two = |n: usize| -> Vec<f64> {
            let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
            (0..n).map(|i| start * start.powi(i as i32)).collect()
        };
        let log = (n as f64).log2();
        if log.fract() == 0.0 {
            return power_of_two(n);
        }
        let closest = 2usize.pow(log.floor() as u32);
        let mut slopes = power_of_two(closest);
        slopes.extend(paper_slopes(2 * closest).into_iter().step_by(2).take(n - closest));
        slopes
    }

    #[test]
    fn alibi_slopes_are_the_papers_for_1_to_64_heads() {
        assert!(alibi_slopes(0).is_empty());
        for n in 1..=64 {
            let got = alibi_slopes(n);
            let want = paper_slopes(n);
            assert_eq!(got.len(), n);
            for (i, (&g, w)) in got.iter().zip(want).enumerate() {
                assert!((f64::from(g) / w - 1.0).abs() < 1e-6, "{n} heads, head {i}: {g} {w}");
            }
        }
    }

    #[test]
    fn rope_reads_the_papers_base_by_default() {
        let rope: Rope = serde_json::from_str(r#"{"style": "interleaved"}"#).unwrap();
        assert_eq!(
            rope,
            Rope {
                style: RopeStyle::Interleaved,
                base: 10_000.0
            }
        );
    }

    #[test]
    fn alibi_slopes_match_the_paper() {
        assert_eq!(alibi_slopes(1), vec![2f32.powi(-8)]);
        let s = alibi_slopes(12);
        assert_eq!(s.len(), 12);
        assert_eq!(&s[..8], &alibi_slopes(8)[..]);
        // The next four are the odd terms of the 16-head sequence: 2^-0.5, 2^-1.5, ...
        assert!((s[8] - 2f32.powf(-0.5)).abs() < 1e-7);
        assert!((s[9] - 2f32.powf(-1.5)).abs() < 1e-7);
    }
}
