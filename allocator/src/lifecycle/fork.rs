//! fork safety: every lock of the allocator is taken before fork, in one
//! order, and released after it, in the parent and in the child (whose only
//! thread would otherwise deadlock on a lock another thread held at fork).
//!
//! The order, outermost first: a lock is taken only after every lock that
//! code holding it may take. Reading down:
//! 1. the shared pool (it maps SuperSlabs with its lock let go, and hands
//!    retired ones to the chunk cache after it; kept first, outermost);
//! 2. legacy (maps its segments: os locks), ACE's classes and parcels (each
//!    takes chunks and os locks);
//! 3. the chunk cache (maps and unmaps: os locks);
//! 4. the owned-slab indexes (`owned_index::take` maps under its lock);
//! 5. os (the mapping counters and the registry's page table).

use crate::tiny::owned_index;
use crate::{ace, chunks, legacy, os, parcel, pool};

/// Installs the handlers (may allocate: after the allocator is ready).
pub fn install_handlers() {
    // SAFETY: extern "C" callbacks that take hakmem's locks in one order.
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(after_fork_child),
        );
    }
}

extern "C" fn before_fork() {
    // The forking thread's own gate, so that no other thread is halfway
    // through taking one of its slabs when the child is made, which would
    // leave the gate held for good in the child (whose first refill would
    // sleep on it forever) and its ring half unlinked (`race-take-slab`,
    // RACE_OWNER=fork). First: a taker takes no lock while it holds the
    // gate today, but one that did would then not deadlock with this
    // handler.
    crate::thread::with_cache(|tc| tc.tiny.hold_gate_for_fork());
    crate::test_hooks::at(crate::test_hooks::Point::ForkHoldsGate, 0);
    pool::lock_for_fork();
    legacy::lock_for_fork();
    ace::lock_for_fork();
    parcel::lock_for_fork();
    chunks::lock_for_fork();
    owned_index::lock_for_fork();
    os::lock_for_fork();
}

fn unlock_all(child: bool) {
    crate::thread::with_cache(|tc| tc.tiny.release_gate_after_fork(child));
    os::unlock_after_fork();
    owned_index::unlock_after_fork(child);
    chunks::unlock_after_fork();
    parcel::unlock_after_fork();
    ace::unlock_after_fork();
    legacy::unlock_after_fork();
    pool::unlock_after_fork();
}

extern "C" fn after_fork_parent() {
    unlock_all(false);
}

extern "C" fn after_fork_child() {
    // The purge thread did not come along, nor did the other threads.
    super::upkeep::forget_after_fork();
    crate::thread::forget_others_after_fork();
    unlock_all(true);
    pool::forget_mapper_after_fork();
}
