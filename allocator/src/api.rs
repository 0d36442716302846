//! The front: size -> class, and routing to tiny / ACE / large. These are the
//! C allocation semantics; `capi` exports them unprefixed, `HakMem` wraps them.

use crate::class::{tiny_class, ACE_MAX, TINY_MAX};
use crate::config;
use crate::segment::{self, SegKind};
use crate::stats::{write_fd, StackBuf};
use crate::superslab::{slab_of, SlabState};
use crate::{ace, large, tiny};
use core::fmt::Write;
use core::ptr::null_mut;

/// Largest alignment served (the large path keeps header and block in one chunk).
pub const MAX_ALIGN: usize = 1 << 20;
/// Alignment every malloc result has, except blocks of 8 bytes or less (8).
const MIN_ALIGN: usize = 16;

fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// `malloc`. Null with errno ENOMEM on failure.
///
/// # Safety
/// None beyond the C contract; unsafe because it hands out raw memory.
#[inline]
pub unsafe fn malloc(size: usize) -> *mut u8 {
    let p = if size <= TINY_MAX { tiny::alloc(tiny_class(size)) } else { alloc_above_tiny(size) };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

#[inline(never)]
fn alloc_above_tiny(size: usize) -> *mut u8 {
    if size <= ACE_MAX {
        let p = ace::alloc(size);
        if !p.is_null() {
            return p;
        }
    }
    large::alloc(size, MIN_ALIGN).0
}

/// `free`. Aborts (or logs, `HAKMEM_INVALID_FREE=ignore`) on a pointer hakmem
/// can tell it never handed out or already took back.
///
/// # Safety
/// `ptr` is null or a live block from this allocator.
#[inline]
pub unsafe fn free(ptr: *mut u8) {
    if ptr.is_null() {
        return;
    }
    let p = ptr as usize;
    let Some(h) = segment::lookup(p) else {
        return invalid_pointer("free(): invalid pointer", p);
    };
    match h.kind {
        SegKind::SuperSlab => {
            let (_, slab, _) = slab_of(p);
            // SAFETY: the registry vouched for the SuperSlab; the slab's
            // format fields do not change while any of its blocks is out.
            let s = unsafe { &*slab };
            if s.state != SlabState::InUse || p < s.area() || (p - s.area()) & (s.block_size as usize - 1) != 0 {
                return invalid_pointer("free(): invalid pointer", p);
            }
            // SAFETY: a block of an in-use slab, freed by its user.
            unsafe { tiny::free_superslab(ptr, slab) }
        }
        SegKind::Legacy => tiny::free_legacy(ptr, h.class as usize),
        SegKind::Ace => ace::free(ptr, h.class as usize),
        SegKind::Large => {
            let chunk = segment::chunk_of(p);
            if !large::is_live_block(p, chunk) {
                return invalid_pointer("free(): double free or invalid pointer", p);
            }
            large::free(chunk)
        }
    }
}

/// `malloc_usable_size` (0 for null or a pointer that is not ours).
pub fn usable_size(ptr: *const u8) -> usize {
    let p = ptr as usize;
    let Some(h) = segment::lookup(p) else { return 0 };
    match h.kind {
        SegKind::SuperSlab => {
            let (_, slab, _) = slab_of(p);
            // SAFETY: as in `free`.
            unsafe { (*slab).block_size as usize }
        }
        SegKind::Legacy => hakmem_common::TINY_CLASS_SIZES[h.class as usize],
        SegKind::Ace => ace::block_size(h.class as usize),
        SegKind::Large => large::usable_size(segment::chunk_of(p)),
    }
}

/// `calloc`: overflow-checked, zeroed.
///
/// # Safety
/// As `malloc`.
pub unsafe fn calloc(n: usize, size: usize) -> *mut u8 {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return null_mut();
    };
    if total > ACE_MAX {
        let (p, zeroed) = large::alloc(total, MIN_ALIGN);
        if p.is_null() {
            set_errno(libc::ENOMEM);
        } else if !zeroed {
            // SAFETY: `p` has at least `total` writable bytes.
            unsafe { core::ptr::write_bytes(p, 0, total) };
        }
        return p;
    }
    // SAFETY: forwarding.
    let p = unsafe { malloc(total) };
    if !p.is_null() {
        // SAFETY: `p` has at least `total` writable bytes.
        unsafe { core::ptr::write_bytes(p, 0, total) };
    }
    p
}

