//! One tile's steps of the backward: the probabilities `P`, then `dV += Pᵀ·dO`,
//! `dS = P ∘ (dO·Vᵀ − Δ)`, `dK += dSᵀ·(scale·Q)` and `dQ += dS·K`, on the tile kernel or faer's
//! GEMM (see the parent module for which).

use crate::gemm::gemm_raw;
use crate::mask::mask_row;
use crate::scores::{scores_into, tile_scores, Keys, ScoreKernel};
use crate::simd::{exp_sub2_sum, exp_sub_sum, scale_into, softmax_grad_row};
use crate::tile::{pad_to_nr, NR};
use crate::{Accum, Par};

use super::super::products::{row_product, transposed_product};
use super::{Job, Scratch, Tile};

/// The row stride of a tile's probabilities and score gradients (`Scratch::p`, `dp`) for `bc`
/// keys where the tile kernel computes them: whole panels of [`NR`] columns, and one panel
/// more. The tile kernel reads `P` and `dS` down their columns for `dV` and `dK`; rows a power
/// of two of floats apart (4 KiB at 1,024 keys) would put a column's rows into one L1 set.
fn p_stride(bc: usize) -> usize {
    pad_to_nr(bc) + NR
}

impl Job<'_, '_> {
    /// The row stride of `P` and `dP` for `bc` keys: [`p_stride`] where the tile kernel
    /// writes them, else `bc`.
    fn p_ld(&self, bc: usize) -> usize {
        match self.score_kernel {
            ScoreKernel::Tile => p_stride(bc),
            _ => bc,
        }
    }

    /// Whether the tile kernel computes `dV += Pᵀ·dO` and `dK += dSᵀ·(scale·Q)`, reading `P`
    /// and `dS` transposed in place: where it computes the scores, and `D` and `Dv` are whole
    /// numbers of its panels (it stores whole panels). Otherwise faer's GEMM does. A function
    /// of the shape alone, so the bits do not depend on the thread count.
    fn tile_sums(&self) -> bool {
        self.score_kernel == ScoreKernel::Tile && self.shape.d.is_multiple_of(NR) && self.shape.dv.is_multiple_of(NR)
    }

