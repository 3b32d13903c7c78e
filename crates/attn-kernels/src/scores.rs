//! The scores `(scale·q)·kᵀ` of attention, with one arithmetic per call.
//!
//! The backward recomputes `P = exp(s − lse)` from scores it computes again. Where a row's only
//! visible key holds all its weight, `lse` is that key's score and `P` must come out exactly 1;
//! with large logits, a score recomputed with other rounding than the forward's moves `P` by
//! `|s|·ε`. So a call's scores are computed by one [`ScoreKernel`], chosen from the SIMD level
//! and the call's shape alone, by the forward (flash and unfused) and the backward alike, and
//! each kernel gives every (query row, key) pair the same bits wherever that pair falls in a
//! tile or a block:
//! - [`ScoreKernel::Tile`]: the level's tile GEMM on keys in transposed panels. Each score is
//!   one fused multiply-add chain over `D` in order, from zero.
//! - [`ScoreKernel::Dot`]: for calls of at most [`DECODE_ROWS_MAX`] query rows per key/value
//!   head (decoding), dot products against the keys in place: vector partial sums over `D`,
//!   their horizontal sum, then the tail.
//! - [`ScoreKernel::Scalar`]: the portable level, a plain sum over `D` in order.
//!
//! What it leaves out: the scale (the callers multiply `q` by it first, elementwise, the same
//! way) and the masks (added afterwards by `mask_row`).

use crate::tile::{pad_to_nr, Stored, DECODE_ROWS_MAX, NR};

/// How a call computes its scores (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScoreKernel {
    /// The tile GEMM on transposed key panels.
    Tile,
    /// Dot products against keys in place (a few rows).
    Dot,
    /// The portable sum.
    Scalar,
}

impl ScoreKernel {
    /// The kernel of a call whose key/value heads each serve `rows_per_group` query rows
    /// (`S·H/G`), with keys contiguous along `D` or not, at the running SIMD level.
    pub(crate) fn for_call(rows_per_group: usize, keys_contiguous: bool) -> Self {
        if !crate::simd::simd_level().is_vector() {
            ScoreKernel::Scalar
        } else if rows_per_group <= DECODE_ROWS_MAX && keys_contiguous {
            ScoreKernel::Dot
        } else {
            ScoreKernel::Tile
        }
    }

    /// The row stride `dst` needs for `bc` keys: `Tile` writes whole panels of [`NR`] columns.
    pub(crate) fn min_ld(self, bc: usize) -> usize {
        match self {
            ScoreKernel::Tile => pad_to_nr(bc),
            _ => bc,
        }
    }
}

/// The keys of one block: `keys[j·row_stride + p·col_stride]` for `j < bc`, `p < D`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keys<'a> {
    pub keys: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
    pub bc: usize,
}

