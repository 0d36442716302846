//! The OS layer: anonymous mappings, with the `HAKMEM_OS_LIMIT_MB` budget that
//! lets tests make "the OS refuses memory" happen deterministically.

use crate::config;
use crate::errno;
use crate::procfs;
use crate::registry::CHUNK;
use crate::sync::SpinLock;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub const PAGE: usize = 4096;
pub static MAPPED: AtomicUsize = AtomicUsize::new(0);

/// Bytes hakmem holds mapped from the OS now.
pub fn mapped_bytes() -> usize {
    MAPPED.load(Ordering::Relaxed)
}

fn reserve(bytes: usize) -> bool {
    let limit = config::get().os_limit_bytes;
    let mut cur = MAPPED.load(Ordering::Relaxed);
    loop {
        let next = match cur.checked_add(bytes) {
            Some(n) if n <= limit => n,
            _ => return false,
        };
        match MAPPED.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(c) => cur = c,
        }
    }
}

/// Maps `bytes` (a multiple of PAGE) aligned to `align` (a power of two >= PAGE).
/// Returns null when the budget or the OS refuses.
pub fn map_aligned(bytes: usize, align: usize) -> *mut u8 {
    charged(bytes, || map_aligned_uncharged(bytes, align, RW))
}

/// Mappings refused (by the budget or the OS) so far.
static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// How many mappings were refused so far: a caller that reads it before an
/// allocation and again after a null result knows whether memory ran out
/// (`lifecycle::after_refusal`), not a request no mapping could hold.
pub fn refusals() -> usize {
    REFUSED.load(Ordering::Relaxed)
}

/// Runs `map` within the budget: `bytes` are reserved before and given back
/// if it returns null. A refusal is counted only if memory given back could
/// cure it (`could_be_had`).
fn charged(bytes: usize, map: impl FnOnce() -> *mut u8) -> *mut u8 {
    if !reserve(bytes) {
        count_refusal(bytes);
        return core::ptr::null_mut();
    }
    let p = map();
    if p.is_null() {
        count_refusal(bytes);
        MAPPED.fetch_sub(bytes, Ordering::Relaxed);
    }
    p
}

