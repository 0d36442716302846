//! The chunk cache, under every tier: freed 2 MiB chunks and bigger
//! mappings (large blocks', ACE segments' whose blocks are all free,
//! SuperSlabs' whose slabs are all EMPTY) kept for reuse, and the policy for
//! giving them back to the OS.
//!
//! Returning memory costs dearly on these machines (about 3.5 us per page fault
//! to get it back), so freed mappings are cached:
//! - freed chunks are kept (up to `KEEP_CHUNKS`, a ring in the order freed: a
//!   new block takes the best fit among the most recently freed, the oldest is
//!   evicted first) for the next large block, ACE segment or SuperSlab: no
//!   syscall, no page fault for the pages already touched;
//! - bigger mappings are cached by size (`CACHE_SLOTS`): a block takes the
//!   best fit and what it leaves over stays cached (`split_sized`); freed
//!   neighbours join again (`merge_neighbours`); a block bigger than
//!   everything cached takes the biggest and grows it (`take_moved`: its
//!   pages move, only the rest is faulted in).
//!
//! A cached mapping goes back to the OS (oldest first):
//! - when it has gone unused for `MAX_IDLE_NS` (1 s), within a reserve of
//!   `reserve` (64 MiB, or half the bytes of the large blocks live) of what the cached mappings' users touched;
//! - beyond the reserve, a freed burst waits 100 ms (`HAKMEM_PURGE_DELAY_MS`) for the
//!   program to reuse it (a program that frees 800 MB of grown buffers and
//!   exits, or makes the next round of big blocks, pays no munmap; returning
//!   them at once was 13% of such a run);
//! - at once beyond `BURST_BYTES` (1 GiB).
//!
//! Idle mappings are returned at allocator slow paths (`decay_if_due`, from
//! `lifecycle::upkeep` at allocator slow paths), so a program that goes on with
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
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use hakmem_common::{CacheUser, ReturnWhy, TakeSource};

/// What every mapping the cache holds or hands out starts with (a large
/// block's header extends it): a segment header of kind Large, so that the
/// registry and `front::place` know a cached mapping, and a free of a
/// pointer into one finds no live block.
#[repr(C)]
pub struct MapHeader {
    pub seg: SegHeader,
    /// Bytes mapped (CHUNK for chunk-sized blocks).
    pub map_size: usize,
    /// Bytes from the mapping's start that any of its users could have
    /// touched: a cached mapping keeps its pages, so one reused for a smaller
    /// block still holds what a bigger one before it wrote.
    pub extent: usize,
    /// Whether a large block lives in it (never while cached).
    pub live: bool,
    /// Whether `take_moved` may try to move it: no move of it failed. Before
    /// Linux 6.17 mremap refuses to move a range over two kernel mappings
    /// (VMAs), which a joined or moved mapping may be; where it refuses,
    /// the mapping is not tried again.
    pub movable: bool,
}

impl MapHeader {
    pub const fn new(map_size: usize, extent: usize) -> MapHeader {
        MapHeader {
            seg: SegHeader::new(SegKind::Large, 0),
            map_size,
            extent,
            live: false,
            movable: true,
        }
    }
}

/// Freed chunks kept. Programs can keep thousands of realloc-grown buffers
/// and 256 KiB..2 MiB blocks live and free them in a burst; the bounds that
/// matter for memory are `CACHE_BYTES` and `BURST_BYTES`. (40 bytes each, in
/// zero pages until used.)
const KEEP_CHUNKS: usize = 16384;
const CACHE_SLOTS: usize = 64;
/// What the cache keeps for up to `MAX_IDLE_NS` at least: a reserve for
/// programs that make and free big blocks now and then (see `reserve`).
const CACHE_BYTES: usize = 64 << 20;
/// Bytes of the large blocks live (the `large` tier keeps it; `mallinfo`'s
/// hblkhd). The reserve grows with it: see `reserve`.
pub static LARGE_LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// What the cache keeps for up to `MAX_IDLE_NS` before the burst delay
/// applies: `CACHE_BYTES`, or half the bytes of the large blocks live when
/// more. A program that keeps 300 MiB of big blocks and replaces them one by
/// one (the collection's `malloc-large`) finds its next block among the ones
/// it freed, as glibc's heap keeps freed memory in proportion to what is in
/// use: with the fixed 64 MiB, what it freed more than 100 ms ago went back,
/// 286 MB over its run against 143 MB (peak RSS 497 and 502 MB either way).
fn reserve() -> usize {
    CACHE_BYTES.max(LARGE_LIVE_BYTES.load(Ordering::Relaxed) / 2)
}
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

