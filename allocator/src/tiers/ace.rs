//! ACE, the adaptive mid-size pool (1 KiB < size <= 256 KiB, classes in
//! `hakmem_common::ACE_CLASS_SIZES`).
//!
//! Each class has a per-thread cache in front of a locked pool of 2 MiB
//! segments dedicated to the class. The cache's capacity adapts: it doubles on
//! every miss (the thread wants more than it keeps) and halves when the cache
//! overflows twice with no miss in between (the thread keeps more than it
//! uses). A refill takes half the cap, at most about 16 KiB (REFILL_BYTES).
//! A segment whose blocks are all free stays with its class while the
//! class keeps fewer than four such segments and all classes together fewer
//! than 32; beyond that its chunk goes to the chunk cache, which gives it to
//! the next segment or large block or returns it to the OS by its policy
//! (`large`: a reserve kept up to a second, bursts 100 ms). A new segment
//! takes a chunk from that cache before it maps one. The kept segments are
//! ACE's reserve: one unused for 10 s (`KEPT_IDLE_NS`) gives its pages back
//! and stays, its address space kept (`purge_if_due`).
//!
//! A refill maps a new segment (`take_from`) and writes the first words of
//! the blocks it carves (`Taken::link_carved`), their page faults, without
//! the class lock: held across them, the other thread of a two-thread
//! program slept on the lock for milliseconds (rptest).
//!
//! A block carved past what a segment has touched (since it was mapped or
//! purged) reads as zero but its first two words: `refill` says so of the
//! block it returns, and `calloc` clears only those (`CARVE_WRITES`).
//!
//! Failures, each an `ace_fail` probe, fall through to the large path:
//! Threshold (size above `HAKMEM_ACE_MAX_BYTES`), Exhaustion (the class may not
//! grow past `HAKMEM_ACE_MAX_SEGMENTS`), MapFail (the OS refused a segment).

use crate::class::{ace_class, ACE_CLASS_SIZES};
use crate::config;
use crate::hardening::CacheMode;
use crate::probes;
use crate::registry::{self, CHUNK};
use crate::segment::{SegHeader, SegKind};
use crate::superslab::Block;
use crate::sync::SpinLock;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use hakmem_common::{AceFailKind, CacheUser, ReturnWhy, ACE_CLASSES, NO_CLASS};

/// Bytes at the start of a segment before its first block (the header).
pub const HEADER_RESERVE: usize = 4096;
/// Blocks sit `block size + COLOR` apart. Every ACE class is a whole number
/// of KiB, so without the pad every block would start at one of a few offsets
/// in its page and the blocks' first lines would all fall into a few cache
/// sets: in a 1 MiB L2 model, the mid workload missed twice as often.
/// With it, consecutive blocks step through the sets. Blocks are 64-byte
/// aligned (see `api::alloc_aligned`).
pub const COLOR: usize = 64;
const MIN_CAP: u32 = 2;
/// Bytes at a block's start that taking it from its segment may have
/// written (the link, and the key in `HAKMEM_CHECK_FREES` mode): all that
/// `calloc` clears of a block `AceCache::refill` says reads as zero.
pub const CARVE_WRITES: usize = core::mem::size_of::<Block>();
/// About the most bytes of blocks one refill takes from the class, rounded
/// up to whole blocks (at least one; classes of 16 KiB and up take one
/// block a miss, their caches filled by frees). Half the cap was up to 32
/// blocks: 512 KiB of 16 KiB ones, 1 MiB of 32 KiB ones, each carved (its
/// first page touched by the link) for a cache that may not need them.
/// mimalloc-bench's rptest (2 threads, 8..16000 bytes, 500 loops; 10
/// interleaved pairs): 64 KiB made 5% more operations per second, 5% fewer
/// page faults, peak RSS 29.1 MiB against 30.6; hakbench (`suite-ab.sh`, 7
/// repetitions, pinned) big 1.045 and mid 0.997 in operations per second.
/// 16 KiB against 64 KiB (twenty-sixth session; rptest, `rptest-ab.sh`, 12
/// pairs in each order): 1.147 and 1.111 in operations a CPU second, page
/// faults 6,381 against 7,680 and 5,215 against 7,347, peak RSS 23 against
/// 27 and 18 against 27 MiB; hakbench's mid, big, mixed, mixed-2t,
/// working-set-2t and prodcons level (`suite-ab.sh`, pinned, scale 8, 5
/// repetitions: 0.990-1.004), the collection's alloc-test1 1.002 in time,
/// glibc-thread 0.981 and 0.995 in iterations (6 and 8 pairs).
const REFILL_BYTES: usize = 16 << 10;
/// Most blocks a thread cache of each class may hold: 64, or fewer for the
/// big classes so that no class holds more than about 2 MiB per thread.
const MAX_CAP: [u32; ACE_CLASSES] = {
    let mut t = [0u32; ACE_CLASSES];
    let mut c = 0;
    while c < ACE_CLASSES {
        let n = (2 << 20) / ACE_CLASS_SIZES[c];
        t[c] = if n > 64 { 64 } else { n as u32 };
        c += 1;
    }
    t
};
const _: () = assert!(MAX_CAP[ACE_CLASSES - 1] >= MIN_CAP);
const _: () = assert!(MAX_CAP[0] <= u16::MAX as u32);
/// Free segments a class keeps before handing more to the chunk cache.
const KEEP_FREE_SEGMENTS: usize = 4;
/// Free segments all classes together keep mapped (64 MiB; checked without a
/// common lock, so two classes at once may pass it by one each). With 47
/// classes, four each could hold 376 MiB of a program's freed memory.
const KEEP_FREE_TOTAL: usize = 32;
static FREE_KEPT: AtomicUsize = AtomicUsize::new(0);

/// Bytes of the segments kept with every block free.
pub fn free_segment_bytes() -> usize {
    FREE_KEPT.load(Ordering::Relaxed) * CHUNK
}

/// A thread's cache of one class.
struct ClassCache {
    head: *mut Block,
    count: u32,
    /// Small fields, so that the thread cache (with one of these per class)
    /// fits glibc's static TLS surplus for a `dlopen` (see `tls`).
    ///
    /// 0: not set up (new, or emptied at thread exit). It reads as MIN_CAP,
    /// but the first free into it overflows, so that `free_slow` registers
    /// the thread's exit hook before the cache keeps anything.
    cap: u16,
    /// Whether the cache ran empty since its last flush.
    missed_since_flush: bool,
}

impl ClassCache {
    const NEW: ClassCache = ClassCache {
        head: null_mut(),
        count: 0,
        // 0 reads as MIN_CAP (see `cap`): the cache is all zeros when new,
        // so it can live in zero-initialised thread-local storage.
        cap: 0,
        missed_since_flush: false,
    };

    const fn is_zero(&self) -> bool {
        self.head.is_null() && self.count == 0 && self.cap == 0 && !self.missed_since_flush
    }

    #[inline(always)]
    fn cap(&self) -> u32 {
        (self.cap as u32).max(MIN_CAP)
    }
}

#[repr(C)]
struct AceSegment {
    hdr: SegHeader,
    block_size: u32,
    capacity: u32,
    used: u32,
    carved: u32,
    free: *mut Block,
    /// Links in the class's partial or free list.
    next: *mut AceSegment,
    prev: *mut AceSegment,
    list: SegList,
    /// When `keep_free` kept it (`os::now_ns`), for `KEPT_IDLE_NS`.
    kept_at: u64,
    /// How far from the segment's start pages may be resident besides its
    /// carved blocks: all of it for a chunk the chunk cache had (its last
    /// user's pages), the header for a fresh mapping or after a purge.
    touched_end: u32,
}

