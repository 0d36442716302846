//! The allocator's own tally (`HAKMEM_STATS=1`): exactly the events the probes
//! fire, counted through the same `hakmem_common::tally::record` that hakctl's
//! eBPF programs use, and printed at exit as one JSON line on stderr.

use crate::config;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};
use hakmem_common::{tally, ProbeId, Tally, TALLY_SLOTS};

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static TALLY: [AtomicU64; TALLY_SLOTS] = [ZERO; TALLY_SLOTS];

/// Counts one probe event: `a0` and `a1` its first two arguments, `a2` its
/// third where `tally::record` reads one (`cache_take`'s user), else 0.
#[inline]
pub(crate) fn record(probe: ProbeId, a0: u64, a1: u64, a2: u64) {
    if config::stats_enabled() {
        tally::record(probe as u32, a0, a1, a2, |slot, n| {
            TALLY[slot].fetch_add(n, Ordering::Relaxed);
        });
    }
}

/// The tally so far (all zero unless `HAKMEM_STATS=1`).
pub fn snapshot() -> Tally {
    let mut t = Tally::default();
    for (o, c) in t.slots.iter_mut().zip(TALLY.iter()) {
        *o = c.load(Ordering::Relaxed);
    }
    t
}

/// A fixed-size text buffer on the stack: formatting without allocating.
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub const fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > N {
            return Err(core::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Writes `bytes` to a file descriptor with `write(2)`, retrying short writes.
pub fn write_fd(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice.
        let (n, _) =
            crate::errno::keep(|| unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) });
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// Writes `hakmem-stats: {json}` for `t` to stderr, or appends it to
/// `HAKMEM_STATS_FILE` (one line per process, so programs that check their
/// own stderr are not disturbed).
pub fn print_tally(t: &Tally) {
    let mut out = StackBuf::<8192>::new();
    let ok = out.write_str("hakmem-stats: ").is_ok()
        && hakmem_common::json::write_tally(&mut out, t).is_ok()
        && out.write_str("\n").is_ok();
    if !ok {
        return;
    }
    match config::get().stats_file {
        Some(path) => {
            // SAFETY: a NUL-terminated path; the fd is closed below.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd >= 0 {
                write_fd(fd, out.as_bytes());
                // SAFETY: our fd.
                unsafe { libc::close(fd) };
            }
        }
        None => write_fd(2, out.as_bytes()),
    }
}

extern "C" fn print_at_exit() {
    if config::stats_enabled() {
        print_tally(&snapshot());
    }
}

// Runs at exit (and dlclose) without registering anything at run time: atexit
// can allocate, a .fini_array entry cannot.
#[used]
#[link_section = ".fini_array"]
static PRINT_AT_EXIT: extern "C" fn() = print_at_exit;
