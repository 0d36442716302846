//! Which 2 MiB chunks of the address space are hakmem segments, and of which kind.
//!
//! One byte per 2 MiB chunk of the 47-bit user address space: 0 for "not
//! ours", else the segment's `SegKind`. That is 64 MiB of virtual memory
//! (zero-filled .bss): only the pages covering chunks hakmem uses are ever
//! touched (one 4 KiB page covers 8 GiB of address space). `free` reads one
//! byte before it reads any header, so a foreign pointer is detected instead
//! of dereferenced, and the byte already says which path frees the block.
//!
//! Commit charge: a host with `vm.overcommit_memory=2` charges every
//! writable private mapping in full, touched or not, and the table is 64 MiB
//! of `.bss`. When the library is loaded (`protect_at_load`, and again at
//! initialisation) the table becomes read-only, which gives the charge back
//! (reads of its untouched pages still see zeros, and `mlockall` faults in
//! only the zero page for them), and the os layer makes the pages covering
//! each new mapping writable before handing it out (`prepare`: one page
//! covers 8 GiB, so a process makes a few writable in its life). Measured on
//! a C program that makes one malloc: 99 MiB charged before (this table, and
//! the region of 16 chunks `os` mapped ahead), 2.3 MiB after
//! (`docs/hardening.md`).

use crate::sync::SpinLock;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

pub const CHUNK_SHIFT: u32 = 21;
pub const CHUNK: usize = 1 << CHUNK_SHIFT;
const ADDR_BITS: u32 = 47;
pub const ENTRIES: usize = 1 << (ADDR_BITS - CHUNK_SHIFT);

// The table, in the zero-filled `.bss`: its address is a link-time constant,
// so a lookup is one load (no pointer to fetch and test first). Defined in
// assembly because a Rust array initialiser of 64 Mi elements costs the
// compiler about 15 s; global and hidden, as `tls` explains for its block.
// The table covers x86_64's 47-bit user address space (4-level paging; with
// 5-level paging Linux maps above it only when asked). Other targets have
// other layouts (aarch64's 48 or 52 bits, other page sizes) that nobody has
// measured or tested here: refuse to build rather than guess.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!(
    "hakmem supports x86_64 Linux only: its chunk registry covers the 47-bit x86_64 user \
     address space and its TLS layout assumes the x86_64 ELF TLS ABI"
);

#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .bss.hakmem_registry,\"aw\",@nobits",
    ".globl hakmem_registry",
    ".hidden hakmem_registry",
    ".type hakmem_registry,@object",
    ".p2align 12",
    "hakmem_registry:",
    ".zero {size}",
    ".size hakmem_registry, {size}",
    ".popsection",
    size = const ENTRIES,
);

/// The table's address, for hakctl's reading of the levels (`front::levels`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn table() -> *const AtomicU8 {
    let p: *const AtomicU8;
    // SAFETY: computes the address of the table above (no memory access); the
    // address never changes, hence `pure, nomem`.
    unsafe {
        core::arch::asm!(
            "lea {p}, [rip + hakmem_registry]",
            p = out(reg) p,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    p
}

#[inline(always)]
fn entry(addr: usize) -> Option<&'static AtomicU8> {
    let idx = addr >> CHUNK_SHIFT;
    if idx >= ENTRIES {
        return None;
    }
    // SAFETY: idx < ENTRIES, checked above; the table is ENTRIES bytes of
    // zero-initialised static memory, a valid array of AtomicU8.
    Some(unsafe { &*table().add(idx) })
}

/// Whether `start..start + len` lies in the address space the table covers.
pub fn covers(start: usize, len: usize) -> bool {
    start
        .checked_add(len)
        .is_some_and(|end| end <= 1 << ADDR_BITS)
}

/// The kind (`SegKind as u8`) of the live hakmem segment holding `addr`, or 0.
#[inline(always)]
pub fn kind(addr: usize) -> u8 {
    match entry(addr) {
        Some(e) => e.load(Ordering::Relaxed),
        None => 0,
    }
}

const PAGE: usize = 4096;
const TABLE_PAGES: usize = ENTRIES / PAGE;
pub const TOUCHED_WORDS: usize = TABLE_PAGES / 64;

/// Which pages of the table were ever prepared (so may hold entries): what
/// hakctl reads first, to read only those pages of the 64 MiB table.
#[allow(clippy::declare_interior_mutable_const)]
const UNTOUCHED: AtomicU64 = AtomicU64::new(0);
pub static TOUCHED: [AtomicU64; TOUCHED_WORDS] = [UNTOUCHED; TOUCHED_WORDS];

