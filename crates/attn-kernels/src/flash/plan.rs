//! Validation of one call's operands and the plan that cuts its work.

use super::{BF16_BLOCK_KEYS, BF16_SCORES_LD, BLOCK_KEYS, BLOCK_ROWS, MIN_KEYS_PER_SPLIT, MIN_TASKS, SCORES_LD};
use crate::mask::validate_options;
use crate::{AttentionOptions, KernelError, Precision, View4};

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
    /// Keys per block: [`BLOCK_KEYS`] in f32, [`BF16_BLOCK_KEYS`] in bf16 (whose kernels, and the
    /// f32 kernel on rounded operands that gives their bits, have tiles of that size).
    pub block_keys: usize,
    /// Row stride of a tile's score buffer for blocks of `block_keys`: [`SCORES_LD`] or
    /// [`BF16_SCORES_LD`].
    pub scores_ld: usize,
    /// Keys per packed key or value block: `min(T, block_keys)` rounded up to the micro-kernel
    /// width, so short key sequences are not padded to a full block. Packed blocks are panels
    /// of that width, contiguous, so no row stride is a power of two.
    pub kb_pad: usize,
}

impl Plan {
    /// The plan of an f32 call (key blocks of [`BLOCK_KEYS`]).
    #[cfg(test)]
    pub(crate) fn new(q_shape: [usize; 4], kv: [usize; 3]) -> Self {
        Plan::for_precision(q_shape, kv, Precision::F32)
    }

    /// The plan of a call in `precision`: key blocks of [`BLOCK_KEYS`] in f32, of
    /// [`BF16_BLOCK_KEYS`] in bf16, whatever kernel then runs it.
    pub(crate) fn for_precision([b, h, s, d]: [usize; 4], [g, t, dv]: [usize; 3], precision: Precision) -> Self {
        let (block_keys, scores_ld) = match precision {
            Precision::F32 => (BLOCK_KEYS, SCORES_LD),
            Precision::Bf16 => (BF16_BLOCK_KEYS, BF16_SCORES_LD),
        };
        let rep = h / g.max(1);
        let rows_per_group = s * rep;
        let row_tiles = rows_per_group.div_ceil(BLOCK_ROWS);
        let tasks = b * g * row_tiles;
        let splits = if tasks == 0 || tasks >= MIN_TASKS || t < 2 * MIN_KEYS_PER_SPLIT {
            1
        } else {
            MIN_TASKS.div_ceil(tasks).min(t / MIN_KEYS_PER_SPLIT).max(1)
        };
        let keys_per_split = t.div_ceil(splits).div_ceil(block_keys) * block_keys;
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
            block_keys,
            scores_ld,
            kb_pad: crate::tile::pad_to_nr(t.clamp(1, block_keys)),
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
    Ok(Plan::for_precision([b, h, s, d], [g, t, dv], options.precision))
}
