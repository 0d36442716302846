//! errno, which hakmem changes only to report its own failures (ENOMEM,
//! EINVAL from the C API). Every syscall it makes for itself (mmap, munmap,
//! mremap, madvise, mincore, getrusage, futex, write, pthread_create) runs
//! through `keep`, so that `free`, `realloc` and the rest leave errno as it
//! was unless they fail, as glibc's do (a program may test errno after a
//! successful call that happened to reach a slow path, e.g. a contended lock
//! whose futex wait returned EAGAIN). A leaf: anything may call it.

/// This thread's errno.
#[inline]
pub fn get() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Sets this thread's errno.
#[inline]
pub fn set(e: i32) {
    // SAFETY: as in `get`.
    unsafe { *libc::__errno_location() = e };
}

/// Runs `f` (a syscall or libc call whose failure hakmem handles itself) and
/// leaves errno as it was. Returns `f`'s result and the errno it set (0 if
/// none), for callers that look at the reason.
#[inline]
pub fn keep<R>(f: impl FnOnce() -> R) -> (R, i32) {
    let saved = get();
    set(0);
    let r = f();
    let err = get();
    set(saved);
    (r, err)
}