#[cold]
fn count_refusal(bytes: usize) {
    if could_be_had(bytes) {
        REFUSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether a mapping of `bytes` could be had at all: no more than the
/// budget (`HAKMEM_OS_LIMIT_MB`, the cgroup's), the address-space limit
/// (`RLIMIT_AS`), and, in `vm.overcommit_memory`'s default mode, the
/// machine's memory and swap (whose heuristic refuses more than that in one
/// mapping whatever is free; mode 2's commit limit may lie above it, and
/// there memory given back may cure a refusal of more). A refusal of more
/// is not cured by giving memory back: callers then keep their caches (a
/// program that tries a size from its input and falls back would otherwise
/// empty every cache at each try). Raw syscalls, errno kept, on a refusal
/// only.
pub fn could_be_had(bytes: usize) -> bool {
    if bytes > config::get().os_limit_bytes {
        return false;
    }
    if soft_limit(libc::RLIMIT_AS).is_some_and(|l| l != libc::RLIM_INFINITY && bytes as u64 > l) {
        return false;
    }
    if overcommit_mode() != Some(0) {
        return true;
    }
    // SAFETY: all-zero is a valid `sysinfo` to be filled.
    let mut info: libc::sysinfo = unsafe { core::mem::zeroed() };
    // SAFETY: sysinfo writes only `info`.
    let (r, _) = errno::keep(|| unsafe {
        libc::syscall(libc::SYS_sysinfo, &mut info as *mut libc::sysinfo)
    });
    if r != 0 {
        return true;
    }
    let memory = info.totalram.saturating_add(info.totalswap);
    bytes as u64 <= memory.saturating_mul(u64::from(info.mem_unit.max(1)))
}

/// Chunks a region maps ahead. A SuperSlab, an ACE segment, a legacy segment
/// and a large block up to 2 MiB each take one chunk; a program that makes
/// many of them (10,000 buffers grown past 32 KiB by realloc) paid an mmap for
/// each, 5% of its time. The region is address space only (never touched,
/// though a writable one counts whole in `VmData`) and its chunks go back to
/// the OS one by one, as before.
const REGION_CHUNKS: usize = 16;

/// The rest of the current region: `start..end`, whole chunks not yet handed
/// out; `writable` if it was mapped writable (see `region_prot`).
struct Region {
    start: usize,
    end: usize,
    writable: bool,
}

static REGION: SpinLock<Region> = SpinLock::new(Region {
    start: 0,
    end: 0,
    writable: false,
});

/// Maps one chunk (CHUNK bytes, CHUNK-aligned), from the current region or a
/// new one. Null when the budget or the OS refuses. Return it with `unmap`.
pub fn map_chunk() -> *mut u8 {
    charged(CHUNK, || {
        // Not even the address space for a region: try the one chunk.
        chunk_from_region().unwrap_or_else(|| {
            let p = map_aligned_uncharged(CHUNK, CHUNK, RW);
            if !p.is_null() {
                small_pages(p as usize, CHUNK);
            }
            p
        })
    })
}

/// Asks for small pages in `start..start + len` whatever the system's
/// transparent huge page mode (`MADV_NOHUGEPAGE`, a hint). Every chunk gets
/// it: SuperSlabs, ACE segments and parcel chunks are carved into slabs and
/// blocks that are touched, purged and reused piecemeal, and a large block in
/// one chunk is at most 2 MiB. With THP `always` and no advice, a SuperSlab's
/// first touched page brought in all 2 MiB: peak RSS of hakbench `tiny` 6 MB
/// against 2 MB (glibc 2 MB), bench_random_mixed 8 against 5, at no gain in
/// time; and a purged slab split a huge page. Large blocks of more than a
/// chunk follow the system's mode (`always` gives them huge pages).
fn small_pages(start: usize, len: usize) {
    // SAFETY: `start..start + len` is a mapping of ours; the advice changes
    // no byte of it.
    unsafe { advise(start, len, libc::MADV_NOHUGEPAGE) };
}

/// The next chunk of the current region, writable; None if the OS refuses a
/// region or the chunk's pages (the commit limit).
///
/// A chunk of a reserved region is made writable here, with the region lock
/// let go: `mprotect` waits for the process's memory map lock, which page
/// faults elsewhere in the program hold (rptest, two threads faulting in
/// fresh blocks: each traced run had one `mprotect` of 1-4 ms among about 30
/// of 1-30 us, and a thread mapping a chunk meanwhile slept on the region
/// lock as long). A refused chunk's address space goes back; the region goes
/// on with the next.
fn chunk_from_region() -> Option<*mut u8> {
    let (p, writable) = reserve_chunk()?;
    #[cfg(test)]
    tests::chunk_taken(p);
    if writable {
        return Some(p as *mut u8);
    }
    // SAFETY: a reserved chunk that `reserve_chunk` handed to us alone.
    let (r, _) = errno::keep(|| unsafe { libc::mprotect(p as *mut libc::c_void, CHUNK, RW) });
    if r != 0 {
        // SAFETY: as above; nobody else has it, and nothing of it was used.
        unsafe { munmap(p, CHUNK) };
        return None;
    }
    Some(p as *mut u8)
}

/// How a new region is mapped: writable where that costs nothing until its
/// pages are touched, reserved (`PROT_NONE`, each chunk made writable as it
/// is handed out) where it would be charged or locked in full, or where
/// `HAKMEM_RESERVE_REGIONS=1` asks (a program that makes the
/// `mlockall(MCL_CURRENT)` system call itself after its first allocation
/// would lock a writable region's untaken chunks; hakmem's own `mlockall`
/// gives them back first: `drop_untaken_chunks`, tests/limits.rs).
///
/// Why not reserve always: the `mprotect` that makes a reserved chunk
/// writable changes the region's mapping (the kernel write-locks the mapping
/// it merges the chunk into), so it waits for every page fault in that
/// mapping and makes the next ones wait for it (before Linux 6.4, with no
/// per-mapping locks, every fault of the process). In rptest (two threads
/// faulting in fresh blocks) that put a thread to sleep in state D 2-9 times
/// a run, and a woken thread was seen moved onto its waker's CPU while the
/// other CPU idled for a timer tick (4 ms, a fifth of a round); with
/// writable regions 1-2 times in most runs, one for rptest's own result
/// file at exit (docs/performance.md).
fn region_prot() -> libc::c_int {
    #[cfg(test)]
    if tests::FORCE_RESERVED.load(Ordering::Relaxed) {
        return libc::PROT_NONE;
    }
    if !config::get().reserve_regions
        && writable_regions(overcommit_mode(), data_unlimited, future_locked)
    {
        RW
    } else {
        libc::PROT_NONE
    }
}

/// `region_prot`'s rule. Writable only when the kernel does not charge a
/// `MAP_NORESERVE` mapping (`vm.overcommit_memory` 0 or 1; None: unknown,
/// as when /proc could not be read), `RLIMIT_DATA` (which counts every
/// private writable mapping, touched or not) is unlimited, and
/// `mlockall(MCL_FUTURE)` is not in force (the kernel would fault in and
/// lock the whole region at once; it leaves `PROT_NONE` alone). The last two
/// cost syscalls, so they are asked only if the answer still depends on them.
fn writable_regions(
    overcommit: Option<usize>,
    data_unlimited: impl FnOnce() -> bool,
    future_locked: impl FnOnce() -> bool,
) -> bool {
    matches!(overcommit, Some(0 | 1)) && data_unlimited() && !future_locked()
}

/// `vm.overcommit_memory`, read at the first region (at startup, before a
/// program may shut itself off from `/proc` with seccomp or chroot) and kept.
fn overcommit_mode() -> Option<usize> {
    const UNREAD: usize = usize::MAX;
    const UNKNOWN: usize = usize::MAX - 1;
    static MODE: AtomicUsize = AtomicUsize::new(UNREAD);
    let mut mode = MODE.load(Ordering::Relaxed);
    if mode == UNREAD {
        mode = procfs::overcommit_mode().unwrap_or(UNKNOWN);
        MODE.store(mode, Ordering::Relaxed);
    }
    (mode != UNKNOWN).then_some(mode)
}

/// Whether `RLIMIT_DATA` is unlimited now (raw `prlimit64`: a wrapper of
/// `getrlimit` preloaded before hakmem could allocate). A limit set later
/// applies from the next region: the current one's chunks are counted
/// already.
fn data_unlimited() -> bool {
    soft_limit(libc::RLIMIT_DATA) == Some(libc::RLIM_INFINITY)
}

/// The soft limit `resource` of this process now: raw `prlimit64` (a
/// wrapper of `getrlimit` may be preloaded before hakmem and allocate), errno
/// kept. None if the call failed.
fn soft_limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 on this process with no new limit writes only `limit`.
    let (r, _) = errno::keep(|| unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            resource,
            core::ptr::null::<libc::rlimit>(),
            &mut limit as *mut libc::rlimit,
        )
    });
    (r == 0).then_some(limit.rlim_cur)
}

