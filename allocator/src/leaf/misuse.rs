//! Misuse the allocator can detect cheaply: pointers it never handed out,
//! and double frees it can see (the same block freed twice in a row, a large
//! block freed twice, a slab receiving more blocks than it handed out).
//! Reported in the style of glibc's messages; `HAKMEM_INVALID_FREE=ignore`
//! logs and goes on instead of aborting.

use crate::config;
use crate::stats::{write_fd, StackBuf};
use core::fmt::Write;

/// The report of a block freed while it is free.
pub const DOUBLE_FREE: &str = "free(): double free detected";

/// Reports a bad free of `ptr`; aborts unless the knob says ignore.
#[cold]
#[inline(never)]
pub fn invalid_free(what: &str, ptr: usize) {
    let mut msg = StackBuf::<160>::new();
    let abort = config::get().invalid_free_abort;
    let _ = writeln!(
        msg,
        "hakmem: {what}: {ptr:#x}{}",
        if abort { "" } else { " (ignored)" }
    );
    write_fd(2, msg.as_bytes());
    if abort {
        // SAFETY: abort has no preconditions; continuing would corrupt the heap.
        unsafe { libc::abort() };
    }
}

/// Checks an invariant (feature `invariants`: the scenario, soak and fuzz
/// runs): `$check` is a `Result<(), &'static str>`; an error aborts naming
/// the broken invariant and `$at`. Without the feature, nothing is
/// evaluated.
macro_rules! check_invariant {
    ($check:expr, $at:expr) => {
        #[cfg(feature = "invariants")]
        if let Err(what) = $check {
            $crate::misuse::fatal(what, $at as usize);
        }
    };
}
pub(crate) use check_invariant;

/// Reports heap corruption found while following hakmem's own structures
/// and aborts: going on would hand out memory the corruption chose.
#[cold]
#[inline(never)]
pub fn fatal(what: &str, ptr: usize) -> ! {
    let mut msg = StackBuf::<160>::new();
    let _ = writeln!(msg, "hakmem: {what}: {ptr:#x}");
    write_fd(2, msg.as_bytes());
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}
