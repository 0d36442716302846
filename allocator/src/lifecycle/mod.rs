//! What every tier needs from above, in one place: initialisation, thread
//! registration and exit (`threads`), the fork handlers and their lock order
//! (`fork`), and periodic upkeep, returning what is due to the OS (`upkeep`).
//! The front's slow paths call in here before they hand a tier its part of
//! the thread state; no tier calls up here.
//!
//! What may allocate (glibc's `pthread_setspecific`, `pthread_atfork`,
//! `pthread_create`) runs here, where the caller holds no lock and no
//! reference into the thread cache, so an allocation that comes back into
//! hakmem finds everything consistent.

pub mod fork;
pub mod threads;
pub mod upkeep;

use crate::{chunks, config, hardening, os, pool, registry, thread};
use core::sync::atomic::{AtomicU8, Ordering};

static INIT: AtomicU8 = AtomicU8::new(0);
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// Initialises the allocator on the first slow path. Nothing in here calls
/// malloc before the state is DONE; what may allocate (pthread_atfork)
/// runs after, so a re-entrant malloc finds it ready.
#[inline]
pub fn ensure_init() {
    if INIT.load(Ordering::Acquire) != DONE {
        init_slow();
    }
}

#[cold]
fn init_slow() {
    if INIT
        .compare_exchange(0, RUNNING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        while INIT.load(Ordering::Acquire) != DONE {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
        return;
    }
    config::get();
    hardening::init();
    registry::protect();
    // Before DONE: no thread may register while the key does not exist yet.
    threads::create_key();
    INIT.store(DONE, Ordering::Release);
    fork::install_handlers();
    let stop_for = config::get().stop_at_start_pid;
    // SAFETY: getpid has no preconditions.
    if stop_for != 0 && stop_for == unsafe { libc::getpid() } as u64 {
        // SAFETY: raise has no preconditions; no allocator lock is held here.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// Before a refill of a thread cache (tiny or ACE): initialised, what is due returned to the OS (big blocks freed
/// a while ago go back even in a program that now makes only small ones),
/// the purge thread started if wanted, and the thread registered. The caller
/// holds no lock and no reference into the thread cache.
#[inline(never)]
pub fn before_refill() {
    before_slow_path();
    ensure_registered();
}

/// Before a large allocation (and a refill): initialised, what is due
/// returned to the OS, the purge thread started if wanted.
#[inline(never)]
pub fn before_slow_path() {
    ensure_init();
    upkeep::at_slow_path();
}

/// After an allocation came back null: if a mapping was refused since
/// `refusals_before` (`os::refusals`), the pool's idle SuperSlabs (kept for
/// Stage 1 until their slabs are purged) and everything the chunk cache holds
/// go back to the OS. True if anything went: the allocation is worth trying
/// again. A request no mapping could hold (malloc(SIZE_MAX)) changes nothing.
#[cold]
#[inline(never)]
pub fn after_refusal(refusals_before: usize) -> bool {
    if os::refusals() == refusals_before {
        return false;
    }
    let retired = pool::retire_idle_now();
    chunks::flush_refused() || retired
}

/// Before a thread cache's overflow is handled (its first free, or one past
/// its limit): the thread registered, so that what its caches keep is
/// emptied at its exit, and what is due returned to the OS. As
/// `before_refill`, the caller holds no reference into the thread cache.
#[inline(never)]
pub fn before_overflow() {
    ensure_registered();
    upkeep::if_due();
}

/// Gives the thread an owner id and the exit hook that empties its caches,
/// if it has none yet. Every path that leaves blocks in a cache passes here
/// (a refill before it fills the cache, an ACE free into a cache not set up,
/// before its overflow is handled): a thread that exits without the hook
/// strands its cached blocks. Registering can allocate
/// (pthread_setspecific), so callers hold no reference into the cache.
pub fn ensure_registered() {
    // (A thread past its exit hook stays unregistered: it keeps nothing.)
    if thread::with_cache(|tc| tc.mode.registered || tc.exited) {
        return;
    }
    // The hook's key is made at initialisation.
    ensure_init();
    // Listed first (no allocation): a thread with no slot keeps nothing
    // cached, as one without its hook, gets no owner id, so owns no slab
    // (`TinyCache::may_own_slabs`), and asks again at its next slow path.
    if !thread::list_current() {
        return;
    }
    thread::with_cache(|tc| {
        // Set before registering, which may allocate and so come back here.
        tc.mode.registered = true;
        tc.mode.check_frees = hardening::check_frees();
        if tc.tiny.owner_id() == 0 {
            tc.tiny.set_owner_id(threads::new_owner_id());
        }
    });
    if !threads::register_current() {
        // No hook: keep nothing cached (`CacheMode::keeps_nothing`) and
        // take no slab (`TinyCache::may_own_slabs`); try again at the next
        // slow path. (A refill that registering's own allocation re-entered
        // may have left a batch, and taken a slab: the thread stays listed,
        // so hakctl counts them.)
        thread::with_cache(|tc| tc.mode.registered = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::tiny_bin;
    use crate::pool;

    #[test]
    fn a_thread_registers_before_its_first_refill_and_keeps_nothing_after_its_exit_hook() {
        std::thread::spawn(|| {
            let bin = tiny_bin(64);
            // (In this test binary hakmem is the C library's malloc too, so
            // the thread may have registered on its way here.)
            before_refill();
            let (registered, id) =
                thread::with_cache(|tc| (tc.mode.registered, tc.tiny.owner_id()));
            assert!(registered && id > pool::ABANDONED);
            let b = thread::with_cache(|tc| tc.tiny.refill(tc.mode, bin));
            assert!(!b.is_null());
            assert!(
                !thread::with_cache(|tc| tc.tiny.head(bin)).is_null(),
                "a batch kept"
            );
            threads::on_thread_exit(core::ptr::null_mut());
            thread::with_cache(|tc| {
                assert!(!tc.mode.registered, "keeps nothing from now on");
                assert!(tc.tiny.head(bin).is_null(), "its cache went back");
            });
            // A later destructor's allocation: from the legacy path, which
            // has no owners, not from a slab nobody would give back.
            let late = thread::with_cache(|tc| tc.tiny.refill(tc.mode, bin));
            assert!(!late.is_null());
            assert!(
                !crate::segment::in_superslab(late as usize),
                "a block after the exit hook came from a slab the exited thread owns"
            );
            assert!(
                !thread::with_cache(|tc| tc.tiny.has_index()),
                "the exited thread took an owned index again"
            );
            // Freed as the front frees a legacy block: past the exit hook
            // the list's limit is 0, so it goes straight back.
            thread::with_cache(|tc| {
                let mode = tc.mode;
                if let crate::tiny::Push::OverLimit(bin) =
                    crate::tiny::free_legacy(&mut tc.tiny, mode, late, bin)
                {
                    tc.tiny.overflow(mode, bin);
                }
                assert!(tc.tiny.head(bin).is_null(), "the late block was kept");
            });
        })
        .join()
        .unwrap();
    }
    #[test]
    fn owner_ids_are_never_reused_even_by_a_thread_on_the_same_stack() {
        // glibc hands an exited thread's stack, and so its static TLS, to the
        // next thread: the cache address repeats, the id must not.
        let id_of_a_new_thread = || {
            std::thread::spawn(|| {
                ensure_registered();
                thread::with_cache(|tc| {
                    (
                        tc.tiny.owner_id(),
                        tc as *const thread::ThreadCache as usize,
                    )
                })
            })
            .join()
            .unwrap()
        };
        let (a, cache_a) = id_of_a_new_thread();
        let mut seen = vec![a];
        for _ in 0..8 {
            let (b, cache_b) = id_of_a_new_thread();
            assert!(
                !seen.contains(&b),
                "id {b:#x} reused (cache at {cache_b:#x}, first {cache_a:#x})"
            );
            assert!(b > pool::ABANDONED && b != pool::RECLAIMING);
            seen.push(b);
        }
    }
}
