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
pub const THREAD_SLOTS: usize = 4096;

#[allow(clippy::declare_interior_mutable_const)]
const FREE_SLOT: AtomicPtr<ThreadCache> = AtomicPtr::new(core::ptr::null_mut());
pub static THREADS: [AtomicPtr<ThreadCache>; THREAD_SLOTS] = [FREE_SLOT; THREAD_SLOTS];
/// Where the next search for a free slot starts.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// Puts this thread's cache in the list; false if every slot is taken (the
/// caller then keeps nothing cached: hakctl would not see it).
pub fn list_current() -> bool {
    let tc = tls::cache_ptr();
    // SAFETY: this thread's cache; `slot` is only ever touched by its thread.
    if unsafe { (*tc).slot } != 0 {
        return true;
    }
    let start = NEXT_SLOT.load(Ordering::Relaxed);
    for i in (0..THREAD_SLOTS).map(|k| (start + k) % THREAD_SLOTS) {
        let claimed = THREADS[i]
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
    false
}

/// Takes this thread's cache out of the list (at its exit, after its parts
/// gave back what they held).
pub fn unlist_current() {
    let tc = tls::cache_ptr();
    // SAFETY: this thread's cache, as in `list_current`.
    let slot = unsafe { (*tc).slot };
    if slot != 0 {
        THREADS[slot as usize - 1].store(core::ptr::null_mut(), Ordering::Release);
        // SAFETY: as above.
        unsafe { (*tc).slot = 0 };
    }
}

/// After a fork, in the child: only the forking thread came along.
pub fn forget_others_after_fork() {
    let own = tls::cache_ptr();
    for s in THREADS.iter() {
        if s.load(Ordering::Relaxed) != own {
            s.store(core::ptr::null_mut(), Ordering::Relaxed);
        }
    }
}
