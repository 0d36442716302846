//! The tiny path (classes 0..7): per-thread singly linked free lists (TLS SLL)
//! in front of slabs. Allocation pops and an owner's free pushes, with no
//! atomics, locks or syscalls; everything else (refill, drains, remote frees,
//! thread exit) is out of line.

pub mod owned_index;

use crate::class::{class_of_bin, BINS, BIN_SIZES};
use crate::config;
use crate::hardening::{self, CacheMode};
use crate::legacy;
use crate::pool::{self, Acquired};
use crate::probes;
use crate::segment;
use crate::superslab::{slab_of, Block, Slab, SlabRef};
use crate::sync::OwnerGuard;
use core::ptr::null_mut;
use core::sync::atomic::Ordering;
use hakmem_common::DrainWhy;
use owned_index::{Gate, OwnedIndex};

/// `n` brought within `low..=high`, for the tables below (`Ord::clamp` is
/// not a const fn).
const fn clamp(n: u32, low: u32, high: u32) -> u32 {
    if n < low {
        low
    } else if n > high {
        high
    } else {
        n
    }
}

/// Blocks moved per refill, per bin: about 4 KiB worth, 16 to 64.
const BATCH: [u32; BINS] = {
    let mut t = [0u32; BINS];
    let mut b = 0;
    while b < BINS {
        t[b] = clamp((4096 / BIN_SIZES[b]) as u32, 16, 64);
        b += 1;
    }
    t
};

/// Most owned slabs one `find_partial` looks at. A thread can own thousands of
/// full slabs of a bin (a program that keeps millions of small blocks); looking
/// at all of them whenever the active slab ran out made growth quadratic.
const PARTIAL_SCAN: u32 = 8;

/// A bin's cache limit: it starts at 2 batches and grows by one at each
/// refill (the cache ran empty) up to `LIMIT_MAX[bin]`; every LIMIT_SHRINK_AFTER
/// overflows take one back. A bin that is both allocated and freed a lot (the
/// cache walks between empty and full at random) ends at the top, where a
/// walk reaches either end far less often than at 2 batches; a bin the
/// thread mostly frees (blocks it made before) stays at the bottom. As
/// tcmalloc's free lists grow and shrink.
const LIMIT_MIN_BATCHES: u32 = 2;
const LIMIT_SHRINK_AFTER: u8 = 3;

/// The top of a bin's cache limit: 128 KiB of blocks, but no fewer than 8
/// batches and no more than 32 (16 B to 64 B: 2,048 blocks; 128 B: 1,024;
/// 1 KiB: 128). A program that allocates a run of blocks and frees it
/// again (glibc's bench-malloc-simple: 1,600 blocks of 16, 32 or 64 B)
/// drained and refilled the cache on every run at the old top of 8 batches
/// (512 blocks of those sizes): a third of its allocator instructions, and
/// 1.08x the time it takes at this top (pinned, 9 runs). The 32-batch bound
/// keeps one overflow's walk to at most 1,025 blocks; the bytes bound keeps
/// a thread's lists to about 2.8 MiB at most (docs/decisions.md).
const LIMIT_MAX: [u32; BINS] = {
    const BYTES: usize = 128 << 10;
    let mut t = [0u32; BINS];
    let mut b = 0;
    while b < BINS {
        t[b] = clamp((BYTES / BIN_SIZES[b]) as u32, 8 * BATCH[b], 32 * BATCH[b]);
        b += 1;
    }
    t
};

/// `limit` brought within the bounds of `bin`'s cache limit.
fn bounded_limit(bin: usize, limit: u32) -> u32 {
    limit.clamp(LIMIT_MIN_BATCHES * BATCH[bin], LIMIT_MAX[bin])
}

/// Most blocks a refill takes whole from a drained remote list (bounds what
/// a thread cache holds beyond its limit, and what its next overflow walks).
const REMOTE_WHOLE_MAX: u32 = 256;

/// What malloc and free use of a bin: 16 bytes, four bins to a cache line.
pub struct ClassCache {
    /// The TLS SLL.
    head: *mut Block,
    count: u32,
    /// Drain when `count` passes this (LIMIT_MIN_BATCHES x BATCH ..=
    /// LIMIT_MAX; 0 until the first use, which sets it, so a zeroed cache is valid).
    limit: u32,
}

impl ClassCache {
    const NEW: ClassCache = ClassCache {
        head: null_mut(),
        count: 0,
        limit: 0,
    };
}

/// The slabs the thread holds for a bin, for refills and drains.
#[derive(Clone, Copy)]
struct BinSlabs {
    /// The slab refills carve from.
    active: SlabRef,
    /// Every slab this thread owns for the bin: a ring through Slab::next/prev,
    /// slabs likely to have free blocks towards this end (see `find_partial`).
    owned: SlabRef,
}

impl BinSlabs {
    const NEW: BinSlabs = BinSlabs {
        active: SlabRef::NONE,
        owned: SlabRef::NONE,
    };
}

/// Where the count of blocks in the list of bin 0 lies in a `TinyCache`,
/// and how far apart the bins' are (hakctl reads them: `front::levels`).
pub const LIST_COUNT_AT: usize =
    core::mem::offset_of!(TinyCache, tiny) + core::mem::offset_of!(ClassCache, count);
pub const LIST_STRIDE: usize = core::mem::size_of::<ClassCache>();

/// A thread's tiny part of its state (`thread::ThreadCache`). In this
/// order (`repr(C)`): the lists first, at the thread cache's start, so
/// that `malloc`'s fast path addresses them with no added offset (left to
/// rustc, a new field moved them: one more instruction a call, +1.7% on
/// the instruction guard's bench_random_mixed).
#[repr(C)]
pub struct TinyCache {
    tiny: [ClassCache; BINS],
    slabs: [BinSlabs; BINS],
    /// Overflows of each bin since its limit last shrank (see LIMIT_SHRINK_AFTER).
    overflows: [u8; BINS],
    /// Owner id stamped on this thread's slabs (0 until the thread is
    /// listed, `lifecycle::ensure_registered`).
    id: usize,
    /// The slabs this thread owns, by address (null until it owns one).
    owned_index: *mut OwnedIndex,
}

