//! Large requests (above ACE, ACE failures, big alignments, buffers that
//! realloc grows past 32 KiB): one chunk-aligned
//! mapping per block, with a header in front of the user block.
//!
//! Returning memory costs dearly on these machines (about 3.5 us per page fault
//! to get it back), so freed mappings are cached:
//! - a block that fits in one 2 MiB chunk gets a whole chunk, and freed chunks
//!   are kept (up to `KEEP_CHUNKS`, a ring in the order freed: a new block
//!   takes the best fit among the most recently freed, the oldest is evicted
//!   first) for the next large block: no syscall, no page fault for the pages
//!   already touched, and growth by `realloc` up to the chunk happens in place;
//! - bigger mappings are cached by size (best fit within 2x, `CACHE_SLOTS`).
//!
//! A cached mapping goes back to the OS (oldest first):
//! - when it has gone unused for `MAX_IDLE_NS` (1 s), within a reserve of
//!   `CACHE_BYTES` (64 MiB) of what the cached mappings' users touched;
//! - beyond the reserve, a freed burst waits 100 ms (`HAKMEM_PURGE_DELAY_MS`) for the
//!   program to reuse it (a program that frees 800 MB of grown buffers and
//!   exits, or makes the next round of big blocks, pays no munmap; returning
//!   them at once was 13% of such a run);
//! - at once beyond `BURST_BYTES` (1 GiB).
//!
//! Idle mappings are returned at allocator slow paths (`decay_if_due`: large
//! calls, tiny and ACE refills, ACE flushes), so a program that goes on with
//! small blocks only still gets them back; one that makes no allocator call
//! at all keeps them, unless it calls `malloc_trim` (`trim`). When the OS
//! refuses a mapping, the cache is emptied and the mapping tried once more.
//!
//! What a mapping may hold is its extent: every byte any of its users could
//! have touched (a reused chunk keeps the pages an earlier, bigger block
//! wrote). The cache holds at most the sum of its mappings' extents, and at
//! most the process's peak RSS when last read (getrusage, one syscall) plus
//! what was cached since: a program that makes and frees a thousand 1 MiB
//! blocks, touching a few pages of each, keeps them all cached (no map, no
//! fault next time). When neither bound is low enough, a freed block of
//! 256 KiB or more counts the pages it really holds (mincore, a page-table
//! walk: 6-10 us a chunk, which was half the time of the `large` workload
//! while the cache's bound was 64 MiB). A chunk goes to the block its extent
//! fits best, so extents stay near one block size.
//!
//! Idleness is measured in time, not in frees: with a count (1024 frees), a
//! program that churns large blocks quickly (the `stress` workload: 50,000
//! in 0.7 s) aged out the bottom of the stack between its bursts and mapped
//! it again at the next one, about 4,000 maps per run and 20% of its time.

use crate::os::{self, PAGE};
use crate::probes;
use crate::registry::{self, CHUNK};
use crate::segment::{SegHeader, SegKind};
use crate::sync::SpinLock;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use hakmem_common::{CacheUser, ReturnWhy, TakeSource};