/// Whether new mappings come locked and faulted in (`mlockall(MCL_FUTURE)`);
/// yes if the probe cannot say.
fn future_locked() -> bool {
    probe_future_locked().unwrap_or(true)
}

/// A one-page read-only probe, resident at once if new mappings are locked
/// (the kernel maps the zero page into it); None if it could not be mapped
/// or asked. Three syscalls a region, no `/proc`.
fn probe_future_locked() -> Option<bool> {
    // SAFETY: a fresh anonymous page at a kernel-chosen address, unmapped
    // below, handed to nobody.
    let (p, _) = errno::keep(|| unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            PAGE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    });
    if p == libc::MAP_FAILED {
        return None;
    }
    let locked = page_resident(p as usize);
    // SAFETY: the probe mapped above.
    unsafe { munmap(p as usize, PAGE) };
    locked
}

/// Maps a region of `len` bytes as `region_prot` says, and its protection.
/// A writable one found resident at once (a thread called
/// `mlockall(MCL_FUTURE)` after the probe) is mapped again reserved.
fn map_region(len: usize) -> Option<(usize, libc::c_int)> {
    let prot = region_prot();
    crate::test_hooks::at(crate::test_hooks::Point::MapRegion, prot as usize);
    let base = map_aligned_uncharged(len, CHUNK, prot) as usize;
    if base == 0 {
        return None;
    }
    if prot == libc::PROT_NONE || !page_resident(base).unwrap_or(true) {
        return Some((base, prot));
    }
    // SAFETY: ours, mapped above, handed to nobody.
    unsafe { munmap(base, len) };
    let base = map_aligned_uncharged(len, CHUNK, libc::PROT_NONE) as usize;
    (base != 0).then_some((base, libc::PROT_NONE))
}

/// Gives back the current region's chunks that nobody has taken, so that
/// the next chunk comes from a region mapped as `region_prot` says then. For
/// `mlockall(MCL_CURRENT)` (`capi::mlockall`): it would fault in and lock a
/// writable region's untaken chunks (up to 30 MiB no block lives in), and
/// lock a reserved one's, so that each chunk made writable later came in
/// locked, which glibc's later mappings are not. Keeps errno. (`mlockall`
/// is not async-signal-safe: from a signal handler that interrupted this
/// thread's own `take`, this waits for the region lock forever, as other
/// such calls may.)
#[cfg(any(test, feature = "c-abi"))]
pub fn drop_untaken_chunks() {
    let mut region = REGION.lock();
    let (start, len) = (region.start, region.end - region.start);
    region.start = region.end;
    drop(region);
    if len != 0 {
        // SAFETY: chunks nobody was handed, taken off the region above.
        unsafe { munmap(start, len) };
    }
}

/// Whether the page at `addr` (of a mapping of ours) is resident; None if
/// the kernel will not say.
fn page_resident(addr: usize) -> Option<bool> {
    resident_bytes(addr, PAGE).map(|bytes| bytes != 0)
}

/// Takes the next chunk of the current region, reserving a new region first
/// when it is used up; None if the OS refuses. With it, whether it is
/// writable already.
fn reserve_chunk() -> Option<(usize, bool)> {
    loop {
        if let Some(p) = REGION.lock().take() {
            return Some(p);
        }
        // Mapped without the lock, as above.
        let len = REGION_CHUNKS * CHUNK;
        let (base, prot) = map_region(len)?;
        small_pages(base, len);
        let mut region = REGION.lock();
        if region.start == region.end {
            *region = Region {
                start: base,
                end: base + len,
                writable: prot == RW,
            };
            return region.take();
        }
        drop(region);
        // Another thread put a region in place meanwhile: take from it.
        // SAFETY: ours, mapped above, handed to nobody.
        unsafe { munmap(base, len) };
    }
}

impl Region {
    /// The next chunk and whether it is writable, if any is left. A reserved
    /// region goes up, a writable one down: either way the chunk past the
    /// newest one's end is not an untaken writable one, which a stray write
    /// there would dirty unseen (a reserved one faults, a taken one is
    /// another block's, as between any two chunks).
    fn take(&mut self) -> Option<(usize, bool)> {
        if self.start == self.end {
            return None;
        }
        let chunk = if self.writable {
            self.end -= CHUNK;
            self.end
        } else {
            self.start += CHUNK;
            self.start - CHUNK
        };
        Some((chunk, self.writable))
    }
}

pub fn lock_for_fork() {
    REGION.acquire_for_fork();
    crate::registry::lock_for_fork();
}

pub fn unlock_after_fork() {
    crate::registry::unlock_after_fork();
    REGION.release_after_fork();
}