/// `dst[i·ld + j] = q_tile[i] · key j` for `i < rows`, `j < bc` (`q_tile: [rows, D]`, already
/// scaled), by `kernel`; `Tile` transposes the keys into `kt_scratch` first (resized as needed)
/// and writes up to [`ScoreKernel::min_ld`] columns, which `ld` must cover.
pub(crate) fn scores_into(
    kernel: ScoreKernel,
    dst: &mut [f32],
    ld: usize,
    q_tile: &[f32],
    [rows, d]: [usize; 2],
    keys: Keys<'_>,
    kt_scratch: &mut Vec<f32>,
) {
    let Keys {
        keys,
        row_stride,
        col_stride,
        bc,
    } = keys;
    if rows == 0 || bc == 0 {
        return;
    }
    assert!(ld >= kernel.min_ld(bc) && dst.len() >= (rows - 1) * ld + kernel.min_ld(bc));
    assert!(q_tile.len() >= rows * d && keys.len() > (bc - 1) * row_stride + d.saturating_sub(1) * col_stride);
    match kernel {
        ScoreKernel::Scalar => {
            for (i, q_row) in q_tile.chunks_exact(d).take(rows).enumerate() {
                for j in 0..bc {
                    let key = &keys[j * row_stride..];
                    let mut sum = 0.0f32;
                    for (p, &x) in q_row.iter().enumerate() {
                        sum += x * key[p * col_stride];
                    }
                    dst[i * ld + j] = sum;
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        ScoreKernel::Dot => {
            assert_eq!(col_stride, 1, "the dot kernel reads keys contiguous along D");
            // SAFETY: a vector level was detected (`for_call`); the assertions above bound
            // `q_tile` ([rows, D]), the `bc` key rows and `dst` ([rows, ld]).
            unsafe {
                crate::tile::dot_rows::<crate::tile::F32Values>(
                    rows,
                    bc,
                    d,
                    q_tile.as_ptr(),
                    d,
                    keys.as_ptr(),
                    row_stride,
                    dst.as_mut_ptr(),
                    ld,
                )
            };
        }
        #[cfg(target_arch = "x86_64")]
        ScoreKernel::Tile => {
            let bc_pad = pad_to_nr(bc);
            if kt_scratch.len() < bc_pad * d {
                kt_scratch.resize(bc_pad * d, 0.0);
            }
            key_panels(kt_scratch, keys, bc, d, row_stride, col_stride);
            tile_scores(dst, ld, q_tile, [rows, d], kt_scratch, bc, None);
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the scalar level exists off x86-64"),
    }
}

/// [`ScoreKernel::Tile`] on keys already in transposed panels ([`key_panels`]): `dst[i·ld + j]`
/// for `i < rows`, `j < pad_to_nr(bc)`, from the first `pad_to_nr(bc) / NR` panels of `kt`. The
/// same bits as [`scores_into`] for those keys: a caller that scores one key block against many
/// row tiles packs it once. With `maxes` (only for a whole number of panels, `bc` a multiple of
/// [`NR`]), each row's maximum is also folded into `maxes[i·W .. (i + 1)·W]`, `W` =
/// [`crate::tile::max_lanes`] lanes (which the caller starts at `-inf`): the same scores, and
/// each row's maximum without reading them again.
pub(crate) fn tile_scores(
    dst: &mut [f32],
    ld: usize,
    q_tile: &[f32],
    [rows, d]: [usize; 2],
    kt: &[f32],
    bc: usize,
    maxes: Option<&mut [f32]>,
) {
    let bc_pad = pad_to_nr(bc);
    if rows == 0 || bc == 0 {
        return;
    }
    assert!(
        crate::simd::simd_level().is_vector(),
        "the tile kernel needs a vector level"
    );
    assert!(ld >= bc_pad && dst.len() >= (rows - 1) * ld + bc_pad);
    assert!(q_tile.len() >= rows * d && kt.len() >= bc_pad * d);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = maxes;
    #[cfg(target_arch = "x86_64")]
    {
        let (a, b, c) = (q_tile.as_ptr(), kt.as_ptr(), dst.as_mut_ptr());
        match maxes {
            Some(maxes) => {
                // Padded columns would take part in the maxima.
                assert!(bc == bc_pad && maxes.len() >= rows * crate::tile::max_lanes());
                // SAFETY: a vector level was checked above; `q_tile` is [rows, D], `kt` holds
                // `bc / NR` panels of [D, NR], `dst` [rows, ld] with `ld ≥ bc`, `maxes` `rows`
                // rows of the level's lanes (asserted above).
                unsafe { crate::tile::gemm_max(rows, bc, d, a, d, b, NR, d * NR, c, ld, maxes.as_mut_ptr()) };
            }
            // SAFETY: a vector level was checked above; `q_tile` is [rows, D], `kt` holds
            // `bc_pad / NR` panels of [D, NR], `dst` [rows, ld] with `ld ≥ bc_pad` (asserted).
            None => unsafe { crate::tile::gemm::<false, false>(rows, bc_pad, d, a, d, b, NR, d * NR, c, ld) },
        }
    }
}

/// `bc` key rows (`keys[j·row_stride + p·col_stride]`, `p < d`) into transposed panels:
/// `dst[(j / NR)·d·NR + p·NR + j % NR]`, zero for `j` from `bc` up to the next multiple of
/// [`NR`].
pub(crate) fn key_panels(dst: &mut [f32], keys: &[f32], bc: usize, d: usize, row_stride: usize, col_stride: usize) {
    key_panels_stored::<crate::tile::F32Values>(dst, keys, bc, d, row_stride, col_stride);
}

/// [`key_panels`] of stored keys, each converted as it is loaded ([`Stored`]: bf16 bits
/// widened, f32 values rounded to bf16): the panels of [`key_panels`] on the converted keys.
pub(crate) fn key_panels_stored<S: Stored>(
    dst: &mut [f32],
    keys: &[S::Elem],
    bc: usize,
    d: usize,
    row_stride: usize,
    col_stride: usize,
) {
    if bc == 0 {
        return;
    }
    let panels = bc.div_ceil(NR);
    assert!(dst.len() >= panels * d * NR && keys.len() > (bc - 1) * row_stride + (d - 1) * col_stride);
    for panel in 0..panels {
        let (j0, n) = (panel * NR, (bc - panel * NR).min(NR));
        let out = &mut dst[panel * d * NR..(panel + 1) * d * NR];
        if n < NR {
            out.fill(0.0);
        }
        let src = &keys[j0 * row_stride..];
        #[cfg(target_arch = "x86_64")]
        if col_stride == 1 && crate::simd::simd_level().is_vector() {
            // SAFETY: a vector level (with AVX2) was detected; the assertion above bounds both
            // operands: `n` rows of `d` elements in, `[d, NR]` out.
            unsafe { crate::tile::avx2::transpose_stored::<S>(n, d, src.as_ptr(), row_stride, out.as_mut_ptr(), NR) };
            continue;
        }
        for j in 0..n {
            for p in 0..d {
                out[p * NR + j] = S::value(src[j * row_stride + p * col_stride]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    /// Every kernel gives a (row, key) pair the same bits whatever the tile around it: a block
    /// of 70 rows and 150 keys against each row and each key alone, and against sub-blocks
    /// at other offsets; and each is within rounding of the f64 dot product.
    #[test]
    fn a_pair_gets_the_same_bits_in_any_tile() {
        let (rows, bc, d) = (70, 150, 37);
        let q = random_vec(rows * d, 1).iter().map(|x| x * 30.0).collect::<Vec<_>>();
        let k = random_vec(bc * d, 2);
        let mut kernels = vec![ScoreKernel::Scalar];
        if crate::simd::simd_level().is_vector() {
            kernels.extend([ScoreKernel::Tile, ScoreKernel::Dot]);
        }
        for kernel in kernels {
            let keys = |j0: usize, n: usize| Keys {
                keys: &k[j0 * d..],
                row_stride: d,
                col_stride: 1,
                bc: n,
            };
            let mut kt = Vec::new();
            let ld = kernel.min_ld(bc) + 3;
            let mut whole = vec![f32::NAN; rows * ld];
            scores_into(kernel, &mut whole, ld, &q, [rows, d], keys(0, bc), &mut kt);
            for (r0, n_rows, j0, n_keys) in [(0, 1, 0, 1), (69, 1, 149, 1), (5, 17, 33, 20), (64, 6, 128, 22)] {
                let ld_part = kernel.min_ld(n_keys);
                let mut part = vec![f32::NAN; n_rows * ld_part];
                scores_into(
                    kernel,
                    &mut part,
                    ld_part,
                    &q[r0 * d..],
                    [n_rows, d],
                    keys(j0, n_keys),
                    &mut kt,
                );
                for i in 0..n_rows {
                    for j in 0..n_keys {
                        assert_eq!(
                            part[i * ld_part + j].to_bits(),
                            whole[(r0 + i) * ld + j0 + j].to_bits(),
                            "{kernel:?} row {} key {}",
                            r0 + i,
                            j0 + j
                        );
                    }
                }
            }
            for i in 0..rows {
                for j in 0..bc {
                    let want: f64 = (0..d).map(|p| q[i * d + p] as f64 * k[j * d + p] as f64).sum();
                    let bound: f64 = (0..d)
                        .map(|p| (q[i * d + p] as f64 * k[j * d + p] as f64).abs())
                        .sum::<f64>();
                    let got = whole[i * ld + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * bound,
                        "{kernel:?} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