const HEADER: usize = 64;
/// x86_64's user address space: no request this large can be mapped.
const USER_SPACE: usize = 1 << 47;
/// Freed chunks kept. Programs can keep thousands of realloc-grown buffers
/// and 256 KiB..2 MiB blocks live and free them in a burst; the bounds that
/// matter for memory are `CACHE_BYTES` and `BURST_BYTES`. (40 bytes each, in
/// zero pages until used.)
const KEEP_CHUNKS: usize = 16384;
const CACHE_SLOTS: usize = 16;
/// What the cache keeps for up to `MAX_IDLE_NS`: a reserve for programs that
/// make and free big blocks now and then.
const CACHE_BYTES: usize = 64 << 20;
pub const MAX_IDLE_NS: u64 = 1_000_000_000;
/// Beyond `CACHE_BYTES`, freed memory waits `burst_idle_ns` before it goes
/// back to the OS, and never more than `BURST_BYTES` of it: a program that
/// frees a burst and makes the next one soon (a request, a frame, a round)
/// takes it back without a syscall or a page fault, and one that does not
/// gets its memory returned at its next allocator slow path after the delay.
/// (mimalloc waits 10 ms by default, jemalloc decays over 10 s.)
const BURST_BYTES: usize = 1 << 30;
/// Mappings `put` may hand back for unmapping in one call. Eviction works in
/// batches so that `unmap_all` can merge neighbours (a program frees its blocks
/// in about the order it made them, and the kernel maps them side by side):
/// a lone 2 MiB chunk with 40 KB touched costs about 15 us to unmap, one of a
/// run of 16 about 7 us.
const EVICT_MAX: usize = 32;
/// Smallest block whose resident pages a free counts: below, counting it whole
/// costs the cache little and the mincore call would cost more.
const MEASURE_MIN: usize = 256 << 10;
/// Largest block whose resident pages a free counts (mincore, one call per
/// 2 MiB); a bigger one is counted as wholly touched.
const MEASURE_MAX: usize = 16 << 20;
/// How many of the most recently freed chunks a large allocation looks at for
/// the best fit.
const FIT_SCAN: usize = 32;
/// When the ring of chunks is full, this many of the oldest go at once.
const EVICT_CHUNKS: usize = 16;
/// When over its bound (`hold_bound`), eviction goes this far below it.
const EVICT_SLACK: usize = CACHE_BYTES / 16;
/// The peak-RSS ceiling (see `Cache::held`) is read again only after this
/// much has been cached since the last reading.
const CEILING_STALE: usize = BURST_BYTES / 8;

#[repr(C)]
struct LargeHeader {
    hdr: SegHeader,
    /// Bytes mapped (CHUNK for chunk-sized blocks).
    map_size: usize,
    /// Offset of the user block from the mapping start.
    user_offset: usize,
    /// Bytes the user may use (page-rounded request, at most map_size - user_offset).
    usable: usize,
    /// Bytes from the mapping's start that any of its users could have
    /// touched: a cached mapping keeps its pages, so one reused for a smaller
    /// block still holds what a bigger one before it wrote.
    extent: usize,
    live: bool,
}

#[derive(Clone, Copy)]
struct Cached {
    base: usize,
    /// Bytes mapped.
    size: usize,
    /// Bytes from `base` that any of its users could have touched.
    extent: usize,
    /// Bytes it may hold resident: its extent, or what mincore counted.
    resident: usize,
    /// When it was freed (`now_ns`).
    freed_at: u64,
}

const NONE: Cached = Cached {
    base: 0,
    size: 0,
    extent: 0,
    resident: 0,
    freed_at: 0,
};

/// A mapping moved out of the cache to go back to the OS, and why (the
/// `os_return` probe's reason).
#[derive(Clone, Copy)]
struct Evicted {
    map: Cached,
    why: ReturnWhy,
}

const NO_EVICTION: Evicted = Evicted {
    map: NONE,
    why: ReturnWhy::Bound,
};

struct Cache {
    /// Freed chunks: a ring, oldest at `chunk_head`.
    chunks: [Cached; KEEP_CHUNKS],
    chunk_head: usize,
    chunk_len: usize,
    /// Freed mappings larger than a chunk, unordered.
    sized: [Cached; CACHE_SLOTS],
    sized_len: usize,
    /// Sum of `resident` over everything cached.
    bytes: usize,
    /// Sum of `resident` over everything ever cached (wrapping).
    added: usize,
    /// The process's peak RSS when last read (0: not read, so that the cache
    /// is all zeros and sits in `.bss`, not in the library's file), and
    /// `added` just before it was read. See `held`.
    ceiling: usize,
    ceiling_mark: usize,
}

const EMPTY: Cache = Cache {
    chunks: [NONE; KEEP_CHUNKS],
    chunk_head: 0,
    chunk_len: 0,
    sized: [NONE; CACHE_SLOTS],
    sized_len: 0,
    bytes: 0,
    added: 0,
    ceiling: 0,
    ceiling_mark: 0,
};

static CACHE: SpinLock<Cache> = SpinLock::new(EMPTY);
/// Live large blocks and the bytes of their mappings (`mallinfo`'s hblks and
/// hblkhd). Slow paths only: a large call maps or takes a mapping anyway.
static LIVE_BLOCKS: AtomicUsize = AtomicUsize::new(0);
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

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

