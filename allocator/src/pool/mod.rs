//! The shared slab pool: Stage 1 (reuse an EMPTY slab of any class), Stage 2
//! (claim a never-used slot), Stage 3 (map a SuperSlab), and `shared_fail` when
//! all three fail. Also the one recycle boundary: every drain site reports an
//! EMPTY slab to `recycle`, which decides, fires `slab_recycle` and releases it.
//! EMPTY slabs that stay unused for the purge delay give their pages back
//! (`purge_if_due`, see `empty_slabs`).

use crate::class::{class_of_bin, BINS};
use crate::config;
pub mod empty_slabs;

use crate::chunks;
use crate::os;
use crate::probes;
use crate::registry;
use crate::segment::SegKind;
use crate::superslab::{
    Block, Slab, SlabState, SuperSlab, FIRST_SLAB, SERVING_SLABS, SLAB_SIZE, SS_HEADER_RESERVE,
    SS_SIZE,
};
use crate::sync::{Generation, SpinLock};
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU64, Ordering};
use empty_slabs::EmptySlabs;
use hakmem_common::{CacheUser, FailReason, RecycleOutcome, ReturnWhy, Stage};

struct Pool {
    /// EMPTY slabs: Stage 1.
    empty: EmptySlabs,
    /// SuperSlabs with unclaimed slots (through SuperSlab::next_fresh): Stage 2.
    fresh: *mut SuperSlab,
    /// SuperSlabs in the pool now (made and not retired).
    superslabs: usize,
    /// A thread is mapping a SuperSlab with the lock let go (`map_new`).
    mapping: bool,
    /// SuperSlabs all of whose claimed slabs are EMPTY.
    idle_superslabs: usize,
    /// Slabs of exited threads still holding blocks, per bin (through Slab::next).
    abandoned: [*mut Slab; BINS],
}

// SAFETY: the raw pointers are only touched under the pool lock.
unsafe impl Send for Pool {}

impl Pool {
    const NEW: Pool = Pool {
        empty: EmptySlabs::NEW,
        fresh: null_mut(),
        superslabs: 0,
        mapping: false,
        idle_superslabs: 0,
        abandoned: [null_mut(); BINS],
    };
}

static POOL: SpinLock<Pool> = SpinLock::new(Pool::NEW);

/// Result of a slab request.
pub enum Acquired {
    Slab(*mut Slab),
    Failed,
}

/// Hands out a slab formatted for `bin`, owned by `owner`. With `growing`
/// (the owner has filled every slab of `bin` it owns), a slab never used
/// before (Stage 2 or 3) is faulted in whole at once: the program will write
/// every page of it, and one syscall costs less than 16 page faults.
pub fn acquire(bin: usize, owner: usize, growing: bool) -> Acquired {
    crate::misuse::check_invariant!(thread_owner(owner), owner);
    let class = class_of_bin(bin);
    probes::ss_acquire_begin(class);
    // `cold`: none of its pages is resident (never used, or purged). None:
    // Stage 3, a SuperSlab to map with the lock let go (`map_new`).
    let taken = loop {
        let mut pool = POOL.lock();
        crate::misuse::check_invariant!(pool.check(), pool.fresh);
        if let Some((s, purged)) = pool.take_empty() {
            break Ok(Some((s, Stage::ReuseEmpty, purged)));
        }
        if let Some(s) = pool.claim_fresh() {
            break Ok(Some((s, Stage::ClaimFresh, true)));
        }
        if !pool.mapping {
            break pool.reserve_mapping().map(|()| None);
        }
        // Another thread is mapping a SuperSlab: its other 30 slabs will
        // serve this request (one mapping at a time, as when the lock was
        // held across it; under `HAKMEM_SS_MAX` this one's budget may be
        // the last). Sleep until it is in: read under the lock, which the
        // mapper takes to finish before it moves the count.
        let seen = MAPPED.current();
        drop(pool);
        MAPPED.wait_past(seen);
    };
    let taken = taken.and_then(|t| match t {
        Some(t) => Ok(t),
        None => map_new().map(|s| (s, Stage::MapNew, true)),
    });
    let (slab, stage, cold) = match taken {
        Ok(t) => t,
        Err(reason) => {
            probes::shared_fail(class, reason);
            return Acquired::Failed;
        }
    };
    // SAFETY: the slab was just removed from the pool's lists under the lock;
    // nobody else references it until we publish it to the owner.
    unsafe { (*slab).format(bin, owner) };
    if growing && cold {
        // SAFETY: as above.
        unsafe { (*slab).populate() };
    }
    probes::ss_acquire(class, stage, slab as usize);
    Acquired::Slab(slab)
}

