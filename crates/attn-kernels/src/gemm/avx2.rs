//! attn's own packed f32 GEMM at the AVX2 level ([`super::own`] holds the driver every level
//! shares).
//!
//! The micro-kernel keeps [`MR`] = 6 rows × two ymm (16 columns) of `C` in 12 accumulators,
//! BLIS's Haswell shape: each step of the depth loads two vectors of `B` and broadcasts six
//! values of a packed `A` sliver (8 loads per 12 FMAs; with the two vectors of `B` and one
//! broadcast that is 15 of the 16 ymm registers). The panels are the shared 48 columns
//! ([`NR`]), so the kernel runs three times per panel, each over its third (rows 48 floats
//! apart, one cache line of each). A sliver of [`KC`] = 512 steps is 12 KiB and stays in L1;
//! `B` is packed [`NC`] = 96 columns at a time (192 KiB), which stays in the 512 KiB L2 of a
//! Zen 3 core (or the 256 KiB of many Intel cores). Measured on a Zen 3 EPYC at 2 threads on
//! 2048 × 1536 × 512, as speed against faer's GEMM in the same rounds (PERFORMANCE.md): 0.998
//! with 96-column blocks, 0.956 with 192, 0.926 with 288 and 0.917 with 528; depth 256 gave
//! 0.958; depth 1024 measured level with 512 (1.004–1.010, interleaved).
//!
//! Only f32 operands come here ([`Rhs::F32`] or [`Rhs::Packed`], [`LhsValues::F32`]): the
//! products on bf16 values run at this level on the f32 fallback, which rounds its operands
//! before it multiplies.

use super::own::{LhsValues, Operand, Rhs, Start, NR};
use crate::lanes::{Avx2 as Lanes8, Lanes};
use std::arch::x86_64::*;

/// Rows of the micro-kernel: 6 rows × two ymm is 12 accumulators.
pub(crate) const MR: usize = 6;
/// Columns of the micro-kernel: a third of a panel.
const KN: usize = 16;
/// How many steps of depth ahead the kernel prefetches its `B` panel.
const PF: usize = 8;
/// Depth of a packed block.
const KC: usize = 512;
/// Columns of a packed `B` block: two panels.
const NC: usize = 2 * NR;

/// The AVX2 level of the own GEMM.
pub(crate) struct Avx2;

impl super::own::Level for Avx2 {
    const MR: usize = MR;
    const KC: usize = KC;
    const NC: usize = NC;

    /// One band: for each depth block, `B` packed [`NC`] columns at a time (or read in place), each
    /// sliver of `A` packed as the first column block reaches it, and every sliver over every third
    /// of every panel of the block.
    ///
    /// # Safety
    /// As for [`super::own::gemm`]; `b` is `F32` or `Packed`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn band_with(
        ap: &mut [f32],
        bp: &mut [f32],
        c: *mut f32,
        ldc: usize,
        [m, n, k]: [usize; 3],
        start: Start,
        (a, values): (Operand, LhsValues),
        b: Rhs,
        alpha: f32,
    ) {
        assert!(
            values == LhsValues::F32 && matches!(b, Rhs::F32(_) | Rhs::Packed { .. }),
            "the AVX2 level of the own GEMM takes f32 operands only"
        );
        let slivers = m.div_ceil(MR);
        // The depth in equal blocks of at most KC, as at AVX-512.
        let step = k.div_ceil(k.div_ceil(KC));
        for pc in (0..k).step_by(step) {
            let kc = (k - pc).min(step);
            let first = if pc == 0 { start } else { Start::Dst };
            for jc in (0..n).step_by(NC) {
                let nc = (n - jc).min(NC);
                if let Rhs::F32(b) = b {
                    // SAFETY: the block `[pc, pc + kc) × [jc, jc + nc)` is inside `b`.
                    unsafe { pack_b(bp, KC, b.ptr.add(pc * b.rs + jc * b.cs), b.rs, b.cs, kc, nc) };
                }
                // The panel of columns from `col` (a multiple of NR) at depth `pc`, read in place.
                let in_place = |col: usize| match b {
                    Rhs::Packed { ptr, k } => Some(ptr.wrapping_add(col / NR * k * NR + pc * NR)),
                    _ => None,
                };
                let panel = |jr: usize| in_place(jc + jr).unwrap_or_else(|| bp.as_ptr().wrapping_add(jr * KC));
                for s in 0..slivers {
                    let (ir, mr) = (s * MR, (m - s * MR).min(MR));
                    let sliver = &mut ap[s * MR * KC..][..kc * MR];
                    if jc == 0 {
                        // SAFETY: rows `[ir, ir + mr)` and depth `[pc, pc + kc)` are inside `a`.
                        unsafe { pack_a(sliver, a.ptr.add(ir * a.rs + pc * a.cs), a.rs, a.cs, mr, kc) };
                    }
                    let sliver = sliver.as_ptr();
                    for jr in (0..nc).step_by(NR) {
                        let cols = (nc - jr).min(NR);
                        // The first sliver over panels read in place brings the next panel into L2,
                        // a third per call.
                        let next = (s == 0 && jc + jr + NR < n).then(|| in_place(jc + jr + NR)).flatten();
                        for sub in (0..cols).step_by(KN) {
                            let col = jc + jr + sub;
                            let args = (
                                [kc, mr, (cols - sub).min(KN)],
                                sliver,
                                panel(jr).wrapping_add(sub),
                                c.wrapping_add(ir * ldc + col),
                            );
                            // SAFETY: the sliver and the panel hold `kc` steps; the block of `c` is
                            // `mr × cols` at `(ir, col)`, inside `c`; `col` is inside a bias.
                            unsafe {
                                let at = first.at_column(col);
                                match (next, args.0[2] > 8) {
                                    (Some(next), true) => {
                                        kernel::<true, 2>(args, next.wrapping_add(sub), ldc, at, alpha)
                                    }
                                    (Some(next), false) => {
                                        kernel::<true, 1>(args, next.wrapping_add(sub), ldc, at, alpha)
                                    }
                                    (None, true) => kernel::<false, 2>(args, args.2, ldc, at, alpha),
                                    (None, false) => kernel::<false, 1>(args, args.2, ldc, at, alpha),
                                }
                            };
                        }
                    }
                }
            }
        }
    }
}