/// Bytes the cache holds that its mappings' users may have touched.
pub fn cached_bytes() -> usize {
    CACHE.lock().bytes
}
/// When the oldest cached mapping is due to go back (`now_ns`; `u64::MAX`:
/// nothing cached). Read without the lock by `decay_if_due`.
static DUE: AtomicU64 = AtomicU64::new(u64::MAX);

/// How long freed memory beyond the reserve waits for reuse
/// (`HAKMEM_PURGE_DELAY_MS`, default 100 ms).
fn burst_idle_ns() -> u64 {
    crate::config::get().purge_delay_ns
}

/// The most the cache may hold: `BURST_BYTES`, or with no burst delay the
/// reserve alone (each free beyond it returns the oldest at once).
fn hold_bound() -> usize {
    if burst_idle_ns() == 0 {
        CACHE_BYTES
    } else {
        BURST_BYTES
    }
}

/// Runs `f` on the cache under its lock, then publishes when it is next due.
fn with_cache<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    let mut c = CACHE.lock();
    let r = f(&mut c);
    DUE.store(c.due(), Ordering::Relaxed);
    r
}

fn round_page(v: usize) -> Option<usize> {
    Some(v.checked_add(PAGE - 1)? & !(PAGE - 1))
}

/// Allocates `size` bytes aligned to `align` (a power of two).
/// The second value says whether the memory is known to be zero (fresh mapping).
pub fn alloc(size: usize, align: usize) -> (*mut u8, bool) {
    crate::global::ensure_init();
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
    crate::purge::at_slow_path();
    // Its own statement: the guard must be dropped before `flush_cache` locks again.
    let cached = with_cache(|c| c.take(map, total));
    let (base, fresh) = match cached {
        Some(base) => (base, false),
        None => {
            let mut p = map_fresh(map);
            if p.is_null() && flush_cache() {
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
                hdr: SegHeader::new(SegKind::Large, 0),
                map_size: map,
                user_offset: 0,
                usable: 0,
                extent: 0,
                live: false,
            });
        }
        (*h).user_offset = offset;
        (*h).usable = total - offset;
        (*h).extent = (*h).extent.max(total);
        (*h).live = true;
    }
    if fresh {
        registry::insert(base, SegKind::Large as u8);
    }
    // SAFETY: as above; a cached mapping's header has its true size.
    let mapped = unsafe { (*h).map_size };
    count_live(mapped, true);
    probes::cache_take(mapped, source_of(fresh), CacheUser::Large);
    ((base + offset) as *mut u8, fresh)
}

/// A block aligned to `align` >= CHUNK. It starts on a chunk boundary, so
/// its header takes the chunk before it (address space, one page touched) and
/// the registry marks the block's first chunk `LARGE_BODY_BYTE`, which
/// `segment::lookup` follows back to the header. Always a fresh mapping: such
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
    crate::purge::at_slow_path();
    let mut base = os::map_aligned(over, align);
    if base.is_null() && flush_cache() {
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
            hdr: SegHeader::new(SegKind::Large, 0),
            map_size: map,
            user_offset: CHUNK,
            usable: body,
            extent: map,
            live: true,
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
            Some(t) => {
                LIVE_BYTES.fetch_add(t - h.map_size, Ordering::Relaxed);
                h.map_size = t;
            }
            None => return false,
        }
    }
    h.usable = need - h.user_offset;
    h.extent = h.extent.max(need);
    true
}

/// Frees the large block whose mapping starts at `chunk`.
pub fn free(chunk: usize) {
    // SAFETY: the caller checked `is_live_block`; the header is ours.
    let (size, extent) = unsafe {
        let h = &mut *(chunk as *mut LargeHeader);
        h.live = false;
        if h.user_offset >= CHUNK {
            // A chunk-aligned block (`alloc_chunk_aligned`): once cached, the
            // mapping serves blocks that start in its first chunk.
            registry::remove(chunk + h.user_offset);
        }
        (h.map_size, h.extent)
    };
    count_live(size, false);
    cache(chunk, size, extent, CacheUser::Large);
}

fn source_of(fresh: bool) -> TakeSource {
    if fresh {
        TakeSource::Fresh
    } else {
        TakeSource::Cached
    }
}

