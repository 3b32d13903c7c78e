//! The backward's products on the tile kernel with one operand read in place: `dV += Pᵀ·dO`
//! and `dK += dSᵀ·(scale·Q)` with `P`, `dS` read transposed, and `dQ += dS·K` with the key
//! block read as panels. Each takes every sum from memory and adds its products to it in
//! order of the depth, so a sum cut into two calls has the bits of one call.

use crate::tile::NR;

/// The floats `n` rows of `w` values `ld` apart span.
fn span(n: usize, ld: usize, w: usize) -> usize {
    n.checked_sub(1).map_or(0, |last| last * ld + w)
}

/// `sums[j, c] += Σ_i m[i, j] · x[i, c]` for `j < bc`, `c < width`, `i < rows` (`mᵀ·x`) on the
/// tile kernel: `m` (`P` or `dS`) `[rows, bc]` with rows `ld` apart, read transposed in place
/// (each step's broadcasts are consecutive keys of one row); `x` (`dO` or the scaled query
/// tile) `rows` rows of `width` values `ldx` apart, read in place as panels of [`NR`] columns;
/// `sums` `[bc, width]`. Each sum is taken from `sums`, then adds `rows` products in order.
/// `width` must be a multiple of [`NR`] (`Job::tile_sums` in `tasks.rs`).
pub(super) fn transposed_product(
    sums: &mut [f32],
    [bc, width, rows]: [usize; 3],
    m: &[f32],
    ld: usize,
    x: (&[f32], usize),
) {
    product::<true>(sums, [bc, width, rows], m, ld, x);
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
    x: (&[f32], usize),
) {
    product::<false>(sums, [rows, width, depth], m, ld, x);
}

/// `sums[out_rows, width] += m·x` (`mᵀ·x` with `A_T`, `m` then `[depth, out_rows]`), `x`
/// `[depth, width]`, after checking every operand's span: the tile kernel reads by pointer.
fn product<const A_T: bool>(
    sums: &mut [f32],
    [out_rows, width, depth]: [usize; 3],
    m: &[f32],
    ld: usize,
    (x, ldx): (&[f32], usize),
) {
    let (m_rows, m_cols) = if A_T { (depth, out_rows) } else { (out_rows, depth) };
    assert!(width.is_multiple_of(NR) && crate::simd::simd_level().is_vector());
    assert!(m_cols <= ld && m.len() >= span(m_rows, ld, m_cols) && sums.len() >= out_rows * width);
    assert!(width <= ldx && x.len() >= span(depth, ldx, width));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a vector level (checked); `m` holds `m_rows` rows of `m_cols` values `ld` apart,
    // `x` `depth` rows of `width` values `ldx` apart (its panels of NR columns `NR` apart),
    // `sums` `out_rows` rows of `width` (checked above); `width` is a whole number of panels.
    unsafe {
        crate::tile::gemm::<true, A_T>(
            out_rows,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    /// Both products against f64 sums, adding to what the sums held, with row strides wider
    /// than the rows; and each refuses an operand one float short of its shape (the kernel
    /// behind them reads by pointer), reading it from a longer buffer so that a missed check
    /// cannot read past the allocation.
    #[test]
    fn products_add_their_sums_and_refuse_short_operands() {
        if !crate::simd::simd_level().is_vector() {
            eprintln!("products_add_their_sums_and_refuse_short_operands: no vector level, skipped");
            return;
        }
        let (rows, depth, width, ld, ldx) = (13, 21, 2 * NR, 37, 2 * NR + 5);
        let m = random_vec(rows * ld, 1);
        let x_t = random_vec(rows * ldx, 2);
        let x = random_vec(depth * ldx, 3);
        let start = random_vec(depth.max(rows) * width, 4);
        // `mᵀ·x_t` into `[depth, width]` (`depth` columns of `m` read transposed).
        let mut t_sums = start[..depth * width].to_vec();
        transposed_product(&mut t_sums, [depth, width, rows], &m, ld, (&x_t, ldx));
        // `m·x` into `[rows, width]`.
        let mut r_sums = start[..rows * width].to_vec();
        row_product(&mut r_sums, [rows, width, depth], &m, ld, (&x, ldx));
        for (j, c) in (0..depth).flat_map(|j| (0..width).map(move |c| (j, c))) {
            let want = start[j * width + c] as f64
                + (0..rows)
                    .map(|i| m[i * ld + j] as f64 * x_t[i * ldx + c] as f64)
                    .sum::<f64>();
            assert!(
                (t_sums[j * width + c] as f64 - want).abs() < 1e-5,
                "transposed [{j}, {c}]"
            );
        }
        for (r, c) in (0..rows).flat_map(|r| (0..width).map(move |c| (r, c))) {
            let want = start[r * width + c] as f64
                + (0..depth)
                    .map(|j| m[r * ld + j] as f64 * x[j * ldx + c] as f64)
                    .sum::<f64>();
            assert!((r_sums[r * width + c] as f64 - want).abs() < 1e-5, "rows [{r}, {c}]");
        }
        let refused = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
        // `m` spans `rows` rows of `depth` values for both products (counted here, not by
        // `span`, which the checks use).
        let (m_span, x_t_span, x_span) = (
            (rows - 1) * ld + depth,
            (rows - 1) * ldx + width,
            (depth - 1) * ldx + width,
        );
        let transposed = |sums: &mut [f32], m: &[f32], x_t: &[f32]| {
            transposed_product(sums, [depth, width, rows], m, ld, (x_t, ldx))
        };
        let by_rows = |sums: &mut [f32], m: &[f32], x: &[f32]| row_product(sums, [rows, width, depth], m, ld, (x, ldx));
        let mut sums = vec![0.0; depth.max(rows) * width];
        assert!(refused(&|| transposed(
            &mut sums.clone()[..depth * width],
            &m[..m_span - 1],
            &x_t
        )));
        assert!(refused(&|| transposed(
            &mut sums.clone()[..depth * width],
            &m,
            &x_t[..x_t_span - 1]
        )));
        assert!(refused(&|| transposed(
            &mut sums.clone()[..depth * width - 1],
            &m,
            &x_t
        )));
        assert!(refused(&|| by_rows(
            &mut sums.clone()[..rows * width],
            &m[..m_span - 1],
            &x
        )));
        assert!(refused(&|| by_rows(
            &mut sums.clone()[..rows * width],
            &m,
            &x[..x_span - 1]
        )));
        assert!(refused(&|| by_rows(&mut sums.clone()[..rows * width - 1], &m, &x)));
        // The full shapes pass.
        transposed(&mut sums[..depth * width], &m[..m_span], &x_t[..x_t_span]);
        by_rows(&mut sums[..rows * width], &m[..m_span], &x[..x_span]);
    }
}