/// Stage 3, after `reserve_mapping`: maps a SuperSlab and writes its header
/// outside the pool lock, then takes the lock again to add it and claim its
/// first slab. Held across, the chunk cache's lock, the OS's mapping (`mmap`
/// and `mprotect` wait for the process's memory map lock, which other
/// threads' page faults hold: 1-4 ms in rptest's traces, see `os`) and the
/// header's page fault kept every other thread's Stage 1 and 2, recycles
/// and purges waiting as long. One thread maps at a time: another that finds
/// no slot meanwhile sleeps until this one's SuperSlab is in (`acquire`,
/// `MAPPED`), so the budget and the address space go as when the lock was
/// held across. (A fork while a thread is here leaves the chunk it took
/// mapped in the child, unused; the child may map again:
/// `forget_mapper_after_fork`.)
fn map_new() -> Result<*mut Slab, FailReason> {
    crate::test_hooks::at(crate::test_hooks::Point::MapSuperSlab, 0);
    let mapped = map_superslab();
    let slab = {
        let mut pool = POOL.lock();
        pool.mapping = false;
        mapped.map(|ss| pool.add_mapped(ss))
    };
    // Failed too: a waiter then takes the turn.
    MAPPED.advance();
    slab
}

/// Moves on each time a Stage 3 mapping ends; threads that found another
/// thread mapping sleep on it (`acquire`).
static MAPPED: Generation = Generation::new();

/// A new SuperSlab, its header written and its registry byte set; in no
/// pool list yet.
fn map_superslab() -> Result<*mut SuperSlab, FailReason> {
    // A chunk the chunk cache kept saves the mapping and the page faults.
    let (base, cached) = chunks::take_chunk(CacheUser::SuperSlab);
    if base.is_null() {
        return Err(FailReason::MapFailed);
    }
    if !SuperSlab::addressable(base as usize) {
        // Should it ever happen, the legacy path serves.
        // SAFETY: the mapping was just made or taken from the cache, and
        // nothing refers to it.
        unsafe {
            registry::remove(base as usize);
            os::unmap(base, SS_SIZE);
        }
        return Err(FailReason::MapFailed);
    }
    if cached {
        // Its last user (a large block, an ACE segment) may have touched
        // slab 0 past the header, which no slab will purge now that slab 0
        // serves no blocks (`superslab::FIRST_SLAB`): up to 60 KiB resident
        // for the SuperSlab's life, and missing from its resident extent.
        // SAFETY: the chunk is ours alone and nothing in it is in use; the
        // header's page, written below, is not in the range.
        unsafe {
            os::decommit(
                (base as usize + SS_HEADER_RESERVE) as *mut u8,
                SLAB_SIZE - SS_HEADER_RESERVE,
            )
        };
    }
    // SAFETY: an SS_SIZE-aligned mapping of SS_SIZE bytes, ours alone.
    let ss = unsafe { SuperSlab::init(base) };
    registry::insert(base as usize, SegKind::SuperSlab as u8);
    probes::ss_map(SS_SIZE, base as usize);
    Ok(ss)
}