/// Packs `a[0..mr, 0..kc]` step-major (`dst[p·MR + i] = a[i, p]`), rows past `mr` zero, as the
/// AVX-512 level does with its own [`MR`] (see its `pack_a`).
///
/// # Safety
/// `a` readable at `i·rs + p·cs` for `i < mr`, `p < kc`; `dst` holds `kc · MR`.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a(dst: &mut [f32], a: *const f32, rs: usize, cs: usize, mr: usize, kc: usize) {
    // SAFETY: by the caller's guarantee.
    unsafe {
        if cs == 1 && mr == MR {
            pack_six_rows(&mut dst[..kc * MR], a, rs);
        } else {
            super::own::pack_a_body::<MR>(dst, a, rs, cs, mr, kc);
        }
    }
}

/// Six whole rows of a row-major `a` step-major into `dst` (`dst[p·6 + i] = a[i·rs + p]`, `p <
/// dst.len() / 6`), eight steps at a time: the rows and a copy of the last as an 8 × 8 block
/// transposed in registers, each step stored as eight floats whose last two the next step's
/// store overwrites (the last step of all as six). The 8 × 8 transpose of `pack_a_body` takes
/// whole blocks of eight rows and copies six one float at a time: 2% of the encoder layer's
/// time on a Zen 3 EPYC.
///
/// # Safety
/// `a` readable at `i·rs + p` for `i < 6`, `p < dst.len() / 6`.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_six_rows(dst: &mut [f32], a: *const f32, rs: usize) {
    let kc = dst.len() / MR;
    let out = dst.as_mut_ptr();
    let blocks = kc / 8 * 8;
    // SAFETY: reads inside the six rows' first `kc` values; every store inside `dst` (the
    // eight-float stores of step `p` end at `p·6 + 8 ≤ kc·6` for every step but the last).
    unsafe {
        let rows: [*const f32; 8] = std::array::from_fn(|i| a.add(i.min(MR - 1) * rs));
        for p in (0..blocks).step_by(8) {
            let block = crate::tile::avx2::transpose8(std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(p))));
            for (i, step) in block.iter().enumerate() {
                let at = out.add((p + i) * MR);
                if p + i + 1 < kc {
                    _mm256_storeu_ps(at, *step);
                } else {
                    Lanes8::store_part(at, MR, *step);
                }
            }
        }
        for p in blocks..kc {
            for (i, row) in rows.iter().take(MR).enumerate() {
                *out.add(p * MR + i) = *row.add(p);
            }
        }
    }
}

/// Packs `b[0..kc, 0..nc]` into panels of [`NR`] columns as the AVX-512 level's `pack_b` does
/// (the same words): panel `q` at `q · depth · NR`, its row `p` at `p · NR`, columns past `nc`
/// zero. Row-major `b` is copied a row at a time (the ragged vector by a masked load);
/// column-major `b` is transposed 8 × 8 in registers.
///
/// # Safety
/// `b` readable at `p·rs + j·cs` for `p < kc`, `j < nc`; `kc ≤ depth`; `dst` holds
/// `nc.div_ceil(NR) · depth · NR`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn pack_b(dst: &mut [f32], depth: usize, b: *const f32, rs: usize, cs: usize, kc: usize, nc: usize) {
    for q in 0..nc.div_ceil(NR) {
        let j0 = q * NR;
        let cols = (nc - j0).min(NR);
        let panel = &mut dst[q * depth * NR..q * depth * NR + kc * NR];
        // SAFETY: every read is inside the block, by the caller's guarantee.
        unsafe {
            let src = b.add(j0 * cs);
            if cs == 1 {
                for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                    let from = src.add(p * rs);
                    for v in 0..NR / 8 {
                        // Zeros for a vector wholly past `cols`, whose address could lie past `b`.
                        let value = match cols.saturating_sub(8 * v) {
                            0 => _mm256_setzero_ps(),
                            n @ 1..8 => Lanes8::load_part(from.add(8 * v), n, 0.0),
                            _ => Lanes8::load(from.add(8 * v)),
                        };
                        Lanes8::store(row.as_mut_ptr().add(8 * v), value);
                    }
                }
            } else {
                super::own::pack_b_strided(panel, src, rs, cs, kc, cols);
            }
        }
    }
}

