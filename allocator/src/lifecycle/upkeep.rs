//! Giving freed memory back to the OS after its delays: `if_due`, which
//! allocator slow paths call, and the opt-in purge thread
//! (`HAKMEM_PURGE_THREAD=1`).
//!
//! What the chunk cache holds past its delays, the pages of EMPTY slabs
//! unused for the purge delay and those of kept ACE segments unused for
//! 10 s go back to the OS at the next allocator slow path, so a process
//! that makes no allocator call after a burst keeps them.
//! With the knob, one background thread sleeps until the next due time (at
//! most a second, at least 10 ms) and returns what is due, as jemalloc's
//! `background_thread` does.
//! It is off by default: a library that starts threads surprises programs
//! that count theirs or fork without exec.
//!
//! The thread starts at the first refill or large allocation
//! (`lifecycle::before_refill`), where no lock and no thread-cache
//! reference is held: `pthread_create` allocates
//! (glibc's TLS vector), and that allocation may come back here. A forked
//! child has no such thread; it starts its own the same way.

use core::sync::atomic::{AtomicBool, Ordering};

static STARTED: AtomicBool = AtomicBool::new(false);

const MIN_SLEEP_NS: u64 = 10_000_000;
const MAX_SLEEP_NS: u64 = 1_000_000_000;

/// Returns to the OS what is due: the chunk cache's mappings, EMPTY
/// slabs' pages and kept ACE segments' pages. Cheap when nothing is (three
/// loads, and a vDSO clock read when anything waits).
pub fn if_due() {
    crate::chunks::decay_if_due();
    crate::pool::purge_if_due();
    crate::ace::purge_if_due();
}

/// When anything is next due to go back, if anything waits.
fn next_due_ns() -> Option<u64> {
    [
        crate::chunks::next_due_ns(),
        crate::pool::next_due_ns(),
        crate::ace::next_due_ns(),
    ]
    .into_iter()
    .flatten()
    .min()
}

/// At a slow path that holds no lock and no thread-cache reference
/// (`lifecycle::before_refill`): returns what is due, and starts the purge
/// thread if it is wanted.
pub fn at_slow_path() {
    if_due();
    start_if_wanted();
}

/// Starts the purge thread if the knob asks for it and it is not running.
/// Call only where no lock and no thread-cache reference is held.
fn start_if_wanted() {
    if !crate::config::get().purge_thread || STARTED.load(Ordering::Relaxed) {
        return;
    }
    if STARTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let mut t: libc::pthread_t = 0;
    // SAFETY: `run` has the start routine's signature and takes no argument.
    let (rc, _) = crate::errno::keep(|| unsafe {
        libc::pthread_create(&mut t, core::ptr::null(), run, core::ptr::null_mut())
    });
    if rc == 0 {
        // SAFETY: `t` is the thread just created; detached, it is never
        // joined. (Naming it writes /proc, which may be missing: errno kept.)
        crate::errno::keep(|| unsafe {
            libc::pthread_setname_np(t, c"hakmem-purge".as_ptr());
            libc::pthread_detach(t);
        });
    }
    // On failure the process goes on without it (returns at slow paths).
}

/// After a fork, in the child: the thread did not come along.
pub fn forget_after_fork() {
    STARTED.store(false, Ordering::Relaxed);
}

extern "C" fn run(_: *mut libc::c_void) -> *mut libc::c_void {
    loop {
        let now = crate::os::now_ns();
        let wait = next_due_ns()
            .map_or(MAX_SLEEP_NS, |due| due.saturating_sub(now))
            .clamp(MIN_SLEEP_NS, MAX_SLEEP_NS);
        let ts = libc::timespec {
            tv_sec: (wait / 1_000_000_000) as libc::time_t,
            tv_nsec: (wait % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec; the remainder is not wanted.
        unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
        if_due();
    }
}
