//! Which 2 MiB chunks of the address space are hakmem segments, and of which kind.
//!
//! One byte per 2 MiB chunk of the 47-bit user address space: 0 for "not
//! ours", else the segment's `SegKind`. That is 64 MiB of virtual memory,
//! mapped NORESERVE: only the pages covering chunks hakmem uses are ever
//! touched (one 4 KiB page covers 8 GiB of address space). `free` reads one
//! byte before it reads any header, so a foreign pointer is detected instead
//! of dereferenced, and the byte already says which path frees the block.

use core::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

pub const CHUNK_SHIFT: u32 = 21;
pub const CHUNK: usize = 1 << CHUNK_SHIFT;
const ADDR_BITS: u32 = 47;
const ENTRIES: usize = 1 << (ADDR_BITS - CHUNK_SHIFT);

static KINDS: AtomicPtr<AtomicU8> = AtomicPtr::new(core::ptr::null_mut());

/// Maps the bitmap; called once from `global::init`.
pub fn init() -> bool {
    if !KINDS.load(Ordering::Acquire).is_null() {
        return true;
    }
    let bytes = ENTRIES;
    // SAFETY: anonymous mapping, checked for failure; zero-filled by the kernel,
    // which is a valid table of AtomicU8 saying "not ours" everywhere.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    if KINDS
        .compare_exchange(
            core::ptr::null_mut(),
            p.cast(),
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        // SAFETY: we lost the race; our mapping was never published.
        unsafe { libc::munmap(p, bytes) };
    }
    true
}

#[inline(always)]
fn entry(addr: usize) -> Option<&'static AtomicU8> {
    let idx = addr >> CHUNK_SHIFT;
    if idx >= ENTRIES {
        return None;
    }
    let base = KINDS.load(Ordering::Acquire);
    if base.is_null() {
        return None;
    }
    // SAFETY: idx < ENTRIES, the table's length; the mapping is never unmapped.
    Some(unsafe { &*base.add(idx) })
}

/// The kind (`SegKind as u8`) of the live hakmem segment holding `addr`, or 0.
#[inline(always)]
pub fn kind(addr: usize) -> u8 {
    match entry(addr) {
        Some(e) => e.load(Ordering::Relaxed),
        None => 0,
    }
}

/// Records the chunk at `chunk` as a segment of `kind` (non-zero), after its header is written.
pub fn insert(chunk: usize, kind: u8) {
    debug_assert!(kind != 0);
    if let Some(e) = entry(chunk) {
        e.store(kind, Ordering::Release);
    }
}

/// Forgets the chunk at `chunk`, before it is unmapped.
pub fn remove(chunk: usize) {
    if let Some(e) = entry(chunk) {
        e.store(0, Ordering::Release);
    }
}
