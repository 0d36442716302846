//! Parcels: buffers that `realloc` grows past 32 KiB (`api::GROW_IN_CHUNK`),
//! eight to a 2 MiB chunk.
//!
//! Such a buffer used to get a whole chunk, where it grew in place. But the
//! kernel gives every 2 MiB of address space in use its own page-table page
//! (4 KiB), so 10,000 buffers of 40 KB held 40 MB of page tables that no RSS
//! figure shows (glibc, packing them in its heap, about 1.6 MB). A parcel is
//! the eighth of a chunk, 256 KiB (the first loses 128 bytes to the
//! chunk's header), so a buffer still grows in place up to there, and only one
//! grown further moves again (to a large block, which grows in its chunk and
//! then by mremap).
//!
//! The chunk's header (128 bytes) sits in front of the first parcel's block;
//! the others start on their parcel's boundary, so a buffer's pages are its
//! own (but the first's, shared with the header), as they were in a chunk. A
//! chunk whose parcels are all free goes to the chunk cache at once, which
//! returns it to the OS by its policy.

use crate::os::PAGE;
use crate::registry::{self, CHUNK};
use crate::segment::{chunk_of, SegHeader, SegKind};
use crate::sync::SpinLock;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU8, Ordering};
use hakmem_common::CacheUser;

const PARCEL: usize = 256 << 10;
pub const PARCELS: usize = CHUNK / PARCEL;
const FULL: u8 = u8::MAX;
const _: () = assert!(PARCELS == 8);
/// The chunk's header, in front of the first parcel's block.
const HEADER: usize = 128;
/// Largest block a parcel holds: every parcel can (the first is a header short).
pub const MAX: usize = PARCEL - HEADER;
/// Every parcel's block is aligned to this: the first starts `HEADER` into a
/// chunk-aligned chunk, the others on their parcel's boundary.
pub const ALIGN: usize = HEADER;
const _: () = assert!(HEADER.is_power_of_two() && PARCEL.is_multiple_of(HEADER));

/// The chunk's first bytes. Threads using different parcels of a chunk share
/// it, so every field that changes is atomic (Relaxed: the mask and the list
/// change under `STATE`'s lock, a parcel's sizes only by its block's user).
#[repr(C)]
struct Parcels {
    hdr: SegHeader,
    /// Bit i: parcel i holds a live block.
    live: AtomicU8,
    /// Bytes the user of parcel i may use (page-rounded request).
    usable: [AtomicU32; PARCELS],
    /// Bytes from parcel i's start that any of its users could have touched.
    extent: [AtomicU32; PARCELS],
    /// Chunks with a free parcel (`STATE`'s list).
    next: AtomicPtr<Parcels>,
    prev: AtomicPtr<Parcels>,
}

/// Where a parcel chunk keeps its live mask (u8) and its parcels' usable
/// bytes (u32 each): what hakctl reads (`front::levels`).
pub const LIVE_AT: usize = core::mem::offset_of!(Parcels, live);
pub const USABLE_AT: usize = core::mem::offset_of!(Parcels, usable);

/// The header of the parcel chunk at `chunk`.
fn header(chunk: usize) -> &'static Parcels {
    // SAFETY: callers pass chunks the registry (or the list) vouched are live
    // parcel chunks, whose first page is a `Parcels`, written before either.
    unsafe { &*(chunk as *const Parcels) }
}

const _: () = assert!(core::mem::size_of::<Parcels>() <= HEADER);

struct State {
    /// Chunks with at least one free parcel, doubly linked.
    partial: *mut Parcels,
}

// SAFETY: the list's pointers are only followed under the lock.
unsafe impl Send for State {}

static STATE: SpinLock<State> = SpinLock::new(State {
    partial: null_mut(),
});

/// Where parcel `i` of the chunk at `chunk` starts.
fn start(chunk: usize, i: usize) -> usize {
    chunk + if i == 0 { HEADER } else { i * PARCEL }
}

/// Bytes a block of `size` in parcel `i` may use: up to the end of its last
/// page (at most the parcel's capacity).
fn usable_for(i: usize, size: usize) -> usize {
    let off = start(0, i);
    (off + size).next_multiple_of(PAGE).min(off + capacity(i)) - off
}

/// Bytes parcel `i` can hold.
fn capacity(i: usize) -> usize {
    if i == 0 {
        PARCEL - HEADER
    } else {
        PARCEL
    }
}