#[derive(Clone, Copy)]
struct Cached {
    base: usize,
    /// Bytes mapped.
    size: usize,
    /// Bytes from `base` that any of its users could have touched.
    extent: usize,
    /// Bytes it may hold resident: its extent, or what mincore counted.
    resident: usize,
    /// When it was freed (`now_ns`). (Whether it may be moved is in its
    /// header, `MapHeader::movable`: read on the rare move path only, it
    /// keeps this entry at 40 bytes, which the ring shifts on every take.)
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

/// `Cache::bytes`, read without the lock: by hakctl (`front::levels`) and by `mallinfo2` (`api::heap_figures`).
pub static RESIDENT: AtomicU64 = AtomicU64::new(0);

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

/// A cached mapping of `map` bytes for a block of `extent` (see
/// `Cache::take`): its start, its header a `MapHeader` with its true size.
pub fn take(map: usize, extent: usize) -> Option<usize> {
    with_cache(|c| c.take(map, extent))
}

/// A mapping of `map` bytes (more than a chunk) made by moving the biggest
/// movable cached mapping smaller than it into a fresh one
/// (`os::move_mapping`): its resident pages come along, and only the rest is
/// faulted in when used. For a program whose big blocks grow from one to the
/// next (the collection's `malloc-large`), most blocks fault in only what
/// they add. None when nothing such is cached or the OS refused (the mapping
/// goes back to the cache, not to be tried again).
pub fn take_moved(map: usize) -> Option<usize> {
    move_into_new(with_cache(|c| c.take_largest_below(map))?, map)
}

/// `take_moved`'s move of `old`, out of the cache, into a fresh mapping of
/// `map` bytes (back to the cache if that fails).
fn move_into_new(old: Cached, map: usize) -> Option<usize> {
    let to = os::map_aligned(map, CHUNK);
    if to.is_null() {
        put_back(old);
        return None;
    }
    // Forgotten first: while its pages move, a stale free into it must find
    // no segment there.
    registry::remove(old.base);
    // SAFETY: `old` is ours (out of the cache, unregistered), `to` is fresh
    // and unused, and they do not overlap.
    if !unsafe { os::move_mapping(old.base as *mut u8, old.size, to, map) } {
        registry::insert(old.base, SegKind::Large as u8);
        put_back(old);
        return None;
    }
    // SAFETY: the header moved with the pages to `to`, which is ours alone.
    unsafe { (*(to as *mut MapHeader)).map_size = map };
    registry::insert(to as usize, SegKind::Large as u8);
    Some(to as usize)
}

/// Runs `f` on the cache under its lock, then publishes when it is next due.
fn with_cache<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    let mut c = CACHE.lock();
    let r = f(&mut c);
    RESIDENT.store(c.bytes as u64, Ordering::Relaxed);
    crate::misuse::check_invariant!(c.check(), c.bytes);
    DUE.store(c.due(), Ordering::Relaxed);
    r
}

/// The `cache_take` probe's source for a mapping that is `fresh` or not.
pub fn source_of(fresh: bool) -> TakeSource {
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
    let cached = take(CHUNK, CHUNK);
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
    unsafe { (chunk as *mut MapHeader).write(MapHeader::new(CHUNK, extent)) };
    registry::insert(chunk, SegKind::Large as u8);
    put(chunk, CHUNK, extent, user);
}

/// Caches the freed mapping at `chunk` (its header up to date, no block
/// live in it), returning to the OS what the cache lets go.
pub fn put(chunk: usize, size: usize, extent: usize, user: CacheUser) {
    let resident = if (MEASURE_MIN..=MEASURE_MAX).contains(&extent) {
        count_resident(chunk, extent)
    } else {
        extent
    };
    probes::cache_put(size, user, resident);
    let now = os::now_ns();
    let freed = Cached {
        base: chunk,
        size,
        extent,
        resident,
        freed_at: now,
    };
    cache(freed);
}

