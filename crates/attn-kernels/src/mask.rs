//! What a query row may attend to: a boolean or additive mask broadcast to `[B, H, S, T]`,
//! causal alignment, and key padding by per-batch lengths; and the per-row code that applies them.
//!
//! Conventions follow PyTorch's `scaled_dot_product_attention`: a boolean `true` means "may
//! attend"; an additive mask is added to the *scaled* scores. `Causal::TopLeft` is
//! `is_causal=True` (query `s` sees keys `t <= s`); `Causal::BottomRight` aligns the last query
//! with the last key (query `s` sees keys `t <= s + T - S`), as when decoding with a KV cache.
//! What this leaves out: which boolean convention a *module* uses; that is attn-core's business.

use crate::{KernelError, View4};

/// Causal masking and its alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Causal {
    /// No causal mask.
    #[default]
    None,
    /// Query `s` attends keys `t <= s` (PyTorch `is_causal=True`).
    TopLeft,
    /// Query `s` attends keys `t <= s + T - S`: the last query sees every key.
    BottomRight,
}

impl Causal {
    /// The exclusive upper bound on keys for query `s`, clamped to `[0, T]`.
    #[inline]
    pub fn key_limit(self, s: usize, n_queries: usize, n_keys: usize) -> usize {
        let limit = match self {
            Causal::None => return n_keys,
            Causal::TopLeft => s as i128 + 1,
            Causal::BottomRight => s as i128 + 1 + n_keys as i128 - n_queries as i128,
        };
        limit.clamp(0, n_keys as i128) as usize
    }
}

/// An explicit mask over the scores, as a view broadcast to `[B, H, S, T]` (stride 0 on
/// broadcast dimensions).
#[derive(Debug, Clone, Copy, Default)]
pub enum Mask<'a> {
    /// No explicit mask.
    #[default]
    None,
    /// `true` = may attend (SDPA's convention); `false` scores become `-inf`.
    Allowed(View4<'a, bool>),
    /// `true` = masked out (the convention of PyTorch's modules); `true` scores become `-inf`.
    Disallowed(View4<'a, bool>),
    /// Added to the scaled scores; `-inf` masks a key out.
    Additive(View4<'a, f32>),
}

/// Everything beyond `q`, `k` and `v` that decides an attention call's scores.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionOptions<'a> {
    /// Multiplies `q·k`; `None` is `1/sqrt(D)`.
    pub scale: Option<f32>,
    /// Explicit mask broadcast to `[B, H, S, T]`.
    pub mask: Mask<'a>,
    /// A second mask, combined with `mask`: usually key padding, a `[B, T]` mask broadcast to
    /// `[B, H, S, T]`. Two masks of different shapes are applied together without
    /// materialising their combination.
    pub key_mask: Mask<'a>,
    /// ALiBi: query head `h` adds `-slopes[h] · (s + T - S - t)` to the score of key `t`, the
    /// distance to the query's position with queries aligned to the last keys (as when decoding
    /// with a cache). Length `H`.
    pub alibi_slopes: Option<&'a [f32]>,
    /// Causal masking and alignment.
    pub causal: Causal,
    /// Key padding: batch `b` attends only keys `t < key_lengths[b]`; length `B`.
    pub key_lengths: Option<&'a [usize]>,
    /// The number format of the two products, `scale·q·kᵀ` and `P·V` (f32 by default). With
    /// [`Precision::Bf16`](crate::Precision) the scaled queries, keys, values and the
    /// softmax's unnormalised probabilities are rounded to bf16 and the products summed in
    /// f32; masks, softmax and LSE stay f32. [`crate::flash_attention`] and
    /// [`crate::attention`] (which then always takes the flash path) honour it, and so does
    /// [`crate::attention_weights`] (its scores are the forward's); the unfused path and the
    /// backward are f32 only and refuse it with [`KernelError::InvalidArgument`]. The f64
    /// reference computes the exact result of the f32 inputs whatever it says.
    pub precision: crate::Precision,
}

/// A view of `data`, stored densely with `shape` (rank 0 to 4), broadcast to `target` by
/// PyTorch's rules: shapes are right-aligned, missing leading dims and dims of size 1 broadcast.
///
/// ```
/// use attn_kernels::broadcast_to;
/// let mask = [true, false, true, true]; // a [S, T] = [2, 2] mask
/// let view = broadcast_to(&mask, &[2, 2], [3, 4, 2, 2]).unwrap();
/// assert_eq!(view.get([2, 3, 0, 1]), false);
/// ```
pub fn broadcast_to<'a, T>(data: &'a [T], shape: &[usize], target: [usize; 4]) -> Result<View4<'a, T>, KernelError> {
    let bad = || KernelError::MaskNotBroadcastable {
        op: "broadcast_to",
        got: shape.to_vec(),
        target: target.to_vec(),
    };
    if shape.len() > 4 {
        return Err(bad());
    }
    let mut full = [1usize; 4];
    full[4 - shape.len()..].copy_from_slice(shape);
    let count = full
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(bad)?;
    if count != data.len() {
        return Err(KernelError::ShapeMismatch {
            op: "broadcast_to",
            tensor: "mask",
            expected: shape.to_vec(),
            got: vec![data.len()],
        });
    }
    let dense = crate::view::contiguous_strides(full);
    let mut strides = [0usize; 4];
    for dim in 0..4 {
        if full[dim] == target[dim] {
            strides[dim] = if full[dim] == 1 { 0 } else { dense[dim] };
        } else if full[dim] == 1 {
            strides[dim] = 0;
        } else {
            return Err(bad());
        }
    }
    View4::new(data, target, strides)
}

