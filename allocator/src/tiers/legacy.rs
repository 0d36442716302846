//! The legacy path: a plain per-class slab allocator that needs no SuperSlab.
//! It serves tiny requests when the shared pool gives up (`shared_fail`), a
//! thread's allocations while it is not registered (beyond hakctl's thread
//! list, with no exit hook, or after it: it owns no slab, see
//! `TinyCache::may_own_slabs`), and all of them under
//! `HAKMEM_TINY_USE_SUPERSLAB=0`. One locked free list per
//! class, filled by bump-carving dedicated 2 MiB segments that are never
//! returned; batches move to and from the thread caches, so the lock is taken
//! once per batch, not per block.

use crate::class::{class_of_bin, BINS, BIN_SIZES};
use crate::os;
use crate::probes;
use crate::registry::{self, CHUNK};
use crate::segment::{SegHeader, SegKind};
use crate::superslab::Block;
use crate::sync::SpinLock;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU64, Ordering};

/// Header area at the start of each legacy segment (keeps blocks 4 KiB-aligned).
const HEADER_RESERVE: usize = 4096;

struct LegacyClass {
    free: *mut Block,
    /// Next uncarved byte and end of the current segment.
    bump: usize,
    end: usize,
}

// SAFETY: the raw pointers are only touched under the class lock.
unsafe impl Send for LegacyClass {}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: SpinLock<LegacyClass> = SpinLock::new(LegacyClass {
    free: null_mut(),
    bump: 0,
    end: 0,
});
static CLASSES: [SpinLock<LegacyClass>; BINS] = [EMPTY; BINS];

/// Per bin, blocks out of the legacy lists (in thread caches or with the
/// program): a gauge hakctl reads (`front::levels`). Batches only.
#[allow(clippy::declare_interior_mutable_const)]
const NONE_OUT: AtomicU64 = AtomicU64::new(0);
pub static OUT: [AtomicU64; BINS] = [NONE_OUT; BINS];

/// Whether `p`, a pointer into a legacy segment of `bin`, is where one of
/// its blocks starts (not in the header, not inside a block).
#[inline]
pub fn is_block_start(p: usize, bin: usize) -> bool {
    // Wraps (and fails) in the header; the block must end in the segment.
    let off = (p & (CHUNK - 1)).wrapping_sub(HEADER_RESERVE);
    off <= CHUNK - HEADER_RESERVE - BIN_SIZES[bin]
        && crate::class::is_multiple_of_bin(off as u32, bin)
}

/// Moves up to `want` blocks of `bin` onto `*head`; returns how many (0: out of memory).
pub fn refill(bin: usize, want: u32, head: &mut *mut Block) -> u32 {
    let bs = BIN_SIZES[bin];
    let mut n = 0;
    {
        let mut c = CLASSES[bin].lock();
        while n < want {
            let b = if !c.free.is_null() {
                let b = c.free;
                // SAFETY: blocks on the legacy free list are free and ours.
                c.free = unsafe { Block::next(b) };
                b
            } else {
                if c.bump + bs > c.end && !c.grow(bin) {
                    break;
                }
                let b = c.bump as *mut Block;
                c.bump += bs;
                b
            };
            // SAFETY: `b` is a free block we just took; link it onto the caller's list.
            unsafe { Block::set_next(b, *head) };
            *head = b;
            n += 1;
        }
    }
    if n > 0 {
        OUT[bin].fetch_add(n as u64, Ordering::Relaxed);
        probes::legacy_refill(class_of_bin(bin), n);
    }
    n
}

/// Returns a chain of `n` blocks of `bin` (`head` .. `tail`, linked) to the free list.
///
/// # Safety
/// The chain consists of `n` free legacy blocks of `bin`, linked through `next`.
pub unsafe fn give_back(bin: usize, head: *mut Block, tail: *mut Block, n: u32) {
    OUT[bin].fetch_sub(n as u64, Ordering::Relaxed);
    let mut c = CLASSES[bin].lock();
    // SAFETY: per the contract `tail` is the chain's last block.
    unsafe { Block::set_next(tail, c.free) };
    c.free = head;
}

pub fn lock_for_fork() {
    CLASSES.iter().for_each(|c| c.acquire_for_fork());
}

pub fn unlock_after_fork() {
    CLASSES.iter().for_each(|c| c.release_after_fork());
}

impl LegacyClass {
    fn grow(&mut self, bin: usize) -> bool {
        let base = os::map_chunk();
        if base.is_null() {
            return false;
        }
        // SAFETY: a fresh, writable, chunk-aligned mapping of ours.
        unsafe { (base as *mut SegHeader).write(SegHeader::new(SegKind::Legacy, bin as u32)) };
        registry::insert(base as usize, SegKind::Legacy as u8);
        self.bump = base as usize + HEADER_RESERVE;
        self.end = base as usize + CHUNK;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::tiny_bin;

    fn chain(mut head: *mut Block) -> Vec<*mut Block> {
        let mut v = Vec::new();
        while !head.is_null() {
            v.push(head);
            // SAFETY: a chain `refill` built, linked through the first word.
            head = unsafe { Block::next(head) };
        }
        v
    }

    #[test]
    fn refills_carve_block_starts_and_blocks_given_back_come_out_again() {
        let bin = tiny_bin(200);
        let mut head = null_mut();
        assert_eq!(refill(bin, 50, &mut head), 50);
        let blocks = chain(head);
        assert_eq!(blocks.len(), 50);
        for &b in &blocks {
            let p = b as usize;
            assert!(is_block_start(p, bin), "{p:#x}");
            assert!(!is_block_start(p + 16, bin), "inside a block: {p:#x}");
            assert_eq!(registry::kind(p), SegKind::Legacy as u8);
        }
        assert!(
            !is_block_start(blocks[0] as usize & !(CHUNK - 1), bin),
            "the header"
        );
        // Back as one chain: the next refill of the bin takes them first
        // (other tests may refill the bin at the same time: at least some).
        let (first, last) = (blocks[0], blocks[49]);
        // SAFETY: the chain is the 50 free blocks just refilled, in order.
        unsafe { give_back(bin, first, last, 50) };
        let mut again = null_mut();
        assert_eq!(refill(bin, 50, &mut again), 50);
        let again = chain(again);
        assert!(again.iter().any(|b| blocks.contains(b)));
        let (first, last) = (again[0], again[49]);
        // SAFETY: as above.
        unsafe { give_back(bin, first, last, 50) };
    }
}
