//! Inverted dropout with a counter-based random stream: each element's draw is a keyed hash
//! of its index, so a mask depends on nothing but the seed and the index (not the thread count,
//! not the order), and the backward replays it from the seed.

use rayon::prelude::*;

use crate::{KernelError, Par};

/// The two 32-bit keys of dropout call `seed` (SplitMix64's finaliser of the seed).
#[inline]
fn dropout_keys(seed: u64) -> (u32, u32) {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z as u32, (z >> 32) as u32)
}

/// Chris Wellons' `lowbias32` integer hash.
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The 24 random bits of element `index` under `keys`: two rounds of `lowbias32`, each keyed
/// (32-bit multiplies, which vectorise at every SIMD level).
#[inline(always)]
fn dropout_bits(keys: (u32, u32), index: u32) -> u32 {
    lowbias32(lowbias32(index ^ keys.0) ^ keys.1) >> 8
}

/// A counter-based uniform draw in `[0, 1)` (24 bits) for element `index` of dropout call
/// `seed`: a keyed hash of the index, so a mask depends on nothing else (not the thread count,
/// not the order), and a step can be replayed from its seed.
#[inline]
pub fn dropout_uniform(seed: u64, index: u32) -> f32 {
    dropout_bits(dropout_keys(seed), index) as f32 / (1u32 << 24) as f32
}

/// Dropout of `xs`, element `i` at counter `base + i`.
#[inline(always)]
fn dropout_run(xs: &mut [f32], keys: (u32, u32), base: u32, threshold: u32, keep: f32) {
    for (i, x) in xs.iter_mut().enumerate() {
        let drop = dropout_bits(keys, base.wrapping_add(i as u32)) < threshold;
        *x = if drop { 0.0 } else { *x * keep };
    }
}

/// The factor inverted dropout of probability `p` scales kept elements by, `1 / (1 − p)` (0
/// for `p = 1`, which keeps nothing), or the error naming `op` for a `p` outside `[0, 1]`.
pub(super) fn keep_factor(op: &'static str, p: f32) -> Result<f32, KernelError> {
    if !(0.0..=1.0).contains(&p) {
        return Err(KernelError::InvalidArgument {
            op,
            what: "p",
            got: p.to_string(),
            expected: "between 0 and 1",
        });
    }
    Ok(if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 })
}

/// Inverted dropout in place: `x[i] = 0` where [`dropout_uniform`]`(seed, offset + i) < p`,
/// else `x[i] / (1 − p)`. The backward is the same call on the output's gradient with the same
/// `seed` and `offset`. `p = 0` leaves `x` as it is; `p = 1` zeros it. Indices are 32-bit:
/// `offset + x.len()` above `2^32` is an error.
pub fn dropout(x: &mut [f32], p: f32, seed: u64, offset: u32, par: Par) -> Result<(), KernelError> {
    let keep = keep_factor("dropout", p)?;
    if offset as u64 + x.len() as u64 > 1u64 << 32 {
        return Err(KernelError::InvalidArgument {
            op: "dropout",
            what: "offset + length",
            got: (offset as u64 + x.len() as u64).to_string(),
            expected: "at most 2^32 elements per call",
        });
    }
    if p == 0.0 {
        return Ok(());
    }
    let keys = dropout_keys(seed);
    // `bits / 2^24 < p` exactly when `bits < ceil(p · 2^24)` (or `bits < p · 2^24` when that is
    // a whole number): an integer compare per element.
    let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u32;
    let chunk = 16 * 1024;
    let body = |(c, xs): (usize, &mut [f32])| {
        let base = offset.wrapping_add((c * chunk) as u32);
        at_level!(dropout_run(xs, keys, base, threshold, keep));
    };
    match par {
        Par::Seq => x.chunks_mut(chunk).enumerate().for_each(body),
        Par::Rayon => x.par_chunks_mut(chunk).enumerate().for_each(body),
    }
    Ok(())
}