impl AceSegment {
    /// Offset of the first block not yet carved: every byte below it may
    /// have been touched.
    fn carved_end(&self) -> usize {
        HEADER_RESERVE + self.carved as usize * (self.block_size as usize + COLOR)
    }

    /// Offset below which every resident page of the segment lies.
    fn resident_end(&self) -> usize {
        self.carved_end().max(self.touched_end as usize)
    }

    /// Whether pages past the header may be resident.
    fn holds_pages(&self) -> bool {
        self.resident_end() > HEADER_RESERVE
    }

    /// Gives the pages of a segment with every block free back to the OS
    /// (`os::decommit`; the address space and the header stay) and forgets
    /// its blocks, which the next `take` carves again. The bytes given back
    /// (at most: some may not have been resident), or None if the OS
    /// refused (locked pages).
    fn purge(&mut self) -> Option<usize> {
        let start = self as *mut AceSegment as usize + HEADER_RESERVE;
        let len = self.resident_end().next_multiple_of(crate::os::PAGE) - HEADER_RESERVE;
        // SAFETY: the segment's own mapping past its header (`resident_end`
        // is at most CHUNK, which is page-aligned), with no block out (every
        // block is free, and the class lock is held).
        let dropped = unsafe { crate::os::decommit(start as *mut u8, len) };
        self.carved = 0;
        self.free = null_mut();
        // Refused, the pages keep their last users' bytes: touched, so that
        // no block carved from them is taken for zero (`Carved::last_zero`).
        self.touched_end = if dropped {
            HEADER_RESERVE
        } else {
            HEADER_RESERVE + len
        } as u32;
        dropped.then_some(len)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SegList {
    None,
    Partial,
    Free,
}

struct AceClass {
    /// Segments with some blocks free and some in use.
    partial: *mut AceSegment,
    /// Segments with every block free.
    free: *mut AceSegment,
    free_count: usize,
    segments: usize,
}

// SAFETY: the raw pointers are only touched under the class lock.
unsafe impl Send for AceClass {}

impl AceClass {
    /// A class with no segment.
    const EMPTY: AceClass = AceClass {
        partial: null_mut(),
        free: null_mut(),
        free_count: 0,
        segments: 0,
    };
}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_CLASS: SpinLock<AceClass> = SpinLock::new(AceClass::EMPTY);
static CLASSES: [SpinLock<AceClass>; ACE_CLASSES] = [NEW_CLASS; ACE_CLASSES];

/// Where the count of class 0's cache lies in an `AceCache`, how far apart
/// the classes' are, and where a segment keeps its counts (u32 each): what
/// hakctl reads (`front::levels`).
pub const CACHE_COUNT_AT: usize =
    core::mem::offset_of!(AceCache, classes) + core::mem::offset_of!(ClassCache, count);
pub const CACHE_STRIDE: usize = core::mem::size_of::<ClassCache>();
pub const SEG_USED_AT: usize = core::mem::offset_of!(AceSegment, used);
pub const SEG_CAPACITY_AT: usize = core::mem::offset_of!(AceSegment, capacity);
pub const SEG_CARVED_AT: usize = core::mem::offset_of!(AceSegment, carved);

/// A thread's ACE part of its state (`thread::ThreadCache`): a cache per class.
pub struct AceCache {
    classes: [ClassCache; ACE_CLASSES],
}

/// Blocks a thread's cache of `class` let go (`AceCache::free_slow`): a
/// chain of `n` free blocks at `head`.
#[must_use]
pub struct Flushed {
    class: usize,
    head: *mut Block,
    n: u32,
}

impl Flushed {
    /// Returns the blocks to their segments (the class lock; segments
    /// whose blocks are all free may go to the chunk cache).
    pub fn give_back(self) {
        give_back(self.class, self.head, self.n);
    }
}

/// The ACE class serving `size` (TINY_MAX < size <= ACE_MAX), or None after
/// firing `ace_fail` Threshold (the caller falls back to the large path).
#[inline(always)]
pub fn class_for(size: usize) -> Option<usize> {
    if size > config::get().ace_max_bytes {
        probes::ace_fail(AceFailKind::Threshold, size, NO_CLASS);
        return None;
    }
    Some(ace_class(size))
}

impl AceCache {
    /// An empty cache: all zero bytes.
    pub const NEW: AceCache = AceCache {
        classes: [ClassCache::NEW; ACE_CLASSES],
    };

    pub const fn is_zero(&self) -> bool {
        let mut i = 0;
        while i < ACE_CLASSES {
            if !self.classes[i].is_zero() {
                return false;
            }
            i += 1;
        }
        true
    }

    /// A block of `class` from the cache; null if it is empty.
    #[inline(always)]
    pub fn alloc_cached(&mut self, class: usize) -> *mut u8 {
        let c = &mut self.classes[class];
        let b = c.head;
        if !b.is_null() {
            // SAFETY: cached blocks are free and link through their first word.
            // (No key to clear: with `HAKMEM_CHECK_FREES=1` the cache is
            // always empty here, see `free_slow`.)
            c.head = unsafe { Block::next(b) };
            c.count -= 1;
        }
        b.cast()
    }

    /// The cache of `class` ran empty: a block of `size` for the caller and
    /// more in the cache, from the class's segments; null after firing
    /// `ace_fail` (the caller falls back to the large path). (The front has
    /// run `lifecycle::before_refill`.) With it, whether the block reads as
    /// zero past its first two words (`Taken::link_carved`): what `calloc`
    /// need not clear.
    #[cold]
    #[inline(never)]
    pub fn refill(&mut self, mode: CacheMode, class: usize, size: usize) -> (*mut u8, bool) {
        let check = mode.checks_frees();
        let c = &mut self.classes[class];
        let want = if check || mode.keeps_nothing() {
            // Every free checked, or no exit hook or listing: the cache
            // keeps nothing (`free_slow`).
            1
        } else {
            c.cap = (c.cap() * 2).min(MAX_CAP[class]) as u16;
            c.missed_since_flush = true;
            (c.cap() / 2).min(REFILL_BYTES.div_ceil(ACE_CLASS_SIZES[class]) as u32)
        };
        let mut head = null_mut();
        let taken = match take_from(&CLASSES[class], class, want.max(1), &mut head) {
            Ok(taken) => taken,
            Err(kind) => {
                probes::ace_fail(kind, size, class as u64);
                return (null_mut(), false);
            }
        };
        // The class lock is released: new blocks' pages fault in here.
        let head_zero = taken.link_carved(&mut head);
        let n = taken.n;
        // SAFETY: `take` and `link_carved` linked n >= 1 free blocks at `head`.
        let rest = unsafe { Block::next(head) };
        // Keep all but the first block in the cache.
        let mut tail = head;
        for _ in 1..n {
            // SAFETY: walking the n-block chain they built.
            tail = unsafe { Block::next(tail) };
        }
        if n > 1 {
            // SAFETY: `tail` is the chain's last block.
            unsafe { Block::set_next(tail, c.head) };
            c.head = rest;
            c.count += n - 1;
        }
        // SAFETY: the first block goes to the caller.
        unsafe { Block::mark_in_use(head, check) };
        (head.cast(), head_zero)
    }

    /// Frees an ACE block of `class` into the cache. True if the cache
    /// overflowed, or was not set up: the caller then registers the thread
    /// (`lifecycle`) and calls `free_slow`.
    #[inline(always)]
    pub fn free(&mut self, mode: CacheMode, ptr: *mut u8, class: usize) -> bool {
        let check = mode.checks_frees();
        let c = &mut self.classes[class];
        let b = ptr as *mut Block;
        // SAFETY: the user freed the block; its words become the link and key.
        if c.head == b || !unsafe { Block::mark_free(b, check) } {
            crate::misuse::invalid_free(crate::misuse::DOUBLE_FREE, ptr as usize);
            return false;
        }
        // SAFETY: as above.
        unsafe { Block::set_next(b, c.head) };
        c.head = b;
        c.count += 1;
        // The raw cap: 0 (not set up) sends the first free to the slow path.
        c.count > c.cap as u32
    }

    /// A free that overflowed the cache, or the first into a cache not set
    /// up: possibly of a thread that has made no allocation of its own (a
    /// consumer of others' blocks), which the front has just registered:
    /// without its exit hook, what the cache holds would stay behind when
    /// the thread exits.
    /// What it takes off the cache comes back for the caller to hand to
    /// the class (`Flushed::give_back`) once it no longer holds the thread
    /// cache.
    #[cold]
    #[inline(never)]
    pub fn free_slow(&mut self, mode: CacheMode, class: usize) -> Option<Flushed> {
        // Every free checked (a block the cache held would be handed out
        // again unchecked), or a thread with no exit hook or no slot in the
        // list hakctl reads (what it held would be stranded at its exit, and
        // uncounted): the cache holds nothing, and its raw cap stays 0, so
        // every free comes here.
        let keep_none = mode.checks_frees() || mode.keeps_nothing();
        let c = &mut self.classes[class];
        if !keep_none {
            c.cap = c.cap() as u16;
            if c.count <= c.cap() {
                return None;
            }
        }
        if !c.missed_since_flush && !keep_none {
            c.cap = (c.cap() / 2).max(MIN_CAP) as u16;
        }
        c.missed_since_flush = false;
        let keep = if keep_none { 0 } else { c.cap() / 2 };
        let n = c.count - keep;
        let head = c.head;
        let mut last = head;
        for _ in 1..n {
            // SAFETY: n <= count blocks are on the list.
            last = unsafe { Block::next(last) };
        }
        // SAFETY: `last` is the n-th block; cut the list after it.
        c.head = unsafe { Block::next(last) };
        // SAFETY: as above.
        unsafe { Block::set_next(last, null_mut()) };
        c.count = keep;
        Some(Flushed { class, head, n })
    }

    /// Thread exit: every cached block back to its segment.
    pub fn release_thread(&mut self) {
        for (class, c) in self.classes.iter_mut().enumerate() {
            if c.count > 0 {
                let (head, n) = (c.head, c.count);
                c.head = null_mut();
                c.count = 0;
                give_back(class, head, n);
            }
            // Not set up: a free after this (from a later thread-exit
            // destructor) registers the hook again before anything is kept.
            c.cap = 0;
        }
    }
}

fn give_back(class: usize, b: *mut Block, n: u32) {
    give_back_to(&CLASSES[class], b, n);
}

/// `give_back` into `pool` (the tests' pools are their own). Segments
/// found with every block free go to the chunk cache four at a time, with
/// the lock let go. (A flush that emptied more than four kept the rest,
/// uncounted: the class's count fell short of its segments and, once they
/// all went, wrapped, after which the class refused every refill.)
fn give_back_to(pool: &SpinLock<AceClass>, mut b: *mut Block, mut n: u32) {
    while n > 0 {
        let mut release: [*mut AceSegment; 4] = [null_mut(); 4];
        let mut released = 0;
        {
            let mut pool = pool.lock();
            while n > 0 && released < release.len() {
                // SAFETY: each block of the chain is a free ACE block of the class.
                let next = unsafe { Block::next(b) };
                let seg = crate::segment::chunk_of(b as usize) as *mut AceSegment;
                if let Some(s) = pool.put(seg, b) {
                    release[released] = s;
                    released += 1;
                }
                b = next;
                n -= 1;
            }
        }
        hand_to_cache(&release[..released]);
    }
}

/// Hands segments whose blocks are all free, and which the caller has taken
/// off every list, to the chunk cache (outside the class lock).
fn hand_to_cache(segments: &[*mut AceSegment]) {
    for &s in segments {
        // SAFETY: per the contract, nothing references the segment any more.
        unsafe { crate::chunks::cache_chunk(s as usize, (*s).resident_end(), CacheUser::Ace) };
    }
}

/// `malloc_trim`: the free segments every class keeps go to the chunk cache
/// (which `chunks::trim` then empties), a few at a time so that none is
/// handed over under the class lock. True if there were any.
pub fn trim() -> bool {
    let mut any = false;
    for class in CLASSES.iter() {
        loop {
            let mut free: [*mut AceSegment; KEEP_FREE_SEGMENTS] = [null_mut(); KEEP_FREE_SEGMENTS];
            let mut n = 0;
            {
                let mut pool = class.lock();
                while n < free.len() {
                    let Some(s) = pool.release_kept() else {
                        break;
                    };
                    free[n] = s;
                    n += 1;
                }
            }
            if n == 0 {
                break;
            }
            any = true;
            hand_to_cache(&free[..n]);
        }
    }
    any
}

/// When the oldest kept segment with resident pages is due to give them
/// back (`os::now_ns` time), u64::MAX when none waits; possibly early
/// (then the check finds nothing due and sets it again). Read without a lock.
static PURGE_DUE: AtomicU64 = AtomicU64::new(u64::MAX);

/// How long a kept segment keeps its pages unused: 10 s, as jemalloc's
/// dirty pages decay, rather than the purge delay (100 ms) or the chunk
/// cache's reserve's second. A program that goes back to the same sizes
/// within seconds faults every page in again (512 faults a segment):
/// mimalloc-bench's rptest, whose second round starts new threads about
/// 4 s after the first, took a median of 44% more page faults with the
/// purge delay (10,100 against 7,000; 5 interleaved runs) and 31% more
/// with a second (11,400 against 8,700; 6 runs) and 24% fewer operations
/// a second, and peaked about as high. An idle program gets at most 64 MiB
/// (`KEEP_FREE_TOTAL`) back 10 s later, at its next slow path or from the
/// purge thread.
const KEPT_IDLE_NS: u64 = 10_000_000_000;

/// `KEPT_IDLE_NS`, or 0 with `HAKMEM_PURGE_DELAY_MS=0` (everything goes
/// back at the first chance: the knob's A/B, and the real-program tests'
/// way of purging as often as can be).
fn kept_idle_ns() -> u64 {
    if config::get().purge_delay_ns == 0 {
        0
    } else {
        KEPT_IDLE_NS
    }
}

/// Gives back the pages of segments kept with every block free and unused
/// for `kept_idle_ns()`. Cheap when none is due (one load), so allocator slow
/// paths call it (`lifecycle::upkeep`). Without it the kept segments stayed
/// resident for the process's life: up to 64 MiB (`KEEP_FREE_TOTAL`) after
/// a burst of mid sizes.
pub fn purge_if_due() {
    let due = PURGE_DUE.load(Ordering::Relaxed);
    if due == u64::MAX {
        return;
    }
    let now = crate::os::now_ns();
    if now >= due {
        purge(now);
    }
}

/// When the next kept segment is due to be purged, if any waits.
pub fn next_due_ns() -> Option<u64> {
    let due = PURGE_DUE.load(Ordering::Relaxed);
    (due != u64::MAX).then_some(due)
}

/// Purges the kept segments due at `now`, one madvise per hold of a class
/// lock (the madvise runs under it: nobody takes the segment meanwhile), and
/// fires `os_return` (why `ace`) once for all of them.
fn purge(now: u64) {
    let idle = kept_idle_ns();
    // Cleared first: a segment kept from here on lowers it again, and one
    // kept before is seen below.
    PURGE_DUE.store(u64::MAX, Ordering::Relaxed);
    let (mut next_due, mut bytes, mut segments) = (u64::MAX, 0, 0);
    for class in CLASSES.iter() {
        // One madvise per hold of the lock.
        while let Some(purged) = class.lock().purge_one(now, idle, &mut next_due) {
            if let Some(len) = purged {
                bytes += len;
                segments += 1;
            }
        }
    }
    PURGE_DUE.fetch_min(next_due, Ordering::Relaxed);
    if segments > 0 {
        probes::os_return(bytes, ReturnWhy::AceSegments, bytes, segments);
    }
}

pub fn lock_for_fork() {
    CLASSES.iter().for_each(|c| c.acquire_for_fork());
}

pub fn unlock_after_fork() {
    CLASSES.iter().for_each(|c| c.release_after_fork());
}

/// What `AceClass::take` took: `n >= 1` blocks, of which the last
/// `carved.count` are new ones for the caller to link outside the lock.
#[derive(Debug, PartialEq, Eq)]
struct Taken {
    n: u32,
    carved: Carved,
}

/// A run of blocks `take` carved: `count` blocks `stride` bytes apart from
/// `first`, reserved (counted in their segment's `carved` and `used`) and
/// not yet written; whether the last of them reads as zero past
/// `CARVE_WRITES`: carved from pages nobody has written since they were
/// mapped or purged.
#[derive(Debug, PartialEq, Eq)]
struct Carved {
    first: usize,
    count: u32,
    stride: usize,
    last_zero: bool,
}

impl Carved {
    const NONE: Carved = Carved {
        first: 0,
        count: 0,
        stride: 0,
        last_zero: false,
    };
}

impl Taken {
    /// Links the carved run at `*head`, in address order, so that the last
    /// carved block heads the chain; whether that head reads as zero past
    /// `CARVE_WRITES` (`refill` hands it to the caller: what `calloc` need
    /// not clear). Run without the class lock.
    fn link_carved(&self, head: &mut *mut Block) -> bool {
        let c = &self.carved;
        for i in 0..c.count as usize {
            let b = (c.first + i * c.stride) as *mut Block;
            // SAFETY: `take` reserved the run for the caller alone: blocks
            // inside a live segment that nobody else hands out or frees.
            unsafe { Block::set_next(b, *head) };
            *head = b;
        }
        c.last_zero
    }
}

/// Why `AceClass::take` took nothing.
#[derive(Debug, PartialEq, Eq)]
enum Shortfall {
    Failed(AceFailKind),
    /// The class has no segment to take from; one more is counted for the
    /// caller to map.
    NoSegment,
}

/// Takes up to `want` blocks of `class` from `pool` (`AceClass::take`
/// under its lock), mapping a segment between two holds of the lock when
/// the class has none: mapping (`mprotect` of a chunk of a reserved
/// region, or `mmap` of a new region) takes the process's mmap lock, which may wait behind
/// other threads' page faults (1.3 ms once in rptest, with the class lock
/// held and the other thread asleep on it).
///
/// Meanwhile other threads may free blocks of the class, and `take` then
/// serves from those first: a segment mapped and not used goes to the
/// chunk cache (`hand_back_unused`), not to the partial list, where neither
/// the purge nor `trim` would look, nor to the kept segments, whose places
/// and 10 s of residence are for segments the class has used. Two threads
/// that find the class empty at once each map one (the second waited for
/// the first's before); with `HAKMEM_ACE_MAX_SEGMENTS` set, the second may
/// be refused while the first is being mapped. A fork while a thread maps
/// leaves the child's count one too high (and the chunk, if taken, unused):
/// it matters only under that limit.
fn take_from(
    pool: &SpinLock<AceClass>,
    class: usize,
    want: u32,
    head: &mut *mut Block,
) -> Result<Taken, AceFailKind> {
    take_mapping(pool, class, want, head, new_segment)
}

/// `take_from`, with `map` for `new_segment` (a test runs other threads'
/// work in the window where the lock is let go).
fn take_mapping(
    pool: &SpinLock<AceClass>,
    class: usize,
    want: u32,
    head: &mut *mut Block,
    mut map: impl FnMut(usize) -> *mut AceSegment,
) -> Result<Taken, AceFailKind> {
    let mut grown: *mut AceSegment = null_mut();
    loop {
        let mut p = pool.lock();
        if !grown.is_null() {
            p.link(grown, SegList::Partial);
        }
        let got = p.take(want, head);
        // SAFETY: a segment of the class (lock held).
        let unused = !grown.is_null() && unsafe { (*grown).used } == 0;
        let spare = unused.then(|| p.hand_back_unused(grown));
        drop(p);
        if let Some(s) = spare {
            hand_to_cache(&[s]);
        }
        match got {
            Ok(taken) => return Ok(taken),
            Err(Shortfall::Failed(kind)) => return Err(kind),
            Err(Shortfall::NoSegment) => {}
        }
        grown = map(class);
        if grown.is_null() {
            pool.lock().segments -= 1;
            return Err(AceFailKind::MapFail);
        }
    }
}

/// A segment for `class`, on no list (the caller links it, and has counted
/// it); null if the OS refuses the memory.
fn new_segment(class: usize) -> *mut AceSegment {
    // A chunk the chunk cache kept (an ACE segment or a large block
    // before) saves the mapping and the page faults.
    let (base, cached) = crate::chunks::take_chunk(CacheUser::Ace);
    if base.is_null() {
        return null_mut();
    }
    let bs = ACE_CLASS_SIZES[class];
    let seg = base as *mut AceSegment;
    // SAFETY: a fresh, writable, chunk-aligned mapping of ours.
    unsafe {
        seg.write(AceSegment {
            hdr: SegHeader::new(SegKind::Ace, class as u32),
            block_size: bs as u32,
            capacity: ((CHUNK - HEADER_RESERVE) / (bs + COLOR)) as u32,
            used: 0,
            carved: 0,
            free: null_mut(),
            next: null_mut(),
            prev: null_mut(),
            list: SegList::None,
            kept_at: 0,
            touched_end: if cached { CHUNK } else { HEADER_RESERVE } as u32,
        })
    };
    registry::insert(base as usize, crate::segment::ace_byte(class));
    seg
}

/// How long a kept segment whose purge the OS refused (the program locked
/// its pages: `mlockall`) waits before the next try, at least: with
/// `HAKMEM_PURGE_DELAY_MS=0` every slow path would try again.
const REFUSED_RETRY_NS: u64 = 1_000_000_000;

impl AceClass {
    /// Purges the first kept segment due at `now` (unused for `idle`):
    /// Some(Some(bytes)), or Some(None) if the OS refused (the segment waits
    /// `REFUSED_RETRY_NS` at least, so the caller's next call moves on);
    /// None when none is due, with `next_due` lowered to when the next is.
    fn purge_one(&mut self, now: u64, idle: u64, next_due: &mut u64) -> Option<Option<usize>> {
        let mut seg = self.free;
        while !seg.is_null() {
            // SAFETY: segments on the class's free list are live and have
            // every block free (lock held).
            let s = unsafe { &mut *seg };
            if s.holds_pages() {
                let due = s.kept_at.saturating_add(idle);
                if now >= due {
                    let purged = s.purge();
                    if purged.is_none() {
                        s.kept_at = now.saturating_add(REFUSED_RETRY_NS.max(idle) - idle);
                    }
                    return Some(purged);
                }
                *next_due = (*next_due).min(due);
            }
            seg = s.next;
        }
        None
    }

    /// Takes up to `want` blocks, or fails with the failure kind: blocks from
    /// segments' free lists linked at `*head`, then at most one run of new
    /// blocks carved from one segment, reserved but not linked: the caller
    /// links them (`Taken::link_carved`) once it has let go of the class
    /// lock, because their first writes fault fresh pages in. (Linked here,
    /// a 64 KiB refill from fresh pages held the lock across 16 page faults,
    /// longer than `SpinLock`'s spin: rptest's other thread slept on the lock,
    /// once for 3.4 ms.)
    ///
    /// With no segment to take from, it counts one more for the caller to
    /// map (`take_from`).
    fn take(&mut self, want: u32, head: &mut *mut Block) -> Result<Taken, Shortfall> {
        let mut n = 0;
        let mut carved = Carved::NONE;
        while n < want {
            let seg = match self.source() {
                Some(s) => s,
                None if n > 0 => break,
                None if self.segments >= config::get().ace_max_segments => {
                    return Err(Shortfall::Failed(AceFailKind::Exhaustion));
                }
                None => {
                    // Counted now, mapped by the caller without the lock.
                    self.segments += 1;
                    return Err(Shortfall::NoSegment);
                }
            };
            // SAFETY: segments on our lists are live and ours (lock held).
            let s = unsafe { &mut *seg };
            if s.free.is_null() {
                // `source` gives a segment with no free block only when no
                // other has one, and never a full one: new blocks are carved.
                let count = (want - n).min(s.capacity - s.carved);
                if count == 0 {
                    // Full: cannot happen (a full segment leaves the lists).
                    self.unlink(seg);
                    continue;
                }
                let stride = s.block_size as usize + COLOR;
                let last = s.carved_end() + (count as usize - 1) * stride;
                carved = Carved {
                    first: seg as usize + s.carved_end(),
                    count,
                    stride,
                    // Past `touched_end` nothing was written since the pages
                    // were mapped or purged (`MADV_DONTNEED`: they read as
                    // zero), and no block beyond `carved` was ever handed out.
                    last_zero: last >= s.touched_end as usize,
                };
                s.carved += count;
                s.used += count;
                n += count;
                if s.carved == s.capacity {
                    self.unlink(seg);
                }
                break;
            }
            while n < want && !s.free.is_null() {
                let b = s.free;
                // SAFETY: a free block of the segment, now the caller's.
                unsafe {
                    s.free = Block::next(b);
                    Block::set_next(b, *head);
                }
                *head = b;
                s.used += 1;
                n += 1;
            }
            if s.free.is_null() && s.carved == s.capacity {
                self.unlink(seg);
            }
        }
        Ok(Taken { n, carved })
    }

    /// The segment `take` takes blocks from next, the one whose pages are
    /// already resident first: a partial segment with blocks on its free
    /// list (moved to the head), else a kept segment (every block free)
    /// whose pages are still resident, else a partial segment with blocks
    /// not yet carved, else a kept segment whose pages went back
    /// (`purge_if_due`); None if the class has none of these. Before, a
    /// partial segment was carved (new pages faulted in) while kept
    /// segments held resident blocks nobody used.
    fn source(&mut self) -> Option<*mut AceSegment> {
        let mut seg = self.partial;
        while !seg.is_null() {
            // SAFETY: segments on our lists are live and ours (lock held).
            let (free, next) = unsafe { ((*seg).free, (*seg).next) };
            if !free.is_null() {
                if seg != self.partial {
                    self.unlink(seg);
                    self.link(seg, SegList::Partial);
                }
                return Some(seg);
            }
            seg = next;
        }
        // Every partial segment left has blocks not yet carved (a full one
        // leaves the list).
        let kept = match self.take_kept(true) {
            Some(s) => s,
            None if !self.partial.is_null() => return Some(self.partial),
            None => self.take_kept(false)?,
        };
        self.link(kept, SegList::Partial);
        Some(kept)
    }

    /// Returns a block to its segment; Some(segment) if it should go to the chunk cache
    /// (already removed from the lists and counts).
    fn put(&mut self, seg: *mut AceSegment, b: *mut Block) -> Option<*mut AceSegment> {
        // SAFETY: `b` lies in `seg`, a live ACE segment of this class (lock held).
        let s = unsafe { &mut *seg };
        if s.used == 0 {
            crate::misuse::invalid_free(
                "free(): double free detected (ACE segment over-freed)",
                b as usize,
            );
            return None;
        }
        // SAFETY: the block is free; link it.
        unsafe { Block::set_next(b, s.free) };
        s.free = b;
        s.used -= 1;
        if s.list == SegList::None {
            self.link(seg, SegList::Partial);
        }
        if s.used > 0 {
            return None;
        }
        self.release_free(seg)
    }

    /// A segment `take_from` linked and `take` did not use leaves the class
    /// (not counted any more), for the caller to hand to the chunk cache
    /// once it has let go of the lock.
    fn hand_back_unused(&mut self, seg: *mut AceSegment) -> *mut AceSegment {
        self.unlink(seg);
        self.segments -= 1;
        seg
    }

    /// A segment with every block free leaves the partial list: kept (its
    /// pages go back after the idle time, `purge_if_due`) while the class
    /// and all classes keep few; else Some(segment), no longer counted, for
    /// the caller to hand to the chunk cache once it has let go of the lock.
    fn release_free(&mut self, seg: *mut AceSegment) -> Option<*mut AceSegment> {
        self.unlink(seg);
        if self.free_count < KEEP_FREE_SEGMENTS
            && FREE_KEPT.load(Ordering::Relaxed) < KEEP_FREE_TOTAL
        {
            self.keep_free(seg);
            return None;
        }
        self.segments -= 1;
        Some(seg)
    }

    fn keep_free(&mut self, seg: *mut AceSegment) {
        // SAFETY: a live segment of the class (lock held).
        let s = unsafe { &mut *seg };
        if s.holds_pages() {
            s.kept_at = crate::os::now_ns();
            PURGE_DUE.fetch_min(s.kept_at + kept_idle_ns(), Ordering::Relaxed);
        }
        self.link(seg, SegList::Free);
        self.free_count += 1;
        FREE_KEPT.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a segment `keep_free` kept off the free list, if there is one
    /// (with `resident`, only one whose pages are still resident).
    /// A kept segment leaving the class (no longer counted), for the
    /// caller to hand to the chunk cache once it has let go of the lock.
    fn release_kept(&mut self) -> Option<*mut AceSegment> {
        let s = self.take_kept(false)?;
        self.segments -= 1;
        Some(s)
    }

    fn take_kept(&mut self, resident: bool) -> Option<*mut AceSegment> {
        let mut seg = self.free;
        // SAFETY: segments on our lists are live and ours (lock held).
        while !seg.is_null() && resident && !unsafe { (*seg).holds_pages() } {
            // SAFETY: as above.
            seg = unsafe { (*seg).next };
        }
        if seg.is_null() {
            return None;
        }
        self.unlink(seg);
        self.free_count -= 1;
        FREE_KEPT.fetch_sub(1, Ordering::Relaxed);
        Some(seg)
    }

    fn link(&mut self, seg: *mut AceSegment, list: SegList) {
        let head = match list {
            SegList::Partial => &mut self.partial,
            SegList::Free => &mut self.free,
            SegList::None => return,
        };
        // SAFETY: `seg` is on no list (lock held).
        unsafe {
            (*seg).list = list;
            (*seg).prev = null_mut();
            (*seg).next = *head;
            if !head.is_null() {
                (**head).prev = seg;
            }
        }
        *head = seg;
    }

    fn unlink(&mut self, seg: *mut AceSegment) {
        // SAFETY: `seg` is live; its links are valid under the lock.
        unsafe {
            let head = match (*seg).list {
                SegList::Partial => &mut self.partial,
                SegList::Free => &mut self.free,
                SegList::None => return,
            };
            let (prev, next) = ((*seg).prev, (*seg).next);
            if prev.is_null() {
                *head = next;
            } else {
                (*prev).next = next;
            }
            if !next.is_null() {
                (*next).prev = prev;
            }
            (*seg).list = SegList::None;
            (*seg).next = null_mut();
            (*seg).prev = null_mut();
        }
    }
}

/// Usable size of an ACE block of `class`.
pub const fn block_size(class: usize) -> usize {
    ACE_CLASS_SIZES[class]
}

/// Distance between consecutive blocks of a class.
const fn stride(class: usize) -> usize {
    ACE_CLASS_SIZES[class] + COLOR
}

/// Bits of the fixed-point reciprocals below: offsets are under 2^21 (a
/// chunk) and strides under 2^19, so `(off * RECIP[c]) >> RECIP_SHIFT` is
/// exactly `off / stride(c)` for every offset (Granlund-Montgomery: the
/// rounding error, under `stride` per 2^40, stays below one for off < 2^21).
const RECIP_SHIFT: u32 = 40;
const RECIP: [u64; ACE_CLASSES] = {
    let mut t = [0u64; ACE_CLASSES];
    let mut c = 0;
    while c < ACE_CLASSES {
        t[c] = (1u64 << RECIP_SHIFT).div_ceil(stride(c) as u64);
        c += 1;
    }
    t
};
const _: () = assert!(stride(ACE_CLASSES - 1) < 1 << 19 && CHUNK <= 1 << 21);

/// `u64::MAX / stride + 1` for each class: `off * STRIDE_DIVISOR[c] <
/// STRIDE_DIVISOR[c]` (wrapping, 64 bits) exactly when the 32-bit `off` is a
/// multiple of the stride (Lemire, Kaser and Kurz, 2019; see
/// `class::is_multiple_of_bin`): `free`'s test for a block start, one
/// multiply.
const STRIDE_DIVISOR: [u64; ACE_CLASSES] = {
    let mut t = [0u64; ACE_CLASSES];
    let mut c = 0;
    while c < ACE_CLASSES {
        t[c] = u64::MAX / stride(c) as u64 + 1;
        c += 1;
    }
    t
};

/// For each class, the last offset (from the first block) where a block
/// that fits in the segment can start.
const LAST_START: [u32; ACE_CLASSES] = {
    let mut t = [0u32; ACE_CLASSES];
    let mut c = 0;
    while c < ACE_CLASSES {
        t[c] = (CHUNK - HEADER_RESERVE - block_size(c)) as u32;
        c += 1;
    }
    t
};

/// Whether `p` (a pointer into an ACE segment of `class`) is where a block
/// starts (in the segment, on the grid, its block within the segment): the
/// test on every ACE free, a subtraction, a multiply and two compares;
/// anything else takes `block_start`'s slower look.
#[inline(always)]
pub fn is_block_start(p: usize, class: usize) -> bool {
    let off = ((p & (CHUNK - 1)) as u32).wrapping_sub(HEADER_RESERVE as u32);
    debug_assert!(class < ACE_CLASSES);
    // SAFETY: classes come from the registry byte, `ace_class_of` bounds them.
    let (d, last) = unsafe {
        (
            *STRIDE_DIVISOR.get_unchecked(class),
            *LAST_START.get_unchecked(class),
        )
    };
    off <= last && (off as u64).wrapping_mul(d) < d
}

/// Where the block holding `p` (a pointer into an ACE segment of `class`)
/// starts, or None if `p` lies in no block (the header, a block's colour
/// pad, or past the last block that fits). A multiply and a shift: for the
/// pointers `is_block_start` turns away, and `realloc`/`malloc_usable_size`.
#[inline]
pub fn block_start(p: usize, class: usize) -> Option<usize> {
    let chunk = crate::segment::chunk_of(p);
    let off = (p - chunk).checked_sub(HEADER_RESERVE)?;
    let start = ((off as u64 * RECIP[class]) >> RECIP_SHIFT) as usize * stride(class);
    let fits = start <= LAST_START[class] as usize;
    (off - start < block_size(class) && fits).then_some(chunk + HEADER_RESERVE + start)
}

/// Tag of an aligned block carved out of an ACE block (`alloc_aligned`): the
/// word before it holds its address xor this, so that `free` tells it from an
/// interior pointer into a block. Cleared when it is freed, so a second free
/// of the same pointer is an invalid one.
const ALIGNED_TAG: usize = usize::from_le_bytes(*b"HAKaligN");

/// The bytes to ask ACE for, for a block of `size` aligned to `align`
/// (COLOR < align) to be carved out of (`carve_aligned`).
pub const fn aligned_request(size: usize, align: usize) -> usize {
    size + align - COLOR
}

/// The block of the caller's size aligned to `align` inside `b`, an ACE
/// block of `aligned_request(size, align)` bytes.
pub fn carve_aligned(b: *mut u8, align: usize) -> *mut u8 {
    let b = b as usize;
    let q = (b + align - 1) & !(align - 1);
    if q != b {
        // SAFETY: q - b >= COLOR (both COLOR-aligned, q > b): the tag word
        // lies in the block, before what the caller gets.
        unsafe { *((q - 8) as *mut usize) = q ^ ALIGNED_TAG };
    }
    q as *mut u8
}

/// The block start of a pointer `p` that `alloc_aligned` handed out inside
/// the block at `start` (None: `p` is no such pointer, an interior or
/// stale one). Clears the tag when `take` (the block is being freed).
pub fn aligned_block(p: usize, start: usize, take: bool) -> Option<usize> {
    if p - start < COLOR || !p.is_multiple_of(COLOR) {
        return None;
    }
    let tag = (p - 8) as *mut usize;
    // SAFETY: `start..p` lies in a block of a live segment (`block_start`).
    if unsafe { *tag } != p ^ ALIGNED_TAG {
        return None;
    }
    if take {
        // SAFETY: as above.
        unsafe { *tag = 0 };
    }
    Some(start)
}

/// Usable bytes from `p`, a pointer `free` would accept, in the block at `start`.
pub fn usable_from(p: usize, start: usize, class: usize) -> usize {
    block_size(class) - (p - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_start_finds_every_block_and_refuses_pads_and_the_header() {
        let chunk = 64 * CHUNK;
        for class in 0..ACE_CLASSES {
            let (size, step) = (block_size(class), stride(class));
            assert_eq!(block_start(chunk + HEADER_RESERVE - 1, class), None);
            let mut start = chunk + HEADER_RESERVE;
            while start + size <= chunk + CHUNK {
                for p in [start, start + 1, start + size / 2, start + size - 1] {
                    assert_eq!(block_start(p, class), Some(start), "class {class} p {p:#x}");
                }
                for pad in [start + size, start + step - 1] {
                    assert_eq!(block_start(pad, class), None, "class {class} pad {pad:#x}");
                }
                start += step;
            }
        }
    }

    const REGISTERED: CacheMode = CacheMode {
        registered: true,
        check_frees: false,
    };

    #[test]
    fn aligned_blocks_inside_ace_blocks_are_told_from_interior_pointers() {
        let mut cache = Box::new(AceCache::NEW);
        for align in [128usize, 4096, 65536] {
            let class = ace_class(aligned_request(3000, align));
            let (b, _) = cache.refill(REGISTERED, class, aligned_request(3000, align));
            let p = carve_aligned(b, align) as usize;
            assert!(p != 0 && p.is_multiple_of(align));
            let start = block_start(p, class).unwrap();
            assert_eq!(start, b as usize);
            if start != p {
                assert_eq!(aligned_block(p, start, false), Some(start));
                assert!(usable_from(p, start, class) >= 3000);
                assert_eq!(aligned_block(p + 64, start, false), None, "interior");
                assert_eq!(aligned_block(p, start, true), Some(start));
                assert_eq!(aligned_block(p, start, false), None, "tag cleared");
            }
            if cache.free(REGISTERED, start as *mut u8, class) {
                if let Some(flushed) = cache.free_slow(REGISTERED, class) {
                    flushed.give_back();
                }
            }
        }
        cache.release_thread();
        assert!(cache.classes.iter().all(|c| c.count == 0));
    }

    #[test]
    fn a_kept_segment_serves_before_new_blocks_are_carved_and_its_pages_go_back() {
        // A class pool of its own (the class is the largest: 7 blocks a
        // segment), so that no other test's blocks are in it.
        let class = ACE_CLASSES - 1;
        let pool = SpinLock::new(AceClass::EMPTY);
        let take = |pool: &SpinLock<AceClass>, want: u32| {
            let mut head = null_mut();
            let taken = take_from(pool, class, want, &mut head).unwrap();
            assert_eq!(taken.n, want);
            taken.link_carved(&mut head);
            let mut blocks = Vec::new();
            while !head.is_null() {
                blocks.push(head);
                // SAFETY: the chain `take` linked.
                head = unsafe { Block::next(head) };
            }
            blocks
        };
        let seg = |b: *mut Block| crate::segment::chunk_of(b as usize) as *mut AceSegment;
        let one = take(&pool, 1)[0];
        let first = seg(one);
        // SAFETY: a live segment of the pool.
        let capacity = unsafe { (*first).capacity };
        // The whole first segment, then one block carved in a second.
        let mut all_of_first = take(&pool, capacity - 1);
        all_of_first.push(one);
        assert!(all_of_first.iter().all(|&b| seg(b) == first));
        let second = seg(take(&pool, 1)[0]);
        assert!(second != first);
        // Every block of the first back: kept with every block free, resident.
        for &b in &all_of_first {
            assert_eq!(pool.lock().put(first, b), None);
        }
        assert_eq!(pool.lock().free, first);
        // The next block comes from it, not carved in the second.
        let again = take(&pool, 1);
        assert_eq!(
            seg(again[0]),
            first,
            "the kept segment's resident block first"
        );
        assert_eq!(pool.lock().put(first, again[0]), None);
        // Its pages go back: nothing carved is left, the address space stays.
        // SAFETY: kept with every block free; the pool is this test's.
        let s = unsafe { &mut *first };
        let carved = s.carved_end();
        assert!(s.purge().unwrap() >= carved - HEADER_RESERVE);
        assert!(s.carved == 0 && s.free.is_null() && !s.holds_pages());
        // Now the second's uncarved blocks come first (both fault pages in;
        // the kept segment stays whole), then the purged one, carved anew.
        let rest_of_second = take(&pool, capacity - 1);
        assert!(rest_of_second.iter().all(|&b| seg(b) == second));
        assert_eq!(take(&pool, 1)[0] as usize, first as usize + HEADER_RESERVE);
    }

    #[test]
    fn a_flush_that_empties_more_segments_than_it_hands_on_keeps_the_count_true() {
        // Nine segments of the largest class, each with one block out, in
        // a pool of the test's own; one flush (`give_back`) frees the nine.
        // The class keeps up to four, the rest go to the chunk cache.
        let pool = SpinLock::new(AceClass::EMPTY);
        let seg = |b: *mut u8| crate::segment::chunk_of(b as usize) as *mut AceSegment;
        let (first, _) = take_one(&pool);
        // SAFETY: a live segment of the pool.
        let capacity = unsafe { (*seg(first)).capacity } as usize;
        let mut blocks = vec![first];
        blocks.extend((1..9 * capacity).map(|_| take_one(&pool).0));
        let mut last_of_each = null_mut();
        for (i, &b) in blocks.iter().enumerate() {
            assert_eq!(seg(b), seg(blocks[i - i % capacity]), "carved in order");
            if i % capacity == 0 {
                // SAFETY: a block of the pool's, out: the chain's link.
                unsafe { Block::set_next(b.cast(), last_of_each) };
                last_of_each = b.cast();
            } else {
                assert_eq!(pool.lock().put(seg(b), b.cast()), None);
            }
        }
        give_back_to(&pool, last_of_each, 9);
        let mut p = pool.lock();
        assert!(p.partial.is_null(), "every segment's blocks are back");
        assert_eq!(
            p.segments, p.free_count,
            "the class counts every segment it keeps"
        );
        assert!(p.free_count <= KEEP_FREE_SEGMENTS);
        // Its kept segments go, so that other tests find the global
        // count of kept segments as it was.
        while let Some(s) = p.release_kept() {
            hand_to_cache(&[s]);
        }
    }

    /// One block of the largest class (7 a segment) from a test's own
    /// pool, and whether `take` says it reads zero (checked if so).
    fn take_one(pool: &SpinLock<AceClass>) -> (*mut u8, bool) {
        let class = ACE_CLASSES - 1;
        let mut head = null_mut();
        let taken = take_from(pool, class, 1, &mut head).unwrap();
        assert_eq!(taken.n, 1);
        let zero = taken.link_carved(&mut head);
        let block = head as *mut u8;
        if zero {
            // SAFETY: the block is the test's, block_size bytes long.
            let bytes = unsafe { core::slice::from_raw_parts(block, block_size(class)) };
            assert!(
                bytes[8..].iter().all(|&x| x == 0),
                "a block said zero is not"
            );
        }
        (block, zero)
    }

    #[test]
    fn a_block_carved_from_untouched_pages_is_known_to_read_zero() {
        let pool = SpinLock::new(AceClass::EMPTY);
        let class = ACE_CLASSES - 1;
        let (first, zero) = take_one(&pool);
        let seg = crate::segment::chunk_of(first as usize) as *mut AceSegment;
        // SAFETY: a live segment of the pool.
        let fresh = unsafe { (*seg).touched_end } as usize == HEADER_RESERVE;
        // A chunk the chunk cache kept may hold a last user's bytes.
        assert_eq!(zero, fresh, "zero exactly when the chunk was mapped fresh");
        // Written, given back, taken again: from the free list, not zero.
        // SAFETY: the block is the test's.
        unsafe { core::ptr::write_bytes(first, 0xA5, block_size(class)) };
        assert_eq!(pool.lock().put(seg, first as *mut Block), None);
        assert_eq!(take_one(&pool), (first, false));
        // Every block back, the segment kept and purged: carved again, zero.
        assert_eq!(pool.lock().put(seg, first as *mut Block), None);
        assert_eq!(pool.lock().free, seg);
        // SAFETY: kept with every block free; the pool is this test's.
        assert!(unsafe { (*seg).purge() }.is_some());
        assert_eq!(take_one(&pool), (first, true));
        let (second, zero) = take_one(&pool);
        assert!(zero && second as usize > first as usize);
    }

    #[test]
    fn take_leaves_the_pages_of_the_blocks_it_carves_to_be_faulted_in_without_the_lock() {
        // `refill` calls `take` under the class lock and `link_carved`
        // after it: what faults fresh pages in must be the latter.
        let class = ACE_CLASSES - 1;
        let mut pool = AceClass::EMPTY;
        let seg = new_segment(class);
        assert!(!seg.is_null());
        // SAFETY: our segment, no block out. A chunk from the chunk cache
        // holds its last user's pages: they go back, so the check below
        // runs on pages nobody has touched.
        unsafe {
            if (*seg).holds_pages() {
                assert!((*seg).purge().is_some());
            }
        }
        pool.segments += 1;
        pool.link(seg, SegList::Partial);
        let mut head = null_mut();
        let taken = pool.take(3, &mut head).unwrap();
        assert_eq!((taken.n, taken.carved.count), (3, 3));
        assert!(head.is_null(), "nothing linked yet");
        let base = seg as usize;
        let span = HEADER_RESERVE..taken.carved.first - base + 3 * taken.carved.stride;
        let resident = || crate::os::resident_bytes(base + span.start, span.len()).unwrap();
        assert_eq!(resident(), 0, "take wrote into the blocks it carved");
        assert!(taken.link_carved(&mut head), "fresh pages read as zero");
        assert!(resident() >= 3 * crate::os::PAGE);
        let mut n = 0;
        while !head.is_null() {
            // SAFETY: the chain `link_carved` linked.
            head = unsafe { Block::next(head) };
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn a_segment_mapped_while_blocks_came_back_is_not_left_unused_on_the_partial_list() {
        // The class's only segment is full; a refill maps one without the
        // lock, and meanwhile (the closure, run in that window) another
        // thread frees a block of the full one. `take` serves that block:
        // the new segment must not stay on the partial list with nothing
        // out, where neither purge nor trim looks.
        let class = ACE_CLASSES - 1;
        let pool = SpinLock::new(AceClass::EMPTY);
        let seg = |b: *mut Block| crate::segment::chunk_of(b as usize) as *mut AceSegment;
        let mut head = null_mut();
        let first = take_from(&pool, class, 1, &mut head).unwrap();
        first.link_carved(&mut head);
        let full = seg(head);
        // SAFETY: a live segment of the pool.
        let capacity = unsafe { (*full).capacity };
        let rest = take_from(&pool, class, capacity - 1, &mut head).unwrap();
        rest.link_carved(&mut head);
        // SAFETY: as above.
        assert!(unsafe { (*full).used == capacity && (*full).list == SegList::None });
        let back = head;
        let mut mapped = null_mut();
        let mut got = null_mut();
        let taken = take_mapping(&pool, class, 1, &mut got, |c| {
            assert_eq!(pool.lock().put(full, back), None);
            mapped = new_segment(c);
            mapped
        })
        .unwrap();
        taken.link_carved(&mut got);
        assert_eq!(got, back, "the block freed meanwhile comes first");
        let p = pool.lock();
        // Handed to the chunk cache (not read: it may have unmapped it).
        assert_eq!(p.segments, 1, "the unused segment is no longer counted");
        assert!(p.free.is_null(), "nor kept");
        let mut s = p.partial;
        while !s.is_null() {
            // SAFETY: segments on the pool's lists are live.
            let (used, next) = unsafe { ((*s).used, (*s).next) };
            assert!(used > 0, "an unused segment on the partial list");
            s = next;
        }
    }

    #[test]
    fn a_class_with_no_segment_counts_one_for_the_caller_to_map_without_the_lock() {
        let mut pool = AceClass::EMPTY;
        let mut head = null_mut();
        assert_eq!(pool.take(1, &mut head), Err(Shortfall::NoSegment));
        assert_eq!(pool.segments, 1, "counted under the lock");
        assert!(pool.partial.is_null() && pool.free.is_null() && head.is_null());
        pool.segments = config::get().ace_max_segments;
        assert_eq!(
            pool.take(1, &mut head),
            Err(Shortfall::Failed(AceFailKind::Exhaustion))
        );
    }

    #[test]
    fn a_segment_the_os_refuses_fails_the_refill_and_is_not_counted() {
        let class = ACE_CLASSES - 1;
        let pool = SpinLock::new(AceClass::EMPTY);
        let mut head = null_mut();
        let refused = take_mapping(&pool, class, 1, &mut head, |_| null_mut());
        assert_eq!(refused.map(|t| t.n), Err(AceFailKind::MapFail));
        assert!(head.is_null());
        let p = pool.lock();
        assert_eq!(
            p.segments, 0,
            "the count taken for the mapping is given back"
        );
        assert!(p.partial.is_null() && p.free.is_null());
    }

    #[test]
    fn a_purge_the_os_refuses_ends_and_leaves_the_pages_touched() {
        let pool = SpinLock::new(AceClass::EMPTY);
        let (b, _) = take_one(&pool);
        let seg = crate::segment::chunk_of(b as usize) as *mut AceSegment;
        // SAFETY: a page of the block, ours; MADV_DONTNEED refuses locked
        // pages (EINVAL), as after a program's `mlockall`.
        assert_eq!(unsafe { libc::mlock(b.cast(), crate::os::PAGE) }, 0);
        // Kept with every block free (whatever other tests keep meanwhile).
        let mut p = pool.lock();
        if let Some(s) = p.put(seg, b.cast()) {
            p.segments += 1;
            p.keep_free(s);
        }
        drop(p);
        // Due (with no idle time): refused once, then not due again at
        // once, even with no idle time (it looped forever on a refusal).
        let mut next_due = u64::MAX;
        let now = crate::os::now_ns();
        assert_eq!(pool.lock().purge_one(now, 0, &mut next_due), Some(None));
        assert_eq!(pool.lock().purge_one(now, 0, &mut next_due), None);
        assert!(next_due >= now + REFUSED_RETRY_NS);
        // SAFETY: a live segment of the pool, kept with every block free.
        let (touched, carved) = unsafe { ((*seg).touched_end as usize, (*seg).carved) };
        assert!(touched > HEADER_RESERVE && carved == 0);
        // Carved anew from pages that kept their bytes: not taken for zero.
        assert_eq!(take_one(&pool), (b, false));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::munlock(b.cast(), crate::os::PAGE) }, 0);
    }

    #[test]
    fn a_cache_grows_on_misses_shrinks_on_overflows_and_empties_at_thread_exit() {
        // A cache of its own: no thread, no lifecycle, only the class pools.
        let mut cache = Box::new(AceCache::NEW);
        let class = ace_class(5000);
        let mut blocks = Vec::new();
        let mut refills = 0;
        while blocks.len() < 200 {
            let mut b = cache.alloc_cached(class);
            if b.is_null() {
                refills += 1;
                b = cache.refill(REGISTERED, class, 5000).0;
                let most = REFILL_BYTES.div_ceil(block_size(class)) as u32;
                assert!(
                    cache.classes[class].count < most,
                    "a refill takes at most REFILL_BYTES rounded up to whole blocks"
                );
            }
            assert!(!b.is_null() && block_start(b as usize, class) == Some(b as usize));
            blocks.push(b);
        }
        let cap = cache.classes[class].cap();
        assert_eq!(cap, MAX_CAP[class], "every miss doubles the cap");
        // Full refills (REFILL_BYTES' worth), and a few smaller ones while
        // the cap doubles up from MIN_CAP.
        let full = REFILL_BYTES.div_ceil(block_size(class));
        assert!(
            refills <= 200usize.div_ceil(full) + 8,
            "{refills} refills for 200 blocks"
        );
        let mut slow = 0;
        for b in blocks {
            if cache.free(REGISTERED, b, class) {
                slow += 1;
                if let Some(flushed) = cache.free_slow(REGISTERED, class) {
                    flushed.give_back();
                }
            }
            assert!(cache.classes[class].count <= cap);
        }
        assert!(
            slow > 0 && cache.classes[class].cap() < cap,
            "overflows halve it"
        );
        cache.release_thread();
        assert!(cache
            .classes
            .iter()
            .all(|c| c.count == 0 && c.head.is_null()));
    }

    #[test]
    fn the_block_start_test_agrees_with_block_start() {
        let chunk = 64 * CHUNK;
        for class in 0..ACE_CLASSES {
            for p in (chunk..chunk + CHUNK).step_by(16) {
                let exact = block_start(p, class) == Some(p);
                assert_eq!(is_block_start(p, class), exact, "class {class} p {p:#x}");
            }
        }
    }
}
