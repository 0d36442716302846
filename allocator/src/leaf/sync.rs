//! The lock of the slow paths (pool, legacy, ACE refills, chunk cache).
//! Unlike a pthread mutex it is const-initialised, never allocates, and can be
//! reset in a fork child. It spins briefly, then sleeps on a futex (a
//! three-state mutex: 0 free, 1 held, 2 held with sleepers). Sleeping instead
//! of `sched_yield` matters with more threads than cores: a yielding waiter
//! keeps being rescheduled while the preempted holder waits for a CPU (the
//! `stress` workload made 21k sched_yield calls before this).

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU32, Ordering};

const FREE: u32 = 0;
const HELD: u32 = 1;
const CONTENDED: u32 = 2;
/// Spins before sleeping: about the length of the short critical sections here.
const SPINS: u32 = 100;

pub struct SpinLock<T> {
    state: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked`.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: the lock owns its value.
unsafe impl<T: Send> Send for SpinLock<T> {}

pub struct Guard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    pub const fn new(value: T) -> Self {
        SpinLock {
            state: AtomicU32::new(FREE),
            value: UnsafeCell::new(value),
        }
    }

    #[inline]
    pub fn lock(&self) -> Guard<'_, T> {
        if self
            .state
            .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        Guard { lock: self }
    }

    /// The lock if it is free; None, at once, if it is held. (A guard made
    /// only on success: one built and dropped on failure would unlock the
    /// holder's lock.)
    #[inline]
    pub fn try_lock(&self) -> Option<Guard<'_, T>> {
        self.state
            .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(|| Guard { lock: self })
    }

    #[cold]
    fn lock_contended(&self) {
        for _ in 0..SPINS {
            core::hint::spin_loop();
            if self.state.load(Ordering::Relaxed) == FREE
                && self
                    .state
                    .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
        }
        // Announce a sleeper; whoever unlocks a CONTENDED lock wakes one.
        while self.state.swap(CONTENDED, Ordering::Acquire) != FREE {
            futex(
                &self.state,
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                CONTENDED,
            );
        }
    }

    fn unlock(&self) {
        if self.state.swap(FREE, Ordering::Release) == CONTENDED {
            futex(&self.state, libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
        }
    }

    /// Takes the lock and leaves it held (fork prepare handler).
    pub fn acquire_for_fork(&self) {
        core::mem::forget(self.lock());
    }

    /// Releases a lock taken by `acquire_for_fork` (fork parent and child; in
    /// the child the parent's sleepers do not exist, and waking none is harmless).
    pub fn release_after_fork(&self) {
        self.unlock();
    }
}

/// A count that threads can sleep on until it moves: a waiter reads it
/// where the event it waits for cannot yet have happened (under a lock the
/// other side takes before `advance`), then `wait_past`s that value. A
/// futex, as the lock's sleep, not `sched_yield` (see above).
pub struct Generation(AtomicU32);

impl Generation {
    pub const fn new() -> Self {
        Generation(AtomicU32::new(0))
    }

    pub fn current(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }

    /// Sleeps until the count is no longer `seen` (at once if it moved).
    pub fn wait_past(&self, seen: u32) {
        while self.0.load(Ordering::Acquire) == seen {
            futex(&self.0, libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, seen);
        }
    }

    /// Moves the count on and wakes every sleeper.
    pub fn advance(&self) {
        self.0.fetch_add(1, Ordering::Release);
        futex(
            &self.0,
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX as u32,
        );
    }
}

fn futex(word: &AtomicU32, op: i32, val: u32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAIT returns at once if the
    // word no longer holds `val`, FUTEX_WAKE touches no memory. Errors (EAGAIN,
    // EINTR) only mean "look again", which every caller does.
    crate::errno::keep(|| unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            val,
            core::ptr::null::<libc::timespec>(),
        )
    });
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves the lock is held by us.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves the lock is held by us, exclusively.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_lock_that_fails_leaves_the_lock_held() {
        // The first version built its guard before knowing whether the CAS
        // succeeded, and dropping it on failure unlocked the holder's lock:
        // two threads then worked on one thread's slabs at once (larson
        // crashed within a few runs).
        let lock = SpinLock::new(0u32);
        let held = lock.lock();
        assert!(lock.try_lock().is_none());
        assert!(lock.try_lock().is_none(), "still held after a failed try");
        drop(held);
        let again = lock.try_lock();
        assert!(again.is_some());
        assert!(lock.try_lock().is_none());
    }

    #[test]
    fn a_futex_wait_that_fails_leaves_errno_as_it_was() {
        // A waiter whose word changed before it slept gets EAGAIN from the
        // kernel (the common case under contention): a free that waited on a
        // lock must not hand that to the program. Forced here: the word is
        // not the value the wait expects, so the kernel refuses at once.
        let word = AtomicU32::new(FREE);
        crate::errno::set(4321);
        futex(
            &word,
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            CONTENDED,
        );
        assert_eq!(crate::errno::get(), 4321);
    }
}
