//! attn's own packed f32 GEMM at the AVX-512 level ([`super::own`] holds the driver every level
//! shares).
//!
//! The micro-kernel keeps [`MR`] = 8 rows × three zmm ([`NR`] = 48 columns) of `C` in 24
//! accumulators; each step of the depth loads three vectors of a packed `B` panel and broadcasts
//! eight values of a packed `A` sliver (11 loads per 24 FMAs; against 12 × 32, 14 loads, it
//! measured 1.01–1.05× alone and 0.98–1.06× in this GEMM on Intel's model 207;
//! `examples/gemm_kernel_shapes.rs` times the shapes). Per block of [`KC`] steps of depth, every
//! sliver of the thread's rows of `A` is packed once (eight values of a step in one cache line),
//! then `B` is packed [`NC`] columns at a time (1056 KiB, in L2). The kernel prefetches its rows
//! of `C` before the depth loop, so the read-modify-write at its end does not wait on memory,
//! and its panel [`PF`] steps ahead, because the panel streams from L2.
//!
//! A `B` packed once beforehand ([`crate::F32Panels`], a model's weight) is read in place
//! instead, and the first sliver over a block of it prefetches the next panel into L2. The
//! micro-kernel stays a function of its own: inlined into these loops it spilled an accumulator
//! on every step.

mod pack;

use pack::{pack_a, widen_b};
pub(crate) use pack::{pack_b, round_lanes, round_row_to_bf16};

pub(crate) use super::own::{LhsValues, Operand, Rhs, Start, NR};
use crate::gemm::Par;
use std::arch::x86_64::*;

/// Rows of the micro-kernel: 8 rows × three zmm is 24 accumulators.
pub(crate) const MR: usize = 8;
/// Vectors in a row of a panel.
const V: usize = NR / 16;
/// How many steps of depth ahead the kernel prefetches its `B` panel.
const PF: usize = 8;
/// Depth of a packed block: 512, so that the layers' 512-deep products take one pass over `C`
/// (against 384, which cut them 256 + 256: 1.01–1.04× on the five layer shapes at 2 threads,
/// 0.95–1.07× at 1, on an Intel Xeon; PERFORMANCE.md).
const KC: usize = 512;
/// Columns of a packed `B` block (`KC × NC` floats = 1056 KiB, in a 2 MiB L2): eleven panels,
/// so a layer 512 wide is one block.
const NC: usize = 11 * NR;

/// The AVX-512 level of the own GEMM.
pub(crate) struct Avx512;

impl super::own::Level for Avx512 {
    const MR: usize = MR;
    const KC: usize = KC;
    const NC: usize = NC;

