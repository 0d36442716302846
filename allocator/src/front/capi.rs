//! The C allocation API, exported unprefixed for LD_PRELOAD (feature `c-abi`):
//! every entry point glibc exports to callers, with glibc's results and errno
//! (glibc 2.36, the oracle of `tests/conformance.rs`), including the
//! `__libc_*` names a program or library may call to reach "the C library's
//! malloc" directly, so that their blocks and ours are one heap.

use crate::api::{self, HeapFigures};
use crate::stats::StackBuf;
use core::ffi::{c_int, c_void};
use core::fmt::Write;

const PAGE: usize = 4096;
/// glibc's smallest chunk: what `pvalloc` keeps free of `usize::MAX`.
const MINSIZE: usize = 32;

use crate::errno::set as set_errno;

#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // SAFETY: C contract.
    unsafe { api::malloc(size).cast() }
}

#[no_mangle]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    // SAFETY: C contract: ptr is null or ours.
    unsafe { api::free(ptr.cast()) }
}

#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: C contract.
    unsafe { api::calloc(n, size).cast() }
}

#[no_mangle]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: C contract: ptr is null or ours.
    unsafe { api::realloc(ptr.cast(), size).cast() }
}

#[no_mangle]
pub unsafe extern "C" fn reallocarray(ptr: *mut c_void, n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    // SAFETY: C contract: ptr is null or ours.
    unsafe { api::realloc(ptr.cast(), total).cast() }
}

/// glibc's `memalign` rules, shared by `memalign`, `aligned_alloc` (an alias
/// of it in glibc 2.36), `valloc` and `pvalloc`: an alignment above half the
/// address space is EINVAL; any other is rounded up to a power of two.
unsafe fn memalign_rounded(align: usize, size: usize) -> *mut c_void {
    if align > usize::MAX / 2 + 1 {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    let align = align.max(1).next_power_of_two();
    // SAFETY: C contract.
    unsafe { api::alloc_aligned(align, size).cast() }
}

#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    // SAFETY: C contract.
    let p = unsafe { api::alloc_aligned(align, size) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a writable out-pointer.
    unsafe { *out = p.cast() };
    0
}

#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: C contract.
    unsafe { memalign_rounded(align, size) }
}

#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: C contract.
    unsafe { memalign_rounded(align, size) }
}

#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: C contract.
    unsafe { memalign_rounded(PAGE, size) }
}

#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    if size > usize::MAX - 2 * PAGE - MINSIZE {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    }
    // SAFETY: C contract.
    unsafe { memalign_rounded(PAGE, (size + PAGE - 1) & !(PAGE - 1)) }
}

#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    api::usable_size(ptr.cast())
}

/// glibc's `malloc_trim`: 1 if memory went back to the OS, else 0. `pad` (what
/// to leave at the top of glibc's heap) has no meaning here.
#[no_mangle]
pub extern "C" fn malloc_trim(_pad: usize) -> i32 {
    i32::from(api::trim())
}

/// The `__libc_*` names: glibc exports its allocator under them too, and
/// programs and libraries (a debugging wrapper, a language runtime) call them
/// to reach the C library's malloc whatever `malloc` resolves to. Served by
/// hakmem, so that a block from one set of names may be freed by the other.
macro_rules! libc_aliases {
    ($($alias:ident => $target:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $alias($($arg: $ty),*) -> $ret {
            // SAFETY: the same contract as the function it names.
            unsafe { $target($($arg),*) }
        }
    )*};
}

libc_aliases! {
    __libc_malloc => malloc(size: usize) -> *mut c_void;
    __libc_free => free(ptr: *mut c_void) -> ();
    cfree => free(ptr: *mut c_void) -> ();
    __libc_calloc => calloc(n: usize, size: usize) -> *mut c_void;
    __libc_realloc => realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    __libc_memalign => memalign(align: usize, size: usize) -> *mut c_void;
    __libc_valloc => valloc(size: usize) -> *mut c_void;
    __libc_pvalloc => pvalloc(size: usize) -> *mut c_void;
}

/// glibc's `struct mallinfo2`.
#[repr(C)]
pub struct Mallinfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

/// glibc's `struct mallinfo` (the same fields as `int`, which wrap past 2 GiB
/// as glibc's do).
#[repr(C)]
pub struct Mallinfo {
    fields: [c_int; 10],
}

fn mallinfo_of(f: &HeapFigures) -> Mallinfo2 {
    Mallinfo2 {
        arena: f.arena,
        // One "free chunk" when anything is held free, as a trimmed glibc
        // heap reports its top chunk.
        ordblks: usize::from(f.free > 0),
        smblks: 0,
        hblks: f.large_blocks,
        hblkhd: f.large_bytes,
        usmblks: 0,
        fsmblks: 0,
        uordblks: f.in_use(),
        fordblks: f.free,
        keepcost: 0,
    }
}

#[no_mangle]
pub extern "C" fn mallinfo2() -> Mallinfo2 {
    mallinfo_of(&api::heap_figures())
}

#[no_mangle]
pub extern "C" fn mallinfo() -> Mallinfo {
    let m = mallinfo2();
    let all = [
        m.arena, m.ordblks, m.smblks, m.hblks, m.hblkhd, m.usmblks, m.fsmblks, m.uordblks,
        m.fordblks, m.keepcost,
    ];
    Mallinfo {
        fields: all.map(|v| v as c_int),
    }
}

