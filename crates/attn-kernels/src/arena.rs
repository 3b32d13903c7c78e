//! The activation arena: the `Vec<f32>` buffers of a training step (activations, the tapes that
//! keep them, the backward's temporaries), handed back when the step is done and handed out
//! again by the next, so a steady-state step asks the allocator for nothing large.
//!
//! One pool per thread (a training step runs its layers on one thread; the kernels' workers
//! use the kernel crate's own buffer pools). [`zeroed`] and [`copied`] hand out the smallest
//! kept buffer that fits, or a new one: the arena is sized by the first step and grows when a
//! batch needs more. Inference does not give its buffers here: the allocator hands a freed block
//! back cache-warm, which the arena's best fit does not. [`give`] keeps buffers of at least [`KEEP_FLOATS`] floats, up to [`MAX_BUFFERS`]
//! buffers and [`MAX_FLOATS`] floats in all (the largest kept); [`clear`] frees them.

use std::cell::RefCell;

/// Buffers smaller than this (64 KiB) go back to the allocator: keeping them saves nothing.
pub const KEEP_FLOATS: usize = 16 << 10;
/// Buffers kept per thread.
pub const MAX_BUFFERS: usize = 1024;
/// Floats kept per thread (4 GiB).
pub const MAX_FLOATS: usize = 1 << 30;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A kept buffer whose capacity holds `len`, with the values its last use left: the smallest
/// (by capacity, in steps of `len`'s class, so that a large buffer is not spent on a small
/// request); among buffers of the same step, for [`overwritten`] (`keep_values`), the one whose
/// last use reached furthest towards `len`, which leaves the least to fill with zeros.
fn take(len: usize, keep_values: bool) -> Option<Vec<f32>> {
    if len < KEEP_FLOATS {
        return None;
    }
    let step = (len.next_power_of_two() / 8).max(1);
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        let to_fill = |v: &Vec<f32>| if keep_values { len.saturating_sub(v.len()) } else { 0 };
        let best = (0..free.len())
            .filter(|&i| free[i].capacity() >= len)
            .min_by_key(|&i| (free[i].capacity().div_ceil(step), to_fill(&free[i]), free[i].capacity()))?;
        Some(free.swap_remove(best))
    })
}

/// The capacity a new buffer of `len` floats gets: `len` rounded up to an eighth of its power
/// of two (at most 12.5% more), so a buffer made for one batch fits the next batch's slightly
/// longer one instead of the arena keeping one buffer per length.
fn class(len: usize) -> usize {
    if len < KEEP_FLOATS {
        return len;
    }
    let step = (len.next_power_of_two() / 8).max(1);
    len.div_ceil(step) * step
}

/// A buffer for `len` floats: kept (holding what its last use left), or new and empty with its
/// class's capacity.
fn reuse(len: usize, keep_values: bool) -> Vec<f32> {
    take(len, keep_values).unwrap_or_else(|| Vec::with_capacity(class(len)))
}

/// `len` zeros, in a kept buffer when one fits.
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = reuse(len, false);
    v.clear();
    v.resize(len, 0.0);
    v
}

/// `len` floats whose values are unspecified (those a kept buffer's last use left, zeros past
/// them), for a caller that writes every element before it reads any: it saves [`zeroed`]'s
/// pass over the buffer.
pub fn overwritten(len: usize) -> Vec<f32> {
    let mut v = reuse(len, true);
    v.resize(len, 0.0);
    v
}

/// A copy of `src`, in a kept buffer when one fits.
pub fn copied(src: &[f32]) -> Vec<f32> {
    let mut v = reuse(src.len(), false);
    v.clear();
    v.extend_from_slice(src);
    v
}

/// Hands `v` back for a later [`zeroed`] or [`copied`] on this thread.
pub fn give(v: Vec<f32>) {
    if v.capacity() < KEEP_FLOATS {
        return;
    }
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        free.push(v);
        let mut total: usize = free.iter().map(Vec::capacity).sum();
        while free.len() > MAX_BUFFERS || total > MAX_FLOATS {
            // Keep the largest: they serve every smaller request too.
            let smallest = (0..free.len()).min_by_key(|&i| free[i].capacity()).unwrap_or(0);
            total -= free.swap_remove(smallest).capacity();
        }
    });
}

/// Fills every kept buffer of this thread with NaN, to its capacity: tests use it to show that
/// no result depends on what a buffer's last use left in it ([`overwritten`]).
pub fn poison() {
    FREE.with(|free| {
        for v in free.borrow_mut().iter_mut() {
            v.clear();
            v.resize(v.capacity(), f32::NAN);
        }
    });
}

/// Frees every kept buffer of this thread.
pub fn clear() {
    FREE.with(|free| free.borrow_mut().clear());
}