/// `map_aligned` without the budget.
///
/// First asks for exactly `bytes`: hakmem's mappings are all multiples of their
/// alignment and the kernel places new mappings just below the previous ones,
/// so that one is usually aligned already (one syscall). Only when it is not
/// does it map `bytes + align` and trim the ends (three).
fn map_aligned_uncharged(bytes: usize, align: usize, prot: libc::c_int) -> *mut u8 {
    debug_assert!(bytes.is_multiple_of(PAGE) && align.is_power_of_two() && align >= PAGE);
    let flags = if bytes <= NORESERVE_MAX {
        libc::MAP_NORESERVE
    } else {
        0
    };
    let exact = map_anonymous(bytes, prot, flags);
    if exact as usize & (align - 1) == 0 {
        // Aligned, or null (refused: asking for more would not help).
        return exact;
    }
    // SAFETY: `exact` is the mapping of `bytes` just made, unused.
    unsafe { munmap(exact as usize, bytes) };
    map_and_trim(bytes, align, prot, flags)
}

/// Maps `bytes + align - PAGE` and unmaps what lies outside the aligned
/// `bytes` in it. Null if the OS refuses.
fn map_and_trim(bytes: usize, align: usize, prot: libc::c_int, flags: libc::c_int) -> *mut u8 {
    let Some(over) = bytes.checked_add(align - PAGE) else {
        return core::ptr::null_mut();
    };
    let raw = map_anonymous(over, prot, flags);
    if raw.is_null() {
        return raw;
    }
    let start = raw as usize;
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = over - head - bytes;
    // SAFETY: both trimmed ranges lie inside the mapping just made and are not
    // part of the returned region.
    unsafe {
        if head > 0 {
            munmap(start, head);
        }
        if tail > 0 {
            munmap(aligned + bytes, tail);
        }
    }
    aligned as *mut u8
}

/// Read and write: what every mapping handed out has.
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// Mappings asked for up to this size are made with `MAP_NORESERVE`
/// (regions of chunks, and every block up to 1 GiB, whatever is mapped
/// beside it to align it). A larger one is one program block, and goes through the kernel's overcommit heuristic as glibc's
/// mmapped blocks do: in `vm.overcommit_memory`'s default mode a request
/// beyond the machine's memory and swap is refused. With the flag,
/// `malloc(2^40)` returned a block here (24 GiB of memory), whose first
/// touches would have had the program killed; glibc returns NULL with
/// ENOMEM (the conformance suite's `beyond memory` group).
const NORESERVE_MAX: usize = 1 << 30;

/// An anonymous mapping of `bytes` anywhere with protection `prot` and
/// `flags` beside private and anonymous, or null.
fn map_anonymous(bytes: usize, prot: libc::c_int, flags: libc::c_int) -> *mut u8 {
    // SAFETY: an anonymous private mapping at a kernel-chosen address touches no
    // existing memory; the result is checked for MAP_FAILED.
    let (p, _) = errno::keep(|| unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            bytes,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    });
    if p == libc::MAP_FAILED {
        return core::ptr::null_mut();
    }
    if !crate::registry::covers(p as usize, bytes) || !crate::registry::prepare(p as usize, bytes) {
        // Above the registry's 47 bits (a kernel with 5-level paging places
        // mappings there only when asked, but say no rather than hand out a
        // block `free` could not find), or its entries could not be made
        // writable (see `registry::prepare`).
        // SAFETY: the mapping just made, unused.
        unsafe { munmap(p as usize, bytes) };
        return core::ptr::null_mut();
    }
    p.cast()
}

/// Grows a mapping in place (never moves it): true if the pages after it were
/// free and the budget allows.
///
/// # Safety
/// `ptr`/`old` is exactly a live mapping made by this layer (possibly grown before).
pub unsafe fn grow_in_place(ptr: *mut u8, old: usize, new: usize) -> bool {
    debug_assert!(new > old && new.is_multiple_of(PAGE));
    if !reserve(new - old) {
        return false;
    }
    // SAFETY: per the contract the range is our mapping; flags 0 forbids moving it.
    let (r, _) = errno::keep(|| unsafe { libc::mremap(ptr.cast(), old, new, 0) });
    if r == libc::MAP_FAILED {
        MAPPED.fetch_sub(new - old, Ordering::Relaxed);
        return false;
    }
    // The address space it grew into may lie past any mapping of ours before:
    // the registry's page for it must be writable (a split of the grown
    // mapping in the chunk cache registers a piece there). Made so only once
    // the growth is had: a refused one (the pages after were taken) leaves
    // no table page writable, and committed, for a range never used.
    if !crate::registry::prepare(ptr as usize, new) {
        // SAFETY: shrinking back the growth just made, unused.
        let (r, _) = errno::keep(|| unsafe { libc::mremap(ptr.cast(), new, old, 0) });
        debug_assert!(r != libc::MAP_FAILED, "a shrink in place cannot fail");
        MAPPED.fetch_sub(new - old, Ordering::Relaxed);
        return false;
    }
    true
}

