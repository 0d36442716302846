//! Probe sites. Each function counts the event in the allocator's own tally
//! (only when `HAKMEM_STATS=1`) and fires the USDT probe (only when a tracer has
//! raised its semaphore). With nobody listening a site costs two loads and two
//! branches; probes sit on slow paths only.

use crate::stats;
use hakmem_common::{
    AceFailKind, CacheUser, DrainWhy, FailReason, ProbeId, RecycleOutcome, ReturnWhy, Stage,
    TakeSource,
};

// The semaphores' section (`.probes`, which the usdt macros fill) starts on
// a page of its own. A process that maps the library after a tracer
// attached gets its semaphores raised by the kernel, through the first
// writable mapping of the file holding the semaphore's file offset. When
// `.probes` shared a file page with the end of the RELRO segment (which the
// loader maps first, writable until relocated), the kernel raised the RELRO
// copy and the probes of every process started after `hakctl watch --all`
// stayed silent: a change of code size did it, and the fleet test caught it.
// hakctl's `no_semaphore_of_the_shipped_library_shares_its_file_page_...`
// test checks the layout. (The section's alignment is its inputs' largest:
// this one input at 4096 aligns the whole output section.)
#[cfg(feature = "probes")]
core::arch::global_asm!(
    ".pushsection .probes, \"aw\", \"progbits\"",
    ".balign 4096",
    ".popsection"
);

/// Whether a tracer has raised probe `$name`'s semaphore (hakctl and
/// bpftrace raise it on attach); false with the probes compiled out.
macro_rules! semaphore_raised {
    ($name:ident) => {{
        #[cfg(feature = "probes")]
        {
            extern "C" {
                #[link_name = concat!("__usdt_sema_hakmem_", stringify!($name))]
                static SEMAPHORE: u16;
            }
            // SAFETY: the semaphore is a 2-byte static emitted by the usdt
            // macros; the kernel updates it, so it is read volatile.
            unsafe { core::ptr::addr_of!(SEMAPHORE).read_volatile() != 0 }
        }
        #[cfg(not(feature = "probes"))]
        false
    }};
}
pub(crate) use semaphore_raised;

/// Fires probe `$name` with its arguments, computed only when its semaphore
/// is raised. The probe site (the `.note.stapsdt` entry and its nop) lives
/// in a function of its own, `fire`, never inlined: one site per probe. With
/// the site inlined into each caller, a caller's copy that the linker
/// dropped as unused left its note behind pointing at no code (address 0x53
/// or 0x8a, inside the ELF header): bpftrace warned "invalid address", and a
/// tracer that attached there would have patched a byte of the header.
/// hakctl's `every_probe_site_of_the_shipped_library_lies_in_its_code`
/// (hakctl/src/stapsdt.rs) checks every site of the release library lies in
/// its code.
macro_rules! usdt_fire {
    (@u64 $arg:expr) => { u64 };
    ($name:ident, $arg:expr) => {
        #[cfg(feature = "probes")]
        if semaphore_raised!($name) {
            #[cold]
            #[inline(never)]
            fn fire(arg: u64) {
                crate::usdt_probes::$name!(|| arg);
            }
            fire($arg as u64);
        }
        #[cfg(not(feature = "probes"))]
        let _ = $arg;
    };
    ($name:ident, $($arg:expr),+) => {
        #[cfg(feature = "probes")]
        if semaphore_raised!($name) {
            #[cold]
            #[inline(never)]
            fn fire(args: ($(usdt_fire!(@u64 $arg),)+)) {
                crate::usdt_probes::$name!(|| args);
            }
            fire(($($arg as u64,)+));
        }
        #[cfg(not(feature = "probes"))]
        let _ = ($($arg,)+);
    };
}

#[inline]
pub fn slab_recycle(class: usize, outcome: RecycleOutcome, slab: usize, used: u32) {
    stats::record(ProbeId::SlabRecycle, class as u64, outcome as u64, 0);
    usdt_fire!(slab_recycle, class, outcome as u8, slab, used);
}

#[inline]
pub fn ss_acquire_begin(class: usize) {
    stats::record(ProbeId::SsAcquireBegin, class as u64, 0, 0);
    usdt_fire!(ss_acquire_begin, class);
}

#[inline]
pub fn ss_acquire(class: usize, stage: Stage, slab: usize) {
    stats::record(ProbeId::SsAcquire, class as u64, stage as u64, 0);
    usdt_fire!(ss_acquire, class, stage as u8, slab);
}

#[inline]
pub fn shared_fail(class: usize, reason: FailReason) {
    stats::record(ProbeId::SharedFail, class as u64, reason as u64, 0);
    usdt_fire!(shared_fail, class, reason as u8);
}

#[inline]
pub fn ace_fail(kind: AceFailKind, size: usize, class: u64) {
    stats::record(ProbeId::AceFail, kind as u64, size as u64, 0);
    usdt_fire!(ace_fail, kind as u8, size, class);
}

#[inline]
pub fn tls_drain(class: usize, batch: u32, why: DrainWhy) {
    stats::record(ProbeId::TlsDrain, class as u64, batch as u64, 0);
    usdt_fire!(tls_drain, class, batch, why as u8);
}

#[inline]
pub fn remote_drain(class: usize, batch: u32) {
    stats::record(ProbeId::RemoteDrain, class as u64, batch as u64, 0);
    usdt_fire!(remote_drain, class, batch);
}

#[inline]
pub fn ss_map(bytes: usize, ss: usize) {
    stats::record(ProbeId::SsMap, bytes as u64, 0, 0);
    usdt_fire!(ss_map, bytes, ss);
}

#[inline]
pub fn ss_unmap(bytes: usize, ss: usize) {
    stats::record(ProbeId::SsUnmap, bytes as u64, 0, 0);
    usdt_fire!(ss_unmap, bytes, ss);
}

#[inline]
pub fn legacy_refill(class: usize, batch: u32) {
    stats::record(ProbeId::LegacyRefill, class as u64, batch as u64, 0);
    usdt_fire!(legacy_refill, class, batch);
}

#[inline]
pub fn cache_take(bytes: usize, source: TakeSource, user: CacheUser) {
    stats::record(ProbeId::CacheTake, bytes as u64, source as u64, user as u64);
    usdt_fire!(cache_take, bytes, source as u8, user as u8);
}

#[inline]
pub fn cache_put(bytes: usize, user: CacheUser, resident: usize) {
    stats::record(ProbeId::CachePut, bytes as u64, user as u64, 0);
    usdt_fire!(cache_put, bytes, user as u8, resident);
}

/// Whether anyone takes `os_return`'s figures (the tally is on, or a tracer
/// attached): its arguments are sums over a batch, made only then.
#[inline]
pub fn os_return_wanted() -> bool {
    crate::config::stats_enabled() || semaphore_raised!(os_return)
}

#[inline]
pub fn os_return(bytes: usize, why: ReturnWhy, resident: usize, mappings: usize) {
    stats::record(ProbeId::OsReturn, bytes as u64, why as u64, 0);
    usdt_fire!(os_return, bytes, why as u8, resident, mappings);
}
