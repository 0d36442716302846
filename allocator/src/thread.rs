//! Thread lifecycle: the exit hook (a pthread key destructor, which runs at
//! thread exit without allocating, unlike a `thread_local!` destructor) and
//! fork safety (every lock is taken before fork and released after).

use core::sync::atomic::{AtomicUsize, Ordering};

/// pthread key + 1 (0: not created).
static KEY: AtomicUsize = AtomicUsize::new(0);
/// Bumped in every fork child, so threads created there never reuse an owner
/// id of a parent thread that did not survive the fork.
static FORK_GENERATION: AtomicUsize = AtomicUsize::new(0);

pub fn init() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: plain libc calls with valid out-pointers and extern "C" callbacks.
    unsafe {
        if libc::pthread_key_create(&mut key, Some(on_thread_exit)) == 0 {
            KEY.store(key as usize + 1, Ordering::Release);
        }
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(after_fork_child),
        );
    }
}

/// Arms the exit hook for the calling thread. May allocate (glibc), so the
/// caller holds no reference into its thread cache.
pub fn register_current() {
    let k = KEY.load(Ordering::Acquire);
    if k != 0 {
        // SAFETY: the key was created by `init`; any non-null value arms the destructor.
        unsafe {
            libc::pthread_setspecific(
                (k - 1) as libc::pthread_key_t,
                core::ptr::dangling::<libc::c_void>(),
            )
        };
    }
}

/// Owner id for a thread whose cache lives at `cache_addr`: unique among live
/// threads, and never equal to an id from before a fork (user addresses are below 2^47).
pub fn new_owner_id(cache_addr: usize) -> usize {
    cache_addr ^ (FORK_GENERATION.load(Ordering::Relaxed) << 48)
}

extern "C" fn on_thread_exit(_: *mut libc::c_void) {
    crate::tiny::thread_exit();
}

extern "C" fn before_fork() {
    crate::pool::lock_for_fork();
    crate::legacy::lock_for_fork();
    crate::ace::lock_for_fork();
    crate::parcel::lock_for_fork();
    crate::large::lock_for_fork();
    crate::os::lock_for_fork();
    crate::owned_index::lock_for_fork();
}

fn unlock_all() {
    crate::owned_index::unlock_after_fork();
    crate::os::unlock_after_fork();
    crate::large::unlock_after_fork();
    crate::parcel::unlock_after_fork();
    crate::ace::unlock_after_fork();
    crate::legacy::unlock_after_fork();
    crate::pool::unlock_after_fork();
}

extern "C" fn after_fork_parent() {
    unlock_all();
}

extern "C" fn after_fork_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    crate::purge::forget_after_fork();
    unlock_all();
}