/// Floats kept on this thread.
pub fn kept_floats() -> usize {
    FREE.with(|free| free.borrow().iter().map(Vec::capacity).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed_or_copied_and_small_ones_are_not_kept() {
        clear();
        let mut a = zeroed(KEEP_FLOATS * 2);
        a.iter_mut().for_each(|x| *x = 7.0);
        let address = a.as_ptr();
        give(a);
        assert_eq!(kept_floats(), KEEP_FLOATS * 2);
        // The best fit is reused, zeroed, at its new length.
        let b = zeroed(KEEP_FLOATS + 1);
        assert_eq!(b.as_ptr(), address);
        assert_eq!(b.len(), KEEP_FLOATS + 1);
        assert!(b.iter().all(|&x| x == 0.0));
        give(b);
        let src: Vec<f32> = (0..KEEP_FLOATS).map(|i| i as f32).collect();
        let c = copied(&src);
        assert_eq!(c.as_ptr(), address);
        assert_eq!(c, src);
        // Too large for anything kept: a new buffer, its capacity rounded up to its class.
        let d = zeroed(KEEP_FLOATS * 3 + 1);
        assert_ne!(d.as_ptr(), address);
        assert_eq!(d.capacity(), KEEP_FLOATS * 3 + KEEP_FLOATS / 2);
        // Below the floor: the exact capacity (not a class's), and not kept.
        let small = zeroed(KEEP_FLOATS - 3);
        assert_eq!(small.capacity(), KEEP_FLOATS - 3);
        give(small);
        give(vec![1.0; 10]);
        assert_eq!(kept_floats(), 0);
        give(c);
        give(d);
        assert_eq!(kept_floats(), KEEP_FLOATS * 2 + KEEP_FLOATS * 7 / 2);
        clear();
        assert_eq!(kept_floats(), 0);
    }

    /// A buffer of exactly the floor is kept; past `MAX_BUFFERS` the smallest go (capacity
    /// only: nothing here touches the memory).
    #[test]
    fn the_pool_keeps_what_its_limits_allow() {
        clear();
        give(Vec::with_capacity(KEEP_FLOATS));
        assert_eq!(kept_floats(), KEEP_FLOATS);
        give(Vec::with_capacity(KEEP_FLOATS + 1));
        for _ in 0..MAX_BUFFERS {
            give(Vec::with_capacity(KEEP_FLOATS));
        }
        assert_eq!(kept_floats(), (MAX_BUFFERS - 1) * KEEP_FLOATS + KEEP_FLOATS + 1);
        // Past `MAX_FLOATS` (4 GiB of capacity, never touched) the smallest go, as many as it
        // takes; exactly at it, none.
        clear();
        let quarter = MAX_FLOATS / 4;
        for _ in 0..4 {
            give(Vec::with_capacity(quarter));
        }
        assert_eq!(kept_floats(), MAX_FLOATS);
        give(Vec::with_capacity(quarter + 8));
        assert_eq!(kept_floats(), 2 * quarter + quarter + 8);
        give(Vec::with_capacity(MAX_FLOATS - quarter / 2));
        assert_eq!(kept_floats(), MAX_FLOATS - quarter / 2);
        clear();
        // `poison` fills every kept buffer with NaN to its capacity.
        give(vec![1.0; KEEP_FLOATS + 5]);
        poison();
        let v = overwritten(KEEP_FLOATS + 5);
        assert!(v.iter().all(|x| x.is_nan()));
        clear();
    }

    /// `overwritten` takes, among the kept buffers that fit in the same step of capacity (an
    /// eighth of the length's power of two), one whose last use already reached the length
    /// asked for, so nothing is filled, over a smaller one that needs filling; `zeroed` takes
    /// the smallest that fits; neither spends a buffer of a larger step.
    #[test]
    fn overwritten_prefers_a_buffer_it_need_not_fill() {
        // 33,768 floats: steps of 8,192, so capacities from 32,769 to 40,960 are one step.
        let len = KEEP_FLOATS * 2 + 1000;
        let kept = |capacity: usize, filled: usize, value: f32| {
            let mut v = Vec::with_capacity(capacity);
            v.resize(filled, value);
            assert_eq!(v.capacity(), capacity);
            give(v);
        };
        // The same step: the full one, though larger, is not filled.
        clear();
        kept(35_000, KEEP_FLOATS, 1.0);
        kept(40_000, 40_000, 7.0);
        let v = overwritten(len);
        assert_eq!((v.capacity(), v.len()), (40_000, len));
        assert!(v.iter().all(|&x| x == 7.0), "the last use's values, untouched");
        // `zeroed` fills anyway: the smallest.
        give(v);
        let z = zeroed(len);
        assert_eq!(z.capacity(), 35_000);
        assert!(z.iter().all(|&x| x == 0.0));
        // A full buffer of twice the length is not spent while one of the step needs filling.
        clear();
        kept(2 * len, 2 * len, 3.0);
        kept(35_000, KEEP_FLOATS, 1.0);
        let w = overwritten(len);
        assert_eq!(w.capacity(), 35_000);
        assert!(w[..KEEP_FLOATS].iter().all(|&x| x == 1.0) && w[KEEP_FLOATS..].iter().all(|&x| x == 0.0));
        // With nothing else, the larger step serves.
        let big = overwritten(len);
        assert_eq!(big.capacity(), 2 * len);
        clear();
    }
}
