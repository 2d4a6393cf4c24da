//! The `cellswarm` binary's global allocator.
//!
//! A node's large buffers are model-sized (32 MB at 8M parameters): the trained weights,
//! its delta envelope, the deltas it receives, the merged model. glibc's malloc serves
//! them from its heap once its adaptive mmap threshold has grown past them, where freed
//! model-sized holes are kept and fragment (the round benchmark's three nodes grew to
//! 0.85-1.05 GiB resident this way), and each fresh buffer otherwise costs 8,192 page
//! faults. Here every allocation of [`LARGE`] bytes or more is its own anonymous mapping,
//! returned to the system when freed, with transparent huge pages requested from [`HUGE`]
//! bytes on (512 times fewer page faults); smaller ones go to the system allocator
//! unchanged. The cost: blocks between 4 and 16 MiB that a workload frees and allocates
//! again (a U-Net's activations in training) are faulted in afresh each time instead of
//! reused from the heap; the demo's training measured about 6 % slower for it.
//!
//! The only `unsafe` code of the crate: four system calls behind the `GlobalAlloc`
//! contract, each with its safety argument. A large block that grows (a receive buffer)
//! is moved by `mremap`, without a copy.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations from this size on are mapped directly.
pub const LARGE: usize = 4 << 20;

/// Mapped blocks from this size on ask for transparent huge pages (smaller ones, such as
/// a U-Net's activations, would lose more to rounding than they gain).
pub const HUGE: usize = 16 << 20;

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct LargeMapped;

#[cfg(target_os = "linux")]
fn is_large(size: usize, align: usize) -> bool {
    // mmap returns page-aligned memory; larger alignments are left to the system.
    size >= LARGE && align <= 4096
}

#[cfg(not(target_os = "linux"))]
fn is_large(_size: usize, _align: usize) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping with no address hint has no preconditions; the
    // result is checked for MAP_FAILED before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    advise(p, size);
    p.cast()
}

/// Asks for transparent huge pages on a mapping of [`HUGE`] bytes or more.
#[cfg(target_os = "linux")]
fn advise(p: *mut libc::c_void, size: usize) {
    if size >= HUGE {
        // SAFETY: `p..p + size` is a mapping just made or moved by this allocator; the
        // advice only changes how it is backed (huge pages where the kernel allows),
        // never its contents. Failure is harmless.
        unsafe {
            libc::madvise(p, size, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn map(_size: usize) -> *mut u8 {
    std::ptr::null_mut()
}

#[cfg(target_os = "linux")]
fn unmap(ptr: *mut u8, size: usize) {
    // SAFETY: `ptr` was returned by `map(size)` for a layout of this size (GlobalAlloc
    // guarantees dealloc gets the layout it allocated with) and is not used after this.
    unsafe {
        libc::munmap(ptr.cast(), size);
    }
}

#[cfg(not(target_os = "linux"))]
fn unmap(_ptr: *mut u8, _size: usize) {}

#[cfg(target_os = "linux")]
fn remap(ptr: *mut u8, old: usize, new: usize) -> *mut u8 {
    // SAFETY: `ptr..ptr + old` is a mapping made by `map(old)` (the layout realloc was
    // given); MREMAP_MAYMOVE lets the kernel move it, and on failure the old mapping is
    // left intact (the caller keeps it, as realloc's contract says).
    let p = unsafe { libc::mremap(ptr.cast(), old, new, libc::MREMAP_MAYMOVE) };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    advise(p, new);
    p.cast()
}

#[cfg(not(target_os = "linux"))]
fn remap(_ptr: *mut u8, _old: usize, _new: usize) -> *mut u8 {
    std::ptr::null_mut()
}

// SAFETY: large blocks are fresh mappings of at least the requested size, page-aligned
// (so aligned for any `align <= 4096`), zero-filled by the kernel, and unmapped only by
// `dealloc` with the layout they were made for; everything else is `System`'s.
unsafe impl GlobalAlloc for LargeMapped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            // Anonymous mappings are zero-filled.
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(layout.size(), layout.align()) {
            unmap(ptr, layout.size());
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_large, new_large) = (
            is_large(layout.size(), layout.align()),
            is_large(new_size, layout.align()),
        );
        if !old_large && !new_large {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if old_large && new_large {
            // A growing receive buffer: the kernel moves the pages, nothing is copied and
            // the old and new sizes are never resident together.
            return remap(ptr, layout.size(), new_size);
        }
        // SAFETY: `new_size` with the old alignment is a valid layout (the caller's
        // guarantee for realloc).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a non-zero-size layout (at least one side is LARGE).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap (the
            // new one is a fresh allocation); the old one is freed with its own layout.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_and_small_blocks_round_trip() {
        let a = LargeMapped;
        for size in [16, 4096, LARGE - 1, LARGE, 3 * LARGE + 5] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: non-zero layout; the block is written within its size and freed
            // with the same layout.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert_eq!(*p.add(size - 1), 0);
                *p.add(size - 1) = 7;
                let q = a.realloc(p, layout, size * 2);
                assert!(!q.is_null());
                assert_eq!(*q.add(size - 1), 7);
                a.dealloc(q, Layout::from_size_align(size * 2, 8).unwrap());
            }
        }
    }
}