/// A chunk for a new ACE segment or SuperSlab (null if the OS refused): a
/// cached one, whose pages were all touched if the most recently freed have
/// one (no page faults), else the newest; else a fresh mapping. The second
/// value says whether it came from the cache (its bytes are not zero).
pub fn take_chunk(user: CacheUser) -> (*mut u8, bool) {
    let cached = with_cache(|c| c.take(CHUNK, CHUNK));
    let chunk = cached.map_or_else(os::map_chunk, |base| base as *mut u8);
    if !chunk.is_null() {
        probes::cache_take(CHUNK, source_of(cached.is_none()), user);
    }
    (chunk, cached.is_some())
}

/// Caches the 2 MiB chunk of an ACE segment whose blocks are all free, or of
/// a SuperSlab whose slabs are all EMPTY (its first `extent` bytes may have
/// been touched), so that large blocks, ACE and SuperSlabs share one cache
/// and one policy for giving memory back.
///
/// # Safety
/// The caller owns `chunk`, a chunk from `os::map_chunk` that nothing
/// references any more.
pub unsafe fn cache_chunk(chunk: usize, extent: usize, user: CacheUser) {
    // SAFETY: the caller hands over the chunk; its start is writable.
    unsafe {
        (chunk as *mut LargeHeader).write(LargeHeader {
            hdr: SegHeader::new(SegKind::Large, 0),
            map_size: CHUNK,
            user_offset: 0,
            usable: 0,
            extent,
            live: false,
        })
    };
    registry::insert(chunk, SegKind::Large as u8);
    cache(chunk, CHUNK, extent, user);
}

/// Caches the freed mapping at `chunk` (its header up to date), returning to
/// the OS what the cache lets go.
fn cache(chunk: usize, size: usize, extent: usize, user: CacheUser) {
    let resident = if (MEASURE_MIN..=MEASURE_MAX).contains(&extent) {
        count_resident(chunk, extent)
    } else {
        extent
    };
    probes::cache_put(size, user, resident);
    let mut evicted = [NO_EVICTION; EVICT_MAX];
    let now = os::now_ns();
    let freed = Cached {
        base: chunk,
        size,
        extent,
        resident,
        freed_at: now,
    };
    let n = with_cache(|c| c.put(freed, &mut evicted));
    unmap_all(&mut evicted[..n]);
}

/// What the freed block of `extent` bytes at `chunk` may hold resident. Its
/// extent while the cache holds less than half its bound; past that, so that a
/// program touching a little of big blocks keeps them cached instead of
/// mapping them anew, a fresh ceiling (one getrusage: the cache cannot hold
/// more than the process ever had resident), and if that is not enough its
/// pages are counted (mincore, 2 us and about 16 ns per page-table entry).
fn count_resident(chunk: usize, extent: usize) -> usize {
    let half = hold_bound() / 2;
    let (held, mark, stale) = {
        let c = CACHE.lock();
        let stale = c.ceiling == 0 || c.added.wrapping_sub(c.ceiling_mark) >= CEILING_STALE;
        (c.held(), c.added, stale)
    };
    if held + extent <= half {
        return extent;
    }
    if stale {
        if let Some(peak) = os::peak_rss() {
            let mut c = CACHE.lock();
            c.ceiling = peak;
            c.ceiling_mark = mark;
            if c.held() + extent <= half {
                return extent;
            }
        }
    }
    os::resident_bytes(chunk, extent).unwrap_or(extent)
}

/// When the oldest cached mapping is next due to go back (`now_ns` time),
/// or None when nothing is cached.
pub fn next_due_ns() -> Option<u64> {
    let due = DUE.load(Ordering::Relaxed);
    (due != u64::MAX).then_some(due)
}

/// Returns to the OS what has waited in the cache long enough (see
/// `burst_idle_ns`). Cheap when nothing is due (a load, and a clock read from
/// the vDSO when anything is cached), so allocator slow paths call it: a
/// program that frees a burst of big blocks and then only makes small ones
/// still gets it returned.
pub fn decay_if_due() {
    let due = DUE.load(Ordering::Relaxed);
    if due == u64::MAX {
        return;
    }
    let now = os::now_ns();
    if now < due {
        return;
    }
    return_batches(|c, out| c.decay(now, out, 0));
}