/// A block of `size` bytes (`size <= MAX`), and how many of its first bytes
/// may already be resident (an earlier user touched them): the caller about
/// to write its first bytes may populate the rest. Null if the OS refused.
pub fn alloc(size: usize) -> (*mut u8, usize) {
    debug_assert!(size <= MAX);
    loop {
        {
            let mut st = STATE.lock();
            let c = st.partial;
            if !c.is_null() {
                let h = header(c as usize);
                let live = h.live.load(Ordering::Relaxed);
                let i = (!live).trailing_zeros() as usize;
                h.live.store(live | 1 << i, Ordering::Relaxed);
                if live | 1 << i == FULL {
                    st.unlink(c);
                }
                let usable = usable_for(i, size) as u32;
                h.usable[i].store(usable, Ordering::Relaxed);
                let touched = h.extent[i].fetch_max(usable, Ordering::Relaxed);
                return (start(c as usize, i) as *mut u8, touched as usize);
            }
        }
        // No free parcel: a new chunk (outside the lock: a syscall, or the
        // chunk cache's lock). Two threads may both add one; both get used.
        let (chunk, cached) = crate::chunks::take_chunk(CacheUser::Parcel);
        if chunk.is_null() {
            return (null_mut(), 0);
        }
        let c = chunk as *mut Parcels;
        // What a cached chunk's earlier users touched is not known: all of it.
        let extent = if cached { PARCEL as u32 } else { 0 };
        // SAFETY: the chunk is ours alone and writable; its first HEADER
        // bytes are the header's.
        unsafe {
            c.write(Parcels {
                hdr: SegHeader::new(SegKind::Parcel, 0),
                live: AtomicU8::new(0),
                usable: [const { AtomicU32::new(0) }; PARCELS],
                extent: core::array::from_fn(|_| AtomicU32::new(extent)),
                next: AtomicPtr::new(null_mut()),
                prev: AtomicPtr::new(null_mut()),
            })
        };
        registry::insert(chunk as usize, SegKind::Parcel as u8);
        STATE.lock().push(c);
    }
}

/// The parcel index of the live block at `ptr` in the parcel chunk at
/// `chunk` (which the registry says is one: callers come through `api`'s
/// lookup), if `ptr` is one (else a wrong or stale pointer).
fn block_at(ptr: usize, chunk: usize) -> Option<usize> {
    let i = (ptr - chunk) / PARCEL;
    let live = header(chunk).live.load(Ordering::Relaxed);
    (ptr == start(chunk, i) && live & 1 << i != 0).then_some(i)
}

/// Usable bytes of the block at `ptr`; None if it is not a live block
/// (`realloc` then refuses it: as 0 bytes, a freed parcel's realloc took
/// that parcel again, freed it, and returned it).
pub fn usable_size(ptr: usize) -> Option<usize> {
    let chunk = chunk_of(ptr);
    block_at(ptr, chunk).map(|i| header(chunk).usable[i].load(Ordering::Relaxed) as usize)
}

/// Makes the live block at `ptr` hold `size` bytes without moving it: true
/// if its parcel has the room.
pub fn resize_in_place(ptr: usize, size: usize) -> bool {
    let chunk = chunk_of(ptr);
    let Some(i) = block_at(ptr, chunk) else {
        return false;
    };
    if size > capacity(i) {
        return false;
    }
    let usable = usable_for(i, size) as u32;
    let h = header(chunk);
    h.usable[i].store(usable, Ordering::Relaxed);
    h.extent[i].fetch_max(usable, Ordering::Relaxed);
    true
}

/// Frees the block at `ptr`; false if it is not a live block (the caller
/// reports the misuse).
pub fn free(ptr: usize) -> bool {
    let chunk = chunk_of(ptr);
    let Some(i) = block_at(ptr, chunk) else {
        return false;
    };
    let c = chunk as *mut Parcels;
    let h = header(chunk);
    let empty = {
        let mut st = STATE.lock();
        let live = h.live.load(Ordering::Relaxed);
        if live & 1 << i == 0 {
            // Freed by another thread since `block_at` looked.
            return false;
        }
        h.usable[i].store(0, Ordering::Relaxed);
        h.live.store(live & !(1 << i), Ordering::Relaxed);
        if live == FULL {
            st.push(c);
        }
        let empty = live == 1 << i;
        if empty {
            st.unlink(c);
        }
        empty
    };
    if empty {
        // No parcel of the chunk is live and it is on no list: nothing
        // refers to it. It may hold what its parcels' users touched.
        let extent = (0..PARCELS)
            .map(|i| (i, h.extent[i].load(Ordering::Relaxed) as usize))
            .filter(|&(_, e)| e > 0)
            .map(|(i, e)| start(chunk, i) + e - chunk)
            .max()
            .unwrap_or(PAGE);
        // SAFETY: as above; the chunk came from `chunks::take_chunk`.
        unsafe { crate::chunks::cache_chunk(chunk, extent, CacheUser::Parcel) };
    }
    true
}

