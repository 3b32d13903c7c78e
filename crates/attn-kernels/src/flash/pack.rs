//! One buffer of packed blocks per call: the layout every per-call packing of K or V shares.

use super::{Plan, BLOCK_KEYS};
use crate::buffer::Buffer;
use crate::{Par, View4};
use rayon::prelude::*;

/// One buffer of `block_len` floats per `(b, g, key block)` of `x: [B, G, T, _]` (f32 values or
/// bf16 bits), each filled
/// by `pack(dst, rows, bc, [row stride, column stride])` from the block's `bc` rows.
pub(super) fn pack_blocks<T: Sync>(
    plan: &Plan,
    x: &View4<'_, T>,
    block_len: usize,
    par: Par,
    pack: impl Fn(&mut [f32], &[T], usize, [usize; 2]) + Sync,
) -> Buffer {
    let blocks = plan.t.div_ceil(BLOCK_KEYS);
    let mut packed = crate::buffer::take(plan.b * plan.g * blocks * block_len);
    let st = x.strides();
    let data = x.data();
    let one = |(index, dst): (usize, &mut [f32])| {
        let (bg, block) = (index / blocks, index % blocks);
        let (b, g) = (bg / plan.g, bg % plan.g);
        let t0 = block * BLOCK_KEYS;
        let bc = (plan.t - t0).min(BLOCK_KEYS);
        pack(dst, &data[b * st[0] + g * st[1] + t0 * st[2]..], bc, [st[2], st[3]]);
    };
    match par {
        Par::Seq => packed.chunks_mut(block_len).enumerate().for_each(one),
        Par::Rayon => packed.par_chunks_mut(block_len).enumerate().for_each(one),
    }
    packed
}