/// Returns to the OS, a batch at a time and not under the lock, what `pick`
/// moves out of the cache, until it moves less than a full batch. True if
/// anything went.
fn return_batches(mut pick: impl FnMut(&mut Cache, &mut [Evicted]) -> usize) -> bool {
    let mut any = false;
    loop {
        let mut out = [NO_EVICTION; EVICT_MAX];
        let n = with_cache(|c| pick(c, &mut out));
        any |= n > 0;
        unmap_all(&mut out[..n]);
        if n < EVICT_MAX {
            return any;
        }
    }
}

/// Returns evicted mappings to the OS, one munmap per run of adjacent ones,
/// and fires `os_return` once for each reason among them.
fn unmap_all(maps: &mut [Evicted]) {
    if probes::os_return_wanted() {
        report_returns(maps);
    }
    maps.sort_unstable_by_key(|e| e.map.base);
    let mut i = 0;
    while i < maps.len() {
        let start = maps[i].map.base;
        let mut end = start;
        while i < maps.len() && maps[i].map.base == end {
            registry::remove(end);
            end += maps[i].map.size;
            i += 1;
        }
        // SAFETY: evicted mappings are no longer referenced by the cache or a
        // user, and `start..end` is exactly a run of them.
        unsafe { os::unmap(start as *mut u8, end - start) };
    }
}

/// Fires `os_return` for each reason among `maps`: bytes mapped, bytes they
/// may have held resident, how many.
fn report_returns(maps: &[Evicted]) {
    let mut sums = [(0usize, 0usize, 0usize); hakmem_common::RETURN_WHYS];
    for e in maps {
        let s = &mut sums[e.why as usize];
        *s = (s.0 + e.map.size, s.1 + e.map.resident, s.2 + 1);
    }
    for why in ReturnWhy::ALL {
        let (bytes, resident, mappings) = sums[why as usize];
        if mappings > 0 {
            probes::os_return(bytes, why, resident, mappings);
        }
    }
}

/// Returns every cached mapping to the OS (it refused a new one). True if there was any.
fn flush_cache() -> bool {
    return_batches(|c, out| c.evict(u64::MAX, 0, ReturnWhy::Refused, out, 0))
}

/// Returns every cached mapping to the OS (`malloc_trim`). True if there was any.
pub fn trim() -> bool {
    return_batches(|c, out| c.evict(u64::MAX, 0, ReturnWhy::Trim, out, 0))
}

pub fn lock_for_fork() {
    CACHE.acquire_for_fork();
}

pub fn unlock_after_fork() {
    CACHE.release_after_fork();
}

impl Cache {
    /// For `map == CHUNK`, a whole chunk for a block of `extent` bytes: among
    /// the `FIT_SCAN` most recently freed, the one whose extent is the smallest
    /// that covers it, else the most recently freed. Each chunk so keeps to
    /// blocks of about one size, and its extent (what a free must count, see
    /// `free`) stays near that size instead of growing to the largest block
    /// it ever held. Otherwise the best fit no more than twice `map`.
    fn take(&mut self, map: usize, extent: usize) -> Option<usize> {
        let c = if map == CHUNK {
            let newest = self.chunk_len.checked_sub(1)?;
            let k = (self.chunk_len.saturating_sub(FIT_SCAN)..self.chunk_len)
                .filter(|&k| self.chunks[self.ring(k)].extent >= extent)
                .min_by_key(|&k| self.chunks[self.ring(k)].extent)
                .unwrap_or(newest);
            self.remove_chunk(k)
        } else {
            let i = (0..self.sized_len)
                .filter(|&i| {
                    self.sized[i].size >= map && self.sized[i].size <= map.saturating_mul(2)
                })
                .min_by_key(|&i| self.sized[i].size)?;
            self.remove_sized(i)
        };
        Some(c.base)
    }

    /// Ring index of the chunk `k` places after the oldest.
    fn ring(&self, k: usize) -> usize {
        (self.chunk_head + k) % KEEP_CHUNKS
    }

    /// Removes the chunk `k` places after the oldest (0 is the oldest,
    /// `chunk_len - 1` the newest); the newer ones move down a place, so the
    /// ring stays in the order freed.
    fn remove_chunk(&mut self, k: usize) -> Cached {
        let c = self.chunks[self.ring(k)];
        if k == 0 {
            self.chunk_head = self.ring(1);
        } else {
            for j in k..self.chunk_len - 1 {
                self.chunks[self.ring(j)] = self.chunks[self.ring(j + 1)];
            }
        }
        self.chunk_len -= 1;
        self.bytes -= c.resident;
        c
    }

