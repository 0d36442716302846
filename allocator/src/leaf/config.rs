//! Knobs from the environment, read once with `libc::getenv` (which, unlike
//! `std::env::var`, does not allocate).
//!
//! `knobs!` below is the one table: each knob's field, default, variable,
//! parser, the default as people read it, and its meaning. The `Config`
//! struct, its defaults, the parsing and `KNOBS` (from which the README's
//! table is made, and checked by `tests/docs.rs`) all come from it.

use core::ffi::CStr;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A knob as the README lists it.
#[derive(Clone, Copy, Debug)]
pub struct Knob {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

macro_rules! knobs {
    ($( $field:ident: $ty:ty = $default:expr,
        $name:literal, $parse:ident, $shown:literal,
        $meaning:literal; )*) => {
        #[derive(Clone, Copy, Debug)]
        pub struct Config {
            $(
                #[doc = concat!("`", $name, "` (default ", $shown, "): ", $meaning)]
                pub $field: $ty,
            )*
        }

        impl Config {
            const DEFAULT: Config = Config { $( $field: $default, )* };
        }

        /// Every knob, in the README's order.
        pub const KNOBS: &[Knob] = &[
            $( Knob { name: $name, default: $shown, meaning: $meaning }, )*
        ];

        /// The README's default of each knob, where it is a value the
        /// knob's parser reads (not "unlimited", "unset", ...), is the
        /// default the allocator uses: the two are written apart in the
        /// table, so a test holds them together.
        #[cfg(test)]
        fn shown_defaults_disagreeing() -> Vec<&'static str> {
            let mut wrong = Vec::new();
            $(
                let shown = std::ffi::CString::new($shown).unwrap();
                let shown: &'static CStr = Box::leak(shown.into_boxed_c_str());
                if $shown != "unset" {
                    if let Some(v) = parse::$parse(shown) {
                        if v != Config::DEFAULT.$field {
                            wrong.push($name);
                        }
                    }
                }
            )*
            wrong
        }

        /// Sets what the environment sets; a value that does not parse is unset.
        fn read_env(c: &mut Config) {
            $(
                if let Some(v) = env_cstr(cstr(concat!($name, "\0"))).and_then(parse::$parse) {
                    c.$field = v;
                }
            )*
        }
    };
}

knobs! {
    use_superslab: bool = true,
        "HAKMEM_TINY_USE_SUPERSLAB", flag, "1",
        "0 sends every tiny request down the legacy path (A/B in one binary)";
    recycle: bool = true,
        "HAKMEM_TINY_RECYCLE", flag, "1",
        "0 keeps EMPTY slabs instead of releasing them to the pool (A/B of Stage 1)";
    ss_max: usize = usize::MAX,
        "HAKMEM_SS_MAX", count, "unlimited",
        "most SuperSlabs mapped at once; beyond it Stage 3 fails (`shared_fail`, reason `budget`)";
    ss_keep: usize = 2,
        "HAKMEM_SS_KEEP", count, "2",
        "fully EMPTY SuperSlabs kept in the pool (their slabs serve Stage 1); further ones are \
         retired to the chunk cache once their slabs' pages went back (the purge delay); also \
         sizes the reserve of EMPTY slabs that keep their pages for a second instead of the purge \
         delay (31 slabs each)";
    ace_max_bytes: usize = crate::class::ACE_MAX,
        "HAKMEM_ACE_MAX_BYTES", count, "262144",
        "largest size ACE serves (at most its largest class, 256 KiB); mid sizes above it are \
         `ace_fail` Threshold (served by the large path)";
    ace_max_segments: usize = usize::MAX,
        "HAKMEM_ACE_MAX_SEGMENTS", count, "unlimited",
        "2 MiB segments per ACE class; a depleted class beyond it is `ace_fail` Exhaustion";
    os_limit_bytes: usize = usize::MAX,
        "HAKMEM_OS_LIMIT_MB", mib, "the cgroup's room",
        "cap on memory mapped from the OS; beyond it mapping is refused as by the OS (Stage 3 \
         `map_failed`, ACE MapFail, malloc NULL/ENOMEM). Unset, the process's memory cgroup \
         limit (v1 or v2) less an eighth: running out is NULL + ENOMEM, not an OOM kill \
         ([docs/hardening.md](docs/hardening.md))";
    cgroup_limit: bool = true,
        "HAKMEM_CGROUP_LIMIT", flag, "1",
        "0 ignores the cgroup's memory limit (maps until the OS or the kernel's OOM killer says no)";
    reserve_regions: bool = false,
        "HAKMEM_RESERVE_REGIONS", flag, "0",
        "1 maps hakmem's 32 MiB regions reserved (`PROT_NONE`) and makes each 2 MiB chunk \
         writable as it is handed out, as under `vm.overcommit_memory=2`: for a program that \
         makes the `mlockall(MCL_CURRENT)` system call itself after its first allocation, \
         which would lock a writable region's unused chunks too (hakmem's `mlockall` gives \
         them back first); each chunk then costs an `mprotect`, which waits for other \
         threads' page faults ([docs/decisions.md](docs/decisions.md))";
    check_frees: bool = false,
        "HAKMEM_CHECK_FREES", flag, "0",
        "1 checks every free fully: a double free on any list (a key in each free block), a \
         pointer inside a block of the thread's own slabs; threads then cache no blocks (about \
         2.7x slower on bench_random_mixed; what is always on costs 1%, see \
         [docs/hardening.md](docs/hardening.md))";
    purge_delay_ns: u64 = 100_000_000,
        "HAKMEM_PURGE_DELAY_MS", ms, "100",
        "how long freed memory beyond the chunk cache's 64 MiB reserve, and an EMPTY slab beyond \
         the pool's reserve of 62, waits for reuse before it goes back to the OS (at the next \
         allocator slow path after the delay; the ACE segments a class keeps with every block \
         free wait 10 s); 0 returns it, and those, at the first chance (A/B of the burst delay)";
    purge_thread: bool = false,
        "HAKMEM_PURGE_THREAD", flag, "0",
        "1 starts one background thread (`hakmem-purge`, at the first allocator slow path) that \
         sleeps until the next due time (chunk cache, EMPTY slabs or kept ACE segments) and returns what is due, so \
         a process that goes idle after a burst gets its memory back without an allocator call \
         or `malloc_trim` (jemalloc's `background_thread`); off by default, since a library \
         that starts threads surprises programs that count theirs or fork without exec";
    stats: bool = false,
        "HAKMEM_STATS", flag, "0",
        "1 counts every probe event and prints the tally as JSON at exit (`hakmem-stats: {...}` \
         on stderr), and in a C++ program whether hakmem serves its `operator new` \
         (`hakmem-cxx: serve` or `forward (...)`, docs/hardening.md)";
    stats_file: Option<&'static CStr> = None,
        "HAKMEM_STATS_FILE", path, "unset",
        "append the exit tally to this file instead of stderr (implies `HAKMEM_STATS=1`; for \
         programs that check their own stderr)";
    stop_at_start_pid: u64 = 0,
        "HAKMEM_STOP_AT_START", pid, "unset",
        "the process with this pid stops itself (SIGSTOP) at its first allocation; `hakctl run` \
         uses it to attach before anything is counted";
    invalid_free_abort: bool = true,
        "HAKMEM_INVALID_FREE", abort_unless_ignore, "abort",
        "`ignore` logs a detected invalid or double free and goes on instead of aborting (the \
         block is leaked, never reused)";
}

