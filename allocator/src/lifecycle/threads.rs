//! Threads: their owner ids and the exit hook (a pthread key destructor,
//! which runs at thread exit without allocating, unlike a `thread_local!`
//! destructor).

use core::sync::atomic::{AtomicUsize, Ordering};

/// pthread key + 1 (0: not created).
static KEY: AtomicUsize = AtomicUsize::new(0);
/// The next owner id. Ids are never reused: a thread whose exit hook did not
/// run (see `register_current`) keeps its slabs under its own id, never
/// under that of the next thread on its (reused) stack. 0 is "no id",
/// `pool::ABANDONED` is 1, `pool::RECLAIMING` is `usize::MAX`: the counter
/// starts past the first two and does not wrap in a process's life.
static NEXT_ID: AtomicUsize = AtomicUsize::new(2);

/// Creates the exit hook's key. Before the allocator says it is ready, so
/// that no thread can register while the key does not exist yet (glibc's
/// `pthread_key_create` takes a slot of a static table: no allocation).
pub fn create_key() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a valid out-pointer and an extern "C" destructor.
    if unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) } == 0 {
        KEY.store(key as usize + 1, Ordering::Release);
    }
}

/// Arms the exit hook for the calling thread; false if it could not be
/// armed (no key, or `pthread_setspecific` failed), so that the caller keeps
/// nothing in its caches and tries again at its next slow path. May allocate
/// (glibc), so the caller holds no reference into its thread cache.
pub fn register_current() -> bool {
    let k = KEY.load(Ordering::Acquire);
    // SAFETY: the key was created by `create_key`; any non-null value arms
    // the destructor. (glibc may allocate here, through hakmem: a failure of
    // that allocation must not show in the caller's errno either.)
    k != 0
        && crate::errno::keep(|| unsafe {
            libc::pthread_setspecific(
                (k - 1) as libc::pthread_key_t,
                core::ptr::dangling::<libc::c_void>(),
            )
        })
        .0 == 0
}

/// A new owner id, unique for the life of the process (and across forks:
/// the child goes on counting from where its parent was).
pub fn new_owner_id() -> usize {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The exit hook (the key's destructor): every part of the thread's state
/// gives back what it holds, and the thread keeps nothing from now on (a
/// later destructor's frees, `CacheMode::keeps_nothing`).
pub(super) extern "C" fn on_thread_exit(_: *mut libc::c_void) {
    crate::thread::with_cache(|tc| {
        tc.tiny.release_all();
        tc.ace.release_thread();
        tc.mode.registered = false;
        tc.exited = true;
    });
    crate::thread::unlist_current();
}