    fn remove_sized(&mut self, i: usize) -> Cached {
        let c = self.sized[i];
        self.sized_len -= 1;
        self.sized[i] = self.sized[self.sized_len];
        self.bytes -= c.resident;
        c
    }

    fn oldest_sized(&self) -> Option<usize> {
        (0..self.sized_len).min_by_key(|&i| self.sized[i].freed_at)
    }

    /// The least recently freed mapping of either kind: when it was freed,
    /// and its index in `sized` if it is not a chunk (the oldest chunk is at
    /// the ring's head). A chunk wins a tie.
    fn oldest(&self) -> Option<(u64, Option<usize>)> {
        let chunk = (self.chunk_len > 0).then(|| (self.chunks[self.chunk_head].freed_at, None));
        let sized = self
            .oldest_sized()
            .map(|i| (self.sized[i].freed_at, Some(i)));
        match (chunk, sized) {
            (Some(c), Some(s)) => Some(if s.0 < c.0 { s } else { c }),
            (c, s) => c.or(s),
        }
    }

    /// Removes the least recently freed mapping of either kind, if it was
    /// freed at or before `by` (a `now_ns` time).
    fn evict_oldest(&mut self, by: u64) -> Option<Cached> {
        let (_, sized) = self.oldest().filter(|&(at, _)| at <= by)?;
        Some(match sized {
            Some(i) => self.remove_sized(i),
            None => self.remove_chunk(0),
        })
    }

    /// What the cache may hold resident at most: the sum of what each
    /// mapping may hold, or, when smaller, the process's peak RSS when last
    /// read plus what was cached since. Sound because cached memory is
    /// untouched: what was cached before the reading was resident within it.
    fn held(&self) -> usize {
        if self.ceiling == 0 {
            return self.bytes;
        }
        let since = self.added.wrapping_sub(self.ceiling_mark);
        self.bytes.min(self.ceiling.saturating_add(since))
    }

    /// When the oldest cached mapping is due to go back (`u64::MAX`: nothing
    /// cached): `burst_idle_ns` after its free while the cache holds more
    /// than `CACHE_BYTES`, else `MAX_IDLE_NS`.
    fn due(&self) -> u64 {
        match self.oldest() {
            None => u64::MAX,
            Some((t, _)) if self.held() > CACHE_BYTES => t + burst_idle_ns(),
            Some((t, _)) => t + MAX_IDLE_NS,
        }
    }

    /// Moves into `out[n..]` what has waited long enough (see `due`),
    /// oldest first; returns the new `n`.
    fn decay(&mut self, now: u64, out: &mut [Evicted], n: usize) -> usize {
        let burst_by = now.saturating_sub(burst_idle_ns());
        let n = self.evict(burst_by, CACHE_BYTES, ReturnWhy::Burst, out, n);
        let idle_by = now.saturating_sub(MAX_IDLE_NS);
        self.evict(idle_by, 0, ReturnWhy::Idle, out, n)
    }

    /// Moves into `out[n..]`, oldest first, mappings freed at or before `by`
    /// while the cache may hold more than `keep_bytes` (every cached mapping
    /// counts at least its header page, so 0 means no byte bound); returns the
    /// new `n`. Each goes for `why`.
    fn evict(
        &mut self,
        by: u64,
        keep_bytes: usize,
        why: ReturnWhy,
        out: &mut [Evicted],
        mut n: usize,
    ) -> usize {
        while n < out.len() && self.held() > keep_bytes {
            let Some(map) = self.evict_oldest(by) else {
                break;
            };
            out[n] = Evicted { map, why };
            n += 1;
        }
        n
    }

