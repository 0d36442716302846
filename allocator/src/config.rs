//! Knobs from the environment, read once with `libc::getenv` (which, unlike
//! `std::env::var`, does not allocate). See the README for the list.

use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `HAKMEM_TINY_USE_SUPERSLAB` (default 1): 0 sends every tiny request to the legacy path.
    pub use_superslab: bool,
    /// `HAKMEM_TINY_RECYCLE` (default 1): 0 keeps EMPTY slabs instead of releasing them (A/B).
    pub recycle: bool,
    /// `HAKMEM_SS_MAX`: most SuperSlabs mapped at once; Stage 3 fails (budget) beyond it.
    pub ss_max: usize,
    /// `HAKMEM_SS_KEEP` (default 2): fully EMPTY SuperSlabs kept in the pool before retiring
    /// further ones to the large cache.
    pub ss_keep: usize,
    /// `HAKMEM_ACE_MAX_BYTES` (default 262144, ACE's largest class): largest size ACE serves; bigger mid sizes are Threshold failures.
    pub ace_max_bytes: usize,
    /// `HAKMEM_ACE_MAX_SEGMENTS`: segments per ACE class; a depleted class beyond it is an Exhaustion failure.
    pub ace_max_segments: usize,
    /// `HAKMEM_OS_LIMIT_MB`: cap on memory mapped from the OS; beyond it mapping is refused as by the OS.
    /// Unset, the process's cgroup memory limit less an eighth (see `cgroup`), unless
    /// `HAKMEM_CGROUP_LIMIT=0`.
    pub os_limit_bytes: usize,
    /// `HAKMEM_PURGE_DELAY_MS` (default 100): how long freed memory beyond the large cache's
    /// 64 MiB reserve, and an EMPTY slab beyond the pool's reserve, waits for reuse before it
    /// goes back to the OS; 0 returns it at once.
    pub purge_delay_ns: u64,
    /// `HAKMEM_PURGE_THREAD` (default 0): 1 starts a background thread that returns what the
    /// large cache and the pool's EMPTY slabs hold past their delays without waiting for an
    /// allocator call (see `purge`).
    pub purge_thread: bool,
    /// `HAKMEM_STATS` (default 0): 1 counts every probe event and prints the tally at exit.
    pub stats: bool,
    /// `HAKMEM_INVALID_FREE` (default abort): `abort` or `ignore` (log and go on).
    pub invalid_free_abort: bool,
    /// `HAKMEM_CHECK_FREES` (default 0): 1 checks every free fully (see
    /// `hardening`): a double free whichever list the block sits on, and a
    /// pointer inside a block on the owner's fast path too. It reads and
    /// writes the freed block's second word: 7-25% on bench_random_mixed.
    pub check_frees: bool,
    /// `HAKMEM_STATS_FILE`: append the exit tally to this file instead of stderr (implies stats).
    pub stats_file: Option<&'static core::ffi::CStr>,
    /// `HAKMEM_STOP_AT_START=PID`: the process with this pid stops itself (SIGSTOP) at its
    /// first allocation, so `hakctl run` can attach before anything is counted.
    pub stop_at_start_pid: u64,
}

impl Config {
    const DEFAULT: Config = Config {
        use_superslab: true,
        recycle: true,
        ss_max: usize::MAX,
        ss_keep: 2,
        ace_max_bytes: crate::class::ACE_MAX,
        ace_max_segments: usize::MAX,
        os_limit_bytes: usize::MAX,
        purge_delay_ns: 100_000_000,
        purge_thread: false,
        stats: false,
        invalid_free_abort: true,
        check_frees: false,
        stats_file: None,
        stop_at_start_pid: 0,
    };
}

static mut CONFIG: Config = Config::DEFAULT;
static STATE: AtomicU8 = AtomicU8::new(UNREAD);
static STATS_ON: AtomicBool = AtomicBool::new(false);
const UNREAD: u8 = 0;
const READING: u8 = 1;
const READY: u8 = 2;

/// The configuration; reads the environment on first use.
#[inline]
pub fn get() -> &'static Config {
    if STATE.load(Ordering::Acquire) != READY {
        load();
    }
    // SAFETY: CONFIG is written only by `load` before STATE becomes READY
    // (Release) and never again; every reader saw READY (Acquire) first, or is
    // the loading thread itself reading defaults during a re-entrant call.
    unsafe { &*core::ptr::addr_of!(CONFIG) }
}

