//! Which 2 MiB chunks of the address space are hakmem segments.
//!
//! A bitmap with one bit per 2 MiB chunk of the 47-bit user address space
//! (8 MiB of virtual memory, mapped NORESERVE so only touched pages cost RSS).
//! `free` masks a pointer down to its chunk and tests one bit before it reads
//! any header, so a foreign pointer is detected instead of dereferenced.

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

pub const CHUNK_SHIFT: u32 = 21;
pub const CHUNK: usize = 1 << CHUNK_SHIFT;
const ADDR_BITS: u32 = 47;
const WORDS: usize = 1 << (ADDR_BITS - CHUNK_SHIFT - 6);

static BITS: AtomicPtr<AtomicU64> = AtomicPtr::new(core::ptr::null_mut());

/// Maps the bitmap; called once from `global::init`.
pub fn init() -> bool {
    if !BITS.load(Ordering::Acquire).is_null() {
        return true;
    }
    let bytes = WORDS * 8;
    // SAFETY: anonymous mapping, checked for failure; zero-filled by the kernel,
    // which is a valid all-false bitmap of AtomicU64.
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
    if BITS
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

#[inline]
fn word(addr: usize) -> Option<(&'static AtomicU64, u64)> {
    let idx = addr >> CHUNK_SHIFT;
    if idx >= WORDS * 64 {
        return None;
    }
    let base = BITS.load(Ordering::Acquire);
    if base.is_null() {
        return None;
    }
    // SAFETY: idx / 64 < WORDS, the bitmap's length; the mapping is never unmapped.
    let w = unsafe { &*base.add(idx >> 6) };
    Some((w, 1u64 << (idx & 63)))
}

/// Whether the chunk containing `addr` is a live hakmem segment.
#[inline]
pub fn contains(addr: usize) -> bool {
    match word(addr) {
        Some((w, bit)) => w.load(Ordering::Relaxed) & bit != 0,
        None => false,
    }
}

pub fn insert(chunk: usize) {
    if let Some((w, bit)) = word(chunk) {
        w.fetch_or(bit, Ordering::Release);
    }
}

pub fn remove(chunk: usize) {
    if let Some((w, bit)) = word(chunk) {
        w.fetch_and(!bit, Ordering::Release);
    }
}