impl TinyCache {
    /// An empty cache: all zero bytes.
    pub const NEW: TinyCache = TinyCache {
        tiny: [ClassCache::NEW; BINS],
        slabs: [BinSlabs::NEW; BINS],
        overflows: [0; BINS],
        id: 0,
        owned_index: null_mut(),
    };

    /// Whether every field is zero (what `tls` checks of `NEW`).
    pub const fn is_zero(&self) -> bool {
        let mut i = 0;
        while i < BINS {
            let c = &self.tiny[i];
            let r = &self.slabs[i];
            if !c.head.is_null()
                || c.count != 0
                || c.limit != 0
                || !r.active.is_none()
                || !r.owned.is_none()
            {
                return false;
            }
            i += 1;
        }
        let mut i = 0;
        while i < BINS {
            if self.overflows[i] != 0 {
                return false;
            }
            i += 1;
        }
        self.id == 0 && self.owned_index.is_null()
    }

    /// Whether the thread may take slabs for its own: only while it is
    /// registered, listed (so it has an owner id) with its exit hook armed
    /// (which gives its slabs back) or being armed (an allocation of
    /// `pthread_setspecific` comes back here). If not, its refills come
    /// from the legacy path, which has no owners. A thread is not
    /// registered:
    /// - beyond hakctl's thread list: it has no owner id (ids come with a
    ///   slot). A slab stamped 0 would be every such thread's own
    ///   (`free_if_owner` compares ids): two of them would work on its free
    ///   list and its owner's ring at once, and one could recycle it while
    ///   the other allocates from it;
    /// - with no hook (`pthread_key_create` or `pthread_setspecific`
    ///   failed): nothing would give the slab and the index back at its
    ///   exit;
    /// - past its exit hook (a later destructor's allocation): the same,
    ///   and a new index would stay listed under a dead thread's id.
    fn may_own_slabs(mode: CacheMode) -> bool {
        mode.registered
    }

    /// The owner id stamped on this thread's slabs; 0: none yet.
    pub fn owner_id(&self) -> usize {
        self.id
    }

    /// The newest block on the thread's list of `bin` (tests).
    #[cfg(test)]
    pub fn head(&self, bin: usize) -> *mut Block {
        self.tiny[bin].head
    }

    /// Whether the thread has an owned index (tests).
    #[cfg(test)]
    pub fn has_index(&self) -> bool {
        !self.owned_index.is_null()
    }

    /// Gives the thread its owner id (`lifecycle`, at registration).
    pub fn set_owner_id(&mut self, id: usize) {
        self.id = id;
    }
}

/// A block of tiny bin `bin` from the thread's cache; null if it is empty.
#[inline(always)]
pub fn alloc_cached(tc: &mut TinyCache, bin: usize) -> *mut u8 {
    let cc = &mut tc.tiny[bin];
    let b = cc.head;
    if !b.is_null() {
        // SAFETY: blocks on the TLS SLL are free and link through their first word.
        // (No key to clear: with `HAKMEM_CHECK_FREES=1` the list is always
        // empty here, see `refill`.)
        let next = unsafe { Block::next(b) };
        cc.head = next;
        cc.count -= 1;
        // The next allocation of this bin reads `next`'s link: a block
        // freed a while ago, whose line is likely out of L1 by now (the
        // load was half of malloc's time in bench_random_mixed). Asked
        // for now, it arrives while the program uses `b`.
        crate::os::prefetch(next);
    }
    b.cast()
}

/// What a free onto the thread's list did.
#[must_use]
pub enum Push {
    /// Nothing: the block is not one this path takes (the caller goes on).
    NotOurs,
    /// The block is on the list.
    Done,
    /// The block is on the list of this bin, which went over its limit: the
    /// caller calls `TinyCache::overflow` (out of line, with the thread's
    /// mode, which the fast path does not read).
    OverLimit(usize),
}

/// Frees `ptr` onto this thread's TLS SLL if it lies in a slab the thread's
/// index names (see `owned_index`); `NotOurs`, with nothing done, otherwise.
/// (With `HAKMEM_CHECK_FREES=1` a thread has no index: every free reads the
/// slab's metadata, `free_superslab`, and is checked there.)
///
/// # Safety
/// `ptr` is a block handed out by hakmem and not yet freed, or a pointer
/// outside every slab this thread owns (a SuperSlab's header is in none:
/// `superslab::FIRST_SLAB`).
#[inline(always)]
pub unsafe fn free_owned(tc: &mut TinyCache, ptr: *mut u8) -> Push {
    // SAFETY: a non-null index is this thread's, live until its exit hook.
    let Some(ix) = (unsafe { tc.owned_index.as_ref() }) else {
        return Push::NotOurs;
    };
    // Off the 16-byte grid is NotOurs too: the slow path, which reads the
    // slab's metadata, refuses it.
    let Some(bin) = ix.bin_of_block(ptr as usize) else {
        // Other threads' blocks, mid-size and large ones: laid out of line,
        // so that the owner's hit runs straight to `free`'s return. With the
        // hit laid out of line instead, the index's shorter test measured
        // level (bench_random_mixed pinned, 15 pairs: 0.999); with this,
        // 1.016 [1.002, 1.031]; prodcons and mid level (0.98-1.02).
        core::hint::cold_path();
        return Push::NotOurs;
    };
    push_local(tc, bin, ptr as *mut Block, false)
}

