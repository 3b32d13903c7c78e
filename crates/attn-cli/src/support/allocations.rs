//! Counting the large allocations: the binary's allocator is [`Counting`] around mimalloc, so a
//! benchmark can say how many buffers of [`LARGE`] bytes or more a training step asks for, and
//! how many bytes (`attn bench train`). Counting costs one comparison per allocation and one
//! relaxed atomic add per large one. In tests (no global allocator set) the counts stay zero.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};

/// An allocation of this many bytes or more counts as large (64 KiB: a 128 × 128 f32 tile).
pub const LARGE: usize = 64 << 10;

static COUNT: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// `A`, counting its large allocations and reallocations.
pub struct Counting<A>(pub A);

impl<A> Counting<A> {
    fn note(size: usize) {
        if size >= LARGE {
            COUNT.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(size as u64, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded to `A` unchanged; counting touches only two atomics.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            Self::note(new_size);
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Large allocations so far and their bytes.
pub fn large() -> (u64, u64) {
    (COUNT.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed))
}

/// The process's resident memory in bytes (`/proc/self/statm`), if the system says.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