/// `mlockall`, interposed: before `MCL_CURRENT` locks every mapping (and,
/// without `MCL_ONFAULT`, faults in every writable page), the current
/// region's untaken chunks are given back
/// (`os::drop_untaken_chunks`), so what is locked is what the program's
/// blocks use: a program that locks itself in after its first allocation
/// (most real-time programs) had 36.5 MB resident after it against glibc's
/// 2.4 MB (`tests/limits.rs`). Chunks taken later come from a new region,
/// locked only under `MCL_FUTURE` (and then reserved: `os::region_prot`),
/// as glibc's later mappings are. The registry table is made read-only
/// first too, should a library constructor lock before hakmem's
/// (`registry::protect_at_load`). Then the system call itself, with its
/// return value and errno. A program that makes the system call directly is
/// not seen: `HAKMEM_RESERVE_REGIONS=1` is for it.
#[no_mangle]
pub extern "C" fn mlockall(flags: c_int) -> c_int {
    if flags & libc::MCL_CURRENT != 0 {
        crate::registry::protect();
        crate::os::drop_untaken_chunks();
    }
    // SAFETY: the mlockall system call takes one integer.
    unsafe { libc::syscall(libc::SYS_mlockall, libc::c_long::from(flags)) as c_int }
}

// glibc's mallopt parameter for the fastbins' largest size, the one whose
// value glibc 2.36 checks (`80 * sizeof(size_t) / 4` at most).
const M_MXFAST: c_int = 1;
const MAX_FAST_SIZE: c_int = 160;

/// `mallopt`: every parameter is accepted and ignored (hakmem has no
/// fastbins, arenas or mmap threshold; its knobs are environment variables),
/// with glibc 2.36's return value: 0 for an `M_MXFAST` outside 0..=160, 1
/// for anything else, unknown parameters and out-of-range thresholds
/// included (measured: glibc checks nothing else).
#[no_mangle]
pub extern "C" fn mallopt(param: c_int, value: c_int) -> c_int {
    c_int::from(param != M_MXFAST || (0..=MAX_FAST_SIZE).contains(&value))
}

/// `malloc_stats`: glibc's report on stderr, with hakmem's figures (one
/// "arena": hakmem's heap is one, shared by every thread).
#[no_mangle]
pub extern "C" fn malloc_stats() {
    let f = api::heap_figures();
    let mut out = StackBuf::<512>::new();
    let system = f.arena;
    let in_use = f.in_use();
    let _ = write!(
        out,
        "Arena 0:\nsystem bytes     = {system:10}\nin use bytes     = {in_use:10}\n\
         Total (incl. mmap):\nsystem bytes     = {:10}\nin use bytes     = {:10}\n\
         max mmap regions = {:10}\nmax mmap bytes   = {:10}\n",
        system + f.large_bytes,
        in_use + f.large_bytes,
        f.large_blocks,
        f.large_bytes,
    );
    crate::stats::write_fd(2, out.as_bytes());
}

/// `malloc_info`: glibc's XML shape (`<malloc version="1">`, one heap, the
/// totals) with hakmem's figures. Any `options` but 0 returns EINVAL (the
/// value, errno untouched, nothing written: glibc 2.36's behaviour, not its
/// man page's).
///
/// # Safety
/// `fp` is an open `FILE *`.
#[no_mangle]
pub unsafe extern "C" fn malloc_info(options: c_int, fp: *mut libc::FILE) -> c_int {
    if options != 0 {
        return libc::EINVAL;
    }
    let f = api::heap_figures();
    let mut xml = StackBuf::<2048>::new();
    let _ = write_malloc_info(&mut xml, &f);
    // SAFETY: `xml` holds that many bytes; the caller's stream is open. No
    // allocator lock is held, so stdio may allocate its buffer through us.
    let written =
        unsafe { libc::fwrite(xml.as_bytes().as_ptr().cast(), 1, xml.as_bytes().len(), fp) };
    if written == xml.as_bytes().len() {
        0
    } else {
        -1
    }
}

fn write_malloc_info(out: &mut impl Write, f: &HeapFigures) -> core::fmt::Result {
    let totals = |out: &mut dyn Write, mmap: bool| -> core::fmt::Result {
        writeln!(out, "<total type=\"fast\" count=\"0\" size=\"0\"/>")?;
        writeln!(
            out,
            "<total type=\"rest\" count=\"{}\" size=\"{}\"/>",
            usize::from(f.free > 0),
            f.free
        )?;
        if mmap {
            writeln!(
                out,
                "<total type=\"mmap\" count=\"{}\" size=\"{}\"/>",
                f.large_blocks, f.large_bytes
            )?;
        }
        let system = f.arena + if mmap { f.large_bytes } else { 0 };
        writeln!(out, "<system type=\"current\" size=\"{system}\"/>")?;
        writeln!(out, "<system type=\"max\" size=\"{system}\"/>")?;
        writeln!(out, "<aspace type=\"total\" size=\"{system}\"/>")?;
        writeln!(out, "<aspace type=\"mprotect\" size=\"{system}\"/>")
    };
    writeln!(out, "<malloc version=\"1\">")?;
    writeln!(out, "<heap nr=\"0\">")?;
    writeln!(out, "<sizes>")?;
    writeln!(out, "</sizes>")?;
    totals(out, false)?;
    writeln!(out, "</heap>")?;
    totals(out, true)?;
    writeln!(out, "</malloc>")
}