/// Caches `m`, returning to the OS what the cache lets go.
fn cache(m: Cached) {
    let mut evicted = [NO_EVICTION; EVICT_MAX];
    let n = with_cache(|c| c.put(m, &mut evicted));
    unmap_all(&mut evicted[..n]);
}

/// Caches the mapping `m` again as it was (its age too), after `take_moved`
/// could not move it; it is not tried again.
fn put_back(m: Cached) {
    // SAFETY: `m` is a mapping the cache handed out, its header ours.
    unsafe { (*(m.base as *mut MapHeader)).movable = false };
    cache(m);
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
pub fn flush_refused() -> bool {
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
    /// The cache's invariants (feature `invariants`): within its bounds,
    /// `bytes` the sum of what its mappings may hold, and each mapping a
    /// registered, chunk-aligned mapping of its size with no live block,
    /// holding no more than it spans. Lock held.
    #[cfg(any(test, feature = "invariants"))]
    fn check(&self) -> Result<(), &'static str> {
        if self.chunk_len > KEEP_CHUNKS || self.sized_len > CACHE_SLOTS {
            return Err("invariant: the chunk cache holds more than its slots");
        }
        let chunks = (0..self.chunk_len).map(|k| &self.chunks[self.ring(k)]);
        let mut sum = 0usize;
        for m in chunks.chain(&self.sized[..self.sized_len]) {
            sum += m.resident;
            if m.base % CHUNK != 0 || m.size < CHUNK || m.resident > m.size {
                return Err(
                    "invariant: a cached mapping is misaligned or holds more than it spans",
                );
            }
            if registry::kind(m.base) != SegKind::Large as u8 {
                return Err("invariant: a cached mapping is not registered as one");
            }
            // SAFETY: a cached mapping starts with its MapHeader (registered, above).
            let h = unsafe { &*(m.base as *const MapHeader) };
            if h.live || h.map_size != m.size {
                return Err("invariant: a cached mapping's header says otherwise");
            }
        }
        if sum != self.bytes {
            return Err("invariant: the chunk cache's byte count is not its mappings' sum");
        }
        Ok(())
    }

    /// For `map == CHUNK`, a whole chunk for a block of `extent` bytes: among
    /// the `FIT_SCAN` most recently freed, the one whose extent is the smallest
    /// that covers it, else the most recently freed. Each chunk so keeps to
    /// blocks of about one size, and its extent (what a free must count, see
    /// `free`) stays near that size instead of growing to the largest block
    /// it ever held. Otherwise the best fit no more than twice `map`.
    fn take(&mut self, map: usize, extent: usize) -> Option<usize> {
        let c = if map == CHUNK {
            let Some(newest) = self.chunk_len.checked_sub(1) else {
                // A chunk left over by `split_sized`, if any.
                let i = (0..self.sized_len).find(|&i| self.sized[i].size == CHUNK)?;
                return Some(self.remove_sized(i).base);
            };
            let k = (self.chunk_len.saturating_sub(FIT_SCAN)..self.chunk_len)
                .filter(|&k| self.chunks[self.ring(k)].extent >= extent)
                .min_by_key(|&k| self.chunks[self.ring(k)].extent)
                .unwrap_or(newest);
            self.remove_chunk(k)
        } else {
            let i = (0..self.sized_len)
                .filter(|&i| self.sized[i].size >= map)
                .min_by_key(|&i| self.sized[i].size)?;
            self.split_sized(i, map)
        };
        Some(c.base)
    }

    /// Takes the first `map` bytes (rounded up to chunks) of the cached
    /// mapping `sized[i]`; what is left of it, a chunk or more, stays cached
    /// in its slot as a mapping of its own, its header written (a page of
    /// it, under the lock) and registered. A program whose big blocks change
    /// size (the collection's `malloc-large`: 5..25 MiB) so reuses what it
    /// freed instead of mapping, and faulting in, each block anew: with the
    /// best fit only up to twice the size and no split, two blocks in three
    /// were fresh mappings, 12.97 s against glibc's 2.48 s.
    fn split_sized(&mut self, i: usize, map: usize) -> Cached {
        let whole = self.sized[i];
        let head = map.next_multiple_of(CHUNK);
        if whole.size - head.min(whole.size) < CHUNK {
            return self.remove_sized(i);
        }
        // Its header, written below, is a page it holds whatever it held before.
        let rest_extent = whole.extent.saturating_sub(head).max(PAGE);
        let rest = Cached {
            base: whole.base + head,
            size: whole.size - head,
            extent: rest_extent,
            resident: whole.resident.min(rest_extent).max(PAGE),
            ..whole
        };
        // The registry entry first: where a block grew in place (mremap)
        // into address space no mapping of ours held before, its page of the
        // table may not be writable yet. Without it the rest stays whole.
        if !registry::prepare(rest.base, PAGE) {
            return self.remove_sized(i);
        }
        // SAFETY: `rest` lies inside a cached mapping, which is ours (lock
        // held) and nobody references; its start is writable. The head's
        // header is the mapping's own, at its start.
        unsafe {
            let movable = (*(whole.base as *const MapHeader)).movable;
            (rest.base as *mut MapHeader).write(MapHeader {
                movable,
                ..MapHeader::new(rest.size, rest.extent)
            });
            let h = &mut *(whole.base as *mut MapHeader);
            h.map_size = head;
            h.extent = h.extent.min(head);
        }
        registry::insert(rest.base, SegKind::Large as u8);
        self.sized[i] = rest;
        self.bytes = self.bytes - whole.resident + rest.resident;
        Cached {
            size: head,
            extent: whole.extent.min(head),
            ..whole
        }
    }

    /// `m` (bigger than a chunk) joined with the cached mappings bigger than
    /// a chunk right below and above it, which leave their slots: the pieces
    /// `split_sized` cut from one mapping come together again when their
    /// blocks are freed, so a bigger block finds them as one. The joined
    /// mapping's header is the lowest one's (written under the lock, a page
    /// that was a header already); the others are no longer registered.
    fn merge_neighbours(&mut self, mut m: Cached) -> Cached {
        let touching =
            |c: &Cached, m: &Cached| c.base + c.size == m.base || m.base + m.size == c.base;
        while let Some(i) = (0..self.sized_len).find(|&i| touching(&self.sized[i], &m)) {
            let c = self.remove_sized(i);
            let (low, high) = if c.base < m.base { (c, m) } else { (m, c) };
            registry::remove(high.base);
            m = Cached {
                base: low.base,
                size: low.size + high.size,
                // What the upper part may hold counts from where it starts.
                extent: if high.extent > 0 {
                    low.size + high.extent
                } else {
                    low.extent
                },
                resident: low.resident + high.resident,
                freed_at: low.freed_at.max(high.freed_at),
            };
            // SAFETY: both start mappings the cache owns (lock held), with
            // their headers; `low`'s header page is ours to write.
            unsafe {
                let movable = (*(low.base as *const MapHeader)).movable
                    && (*(high.base as *const MapHeader)).movable;
                (m.base as *mut MapHeader).write(MapHeader {
                    movable,
                    ..MapHeader::new(m.size, m.extent)
                })
            };
        }
        m
    }

    /// Removes the biggest movable mapping larger than a chunk and smaller
    /// than `map`.
    fn take_largest_below(&mut self, map: usize) -> Option<Cached> {
        let i = (0..self.sized_len)
            .filter(|&i| {
                let m = &self.sized[i];
                // SAFETY: a cached mapping starts with its header (lock held).
                m.size > CHUNK && m.size < map && unsafe { (*(m.base as *const MapHeader)).movable }
            })
            .max_by_key(|&i| self.sized[i].size)?;
        Some(self.remove_sized(i))
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
            Some((t, _)) if self.held() > reserve() => t + burst_idle_ns(),
            Some((t, _)) => t + MAX_IDLE_NS,
        }
    }

    /// Moves into `out[n..]` what has waited long enough (see `due`),
    /// oldest first; returns the new `n`.
    fn decay(&mut self, now: u64, out: &mut [Evicted], n: usize) -> usize {
        let burst_by = now.saturating_sub(burst_idle_ns());
        let n = self.evict(burst_by, reserve(), ReturnWhy::Burst, out, n);
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
        let chunk = m.size == CHUNK;
        let m = if chunk { m } else { self.merge_neighbours(m) };
        if m.resident > hold_bound() / 4 {
            out[0] = bound(m);
            return 1;
        }
        let mut n = 0;
        // Make room among mappings of the same kind, then within the byte bound.
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
    fn the_cache_checker_sees_counts_and_headers_that_disagree() {
        let mut c = Box::new(EMPTY);
        assert_eq!(c.check(), Ok(()));
        let base = os::map_chunk() as usize;
        assert!(base != 0);
        // SAFETY: a fresh chunk of ours, its header written as `cache_chunk` does.
        unsafe { (base as *mut MapHeader).write(MapHeader::new(CHUNK, PAGE)) };
        registry::insert(base, SegKind::Large as u8);
        let mut out = [NO_EVICTION; EVICT_MAX];
        assert_eq!(c.put(chunk_at(base, 1), &mut out), 0);
        assert_eq!(c.check(), Ok(()));
        c.bytes += 1;
        assert!(c.check().unwrap_err().contains("byte count"));
        c.bytes -= 1;
        // SAFETY: as above.
        unsafe { (*(base as *mut MapHeader)).live = true };
        assert!(c.check().unwrap_err().contains("header"));
        registry::remove(base);
        assert!(c.check().unwrap_err().contains("registered"));
        // SAFETY: ours; the registry no longer names it.
        unsafe { os::unmap(base as *mut u8, CHUNK) };
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

    /// A cached mapping of `chunks` chunks at `base`, its header written
    /// and registered as `put` finds a freed one; wholly touched.
    fn sized_at(base: usize, chunks: usize) -> Cached {
        let size = chunks * CHUNK;
        // SAFETY: `base` starts a mapping of ours of at least `size` bytes.
        unsafe { (base as *mut MapHeader).write(MapHeader::new(size, size)) };
        registry::insert(base, SegKind::Large as u8);
        Cached {
            base,
            size,
            extent: size,
            resident: size,
            freed_at: 1,
        }
    }

    #[test]
    fn a_big_mapping_is_split_for_a_smaller_block_and_joined_again_when_freed() {
        let base = os::map_aligned(8 * CHUNK, CHUNK) as usize;
        assert_ne!(base, 0);
        let mut cache = Box::new(EMPTY);
        let mut out = [NO_EVICTION; EVICT_MAX];
        assert_eq!(cache.put(sized_at(base, 8), &mut out), 0);
        // A block of 3 chunks less a page takes the first 3; 5 stay cached.
        assert_eq!(cache.take(3 * CHUNK - PAGE, 3 * CHUNK - PAGE), Some(base));
        assert_eq!(cache.check(), Ok(()));
        assert_eq!(
            (cache.sized_len, cache.sized[0].base),
            (1, base + 3 * CHUNK)
        );
        assert_eq!(cache.bytes, 5 * CHUNK);
        // SAFETY: both headers are ours (the taken one is the caller's now).
        unsafe {
            assert_eq!((*(base as *const MapHeader)).map_size, 3 * CHUNK);
            assert_eq!(
                (*((base + 3 * CHUNK) as *const MapHeader)).map_size,
                5 * CHUNK
            );
        }
        // A mapping only a few pages smaller than the rest is not split.
        assert_eq!(cache.take(5 * CHUNK - 3 * PAGE, 1), Some(base + 3 * CHUNK));
        assert_eq!(cache.sized_len, 0);
        // Freed in either order, the pieces become one mapping again, registered once.
        assert_eq!(cache.put(sized_at(base + 3 * CHUNK, 5), &mut out), 0);
        assert_eq!(cache.put(sized_at(base, 3), &mut out), 0);
        assert_eq!(cache.check(), Ok(()));
        assert_eq!(
            (cache.sized_len, cache.sized[0].base, cache.sized[0].size),
            (1, base, 8 * CHUNK)
        );
        assert_eq!(registry::kind(base + 3 * CHUNK), 0);
        // Nothing is at least 9 chunks: the biggest below is the one to move.
        assert_eq!(cache.take(9 * CHUNK, 1), None);
        let moved = cache.take_largest_below(9 * CHUNK).expect("the 8 chunks");
        assert_eq!((moved.base, moved.size), (base, 8 * CHUNK));
        // A mapping whose move failed is not tried again.
        // SAFETY: the mapping is ours, its header at its start.
        unsafe { (*(moved.base as *mut MapHeader)).movable = false };
        cache.put(moved, &mut out);
        assert!(cache.take_largest_below(9 * CHUNK).is_none());
        // Every cached mapping counts at least its header page: eviction
        // empties the cache.
        let n = cache.evict(u64::MAX, 0, ReturnWhy::Trim, &mut out, 0);
        assert_eq!((n, cache.sized_len, cache.bytes), (1, 0, 0));
        unmap_all(&mut out[..n]);
        assert_eq!(registry::kind(base), 0);
    }

    #[test]
    fn a_split_leaves_a_rest_that_counts_its_header_page_and_a_chunk_serves_a_chunk() {
        let base = os::map_aligned(4 * CHUNK, CHUNK) as usize;
        assert_ne!(base, 0);
        let mut cache = Box::new(EMPTY);
        let mut out = [NO_EVICTION; EVICT_MAX];
        // A block that touched only its first page (a buffer grown big by realloc).
        let m = Cached {
            extent: PAGE,
            resident: PAGE,
            ..sized_at(base, 4)
        };
        assert_eq!(cache.put(m, &mut out), 0);
        assert_eq!(cache.take(3 * CHUNK, 3 * CHUNK), Some(base));
        // The rest, one chunk, holds its header page; a chunk request takes it.
        assert_eq!(
            (cache.sized[0].size, cache.sized[0].resident),
            (CHUNK, PAGE)
        );
        assert_eq!(cache.check(), Ok(()));
        assert_eq!(cache.take(CHUNK, PAGE), Some(base + 3 * CHUNK));
        assert_eq!((cache.sized_len, cache.bytes), (0, 0));
        registry::remove(base);
        registry::remove(base + 3 * CHUNK);
        // SAFETY: ours, out of the cache, no longer registered.
        unsafe { os::unmap(base as *mut u8, 4 * CHUNK) };
    }

    #[test]
    fn a_cached_mapping_moves_into_a_bigger_one_with_its_pages() {
        let base = os::map_aligned(3 * CHUNK, CHUNK) as usize;
        assert_ne!(base, 0);
        // SAFETY: ours.
        unsafe { ((base + CHUNK) as *mut u8).write(7) };
        let m = sized_at(base, 3);
        // A cache of the test's own: the process's is shared with the other
        // tests' allocations (hakmem is this binary's malloc), which may take
        // the mapping first.
        let mut cache = Box::new(EMPTY);
        let mut out = [NO_EVICTION; EVICT_MAX];
        assert_eq!(cache.put(m, &mut out), 0);
        let old = cache
            .take_largest_below(5 * CHUNK)
            .expect("the smaller mapping");
        assert_eq!(old.base, base);
        let to = move_into_new(old, 5 * CHUNK).expect("moved");
        assert_ne!(to, base);
        assert_eq!(registry::kind(base), 0, "the old place is forgotten");
        assert_eq!(registry::kind(to), SegKind::Large as u8);
        // SAFETY: the moved mapping is ours; its header came along.
        unsafe {
            assert_eq!(((to + CHUNK) as *const u8).read(), 7);
            assert_eq!((*(to as *const MapHeader)).map_size, 5 * CHUNK);
        }
        registry::remove(to);
        // SAFETY: ours, no longer registered.
        unsafe { os::unmap(to as *mut u8, 5 * CHUNK) };
    }

    #[test]
    fn a_moved_mapping_keeps_its_pages_and_contents() {
        let old = os::map_aligned(2 * CHUNK, CHUNK);
        let to = os::map_aligned(5 * CHUNK, CHUNK);
        assert!(!old.is_null() && !to.is_null());
        // SAFETY: both ours; the move leaves `to` with `old`'s pages and
        // unmaps `old`.
        unsafe {
            old.add(CHUNK + 7).write(0x5a);
            assert!(os::move_mapping(old, 2 * CHUNK, to, 5 * CHUNK));
            assert_eq!(to.add(CHUNK + 7).read(), 0x5a);
            assert_eq!(to.add(3 * CHUNK).read(), 0, "the rest is fresh");
            let mut vec = 0u8;
            let r = libc::mincore(old.cast(), PAGE, &mut vec);
            assert_eq!(r, -1, "the old range is unmapped");
            os::unmap(to, 5 * CHUNK);
        }
    }
}