    /// [`super::own::Level::band_with`] at this level: every [`Rhs`] and [`LhsValues`].
    ///
    /// # Safety
    /// As for [`gemm`].
    #[target_feature(enable = "avx512f")]
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
        let slivers = m.div_ceil(MR);
        // The depth in equal blocks of at most KC (768 is 384 + 384, not 512 + 256): a short last
        // block pays a whole pass over `C` for little work.
        let step = k.div_ceil(k.div_ceil(KC));
        for pc in (0..k).step_by(step) {
            let kc = (k - pc).min(step);
            let first = if pc == 0 { start } else { Start::Dst };
            for jc in (0..n).step_by(NC) {
                let nc = (n - jc).min(NC);
                // SAFETY: the block `[pc, pc + kc) × [jc, jc + nc)` is inside `b`.
                unsafe {
                    match b {
                        Rhs::F32(b) => pack_b(bp, KC, b.ptr.add(pc * b.rs + jc * b.cs), b.rs, b.cs, kc, nc),
                        Rhs::Rounded(b) => {
                            pack_b(bp, KC, b.ptr.add(pc * b.rs + jc * b.cs), b.rs, b.cs, kc, nc);
                            for q in 0..nc.div_ceil(NR) {
                                round_row_to_bf16(&mut bp[q * KC * NR..q * KC * NR + kc * NR]);
                            }
                        }
                        Rhs::Bf16 { words, panel } => widen_b(bp, words.add(jc / 16 * panel), panel, pc, kc, nc),
                        Rhs::Packed { .. } => {}
                    }
                };
                // The panel of columns from `col` (a multiple of NR) at depth `pc`, read in place.
                let in_place = |col: usize| match b {
                    Rhs::Packed { ptr, k } => Some(ptr.wrapping_add(col / NR * k * NR + pc * NR)),
                    _ => None,
                };
                // Panel `jr / NR` of the block: in place, or in `bp` (`KC · NR` floats apart).
                let panel = |jr: usize| in_place(jc + jr).unwrap_or_else(|| bp.as_ptr().wrapping_add(jr * KC));
                for s in 0..slivers {
                    let ir = s * MR;
                    if jc == 0 {
                        // Every sliver of the band for this depth block, packed as the first column
                        // block reaches it (so that reading `a` overlaps the last sliver's products)
                        // and read from L2/L3 by the later blocks instead of from the caller's `a`.
                        // SAFETY: rows `[ir, ir + mr)` and depth `[pc, pc + kc)` are inside `a`.
                        unsafe { pack_sliver(&mut ap[s * MR * KC..][..kc * MR], (a, values), [ir, pc], [m, kc]) };
                    }
                    for jr in (0..nc).step_by(NR) {
                        let shape = [kc, (m - ir).min(MR), (nc - jr).min(NR)];
                        let args = (
                            shape,
                            ap.as_ptr().wrapping_add(s * MR * KC),
                            panel(jr),
                            c.wrapping_add(ir * ldc + jc + jr),
                        );
                        // The first sliver over panels read in place (from L3 or memory, where
                        // the weights rest between calls) brings the next panel into L2 as it goes.
                        let next = (s == 0 && jc + jr + NR < n).then(|| in_place(jc + jr + NR)).flatten();
                        // A ragged last panel (16 of 1024's 48 columns, 32 of 512's) runs an
                        // instance that does only the FMAs of its own vectors: the full instance's
                        // code is unchanged (the kernel is out of line).
                        // SAFETY: the sliver and the panel hold `kc` steps; the block of `c` is
                        // `mr × cols` at `(ir, jc + jr)`, inside `c`.
                        unsafe {
                            let at = first.at_column(jc + jr);
                            match (next, shape[2].div_ceil(16)) {
                                (Some(next), V) => kernel::<true, V>(args, next, ldc, at, alpha),
                                (Some(next), 2) => kernel::<true, 2>(args, next, ldc, at, alpha),
                                (Some(next), _) => kernel::<true, 1>(args, next, ldc, at, alpha),
                                (None, V) => kernel::<false, V>(args, args.2, ldc, at, alpha),
                                (None, 2) => kernel::<false, 2>(args, args.2, ldc, at, alpha),
                                (None, _) => kernel::<false, 1>(args, args.2, ldc, at, alpha),
                            }
                        };
                    }
                }
            }
        }
    }
}

/// [`super::own::gemm`] at this level: any [`Rhs`] and [`LhsValues`] (the bf16 products' route).
///
/// # Safety
/// As for [`super::own::gemm`]; the running CPU must have AVX-512 F.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    c: *mut f32,
    ldc: usize,
    mnk: [usize; 3],
    start: Start,
    a: (Operand, LhsValues),
    b: Rhs,
    alpha: f32,
    par: Par,
) {
    // SAFETY: the caller's contract.
    unsafe { super::own::gemm::<Avx512>(c, ldc, mnk, start, a, b, alpha, par) }
}

/// Packs rows `[ir, ir + MR)` (those below `m`) and depth `[pc, pc + kc)` of `a` into `dst`
/// step-major, rounded to bf16 for [`LhsValues::Bf16`].
///
/// # Safety
/// Those rows and steps are inside `a`; `dst` holds `kc · MR` floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_sliver(dst: &mut [f32], (a, values): (Operand, LhsValues), [ir, pc]: [usize; 2], [m, kc]: [usize; 2]) {
    // SAFETY: by the caller's guarantee.
    unsafe { pack_a(dst, a.ptr.add(ir * a.rs + pc * a.cs), a.rs, a.cs, (m - ir).min(MR), kc) };
    if values == LhsValues::Bf16 {
        round_row_to_bf16(dst);
    }
}