/// Whether `HAKMEM_STATS=1`: one relaxed load, for probe sites.
#[inline]
pub fn stats_enabled() -> bool {
    STATS_ON.load(Ordering::Relaxed)
}

#[cold]
fn load() {
    match STATE.compare_exchange(UNREAD, READING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(READY) => return,
        // Another thread is reading (a few getenv calls): wait for it. The same
        // thread cannot get here re-entrantly, since getenv does not allocate.
        Err(_) => {
            while STATE.load(Ordering::Acquire) != READY {
                core::hint::spin_loop();
            }
            return;
        }
    }
    let mut c = Config::DEFAULT;
    if let Some(v) = env_u64(c"HAKMEM_TINY_USE_SUPERSLAB") {
        c.use_superslab = v != 0;
    }
    if let Some(v) = env_u64(c"HAKMEM_TINY_RECYCLE") {
        c.recycle = v != 0;
    }
    if let Some(v) = env_u64(c"HAKMEM_SS_MAX") {
        c.ss_max = v as usize;
    }
    if let Some(v) = env_u64(c"HAKMEM_SS_KEEP") {
        c.ss_keep = v as usize;
    }
    if let Some(v) = env_u64(c"HAKMEM_ACE_MAX_BYTES") {
        c.ace_max_bytes = v as usize;
    }
    if let Some(v) = env_u64(c"HAKMEM_ACE_MAX_SEGMENTS") {
        c.ace_max_segments = v as usize;
    }
    if let Some(v) = env_u64(c"HAKMEM_OS_LIMIT_MB") {
        c.os_limit_bytes = (v as usize).saturating_mul(1 << 20);
    } else if env_u64(c"HAKMEM_CGROUP_LIMIT") != Some(0) {
        if let Some(budget) = crate::cgroup::heap_budget() {
            c.os_limit_bytes = budget;
        }
    }
    if let Some(v) = env_u64(c"HAKMEM_PURGE_DELAY_MS") {
        c.purge_delay_ns = v.saturating_mul(1_000_000);
    }
    if let Some(v) = env_u64(c"HAKMEM_PURGE_THREAD") {
        c.purge_thread = v != 0;
    }
    if let Some(v) = env_u64(c"HAKMEM_STATS") {
        c.stats = v != 0;
    }
    if let Some(v) = env_bytes(c"HAKMEM_INVALID_FREE") {
        c.invalid_free_abort = v != b"ignore";
    }
    if let Some(v) = env_u64(c"HAKMEM_CHECK_FREES") {
        c.check_frees = v != 0;
    }
    if let Some(pid) = env_u64(c"HAKMEM_STOP_AT_START") {
        c.stop_at_start_pid = pid;
    }
    if let Some(path) = env_cstr(c"HAKMEM_STATS_FILE") {
        c.stats = true;
        c.stats_file = Some(path);
    }
    // SAFETY: only the thread that won the UNREAD -> READING exchange writes,
    // and no reader dereferences CONFIG before it observes READY.
    unsafe { *core::ptr::addr_of_mut!(CONFIG) = c };
    STATS_ON.store(c.stats, Ordering::Relaxed);
    STATE.store(READY, Ordering::Release);
}

fn env_cstr(name: &core::ffi::CStr) -> Option<&'static core::ffi::CStr> {
    // SAFETY: getenv takes a NUL-terminated name and returns NULL or a pointer
    // into the environment block, which lives for the process (we never call
    // setenv, and a program that does races with every getenv user anyway).
    unsafe {
        let p = libc::getenv(name.as_ptr());
        if p.is_null() {
            return None;
        }
        Some(core::ffi::CStr::from_ptr(p))
    }
}

fn env_bytes(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    env_cstr(name).map(|s| s.to_bytes())
}

fn env_u64(name: &core::ffi::CStr) -> Option<u64> {
    let bytes = env_bytes(name)?;
    let mut v: u64 = 0;
    if bytes.is_empty() {
        return None;
    }
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.saturating_mul(10).saturating_add((b - b'0') as u64);
    }
    Some(v)
}