/// The parsers the table names: the variable's value (set, NUL-free) to
/// the field's, or None to leave the default.
mod parse {
    use core::ffi::CStr;

    fn number(v: &CStr) -> Option<u64> {
        let bytes = v.to_bytes();
        if bytes.is_empty() {
            return None;
        }
        let mut n: u64 = 0;
        for &b in bytes {
            if !b.is_ascii_digit() {
                return None;
            }
            n = n.saturating_mul(10).saturating_add((b - b'0') as u64);
        }
        Some(n)
    }

    pub fn flag(v: &'static CStr) -> Option<bool> {
        number(v).map(|n| n != 0)
    }

    pub fn count(v: &'static CStr) -> Option<usize> {
        number(v).map(|n| n as usize)
    }

    pub fn pid(v: &'static CStr) -> Option<u64> {
        number(v)
    }

    /// Mebibytes, as bytes.
    pub fn mib(v: &'static CStr) -> Option<usize> {
        number(v).map(|n| (n as usize).saturating_mul(1 << 20))
    }

    /// Milliseconds, as nanoseconds.
    pub fn ms(v: &'static CStr) -> Option<u64> {
        number(v).map(|n| n.saturating_mul(1_000_000))
    }

    pub fn path(v: &'static CStr) -> Option<Option<&'static CStr>> {
        Some(Some(v))
    }

    pub fn abort_unless_ignore(v: &'static CStr) -> Option<bool> {
        Some(v.to_bytes() != b"ignore")
    }
}

/// A NUL-terminated literal as a `CStr` (at compile time).
const fn cstr(s: &'static str) -> &'static CStr {
    match CStr::from_bytes_with_nul(s.as_bytes()) {
        Ok(c) => c,
        Err(_) => panic!("a knob's name with a NUL in it"),
    }
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
    read_env(&mut c);
    // What one knob means for another.
    if env_cstr(c"HAKMEM_OS_LIMIT_MB")
        .and_then(parse::mib)
        .is_none()
        && c.cgroup_limit
    {
        if let Some(budget) = crate::cgroup::heap_budget() {
            c.os_limit_bytes = budget;
        }
    }
    if c.stats_file.is_some() {
        c.stats = true;
    }
    // SAFETY: only the thread that won the UNREAD -> READING exchange writes,
    // and no reader dereferences CONFIG before it observes READY.
    unsafe { *core::ptr::addr_of_mut!(CONFIG) = c };
    STATS_ON.store(c.stats, Ordering::Relaxed);
    STATE.store(READY, Ordering::Release);
}

fn env_cstr(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: getenv takes a NUL-terminated name and returns NULL or a pointer
    // into the environment block, which lives for the process (we never call
    // setenv, and a program that does races with every getenv user anyway).
    unsafe {
        let p = libc::getenv(name.as_ptr());
        if p.is_null() {
            return None;
        }
        Some(CStr::from_ptr(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readmes_defaults_are_the_allocators() {
        assert_eq!(shown_defaults_disagreeing(), Vec::<&str>::new());
        assert!(KNOBS.iter().any(|k| k.default == "unlimited"));
    }
}
