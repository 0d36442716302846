//! What keeps a buggy or hostile program from steering the allocator, on by
//! default (its cost is in `docs/hardening.md`):
//!
//! - Safe-linking: the link a free block stores is xor-ed with its own
//!   address >> 12 (glibc's scheme), so a use-after-free write of a plain
//!   pointer decodes to garbage, and a link that does not decode to an
//!   aligned address aborts ("corrupted free list") instead of being
//!   followed.
//! - A double-free key: every free block carries, in its second word, a
//!   per-process secret xor its address, written when it is freed and cleared
//!   when it is handed out. A free of a block that carries it is a double
//!   free, whichever list the block sits on (a thread cache, a slab's free or
//!   remote list, ACE's, legacy's): aborted. The address in the key means a
//!   stale key copied elsewhere (uninitialised bytes moved by the program)
//!   matches no other block; a false alarm needs 64 bits of the program's
//!   data to equal the secret xor the block's address.
//! - Block starts: a free of a pointer inside a block, in a pad or in a
//!   header, is refused (see `api::free` and each tier's check).
//!
//! Large blocks and parcels keep a live flag in their headers instead.

use core::sync::atomic::{AtomicUsize, Ordering};

static SECRET: AtomicUsize = AtomicUsize::new(0);

/// Draws the per-process secret: at initialisation, before any block exists.
/// getrandom; if the kernel will not say, bits of the addresses that ASLR
/// placed and of the clock.
pub fn init() {
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
            ^ crate::os::now_ns() as usize;
    }
    SECRET.store(v, Ordering::Relaxed);
}

/// The key a free block at `b` carries.
#[inline(always)]
pub fn free_key(b: usize) -> usize {
    SECRET.load(Ordering::Relaxed) ^ b
}

/// Safe-linking: the stored form of a link held at `at`.
#[inline(always)]
pub fn mangle(at: usize, next: usize) -> usize {
    next ^ (at >> 12)
}
