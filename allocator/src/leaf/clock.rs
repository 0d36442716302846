//! The allocator's clock: monotonic, coarse (a few ms) and cheap (vDSO, no
//! system call), and a test's hold on it (`test_hooks::freeze_clock`).
//! A leaf: `os` and `test_hooks` both use it, and `os` reaches `test_hooks`.

use core::sync::atomic::{AtomicU64, Ordering};

/// The clock while a test holds it; 0: the real one.
static FROZEN_NS: AtomicU64 = AtomicU64::new(0);

/// Stops `now_ns` at the present.
pub fn freeze() {
    FROZEN_NS.store(real_now_ns().max(1), Ordering::Relaxed);
}

/// Moves a frozen clock on by `ms` milliseconds.
pub fn advance(ms: u64) {
    FROZEN_NS.fetch_add(ms * 1_000_000, Ordering::Relaxed);
}

/// A monotonic clock in nanoseconds, coarse (a few ms) and cheap (vDSO, no syscall).
pub fn now_ns() -> u64 {
    match FROZEN_NS.load(Ordering::Relaxed) {
        0 => real_now_ns(),
        frozen => frozen,
    }
}

/// The monotonic clock itself (`now_ns` unless a test froze it).
fn real_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
