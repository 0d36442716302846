//! One-time initialisation and the Rust `GlobalAlloc` front.

use crate::{api, config, thread};
use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU8, Ordering};

static INIT: AtomicU8 = AtomicU8::new(0);
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// Initialises the allocator on the first slow path. Nothing in here calls
/// malloc before the state is DONE; what may allocate (pthread_atfork,
/// pthread_key_create) runs after, so a re-entrant malloc finds it ready.
#[inline]
pub fn ensure_init() {
    if INIT.load(Ordering::Acquire) != DONE {
        init_slow();
    }
}

#[cold]
fn init_slow() {
    if INIT
        .compare_exchange(0, RUNNING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        while INIT.load(Ordering::Acquire) != DONE {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
        return;
    }
    config::get();
    crate::hardening::init();
    crate::registry::protect();
    thread::create_key();
    INIT.store(DONE, Ordering::Release);
    thread::install_fork_handlers();
    let stop_for = config::get().stop_at_start_pid;
    // SAFETY: getpid has no preconditions.
    if stop_for != 0 && stop_for == unsafe { libc::getpid() } as u64 {
        // SAFETY: raise has no preconditions; no allocator lock is held here.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// hakmem as a Rust global allocator:
///
/// ```text
/// #[global_allocator]
/// static GLOBAL: hakmem::HakMem = hakmem::HakMem;
/// ```
pub struct HakMem;

// SAFETY: every method forwards to the C-level entry points, which return
// blocks of at least the requested size and alignment (or null) and accept
// exactly the pointers they returned.
unsafe impl GlobalAlloc for HakMem {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding; the alignment is a power of two by Layout's invariant.
        unsafe { api::alloc_aligned(layout.align(), layout.size()) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned.
        unsafe { api::free(ptr) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarding, as in `alloc`.
        unsafe { api::alloc_aligned_zeroed(layout.align(), layout.size()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is ours with `layout`; forwarding keeps its alignment.
        unsafe { api::realloc_aligned(ptr, layout.align(), new_size) }
    }
}