pub fn lock_for_fork() {
    STATE.acquire_for_fork();
}

pub fn unlock_after_fork() {
    STATE.release_after_fork();
}

impl State {
    fn push(&mut self, c: *mut Parcels) {
        let h = header(c as usize);
        h.prev.store(null_mut(), Ordering::Relaxed);
        h.next.store(self.partial, Ordering::Relaxed);
        if !self.partial.is_null() {
            header(self.partial as usize)
                .prev
                .store(c, Ordering::Relaxed);
        }
        self.partial = c;
    }

    fn unlink(&mut self, c: *mut Parcels) {
        let h = header(c as usize);
        let (prev, next) = (
            h.prev.load(Ordering::Relaxed),
            h.next.load(Ordering::Relaxed),
        );
        if prev.is_null() {
            self.partial = next;
        } else {
            header(prev as usize).next.store(next, Ordering::Relaxed);
        }
        if !next.is_null() {
            header(next as usize).prev.store(prev, Ordering::Relaxed);
        }
        h.next.store(null_mut(), Ordering::Relaxed);
        h.prev.store(null_mut(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As `api` asks: the registry first, then the chunk's header.
    fn is_live_block(ptr: usize) -> bool {
        registry::kind(ptr) == SegKind::Parcel as u8 && block_at(ptr, chunk_of(ptr)).is_some()
    }

    #[test]
    fn eight_buffers_share_a_chunk_grow_in_their_parcels_and_the_empty_chunk_goes() {
        let blocks: Vec<usize> = (0..8).map(|_| alloc(40_000).0 as usize).collect();
        // Other tests may hold parcels of a chunk these take free parcels
        // of: the chunk most of them share is a new one, shared by several.
        let in_chunk = |c: usize| blocks.iter().filter(|&&b| chunk_of(b) == c).count();
        let chunk = blocks
            .iter()
            .map(|&b| chunk_of(b))
            .max_by_key(|&c| in_chunk(c))
            .unwrap();
        let here: Vec<usize> = blocks
            .iter()
            .copied()
            .filter(|&b| chunk_of(b) == chunk)
            .collect();
        assert!(here.len() >= 2, "{blocks:x?}");
        for &b in &blocks {
            assert!(is_live_block(b));
            let usable = usable_size(b).unwrap();
            assert!((40_000..40_000 + PAGE).contains(&usable), "{usable}");
            assert_eq!((b + usable) % PAGE, 0, "up to its last page's end");
            // SAFETY: the block has `usable` bytes.
            unsafe { core::ptr::write_bytes(b as *mut u8, 7, usable) };
        }
        let b = blocks[1];
        assert!(resize_in_place(b, 200_000));
        let usable = usable_size(b).unwrap();
        assert!(usable >= 200_000 && (b + usable).is_multiple_of(PAGE));
        // SAFETY: grown in place to `usable` bytes.
        unsafe { core::ptr::write_bytes(b as *mut u8, 9, usable) };
        assert!(!resize_in_place(b, PARCEL + 1));
        // The first parcel starts right after the header, in its page.
        let first = blocks.iter().find(|&&b| b % PAGE != 0);
        assert!(first.is_none_or(|&b| b % CHUNK == HEADER), "{blocks:x?}");
        // Not block starts: no block there.
        assert!(!is_live_block(b + 16));
        assert!(!is_live_block(chunk_of(b) + 64));
        // (Whether a freed parcel is dead, and a second free refused, is
        // not asked here: the tests beside this one may take the parcel at
        // once. The misuse scenarios ask it in a process of their own.)
        for &b in &blocks {
            assert!(free(b));
        }
    }
}
