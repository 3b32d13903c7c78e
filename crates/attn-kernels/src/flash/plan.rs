//! Validation of one call's operands and the plan that cuts its work.

use super::{BLOCK_KEYS, BLOCK_ROWS, MIN_KEYS_PER_SPLIT, MIN_TASKS};
use crate::mask::validate_options;
use crate::{AttentionOptions, KernelError, View4};

/// The shapes of one call and how its work is cut.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub b: usize,
    pub h: usize,
    pub g: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
    pub dv: usize,
    /// `Dv` rounded up to the micro-kernel width: the row stride of the accumulator.
    pub dv_pad: usize,
    /// Query heads per key/value head, `H / G`.
    pub rep: usize,
    /// `S · rep`: the stacked rows of one group.
    pub rows_per_group: usize,
    pub row_tiles: usize,
    pub splits: usize,
    pub keys_per_split: usize,
    /// Keys per packed key or value block: `min(T, BLOCK_KEYS)` rounded up to the micro-kernel
    /// width, so short key sequences are not padded to a full block. Packed blocks are panels
    /// of that width, contiguous, so no row stride is a power of two.
    pub kb_pad: usize,
}

impl Plan {
    pub(crate) fn new([b, h, s, d]: [usize; 4], [g, t, dv]: [usize; 3]) -> Self {
        let rep = h / g.max(1);
        let rows_per_group = s * rep;
        let row_tiles = rows_per_group.div_ceil(BLOCK_ROWS);
        let tasks = b * g * row_tiles;
        let splits = if tasks == 0 || tasks >= MIN_TASKS || t < 2 * MIN_KEYS_PER_SPLIT {
            1
        } else {
            MIN_TASKS.div_ceil(tasks).min(t / MIN_KEYS_PER_SPLIT).max(1)
        };
        let keys_per_split = t.div_ceil(splits).div_ceil(BLOCK_KEYS) * BLOCK_KEYS;
        let splits = if t == 0 { 1 } else { t.div_ceil(keys_per_split.max(1)) };
        let dv_pad = crate::tile::pad_to_nr(dv);
        Plan {
            b,
            h,
            g,
            s,
            t,
            d,
            dv,
            dv_pad,
            rep,
            rows_per_group,
            row_tiles,
            splits,
            keys_per_split,
            kb_pad: kb_pad(t),
        }
    }
}

/// Checks `q: [B, H, S, D]` against `k: [B, G, T, D]` (G dividing H) and returns
/// `[B, H, G, S, T, D]`.
pub(crate) fn validate_qk<K>(
    op: &'static str,
    q: &View4<'_, f32>,
    k: &View4<'_, K>,
) -> Result<[usize; 6], KernelError> {
    let [b, h, s, d] = q.shape();
    let [kb, g, t, kd] = k.shape();
    if g == 0 || h % g != 0 {
        return Err(KernelError::HeadsNotDivisible {
            op,
            n_heads: h,
            n_kv_heads: g,
        });
    }
    if kb != b || kd != d {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "k",
            expected: vec![b, g, t, d],
            got: k.shape().to_vec(),
        });
    }
    Ok([b, h, g, s, t, d])
}

/// Validates the operands of an attention call and returns its plan.
pub(crate) fn validate<E>(
    op: &'static str,
    out_shape: [usize; 4],
    lse_shape: Option<[usize; 3]>,
    q: &View4<'_, f32>,
    k: &View4<'_, E>,
    v: &View4<'_, E>,
    options: &AttentionOptions<'_>,
) -> Result<Plan, KernelError> {
    let [b, h, g, s, t, d] = validate_qk(op, q, k)?;
    let dv = v.shape()[3];
    if v.shape() != [b, g, t, dv] {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "v",
            expected: vec![b, g, t, dv],
            got: v.shape().to_vec(),
        });
    }
    if out_shape != [b, h, s, dv] {
        return Err(KernelError::ShapeMismatch {
            op,
            tensor: "out",
            expected: vec![b, h, s, dv],
            got: out_shape.to_vec(),
        });
    }
    if let Some(lse_shape) = lse_shape {
        if lse_shape != [b, h, s] {
            return Err(KernelError::ShapeMismatch {
                op,
                tensor: "lse",
                expected: vec![b, h, s],
                got: lse_shape.to_vec(),
            });
        }
    }
    if d == 0 || dv == 0 {
        return Err(KernelError::InvalidArgument {
            op,
            what: "head dim (D, Dv)",
            got: format!("({d}, {dv})"),
            expected: "at least 1",
        });
    }
    validate_options(op, options, [b, h, s, t])?;
    Ok(Plan::new([b, h, s, d], [g, t, dv]))
}

/// Keys per packed block for `t` keys: `min(t, BLOCK_KEYS)` rounded up to the micro-kernel
/// width (a call with 4 keys packs panels of 16, not blocks of 256).
fn kb_pad(t: usize) -> usize {
    crate::tile::pad_to_nr(t.clamp(1, BLOCK_KEYS))
}
