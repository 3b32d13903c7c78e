//! The row primitives written once over the width, which both levels instantiate: the
//! vectorised `exp` (general and softmax's), the row maximum, softmax's fused `exp`, subtraction
//! and sum, its backward's row, and the scalings.

use super::Lanes;
use crate::exp_poly::{E1, E2, E3, E4, E5, EXP_HI, EXP_LO, LN2, LN2_HI, LN2_LO, LOG2E};

/// `e^x` per lane (see `simd.rs`): `x < EXP_LO` gives 0, `x > EXP_HI` gives `+inf`, NaN
/// stays NaN.
#[inline(always)]
pub(crate) unsafe fn exp<L: Lanes>(x: L::V) -> L::V {
    // SAFETY: the caller's entry point enables `L`'s features.
    unsafe { L::inf_above(x, EXP_HI, exp_at_most_hi::<L, false>(x)) }
}

/// `e^x` per lane for softmax's `x = s − max ≤ 0`: [`exp`] without the `+inf` blend, and with
/// the reduction `r = x − n·ln 2` in one FMA with `ln 2` as one f32 ([`LN2`]) where [`exp`]
/// splits it in two. One FMA fewer of the nine per vector: 13% less time per element on Zen 3
/// (`examples/exp_speed.rs`) for a relative error below 2.1e-7 on `[−20, 0]` and 4e-7 down
/// to `EXP_LO` (1.7e-7 with the split; the test `softmax_exp_error_bound`). `x < EXP_LO`
/// gives 0, NaN stays NaN.
#[inline(always)]
pub(crate) unsafe fn softmax_exp<L: Lanes>(x: L::V) -> L::V {
    // SAFETY: the caller's entry point enables `L`'s features.
    unsafe { exp_at_most_hi::<L, true>(x) }
}

/// `e^x` per lane for `x ≤ EXP_HI`; `x < EXP_LO` gives 0, NaN stays NaN. The general `exp`
/// splits `ln 2` in two parts and multiplies by `2^n` last; `SOFTMAX` (arguments at most 0)
/// takes `ln 2` as one f32 and scales inside the last FMA.
#[inline(always)]
unsafe fn exp_at_most_hi<L: Lanes, const SOFTMAX: bool>(x: L::V) -> L::V {
    // SAFETY: the caller's entry point enables `L`'s features.
    unsafe {
        // Round-to-nearest `n = round(x·log2 e)` by the magic-number trick: adding 1.5·2^23
        // leaves `n` in the low mantissa bits of `z`, which also give `2^n` by one shift.
        let magic = L::splat(12_582_912.0);
        let z = L::fmadd(x, L::splat(LOG2E), magic);
        let n = L::sub(z, magic);
        let r = if SOFTMAX {
            L::fnmadd(n, L::splat(LN2), x)
        } else {
            L::fnmadd(n, L::splat(LN2_LO), L::fnmadd(n, L::splat(LN2_HI), x))
        };
        let mut q = L::splat(E5);
        q = L::fmadd(q, r, L::splat(E4));
        q = L::fmadd(q, r, L::splat(E3));
        q = L::fmadd(q, r, L::splat(E2));
        q = L::fmadd(q, r, L::splat(E1));
        // Lanes below EXP_LO computed garbage: replace it.
        if SOFTMAX {
            // `2^n + (r·2^n)·q` for softmax's `n ≤ 0` (finite `2^n`): one rounding where the
            // product of `1 + r·q` and `2^n` takes two, and the scaling off the chain of
            // dependent operations (`r·2^n`, exact unless it falls below f32's normal range,
            // is ready before `q`): 7.5% less time per element on Zen 3 (a scratch loop,
            // docs/PERFORMANCE.md). At
            // AVX-512 the FMA also zeroes the lanes below EXP_LO.
            let pow2 = L::pow2(n, z);
            L::fmadd_zero_below(q, L::mul(r, pow2), pow2, x, EXP_LO)
        } else {
            // `(1 + r·q)·2^n`: the general `exp`, whose `n` may reach 128 (`2^n = +inf`).
            L::zero_below(x, EXP_LO, L::times_pow2(L::fmadd(q, r, L::splat(1.0)), n, z))
        }
    }
}

