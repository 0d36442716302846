//! Large requests (above ACE, ACE failures, big alignments): one chunk-aligned
//! mapping per block, with a header in front of the user block.
//!
//! Returning memory costs dearly on these machines (about 3.5 us per page fault
//! to get it back), so freed mappings are cached:
//! - a block that fits in one 2 MiB chunk gets a whole chunk, and freed chunks
//!   are kept (up to `KEEP_CHUNKS`) for the next large block: no syscall, no
//!   page fault for the pages already touched, and growth by `realloc` up to
//!   the chunk happens in place;
//! - bigger mappings are cached by size (best fit within 2x).
//!
//! A cached mapping goes back to the OS when the cache is over its bounds or
//! it has gone unused for `MAX_IDLE_FREES` large frees.

use crate::os::{self, PAGE};
use crate::registry::{self, CHUNK};
use crate::segment::{SegHeader, SegKind};
use crate::sync::SpinLock;
use core::ptr::null_mut;

const HEADER: usize = 64;
const KEEP_CHUNKS: usize = 128;
const CACHE_SLOTS: usize = 16;
const CACHE_BYTES: usize = 64 << 20;
const MAX_IDLE_FREES: u64 = 1024;

#[repr(C)]
struct LargeHeader {
    hdr: SegHeader,
    /// Bytes mapped (CHUNK for chunk-sized blocks).
    map_size: usize,
    /// Offset of the user block from the mapping start.
    user_offset: usize,
    /// Bytes the user may use (page-rounded request, at most map_size - user_offset).
    usable: usize,
    live: bool,
}

#[derive(Clone, Copy)]
struct Cached {
    base: usize,
    /// Bytes mapped.
    size: usize,
    /// Bytes its last user could have touched (what it may hold resident).
    resident: usize,
    freed_at: u64,
}

const NONE: Cached = Cached {
    base: 0,
    size: 0,
    resident: 0,
    freed_at: 0,
};

struct Cache {
    slots: [Cached; CACHE_SLOTS + KEEP_CHUNKS],
    len: usize,
    bytes: usize,
    frees: u64,
}

static CACHE: SpinLock<Cache> = SpinLock::new(Cache {
    slots: [NONE; CACHE_SLOTS + KEEP_CHUNKS],
    len: 0,
    bytes: 0,
    frees: 0,
});

fn round_page(v: usize) -> Option<usize> {
    Some(v.checked_add(PAGE - 1)? & !(PAGE - 1))
}

/// Allocates `size` bytes aligned to `align` (a power of two <= CHUNK / 2).
/// The second value says whether the memory is known to be zero (fresh mapping).
pub fn alloc(size: usize, align: usize) -> (*mut u8, bool) {
    crate::global::ensure_init();
    let offset = HEADER.max(align);
    let Some(total) = size.checked_add(offset).and_then(round_page) else {
        return (null_mut(), false);
    };
    let map = if total <= CHUNK { CHUNK } else { total };
    let (base, fresh) = match CACHE.lock().take(map) {
        Some(base) => (base, false),
        None => {
            let p = os::map_aligned(map, CHUNK);
            if p.is_null() {
                return (null_mut(), false);
            }
            (p as usize, true)
        }
    };
    let h = base as *mut LargeHeader;
    // SAFETY: `base` is a mapping of at least `map` bytes that we own; a cached
    // one keeps its header and its true mapped size.
    unsafe {
        if fresh {
            h.write(LargeHeader {
                hdr: SegHeader::new(SegKind::Large, 0),
                map_size: map,
                user_offset: 0,
                usable: 0,
                live: false,
            });
        }
        (*h).user_offset = offset;
        (*h).usable = total - offset;
        (*h).live = true;
    }
    if fresh {
        registry::insert(base, SegKind::Large as u8);
    }
    ((base + offset) as *mut u8, fresh)
}

/// Usable bytes of the large block whose mapping starts at `chunk`.
pub fn usable_size(chunk: usize) -> usize {
    // SAFETY: the registry vouched that `chunk` starts a large mapping.
    unsafe { (*(chunk as *const LargeHeader)).usable }
}

/// Whether `ptr` is the live user block of the large mapping at `chunk`.
pub fn is_live_block(ptr: usize, chunk: usize) -> bool {
    // SAFETY: as in `usable_size`.
    let h = unsafe { &*(chunk as *const LargeHeader) };
    h.live && chunk + h.user_offset == ptr
}

