//! Large requests (above ACE, ACE failures, big alignments, buffers that
//! realloc grows past 32 KiB): one chunk-aligned mapping per block, with a
//! header in front of the user block. A block that fits in one 2 MiB chunk
//! gets a whole chunk, so growth by `realloc` up to the chunk happens in
//! place; a bigger one gets a mapping of its own. Mappings come from, and go
//! back to, the chunk cache (`chunks`), which every tier shares and which
//! decides when memory goes back to the OS.

use crate::chunks::{self, MapHeader};
use crate::os::{self, PAGE};
use crate::probes;
use crate::registry::{self, CHUNK};
use crate::segment::SegKind;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicUsize, Ordering};
use hakmem_common::{CacheUser, TakeSource};

const HEADER: usize = 64;
/// Where a live block's usable bytes lie in its mapping's header (hakctl).
pub const USABLE_AT: usize = core::mem::offset_of!(LargeHeader, usable);
/// x86_64's user address space: no request this large can be mapped.
const USER_SPACE: usize = 1 << 47;

/// A large block's mapping starts with this: the chunk cache's header (what
/// a cached mapping keeps), then where the block lies in it.
#[repr(C)]
struct LargeHeader {
    map: MapHeader,
    /// Offset of the user block from the mapping start.
    user_offset: usize,
    /// Bytes the user may use (page-rounded request, at most map_size - user_offset).
    usable: usize,
}

const _: () = assert!(core::mem::size_of::<LargeHeader>() <= HEADER);

/// Live large blocks and the bytes of their mappings (`mallinfo`'s hblks and
/// hblkhd). Slow paths only: a large call maps or takes a mapping anyway.
/// (The bytes are `chunks::LARGE_LIVE_BYTES`: the cache's reserve grows with them.)
static LIVE_BLOCKS: AtomicUsize = AtomicUsize::new(0);
use chunks::LARGE_LIVE_BYTES as LIVE_BYTES;

/// Live large blocks and the bytes mapped for them.
pub fn live() -> (usize, usize) {
    (
        LIVE_BLOCKS.load(Ordering::Relaxed),
        LIVE_BYTES.load(Ordering::Relaxed),
    )
}

fn count_live(bytes: usize, born: bool) {
    if born {
        LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
    } else {
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(bytes, Ordering::Relaxed);
    }
}

fn round_page(v: usize) -> Option<usize> {
    Some(v.checked_add(PAGE - 1)? & !(PAGE - 1))
}

/// Allocates `size` bytes aligned to `align` (a power of two).
/// The second value says whether the memory is known to be zero (fresh mapping).
pub fn alloc(size: usize, align: usize) -> (*mut u8, bool) {
    if size >= USER_SPACE || align >= USER_SPACE {
        // No mapping can hold it (the user address space is 2^47 bytes):
        // refused before the cache is flushed to make room.
        return (null_mut(), false);
    }
    if align >= CHUNK {
        return (alloc_chunk_aligned(size, align), true);
    }
    let offset = HEADER.max(align);
    let Some(total) = size.checked_add(offset).and_then(round_page) else {
        return (null_mut(), false);
    };
    let map = if total <= CHUNK { CHUNK } else { total };
    // Its own statement: the guard must be dropped before `flush_cache` locks again.
    let cached = chunks::take(map, total)
        .or_else(|| (map > CHUNK).then(|| chunks::take_moved(map)).flatten());
    let (base, fresh) = match cached {
        Some(base) => (base, false),
        None => {
            let mut p = map_fresh(map);
            if p.is_null() && os::could_be_had(map) && chunks::flush_refused() {
                p = map_fresh(map);
            }
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
                map: MapHeader::new(map, 0),
                user_offset: 0,
                usable: 0,
            });
        }
        (*h).user_offset = offset;
        (*h).usable = total - offset;
        (*h).map.extent = (*h).map.extent.max(total);
        (*h).map.live = true;
    }
    if fresh {
        registry::insert(base, SegKind::Large as u8);
    }
    // SAFETY: as above; a cached mapping's header has its true size.
    let mapped = unsafe { (*h).map.map_size };
    count_live(mapped, true);
    probes::cache_take(mapped, chunks::source_of(fresh), CacheUser::Large);
    ((base + offset) as *mut u8, fresh)
}