/// `c[0..mr, 0..cols] = alpha · Σ_p a[p·MR + i] · b[p·NR + j]` added to `start` (nothing, `c`
/// or the bias from this block's first column), for `([kc, mr, cols], a, b, c) = args`, over the
/// first `VECS` vectors of a panel's third (`cols ≤ 8·VECS`; a ragged last vector is read and
/// written by masked loads and stores). With `WARM`, each step also prefetches the same row of
/// the panel at `next` into L2.
///
/// # Safety
/// `VECS ≤ 2`; `a` holds `kc` steps of [`MR`] values; `b` holds `kc` rows `NR` floats apart of
/// at least `8·VECS` floats; `c` writable at `i·ldc + j` for `i < mr`, `j < cols`; a bias
/// readable for `cols` values.
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn kernel<const WARM: bool, const VECS: usize>(
    args: ([usize; 3], *const f32, *const f32, *mut f32),
    next: *const f32,
    ldc: usize,
    start: Start,
    alpha: f32,
) {
    let ([kc, mr, cols], a, b, c) = args;
    // SAFETY: every offset stays inside the ranges the caller guarantees.
    unsafe {
        // The lines of the block's rows (prefetches never fault).
        for r in 0..mr {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + KN - 1).cast());
        }
        let mut acc = [[_mm256_setzero_ps(); VECS]; MR];
        for p in 0..kc {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + PF) * NR).cast());
            if WARM {
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(p * NR).cast());
            }
            let bv: [__m256; VECS] = std::array::from_fn(|v| _mm256_loadu_ps(b.add(p * NR + 8 * v)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(p * MR + r));
                for (acc_rv, &bv) in acc_r.iter_mut().zip(&bv) {
                    *acc_rv = _mm256_fmadd_ps(x, bv, *acc_rv);
                }
            }
        }
        let alpha = _mm256_set1_ps(alpha);
        for (r, acc_r) in acc.iter().enumerate().take(mr) {
            let row = c.add(r * ldc);
            for (v, &acc_rv) in acc_r.iter().enumerate() {
                // A vector wholly past `cols` is skipped: its pointer could lie past `c`.
                let n = cols.saturating_sub(8 * v).min(8);
                if n == 0 {
                    continue;
                }
                let out = row.add(8 * v);
                let load = |p: *const f32| {
                    if n == 8 {
                        Lanes8::load(p)
                    } else {
                        Lanes8::load_part(p, n, 0.0)
                    }
                };
                let value = match start {
                    Start::Zero => _mm256_mul_ps(alpha, acc_rv),
                    Start::Dst => _mm256_fmadd_ps(alpha, acc_rv, load(out)),
                    Start::Bias(bias) => _mm256_fmadd_ps(alpha, acc_rv, load(bias.add(8 * v))),
                };
                if n == 8 {
                    Lanes8::store(out, value);
                } else {
                    Lanes8::store_part(out, n, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    /// Six rows packed eight steps at a time give the words of the generic packing, for depths
    /// of whole blocks of eight, with a tail, and shorter than a block, and write nothing past
    /// the sliver (its last step is stored as six floats, not eight).
    #[test]
    fn six_rows_pack_as_the_generic_packing_and_stay_inside_the_sliver() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            eprintln!("note: no AVX2 and FMA on this CPU; the AVX2 GEMM's packing is not checked");
            return;
        }
        for (kc, rs) in [(1, 3), (7, 9), (8, 8), (16, 21), (17, 17), (512, 515)] {
            let a = random_vec(MR * rs, 1);
            let mut want = vec![f32::NAN; kc * MR];
            let mut got = vec![f32::NAN; kc * MR + 4];
            // SAFETY: AVX2 and FMA were detected; `a` holds six rows of `rs ≥ kc` floats.
            unsafe {
                super::super::own::pack_a_body::<MR>(&mut want, a.as_ptr(), rs, 1, MR, kc);
                pack_six_rows(&mut got[..kc * MR], a.as_ptr(), rs);
            }
            let same = got[..kc * MR]
                .iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "depth {kc}: the words differ");
            assert!(
                got[kc * MR..].iter().all(|x| x.is_nan()),
                "depth {kc}: written past the sliver"
            );
        }
    }
}