/// `max(row)`, `-inf` for an empty row.
#[inline(always)]
pub(crate) unsafe fn row_max<L: Lanes>(row: &[f32]) -> f32 {
    let chunks = row.chunks_exact(L::N);
    let tail = chunks.remainder();
    // SAFETY: each chunk has exactly `N` elements; features as above.
    let m = unsafe {
        let mut m = L::splat(f32::NEG_INFINITY);
        for c in chunks {
            m = L::max(m, L::load(c.as_ptr()));
        }
        L::hmax(m)
    };
    tail.iter().fold(m, |m, &x| if x > m { x } else { m })
}

/// Replaces each `x` of `row` by `exp(x - m)` ([`softmax_exp`]) and returns the sum of the results.
/// Two independent chains of `N` lanes where [`Lanes::TWO_EXP_CHAINS`], then one, then the tail
/// through the same `N`-lane code (masked loads and stores), so every element of a row sees the
/// same arithmetic.
#[inline(always)]
pub(crate) unsafe fn exp_sub_sum<L: Lanes>(row: &mut [f32], m: f32) -> f32 {
    // SAFETY: the caller's contract.
    unsafe { exp_sub_sum_body::<L, false>(row, m, 0.0) }
}

/// [`exp_sub_sum`] with a second subtraction, `exp((x - m) - lo)`: the backward's probabilities
/// from a log-sum-exp held as two floats (`m` the rounded one, `lo` its rounding error).
#[inline(always)]
pub(crate) unsafe fn exp_sub2_sum<L: Lanes>(row: &mut [f32], m: f32, lo: f32) -> f32 {
    // SAFETY: the caller's contract.
    unsafe { exp_sub_sum_body::<L, true>(row, m, lo) }
}

/// The body of [`exp_sub_sum`] and [`exp_sub2_sum`]: `exp((x - m) - lo)` when `TWO`.
#[inline(always)]
unsafe fn exp_sub_sum_body<L: Lanes, const TWO: bool>(row: &mut [f32], m: f32, lo: f32) -> f32 {
    // SAFETY: every pointer below covers `N` or `2N` elements of a chunk, or the tail's
    // `len < N` for the masked accesses; features as above.
    unsafe {
        let (mv, lov) = (L::splat(m), L::splat(lo));
        let shift = |x: L::V| if TWO { L::sub(L::sub(x, mv), lov) } else { L::sub(x, mv) };
        let mut acc = L::splat(0.0);
        let mut rest = row;
        if L::TWO_EXP_CHAINS {
            let (mut acc0, mut acc1) = (acc, L::splat(0.0));
            let mut pairs = rest.chunks_exact_mut(2 * L::N);
            for c in &mut pairs {
                let e0 = softmax_exp::<L>(shift(L::load(c.as_ptr())));
                let e1 = softmax_exp::<L>(shift(L::load(c.as_ptr().add(L::N))));
                L::store(c.as_mut_ptr(), e0);
                L::store(c.as_mut_ptr().add(L::N), e1);
                acc0 = L::add(acc0, e0);
                acc1 = L::add(acc1, e1);
            }
            acc = L::add(acc0, acc1);
            rest = pairs.into_remainder();
        }
        let mut chunks = rest.chunks_exact_mut(L::N);
        for c in &mut chunks {
            let e = softmax_exp::<L>(shift(L::load(c.as_ptr())));
            L::store(c.as_mut_ptr(), e);
            acc = L::add(acc, e);
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            // The missing lanes are `-inf`: their `exp` is 0 and adds nothing.
            let e = softmax_exp::<L>(shift(L::load_part(tail.as_ptr(), tail.len(), f32::NEG_INFINITY)));
            L::store_part(tail.as_mut_ptr(), tail.len(), e);
            acc = L::add(acc, e);
        }
        L::hsum(acc)
    }
}

/// `x = e^x` for each element ([`exp`], the tail through the same code, masked).
#[inline(always)]
pub(crate) unsafe fn exp_in_place<L: Lanes>(xs: &mut [f32]) {
    let mut chunks = xs.chunks_exact_mut(L::N);
    // SAFETY: each chunk has exactly `N` elements, the masked tail its `len < N`; features as
    // above.
    unsafe {
        for c in &mut chunks {
            L::store(c.as_mut_ptr(), exp::<L>(L::load(c.as_ptr())));
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let e = exp::<L>(L::load_part(tail.as_ptr(), tail.len(), 0.0));
            L::store_part(tail.as_mut_ptr(), tail.len(), e);
        }
    }
}