/// Moves the pages of the mapping `from`/`bytes` to the start of the mapping
/// `to`/`to_bytes` (bigger), replacing what was there: its resident pages
/// come along without a copy or a fault (mremap moves page-table entries), and
/// `from..from + bytes` is unmapped after. False if the kernel refused: then
/// `from` is as it was, and `to` is given back, but for its first `bytes`,
/// which the kernel may already have unmapped (it unmaps the target before
/// it checks the source) and another thread mapped meanwhile: left alone,
/// at worst address space lost, never someone else's mapping unmapped.
///
/// Before Linux 6.17 the kernel refuses a `from` that spans two kernel
/// mappings (VMAs), as joined neighbours may: the caller then keeps `from`
/// and does not try it again (`chunks::take_moved`).
///
/// # Safety
/// `from` and `to` are mappings of this layer's (made by it, maybe joined
/// or grown in place); nobody uses either, and they do not overlap.
pub unsafe fn move_mapping(from: *mut u8, bytes: usize, to: *mut u8, to_bytes: usize) -> bool {
    debug_assert!(bytes < to_bytes);
    // SAFETY: per the contract; MREMAP_FIXED replaces only `to..to + bytes`,
    // which is ours and unused.
    let (r, _) = errno::keep(|| unsafe {
        libc::mremap(
            from.cast(),
            bytes,
            bytes,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to.cast::<libc::c_void>(),
        )
    });
    if r == libc::MAP_FAILED {
        // SAFETY: the tail of `to`, past what the kernel may have touched, is
        // still ours and unused.
        unsafe { munmap(to as usize + bytes, to_bytes - bytes) };
        MAPPED.fetch_sub(to_bytes, Ordering::Relaxed);
        return false;
    }
    // `to`'s pages it replaced were charged already: the moved mapping's are
    // no longer mapped twice.
    MAPPED.fetch_sub(bytes, Ordering::Relaxed);
    true
}

/// Returns a mapping made by `map_aligned` or `map_chunk` to the OS.
///
/// # Safety
/// `ptr`/`bytes` must be exactly what `map_aligned` or `map_chunk` returned (or
/// adjacent ones of them together), no longer used.
pub unsafe fn unmap(ptr: *mut u8, bytes: usize) {
    // SAFETY: per the contract, the range is one of our mappings and unused.
    unsafe { munmap(ptr as usize, bytes) };
    MAPPED.fetch_sub(bytes, Ordering::Relaxed);
}

/// Bytes of `base..base + len` in RAM (`base` page-aligned, the range mapped),
/// or None if the kernel will not say.
pub fn resident_bytes(base: usize, len: usize) -> Option<usize> {
    const STEP: usize = 512;
    let mut pages = [0u8; STEP];
    let mut resident = 0;
    let mut at = base;
    let end = base.checked_add(len)?;
    while at < end {
        let n = (end - at).div_ceil(PAGE).min(STEP);
        // SAFETY: mincore only writes one byte per page of the range into
        // `pages`, which has room for `n`.
        let (r, _) = errno::keep(|| unsafe {
            libc::mincore(at as *mut libc::c_void, n * PAGE, pages.as_mut_ptr())
        });
        if r != 0 {
            return None;
        }
        resident += pages[..n].iter().filter(|&&b| b & 1 != 0).count() * PAGE;
        at += n * PAGE;
    }
    Some(resident)
}

/// The most this process has had resident (getrusage), in bytes, or None if
/// the kernel will not say. One syscall, no page-table walk.
pub fn peak_rss() -> Option<usize> {
    // SAFETY: an all-zero rusage is a valid value of a plain C struct.
    let mut ru: libc::rusage = unsafe { core::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if errno::keep(|| unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }).0 != 0 {
        return None;
    }
    usize::try_from(ru.ru_maxrss).ok()?.checked_mul(1024)
}

/// Whether `populate` still asks the kernel (cleared when it refuses
/// `MADV_POPULATE_WRITE`: kernels before 5.14).
static POPULATE: AtomicBool = AtomicBool::new(true);

/// Faults in, writable, the pages holding `ptr..ptr + len` that are not yet
/// resident: one syscall instead of a page fault per page (2.4 against 3.2 us
/// a page on these machines). Only for bytes about to be written anyway: it
/// makes them resident now. A hint: false where the kernel refused (nothing
/// else happens).
///
/// # Safety
/// The range lies in one of our writable mappings.
pub unsafe fn populate(ptr: *mut u8, len: usize) -> bool {
    if len == 0 || !POPULATE.load(Ordering::Relaxed) {
        return false;
    }
    let start = ptr as usize & !(PAGE - 1);
    let end = (ptr as usize + len).next_multiple_of(PAGE);
    // SAFETY: per the contract the pages are ours and writable; populating
    // changes no byte of them.
    let err = unsafe { advise(start, end - start, libc::MADV_POPULATE_WRITE) };
    if err == libc::EINVAL {
        POPULATE.store(false, Ordering::Relaxed);
    }
    err == 0
}

/// Gives the pages of `ptr..ptr + len` (page-aligned) back to the OS, keeping
/// the mapping: they read as zero when next touched. True if they went; a
/// refusal (locked pages: the program called `mlockall`) leaves them
/// resident with their bytes. errno is left alone.
///
/// # Safety
/// The range lies in one of our writable private mappings and holds nothing
/// anyone will read again.
pub unsafe fn decommit(ptr: *mut u8, len: usize) -> bool {
    debug_assert!((ptr as usize).is_multiple_of(PAGE) && len.is_multiple_of(PAGE));
    // SAFETY: per the contract; MADV_DONTNEED on private anonymous memory
    // only drops its pages.
    unsafe { advise(ptr as usize, len, libc::MADV_DONTNEED) == 0 }
}