/// Makes the large block at `chunk` hold `size` bytes without moving it: true
/// if its mapping already has the room (a chunk-sized block grows up to its
/// chunk) or could grow in place (mremap), sparing the copy and the faults.
pub fn resize_in_place(chunk: usize, size: usize) -> bool {
    // SAFETY: the caller checked that `chunk` holds a live large block.
    let h = unsafe { &mut *(chunk as *mut LargeHeader) };
    let Some(need) = size.checked_add(h.user_offset).and_then(round_page) else {
        return false;
    };
    if need > h.map_size {
        // Grow by at least half again, so a growing buffer remaps rarely.
        let want = need.max(h.map_size + h.map_size / 2) & !(PAGE - 1);
        // SAFETY: `chunk`/`map_size` is exactly this block's mapping.
        let grown = [want, need]
            .into_iter()
            .find(|&t| unsafe { os::grow_in_place(chunk as *mut u8, h.map_size, t) });
        match grown {
            Some(t) => h.map_size = t,
            None => return false,
        }
    }
    h.usable = need - h.user_offset;
    true
}

/// Frees the large block whose mapping starts at `chunk`.
pub fn free(chunk: usize) {
    // SAFETY: the caller checked `is_live_block`; the header is ours.
    let (size, resident) = unsafe {
        let h = &mut *(chunk as *mut LargeHeader);
        h.live = false;
        (h.map_size, h.user_offset + h.usable)
    };
    let mut evicted = [NONE; CACHE_SLOTS + KEEP_CHUNKS + 1];
    let n = CACHE.lock().put(
        Cached {
            base: chunk,
            size,
            resident,
            freed_at: 0,
        },
        &mut evicted,
    );
    for e in &evicted[..n] {
        registry::remove(e.base);
        // SAFETY: an evicted mapping is no longer referenced by the cache or a user.
        unsafe { os::unmap(e.base as *mut u8, e.size) };
    }
}

pub fn lock_for_fork() {
    CACHE.acquire_for_fork();
}

pub fn unlock_after_fork() {
    CACHE.release_after_fork();
}

impl Cache {
    /// A whole chunk for `map == CHUNK` (the most recently freed: its pages are
    /// the likeliest to be in cache, and older ones age out); otherwise the
    /// best fit no more than twice `map`.
    fn take(&mut self, map: usize) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in 0..self.len {
            let c = &self.slots[i];
            let better = if map == CHUNK {
                c.size == CHUNK && best.is_none_or(|b| c.freed_at > self.slots[b].freed_at)
            } else {
                c.size >= map
                    && c.size <= map.saturating_mul(2)
                    && best.is_none_or(|b| c.size < self.slots[b].size)
            };
            if better {
                best = Some(i);
            }
        }
        let i = best?;
        Some(self.remove(i).base)
    }

    fn remove(&mut self, i: usize) -> Cached {
        let c = self.slots[i];
        self.len -= 1;
        self.slots[i] = self.slots[self.len];
        self.bytes -= c.resident;
        c
    }

    fn count_chunks(&self) -> usize {
        self.slots[..self.len]
            .iter()
            .filter(|c| c.size == CHUNK)
            .count()
    }

    /// Caches `m`; writes what must be unmapped into `out` and returns how many.
    fn put(&mut self, mut m: Cached, out: &mut [Cached; CACHE_SLOTS + KEEP_CHUNKS + 1]) -> usize {
        self.frees += 1;
        m.freed_at = self.frees;
        let mut n = 0;
        let mut i = 0;
        while i < self.len {
            if self.frees - self.slots[i].freed_at > MAX_IDLE_FREES {
                out[n] = self.remove(i);
                n += 1;
            } else {
                i += 1;
            }
        }
        if m.resident > CACHE_BYTES / 4 {
            out[n] = m;
            return n + 1;
        }
        // Make room among blocks of the same kind (chunks, or sized mappings): evict the oldest.
        let chunk = m.size == CHUNK;
        loop {
            let same = if chunk {
                self.count_chunks()
            } else {
                self.len - self.count_chunks()
            };
            let full = same == if chunk { KEEP_CHUNKS } else { CACHE_SLOTS };
            if !full && self.bytes + m.resident <= CACHE_BYTES {
                break;
            }
            let oldest = (0..self.len)
                .filter(|&j| (self.slots[j].size == CHUNK) == chunk || !full)
                .min_by_key(|&j| self.slots[j].freed_at);
            match oldest {
                Some(j) => {
                    out[n] = self.remove(j);
                    n += 1;
                }
                None => {
                    out[n] = m;
                    return n + 1;
                }
            }
        }
        self.slots[self.len] = m;
        self.len += 1;
        self.bytes += m.resident;
        n
    }
}
