//! The Rust `GlobalAlloc` front.

use super::api;
use core::alloc::{GlobalAlloc, Layout};

/// hakmem as a Rust global allocator:
///
/// ```text
/// #[global_allocator]
/// static GLOBAL: hakmem::HakMem = hakmem::HakMem;
/// ```
pub struct HakMem;

// SAFETY: every method forwards to the C-level entry points, which return
// blocks of at least the requested size and alignment (or null) and accept
// exactly the pointers they returned.
unsafe impl GlobalAlloc for HakMem {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding; the alignment is a power of two by Layout's invariant.
        unsafe { api::alloc_aligned(layout.align(), layout.size()) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned.
        unsafe { api::free(ptr) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding, as in `alloc`.
        unsafe { api::alloc_aligned_zeroed(layout.align(), layout.size()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is ours with `layout`; forwarding keeps its alignment.
        unsafe { api::realloc_aligned(ptr, layout.align(), new_size) }
    }
}
