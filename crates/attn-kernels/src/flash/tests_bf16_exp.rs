//! The bf16 levels' fused pass 2 (AMX's A tiles, AVX512-BF16's rows of pairs) and its shorter
//! `exp` ([`super::bf16_x86`]) against f64, at the AVX-512 level with AVX512-BF16 (skipped,
//! with a note, elsewhere); and pass 2's rows that see nothing, at every level.

use super::tests::EPS;
use super::tests_bf16::PROBABILITY_EXP_ERROR;
use super::{flash_attention, BF16_BLOCK_KEYS};
use crate::{AttentionOptions, ForwardInputs, Par, View4, ViewMut4};

#[cfg(target_arch = "x86_64")]
use PROBABILITY_EXP_ERROR as EXP_SHORT_ERROR;

/// AMX's shorter `exp` is within [`EXP_SHORT_ERROR`] of `e^x` over the whole range softmax
/// gives it (`x ≤ 0`, swept densely), exactly 1 at 0, 0 below `EXP_LO` and at `-inf`, NaN at
/// NaN.
#[test]
fn short_exp_is_within_its_bound() {
    if !checked_here("the short exp") {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let lo = crate::exp_poly::EXP_LO;
        let mut worst = 0.0f64;
        let mut xs: Vec<f32> = (0..=400_000).map(|i| lo * i as f32 / 400_000.0).collect();
        xs.extend([
            0.0,
            -0.0,
            -1e-30,
            lo,
            lo.next_up(),
            lo.next_down(),
            -100.0,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        for chunk in xs.chunks(16) {
            let mut lanes = [0.0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let input = lanes;
            // SAFETY: AVX-512 (checked above).
            unsafe { super::bf16_x86::exp_short_16(&mut lanes) };
            for (&x, &e) in input.iter().zip(&lanes) {
                if x.is_nan() {
                    assert!(e.is_nan(), "exp(NaN) = {e}");
                } else if x < lo {
                    assert_eq!(e.to_bits(), 0, "exp({x}) = {e}, want +0");
                } else {
                    let want = (x as f64).exp();
                    let err = (e as f64 - want).abs() / want;
                    assert!(
                        err <= EXP_SHORT_ERROR,
                        "exp({x}) = {e}, want {want}: relative error {err:e}"
                    );
                    worst = worst.max(err);
                }
            }
        }
        assert_eq!(short_exp(0.0), 1.0, "e^0 must be exactly 1");
        println!("short exp: largest relative error {worst:.3e} (bound {EXP_SHORT_ERROR:e})");
        // The polynomial's own error dominates near 0: a planted wrong coefficient shows here.
        assert!(worst > 1e-6, "the short exp is more exact than its polynomial can be");
    }
}

/// Whether this level runs the fused `exp` (AVX-512 with AVX512-BF16); if not, says that
/// `what` is not checked.
fn checked_here(what: &str) -> bool {
    let here = crate::bf16_level().has_avx512bf16() && crate::simd::simd_level() == crate::SimdLevel::Avx512;
    if !here {
        eprintln!("note: no AVX512-BF16 at this level; {what} is not checked");
    }
    here
}

/// The short `exp` of one value.
#[cfg(target_arch = "x86_64")]
fn short_exp(x: f32) -> f32 {
    let mut lanes = [x; 16];
    // SAFETY: called after the AVX-512 check.
    unsafe { super::bf16_x86::exp_short_16(&mut lanes) };
    lanes[0]
}

/// AMX's fused pass 2 (`exp` straight into A tiles, rounded) writes the short `exp` of each
/// `x - m` rounded to bf16, and returns the sum of the unrounded values in
/// `exp_sub_sum`'s order: every length of a row tail, hidden keys (`-inf`) included, and zeros
/// after the row to the last step, nothing past a step's 16 words; the sum within
/// [`EXP_SHORT_ERROR`] and f32's summation error of the exact one.
#[test]
fn fused_exp_into_tiles_writes_the_rounded_short_exp() {
    if !checked_here("the fused exp") {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for n in [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 100, 128] {
        let mut row: Vec<f32> = crate::testing::random_vec(n, n as u64)
            .iter()
            .map(|x| 6.0 * x)
            .collect();
        if n > 1 {
            row[n / 3] = f32::NEG_INFINITY;
        }
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let steps = n.div_ceil(32) + 1;
        let mut tiles = vec![f32::NAN; 32 * steps];
        // SAFETY: AVX512-BF16 at the AVX-512 level (checked); `n <= 32·steps`; 16 words at
        // each step's offset `32·s`.
        let sum = unsafe { super::bf16_x86::exp_sub_sum_steps(&row, m, steps, tiles.as_mut_ptr(), 32) };
        let want: Vec<f32> = row.iter().map(|&x| short_exp(x - m)).collect();
        let exact: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        let bound = exact * (EXP_SHORT_ERROR + (n as f64 + 2.0) * EPS);
        assert!(
            (sum as f64 - exact).abs() <= bound,
            "sum of {n}: {sum}, want {exact} ± {bound:e}"
        );
        let mut words = vec![0u32; 16 * steps];
        for (q, word) in words.iter_mut().enumerate().take(n.div_ceil(2)) {
            let hi = want.get(2 * q + 1).map_or(0, |&x| crate::f32_to_bf16(x) as u32);
            *word = crate::f32_to_bf16(want[2 * q]) as u32 | hi << 16;
        }
        let got: Vec<u32> = tiles
            .chunks(32)
            .flat_map(|step| &step[..16])
            .map(|w| w.to_bits())
            .collect();
        assert!(got == words, "words of {n}");
        assert!(
            tiles.chunks(32).all(|step| step[16..].iter().all(|w| w.is_nan())),
            "wrote past a step"
        );
    }
}

/// The AVX512-BF16 level's fused pass 2 writes the row of pairs that [`super::bf16::convert_row`]
/// makes of the short `exp`s (zeros after the row up to the next 32 values, nothing past
/// them) and returns the sum of the tiles' version: the same `exp` on both bf16 levels.
#[test]
fn fused_exp_into_pairs_writes_the_converted_row() {
    if !checked_here("the fused exp into pairs") {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for n in [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256] {
        let mut row: Vec<f32> = crate::testing::random_vec(n, 7 + n as u64)
            .iter()
            .map(|x| 5.0 * x)
            .collect();
        if n > 1 {
            row[n / 2] = f32::NEG_INFINITY;
        }
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let padded = n.div_ceil(32) * 16;
        let mut p16 = vec![f32::NAN; padded + 8];
        let sum = super::bf16::exp_sub_sum_into_pairs(&row, m, &mut p16);
        let exps: Vec<f32> = row.iter().map(|&x| short_exp(x - m)).collect();
        let mut want = vec![0.0f32; padded];
        super::bf16::convert_row(&exps, &mut want);
        let bits = |v: &[f32]| v.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p16[..padded]), bits(&want), "words of {n}");
        assert!(p16[padded..].iter().all(|w| w.is_nan()), "{n}: wrote past its steps");
        let steps = n.div_ceil(32);
        let mut tiles = vec![0.0f32; 32 * steps];
        // SAFETY: AVX512-BF16 at the AVX-512 level (checked); 16 words at each step's offset.
        let tiles_sum = unsafe { super::bf16_x86::exp_sub_sum_steps(&row, m, steps, tiles.as_mut_ptr(), 32) };
        assert_eq!(sum.to_bits(), tiles_sum.to_bits(), "sum of {n}");
    }
}

/// Rows that see no key of a block, between rows that do, leave the others' probabilities
/// alone and give zeros; a row whose only visible scores are NaN gives NaN, alone. An additive
/// mask hides every key from rows 5, 9, ... and the first block's keys from rows 7, 11, ...;
/// row 3 sees one NaN score. Every other row agrees with f32 (within bf16's rounding) at this
/// machine's level.
#[test]
fn rows_that_see_nothing_leave_their_neighbours_alone() {
    super::tests_bf16::each_bf16_kernel(|route| {
        eprintln!("rows_that_see_nothing_leave_their_neighbours_alone: {route}");
        rows_that_see_nothing_leave_their_neighbours_alone_once();
    });
}

fn rows_that_see_nothing_leave_their_neighbours_alone_once() {
    let (h, s, t, d) = (2, 70, 2 * BF16_BLOCK_KEYS + 40, 32);
    let q = crate::testing::random_vec(h * s * d, 11);
    let k = crate::testing::random_vec(h * t * d, 12);
    let v = crate::testing::random_vec(h * t * d, 13);
    let hidden = |si: usize, ti: usize| (si % 4 == 1 && si > 1) || (si % 4 == 3 && si > 3 && ti < BF16_BLOCK_KEYS);
    let mask: Vec<f32> = (0..s * t)
        .map(|i| {
            let (si, ti) = (i / t, i % t);
            if si == 3 {
                if ti == 5 {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                }
            } else if hidden(si, ti) {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let run = |precision| {
        let mut out = vec![0.0f32; h * s * d];
        let options = AttentionOptions {
            mask: crate::Mask::Additive(View4::new(&mask, [1, h, s, t], [0, 0, t, 1]).unwrap()),
            precision,
            ..Default::default()
        };
        let inputs = ForwardInputs::new(
            View4::contiguous(&q, [1, h, s, d]).unwrap(),
            View4::contiguous(&k, [1, h, t, d]).unwrap(),
            View4::contiguous(&v, [1, h, t, d]).unwrap(),
        );
        flash_attention(
            ViewMut4::contiguous(&mut out, [1, h, s, d]).unwrap(),
            None,
            inputs,
            &options,
            Par::Seq,
        )
        .unwrap();
        out
    };
    let (bf16, f32_out) = (run(crate::Precision::Bf16), run(crate::Precision::F32));
    for hi in 0..h {
        for si in 0..s {
            let row = |out: &[f32]| out[(hi * s + si) * d..][..d].to_vec();
            let (got, want) = (row(&bf16), row(&f32_out));
            if si == 3 {
                assert!(got.iter().all(|x| x.is_nan()), "h {hi} row 3 (a NaN score): {got:?}");
            } else if si % 4 == 1 && si > 1 {
                assert!(got.iter().all(|&x| x == 0.0), "h {hi} row {si} (sees nothing): {got:?}");
            } else {
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err < 0.02, "h {hi} row {si}: {got:?} against f32 {want:?}");
            }
        }
    }
}