/// The softmax's backward on one row: `p[i] = p[i]·(dp[i] − delta)`, and 0 where `p[i]` is 0
/// (a hidden key gets nothing, even from a non-finite `dp`). `p` holds probabilities: 0, at
/// least `f32::MIN_POSITIVE` (the exp flushes smaller results to 0), or NaN (kept).
#[inline(always)]
pub(crate) unsafe fn softmax_grad_row<L: Lanes>(p: &mut [f32], dp: &[f32], delta: f32) {
    let mut pc = p.chunks_exact_mut(L::N);
    let mut dc = dp.chunks_exact(L::N);
    // SAFETY: both chunks have exactly `N` elements, the masked tails `n < N`; features as above.
    unsafe {
        let dv = L::splat(delta);
        let grad = |x: L::V, d: L::V| L::zero_below(x, f32::MIN_POSITIVE, L::mul(x, L::sub(d, dv)));
        for (pc, dc) in (&mut pc).zip(&mut dc) {
            L::store(pc.as_mut_ptr(), grad(L::load(pc.as_ptr()), L::load(dc.as_ptr())));
        }
        let (pt, dt) = (pc.into_remainder(), dc.remainder());
        let n = pt.len().min(dt.len());
        if n > 0 {
            let y = grad(L::load_part(pt.as_ptr(), n, 0.0), L::load_part(dt.as_ptr(), n, 0.0));
            L::store_part(pt.as_mut_ptr(), n, y);
        }
    }
}

/// `row[i] *= alpha`.
#[inline(always)]
pub(crate) unsafe fn scale_row<L: Lanes>(row: &mut [f32], alpha: f32) {
    let mut chunks = row.chunks_exact_mut(L::N);
    // SAFETY: each chunk has exactly `N` elements, the masked tail `len < N`; features as above.
    unsafe {
        let a = L::splat(alpha);
        for c in &mut chunks {
            L::store(c.as_mut_ptr(), L::mul(L::load(c.as_ptr()), a));
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let x = L::load_part(tail.as_ptr(), tail.len(), 0.0);
            L::store_part(tail.as_mut_ptr(), tail.len(), L::mul(x, a));
        }
    }
}

/// `dst[i] = src[i] * alpha`.
#[inline(always)]
pub(crate) unsafe fn scale_into<L: Lanes>(dst: &mut [f32], src: &[f32], alpha: f32) {
    let mut d = dst.chunks_exact_mut(L::N);
    let mut s = src.chunks_exact(L::N);
    // SAFETY: both chunks have exactly `N` elements, the masked tails `n < N`; features as above.
    unsafe {
        let a = L::splat(alpha);
        for (dc, sc) in (&mut d).zip(&mut s) {
            L::store(dc.as_mut_ptr(), L::mul(L::load(sc.as_ptr()), a));
        }
        let (dt, st) = (d.into_remainder(), s.remainder());
        let n = dt.len().min(st.len());
        if n > 0 {
            L::store_part(dt.as_mut_ptr(), n, L::mul(L::load_part(st.as_ptr(), n, 0.0), a));
        }
    }
}

/// [`scale_into`], and whether every product is finite: the products times zero are summed,
/// which stays 0 while every product is finite and turns NaN at the first infinity or NaN.
///
/// # Safety
/// The CPU features `L` needs must be available.
#[inline(always)]
pub(crate) unsafe fn scale_into_finite<L: Lanes>(dst: &mut [f32], src: &[f32], alpha: f32) -> bool {
    let mut d = dst.chunks_exact_mut(L::N);
    let mut s = src.chunks_exact(L::N);
    // SAFETY: both chunks have exactly `N` elements, the masked tails `n < N`; features as above.
    let zeros = unsafe {
        let (a, zero) = (L::splat(alpha), L::splat(0.0));
        let mut zeros = zero;
        for (dc, sc) in (&mut d).zip(&mut s) {
            let x = L::mul(L::load(sc.as_ptr()), a);
            L::store(dc.as_mut_ptr(), x);
            zeros = L::fmadd(x, zero, zeros);
        }
        let (dt, st) = (d.into_remainder(), s.remainder());
        let n = dt.len().min(st.len());
        if n > 0 {
            // The missing lanes are 0·alpha: 0 unless alpha itself is not finite, and then a
            // product of a present lane is not finite either (or there is none: `n > 0`).
            let x = L::mul(L::load_part(st.as_ptr(), n, 0.0), a);
            L::store_part(dt.as_mut_ptr(), n, x);
            zeros = L::fmadd(x, zero, zeros);
        }
        L::hsum(zeros)
    };
    zeros == 0.0
}