    /// `q_tile = scale·q[rows]`, then `p = exp(q_tile·kᵀ + masks − lse)` `[rows, bc]`, 0 where a
    /// key is hidden or the row sees nothing.
    pub(super) fn probabilities(&self, scratch: &mut Scratch, tile: Tile) {
        let (sh, q, k) = (self.shape, self.inputs.q, self.inputs.k);
        let Tile {
            b,
            h,
            g,
            r0,
            rows,
            t0,
            bc,
        } = tile;
        scratch.q_tile.resize(rows * sh.d, 0.0);
        let q_st = q.strides();
        for (i, dst) in scratch.q_tile[..rows * sh.d].chunks_exact_mut(sh.d).enumerate() {
            let base = q.offset([b, h, r0 + i, 0]);
            if q_st[3] == 1 {
                scale_into(dst, &q.data()[base..base + sh.d], self.scale);
            } else {
                dst.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = q.data()[base + j * q_st[3]] * self.scale);
            }
        }
        // The forward's arithmetic, so that each score has the forward's bits: a row whose
        // only visible key took all the weight gets P = 1 exactly, and large logits lose no
        // more than the LSE's own rounding.
        let k_st = k.strides();
        let keys = Keys {
            keys: &k.data()[k.offset([b, g, t0, 0])..],
            row_stride: k_st[2],
            col_stride: k_st[3],
            bc,
        };
        let ld = self.p_ld(bc);
        let kernel = self.score_kernel;
        // Overwritten by the kernel (every column a product reads): no zero-fill per tile.
        scratch.p.resize(rows * ld, 0.0);
        let packed = scratch.holds_block(&tile);
        let Scratch { q_tile, p, kt, .. } = scratch;
        if packed {
            tile_scores(p, ld, q_tile, [rows, sh.d], kt, bc, None);
        } else {
            scores_into(kernel, p, ld, q_tile, [rows, sh.d], keys, kt);
            // `kt` may now hold this tile's keys, not the task's block.
            scratch.packed_keys = None;
        }
        for (i, row) in scratch.p.chunks_exact_mut(ld).enumerate() {
            let row = &mut row[..bc];
            let s = r0 + i;
            mask_row(row, self.options, [b, h, s], t0, self.limit(b, s), [sh.s, sh.t]);
            let lse = self.inputs.lse.get([b, h, s]);
            if lse == f32::NEG_INFINITY {
                row.fill(0.0);
            } else if lse.is_nan() {
                row.iter_mut()
                    .for_each(|x| *x = if *x == f32::NEG_INFINITY { 0.0 } else { f32::NAN });
            } else if let Some(lo) = &self.inputs.lse_lo {
                // `s − lse` first (exact for the keys that carry the weight), then `lse_lo`.
                exp_sub2_sum(row, lse, lo.get([b, h, s]));
            } else {
                exp_sub_sum(row, lse);
            }
        }
    }

    /// `dV[keys] += pᵀ · dout[rows]`: on the tile kernel ([`Job::tile_sums`]) or faer's GEMM.
    pub(super) fn value_gradient(&self, scratch: &mut Scratch, tile: Tile) {
        let (sh, dout) = (self.shape, self.inputs.dout);
        let Tile { b, h, r0, rows, bc, .. } = tile;
        let st = dout.strides();
        let ld = self.p_ld(bc);
        if self.tile_sums() {
            let base = dout.offset([b, h, r0, 0]);
            let rows_of_dout = if st[3] == 1 {
                (&dout.data()[base..], st[2])
            } else {
                // Made contiguous along `Dv` (`dout_tile`, as `dP`'s product makes it): the
                // kernel reads whole panels of a row.
                scratch.dout_tile.resize(rows * sh.dv, 0.0);
                for (i, dst) in scratch.dout_tile.chunks_exact_mut(sh.dv).enumerate() {
                    dst.iter_mut()
                        .enumerate()
                        .for_each(|(c, x)| *x = dout.data()[base + i * st[2] + c * st[3]]);
                }
                (&scratch.dout_tile[..], sh.dv)
            };
            transposed_product(&mut scratch.dv, [bc, sh.dv, rows], &scratch.p, ld, rows_of_dout);
            return;
        }
        // SAFETY: `dv` holds [bc, Dv], `p` [rows, bc] (rows `ld` apart); the rows of `dout`
        // were bounds-checked with it.
        unsafe {
            faer_transposed_product(
                &mut scratch.dv,
                [bc, sh.dv, rows],
                &scratch.p,
                ld,
                dout.data().as_ptr().add(dout.offset([b, h, r0, 0])),
                [st[2], st[3]],
            )
        };
    }

    /// `dp = dout[rows] · v[keys]ᵀ`, then `p ← p ∘ (dp − Δ)`: the scores' gradient `dS`.
    pub(super) fn score_gradient(&self, scratch: &mut Scratch, tile: Tile) {
        let (sh, dout, v) = (self.shape, self.inputs.dout, self.inputs.v);
        let Tile {
            b,
            h,
            g,
            r0,
            rows,
            t0,
            bc,
        } = tile;
        let ld = self.p_ld(bc);
        // Overwritten by the product below (every column read after it).
        scratch.dp.resize(rows * ld, 0.0);
        let (d_st, v_st) = (dout.strides(), v.strides());
        if scratch.holds_block(&tile) {
            // The values packed once for the key task: the tile kernel, as for the scores, on
            // the tile's rows of `dO` made contiguous.
            let Scratch { dp, vt, dout_tile, .. } = scratch;
            dout_tile.resize(rows * sh.dv, 0.0);
            for (i, dst) in dout_tile.chunks_exact_mut(sh.dv).enumerate() {
                let base = dout.offset([b, h, r0 + i, 0]);
                dst.iter_mut()
                    .enumerate()
                    .for_each(|(c, x)| *x = dout.data()[base + c * d_st[3]]);
            }
            tile_scores(dp, ld, dout_tile, [rows, sh.dv], vt, bc, None);
        } else {
            // SAFETY: `dp` holds [rows, bc] (rows `ld` apart); the rows of `dout` and the value
            // block were bounds-checked with their views.
            unsafe {
                gemm_raw(
                    scratch.dp.as_mut_ptr(),
                    [ld, 1],
                    [rows, bc, sh.dv],
                    Accum::Replace,
                    dout.data().as_ptr().add(dout.offset([b, h, r0, 0])),
                    [d_st[2], d_st[3]],
                    v.data().as_ptr().add(v.offset([b, g, t0, 0])),
                    [v_st[3], v_st[2]],
                    1.0,
                    Par::Seq,
                )
            };
        }
        for (i, (p_row, dp_row)) in scratch
            .p
            .chunks_exact_mut(ld)
            .zip(scratch.dp.chunks_exact(ld))
            .enumerate()
        {
            // A hidden key (p = 0) stays 0 even if `dp` is not finite.
            softmax_grad_row(
                &mut p_row[..bc],
                &dp_row[..bc],
                self.delta[(b * sh.h + h) * sh.s + r0 + i],
            );
        }
    }

    /// `dK[keys] += dSᵀ · q_tile`: the query tile holds `scale·q`, so this is `scale·dSᵀ·q`.
    /// On the tile kernel ([`Job::tile_sums`]) or faer's GEMM.
    pub(super) fn key_gradient(&self, scratch: &mut Scratch, tile: Tile) {
        let sh = self.shape;
        let Tile { rows, bc, .. } = tile;
        let ld = self.p_ld(bc);
        if self.tile_sums() {
            transposed_product(
                &mut scratch.dk,
                [bc, sh.d, rows],
                &scratch.p,
                ld,
                (&scratch.q_tile, sh.d),
            );
            return;
        }
        // SAFETY: `dk` holds [bc, D], `p` (now dS) [rows, bc] (rows `ld` apart), `q_tile`
        // [rows, D].
        unsafe {
            faer_transposed_product(
                &mut scratch.dk,
                [bc, sh.d, rows],
                &scratch.p,
                ld,
                scratch.q_tile.as_ptr(),
                [sh.d, 1],
            )
        };
    }

    /// `dQ[rows] += dS · k[keys]` (the scale is applied when written): on the tile kernel, with
    /// the keys read in place as panels, where it computes the scores, `D` is a whole number of
    /// its panels and the keys are contiguous along `D`; otherwise faer's GEMM. A function of
    /// the shape and the layout alone, so the bits do not depend on the thread count.
    pub(super) fn query_gradient(&self, scratch: &mut Scratch, tile: Tile, at: usize) {
        let (sh, k) = (self.shape, self.inputs.k);
        let Tile { b, g, rows, t0, bc, .. } = tile;
        let st = k.strides();
        let ld = self.p_ld(bc);
        let keys = &k.data()[k.offset([b, g, t0, 0])..];
        if self.score_kernel == ScoreKernel::Tile && sh.d.is_multiple_of(NR) && st[3] == 1 {
            row_product(&mut scratch.dq[at..], [rows, sh.d, bc], &scratch.p, ld, (keys, st[2]));
            return;
        }
        // SAFETY: `dq` holds [rows, D], `p` (now dS) [rows, bc] (rows `ld` apart); the key block
        // was bounds-checked with `k`.
        unsafe {
            gemm_raw(
                scratch.dq[at..at + rows * sh.d].as_mut_ptr(),
                [sh.d, 1],
                [rows, sh.d, bc],
                Accum::Add,
                scratch.p.as_ptr(),
                [ld, 1],
                keys.as_ptr(),
                [st[2], st[3]],
                1.0,
                Par::Seq,
            )
        };
    }
}

/// [`transposed_product`] on faer's GEMM, for tiles the tile kernel does not take:
/// `sums[j, c] += Σ_i m[i, j] · x[i, c]` for `j < bc`, `c < width`, `i < rows`, with `m`
/// `[rows, bc]` (rows `ld` apart) read transposed, `x` at `i·xs[0] + c·xs[1]` and `sums`
/// `[bc, width]`.
///
/// # Safety
/// `sums` must hold `bc · width` floats, `m` `rows` rows of `bc` values `ld` apart, and `x` be
/// readable at every `i·xs[0] + c·xs[1]`.
unsafe fn faer_transposed_product(
    sums: &mut [f32],
    [bc, width, rows]: [usize; 3],
    m: &[f32],
    ld: usize,
    x: *const f32,
    xs: [usize; 2],
) {
    // SAFETY: the caller's contract covers every operand of these shapes.
    unsafe {
        gemm_raw(
            sums.as_mut_ptr(),
            [width, 1],
            [bc, width, rows],
            Accum::Add,
            m.as_ptr(),
            [1, ld],
            x,
            xs,
            1.0,
            Par::Seq,
        )
    }
}