/// The recycle boundary, its decision: `slab` reached `used == 0` at a
/// drain. True if it goes back to the pool: the caller takes it off its own
/// lists and hands it over with `recycle`.
///
/// # Safety
/// The caller owns `slab`; `is_active` says whether it is the caller's current
/// slab for its class.
pub unsafe fn may_recycle(slab: *mut Slab, is_active: bool) -> bool {
    // SAFETY: per the contract the caller holds the slab exclusively.
    let s = unsafe { &*slab };
    let class = class_of_bin(s.bin as usize);
    let used = s.used;
    if used != 0 || s.capacity == 0 {
        return false;
    }
    probes::slab_recycle(class, RecycleOutcome::Empty, slab as usize, used);
    if !config::get().recycle {
        probes::slab_recycle(class, RecycleOutcome::SkipDisabled, slab as usize, used);
        return false;
    }
    if is_active {
        probes::slab_recycle(class, RecycleOutcome::SkipActive, slab as usize, used);
        return false;
    }
    crate::misuse::check_invariant!(s.check(), slab);
    true
}

/// The recycle boundary, the hand-over: the slab `may_recycle` accepted
/// becomes EMPTY in the pool (and its SuperSlab goes to the chunk cache if
/// every slab of it is EMPTY).
///
/// # Safety
/// `may_recycle(slab, _)` said true, and the caller, which owns the slab,
/// has taken it off all its lists and forgets it.
pub unsafe fn recycle(slab: *mut Slab) {
    // SAFETY: per the contract the caller holds the slab exclusively.
    let s = unsafe { &mut *slab };
    let class = class_of_bin(s.bin as usize);
    let used = s.used;
    s.owner.store(0, Ordering::Release);
    s.state = SlabState::Empty;
    probes::slab_recycle(class, RecycleOutcome::Released, slab as usize, used);
    let retired = {
        let mut pool = POOL.lock();
        let retired = pool.release(slab);
        crate::misuse::check_invariant!(pool.check(), slab);
        retired
    };
    retire_all(&[retired]);
}

/// Hands SuperSlabs `Pool::retire` took out of the pool to the chunk cache
/// (outside the pool lock: the cache has its own).
fn retire_all(retired: &[*mut SuperSlab]) {
    for &ss in retired.iter().filter(|ss| !ss.is_null()) {
        // SAFETY: `Pool::retire` unlinked every slab of this SuperSlab and
        // removed it from all pool lists; no block of it is in use (all
        // slabs EMPTY).
        let extent = unsafe { (*ss).resident_extent() };
        probes::ss_unmap(SS_SIZE, ss as usize);
        // SAFETY: as above: nothing references the SuperSlab any more.
        unsafe { chunks::cache_chunk(ss as usize, extent, CacheUser::SuperSlab) };
    }
}

/// Retires every SuperSlab all of whose slabs are EMPTY, whatever
/// `HAKMEM_SS_KEEP` and the purge delay say: the OS refused a mapping, and
/// what they hold may be what the next one needs (`lifecycle::after_refusal`
/// then empties the chunk cache). True if any went.
pub fn retire_idle_now() -> bool {
    const BATCH: usize = 32;
    let mut any = false;
    loop {
        let mut batch = [null_mut(); BATCH];
        let mut n = 0;
        {
            let mut pool = POOL.lock();
            for slab in pool.empty.iter() {
                // SAFETY: a slab on the pool's lists (lock held): its
                // SuperSlab is live and the pool's.
                let ss = unsafe { (*slab).superslab() };
                // SAFETY: as above.
                let idle = unsafe { (*ss).empty == (*ss).claimed };
                if idle && !batch[..n].contains(&ss) {
                    batch[n] = ss;
                    n += 1;
                    if n == BATCH {
                        break;
                    }
                }
            }
            for &ss in &batch[..n] {
                // SAFETY: idle SuperSlabs of the pool (lock held), each once.
                unsafe { pool.retire(ss) };
            }
        }
        retire_all(&batch[..n]);
        any |= n > 0;
        if n < BATCH {
            return any;
        }
    }
}

/// Owner id of a slab whose thread exited with blocks still out (never a
/// thread's id: `lifecycle::threads::new_owner_id` starts past it). Not 0,
/// so that a thread that has no id yet (0) never takes such a slab for its
/// own in `tiny::free_if_owner`.
pub const ABANDONED: usize = 1;

