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

use crate::os;
use crate::probes;
use crate::registry::{self, CHUNK};
use crate::segment::{SegHeader, SegKind};
use crate::sync::SpinLock;
use core::sync::atomic::{AtomicU64, Ordering};
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
}

impl MapHeader {
    pub const fn new(map_size: usize, extent: usize) -> MapHeader {
        MapHeader {
            seg: SegHeader::new(SegKind::Large, 0),
            map_size,
            extent,
            live: false,
        }
    }
}

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
    use crate::os::PAGE;

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
}