/// Frees a block of a SuperSlab slab (`slab` is its metadata) that the
/// thread's index did not name (`free_owned`) onto this thread's TLS SLL if
/// the thread owns the slab all the same (it lost its index slot); else
/// `NotOurs`, and the caller, no longer holding the thread cache, calls
/// `free_remote`.
///
/// (Keeping other threads' blocks in the freeing thread's SLL as well, to be
/// sent home by its drains, made `stress` about 15% faster but let an idle
/// thread pin slabs of others: after an 8-thread soak, 23-36 SuperSlabs stayed
/// mapped and 0-6 came back, against 9-22 of 12-25 this way.)
///
/// # Safety
/// `ptr` is a block of `slab`, handed out by hakmem and not yet freed.
#[inline(always)]
pub unsafe fn free_if_owner(
    tc: &mut TinyCache,
    mode: CacheMode,
    ptr: *mut u8,
    slab: *mut Slab,
) -> Push {
    // SAFETY: per the contract `slab` is live metadata; owner is atomic and bin
    // is stable while any block of the slab is out.
    let (owner, bin) = unsafe { ((*slab).owner.load(Ordering::Relaxed), (*slab).bin as usize) };
    // A thread without an id (0) never matches: no thread id is 0, nor
    // ABANDONED, and such a thread owns no slab (`may_own_slabs`); an
    // in-use slab reads 0 only while `format` or `recycle` is under way.
    if owner != tc.id {
        return Push::NotOurs;
    }
    push_local(tc, bin, ptr as *mut Block, mode.checks_frees())
}

/// What `free_remote` did with a block of another thread's slab.
#[must_use]
pub enum Remote {
    /// Freed: onto the slab's remote list, or to the pool.
    Done,
    /// Nothing yet, the block marked free: the slab's remote list is long
    /// enough that the caller, holding its thread cache again, should try to
    /// take the slab (`take_slab`), the block still pinning it.
    Take,
}

/// Frees a block of a SuperSlab slab that another thread owns (or owned:
/// abandoned) onto the slab's remote list, or reclaims the slab; or leaves
/// it to `take_slab` (`Remote::Take`).
///
/// # Safety
/// `ptr` is a block of `slab`, handed out by hakmem and not yet freed, and
/// `free_if_owner` said `NotOurs`.
#[inline(always)]
pub unsafe fn free_remote(ptr: *mut u8, slab: *mut Slab) -> Remote {
    // SAFETY: as in `free_if_owner`.
    let owner = unsafe { (*slab).owner.load(Ordering::Relaxed) };
    let b = ptr as *mut Block;
    // SAFETY: per the contract, a block its user hands back.
    if !unsafe { Block::mark_free(b, hardening::check_frees()) } {
        crate::misuse::invalid_free(crate::misuse::DOUBLE_FREE, b as usize);
        return Remote::Done;
    }
    let abandoned = owner == pool::ABANDONED || owner == pool::RECLAIMING;
    // SAFETY: `b` pins the slab (live metadata); capacity is stable while
    // any block of it is out.
    if !abandoned && worth_taking(unsafe { &*slab }) {
        return Remote::Take;
    }
    // SAFETY: per the contract.
    unsafe { route_foreign(b, slab) };
    Remote::Done
}

/// Sends free block `b` of `slab`, which the calling thread does not own,
/// to the slab's owner (its remote list) or, if its thread exited, to the
/// pool (`pool::free_unowned`): decided while `b` still pins the slab.
///
/// # Safety
/// `b` is a block of `slab`, freed and marked free, and the calling thread
/// does not own `slab`.
#[inline(always)]
unsafe fn route_foreign(b: *mut Block, slab: *mut Slab) {
    // SAFETY: `b` pins the slab: live metadata; owner is atomic.
    let owner = unsafe { (*slab).owner.load(Ordering::Relaxed) };
    if owner == pool::ABANDONED || owner == pool::RECLAIMING {
        // SAFETY: per the contract.
        unsafe { pool::free_unowned(slab, b) };
    } else {
        // SAFETY: per the contract, the block is ours to link onto the remote
        // list; nothing reads the slab after the push.
        unsafe { (*slab).push_remote(b) };
    }
}

/// Whether a free into another thread's `slab` should try to take it: its
/// remote list is about to hold half its blocks, then every 16th more. Its
/// owner has not drained it for that long: it has stopped allocating from
/// the bin, or stopped altogether; a try takes only if the owner made no
/// slow path since the freeing thread's last try (`TinyCache::take`;
/// docs/decisions.md, "Ownership").
#[inline(always)]
fn worth_taking(slab: &Slab) -> bool {
    let n = slab.remote_len() + 1;
    let half = slab.capacity / 2;
    n == half || (n > half && n.is_multiple_of(TAKE_RETRY))
}

/// How often past half a slab a free tries again to take it.
const TAKE_RETRY: u32 = 16;

/// Tries to take `slab`, whose block `ptr` the caller frees and whose
/// remote list `free_remote` found long (`Remote::Take`), from its owner:
/// under the owner's gate, free (the owner is in none of its slow paths),
/// the slab leaves the owner's ring and index for this thread's, its remote
/// list drained, `ptr` given back. So blocks others free into the slabs of
/// a thread that stopped allocating are reused, not kept for a refill that
/// may never come. If the slab cannot be taken, `ptr` goes onto its remote
/// list as it would have.
///
/// # Safety
/// As for `free_remote`, which returned `Take` (the block is marked free).
#[cold]
#[inline(never)]
pub unsafe fn take_slab(tc: &mut TinyCache, mode: CacheMode, ptr: *mut u8, slab: *mut Slab) {
    let b = ptr as *mut Block;
    // SAFETY: per the contract; `b` pins the slab until it is given back or pushed.
    unsafe {
        if !(mode.registered && tc.take(slab, b)) {
            // Not taken: as any other thread's free (its owner may have
            // exited meanwhile).
            route_foreign(b, slab);
        }
    }
}