/// Owner id held while a freeing thread reclaims an abandoned slab (never a thread's id).
pub const RECLAIMING: usize = usize::MAX;

/// A slab handed out is stamped with a thread's id: not 0 (which every
/// thread without an id would take for its own), ABANDONED or RECLAIMING.
#[cfg(feature = "invariants")]
fn thread_owner(owner: usize) -> Result<(), &'static str> {
    if owner > ABANDONED && owner != RECLAIMING {
        Ok(())
    } else {
        Err("invariant: a slab asked for with no thread's owner id")
    }
}

/// Frees block `b` of a slab whose owner was read as ABANDONED or RECLAIMING
/// (its thread exited). Without this, a slab abandoned with blocks out would
/// stay mapped until some thread allocated from its bin again.
///
/// The block still counts in the slab's `used` until it is pushed or given
/// back here, so until then nobody can recycle the slab: every decision that
/// reads the slab's metadata is made while `b` pins it, or under the pool
/// lock while the slab is parked (a parked slab leaves the abandoned list
/// only under that lock). Nothing reads the slab after `b` is let go, except
/// a reclaimer holding it RECLAIMING, which only the pool lock ends.
///
/// - Parked (ABANDONED, on the list): take it off (RECLAIMING), give `b`
///   back, drain its remote frees, recycle it if EMPTY, else park it again,
///   looking at its remote list one last time under the lock.
/// - Being reclaimed (RECLAIMING): push `b` onto its remote list under the
///   pool lock, so the reclaimer's last look, also under it, sees it.
/// - Adopted meanwhile (a thread's id): push `b` for that owner to drain.
///
/// # Safety
/// `b` is a block of `slab` handed out by hakmem and not yet freed, already
/// marked free (`Block::mark_free`).
pub unsafe fn free_unowned(slab: *mut Slab, b: *mut Block) {
    crate::test_hooks::at(crate::test_hooks::Point::UnownedFree, slab as usize);
    {
        let mut pool = POOL.lock();
        // SAFETY: `b` pins the slab (see above).
        let s = unsafe { &*slab };
        let owner = s.owner.load(Ordering::Acquire);
        if owner != ABANDONED || !pool.unlink_abandoned(s.bin as usize, slab) {
            // RECLAIMING: its reclaimer looks again under this lock. An owner:
            // it drains. Either way the last touch of the slab is this push.
            s.push_remote(b);
            return;
        }
        s.owner.store(RECLAIMING, Ordering::Release);
    }
    // SAFETY: unlinked under the lock with owner RECLAIMING: only we touch its
    // local state until it is parked or recycled.
    let s = unsafe { &mut *slab };
    s.give_back(b);
    loop {
        let n = s.drain_remote();
        if n > 0 {
            probes::remote_drain(class_of_bin(s.bin as usize), n);
        }
        // SAFETY: we hold the slab exclusively; it is on no list.
        if s.used == 0 && unsafe { may_recycle(slab, false) } {
            // SAFETY: as above.
            return unsafe { recycle(slab) };
        }
        crate::test_hooks::at(crate::test_hooks::Point::BeforeRepark, slab as usize);
        let mut pool = POOL.lock();
        if !s.has_remote() {
            // SAFETY: ours (RECLAIMING, on no list); parked under the lock,
            // after which we never touch it.
            unsafe { pool.park(slab) };
            return;
        }
        // Frees that saw RECLAIMING pushed while we drained: still ours.
    }
}

/// Parks a slab of an exiting thread that still has blocks out.
pub fn abandon(slab: *mut Slab) {
    // SAFETY: the exiting owner hands the slab over.
    unsafe { POOL.lock().park(slab) };
}

/// Bytes of the EMPTY slabs that keep their pages.
pub fn resident_empty_bytes() -> usize {
    POOL.lock().empty.resident_len() * crate::superslab::SLAB_SIZE
}

