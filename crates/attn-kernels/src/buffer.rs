//! 64-byte-aligned f32 buffers, kept per thread and reused across calls.
//!
//! The attention kernels pack K and V once per call and give each worker a scratch tile. Before,
//! every call allocated and zero-filled these (a few MiB for a 2048-token call, tens of MiB for
//! long ones), and the allocator's 16-byte alignment let a cache line straddle two vectors.
//! [`Buffer`] starts on a cache line; [`take`] hands out a buffer from this thread's pool with
//! whatever it held before (callers write every element they read), and [`give`] returns it.
//! A thread keeps at most [`POOL_BUFFERS`] buffers of at most [`RETAIN_FLOATS`] floats each, so
//! the memory kept between calls is bounded (2 × 32 MiB per thread).

use std::cell::RefCell;

/// Buffers a thread keeps between calls.
const POOL_BUFFERS: usize = 2;
/// The largest buffer a thread keeps between calls (32 MiB of f32).
const RETAIN_FLOATS: usize = 8 << 20;
/// Floats per 64-byte cache line.
const LINE_FLOATS: usize = 16;

/// A run of f32 starting on a 64-byte boundary.
pub(crate) struct Buffer {
    raw: Vec<f32>,
    start: usize,
    len: usize,
}

impl Buffer {
    /// `len` zeros, aligned.
    pub(crate) fn zeroed(len: usize) -> Self {
        let raw = vec![0.0f32; len + LINE_FLOATS - 1];
        let misalign = (raw.as_ptr() as usize / std::mem::size_of::<f32>()) % LINE_FLOATS;
        let start = (LINE_FLOATS - misalign) % LINE_FLOATS;
        Buffer { raw, start, len }
    }

    /// How many floats this buffer can hold without reallocating.
    fn room(&self) -> usize {
        self.raw.len() - self.start
    }
}

impl std::ops::Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

thread_local! {
    static POOL: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` floats: the smallest of this thread's pool that fits, or a new zeroed
/// one. Its contents are whatever an earlier call left (NaNs in this crate's tests).
pub(crate) fn take(len: usize) -> Buffer {
    let reused = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let best = (0..pool.len())
            .filter(|&i| pool[i].room() >= len)
            .min_by_key(|&i| pool[i].room())?;
        Some(pool.swap_remove(best))
    });
    let mut buffer = match reused {
        Some(mut buffer) => {
            buffer.len = len;
            buffer
        }
        None => Buffer::zeroed(len),
    };
    // The tests hand out NaNs, so that a caller reading an element it did not write fails them
    // whatever an earlier call left (zeros, or the same call's values).
    if cfg!(test) {
        buffer.fill(f32::NAN);
    }
    buffer
}

/// Returns `buffer` to this thread's pool (or frees it, when it is too large to keep or the
/// pool is full of larger ones).
pub(crate) fn give(buffer: Buffer) {
    // The room beyond the aligned start is the request plus at most a line of slack: a buffer
    // of exactly `RETAIN_FLOATS` is kept (packed K or V of a `[1, 16, 4096, 128]` call, whose
    // 64 MiB were faulted in and zeroed by the kernel again on every call when this compared
    // the room alone).
    if buffer.room() > RETAIN_FLOATS + LINE_FLOATS - 1 {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.push(buffer);
        if pool.len() > POOL_BUFFERS {
            // Keep the largest ones: they serve every smaller call too.
            let smallest = (0..pool.len()).min_by_key(|&i| pool[i].room()).unwrap_or(0);
            pool.swap_remove(smallest);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        for len in [0, 1, 15, 16, 17, 1000, 4096] {
            let b = Buffer::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % 64, 0, "len {len}");
            assert!(b.iter().all(|&x| x == 0.0));
        }
        let mut b = take(1000);
        b.fill(7.0);
        let ptr = b.as_ptr();
        give(b);
        // A smaller request gets the same memory back, filled with NaN in the tests (outside
        // them, with what was left in it).
        let b = take(600);
        assert_eq!((b.as_ptr(), b.len()), (ptr, 600));
        assert!(b.iter().all(|x| x.is_nan()));
        give(b);
        // A larger one gets a new buffer (NaN in the tests too).
        let big = take(5000);
        assert!(big.as_ptr() != ptr && big.iter().all(|x| x.is_nan()));
        assert_eq!(big.as_ptr() as usize % 64, 0);
        // Too large to keep: freed on return, not pooled.
        let huge = take(RETAIN_FLOATS + LINE_FLOATS);
        give(huge);
        POOL.with(|pool| assert!(pool.borrow().iter().all(|b| b.room() < RETAIN_FLOATS + LINE_FLOATS)));
        // Exactly the limit: kept (whatever slack its alignment took).
        give(take(RETAIN_FLOATS));
        POOL.with(|pool| {
            assert!(
                pool.borrow().iter().any(|b| b.room() >= RETAIN_FLOATS),
                "a buffer of RETAIN_FLOATS was not kept"
            )
        });
    }
}
