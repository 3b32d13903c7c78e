//! One buffer of packed blocks per call: the layout every packing of K or V shares, filled
//! before the call's tiles run ([`pack_blocks`]) or one `(b, g)` at a time by the tasks
//! ([`pack_group`]).

use super::Plan;
use crate::buffer::Buffer;
use crate::{Par, View4};
use rayon::prelude::*;

/// How one key block is packed: `pack(dst, rows, bc, [row stride, column stride])` fills the
/// block's `dst` from its `bc` rows.
pub(super) trait Packer<T>: Fn(&mut [f32], &[T], usize, [usize; 2]) + Sync {}
impl<T, F: Fn(&mut [f32], &[T], usize, [usize; 2]) + Sync> Packer<T> for F {}

/// One buffer of `block_len` floats per `(b, g, key block)` of `x: [B, G, T, _]` (f32 values or
/// bf16 bits), each block filled by `pack`. The buffer comes from this thread's pool
/// ([`crate::buffer::take`]); hand it back with `buffer::give`.
pub(super) fn pack_blocks<T: Sync>(
    plan: &Plan,
    x: &View4<'_, T>,
    block_len: usize,
    par: Par,
    pack: impl Packer<T>,
) -> Buffer {
    let blocks = plan.t.div_ceil(plan.block_keys);
    let mut packed = crate::buffer::take(plan.b * plan.g * blocks * block_len);
    let one = |(index, dst): (usize, &mut [f32])| pack_block(plan, x, [index / blocks, index % blocks], dst, &pack);
    match par {
        Par::Seq => packed.chunks_mut(block_len).enumerate().for_each(one),
        Par::Rayon => packed.par_chunks_mut(block_len).enumerate().for_each(one),
    }
    packed
}

/// The blocks of `(b, g)` alone into `dst` (`block_len` floats per key block), as
/// [`pack_blocks`] lays them out in its part of the call's buffer.
pub(super) fn pack_group<T>(
    plan: &Plan,
    x: &View4<'_, T>,
    block_len: usize,
    [b, g]: [usize; 2],
    dst: &mut [f32],
    pack: impl Packer<T>,
) {
    let blocks = plan.t.div_ceil(plan.block_keys);
    assert!(dst.len() == blocks * block_len);
    for (block, dst) in dst.chunks_mut(block_len).enumerate() {
        pack_block(plan, x, [b * plan.g + g, block], dst, &pack);
    }
}

/// Key block `block` of the `bg`-th `(b, g)` packed into `dst` by `pack`.
fn pack_block<T>(plan: &Plan, x: &View4<'_, T>, [bg, block]: [usize; 2], dst: &mut [f32], pack: &impl Packer<T>) {
    let st = x.strides();
    let (b, g) = (bg / plan.g, bg % plan.g);
    let t0 = block * plan.block_keys;
    let bc = (plan.t - t0).min(plan.block_keys);
    pack(dst, &x.data()[b * st[0] + g * st[1] + t0 * st[2]..], bc, [st[2], st[3]]);
}
