//! K and V packed per `(b, g)` by the tasks that read them, not once for the call: each thread
//! holds the packing of one `(b, g)` in a buffer of its own, read from its cache, instead of
//! buffers the size of K and V written to memory and read back, and the call runs one parallel
//! loop instead of three. The packed words are those of the packing for the call, so the
//! results have the same bits either way (`tests_per_group.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{bf16, run_tasks, tile, tile_blocks, tile_into, Bf16Source, Dst, GroupPacking, Operands, Plan};
use crate::buffer::Buffer;
use crate::Par;

/// Whether a call of `plan` that packs K and V packs them per `(b, g)` ([`attend_per_group`]) rather
/// than once for the call before its tiles run: for calls whose keys are not split across
/// tasks, of at most [`PER_GROUP_MAX_KEYS`] keys and at most [`PER_GROUP_MAX_FLOATS`] values
/// of K and V per `(b, g)`.
pub(super) fn packs_per_group(plan: &Plan) -> bool {
    plan.splits == 1
        && plan.t <= PER_GROUP_MAX_KEYS
        && plan.t * (plan.d + plan.dv) <= PER_GROUP_MAX_FLOATS
        && !packing_for_the_call_forced()
}

/// The most keys at which a call packs K and V per `(b, g)` ([`packs_per_group`]).
pub(super) const PER_GROUP_MAX_KEYS: usize = 4096;

/// The most values of K and V of one `(b, g)` at which a call packs them per `(b, g)`
/// ([`packs_per_group`]): each thread keeps the packing of one `(b, g)` between calls, so this
/// bounds what it keeps (4 MiB of f32, 4096 keys at `D = Dv = 128`).
const PER_GROUP_MAX_FLOATS: usize = 1 << 20;

#[cfg(test)]
thread_local! {
    /// Set by the tests to pack K and V for the call where [`packs_per_group`] would not.
    pub(crate) static FORCE_PACKING_FOR_THE_CALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a test on this thread asked for K and V packed for the call (never outside tests).
fn packing_for_the_call_forced() -> bool {
    #[cfg(test)]
    let forced = FORCE_PACKING_FOR_THE_CALL.with(|f| f.get());
    #[cfg(not(test))]
    let forced = false;
    forced
}

/// One call's packing per `(b, g)`: how K and V are packed, the floats of one `(b, g)`'s packed
/// K and V, and a number that no other call shares (so a thread knows whether what it holds
/// is this call's).
pub(super) struct GroupPacker {
    packing: GroupPacking,
    lens: [usize; 2],
    call: u64,
}

impl GroupPacker {
    /// The packing of a call of `plan` whose operands `ops` say how K and V are packed.
    pub(super) fn new(plan: &Plan, ops: &Operands<'_, '_>) -> GroupPacker {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let packing = ops.packed_per_group.expect("packed per group");
        let blocks = plan.t.div_ceil(plan.block_keys);
        let lens = match packing {
            GroupPacking::Bf16 => [bf16::key_block_len(plan, ops.amx), bf16::value_block_len(plan, ops.amx)],
            GroupPacking::F32 { .. } => [tile_blocks::key_block_len(plan), tile_blocks::value_block_len(plan)],
        }
        .map(|len| len * blocks);
        GroupPacker {
            packing,
            lens,
            call: CALLS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Runs `body` on `ops` reading the K and V of `(b, g)` alone from this thread's buffer,
    /// packed now unless the thread's last packing was this call's `(b, g)` (rayon hands a
    /// thread consecutive tasks, so a `(b, g)` is mostly packed once).
    pub(super) fn with_group<R>(
        &self,
        plan: &Plan,
        ops: &Operands<'_, '_>,
        [b, g]: [usize; 2],
        body: impl FnOnce(&Operands<'_, '_>) -> R,
    ) -> R {
        let (lens, bg) = (self.lens, b * plan.g + g);
        let mut held = GROUP_PACKED.take();
        if !held.as_ref().is_some_and(|p| p.holds(self.call, bg)) {
            let mut buffers = match held.take() {
                Some(p) if p.buffers[0].len() >= lens[0] && p.buffers[1].len() >= lens[1] => p.buffers,
                _ => lens.map(Buffer::zeroed),
            };
            let [keys, values] = &mut buffers;
            let parts = [&mut keys[..lens[0]], &mut values[..lens[1]]];
            match self.packing {
                GroupPacking::Bf16 => bf16::pack_group(plan, [ops.k, ops.v], ops.amx, [b, g], parts),
                GroupPacking::F32 { round } => tile::pack_group(plan, [ops.k, ops.v], round, [b, g], parts),
            }
            held = Some(GroupPacked {
                call: self.call,
                bg,
                buffers,
            });
        }
        let [keys, values] = &held.as_ref().expect("packed above").buffers;
        let (keys, values) = (&keys[..lens[0]], &values[..lens[1]]);
        let group_ops = match self.packing {
            GroupPacking::Bf16 => Operands {
                bf16: Some(Bf16Source::Packed(keys, values)),
                ..*ops
            },
            GroupPacking::F32 { .. } => Operands {
                kt_packed: Some(keys),
                v_packed: Some(values),
                ..*ops
            },
        };
        let result = body(&group_ops);
        GROUP_PACKED.set(held);
        result
    }
}

/// The tasks of a call that packs K and V per `(b, g)` ([`packs_per_group`]): one per
/// `(b, g, row tile)`, as `attend_unsplit`'s, each reading the K and V of its `(b, g)` through
/// [`GroupPacker::with_group`]. The rows' arithmetic is that of `attend_unsplit`. Returns
/// whether a row came out non-finite from a finite softmax.
pub(super) fn attend_per_group(plan: &Plan, ops: &Operands<'_, '_>, dst: Dst, par: Par) -> bool {
    let packer = GroupPacker::new(plan, ops);
    let spoilt_rows = AtomicBool::new(false);
    let run = |scratch: &mut super::Scratch, task: usize| {
        let (bg, tile) = (task / plan.row_tiles, task % plan.row_tiles);
        let (b, g) = (bg / plan.g, bg % plan.g);
        packer.with_group(plan, ops, [b, g], |group_ops| {
            tile_into(scratch, plan, group_ops, [b, g, tile], &dst, &spoilt_rows)
        });
    };
    run_tasks(plan.b * plan.g * plan.row_tiles, par, plan, run);
    spoilt_rows.load(Ordering::Relaxed)
}

/// The K and V of one `(b, g)` packed by [`GroupPacker::with_group`] for call `call`, kept by
/// the thread for its next task (and, at most [`PER_GROUP_MAX_FLOATS`] values, between calls).
pub(super) struct GroupPacked {
    pub(super) call: u64,
    pub(super) bg: usize,
    pub(super) buffers: [Buffer; 2],
}

impl GroupPacked {
    /// Whether this is the packing of `(b, g)` number `bg` for call `call`.
    pub(super) fn holds(&self, call: u64, bg: usize) -> bool {
        self.call == call && self.bg == bg
    }
}

thread_local! {
    pub(super) static GROUP_PACKED: std::cell::Cell<Option<GroupPacked>> = const { std::cell::Cell::new(None) };
}