/// Checks an [`AttentionOptions`]' mask and key lengths against scores of shape `[B, H, S, T]`.
pub(crate) fn validate_options(
    op: &'static str,
    options: &AttentionOptions<'_>,
    target: [usize; 4],
) -> Result<(), KernelError> {
    for mask in [&options.mask, &options.key_mask] {
        if let Some(shape) = mask.shape() {
            if shape != target {
                return Err(KernelError::MaskNotBroadcastable {
                    op,
                    got: shape.to_vec(),
                    target: target.to_vec(),
                });
            }
        }
    }
    if let Some(slopes) = options.alibi_slopes {
        if slopes.len() != target[1] {
            return Err(KernelError::ShapeMismatch {
                op,
                tensor: "alibi_slopes",
                expected: vec![target[1]],
                got: vec![slopes.len()],
            });
        }
    }
    if let Some(lengths) = options.key_lengths {
        if lengths.len() != target[0] {
            return Err(KernelError::ShapeMismatch {
                op,
                tensor: "key_lengths",
                expected: vec![target[0]],
                got: vec![lengths.len()],
            });
        }
        if let Some((batch, &length)) = lengths.iter().enumerate().find(|(_, &l)| l > target[3]) {
            return Err(KernelError::KeyLengthTooLarge {
                op,
                batch,
                length,
                n_keys: target[3],
            });
        }
    }
    if let Some(scale) = options.scale {
        if !scale.is_finite() {
            return Err(KernelError::InvalidArgument {
                op,
                what: "scale",
                got: scale.to_string(),
                expected: "a finite number",
            });
        }
    }
    Ok(())
}

/// The scale an [`AttentionOptions`] asks for with head dim `d`.
#[inline]
pub(crate) fn resolve_scale(options: &AttentionOptions<'_>, d: usize) -> f32 {
    options
        .scale
        .unwrap_or_else(|| if d == 0 { 1.0 } else { 1.0 / (d as f32).sqrt() })
}

impl Mask<'_> {
    /// The view's shape, if there is a mask.
    pub fn shape(&self) -> Option<[usize; 4]> {
        match self {
            Mask::None => None,
            Mask::Allowed(m) | Mask::Disallowed(m) => Some(m.shape()),
            Mask::Additive(m) => Some(m.shape()),
        }
    }
}

/// Whether [`mask_row`] does more to a row than hide the keys past its limit: ALiBi or a mask.
/// Without them, a row whose block ends at or before its limit is left as it is, and the flash
/// kernel skips the call.
#[inline]
pub(crate) fn shapes_rows(options: &AttentionOptions<'_>) -> bool {
    options.alibi_slopes.is_some() || !matches!(options.mask, Mask::None) || !matches!(options.key_mask, Mask::None)
}