/// Frees a legacy block of `bin` (any thread: legacy blocks have no owner).
#[inline]
pub fn free_legacy(tc: &mut TinyCache, mode: CacheMode, ptr: *mut u8, bin: usize) -> Push {
    push_local(tc, bin, ptr as *mut Block, mode.checks_frees())
}

/// Pushes a freed block onto the thread's list of `bin`; `check`: with the
/// double-free key (`hardening`).
#[inline(always)]
fn push_local(tc: &mut TinyCache, bin: usize, b: *mut Block, check: bool) -> Push {
    debug_assert!(bin < BINS);
    // SAFETY: `bin` comes from a slab's or a legacy segment's metadata, which
    // only ever holds bin numbers below BINS.
    let cc = unsafe { tc.tiny.get_unchecked_mut(bin) };
    // The same block freed twice in a row is caught with no read of it.
    // SAFETY: the block was freed by its user; its words become the link and key.
    if cc.head == b || !unsafe { Block::mark_free(b, check) } {
        crate::misuse::invalid_free(crate::misuse::DOUBLE_FREE, b as usize);
        return Push::Done;
    }
    // SAFETY: as above.
    unsafe { Block::set_next(b, cc.head) };
    cc.head = b;
    cc.count += 1;
    if cc.count > cc.limit {
        return Push::OverLimit(bin);
    }
    Push::Done
}