/// Takes over an abandoned slab of `bin`, if any.
pub fn adopt(bin: usize, owner: usize) -> Option<*mut Slab> {
    crate::misuse::check_invariant!(thread_owner(owner), owner);
    let mut pool = POOL.lock();
    let slab = pool.abandoned[bin];
    if slab.is_null() {
        return None;
    }
    // SAFETY: the slab is on our list under the lock; we unlink and own it.
    unsafe {
        pool.abandoned[bin] = (*slab).next;
        (*slab).next = null_mut();
        (*slab).owner.store(owner, Ordering::Release);
    }
    Some(slab)
}

pub fn lock_for_fork() {
    POOL.acquire_for_fork();
}

pub fn unlock_after_fork() {
    POOL.release_after_fork();
}

/// In a forked child (after `unlock_after_fork`): a thread that was mapping
/// a SuperSlab at the fork is not in the child, and the child's Stage 3
/// must not wait for it for good.
pub fn forget_mapper_after_fork() {
    POOL.lock().mapping = false;
}

/// When the oldest resident EMPTY slab is due to be purged (`os::now_ns`
/// time), u64::MAX when none is waiting; possibly early (then the check
/// finds nothing due and sets it again). Read without the lock.
static PURGE_DUE: AtomicU64 = AtomicU64::new(u64::MAX);

/// Slabs purged per hold of the pool lock (a madvise each, 5-10 us).
const PURGE_BATCH: usize = 8;

/// The newest resident EMPTY slabs, which wait `chunks::MAX_IDLE_NS` rather
/// than the purge delay: `HAKMEM_SS_KEEP` SuperSlabs' worth.
fn reserve_slabs() -> usize {
    config::get().ss_keep * SERVING_SLABS
}

/// Gives back the pages of EMPTY slabs unused for the purge delay. Cheap
/// when none is due (one load), so allocator slow paths call it.
pub fn purge_if_due() {
    let due = PURGE_DUE.load(Ordering::Relaxed);
    if due == u64::MAX {
        return;
    }
    let now = os::now_ns();
    if now >= due {
        purge(now, false);
    }
}

/// When the next EMPTY slab is due to be purged, if any is waiting.
pub fn next_due_ns() -> Option<u64> {
    let due = PURGE_DUE.load(Ordering::Relaxed);
    (due != u64::MAX).then_some(due)
}

/// Gives back the pages of every resident EMPTY slab (`malloc_trim`). True
/// if there was any.
pub fn trim() -> bool {
    purge(os::now_ns(), true)
}

/// Purges the resident EMPTY slabs that are due at `now` (all of them with
/// `all`), a batch per hold of the lock, and fires `os_return` (why `slabs`)
/// per batch. A slab is due after the purge delay, or after
/// `chunks::MAX_IDLE_NS` while it is among the reserve's newest slabs. The
/// madvise runs under the lock: a slab taken off the lists while its pages
/// go could be retired with its SuperSlab meanwhile.
fn purge(now: u64, all: bool) -> bool {
    let delay = config::get().purge_delay_ns;
    let reserve = reserve_slabs();
    let mut any = false;
    loop {
        let (mut bytes, mut slabs) = (0, 0);
        let mut retired = [null_mut(); PURGE_BATCH];
        {
            let mut pool = POOL.lock();
            let mut next_due = u64::MAX;
            while let Some(slab) = pool.empty.oldest_resident() {
                // SAFETY: a slab on the pool's resident list (lock held).
                let age = unsafe { empty_slabs::age_ns(slab, now) };
                let wait = if pool.empty.resident_len() > reserve {
                    delay
                } else {
                    chunks::MAX_IDLE_NS
                };
                if !all && age < wait {
                    next_due = now + (wait - age);
                    break;
                }
                if slabs == PURGE_BATCH {
                    next_due = now;
                    break;
                }
                // SAFETY: EMPTY and the pool's: no block of it is out, and
                // nobody takes it while we hold the lock.
                unsafe {
                    bytes += (*slab).purge();
                    pool.empty.mark_purged(slab);
                    retired[slabs] = pool.retire_if_idle((*slab).superslab());
                }
                slabs += 1;
            }
            PURGE_DUE.store(next_due, Ordering::Relaxed);
        }
        if slabs == 0 {
            return any;
        }
        any = true;
        probes::os_return(bytes, ReturnWhy::Slabs, bytes, slabs);
        retire_all(&retired);
        if slabs < PURGE_BATCH {
            return true;
        }
    }
}