/// `madvise` as a hint: returns the error it met (0 if none) and leaves
/// errno as it was, since a hint's failure is not the program's business.
///
/// # Safety
/// As `madvise` with `advice` on `start..start + len` (page-aligned).
unsafe fn advise(start: usize, len: usize, advice: libc::c_int) -> libc::c_int {
    // SAFETY: per the contract.
    let (rc, err) =
        errno::keep(|| unsafe { libc::madvise(start as *mut libc::c_void, len, advice) });
    if rc == 0 {
        0
    } else {
        err
    }
}

/// `munmap`, errno kept (it fails only on a range that is not ours, which the
/// callers rule out).
///
/// # Safety
/// `start..start + len` is a range of our mappings that nothing uses.
unsafe fn munmap(start: usize, len: usize) {
    // SAFETY: per the contract.
    errno::keep(|| unsafe { libc::munmap(start as *mut libc::c_void, len) });
}

pub use crate::clock::now_ns;

/// Asks the CPU to bring the cache line at `p` in (a hint: no fault, even
/// for null or an unmapped address).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing architecturally and never faults.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_aligned_distinct_and_writable_across_regions() {
        let chunks: Vec<usize> = (0..REGION_CHUNKS + 4)
            .map(|_| map_chunk() as usize)
            .collect();
        for (i, &c) in chunks.iter().enumerate() {
            assert!(c != 0 && c % CHUNK == 0, "chunk {i} at {c:#x}");
            assert!(!chunks[..i].contains(&c), "chunk {i} handed out twice");
            // SAFETY: a fresh chunk of ours.
            unsafe {
                *(c as *mut u8) = 1;
                *((c + CHUNK - 1) as *mut u8) = 1;
            }
        }
        for &c in &chunks {
            // SAFETY: handed out above, no longer used; chunks go back one by one.
            unsafe { unmap(c as *mut u8, CHUNK) };
        }
    }

    #[test]
    fn a_refused_growth_in_place_makes_no_registry_page_writable() {
        use crate::registry::{CHUNK_SHIFT, TOUCHED};
        let touched =
            |page: usize| TOUCHED[page / 64].load(Ordering::Relaxed) & (1 << (page % 64)) != 0;
        let table_page = |addr: usize| (addr >> CHUNK_SHIFT) / 4096;
        let old = 4 * CHUNK;
        let p = map_aligned(old, CHUNK);
        assert!(!p.is_null());
        // A page of another mapping right after it: no growth in place.
        // SAFETY: a fresh anonymous page at a hint, NOREPLACE: nothing of
        // anyone's is replaced (EEXIST if taken, which serves as well).
        let guard = unsafe {
            libc::mmap(
                p.add(old).cast(),
                4096,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        // Up to 512 GiB past it, below the registry's 47 bits: up to 64 table
        // pages (8 GiB each), none of them needed by a mapping of this
        // process (no test maps above this one's).
        let below_top = ((1usize << 47) - (p as usize + old)) & !(CHUNK - 1);
        let new = old + below_top.min(1 << 39);
        let (first, last) = (
            table_page(p as usize + old) + 1,
            table_page(p as usize + new - 1),
        );
        // mmap's area starts 16 GiB or more below the top (the stack's gap
        // and its random offset): two table pages at least, one beyond the
        // mapping's own.
        assert!(last >= first, "mapped too near the top (ASLR off?): {p:?}");
        let before: Vec<bool> = (first..=last).map(touched).collect();
        // SAFETY: our mapping of `old` bytes, unused.
        assert!(!unsafe { grow_in_place(p, old, new) });
        let after: Vec<bool> = (first..=last).map(touched).collect();
        assert_eq!(
            before, after,
            "table pages made writable for a growth that was refused"
        );
        // SAFETY: both mappings made above, unused.
        unsafe {
            if guard != libc::MAP_FAILED {
                munmap(guard as usize, 4096);
            }
            unmap(p, old);
        }
    }

    /// Makes `region_prot` say "reserved" (while a test needs the
    /// `mprotect` path on a host where regions are writable).
    pub(super) static FORCE_RESERVED: AtomicBool = AtomicBool::new(false);

    /// Held by the tests that read what kind of region is current or force
    /// one: either would confuse the other.
    static REGION_KIND: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn regions_are_writable_only_where_that_charges_nothing() {
        let yes = || true;
        let no = || false;
        for mode in [Some(0), Some(1)] {
            assert!(writable_regions(mode, yes, no), "overcommit {mode:?}");
            assert!(!writable_regions(mode, no, no), "{mode:?}, RLIMIT_DATA");
            assert!(!writable_regions(mode, yes, yes), "{mode:?}, MCL_FUTURE");
        }
        for mode in [Some(2), Some(3), None] {
            let asked = core::cell::Cell::new(false);
            let ask = || {
                asked.set(true);
                true
            };
            assert!(!writable_regions(mode, ask, no), "overcommit {mode:?}");
            assert!(!asked.get(), "{mode:?}: RLIMIT_DATA asked for nothing");
        }
    }

    /// The protection (`rw-p`, `---p`, ...) of the mapping holding `addr`,
    /// from /proc/self/maps read into `buf`; None if it cannot be read or no
    /// mapping holds `addr`. Nothing allocated and nothing asserted, so it may
    /// run with the region lock held (this test binary's malloc is hakmem's:
    /// a panic's message there would wait for the lock).
    fn protection_at(addr: usize, buf: &mut [u8]) -> Option<[u8; 4]> {
        // SAFETY: open/read/close on a NUL-terminated path into `buf`,
        // within its length.
        let len = unsafe {
            let fd = libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                return None;
            }
            let mut len = 0;
            loop {
                let r = libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len);
                if r <= 0 {
                    break;
                }
                len += r as usize;
            }
            libc::close(fd);
            len
        };
        if len == buf.len() {
            return None;
        }
        buf[..len].split(|&b| b == b'\n').find_map(|line| {
            let text = core::str::from_utf8(line).ok()?;
            let mut fields = text.split_whitespace();
            let (lo, hi) = fields.next()?.split_once('-')?;
            let lo = usize::from_str_radix(lo, 16).ok()?;
            let hi = usize::from_str_radix(hi, 16).ok()?;
            let prot: [u8; 4] = fields.next()?.as_bytes().try_into().ok()?;
            (lo..hi).contains(&addr).then_some(prot)
        })
    }

    /// A region mapped writable is not changed as its chunks are handed out
    /// (no `mprotect`, which waits for and blocks the program's page faults
    /// in it): the chunk next in line after one just taken, which nobody has
    /// yet, is writable already. Where regions are reserved, it is not.
    #[test]
    fn the_chunks_of_a_writable_region_are_handed_out_as_they_are() {
        let _kind = REGION_KIND.lock().unwrap_or_else(|e| e.into_inner());
        drop_untaken_chunks();
        let writable = region_prot() == RW;
        let expected = if writable { *b"rw-p" } else { *b"---p" };
        let mut buf = vec![0u8; 4 << 20];
        let mut checked = false;
        // A chunk with another after it in its region (the last has none;
        // another test may take the next first): within a region's worth.
        for _ in 0..=REGION_CHUNKS {
            let chunk = map_chunk() as usize;
            assert_ne!(chunk, 0);
            // Under the lock the next chunk can be neither taken nor
            // unmapped by another test; nothing allocates until it is let go.
            let seen = {
                let region = REGION.lock();
                let next = match region.writable {
                    true if region.end == chunk => chunk - CHUNK,
                    false if region.start == chunk + CHUNK => chunk + CHUNK,
                    _ => 0,
                };
                (next != 0 && region.start != region.end)
                    .then(|| (region.writable, protection_at(next, &mut buf)))
            };
            assert_eq!(protection_at(chunk, &mut buf), Some(*b"rw-p"));
            // SAFETY: ours, handed out above, unused.
            unsafe { unmap(chunk as *mut u8, CHUNK) };
            if let Some((region_writable, next)) = seen {
                assert_eq!(region_writable, writable);
                assert_eq!(
                    next,
                    Some(expected),
                    "the region's next chunk, not handed out"
                );
                checked = true;
                break;
            }
        }
        assert!(checked, "no chunk had one after it in its region");
    }

    /// The probe finds no lock in the test process and finds
    /// `mlockall(MCL_FUTURE)` in a forked child (there: the lock would hold
    /// for the whole test process).
    #[test]
    fn mlockall_of_future_mappings_is_seen() {
        assert_eq!(probe_future_locked(), Some(false));
        // SAFETY: fork in a test process; the child makes only syscalls
        // (mlockall, the probe's mmap/mincore/munmap) and _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let code = if libc::mlockall(libc::MCL_FUTURE) != 0 {
                    2
                } else {
                    match probe_future_locked() {
                        Some(true) => 0,
                        Some(false) => 1,
                        None => 3,
                    }
                };
                libc::_exit(code);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status));
            match libc::WEXITSTATUS(status) {
                0 => {}
                1 => panic!("mlockall(MCL_FUTURE) was in force and the probe did not see it"),
                2 => panic!("mlockall(MCL_FUTURE) refused: needs CAP_IPC_LOCK or RLIMIT_MEMLOCK"),
                _ => panic!("the probe could not be mapped or asked under MCL_FUTURE"),
            }
        }
    }

    std::thread_local! {
        /// Set on the thread of `a_chunk_is_made_writable_without_the_region_lock`
        /// that stops in the window.
        static PAUSE_HERE: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
    }
    /// The chunk the stopped thread took, once it is there; whether to go on.
    static PAUSED_AT: AtomicUsize = AtomicUsize::new(0);
    static RESUME: AtomicBool = AtomicBool::new(false);

    /// Lets the stopped thread go on when the test ends, a failed one too.
    struct Resume;

    impl Drop for Resume {
        fn drop(&mut self) {
            RESUME.store(true, Ordering::Release);
        }
    }

    /// Called by `chunk_from_region` between taking a chunk and making it
    /// writable (in unit tests only: `test_hooks` would make `os` reach up
    /// to `hardening`, which reaches `os`).
    pub(super) fn chunk_taken(chunk: usize) {
        if !PAUSE_HERE.with(|p| p.get()) {
            return;
        }
        PAUSED_AT.store(chunk, Ordering::Release);
        while !RESUME.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// One thread stops after taking its chunk and before `mprotect` (where
    /// regions are reserved; on a writable region, after taking it); another
    /// maps a chunk meanwhile, which it could not if the region lock were
    /// held across the `mprotect` (as it was until the twenty-first session).
    /// The `mprotect` itself runs under `RLIMIT_DATA` (tests/limits.rs).
    #[test]
    fn a_chunk_is_made_writable_without_the_region_lock() {
        use std::sync::mpsc;
        use std::time::Duration;
        let _kind = REGION_KIND.lock().unwrap_or_else(|e| e.into_inner());
        // The path with an `mprotect`: a reserved region, so the rest of the
        // current one (writable on most hosts) goes back first.
        struct Unforce;
        impl Drop for Unforce {
            fn drop(&mut self) {
                FORCE_RESERVED.store(false, Ordering::Relaxed);
            }
        }
        FORCE_RESERVED.store(true, Ordering::Relaxed);
        let _unforce = Unforce;
        drop_untaken_chunks();
        let resume = Resume;
        let paused = std::thread::spawn(|| {
            PAUSE_HERE.with(|p| p.set(true));
            map_chunk() as usize
        });
        for _ in 0..20_000 {
            if PAUSED_AT.load(Ordering::Acquire) != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(
            PAUSED_AT.load(Ordering::Acquire),
            0,
            "no chunk came from the region"
        );
        let mut buf = vec![0u8; 4 << 20];
        assert_eq!(
            protection_at(PAUSED_AT.load(Ordering::Acquire), &mut buf),
            Some(*b"---p"),
            "the stopped thread's chunk is not waiting for its mprotect"
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(map_chunk() as usize).unwrap());
        let other = rx.recv_timeout(Duration::from_secs(20));
        drop(resume);
        let first = paused.join().unwrap();
        let other =
            other.expect("a chunk could not be mapped while another was being made writable");
        assert_eq!(first, PAUSED_AT.load(Ordering::Relaxed));
        for c in [first, other] {
            assert!(c != 0 && c % CHUNK == 0, "chunk at {c:#x}");
            // SAFETY: fresh chunks of ours, written once and given back.
            unsafe {
                *((c + CHUNK - 1) as *mut u8) = 1;
                unmap(c as *mut u8, CHUNK);
            }
        }
        assert_ne!(first, other);
    }

    #[test]
    fn resident_bytes_counts_the_touched_pages() {
        let len = 64 * PAGE;
        let p = map_aligned(len, PAGE);
        assert!(!p.is_null());
        assert_eq!(resident_bytes(p as usize, len), Some(0));
        // SAFETY: `p` is our fresh mapping of `len` bytes.
        unsafe {
            *p = 1;
            *p.add(10 * PAGE + 5) = 1;
            *p.add(len - 1) = 1;
        }
        assert_eq!(resident_bytes(p as usize, len), Some(3 * PAGE));
        // SAFETY: as above, no longer used.
        unsafe { unmap(p, len) };
        // Page 1 is below mmap_min_addr: never mapped. (An address just
        // unmapped could be mapped again at once by a test running beside.)
        assert_eq!(resident_bytes(PAGE, PAGE), None);
    }

    #[test]
    fn populate_makes_exactly_the_range_s_pages_resident_and_keeps_errno() {
        let len = 64 * PAGE;
        let p = map_aligned(len, PAGE);
        assert!(!p.is_null());
        // SAFETY: `p` is our fresh mapping of `len` bytes; the range is inside it.
        assert!(unsafe { populate(p.add(100), 10 * PAGE) });
        // Bytes 100..100 + 10 pages touch 11 pages.
        assert_eq!(resident_bytes(p as usize, len), Some(11 * PAGE));
        // SAFETY: as above, no longer used.
        unsafe { unmap(p, len) };
        // A range with a hole cannot be populated: the call fails (ENOMEM;
        // not EINVAL, which would turn populating off), and errno is the
        // program's again. (The tests beside this one map whole chunks,
        // which cannot fill a one-page hole.)
        let q = map_aligned(3 * PAGE, PAGE);
        assert!(!q.is_null());
        // SAFETY: `q` is our fresh three-page mapping; errno is this thread's.
        unsafe {
            libc::munmap(q.add(PAGE).cast(), PAGE);
            *libc::__errno_location() = 1234;
            assert!(!populate(q, 3 * PAGE));
            assert_eq!(*libc::__errno_location(), 1234);
            assert!(POPULATE.load(Ordering::Relaxed));
            libc::munmap(q.cast(), 3 * PAGE);
        }
    }

    #[test]
    fn both_ways_of_mapping_aligned_memory_give_aligned_writable_memory() {
        const ALIGN: usize = 2 << 20;
        for round in 0..4 {
            // The first call usually takes its first try; the second always trims.
            for p in [
                map_aligned(ALIGN, ALIGN),
                map_and_trim(ALIGN, ALIGN, RW, libc::MAP_NORESERVE),
            ] {
                assert!(!p.is_null());
                assert_eq!(p as usize % ALIGN, 0, "round {round}");
                // SAFETY: `p` is our fresh ALIGN-byte mapping.
                unsafe {
                    *p = 1;
                    *p.add(ALIGN - 1) = 1;
                    libc::munmap(p.cast(), ALIGN);
                }
            }
        }
    }
}