/// Which pages of the table are writable (all are until `protect`); under
/// the same lock as `PROTECTED` changes, so that a page `prepare` marks is
/// never made read-only by a `protect` running beside it.
struct Pages {
    writable: [u64; TABLE_PAGES / 64],
}

static PAGES: SpinLock<Pages> = SpinLock::new(Pages {
    writable: [0; TABLE_PAGES / 64],
});

/// `protect` has run. Set under `PAGES`'s lock; read without it where only
/// "done" matters (`protect`'s early return).
static PROTECTED: AtomicBool = AtomicBool::new(false);

impl Pages {
    fn is_writable(&self, page: usize) -> bool {
        self.writable[page / 64] & (1 << (page % 64)) != 0
    }
}

/// `mprotect` of `pages` pages of the table from `first`; errno kept.
fn protect_pages(first: usize, pages: usize, prot: libc::c_int) -> bool {
    // SAFETY: the range lies in the table, a page-aligned static of whole
    // pages that holds nothing else; its bytes stay as they are.
    let (r, _) = crate::errno::keep(|| unsafe {
        libc::mprotect(
            table().add(first * PAGE) as *mut libc::c_void,
            pages * PAGE,
            prot,
        )
    });
    r == 0
}

/// Makes the table read-only but for the pages some mapping already needed
/// (see the module doc). At load, at initialisation and before
/// `mlockall(MCL_CURRENT)`, once; a failure leaves it writable.
pub fn protect() {
    // Once done, no lock: `mlockall` calls this, and a lock taken there
    // would wait forever for a `prepare` its own thread was interrupted in.
    if PROTECTED.load(Ordering::Acquire) {
        return;
    }
    let mut pages = PAGES.lock();
    if PROTECTED.load(Ordering::Relaxed) {
        return;
    }
    let mut page = 0;
    while page < TABLE_PAGES {
        if pages.is_writable(page) {
            page += 1;
            continue;
        }
        let run = (page..TABLE_PAGES)
            .find(|&p| pages.is_writable(p))
            .unwrap_or(TABLE_PAGES)
            - page;
        if !protect_pages(page, run, libc::PROT_READ) {
            // Leave the rest writable, and say so.
            for p in page..TABLE_PAGES {
                pages.writable[p / 64] |= 1 << (p % 64);
            }
            break;
        }
        page += run;
    }
    PROTECTED.store(true, Ordering::Release);
}

/// The table goes read-only when the library is loaded, before the program's
/// `main`: a program that calls `mlockall(MCL_CURRENT)` before its first
/// allocation (a real-time program locking itself in at start) locked all
/// 64 MiB of the writable `.bss` table resident (71 MB resident against
/// glibc's 2.4, `tests/limits/mlock.c first`); read-only, its untouched pages
/// read as the zero page and cost nothing. Initialisation (`lifecycle`)
/// protects it as well, for an allocation made before the loader runs
/// constructors; `protect` does it once (errno kept: `protect_pages`).
extern "C" fn protect_at_load() {
    protect();
}

#[used]
#[link_section = ".init_array"]
static PROTECT_AT_LOAD: extern "C" fn() = protect_at_load;

/// Makes the table's entries for `start..start + len` writable, before a
/// mapping there is handed out; false if the OS refused (the caller gives the
/// mapping back: it could not be registered).
pub fn prepare(start: usize, len: usize) -> bool {
    if len == 0 || !covers(start, len) {
        return len == 0;
    }
    let first = (start >> CHUNK_SHIFT) / PAGE;
    let last = ((start + len - 1) >> CHUNK_SHIFT) / PAGE;
    let mut pages = PAGES.lock();
    for page in first..=last {
        TOUCHED[page / 64].fetch_or(1 << (page % 64), Ordering::Relaxed);
        if pages.is_writable(page) {
            continue;
        }
        if PROTECTED.load(Ordering::Relaxed)
            && !protect_pages(page, 1, libc::PROT_READ | libc::PROT_WRITE)
        {
            return false;
        }
        pages.writable[page / 64] |= 1 << (page % 64);
    }
    true
}

pub fn lock_for_fork() {
    PAGES.acquire_for_fork();
}

pub fn unlock_after_fork() {
    PAGES.release_after_fork();
}

/// Records the chunk at `chunk` as a segment of `kind` (non-zero), after its header is written.
pub fn insert(chunk: usize, kind: u8) {
    debug_assert!(kind != 0);
    if let Some(e) = entry(chunk) {
        e.store(kind, Ordering::Release);
    }
}

/// Forgets the chunk at `chunk`, before it is unmapped.
pub fn remove(chunk: usize) {
    if let Some(e) = entry(chunk) {
        e.store(0, Ordering::Release);
    }
}