    /// Caches `m`; writes what must be unmapped into `out` and returns how many.
    fn put(&mut self, m: Cached, out: &mut [Evicted; EVICT_MAX]) -> usize {
        let now = m.freed_at;
        let bound = |map| Evicted {
            map,
            why: ReturnWhy::Bound,
        };
        if m.resident > CACHE_BYTES / 4 {
            out[0] = bound(m);
            return 1;
        }
        let mut n = 0;
        // Make room among mappings of the same kind, then within the byte bound.
        let chunk = m.size == CHUNK;
        if chunk && self.chunk_len == KEEP_CHUNKS {
            while n < EVICT_CHUNKS {
                out[n] = bound(self.remove_chunk(0));
                n += 1;
            }
        } else if let Some(i) = self
            .oldest_sized()
            .filter(|_| !chunk && self.sized_len == CACHE_SLOTS)
        {
            out[n] = bound(self.remove_sized(i));
            n += 1;
        }
        // Over the hard bound: the oldest go, leaving one slot of `out` for `m`.
        let room = hold_bound() - m.resident;
        if self.held() > room {
            n = self.evict(
                u64::MAX,
                room.saturating_sub(EVICT_SLACK),
                ReturnWhy::Bound,
                &mut out[..EVICT_MAX - 1],
                n,
            );
        }
        if self.held() > room {
            out[n] = bound(m);
            return n + 1;
        }
        n = self.decay(now, out, n);
        if chunk {
            let top = self.ring(self.chunk_len);
            self.chunks[top] = m;
            self.chunk_len += 1;
        } else {
            self.sized[self.sized_len] = m;
            self.sized_len += 1;
        }
        self.bytes += m.resident;
        self.added = self.added.wrapping_add(m.resident);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_at(base: usize, freed_at: u64) -> Cached {
        Cached {
            base,
            size: CHUNK,
            extent: PAGE,
            resident: PAGE,
            freed_at,
        }
    }

    #[test]
    fn an_empty_cache_is_all_zero_bytes_so_it_sits_in_bss() {
        static ZERO: Cache = EMPTY;
        // SAFETY: `Cache` is integers only (no padding, no pointers to
        // follow); its bytes are readable for its size.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&ZERO as *const Cache).cast::<u8>(),
                core::mem::size_of::<Cache>(),
            )
        };
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_full_ring_of_chunks_evicts_its_oldest_in_one_batch() {
        let mut cache = EMPTY;
        let mut out = [NO_EVICTION; EVICT_MAX];
        // Addresses only: the cache never touches the memory it tracks.
        for i in 0..KEEP_CHUNKS {
            assert_eq!(cache.put(chunk_at((i + 1) * CHUNK, 1), &mut out), 0);
        }
        let n = cache.put(chunk_at((KEEP_CHUNKS + 1) * CHUNK, 1), &mut out);
        assert_eq!(n, EVICT_CHUNKS);
        let evicted: Vec<usize> = out[..n].iter().map(|e| e.map.base / CHUNK).collect();
        assert_eq!(evicted, (1..=EVICT_CHUNKS).collect::<Vec<_>>());
        assert!(out[..n].iter().all(|e| e.why == ReturnWhy::Bound));
        assert_eq!(cache.chunk_len, KEEP_CHUNKS - EVICT_CHUNKS + 1);
        // The next frees find room without evicting.
        assert_eq!(
            cache.put(chunk_at((KEEP_CHUNKS + 2) * CHUNK, 1), &mut out),
            0
        );
    }

    #[test]
    fn a_burst_beyond_the_reserve_waits_the_burst_delay_and_the_reserve_a_second() {
        let mut cache = EMPTY;
        let mut out = [NO_EVICTION; EVICT_MAX];
        let burst = 2 * CACHE_BYTES / CHUNK;
        // Twice the reserve, wholly touched, freed at t = 1 s.
        let t0 = 1_000_000_000;
        for i in 0..burst {
            let c = Cached {
                extent: CHUNK,
                resident: CHUNK,
                ..chunk_at((i + 1) * CHUNK, t0)
            };
            assert_eq!(cache.put(c, &mut out), 0, "kept, not returned at once");
        }
        assert_eq!(cache.held(), 2 * CACHE_BYTES);
        assert_eq!(cache.due(), t0 + burst_idle_ns());
        // Not yet due.
        assert_eq!(cache.decay(t0 + burst_idle_ns() - 1, &mut out, 0), 0);
        // Due: the oldest go until the reserve is left (32 per call at most).
        let mut returned = Vec::new();
        loop {
            let n = cache.decay(t0 + burst_idle_ns(), &mut out, 0);
            returned.extend(out[..n].iter().map(|e| e.map.base / CHUNK));
            assert!(out[..n].iter().all(|e| e.why == ReturnWhy::Burst));
            if n < EVICT_MAX {
                break;
            }
        }
        assert_eq!(returned, (1..=burst / 2).collect::<Vec<_>>());
        assert_eq!(cache.held(), CACHE_BYTES);
        // The reserve waits a second.
        assert_eq!(cache.due(), t0 + MAX_IDLE_NS);
        assert_eq!(cache.decay(t0 + MAX_IDLE_NS - 1, &mut out, 0), 0);
        assert_eq!(cache.decay(t0 + MAX_IDLE_NS, &mut out, 0), EVICT_MAX);
        assert!(out.iter().all(|e| e.why == ReturnWhy::Idle));
    }

