//! The backward's products on the tile kernel with one operand read in place: `dV += Pᵀ·dO`
//! and `dK += dSᵀ·(scale·Q)` with `P`, `dS` read transposed, and `dQ += dS·K` with the key
//! block read as panels. Each takes every sum from memory and adds its products to it in
//! order of the depth, so a sum cut into two calls has the bits of one call.

use crate::tile::NR;

/// `sums[j, c] += Σ_i m[i, j] · x[i, c]` for `j < bc`, `c < width`, `i < rows` (`mᵀ·x`) on the
/// tile kernel: `m` (`P` or `dS`) `[rows, bc]` with rows `ld` apart, read transposed in place
/// (each step's broadcasts are consecutive keys of one row); `x` (`dO` or the scaled query
/// tile) `rows` rows of `width` values `ldx` apart, read in place as panels of [`NR`] columns;
/// `sums` `[bc, width]`. Each sum is taken from `sums`, then adds `rows` products in order.
/// `width` must be a multiple of [`NR`] ([`Job::tile_sums`]).
pub(super) fn transposed_product(
    sums: &mut [f32],
    [bc, width, rows]: [usize; 3],
    m: &[f32],
    ld: usize,
    (x, ldx): (&[f32], usize),
) {
    assert!(width.is_multiple_of(NR) && crate::simd::simd_level().is_vector());
    // The floats `n` rows of `w` values `ld` apart span.
    let span = |n: usize, ld: usize, w: usize| n.checked_sub(1).map_or(0, |last| last * ld + w);
    assert!(bc <= ld && m.len() >= span(rows, ld, bc) && sums.len() >= bc * width);
    assert!(width <= ldx && x.len() >= span(rows, ldx, width));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a vector level (checked); `m` holds `rows` rows of `bc` values `ld` apart, `x`
    // `rows` rows of `width` values `ldx` apart (its panels of NR columns `NR` apart), `sums`
    // `bc` rows of `width` (checked above); `width` is a whole number of panels.
    unsafe {
        crate::tile::gemm::<true, true>(
            bc,
            width,
            rows,
            m.as_ptr(),
            ld,
            x.as_ptr(),
            ldx,
            NR,
            sums.as_mut_ptr(),
            width,
        )
    };
}

/// `sums[r, c] += Σ_j m[r, j] · x[j, c]` for `r < rows`, `c < width`, `j < depth` (`m·x`) on
/// the tile kernel: `m` (`dS`) `[rows, depth]` with rows `ld` apart; `x` (the key block)
/// `depth` rows of `width` values `ldx` apart, read in place as panels of [`NR`] columns;
/// `sums` `[rows, width]`. Each sum is taken from `sums`, then adds `depth` products in order,
/// so a row's sum over two key blocks has the bits of its sum over one. `width` must be a
/// multiple of [`NR`].
pub(super) fn row_product(
    sums: &mut [f32],
    [rows, width, depth]: [usize; 3],
    m: &[f32],
    ld: usize,
    (x, ldx): (&[f32], usize),
) {
    assert!(width.is_multiple_of(NR) && crate::simd::simd_level().is_vector());
    let span = |n: usize, ld: usize, w: usize| n.checked_sub(1).map_or(0, |last| last * ld + w);
    assert!(depth <= ld && m.len() >= span(rows, ld, depth) && sums.len() >= rows * width);
    assert!(width <= ldx && x.len() >= span(depth, ldx, width));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a vector level (checked); `m` holds `rows` rows of `depth` values `ld` apart, `x`
    // `depth` rows of `width` values `ldx` apart (its panels of NR columns `NR` apart), `sums`
    // `rows` rows of `width` (checked above); `width` is a whole number of panels.
    unsafe {
        crate::tile::gemm::<true, false>(
            rows,
            width,
            depth,
            m.as_ptr(),
            ld,
            x.as_ptr(),
            ldx,
            NR,
            sums.as_mut_ptr(),
            width,
        )
    };
}