/// `realloc` with glibc's semantics: null ptr is malloc, size 0 frees and
/// returns null, failure returns null and leaves the block alone.
///
/// # Safety
/// `ptr` is null or a live block from this allocator.
pub unsafe fn realloc(ptr: *mut u8, size: usize) -> *mut u8 {
    // SAFETY: forwarding the caller's contract.
    unsafe { realloc_aligned(ptr, MIN_ALIGN, size) }
}

/// `realloc` keeping alignment `align`.
///
/// # Safety
/// As `realloc`; `ptr` was allocated with alignment `align`.
pub unsafe fn realloc_aligned(ptr: *mut u8, align: usize, size: usize) -> *mut u8 {
    if ptr.is_null() {
        // SAFETY: forwarding.
        return unsafe { alloc_aligned(align, size) };
    }
    if size == 0 {
        // SAFETY: forwarding the caller's contract.
        unsafe { free(ptr) };
        return null_mut();
    }
    let old = usable_size(ptr);
    if old == 0 {
        invalid_pointer("realloc(): invalid pointer", ptr as usize);
        set_errno(libc::EINVAL);
        return null_mut();
    }
    // Keep the block when the new size still fits and does not waste over half.
    if size <= old && size > old / 2 {
        return ptr;
    }
    // SAFETY: forwarding.
    let new = unsafe { alloc_aligned(align, size) };
    if new.is_null() {
        return null_mut();
    }
    // SAFETY: both blocks are live and distinct; copying the smaller size.
    unsafe {
        core::ptr::copy_nonoverlapping(ptr, new, old.min(size));
        free(ptr);
    }
    new
}

/// Allocation with alignment `align` (a power of two). Null with errno
/// ENOMEM if memory or the alignment cannot be had.
///
/// # Safety
/// As `malloc`.
#[inline]
pub unsafe fn alloc_aligned(align: usize, size: usize) -> *mut u8 {
    if align <= 8 || (align <= MIN_ALIGN && size > 8) {
        // SAFETY: forwarding.
        return unsafe { malloc(size) };
    }
    let need = size.max(align);
    // Power-of-two tiny blocks are aligned to their size; ACE blocks to 1 KiB.
    let p = if need <= TINY_MAX {
        tiny::alloc(tiny_class(need))
    } else if align <= 1024 && size <= ACE_MAX {
        let p = ace::alloc(size.max(TINY_MAX + 1));
        if p.is_null() { large::alloc(size, align).0 } else { p }
    } else if align <= MAX_ALIGN {
        large::alloc(size, align).0
    } else {
        null_mut()
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

/// `alloc_aligned`, zeroed.
///
/// # Safety
/// As `malloc`.
pub unsafe fn alloc_aligned_zeroed(align: usize, size: usize) -> *mut u8 {
    if align <= MIN_ALIGN && size > 8 {
        // SAFETY: forwarding.
        return unsafe { calloc(1, size) };
    }
    // SAFETY: forwarding.
    let p = unsafe { alloc_aligned(align, size) };
    if !p.is_null() {
        // SAFETY: `p` has at least `size` writable bytes.
        unsafe { core::ptr::write_bytes(p, 0, size) };
    }
    p
}

#[cold]
fn invalid_pointer(what: &str, ptr: usize) {
    let mut msg = StackBuf::<128>::new();
    let abort = config::get().invalid_free_abort;
    let _ = write!(msg, "hakmem: {what}: {ptr:#x}{}\n", if abort { "" } else { " (ignored)" });
    write_fd(2, msg.as_bytes());
    if abort {
        // SAFETY: abort has no preconditions; continuing would corrupt the heap.
        unsafe { libc::abort() };
    }
}
