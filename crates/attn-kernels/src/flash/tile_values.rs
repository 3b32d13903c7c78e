//! Pass 4's value blocks in the f32 kernel: widened or copied into panels of [`NR`] columns
//! ([`value_panels`], from f32 values or bf16 bits), and the micro-kernels' product with them
//! ([`values_product`]), which the tile's pass and the bits' pass share.

use super::scratch::{KeyBlock, Scratch};
use super::Plan;
use crate::tile::{F32Values, Stored, NR};

/// `bc` value rows (`values[j·strides[0] + c·strides[1]]`, `c < dv`) into panels of [`NR`]
/// columns: `dst[(c / NR)·ld·NR + j·NR + c % NR]`, zero for `c` from `dv` up to the next
/// multiple of [`NR`].
pub(super) fn value_panels<S: Stored>(
    dst: &mut [f32],
    ld: usize,
    values: &[S::Elem],
    bc: usize,
    dv: usize,
    strides: [usize; 2],
) {
    if bc == 0 {
        return;
    }
    let panels = dv.div_ceil(NR);
    assert!(bc <= ld && dst.len() >= panels * ld * NR && values.len() > (bc - 1) * strides[0] + (dv - 1) * strides[1]);
    for panel in 0..panels {
        let (c0, n) = (panel * NR, (dv - panel * NR).min(NR));
        let out = &mut dst[panel * ld * NR..];
        for j in 0..bc {
            let row = &mut out[j * NR..(j + 1) * NR];
            let src = j * strides[0] + c0 * strides[1];
            if strides[1] == 1 {
                let src = &values[src..src + n];
                #[cfg(target_arch = "x86_64")]
                if crate::simd::simd_level().is_vector() {
                    // SAFETY: a vector level (with AVX2) was detected; `src` holds the `n`
                    // elements read and `row` the `NR ≥ n` written.
                    unsafe { crate::tile::avx2::convert_row::<S>(n, src.as_ptr(), row.as_mut_ptr()) };
                    row[n..].fill(0.0);
                    continue;
                }
                for (x, &e) in row[..n].iter_mut().zip(src) {
                    *x = S::value(e);
                }
            } else {
                row[..n]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(c, x)| *x = S::value(values[src + c * strides[1]]));
            }
            row[n..].fill(0.0);
        }
    }
}

/// The micro-kernels' `acc (+)= p · v_block` for the value block `(pointer, ldb, b_panel)`: in
/// place with `b_panel = NR` (rows `ldb` apart, read whole) or in panels. A few rows against
/// values in place: one pass over the rows, in order, adding to `acc` (zeroed for the first
/// block); else the tile GEMM, storing for the first block and adding after.
pub(super) fn values_product(
    scratch: &mut Scratch,
    plan: &Plan,
    n_rows: usize,
    block: &KeyBlock,
    (v_ptr, ldv, v_panel): (*const f32, usize, usize),
) {
    let (dv_pad, bc) = (plan.dv_pad, block.bc);
    let by_rows = n_rows <= crate::tile::DECODE_ROWS_MAX && v_panel == NR;
    if by_rows && block.first {
        scratch.acc[..n_rows * dv_pad].fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a vector level (AVX2+FMA, or AVX-512 with them) was detected; `scores` is
    // [n_rows, plan.scores_ld] with `bc` valid columns, the value block (`bc` rows of `Dv_pad`
    // values, in place with row stride `ldv`, or in panels: bounds-checked with `v` or sized
    // by the plan) and `acc` is [BLOCK_ROWS, Dv_pad].
    unsafe {
        if by_rows {
            crate::tile::axpy_rows::<F32Values>(
                n_rows,
                dv_pad,
                bc,
                scratch.scores.as_ptr(),
                plan.scores_ld,
                v_ptr,
                ldv,
                scratch.acc.as_mut_ptr(),
                dv_pad,
            )
        } else {
            let product = if block.first {
                crate::tile::gemm::<false, false>
            } else {
                crate::tile::gemm::<true, false>
            };
            product(
                n_rows,
                dv_pad,
                bc,
                scratch.scores.as_ptr(),
                plan.scores_ld,
                v_ptr,
                ldv,
                v_panel,
                scratch.acc.as_mut_ptr(),
                dv_pad,
            )
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v_ptr, ldv, bc);
}