impl Pool {
    /// The pool's invariants (feature `invariants`): its EMPTY lists
    /// (`EmptySlabs::check`), its counts, its SuperSlabs with free slots,
    /// and each abandoned slab parked under its own bin. Lock held.
    #[cfg(any(test, feature = "invariants"))]
    fn check(&self) -> Result<(), &'static str> {
        self.empty.check()?;
        if self.idle_superslabs > self.superslabs {
            return Err("invariant: more idle SuperSlabs than SuperSlabs");
        }
        let mut ss = self.fresh;
        // SAFETY: the pool's SuperSlabs and parked slabs (lock held).
        unsafe {
            while !ss.is_null() {
                if (*ss).claimed as usize >= SERVING_SLABS || (*ss).empty > (*ss).claimed {
                    return Err("invariant: a SuperSlab on the fresh list has no free slot");
                }
                ss = (*ss).next_fresh;
            }
            for (bin, &head) in self.abandoned.iter().enumerate() {
                let mut s = head;
                while !s.is_null() {
                    if (*s).bin as usize != bin || (*s).owner.load(Ordering::Relaxed) != ABANDONED {
                        return Err("invariant: a parked slab is of another bin or owned");
                    }
                    s = (*s).next;
                }
            }
        }
        Ok(())
    }

    /// A slab for Stage 1, and whether it was purged.
    fn take_empty(&mut self) -> Option<(*mut Slab, bool)> {
        let (slab, purged) = self.empty.take()?;
        // SAFETY: slabs on the empty lists belong to the pool (lock held).
        unsafe {
            let ss = &mut *(*slab).superslab();
            if ss.empty == ss.claimed {
                self.idle_superslabs -= 1;
            }
            ss.empty -= 1;
        }
        Some((slab, purged))
    }

    /// Puts `slab` on the abandoned list of its bin, owner ABANDONED.
    ///
    /// # Safety
    /// The caller holds the slab exclusively (its owner, exiting, or its
    /// reclaimer); its links are ours to set.
    unsafe fn park(&mut self, slab: *mut Slab) {
        // SAFETY: per the contract.
        unsafe {
            let bin = (*slab).bin as usize;
            (*slab).owner.store(ABANDONED, Ordering::Release);
            (*slab).prev = null_mut();
            (*slab).next = self.abandoned[bin];
            self.abandoned[bin] = slab;
        }
    }

    /// Removes `slab` from the abandoned list of `bin`; false if it is not there.
    fn unlink_abandoned(&mut self, bin: usize, slab: *mut Slab) -> bool {
        let mut link: *mut *mut Slab = &mut self.abandoned[bin];
        // SAFETY: walking the abandoned list under the lock.
        unsafe {
            while !(*link).is_null() {
                if *link == slab {
                    *link = (*slab).next;
                    (*slab).next = null_mut();
                    return true;
                }
                link = &mut (**link).next;
            }
        }
        false
    }

    fn claim_fresh(&mut self) -> Option<*mut Slab> {
        let ssp = self.fresh;
        if ssp.is_null() {
            return None;
        }
        // SAFETY: SuperSlabs on the fresh list are mapped and pool-managed (lock held).
        unsafe {
            let ss = &mut *ssp;
            let idx = FIRST_SLAB + ss.claimed as usize;
            ss.claimed += 1;
            if ss.claimed as usize == SERVING_SLABS {
                self.fresh = ss.next_fresh;
                ss.next_fresh = null_mut();
            }
            Some(core::ptr::addr_of_mut!(ss.slabs[idx]))
        }
    }

    /// Takes the one mapper's turn (Stage 3; nobody has it), if the budget
    /// allows a SuperSlab more.
    fn reserve_mapping(&mut self) -> Result<(), FailReason> {
        debug_assert!(!self.mapping);
        if self.superslabs >= config::get().ss_max {
            return Err(FailReason::Budget);
        }
        self.mapping = true;
        Ok(())
    }

    /// The SuperSlab `ss`, mapped for a reservation, joins the fresh list;
    /// returns its first slab.
    fn add_mapped(&mut self, ss: *mut SuperSlab) -> *mut Slab {
        self.superslabs += 1;
        // SAFETY: `ss` was just initialised by its mapper, in no list yet.
        unsafe { (*ss).next_fresh = self.fresh };
        self.fresh = ss;
        self.claim_fresh().expect("a new SuperSlab has free slots")
    }

    /// Pushes an EMPTY slab; returns a SuperSlab to retire (its chunk goes to
    /// the chunk cache), or null. See `retire_if_idle` for when.
    fn release(&mut self, slab: *mut Slab) -> *mut SuperSlab {
        // SAFETY: the slab was handed to the pool by its owner (lock held).
        unsafe {
            let now = os::now_ns();
            self.empty.push(slab, now);
            // The first resident slab, or the first beyond the reserve: a
            // purge may be due a delay from now (an early check is harmless).
            let n = self.empty.resident_len();
            if n == 1 || n == reserve_slabs() + 1 {
                let due = now + config::get().purge_delay_ns;
                PURGE_DUE.fetch_min(due, Ordering::Relaxed);
            }
            let ssp = (*slab).superslab();
            let ss = &mut *ssp;
            ss.empty += 1;
            if ss.empty != ss.claimed {
                return null_mut();
            }
            self.idle_superslabs += 1;
            if config::get().purge_delay_ns == 0 {
                return self.retire_if_idle(ssp);
            }
            null_mut()
        }
    }

    /// Takes the SuperSlab `ssp` out of the pool to be retired (returns it;
    /// else null) if all its slabs are EMPTY, more than `HAKMEM_SS_KEEP`
    /// SuperSlabs are, and its slabs have given their pages back (the purge
    /// delay has passed since its last one went EMPTY; with no delay, at
    /// once). Until then its slabs serve Stage 1 for any class: a program
    /// that moves from one size range to another (phases of a computation,
    /// requests of different kinds) finds the EMPTY slabs of the last
    /// phase. Retired as soon as they were EMPTY beyond two SuperSlabs,
    /// they left before the next phase could take them: on hakbench's
    /// `phases` (64 phases of 100k blocks), after the first phase Stage 1
    /// served 49% of slab requests and 518 SuperSlabs were mapped (499
    /// retired); retired once purged, 95% and 49 mapped, peak RSS the same
    /// (104 MB).
    ///
    /// # Safety
    /// The lock is held; `ssp` is a live SuperSlab of the pool.
    unsafe fn retire_if_idle(&mut self, ssp: *mut SuperSlab) -> *mut SuperSlab {
        // SAFETY: per the contract.
        let ss = unsafe { &*ssp };
        let delay = config::get().purge_delay_ns;
        if ss.empty != ss.claimed
            || self.idle_superslabs <= config::get().ss_keep
            || (delay > 0
                // SAFETY: per the contract; all its slabs are EMPTY (checked
                // first), the pool's.
                && unsafe { SuperSlab::claimed_slabs(ssp) }
                    // SAFETY: as above.
                    .any(|s| unsafe { (*s).state } != SlabState::Purged))
        {
            return null_mut();
        }
        // SAFETY: per the contract; all its slabs are EMPTY.
        unsafe { self.retire(ssp) }
    }

    /// Takes the SuperSlab `ssp`, all of whose slabs are EMPTY, out of the
    /// pool; returns it.
    ///
    /// # Safety
    /// The lock is held; `ssp` is a live SuperSlab of the pool, idle.
    unsafe fn retire(&mut self, ssp: *mut SuperSlab) -> *mut SuperSlab {
        // SAFETY: per the contract.
        for slab in unsafe { SuperSlab::claimed_slabs(ssp) } {
            // SAFETY: every claimed slab is EMPTY, on the pool's lists.
            unsafe { self.empty.unlink(slab) };
        }
        // SAFETY: per the contract.
        unsafe { self.unlink_fresh(ssp) };
        self.idle_superslabs -= 1;
        self.superslabs -= 1;
        ssp
    }

    /// # Safety
    /// The lock is held; `ss` is a live SuperSlab.
    unsafe fn unlink_fresh(&mut self, ss: *mut SuperSlab) {
        let mut link: *mut *mut SuperSlab = &mut self.fresh;
        // SAFETY: walking the fresh list under the lock.
        unsafe {
            while !(*link).is_null() {
                if *link == ss {
                    *link = (*ss).next_fresh;
                    (*ss).next_fresh = null_mut();
                    return;
                }
                link = &mut (**link).next_fresh;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_superslab_on_a_cached_chunk_has_no_page_of_slab_0_past_its_header() {
        // A chunk its last user touched whole, newest in the chunk cache:
        // the next chunk a SuperSlab takes.
        let chunk = os::map_chunk();
        assert!(!chunk.is_null());
        // SAFETY: a fresh writable chunk, ours alone until cached.
        unsafe { core::ptr::write_bytes(chunk, 1, SS_SIZE) };
        // SAFETY: ours, handed over; nothing refers to it.
        unsafe { chunks::cache_chunk(chunk as usize, SS_SIZE, CacheUser::Large) };
        let ss = map_superslab().expect("a SuperSlab") as usize;
        let header = SS_HEADER_RESERVE;
        assert_eq!(os::resident_bytes(ss + header, SLAB_SIZE - header), Some(0));
        assert_eq!(os::resident_bytes(ss, header), Some(header));
        // SAFETY: the SuperSlab is in no pool list; nothing else refers to it.
        unsafe {
            registry::remove(ss);
            os::unmap(ss as *mut u8, SS_SIZE);
        }
    }

    #[test]
    fn stage_2_claims_slabs_1_to_31_in_order_then_drops_the_superslab() {
        let base = os::map_aligned(SS_SIZE, SS_SIZE);
        assert!(!base.is_null());
        // SAFETY: a fresh SS_SIZE-aligned mapping of SS_SIZE bytes, ours alone.
        let ss = unsafe { SuperSlab::init(base) };
        let mut pool = Pool::NEW;
        let mut claimed = vec![pool.add_mapped(ss)];
        while let Some(s) = pool.claim_fresh() {
            claimed.push(s);
        }
        // SAFETY: the header of the SuperSlab just initialised.
        let slab0 = unsafe { core::ptr::addr_of_mut!((*ss).slabs[0]) } as usize;
        let slots: Vec<usize> = claimed
            .iter()
            .map(|&s| (s as usize - slab0) / core::mem::size_of::<Slab>())
            .collect();
        assert_eq!(
            slots,
            (FIRST_SLAB..FIRST_SLAB + SERVING_SLABS).collect::<Vec<_>>()
        );
        assert!(
            pool.fresh.is_null(),
            "a full SuperSlab leaves the fresh list"
        );
        assert_eq!(pool.superslabs, 1);
        assert_eq!(pool.check(), Ok(()));
        // SAFETY: the test's own mapping; nothing refers to its slabs now.
        unsafe { os::unmap(base, SS_SIZE) };
    }

    #[test]
    fn the_pool_checker_sees_counts_and_parked_slabs_that_disagree() {
        let mut pool = Pool {
            superslabs: 1,
            ..Pool::NEW
        };
        assert_eq!(pool.check(), Ok(()));
        pool.idle_superslabs = 2;
        assert!(pool.check().unwrap_err().contains("idle"));
        pool.idle_superslabs = 0;
        // SAFETY: an all-zero Slab is valid (Fresh, null links).
        let mut slab: Box<Slab> = Box::new(unsafe { core::mem::zeroed() });
        slab.bin = 3;
        // SAFETY: ours, on no list.
        unsafe { pool.park(&mut *slab) };
        assert_eq!(pool.check(), Ok(()));
        slab.bin = 4;
        assert!(pool.check().unwrap_err().contains("parked"));
    }
}