/// Applies everything of `options` that shapes one score row: `row[j]` holds the scaled score
/// of key `t0 + j` for `(b, h, s)` in a call of `n_queries` queries and `n_keys` keys. Keys at or
/// past `limit` (causal and key lengths folded together) become `-inf`.
#[inline]
pub(crate) fn mask_row(
    row: &mut [f32],
    options: &AttentionOptions<'_>,
    bhs: [usize; 3],
    t0: usize,
    limit: usize,
    [n_queries, n_keys]: [usize; 2],
) {
    if let Some(slopes) = options.alibi_slopes {
        let [_, h, s] = bhs;
        let position = (s + n_keys) as f32 - n_queries as f32;
        let slope = slopes[h];
        row.iter_mut()
            .enumerate()
            .for_each(|(j, x)| *x -= slope * (position - (t0 + j) as f32));
    }
    // Most calls have neither mask: no call per row then.
    for mask in [&options.mask, &options.key_mask] {
        if !matches!(mask, Mask::None) {
            apply_mask(row, mask, bhs, t0);
        }
    }
    let bc = row.len();
    if t0 + bc > limit {
        let from = limit.saturating_sub(t0).min(bc);
        row[from..].fill(f32::NEG_INFINITY);
    }
}

/// `score + mask`, except that a mask of `-inf` gives `-inf` whatever the score.
#[inline(always)]
fn add_mask(score: f32, mask: f32) -> f32 {
    if mask == f32::NEG_INFINITY {
        mask
    } else {
        score + mask
    }
}

#[inline]
fn apply_mask(row: &mut [f32], mask: &Mask<'_>, [b, h, s]: [usize; 3], t0: usize) {
    let bc = row.len();
    match mask {
        Mask::None => {}
        Mask::Additive(m) => {
            let base = m.offset([b, h, s, 0]) + t0 * m.strides()[3];
            let data = m.data();
            match m.strides()[3] {
                // `-inf` hides the key outright, so a NaN score of a hidden key stays hidden
                // (`NaN + -inf` would be NaN): see the crate's non-finite policy.
                0 => {
                    let add = data[base];
                    row.iter_mut().for_each(|x| *x = add_mask(*x, add));
                }
                1 => row
                    .iter_mut()
                    .zip(&data[base..base + bc])
                    .for_each(|(x, &a)| *x = add_mask(*x, a)),
                st => row
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = add_mask(*x, data[base + j * st])),
            }
        }
        Mask::Allowed(m) | Mask::Disallowed(m) => {
            // Masked out where the stored boolean equals `masked_when`.
            let masked_when = matches!(mask, Mask::Disallowed(_));
            let base = m.offset([b, h, s, 0]) + t0 * m.strides()[3];
            let data = m.data();
            match m.strides()[3] {
                1 => row.iter_mut().zip(&data[base..base + bc]).for_each(|(x, &flag)| {
                    if flag == masked_when {
                        *x = f32::NEG_INFINITY
                    }
                }),
                st => row.iter_mut().enumerate().for_each(|(j, x)| {
                    if data[base + j * st] == masked_when {
                        *x = f32::NEG_INFINITY
                    }
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_limits() {
        assert_eq!(Causal::TopLeft.key_limit(0, 3, 5), 1);
        assert_eq!(Causal::BottomRight.key_limit(0, 3, 5), 3);
        assert_eq!(Causal::BottomRight.key_limit(2, 3, 5), 5);
        // More queries than keys: the first queries see nothing when aligned bottom-right.
        assert_eq!(Causal::BottomRight.key_limit(0, 5, 3), 0);
        assert_eq!(Causal::BottomRight.key_limit(3, 5, 3), 2);
        assert_eq!(Causal::TopLeft.key_limit(9, 10, 3), 3);
        assert_eq!(Causal::None.key_limit(0, 10, 3), 3);
    }

    #[test]
    fn broadcast_rules() {
        let d = [0.0f32; 6];
        let v = broadcast_to(&d, &[2, 1, 3], [4, 2, 5, 3]).unwrap();
        assert_eq!(v.strides(), [0, 3, 0, 1]);
        assert!(matches!(
            broadcast_to(&d, &[3, 2], [1, 1, 3, 3]),
            Err(KernelError::MaskNotBroadcastable { .. })
        ));
        assert!(matches!(
            broadcast_to(&d, &[5], [1, 1, 3, 5]),
            Err(KernelError::ShapeMismatch { .. })
        ));
        assert!(broadcast_to(&d[..1], &[], [2, 2, 2, 2]).is_ok());
        assert!(broadcast_to(&d, &[1, 1, 1, 2, 3], [1, 1, 2, 3]).is_err());
    }
}
