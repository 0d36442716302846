//! The per-thread state: one struct of each tier's part, in the thread's
//! cache block (`tls`). Each tier works on its own part, handed to it by the
//! front (`api`) or the lifecycle (`lifecycle`); no tier reaches for the
//! block itself, so each can be built and tested on a part it owns alone.

pub mod state;
pub mod tls;

pub use state::ThreadCache;

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