impl TinyCache {
    /// The start of each slow path that works on the thread's slabs: the
    /// thread's gate, held until the returned guard drops (None: the thread
    /// has no index or no id yet, so nobody takes its slabs), and what
    /// takers changed of its rings meanwhile brought into its own state.
    fn enter(&mut self) -> Option<OwnerGuard<'static, Gate>> {
        // SAFETY: a non-null index is this thread's until its exit hook, and
        // indexes are never unmapped.
        let ix: &'static OwnedIndex = unsafe { self.owned_index.as_ref()? };
        if self.id == 0 {
            return None;
        }
        // Not listed (another live thread holds the directory slot): nobody
        // takes from this thread, but the gate orders its own takes too.
        let _ = ix.list(self.id);
        let gate = ix.lock_gate();
        gate.entries.fetch_add(1, Ordering::Relaxed);
        let mut taken = gate.taken_bins.load(Ordering::Relaxed);
        while taken != 0 {
            let bin = taken.trailing_zeros() as usize;
            taken &= taken - 1;
            // The gate's copy says what the takes left of the ring head
            // and the active slab.
            self.slabs[bin].owned = SlabRef::from_raw(gate.head[bin].load(Ordering::Relaxed));
            self.slabs[bin].active = SlabRef::from_raw(gate.active[bin].load(Ordering::Relaxed));
        }
        gate.taken_bins.store(0, Ordering::Relaxed);
        Some(gate)
    }

    /// Holds this thread's gate across a fork (`lifecycle::fork`), if it
    /// has one: no taker is then halfway through one of its slabs.
    pub fn hold_gate_for_fork(&mut self) {
        if let Some(gate) = self.enter() {
            core::mem::forget(gate);
        }
    }

    /// Lets the gate `hold_gate_for_fork` held go (fork parent and
    /// `child`).
    pub fn release_gate_after_fork(&mut self, child: bool) {
        // SAFETY: a non-null index is this thread's and never unmapped.
        if let Some(ix) = unsafe { self.owned_index.as_ref() } {
            if self.id != 0 {
                ix.release_owner_after_fork(child);
            }
        }
    }

    /// Takes `slab` from its owner for this thread (see `take_slab`); false
    /// if it cannot be had: its owner is not listed, is in a slow path or
    /// made one since this thread's last try, the slab is this thread's own
    /// or nobody's, or this thread takes nothing (no id or no index yet).
    ///
    /// # Safety
    /// `b` is a block of `slab` the caller frees (it keeps the slab live
    /// meanwhile), marked free: given back to the slab if it is taken.
    unsafe fn take(&mut self, slab: *mut Slab, b: *mut Block) -> bool {
        // A thread with no gate of its own (no id or no index yet) takes
        // nothing: it has nowhere to keep its last look at the owner (below).
        let Some(own) = self.enter() else {
            return false;
        };
        // SAFETY: per the contract, live metadata; owner is atomic.
        let owner = unsafe { (*slab).owner.load(Ordering::Relaxed) };
        if owner == self.id || owner <= pool::ABANDONED || owner == pool::RECLAIMING {
            return false;
        }
        let Some((theirs, gate)) = owned_index::try_gate_of(owner) else {
            return false;
        };
        // Only from an owner that made no slow path since this thread's
        // last try (16 remote frees into this slab ago, or more): one that
        // has stopped allocating. An owner at work drains its remote lists
        // itself; taking its slabs (a producer's, by its consumer) left
        // them with takers that never allocate from them: xmalloc-test's
        // peak RSS 36 MB -> 357 MB.
        let entries = gate.entries.load(Ordering::Relaxed);
        let tried = &own.tried[owner % owned_index::TRIED];
        let idle = tried.owner.load(Ordering::Relaxed) == owner
            && tried.entries.load(Ordering::Relaxed) == entries;
        tried.owner.store(owner, Ordering::Relaxed);
        tried.entries.store(entries, Ordering::Relaxed);
        if !idle {
            return false;
        }
        // SAFETY: under the owner's gate, which it holds in every slow path
        // that works on its slabs, its ring and the slab's local state are
        // as it left them, and `owner` changes only there: the slab is still
        // its, on its ring for the slab's bin, and ours to move.
        unsafe {
            if (*slab).owner.load(Ordering::Relaxed) != owner {
                return false;
            }
            // The window: decided, the ring not yet touched.
            crate::test_hooks::at(crate::test_hooks::Point::TakeSlab, slab as usize);
            let bin = (*slab).bin as usize;
            let (prev, next) = ((*slab).prev, (*slab).next);
            let taken = SlabRef::new(slab).raw();
            if gate.head[bin].load(Ordering::Relaxed) == taken {
                let head = if next == slab {
                    SlabRef::NONE
                } else {
                    SlabRef::new(next)
                };
                gate.head[bin].store(head.raw(), Ordering::Relaxed);
            }
            if gate.active[bin].load(Ordering::Relaxed) == taken {
                gate.active[bin].store(SlabRef::NONE.raw(), Ordering::Relaxed);
            }
            (*prev).next = next;
            (*next).prev = prev;
            gate.taken_bins.fetch_or(1 << bin, Ordering::Relaxed);
            theirs.remove((*slab).base());
            (*slab).owner.store(self.id, Ordering::Relaxed);
            drop(gate);
            (*slab).next = null_mut();
            (*slab).prev = null_mut();
            drain_remote(&mut *slab);
            self.link_owned(bin, slab);
            if (*slab).give_back(b) {
                self.on_empty(bin, slab);
            }
        }
        true
    }

    /// This thread's rings are touched only under its gate while a taker may
    /// find it (`enter`): with the `invariants` feature (scenario, soak and
    /// fuzz runs), a slow path that let its guard go early, or never took
    /// it, aborts every run that reaches it.
    fn check_gate_held(&self) {
        crate::misuse::check_invariant!(
            match self.id != 0 && self.index().is_some_and(|ix| ix.exposed(self.id)) {
                true => Err("a thread works on its slabs without its gate (owned index)"),
                false => Ok(()),
            },
            self.owned_index
        );
    }

    fn active(&self, bin: usize) -> *mut Slab {
        self.slabs[bin].active.get()
    }

    fn set_active(&mut self, bin: usize, s: *mut Slab) {
        crate::misuse::check_invariant!(
            match s.is_null() {
                true => Ok(()),
                // SAFETY: a slab this thread owns, becoming its active one.
                false => unsafe { (*s).check() },
            },
            s
        );
        self.check_gate_held();
        self.slabs[bin].active = SlabRef::new(s);
        if let Some(ix) = self.index() {
            ix.gate_copy().active[bin].store(SlabRef::new(s).raw(), Ordering::Relaxed);
        }
    }

    fn owned(&self, bin: usize) -> *mut Slab {
        self.slabs[bin].owned.get()
    }

    fn set_owned(&mut self, bin: usize, s: *mut Slab) {
        self.check_gate_held();
        self.slabs[bin].owned = SlabRef::new(s);
        if let Some(ix) = self.index() {
            ix.gate_copy().head[bin].store(SlabRef::new(s).raw(), Ordering::Relaxed);
        }
    }

    /// The TLS SLL of `bin` went over its limit (or the limit was never set).
    #[cold]
    #[inline(never)]
    pub fn overflow(&mut self, mode: CacheMode, bin: usize) {
        let _gate = self.enter();
        if mode.keeps_nothing() {
            let n = self.tiny[bin].count;
            return self.drain(bin, n, DrainWhy::Overflow);
        }
        let cc = &mut self.tiny[bin];
        // Unset (0), or raised past the top by a remote list taken whole.
        cc.limit = bounded_limit(bin, cc.limit);
        if cc.count <= cc.limit {
            return;
        }
        // Keep half: the walk restarts as far from empty as from full.
        let n = cc.count - cc.limit / 2;
        self.overflows[bin] += 1;
        if self.overflows[bin] >= LIMIT_SHRINK_AFTER {
            self.overflows[bin] = 0;
            cc.limit = bounded_limit(bin, cc.limit - BATCH[bin]);
        }
        self.drain(bin, n, DrainWhy::Overflow);
    }

    /// The cache of `bin` ran empty: one batch more room, up to the top.
    fn grow_limit(&mut self, bin: usize) {
        let cc = &mut self.tiny[bin];
        cc.limit = bounded_limit(bin, cc.limit + BATCH[bin]);
    }

    /// The thread's cache of `bin` ran empty: a block, and more in the
    /// cache, from its slabs, the pool or the legacy path; null if memory
    /// cannot be had. (The front has run `lifecycle::before_refill`.)
    #[cold]
    #[inline(never)]
    pub fn refill(&mut self, mode: CacheMode, bin: usize) -> *mut u8 {
        let _gate = self.enter();
        // A thread that keeps nothing takes one block at a time, each handed
        // out by `pop` (which clears its key if frees are checked).
        let keeps_nothing = mode.keeps_nothing();
        let (want, whole, remote_whole) = if keeps_nothing {
            (1, 0, 1)
        } else {
            self.grow_limit(bin);
            (BATCH[bin], 2 * BATCH[bin], REMOTE_WHOLE_MAX)
        };
        if config::get().use_superslab && Self::may_own_slabs(mode) {
            loop {
                let active = self.active(bin);
                if !active.is_null() {
                    // SAFETY: the active slab is owned by this thread.
                    let s = unsafe { &mut *active };
                    let cc = &mut self.tiny[bin];
                    let mut n = s.take_batch(want, whole, &mut cc.head);
                    if n == 0 && s.has_remote() {
                        // Other threads freed these blocks: each link is a
                        // miss to read, so take the list whole, unwalked, and
                        // let the cache hold it until the thread uses it.
                        drain_remote(s);
                        n = s.take_batch(want, remote_whole, &mut cc.head);
                        if !keeps_nothing {
                            cc.limit = cc.limit.max(n);
                        }
                    }
                    if n > 0 {
                        cc.count += n;
                        return self.pop(mode, bin);
                    }
                }
                if let Some(s) = self.find_partial(bin) {
                    self.set_active(bin, s);
                    continue;
                }
                if let Some(s) = pool::adopt(bin, self.id) {
                    // SAFETY: adopt handed us exclusive ownership of `s`.
                    unsafe { drain_remote(&mut *s) };
                    self.link_owned(bin, s);
                    self.set_active(bin, s);
                    continue;
                }
                // Every slab of the bin the thread owns is full (or it owns
                // none: a first slab, or a program that freed them all).
                let growing = !self.owned(bin).is_null();
                match pool::acquire(bin, self.id, growing) {
                    Acquired::Slab(s) => {
                        self.link_owned(bin, s);
                        self.set_active(bin, s);
                    }
                    Acquired::Failed => break,
                }
            }
        }
        let n = legacy::refill(bin, want, &mut self.tiny[bin].head);
        if n == 0 {
            return null_mut();
        }
        self.tiny[bin].count += n;
        self.pop(mode, bin)
    }

    fn pop(&mut self, mode: CacheMode, bin: usize) -> *mut u8 {
        // As the frees that put the key there (`push_local`): an
        // unregistered thread has no copy of the knob, and reads it.
        let check = mode.checks_frees();
        let cc = &mut self.tiny[bin];
        let b = cc.head;
        // SAFETY: callers only pop after adding at least one block.
        cc.head = unsafe { Block::next(b) };
        cc.count -= 1;
        // SAFETY: `b` just left the list for the caller.
        unsafe { Block::mark_in_use(b, check) };
        b.cast()
    }

    /// Looks at up to PARTIAL_SCAN of the thread's other slabs of `bin`, from
    /// the front of the ring, for free blocks, draining their remote lists;
    /// EMPTY ones go to the recycle boundary. A full slab (and the active one)
    /// is rotated to the back, so the next call looks at others; a drain moves
    /// a slab that gets a block back to the front. So a slab with free blocks
    /// is found at once if they came from this thread, and within ring/8
    /// calls if only other threads freed them.
    fn find_partial(&mut self, bin: usize) -> Option<*mut Slab> {
        let active = self.active(bin);
        for _ in 0..PARTIAL_SCAN {
            let cur = self.owned(bin);
            if cur.is_null() {
                break;
            }
            // SAFETY: slabs on the owned ring belong to this thread.
            let s = unsafe { &mut *cur };
            if cur != active {
                if s.has_remote() {
                    drain_remote(s);
                }
                if s.used == 0 && self.on_empty(bin, cur) {
                    continue;
                }
                if s.has_free() {
                    return Some(cur);
                }
            }
            self.set_owned(bin, s.next);
        }
        None
    }

    /// Returns `n` blocks from the TLS SLL of `bin` to their slabs (a
    /// SuperSlab block reaches the SLL only while this thread owns its slab)
    /// or, legacy ones, to their bin's list in one chain.
    fn drain(&mut self, bin: usize, n: u32, why: DrainWhy) {
        probes::tls_drain(class_of_bin(bin), n, why);
        let mut legacy = Chain::EMPTY;
        for _ in 0..n {
            let b = self.tiny[bin].head;
            // SAFETY: n <= count, so b is a block on the SLL.
            self.tiny[bin].head = unsafe { Block::next(b) };
            self.tiny[bin].count -= 1;
            if !segment::in_superslab(b as usize) {
                legacy.push(b);
                continue;
            }
            let (_, slab, _) = slab_of(b as usize);
            // SAFETY: `b` pins its slab; owner is atomic. A block reaches
            // our SLL only while we own its slab, but another thread may
            // have taken the slab since (`take`; only under our gate, held
            // here, does `owner` change from our id): then the block goes
            // where another thread's free would. (Sending such blocks away
            // at `enter` instead, walking the lists of the bins taken from,
            // made hakbench's prodcons 5x slower, when takes were not yet
            // limited to idle owners. This look and the gate cost phases
            // 2.8% more instructions.)
            if unsafe { (*slab).owner.load(Ordering::Relaxed) } != self.id {
                // SAFETY: a free block (marked when cached) of a slab we do not own.
                unsafe { route_foreign(b, slab) };
                continue;
            }
            // SAFETY: ours (above).
            let (had_none, empty) = unsafe { ((*slab).free.is_null(), (*slab).give_back(b)) };
            if empty {
                self.on_empty(bin, slab);
            } else if had_none {
                // Its first free block on its list: it may have been full and
                // rotated to the back; refills look at the front first.
                self.move_to_front(bin, slab);
            }
        }
        if !legacy.head.is_null() {
            // SAFETY: the chain holds free legacy blocks of `bin`.
            unsafe { legacy::give_back(bin, legacy.head, legacy.tail, legacy.len) };
        }
    }

    /// A drain found `slab` EMPTY: hand it to the recycle boundary. True if released.
    fn on_empty(&mut self, bin: usize, slab: *mut Slab) -> bool {
        let is_active = slab == self.active(bin);
        // SAFETY: we own the slab.
        if !unsafe { pool::may_recycle(slab, is_active) } {
            return false;
        }
        self.unlink_owned(bin, slab);
        // SAFETY: ours, EMPTY, and now on none of our lists.
        unsafe { pool::recycle(slab) };
        true
    }

    /// Puts `s` (owned by this thread, on no list) at the front of the ring.
    fn link_owned(&mut self, bin: usize, s: *mut Slab) {
        // With every free checked, no index: the owner's frees take the path
        // that reads the slab's metadata (see `free_owned`).
        if self.owned_index.is_null() && !hardening::check_frees() {
            self.owned_index = owned_index::take();
            // The gate's copy of each bin's head and active slab starts as
            // ours (another bin's may be set already if an earlier take of
            // an index failed).
            for b in 0..BINS {
                let (head, active) = (self.owned(b), self.active(b));
                self.set_owned(b, head);
                self.set_active(b, active);
            }
        }
        // SAFETY: `s` is live slab metadata (ours from now on).
        let base = unsafe { (*s).base() };
        if let Some(ix) = self.index() {
            ix.insert(base, bin);
        }
        let front = self.owned(bin);
        // SAFETY: `s` is ours and on no list; the ring's slabs are ours.
        unsafe {
            if front.is_null() {
                (*s).next = s;
                (*s).prev = s;
            } else {
                let back = (*front).prev;
                (*s).next = front;
                (*s).prev = back;
                (*back).next = s;
                (*front).prev = s;
            }
        }
        self.set_owned(bin, s);
    }

    fn index(&self) -> Option<&OwnedIndex> {
        // SAFETY: non-null, the index is this thread's until its exit hook
        // (takers only clear a slot, atomically, under the gate).
        unsafe { self.owned_index.as_ref() }
    }

    /// Takes `s` off the ring, out of the active slot and out of the index.
    fn unlink_owned(&mut self, bin: usize, s: *mut Slab) {
        // SAFETY: `s` is live slab metadata, ours until this unlink.
        let base = unsafe { (*s).base() };
        if let Some(ix) = self.index() {
            ix.remove(base);
        }
        self.ring_remove(bin, s);
        if self.active(bin) == s {
            self.set_active(bin, null_mut());
        }
    }

    fn move_to_front(&mut self, bin: usize, s: *mut Slab) {
        if self.owned(bin) != s {
            self.ring_remove(bin, s);
            self.link_owned(bin, s);
        }
    }

    fn ring_remove(&mut self, bin: usize, s: *mut Slab) {
        self.check_gate_held();
        // SAFETY: `s` is on this thread's ring for `bin`, as are its neighbours.
        unsafe {
            let (prev, next) = ((*s).prev, (*s).next);
            if next == s {
                self.set_owned(bin, null_mut());
            } else {
                (*prev).next = next;
                (*next).prev = prev;
                if self.owned(bin) == s {
                    self.set_owned(bin, next);
                }
            }
            (*s).next = null_mut();
            (*s).prev = null_mut();
        }
    }

    /// Thread exit: every cached block back to its slab, every slab back to the
    /// pool (EMPTY) or parked for adoption (still has blocks out).
    pub fn release_all(&mut self) {
        let gate = self.enter();
        for bin in 0..BINS {
            let n = self.tiny[bin].count;
            if n > 0 {
                self.drain(bin, n, DrainWhy::ThreadExit);
            }
            // Frees after this (a later destructor's) overflow at once, and
            // with the thread no longer registered (`lifecycle`), drain all they hold.
            self.tiny[bin].limit = 0;
            self.overflows[bin] = 0;
            self.set_active(bin, null_mut());
            while !self.owned(bin).is_null() {
                let s = self.owned(bin);
                // SAFETY: owned slabs are ours.
                unsafe { drain_remote(&mut *s) };
                // SAFETY: as above.
                if unsafe { (*s).used } == 0 && self.on_empty(bin, s) {
                    continue;
                }
                self.unlink_owned(bin, s);
                pool::abandon(s);
            }
        }
        if !self.owned_index.is_null() {
            if let (Some(ix), Some(g)) = (self.index(), gate.as_ref()) {
                ix.unlist(g);
            }
            drop(gate);
            // SAFETY: every owned slab was unlinked above, so the index is
            // empty, and no taker finds it any more (unlisted; the give-back
            // clears its gate's id); the null left behind sends later frees
            // the slow way.
            unsafe { owned_index::give_back(self.owned_index) };
            self.owned_index = null_mut();
        }
    }
}