/// A block aligned to `align` >= CHUNK. It starts on a chunk boundary, so
/// its header takes the chunk before it (address space, one page touched) and
/// the registry marks the block's first chunk `LARGE_BODY_BYTE`, which
/// `front::place` (`segment::header_at`) follows back to the header. Always a fresh mapping: such
/// alignments are rare, and no cached mapping is aligned for them. It maps
/// `align + size`, aligned, and gives back what lies below the header at once,
/// so it holds `CHUNK + size` of address space.
fn alloc_chunk_aligned(size: usize, align: usize) -> *mut u8 {
    let Some(body) = round_page(size.max(1)) else {
        return null_mut();
    };
    let (Some(map), Some(over)) = (CHUNK.checked_add(body), align.checked_add(body)) else {
        return null_mut();
    };
    let mut base = os::map_aligned(over, align);
    if base.is_null() && os::could_be_had(over) && chunks::flush_refused() {
        base = os::map_aligned(over, align);
    }
    if base.is_null() {
        return null_mut();
    }
    let user = base as usize + align;
    let chunk = user - CHUNK;
    if chunk > base as usize {
        // SAFETY: `base..chunk` is the head of the mapping just made, unused.
        unsafe { os::unmap(base, chunk - base as usize) };
    }
    // SAFETY: `chunk..chunk + map` is the rest of that mapping, ours.
    unsafe {
        (chunk as *mut LargeHeader).write(LargeHeader {
            map: MapHeader {
                live: true,
                ..MapHeader::new(map, map)
            },
            user_offset: CHUNK,
            usable: body,
        })
    };
    registry::insert(chunk, SegKind::Large as u8);
    registry::insert(user, crate::segment::LARGE_BODY_BYTE);
    count_live(map, true);
    probes::cache_take(map, TakeSource::Fresh, CacheUser::Large);
    user as *mut u8
}

/// A new mapping of `map` bytes (CHUNK or more), chunk-aligned.
fn map_fresh(map: usize) -> *mut u8 {
    if map == CHUNK {
        os::map_chunk()
    } else {
        os::map_aligned(map, CHUNK)
    }
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
    h.map.live && chunk + h.user_offset == ptr
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
    if need > h.map.map_size {
        // Grow by at least half again, so a growing buffer remaps rarely.
        let want = need.max(h.map.map_size + h.map.map_size / 2) & !(PAGE - 1);
        // SAFETY: `chunk`/`map_size` is exactly this block's mapping.
        let grown = [want, need]
            .into_iter()
            .find(|&t| unsafe { os::grow_in_place(chunk as *mut u8, h.map.map_size, t) });
        match grown {
            Some(t) => {
                LIVE_BYTES.fetch_add(t - h.map.map_size, Ordering::Relaxed);
                h.map.map_size = t;
            }
            None => return false,
        }
    }
    h.usable = need - h.user_offset;
    h.map.extent = h.map.extent.max(need);
    true
}

/// Frees the large block whose mapping starts at `chunk`.
pub fn free(chunk: usize) {
    // SAFETY: the caller checked `is_live_block`; the header is ours.
    let (size, extent) = unsafe {
        let h = &mut *(chunk as *mut LargeHeader);
        h.map.live = false;
        if h.user_offset >= CHUNK {
            // A chunk-aligned block (`alloc_chunk_aligned`): once cached, the
            // mapping serves blocks that start in its first chunk.
            registry::remove(chunk + h.user_offset);
        }
        (h.map.map_size, h.map.extent)
    };
    count_live(size, false);
    chunks::put(chunk, size, extent, CacheUser::Large);
}