/// `c[0..mr, 0..cols] = alpha · Σ_p a[p·MR + i] · b[p·NR + j]` added to `start` (nothing, `c`
/// or the bias from this block's first column), for `([kc, mr, cols], a, b, c) = args`, over the
/// first `VECS` vectors of each panel row (`cols ≤ 16·VECS`). With `WARM`, each step also
/// prefetches the same row of the panel at `next` into L2.
///
/// # Safety
/// `VECS ≤ V`; `a` holds `kc` steps of [`MR`] values; `b` holds `kc` rows of [`NR`]; `c`
/// writable at `i·ldc + j` for `i < mr`, `j < cols`; a bias readable for `cols` values.
#[target_feature(enable = "avx512f")]
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
        // The lines of the block's rows (a narrow last block's may lie past `c`: a prefetch
        // never faults, and `wrapping_add` makes no claim on the address).
        for r in 0..mr {
            for j in [0, 16, 32, NR - 1] {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + j).cast());
            }
        }
        let mut acc = [[_mm512_setzero_ps(); VECS]; MR];
        for p in 0..kc {
            // The panel streams from L2: ask for its rows `PF` steps ahead (past the panel's
            // end this reads the next panel or nothing: a prefetch never faults).
            let ahead = b.wrapping_add((p + PF) * NR);
            for v in 0..VECS {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * v).cast());
                if WARM {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(p * NR + 16 * v).cast());
                }
            }
            let bv: [__m512; VECS] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(p * NR + 16 * v)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(p * MR + r));
                for (acc_rv, &bv) in acc_r.iter_mut().zip(&bv) {
                    *acc_rv = _mm512_fmadd_ps(x, bv, *acc_rv);
                }
            }
        }
        let masks = masks(cols);
        let alpha = _mm512_set1_ps(alpha);
        for (r, acc_r) in acc.iter().enumerate() {
            if r < mr {
                let row = c.add(r * ldc);
                // A vector wholly past `cols` (a ragged last panel) is skipped: its pointer could
                // lie past the end of `c` or of the bias.
                for (v, (&acc_rv, mask)) in acc_r.iter().zip(masks).enumerate().filter(|(_, (_, m))| *m != 0) {
                    let out = row.add(16 * v);
                    let value = match start {
                        Start::Zero => _mm512_mul_ps(alpha, acc_rv),
                        Start::Dst => _mm512_fmadd_ps(alpha, acc_rv, _mm512_maskz_loadu_ps(mask, out)),
                        Start::Bias(bias) => {
                            _mm512_fmadd_ps(alpha, acc_rv, _mm512_maskz_loadu_ps(mask, bias.add(16 * v)))
                        }
                    };
                    _mm512_mask_storeu_ps(out, mask, value);
                }
            }
        }
    }
}

/// The masks of the first `cols` (at most [`NR`]) lanes of a panel row's [`V`] vectors.
fn masks(cols: usize) -> [__mmask16; V] {
    std::array::from_fn(|v| {
        let n = cols.saturating_sub(16 * v);
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rounding has the bits of the scalar one on every class of value: random bit
    /// patterns (every exponent, NaNs with payloads, subnormals), ties either way, the largest
    /// finite values, and a ragged tail.
    #[test]
    fn rounding_a_row_has_the_scalar_bits() {
        if !has_avx512() {
            return;
        }
        let mut rng = crate::rng::SplitMix64::new(41);
        let mut values: Vec<f32> = (0..40_000)
            .map(|_| f32::from_bits((rng.next_u64() >> 32) as u32))
            .collect();
        values.extend(
            [
                0x0000_0001u32,
                0x807F_FFFF,
                0x0000_8000,
                0x3F80_8000,
                0x3F81_8000,
                0x3F80_8001,
                0x7F7F_FFFF,
                0xFF7F_8000,
                0x7F80_0000,
                0xFF80_0001,
                0x7FC0_0000,
                0x8000_0000,
            ]
            .map(f32::from_bits),
        );
        let mut got = values.clone();
        // SAFETY: AVX-512 F was detected.
        unsafe { round_row_to_bf16(&mut got) };
        for (x, y) in values.iter().zip(&got) {
            let want = crate::round_to_bf16(*x).to_bits();
            assert_eq!(y.to_bits(), want, "{:#010x}", x.to_bits());
        }
    }

    fn has_avx512() -> bool {
        let has = std::arch::is_x86_feature_detected!("avx512f");
        if !has {
            eprintln!("note: no AVX-512 on this CPU; its bf16 rounding is not checked");
        }
        has
    }
}