/// Blocks linked through `next`, newest at `head`.
struct Chain {
    head: *mut Block,
    tail: *mut Block,
    len: u32,
}

impl Chain {
    const EMPTY: Chain = Chain {
        head: null_mut(),
        tail: null_mut(),
        len: 0,
    };

    fn push(&mut self, b: *mut Block) {
        // SAFETY: `b` is a free block taken off the SLL; its link is ours.
        unsafe { Block::set_next(b, self.head) };
        if self.head.is_null() {
            self.tail = b;
        }
        self.head = b;
        self.len += 1;
    }
}

fn drain_remote(s: &mut Slab) {
    let n = s.drain_remote();
    if n > 0 {
        probes::remote_drain(class_of_bin(s.bin as usize), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::tiny_bin;

    const REGISTERED: CacheMode = CacheMode {
        registered: true,
        check_frees: false,
    };

    /// Every block of `s` carved and handed out, as a list.
    fn take_all(s: *mut Slab) -> Vec<*mut Block> {
        let mut head = null_mut();
        // SAFETY: the test owns `s`, freshly acquired.
        let n = unsafe { (*s).take_batch(u32::MAX, u32::MAX, &mut head) };
        let mut blocks = Vec::with_capacity(n as usize);
        while !head.is_null() {
            blocks.push(head);
            // SAFETY: blocks on the taken list link through their first word.
            head = unsafe { Block::next(head) };
        }
        blocks
    }

    #[test]
    fn a_refill_looks_at_a_few_owned_slabs_and_drained_ones_come_first() {
        let bin = tiny_bin(1024);
        let mut tc = Box::new(TinyCache::NEW);
        tc.id = &*tc as *const TinyCache as usize;
        let mut slabs = Vec::new();
        let mut blocks = Vec::new();
        for _ in 0..40 {
            let Acquired::Slab(s) = pool::acquire(bin, tc.id, false) else {
                panic!("no slab");
            };
            blocks.push(take_all(s));
            tc.link_owned(bin, s);
            slabs.push(s);
        }
        // Another thread frees a block of the slab at the back of the ring.
        let b = blocks[0].pop().unwrap();
        // SAFETY: a block of slabs[0], handed out above.
        unsafe { (*slabs[0]).push_remote(b) };
        assert_eq!(tc.find_partial(bin), None, "looked at more than 8 slabs");
        let calls = (2..=6).find(|_| tc.find_partial(bin).is_some());
        assert_eq!(calls, Some(5), "found after the 32 full slabs before it");
        assert_eq!(tc.find_partial(bin), Some(slabs[0]));
        // This thread frees a block of a full slab: the drain puts it in front.
        let b = blocks[20].pop().unwrap();
        tc.tiny[bin].head = b;
        tc.tiny[bin].count = 1;
        tc.drain(bin, 1, DrainWhy::Overflow);
        assert_eq!(tc.find_partial(bin), Some(slabs[20]));
        // Everything back: every slab goes EMPTY and leaves the ring.
        for b in blocks.into_iter().flatten() {
            // SAFETY: every block left was handed out above and is freed once.
            unsafe { Block::set_next(b, tc.tiny[bin].head) };
            tc.tiny[bin].head = b;
            tc.tiny[bin].count += 1;
        }
        tc.release_all();
        assert!(tc.owned(bin).is_null());
    }

    /// Allocates `n` blocks of `bin` as malloc does (a refill when the
    /// cache is empty); the second value counts the refills.
    fn allocate_run(tc: &mut TinyCache, bin: usize, n: usize) -> (Vec<*mut Block>, u32) {
        let mut blocks = Vec::with_capacity(n);
        let mut refills = 0;
        while blocks.len() < n {
            let b = if tc.tiny[bin].count == 0 {
                refills += 1;
                tc.refill(REGISTERED, bin)
            } else {
                tc.pop(REGISTERED, bin)
            };
            assert!(!b.is_null());
            blocks.push(b as *mut Block);
        }
        (blocks, refills)
    }

    /// Frees `blocks` as free does (an overflow past the limit); returns
    /// the most the cache held and how many overflows drained it.
    fn free_run(tc: &mut TinyCache, bin: usize, blocks: Vec<*mut Block>) -> (u32, u32) {
        let (mut most, mut overflows) = (0, 0);
        for b in blocks {
            if let Push::OverLimit(bin) = push_local(tc, bin, b, false) {
                overflows += 1;
                tc.overflow(REGISTERED, bin);
            }
            most = most.max(tc.tiny[bin].count);
        }
        (most, overflows)
    }

    fn new_cache() -> Box<TinyCache> {
        let mut tc = Box::new(TinyCache::NEW);
        tc.id = &*tc as *const TinyCache as usize;
        tc
    }

    #[test]
    fn a_bin_that_runs_empty_gets_room_and_one_that_only_frees_gives_it_back() {
        let bin = tiny_bin(1024);
        let batch = BATCH[bin];
        let mut tc = new_cache();
        // Allocate 1,000 blocks: the cache runs empty at every batch.
        let (blocks, _) = allocate_run(&mut tc, bin, 1000);
        assert_eq!(tc.tiny[bin].limit, LIMIT_MAX[bin]);
        // Free them all: the cache overflows again and again with no refill
        // in between, so its room shrinks back to the bottom.
        let (most, _) = free_run(&mut tc, bin, blocks);
        assert_eq!(tc.tiny[bin].limit, LIMIT_MIN_BATCHES * batch);
        assert!(most <= LIMIT_MAX[bin] + 1, "held {most} blocks");
        assert!(tc.tiny[bin].count <= LIMIT_MIN_BATCHES * batch);
        tc.release_all();
        assert!(tc.owned(bin).is_null());
    }

    /// glibc's bench-malloc-simple allocates 1,600 blocks of 16, 32 or 64
    /// bytes and frees them, again and again: once the limit has grown, a
    /// run is served and taken back by the cache alone. (At the old top of
    /// 8 batches, 512 blocks, every run drained and refilled it.)
    #[test]
    fn a_run_of_1600_small_blocks_allocated_and_freed_again_stays_in_the_cache() {
        for size in [16, 32, 64] {
            let bin = tiny_bin(size);
            let mut tc = new_cache();
            for _ in 0..3 {
                let (blocks, _) = allocate_run(&mut tc, bin, 1600);
                free_run(&mut tc, bin, blocks);
            }
            let (blocks, refills) = allocate_run(&mut tc, bin, 1600);
            let (most, overflows) = free_run(&mut tc, bin, blocks);
            assert_eq!(
                (refills, overflows),
                (0, 0),
                "{size} B: the cache held {most}"
            );
            // A longer run fills it to the top (2,048 blocks of these sizes,
            // 32 batches) and no further.
            let (blocks, _) = allocate_run(&mut tc, bin, 4000);
            let (most, _) = free_run(&mut tc, bin, blocks);
            assert_eq!((most, LIMIT_MAX[bin]), (2048, 2048), "{size} B");
            tc.release_all();
        }
    }

    #[test]
    fn frees_after_thread_exit_are_not_held_in_the_dead_threads_cache() {
        let bin = tiny_bin(100);
        let mut head = null_mut();
        // Legacy blocks: they have no owner, so they land in the freeing
        // thread's list whatever its state (a destructor after the exit hook).
        assert_eq!(crate::legacy::refill(bin, 40, &mut head), 40);
        let mut blocks = Vec::new();
        while !head.is_null() {
            blocks.push(head);
            // SAFETY: the refilled chain links through the first word.
            head = unsafe { Block::next(head) };
        }
        let mut tc = Box::new(TinyCache::NEW);
        let mut mode = REGISTERED;
        for &b in &blocks[..20] {
            if let Push::OverLimit(bin) = push_local(&mut tc, bin, b, false) {
                tc.overflow(mode, bin);
            }
        }
        assert!(tc.tiny[bin].count > 0, "a registered cache keeps blocks");
        tc.release_all();
        // What `lifecycle` does after the release.
        mode.registered = false;
        assert_eq!(tc.tiny[bin].count, 0);
        for &b in &blocks[20..] {
            if let Push::OverLimit(bin) = push_local(&mut tc, bin, b, false) {
                tc.overflow(mode, bin);
            }
            assert_eq!(
                tc.tiny[bin].count, 0,
                "a free after the exit hook was held back"
            );
        }
    }
}
