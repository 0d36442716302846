//! Points where a test can pause a thread to force an interleaving: a race
//! is fixed by reasoning, and proven by making the bad order happen every
//! time rather than hoping two cores hit it (`hakmem-scenario`'s `race-*`
//! scenarios, run by `tests/scenarios.rs`).
//!
//! Only cold paths carry a point, so the release library keeps them: one
//! load of a null pointer on paths that take a lock or map memory anyway. A test
//! installs its hook with `set`; the hook runs on the thread that reached the
//! point, and must not allocate through hakmem while it holds nothing (it may
//! block on a condition another thread fulfils).
//!
//! The hook is stored xor the per-process secret (`hardening`), as glibc
//! mangles its function pointers: a function pointer that any free may call
//! is what an attacker with a write primitive looks for (glibc dropped
//! `__free_hook` for that), and one that must be written mangled with a
//! secret it does not know is of no use to it.

use core::sync::atomic::{AtomicUsize, Ordering};

/// The windows a test can hold open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Point {
    /// A free holds a block of a slab whose owner exited (`pool::free_unowned`),
    /// before it has decided where the block goes; the argument is the slab.
    UnownedFree = 1,
    /// A reclaimer is done with an orphaned slab that still has blocks out,
    /// before it parks it again (`pool::free_unowned`); the argument is the slab.
    BeforeRepark = 2,
    /// Stage 3 of `pool::acquire`, after the pool lock is let go and before
    /// the SuperSlab is mapped; the argument is 0.
    MapSuperSlab = 3,
    /// A region of chunks is about to be mapped (`os::map_region`), its
    /// protection decided (the argument: `PROT_*`) and nothing mapped yet.
    MapRegion = 4,
    /// A free takes another thread's slab (`TinyCache::take`): it holds the
    /// owner's gate, has found the slab still the owner's and not yet
    /// unlinked it from the owner's ring; the argument is the slab.
    TakeSlab = 5,
    /// A free's try to take a slab was refused by the hold of the gate it
    /// found for the slab's owner (`owned_index::try_gate_of`; the id is
    /// checked after), and has not yet let go of the gate's taker word;
    /// the argument is the owner's id.
    TakeRefused = 6,
    /// The fork's prepare handler holds the forking thread's gate (if it
    /// has one), and no lock yet (`lifecycle::fork`); the argument is 0.
    ForkHoldsGate = 7,
}

/// Stops the allocator's clock (`os::now_ns`) at the present. A test that
/// freezes it makes the delays after which memory goes back (the purge
/// delay, the chunk cache's idle second) pass exactly when it says
/// (`advance_clock`), instead of racing them with sleeps on busy cores.
/// For tests only.
#[doc(hidden)]
pub fn freeze_clock() {
    crate::clock::freeze();
}

/// Moves a frozen clock on by `ms` milliseconds. For tests only.
#[doc(hidden)]
pub fn advance_clock(ms: u64) {
    crate::clock::advance(ms);
}

/// A hook: the point reached and its argument.
pub type Hook = fn(Point, usize);

/// The hook xor the secret; 0: none.
static HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs `hook` (None removes it). For tests only.
#[doc(hidden)]
pub fn set(hook: Option<Hook>) {
    // The secret is drawn once: draw it before mangling with it.
    crate::hardening::init();
    let p = hook.map_or(0, |h| {
        crate::hardening::protect_pointer(h as *const () as usize)
    });
    HOOK.store(p, Ordering::Release);
}

/// Runs the installed hook, if any, at `point`.
#[inline]
pub fn at(point: Point, arg: usize) {
    let p = HOOK.load(Ordering::Acquire);
    if p != 0 {
        let f = crate::hardening::protect_pointer(p) as *const ();
        // SAFETY: only `set` stores here: a `Hook` xor the secret, which
        // does not change after initialisation; fn pointers and data
        // pointers have one size on this target.
        let hook: Hook = unsafe { core::mem::transmute::<*const (), Hook>(f) };
        hook(point, arg);
    }
}
