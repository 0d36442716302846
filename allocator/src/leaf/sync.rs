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

    /// The value, for the holder of `acquire_for_fork`'s hold (its guard
    /// forgotten) to use before `release_after_fork`.
    pub fn data_ptr_for_fork(&self) -> *mut T {
        self.value.get()
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

/// A lock between one owner, which takes it at every one of its slow paths
/// and must pay as little as it can for it, and takers from other threads,
/// which come rarely and may wait for nothing (they try once, and give up).
/// Dekker's lock: the owner swaps its busy word to 1 and reads the taker
/// word; a taker swaps the taker word to held and reads the busy word; both
/// sequentially consistent, so at least one sees the other. The owner pays
/// one `xchg` to enter and a plain store to leave. (A spin lock, a CAS to
/// enter and a swap to leave, cost hakbench's phases about 5%; making every
/// thread pass a barrier from the taker's side instead, with `membarrier`,
/// left the owner plain stores but made hakbench's prodcons 3x slower: an
/// interprocessor interrupt per try, on this machine's VM.)
pub struct OwnerLock<T> {
    /// 1 while the owner holds it (or is about to look at the taker word).
    busy: AtomicU32,
    /// FREE, HELD by a taker, or CONTENDED (held, the owner asleep on it).
    taker: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by the lock (see the type's doc).
unsafe impl<T: Send> Sync for OwnerLock<T> {}

/// The owner's hold of an `OwnerLock`, or a taker's: shared access only (the
/// value's fields are atomics, which the owner also writes without the
/// guard: `owned_index::OwnedIndex::gate_copy`).
pub struct OwnerGuard<'a, T> {
    lock: &'a OwnerLock<T>,
    taker: bool,
}

impl<T> OwnerLock<T> {
    /// (Indexes are carved from zeroed mappings, which read as a new lock.)
    #[cfg(test)]
    pub const fn new(value: T) -> Self {
        OwnerLock {
            busy: AtomicU32::new(0),
            taker: AtomicU32::new(FREE),
            value: UnsafeCell::new(value),
        }
    }

    /// The owner's hold: waits (asleep) while a taker holds the lock. Only
    /// ever one thread, the owner, calls this (and never while it holds it).
    #[inline]
    pub fn enter(&self) -> OwnerGuard<'_, T> {
        loop {
            self.busy.swap(1, Ordering::SeqCst);
            if self.taker.load(Ordering::SeqCst) == FREE {
                return OwnerGuard {
                    lock: self,
                    taker: false,
                };
            }
            self.busy.store(0, Ordering::Release);
            self.wait_for_taker();
        }
    }

    #[cold]
    fn wait_for_taker(&self) {
        loop {
            let t = self.taker.load(Ordering::Acquire);
            if t == FREE {
                return;
            }
            if t == CONTENDED
                || self
                    .taker
                    .compare_exchange(HELD, CONTENDED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                futex(
                    &self.taker,
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    CONTENDED,
                );
            }
        }
    }

    /// Whether the owner holds the lock (or is about to look at the taker
    /// word): for the owner's own invariant checks only, as only its own
    /// writes make it true.
    #[cfg(feature = "invariants")]
    pub fn owner_holds(&self) -> bool {
        self.busy.load(Ordering::Relaxed) != 0
    }

    /// Ends an owner's hold whose guard was forgotten (held across a fork).
    pub fn release_owner(&self) {
        self.busy.store(0, Ordering::Release);
    }

    /// In a fork child, whose only thread is the owner: the lock as new,
    /// whatever the parent's other threads had left in it. The forking
    /// owner held it (its guard forgotten), so no taker held it; but a
    /// taker that the hold refused (`try_take`) may have been between
    /// setting the taker word and letting it go. The child's copy of the
    /// word would stay set, with no thread to let it go, and the owner's
    /// next `enter` would sleep for good.
    pub fn reset_after_fork_child(&self) {
        self.busy.store(0, Ordering::Relaxed);
        self.taker.store(FREE, Ordering::Relaxed);
    }

    /// The value, for its owner's writes while it holds the lock through a
    /// guard it does not borrow (see `owned_index::OwnedIndex::gate_copy`).
    pub fn data_ptr(&self) -> *mut T {
        self.value.get()
    }

    /// A taker's hold, if the lock is free and its owner holds it not;
    /// None at once otherwise. A taker that the owner's hold refuses has
    /// set the taker word first, and lets it go after `refused` has run
    /// (a test hook holds that window open: a fork inside it is what
    /// `reset_after_fork_child` is for).
    pub fn try_take(&self, refused: impl FnOnce()) -> Option<OwnerGuard<'_, T>> {
        if self
            .taker
            .compare_exchange(FREE, HELD, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        let guard = OwnerGuard {
            lock: self,
            taker: true,
        };
        if self.busy.load(Ordering::SeqCst) != 0 {
            refused();
            return None;
        }
        Some(guard)
    }
}

impl<T> Deref for OwnerGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves the lock is held by us.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> Drop for OwnerGuard<'_, T> {
    fn drop(&mut self) {
        if !self.taker {
            self.lock.busy.store(0, Ordering::Release);
        } else if self.lock.taker.swap(FREE, Ordering::Release) == CONTENDED {
            futex(
                &self.lock.taker,
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
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
    fn an_owner_lock_is_held_by_the_owner_or_one_taker_at_a_time() {
        let lock: &'static OwnerLock<AtomicU32> =
            Box::leak(Box::new(OwnerLock::new(AtomicU32::new(0))));
        let owner = lock.enter();
        assert!(
            lock.try_take(|| {}).is_none(),
            "taken while the owner holds it"
        );
        drop(owner);
        let taker = lock.try_take(|| {}).expect("free");
        taker.store(7, Ordering::Relaxed);
        assert!(lock.try_take(|| {}).is_none(), "a second taker");
        // The owner waits for the taker (asleep on the futex), then sees
        // what the taker wrote. (The first version of the gate, a spin lock,
        // had a `try_lock` that unlocked the holder's lock when it failed.)
        let waited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = waited.clone();
        let t = std::thread::spawn(move || {
            let g = lock.enter();
            w.store(true, Ordering::SeqCst);
            g.load(Ordering::Relaxed)
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !waited.load(Ordering::SeqCst),
            "the owner went in under a taker"
        );
        drop(taker);
        assert_eq!(t.join().unwrap(), 7);
        assert!(lock.try_take(|| {}).is_some());
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
