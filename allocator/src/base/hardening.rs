//! What keeps a buggy or hostile program from steering the allocator.
//! Figures and the commands behind them: `docs/hardening.md`.
//!
//! Always on (0.992 of the speed before them on bench_random_mixed):
//! - A free of a pointer off the 16-byte grid is refused, and so is one
//!   inside a block, in a colour pad or a header whenever the free reads the
//!   block's metadata anyway: another thread's block, a legacy or an ACE
//!   block, `malloc_usable_size` and `realloc`.
//! - A block freed twice in a row (the head of its thread's list or ACE
//!   cache), and a slab that gets back more blocks than it handed out.
//!
//! `HAKMEM_CHECK_FREES=1` (runtime; off by default: 7-25% on
//! bench_random_mixed, whose frees touch blocks it has not used lately):
//! - A double-free key: every free block carries, in its second word, a
//!   per-process secret xor its address, written when it is freed and
//!   cleared when it is handed out. A free of a block that carries it is a
//!   double free, whichever list the block sits on (a thread cache, a slab's
//!   free or remote list, ACE's, legacy's): aborted. The address in the key
//!   means a stale key copied elsewhere (uninitialised bytes moved by the
//!   program) matches no other block; a false alarm needs 64 bits of the
//!   program's data to equal the secret xor the block's address. The cost:
//!   reading the freed block and a second store to its line, which a program
//!   that frees cold blocks pays as a miss per free.
//! - The block-start check on the owner's own fast path too (the index keeps
//!   each slab's first-block offset: a subtraction and a multiply).
//!
//! Feature `safe-linking` (build time, a default feature: 1.4% of
//! bench_random_mixed): the link a free block stores is xor-ed with its own
//! address >> 12 (glibc's scheme), so a use-after-free write of a plain
//! pointer decodes to garbage, and a link that does not decode to an aligned
//! address aborts ("corrupted free list") instead of being followed.
//!
//! Large blocks and parcels keep a live flag in their headers instead.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

static SECRET: AtomicUsize = AtomicUsize::new(0);
static CHECK_FREES: AtomicBool = AtomicBool::new(false);
/// 0: not drawn, 1: being drawn, 2: drawn.
static DRAWN: AtomicU8 = AtomicU8::new(0);

/// What a thread's caches may keep between calls, set by `lifecycle` and
/// handed to each tier with its part of the thread state.
#[derive(Clone, Copy)]
pub struct CacheMode {
    /// The thread is listed in hakctl's thread list (it has an owner id)
    /// and its exit hook is armed (its caches are emptied at exit), or is
    /// being armed (`lifecycle::ensure_registered`). Only then does it
    /// keep blocks cached or own slabs (`TinyCache::may_own_slabs`).
    pub registered: bool,
    /// `check_frees()`, copied at registration: the fast paths read it
    /// beside the thread's other state instead of through the GOT.
    pub check_frees: bool,
}

impl CacheMode {
    pub const NEW: CacheMode = CacheMode {
        registered: false,
        check_frees: false,
    };

    pub const fn is_zero(&self) -> bool {
        !self.registered && !self.check_frees
    }

    /// Whether this thread checks every free fully: its copy of the knob,
    /// or the knob itself while the thread is not registered (a consumer's
    /// first frees come before it has a copy; a thread beyond the thread
    /// list never gets one).
    #[inline(always)]
    pub fn checks_frees(self) -> bool {
        self.check_frees || (!self.registered && check_frees())
    }

    /// Whether the caches must hold no block between calls: no exit hook
    /// to empty them (none armed yet, or arming failed), or every free is
    /// checked (a block they held would be handed out again with its key,
    /// unchecked).
    #[inline]
    pub fn keeps_nothing(self) -> bool {
        !self.registered || self.check_frees
    }
}

/// Whether every free is checked fully (`HAKMEM_CHECK_FREES`).
#[inline(always)]
pub fn check_frees() -> bool {
    CHECK_FREES.load(Ordering::Relaxed)
}

/// Draws the per-process secret once (at initialisation, before any block
/// exists; or earlier, by a test hook that mangles with it).
pub fn init() {
    if DRAWN.load(Ordering::Acquire) == 2 {
        return;
    }
    if DRAWN
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        while DRAWN.load(Ordering::Acquire) != 2 {
            core::hint::spin_loop();
        }
        return;
    }
    draw();
    DRAWN.store(2, Ordering::Release);
}

/// getrandom; if the kernel will not say, bits of the addresses that ASLR
/// placed and of the clock.
fn draw() {
    let mut v: usize = 0;
    // SAFETY: getrandom writes at most 8 bytes into `v`, which has them.
    let (n, _) = crate::errno::keep(|| unsafe {
        libc::getrandom(
            (&mut v as *mut usize).cast(),
            core::mem::size_of::<usize>(),
            libc::GRND_NONBLOCK,
        )
    });
    if n != core::mem::size_of::<usize>() as isize {
        v = (&v as *const usize as usize).rotate_left(23)
            ^ (init as *const () as usize).rotate_left(41)
            ^ crate::clock::now_ns() as usize;
    }
    SECRET.store(v, Ordering::Relaxed);
    CHECK_FREES.store(crate::config::get().check_frees, Ordering::Relaxed);
}

/// `p` xor the secret (its own inverse): how a pointer that a free may
/// follow is stored where a write primitive could reach it (glibc's
/// PTR_MANGLE; `test_hooks`).
#[inline]
pub fn protect_pointer(p: usize) -> usize {
    SECRET.load(Ordering::Relaxed) ^ p
}

/// The key a free block at `b` carries.
#[inline(always)]
pub fn free_key(b: usize) -> usize {
    SECRET.load(Ordering::Relaxed) ^ b
}

/// Safe-linking (feature `safe-linking`): the stored form of a link held at
/// `at`; its own inverse. Without the feature, the link itself.
#[inline(always)]
pub fn mangle(at: usize, next: usize) -> usize {
    if cfg!(feature = "safe-linking") {
        next ^ (at >> 12)
    } else {
        let _ = at;
        next
    }
}
