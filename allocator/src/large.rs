//! Large requests (above ACE, or ACE failures, or big alignments): one
//! chunk-aligned mapping each, with a header in front of the user block.
//!
//! Freed mappings go to a small cache instead of straight back to the OS:
//! faulting pages back in costs about 3.5 us each on these machines. A mapping
//! leaves the cache for the OS when the cache is over its byte budget or the
//! mapping has gone unused for `MAX_IDLE_FREES` large frees.

use crate::os::{self, PAGE};
use crate::registry::{self, CHUNK};
use crate::segment::{SegHeader, SegKind};
use crate::sync::SpinLock;
use core::ptr::null_mut;

const HEADER: usize = 64;
const CACHE_SLOTS: usize = 16;
const CACHE_BYTES: usize = 64 << 20;
const MAX_IDLE_FREES: u64 = 256;

#[repr(C)]
struct LargeHeader {
    hdr: SegHeader,
    map_size: usize,
    user_offset: usize,
    live: bool,
}

#[derive(Clone, Copy)]
struct Cached {
    base: usize,
    size: usize,
    freed_at: u64,
}

struct Cache {
    slots: [Cached; CACHE_SLOTS],
    len: usize,
    bytes: usize,
    frees: u64,
}

static CACHE: SpinLock<Cache> = SpinLock::new(Cache {
    slots: [Cached {
        base: 0,
        size: 0,
        freed_at: 0,
    }; CACHE_SLOTS],
    len: 0,
    bytes: 0,
    frees: 0,
});

/// Allocates `size` bytes aligned to `align` (a power of two <= CHUNK / 2).
/// The second value says whether the memory is known to be zero (fresh mapping).
pub fn alloc(size: usize, align: usize) -> (*mut u8, bool) {
    crate::global::ensure_init();
    let offset = HEADER.max(align);
    let Some(total) = size
        .checked_add(offset)
        .and_then(|t| t.checked_add(PAGE - 1))
    else {
        return (null_mut(), false);
    };
    let total = total & !(PAGE - 1);
    let (base, fresh) = match CACHE.lock().take(total) {
        Some(base) => (base, false),
        None => {
            let p = os::map_aligned(total, CHUNK);
            if p.is_null() {
                return (null_mut(), false);
            }
            (p as usize, true)
        }
    };
    let h = base as *mut LargeHeader;
    // SAFETY: `base` is a mapping of at least `total` bytes that we own.
    let map_size = unsafe {
        if fresh {
            h.write(LargeHeader {
                hdr: SegHeader::new(SegKind::Large, 0),
                map_size: total,
                user_offset: 0,
                live: false,
            });
        }
        (*h).user_offset = offset;
        (*h).live = true;
        (*h).map_size
    };
    if fresh {
        registry::insert(base);
    }
    debug_assert!(map_size >= total);
    ((base + offset) as *mut u8, fresh)
}

/// Usable bytes of the large block at `ptr` (its segment header is at `chunk`).
pub fn usable_size(chunk: usize) -> usize {
    // SAFETY: the registry vouched that `chunk` starts a large mapping.
    let h = unsafe { &*(chunk as *const LargeHeader) };
    h.map_size - h.user_offset
}

/// Whether `ptr` is the live user block of the large mapping at `chunk`.
pub fn is_live_block(ptr: usize, chunk: usize) -> bool {
    // SAFETY: as in `usable_size`.
    let h = unsafe { &*(chunk as *const LargeHeader) };
    h.live && chunk + h.user_offset == ptr
}

/// Tries to make the large block at `chunk` hold `size` bytes without moving
/// it: true if it already does or its mapping could grow in place (mremap),
/// which spares the copy and the page faults of a fresh mapping.
pub fn resize_in_place(chunk: usize, size: usize) -> bool {
    // SAFETY: the caller checked that `chunk` holds a live large block of its own.
    let h = unsafe { &mut *(chunk as *mut LargeHeader) };
    let Some(need) = size.checked_add(h.user_offset).and_then(|t| t.checked_add(PAGE - 1)) else {
        return false;
    };
    let need = need & !(PAGE - 1);
    if need <= h.map_size {
        return true;
    }
    // Grow by at least half again, so a growing buffer remaps rarely.
    let want = need.max(h.map_size + h.map_size / 2) & !(PAGE - 1);
    // SAFETY: `chunk`/`map_size` is exactly this block's mapping.
    for target in [want, need] {
        if unsafe { os::grow_in_place(chunk as *mut u8, h.map_size, target) } {
            h.map_size = target;
            return true;
        }
    }
    false
}

/// Frees the large block whose mapping starts at `chunk`.
pub fn free(chunk: usize) {
    // SAFETY: the caller checked `is_live_block`; the header is ours.
    let size = unsafe {
        let h = &mut *(chunk as *mut LargeHeader);
        h.live = false;
        h.map_size
    };
    let mut evicted = [Cached {
        base: 0,
        size: 0,
        freed_at: 0,
    }; CACHE_SLOTS + 1];
    let n = CACHE.lock().put(
        Cached {
            base: chunk,
            size,
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
    /// Best fit among cached mappings no more than twice the request.
    fn take(&mut self, total: usize) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in 0..self.len {
            let s = self.slots[i].size;
            if s >= total
                && s <= total.saturating_mul(2)
                && best.is_none_or(|b| s < self.slots[b].size)
            {
                best = Some(i);
            }
        }
        let i = best?;
        let c = self.slots[i];
        self.len -= 1;
        self.slots[i] = self.slots[self.len];
        self.bytes -= c.size;
        Some(c.base)
    }

    /// Caches `m`; writes what must be unmapped into `out` and returns how many.
    fn put(&mut self, mut m: Cached, out: &mut [Cached; CACHE_SLOTS + 1]) -> usize {
        self.frees += 1;
        m.freed_at = self.frees;
        let mut n = 0;
        // Mappings idle for too long go back to the OS.
        let mut i = 0;
        while i < self.len {
            if self.frees - self.slots[i].freed_at > MAX_IDLE_FREES {
                out[n] = self.slots[i];
                n += 1;
                self.bytes -= self.slots[i].size;
                self.len -= 1;
                self.slots[i] = self.slots[self.len];
            } else {
                i += 1;
            }
        }
        if m.size > CACHE_BYTES / 4 {
            out[n] = m;
            return n + 1;
        }
        // Make room: evict the oldest until the new one fits.
        while self.len == CACHE_SLOTS || self.bytes + m.size > CACHE_BYTES {
            let oldest = (0..self.len)
                .min_by_key(|&j| self.slots[j].freed_at)
                .unwrap_or(0);
            out[n] = self.slots[oldest];
            n += 1;
            self.bytes -= self.slots[oldest].size;
            self.len -= 1;
            self.slots[oldest] = self.slots[self.len];
        }
        self.slots[self.len] = m;
        self.len += 1;
        self.bytes += m.size;
        n
    }
}
