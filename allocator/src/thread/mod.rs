//! The per-thread state: one struct of each tier's part, in the thread's
//! cache block (`tls`). Each tier works on its own part, handed to it by the
//! front (`api`) or the lifecycle (`lifecycle`); no tier reaches for the
//! block itself, so each can be built and tested on a part it owns alone.

pub mod state;
pub mod tls;

pub use state::ThreadCache;

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Runs `f` on this thread's cache.
#[inline(always)]
pub fn with_cache<R>(f: impl FnOnce(&mut ThreadCache) -> R) -> R {
    // SAFETY: the cache is thread-local and no function that holds this
    // reference calls back into malloc (what may re-enter, registration and
    // upkeep, runs before it is taken: `lifecycle`), so it is the only
    // live reference.
    f(unsafe { &mut *tls::cache_ptr() })
}

/// This thread's cache, for the fast paths (a closure that LLVM left out of
/// line cost a call and five register saves on every free).
///
/// # Safety
/// The caller holds no other reference to the cache while this one lives,
/// and calls nothing that may re-enter malloc with it.
#[inline(always)]
pub unsafe fn cache() -> &'static mut ThreadCache {
    // SAFETY: the block is this thread's for its whole life; exclusive per
    // the contract.
    unsafe { &mut *tls::cache_ptr() }
}

/// Slots of the thread list hakctl reads to count what thread caches hold
/// (`front::levels`): each a registered thread's cache, or null. Fixed, so
/// that a reader outside the process follows no link that may be changing.
pub const THREAD_SLOTS: usize = 16384;

#[allow(clippy::declare_interior_mutable_const)]
const FREE_SLOT: AtomicPtr<ThreadCache> = AtomicPtr::new(core::ptr::null_mut());
pub static THREADS: [AtomicPtr<ThreadCache>; THREAD_SLOTS] = [FREE_SLOT; THREAD_SLOTS];
/// Where the next search for a free slot starts.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
/// Slots free: a thread that finds none learns it at once (a thread beyond
/// the list keeps nothing cached, and asks again at each slow path).
static FREE_SLOTS: AtomicUsize = AtomicUsize::new(THREAD_SLOTS);

/// Puts this thread's cache in the list; false if every slot is taken (the
/// caller then keeps nothing cached: hakctl would not see it).
pub fn list_current() -> bool {
    let tc = tls::cache_ptr();
    // SAFETY: this thread's cache; `slot` is only ever touched by its thread.
    if unsafe { (*tc).slot } != 0 {
        return true;
    }
    // One of the free ones is ours from here: the scan below finds it.
    let counted = FREE_SLOTS
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    if !counted {
        return false;
    }
    let start = NEXT_SLOT.load(Ordering::Relaxed);
    loop {
        for i in (0..THREAD_SLOTS).map(|k| (start + k) % THREAD_SLOTS) {
            // A load before the CAS: in a full list most slots are taken.
            let claimed = THREADS[i].load(Ordering::Relaxed).is_null()
                && THREADS[i]
                    .compare_exchange(
                        core::ptr::null_mut(),
                        tc,
                        Ordering::Release,
                        Ordering::Relaxed,
                    )
                    .is_ok();
            if claimed {
                NEXT_SLOT.store(i + 1, Ordering::Relaxed);
                // SAFETY: as above.
                unsafe { (*tc).slot = i as u32 + 1 };
                return true;
            }
        }
        // Counted free, yet taken in passing by threads that counted
        // after us: one is free again by the time they are all placed.
    }
}

/// Takes this thread's cache out of the list (at its exit, after its parts
/// gave back what they held).
pub fn unlist_current() {
    let tc = tls::cache_ptr();
    // SAFETY: this thread's cache, as in `list_current`.
    let slot = unsafe { (*tc).slot };
    if slot != 0 {
        THREADS[slot as usize - 1].store(core::ptr::null_mut(), Ordering::Release);
        FREE_SLOTS.fetch_add(1, Ordering::AcqRel);
        // SAFETY: as above.
        unsafe { (*tc).slot = 0 };
    }
}

/// After a fork, in the child: only the forking thread came along.
pub fn forget_others_after_fork() {
    let own = tls::cache_ptr();
    let mut free = 0;
    for s in THREADS.iter() {
        if s.load(Ordering::Relaxed) != own {
            s.store(core::ptr::null_mut(), Ordering::Relaxed);
            free += 1;
        }
    }
    FREE_SLOTS.store(free, Ordering::Relaxed);
}