    #[test]
    fn what_the_cache_holds_is_bounded_by_the_peak_rss_read_plus_what_came_since() {
        let mut cache = EMPTY;
        let mut out = [NO_EVICTION; EVICT_MAX];
        for i in 0..4 {
            let c = Cached {
                extent: CHUNK,
                resident: CHUNK,
                ..chunk_at((i + 1) * CHUNK, 1)
            };
            cache.put(c, &mut out);
        }
        assert_eq!(cache.held(), 4 * CHUNK);
        // The process never had more than one chunk's worth resident.
        cache.ceiling = CHUNK;
        cache.ceiling_mark = cache.added;
        assert_eq!(cache.held(), CHUNK);
        // What is cached after the reading counts whole.
        let c = Cached {
            extent: CHUNK,
            resident: CHUNK,
            ..chunk_at(5 * CHUNK, 1)
        };
        cache.put(c, &mut out);
        assert_eq!(cache.held(), 2 * CHUNK);
        // Taking chunks out never makes the bound exceed the sum.
        for _ in 0..4 {
            cache.take(CHUNK, PAGE);
        }
        assert_eq!(cache.held(), CHUNK);
    }

    #[test]
    fn a_chunk_goes_to_the_block_its_extent_fits_best_and_the_rest_keep_their_order() {
        let mut cache = EMPTY;
        let mut out = [NO_EVICTION; EVICT_MAX];
        for (i, kib) in [2048, 512, 1024, 768].into_iter().enumerate() {
            let c = Cached {
                extent: kib << 10,
                ..chunk_at((i + 1) * CHUNK, 1)
            };
            assert_eq!(cache.put(c, &mut out), 0);
        }
        assert_eq!(cache.take(CHUNK, 600 << 10), Some(4 * CHUNK));
        assert_eq!(cache.take(CHUNK, 600 << 10), Some(3 * CHUNK));
        // Nothing covers 3 MiB: the most recently freed.
        assert_eq!(cache.take(CHUNK, 3 << 20), Some(2 * CHUNK));
        assert_eq!(cache.take(CHUNK, 1), Some(CHUNK));
        assert_eq!(cache.take(CHUNK, 1), None);
        assert_eq!(cache.bytes, 0);
    }

    #[test]
    fn evicted_neighbours_are_unmapped_together_and_leave_the_registry() {
        const N: usize = 4;
        let base = os::map_aligned(N * CHUNK, CHUNK) as usize;
        assert_ne!(base, 0);
        // Out of order, as eviction may hand them over.
        let mut maps = [3, 0, 2, 1].map(|i| Evicted {
            map: chunk_at(base + i * CHUNK, 0),
            why: ReturnWhy::Idle,
        });
        for e in &maps {
            registry::insert(e.map.base, SegKind::Large as u8);
        }
        unmap_all(&mut maps);
        for i in 0..N {
            let chunk = base + i * CHUNK;
            assert_eq!(registry::kind(chunk), 0);
            let mut vec = 0u8;
            // SAFETY: mincore only reports on the range; it fails with ENOMEM
            // when the page is not mapped.
            let r = unsafe { libc::mincore(chunk as *mut libc::c_void, PAGE, &mut vec) };
            // Checked at once: a thread of a test running beside that mapped
            // memory just now could be given this hole (a race of microseconds).
            assert_eq!(r, -1, "chunk {i} still mapped");
        }
    }
}
