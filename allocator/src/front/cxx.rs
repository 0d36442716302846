//! The C++ allocation operators (`operator new`, `new[]`, `delete`,
//! `delete[]`: plain, nothrow, sized and aligned), exported with their
//! Itanium names for LD_PRELOAD (feature `c-abi`, x86_64), as tcmalloc,
//! jemalloc and mimalloc export them.
//!
//! Why: without them a C++ program's `new` runs libstdc++'s operator, which
//! loops around `malloc` through the PLT; every `new` and `delete` pays that
//! wrapper and a second indirect jump. mimalloc-bench's alloc-test (one
//! thread, callgrind): 14.74G instructions before, 14.29G with them (3.1%
//! fewer; 14.04G without the stubs' test of `MODE`, which a program that
//! replaces operators needs).
//!
//! **Failure keeps C++'s contract** (the new-handler loop, then
//! `std::bad_alloc`; null from the nothrow forms) without a line of it here:
//! hakmem cannot throw (Rust, built with `panic = "abort"`, may not be
//! unwound through). Each `new` is a naked stub that calls hakmem; when that
//! returns null (no memory, or an alignment that is not a power of two) the
//! stub jumps, its own frame gone, to the same operator of the C++ runtime
//! (libstdc++ or libc++): that one runs its new-handler loop around `malloc`
//! or `aligned_alloc`, which are hakmem's when it is preloaded, and throws.
//! An exception never crosses a Rust frame.
//!
//! **A program that replaces some operators** (C++ lets it replace any of
//! them, and most replace only `new` and `delete`) keeps its own for every
//! form: if any of the names resolves outside this library, each of ours
//! forwards to the C++ runtime's, which calls the program's, as without
//! hakmem (`serves`). Otherwise a sized delete of the program's block would
//! reach hakmem's `free`.
//!
//! The deletes are naked stubs too: every form is `free` (libstdc++'s are
//! too); a sized delete's size is not checked.
//! `tests/conformance.rs` runs `conformance/contract.cc`, a program that
//! replaces two operators, a C program that loads C++ privately, and a
//! position-dependent one that takes `free`'s address, with and without the
//! preload, and compares (docs/hardening.md, "The C++ operators").

use crate::api;
use crate::config;
use crate::stats::{write_fd, StackBuf};
use core::ffi::{c_char, c_void};
use core::fmt::Write;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// The operators' names: the eight `new`s in the order of the stubs' index
/// (plain, array, their nothrow forms, then the same four aligned: index +
/// 4), then the twelve deletes.
const NAMES: [&[u8]; 20] = [
    b"_Znwm\0",
    b"_Znam\0",
    b"_ZnwmRKSt9nothrow_t\0",
    b"_ZnamRKSt9nothrow_t\0",
    b"_ZnwmSt11align_val_t\0",
    b"_ZnamSt11align_val_t\0",
    b"_ZnwmSt11align_val_tRKSt9nothrow_t\0",
    b"_ZnamSt11align_val_tRKSt9nothrow_t\0",
    b"_ZdlPv\0",
    b"_ZdaPv\0",
    b"_ZdlPvm\0",
    b"_ZdaPvm\0",
    b"_ZdlPvRKSt9nothrow_t\0",
    b"_ZdaPvRKSt9nothrow_t\0",
    b"_ZdlPvSt11align_val_t\0",
    b"_ZdaPvSt11align_val_t\0",
    b"_ZdlPvmSt11align_val_t\0",
    b"_ZdaPvmSt11align_val_t\0",
    b"_ZdlPvSt11align_val_tRKSt9nothrow_t\0",
    b"_ZdaPvSt11align_val_tRKSt9nothrow_t\0",
];
/// The C++ runtime's operator of each name, once looked up (0: not yet).
static RUNTIME_OPERATOR: [AtomicUsize; 20] = [const { AtomicUsize::new(0) }; 20];
/// Where the C++ runtime may be loaded privately (`RTLD_LOCAL`, by a C
/// program's plugin), out of `RTLD_NEXT`'s and `RTLD_DEFAULT`'s sight.
const RUNTIMES: [&[u8]; 2] = [b"libstdc++.so.6\0", b"libc++.so.1\0"];

const NOT_DECIDED: u8 = 0;
const SERVE: u8 = 1;
const FORWARD: u8 = 2;
/// Whether hakmem serves the operators or forwards each to the C++ runtime
/// (the program replaces some): decided at load time when a C++ runtime is
/// loaded then (`decide_at_load`), else at the first operator call.
static MODE: AtomicU8 = AtomicU8::new(NOT_DECIDED);

/// Whether hakmem serves the operators itself: true unless the program (or
/// a library loaded before hakmem) defines one of them. (The stubs test
/// `MODE` themselves, one compare and a branch; this is for their slow
/// paths.)
fn serves() -> bool {
    match MODE.load(Ordering::Relaxed) {
        NOT_DECIDED => decide(),
        mode => mode == SERVE,
    }
}

/// The stubs' call when `MODE` is not decided yet.
extern "C" fn cxx_decide() {
    serves();
}

/// Names that, defined before hakmem, mean the program's allocations are
/// not hakmem's to serve even though the operators are: a tool that
/// replaces only `malloc` and `free` (memusage, a heap profiler) sees
/// libstdc++'s `new` call its `malloc`, and must see it with hakmem too.
const C_NAMES: [&[u8]; 2] = [b"malloc\0", b"free\0"];

/// Looks up every name where the program's own lookups start: one that
/// resolves outside this library means the program (or a library before
/// hakmem) replaced it. Outside every lock of hakmem's (`dlsym` may call
/// `malloc`); two threads deciding at once reach the same answer. With
/// `HAKMEM_STATS=1` (and no stats file) it says on stderr what it decided:
/// `hakmem-cxx: serve`, or `hakmem-cxx: forward (NAME is defined before
/// hakmem)`.
#[cold]
#[inline(never)]
fn decide() -> bool {
    let replaced = NAMES.iter().chain(C_NAMES.iter()).find(|name| {
        // SAFETY: `name` is NUL-terminated; RTLD_DEFAULT is dlsym's constant.
        let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr().cast::<c_char>()) };
        !found.is_null() && !is_ours(found) && is_definition(found)
    });
    let mode = if replaced.is_some() { FORWARD } else { SERVE };
    MODE.store(mode, Ordering::Relaxed);
    // `get`, not `stats_enabled`: this may run before any allocation has
    // read the configuration (at load time).
    let c = config::get();
    if c.stats && c.stats_file.is_none() {
        let mut msg = StackBuf::<160>::new();
        let _ = match replaced {
            None => writeln!(msg, "hakmem-cxx: serve"),
            Some(name) => writeln!(
                msg,
                "hakmem-cxx: forward ({} is defined before hakmem)",
                text(name)
            ),
        };
        write_fd(2, msg.as_bytes());
    }
    mode == SERVE
}

/// A NUL-terminated name without its NUL.
fn text(name: &[u8]) -> &str {
    core::str::from_utf8(&name[..name.len() - 1]).unwrap_or("?")
}

/// Decides at load time when a C++ runtime is loaded already (the usual
/// case for a C++ program), so that the lookups do not run later from an
/// operator called with one of the loader's locks held (inside a
/// `dl_iterate_phdr` callback, say, while another thread's `dlopen` waits
/// for it). Otherwise the first operator call decides. Whether a runtime is
/// loaded is read off the loader's list: a `dlopen` that fails would
/// allocate its message and leave it for the program's `dlerror`.
extern "C" fn decide_at_load() {
    // SAFETY: the callback reads only the entries dl_iterate_phdr hands it.
    let cxx = unsafe { libc::dl_iterate_phdr(Some(is_cxx_runtime), core::ptr::null_mut()) };
    if cxx != 0 && MODE.load(Ordering::Relaxed) == NOT_DECIDED && !decide() {
        // Forwarding: every call goes to the runtime; look its operators up
        // now too.
        for index in 0..NAMES.len() {
            runtime_operator(index);
        }
    }
}

/// `dl_iterate_phdr`'s callback: 1 (stop) for a loaded libstdc++ or libc++.
unsafe extern "C" fn is_cxx_runtime(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    _data: *mut c_void,
) -> core::ffi::c_int {
    // SAFETY: the loader hands a valid entry whose name is null or a
    // NUL-terminated path.
    let name = unsafe { (*info).dlpi_name };
    if name.is_null() {
        return 0;
    }
    // SAFETY: as above.
    let path = unsafe { core::ffi::CStr::from_ptr(name) }.to_bytes();
    let file = path.rsplit(|&c| c == b'/').next().unwrap_or(path);
    // The soname (`libstdc++.so.6`, as the loader names a needed library)
    // or the file's own name (`libstdc++.so.6.0.30`, loaded by path).
    RUNTIMES
        .iter()
        .any(|lib| file.starts_with(&lib[..lib.len() - 1]))
        .into()
}

#[used]
#[link_section = ".init_array"]
static DECIDE_AT_LOAD: extern "C" fn() = decide_at_load;

/// A handle to the library `name` (a soname or the loader's file name) if
/// the process has it loaded (globally or privately), else null. The
/// reference `dlopen` takes is kept: the library stays loaded
/// (`RTLD_NODELETE`), as an operator found in it must.
///
/// # Safety
/// `name` is a NUL-terminated string.
unsafe fn loaded(name: *const c_char) -> *mut c_void {
    // SAFETY: RTLD_NOLOAD loads nothing: a handle to a library already in
    // the process, or null; `name` is NUL-terminated per the contract.
    unsafe {
        libc::dlopen(
            name,
            libc::RTLD_LAZY | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
        )
    }
}

/// Whether `addr` lies in this library (by the base `dladdr` finds; an
/// exported function's address would be read through the GOT, which names
/// whoever defines it first).
fn is_ours(addr: *mut c_void) -> bool {
    base_of(addr).0 == base_of(decide as *const () as *mut c_void).0
}

/// Whether `addr`, which a lookup returned for a name, is a definition of
/// it. A position-dependent executable that takes a function's address in
/// its code (`(void *)free`) gets a "canonical" PLT entry for it: the
/// executable's symbol stays undefined but carries the entry's address, and
/// `dlsym(RTLD_DEFAULT)` returns that. Taken for a definition, it made hakmem
/// forward in such programs, and a jump to it comes back to hakmem's own
/// operator. `dladdr1` names the symbol; an undefined one is no definition.
fn is_definition(addr: *mut c_void) -> bool {
    /// glibc's `RTLD_DL_SYMENT`: `dladdr1` returns the ELF symbol.
    const RTLD_DL_SYMENT: core::ffi::c_int = 1;
    /// ELF's section index of an undefined symbol.
    const SHN_UNDEF: u16 = 0;
    let mut sym: *const libc::Elf64_Sym = core::ptr::null();
    // SAFETY: dladdr1 only reads the loader's tables; `info` and `sym` are
    // ours to fill; with RTLD_DL_SYMENT it stores a symbol pointer in `sym`.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        let found = libc::dladdr1(
            addr,
            &mut info,
            (&mut sym as *mut *const libc::Elf64_Sym).cast(),
            RTLD_DL_SYMENT,
        );
        // Unknown (no object, or no symbol): take it as a definition.
        found == 0 || sym.is_null() || (*sym).st_shndx != SHN_UNDEF
    }
}

/// The base and file name of the object `addr` lies in (0 and null if none).
fn base_of(addr: *mut c_void) -> (usize, *const c_char) {
    // SAFETY: dladdr only reads the loader's tables; `info` is ours to fill.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(addr, &mut info) == 0 {
            return (0, core::ptr::null());
        }
        (info.dli_fbase as usize, info.dli_fname)
    }
}

/// The C++ runtime's operator `NAMES[index]`: the next definition after
/// hakmem's, else one in libstdc++ or libc++ wherever they are loaded
/// (privately, by a C program's plugin, too), else the first definition
/// that is not ours; 0 if there is none. Looked up once per operator; the
/// library it lies in is kept loaded (`RTLD_NODELETE`). The first
/// definition comes last: it may be a wrapper loaded before hakmem that
/// forwards to the next definition, hakmem's, and back again.
fn runtime_operator(index: usize) -> usize {
    let slot = &RUNTIME_OPERATOR[index];
    let cached = slot.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    let name = NAMES[index].as_ptr().cast::<c_char>();
    let usable = |f: *mut c_void| !f.is_null() && !is_ours(f) && is_definition(f);
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT is dlsym's constant.
    let mut found = unsafe { libc::dlsym(libc::RTLD_NEXT, name) };
    for lib in RUNTIMES {
        if usable(found) {
            break;
        }
        // SAFETY: RUNTIMES' names are NUL-terminated.
        let handle = unsafe { loaded(lib.as_ptr().cast::<c_char>()) };
        if !handle.is_null() {
            // SAFETY: a live handle and a NUL-terminated name.
            found = unsafe { libc::dlsym(handle, name) };
        }
    }
    if !usable(found) {
        // SAFETY: as above.
        found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name) };
    }
    if !usable(found) {
        return 0;
    }
    // Keep its library loaded while the address is cached.
    let (_, file) = base_of(found);
    if !file.is_null() {
        // SAFETY: `file` is the loader's NUL-terminated name of a loaded
        // object.
        unsafe { loaded(file) };
    }
    slot.store(found as usize, Ordering::Release);
    found as usize
}

/// `operator new(size)` and the nothrow form's first try: hakmem's `malloc`.
extern "C" fn cxx_try_new(size: usize) -> *mut u8 {
    // SAFETY: malloc has no precondition.
    unsafe { api::malloc(size) }
}

/// The aligned forms' first try. An alignment that is not a power of two is
/// left to the runtime's operator (libstdc++ throws `bad_alloc`).
extern "C" fn cxx_try_new_aligned(size: usize, align: usize) -> *mut u8 {
    if !align.is_power_of_two() {
        return core::ptr::null_mut();
    }
    // SAFETY: `align` is a power of two, as `alloc_aligned` requires.
    unsafe { api::alloc_aligned(align, size) }
}

/// Where a `new` that got no block from hakmem goes: the C++ runtime's
/// operator `NAMES[index]` (called with the stub's `size` and `align`), or
/// for an aligned form whose size cannot be rounded up to its alignment,
/// the plain form of the same kind (`index - 4`).
///
/// (A nothrow form redirected so gets the alignment where its `nothrow_t&`
/// would be: libstdc++ and libc++ never read the tag.)
///
/// Why the latter: libstdc++ 12's aligned `new` rounds the size up to the
/// alignment without checking, so `new(SIZE_MAX, align_val_t(64))` wraps to
/// 0 and returns a zero-byte block instead of throwing (the oracle run of
/// `conformance/contract.cc` shows it). No block can serve such a size; the
/// plain form runs the same new-handler loop around `malloc` and throws, or
/// returns null from a nothrow form, as C++ requires.
///
/// Aborts, naming the operator, if no C++ runtime is loaded: hakmem cannot
/// throw `bad_alloc` itself, and null would break `new`'s contract.
extern "C" fn cxx_next_new(index: usize, size: usize, align: usize) -> usize {
    let index = if index >= 4 && align.is_power_of_two() && size > usize::MAX - (align - 1) {
        index - 4
    } else {
        index
    };
    match runtime_operator(index) {
        0 => no_cxx_runtime(
            NAMES[index],
            "out of memory, and no C++ runtime is loaded to throw std::bad_alloc",
        ),
        f => f,
    }
}

#[cold]
#[inline(never)]
fn no_cxx_runtime(name: &[u8], what: &str) -> ! {
    let mut msg = StackBuf::<200>::new();
    let _ = writeln!(msg, "hakmem: {}: {what}", text(name));
    write_fd(2, msg.as_bytes());
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

/// Defines a `new` as a naked stub. While hakmem serves (`MODE`): the
/// argument registers (size, alignment, the nothrow tag) saved, hakmem's try
/// called; a block returned, or the registers restored and a jump to the
/// runtime's operator (`cxx_next_new`). While it forwards: that jump at
/// once. Not decided: `cxx_decide`, then from the top. The CFI offsets are
/// absolute (the canonical frame is 8 bytes above the stack pointer at
/// entry, 32 after the three pushes).
macro_rules! operator_new {
    ($($name:ident = $sym:literal, $index:literal, $try:ident;)*) => {$(
        #[doc = concat!("`", $sym, "`: see the module's comment.")]
        #[unsafe(naked)]
        #[export_name = $sym]
        pub unsafe extern "C" fn $name() {
            core::arch::naked_asm!(
                ".cfi_startproc",
                "1:",
                "cmp byte ptr [rip + {mode}], {serve}",
                // Three pushes (they leave the flags alone): the stack is
                // 16-byte aligned at the calls.
                "push rdi",
                ".cfi_def_cfa_offset 16",
                "push rsi",
                ".cfi_def_cfa_offset 24",
                "push rdx",
                ".cfi_def_cfa_offset 32",
                "jne 3f",
                "call {try}",
                "test rax, rax",
                "jz 2f",
                "add rsp, 24",
                ".cfi_def_cfa_offset 8",
                "ret",
                "2:",
                ".cfi_def_cfa_offset 32",
                // cxx_next_new(index, size, align), from the saved rdi, rsi.
                "mov edi, {index}",
                "mov rsi, [rsp + 16]",
                "mov rdx, [rsp + 8]",
                "call {next}",
                "mov r11, rax",
                // Restore the arguments and go on at r11.
                "4:",
                "pop rdx",
                ".cfi_def_cfa_offset 24",
                "pop rsi",
                ".cfi_def_cfa_offset 16",
                "pop rdi",
                ".cfi_def_cfa_offset 8",
                "jmp r11",
                "3:",
                ".cfi_def_cfa_offset 32",
                "cmp byte ptr [rip + {mode}], {forward}",
                "je 2b",
                // Not decided: decide, then from the top.
                "call {decide}",
                "lea r11, [rip + 1b]",
                "jmp 4b",
                ".cfi_endproc",
                mode = sym MODE,
                serve = const SERVE,
                forward = const FORWARD,
                try = sym $try,
                next = sym cxx_next_new,
                decide = sym cxx_decide,
                index = const $index,
            )
        }
    )*};
}

operator_new! {
    operator_new = "_Znwm", 0, cxx_try_new;
    operator_new_array = "_Znam", 1, cxx_try_new;
    operator_new_nothrow = "_ZnwmRKSt9nothrow_t", 2, cxx_try_new;
    operator_new_array_nothrow = "_ZnamRKSt9nothrow_t", 3, cxx_try_new;
    operator_new_aligned = "_ZnwmSt11align_val_t", 4, cxx_try_new_aligned;
    operator_new_array_aligned = "_ZnamSt11align_val_t", 5, cxx_try_new_aligned;
    operator_new_aligned_nothrow = "_ZnwmSt11align_val_tRKSt9nothrow_t", 6, cxx_try_new_aligned;
    operator_new_array_aligned_nothrow = "_ZnamSt11align_val_tRKSt9nothrow_t", 7, cxx_try_new_aligned;
}

/// hakmem's `free`, for the deletes' jump (a function of this library's
/// own: the exported `free` may be another's).
extern "C" fn cxx_free(ptr: *mut c_void) {
    // SAFETY: C++'s contract: `ptr` is null or came from a `new`, hakmem's
    // (ours, or the runtime's around our malloc).
    unsafe { api::free(ptr.cast()) }
}

/// A delete while hakmem does not serve, or has not decided: `free`, or the
/// runtime's operator of the same name with every argument register a
/// delete may use. Forwarding with no runtime loaded aborts: the block came
/// from the program's own `new`, which `free` does not know.
///
/// # Safety
/// C++'s contract for the operator `NAMES[index]`.
unsafe extern "C" fn cxx_delete_slow(ptr: *mut c_void, a: usize, b: usize, index: usize) {
    if serves() {
        cxx_free(ptr);
        return;
    }
    let runtime = runtime_operator(index);
    if runtime == 0 {
        no_cxx_runtime(
            NAMES[index],
            "the program replaces operators, and no C++ runtime is loaded to forward to",
        );
    }
    // SAFETY: `runtime` is the runtime's operator delete of the same name.
    // Under the SysV x86_64 ABI (the only one this module is built for) a
    // delete's arguments (at most three, all integer or pointer) travel in
    // rdi, rsi, rdx, and a callee ignores the registers its form lacks.
    let f = unsafe {
        core::mem::transmute::<usize, unsafe extern "C" fn(*mut c_void, usize, usize)>(runtime)
    };
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { f(ptr, a, b) }
}

/// Defines the deletes as naked stubs: a jump to `cxx_free` while hakmem
/// serves (`MODE`), else to `cxx_delete_slow` with the operator's index.
macro_rules! operator_delete {
    ($($name:ident = $sym:literal, $index:literal;)*) => {$(
        #[doc = concat!("`", $sym, "`: `free`, or forwarded.")]
        #[unsafe(naked)]
        #[export_name = $sym]
        pub unsafe extern "C" fn $name() {
            core::arch::naked_asm!(
                ".cfi_startproc",
                "cmp byte ptr [rip + {mode}], {serve}",
                "jne 1f",
                "jmp {free}",
                "1:",
                "mov ecx, {index}",
                "jmp {slow}",
                ".cfi_endproc",
                mode = sym MODE,
                serve = const SERVE,
                free = sym cxx_free,
                slow = sym cxx_delete_slow,
                index = const $index,
            )
        }
    )*};
}

operator_delete! {
    operator_delete = "_ZdlPv", 8;
    operator_delete_array = "_ZdaPv", 9;
    operator_delete_sized = "_ZdlPvm", 10;
    operator_delete_array_sized = "_ZdaPvm", 11;
    operator_delete_nothrow = "_ZdlPvRKSt9nothrow_t", 12;
    operator_delete_array_nothrow = "_ZdaPvRKSt9nothrow_t", 13;
    operator_delete_aligned = "_ZdlPvSt11align_val_t", 14;
    operator_delete_array_aligned = "_ZdaPvSt11align_val_t", 15;
    operator_delete_sized_aligned = "_ZdlPvmSt11align_val_t", 16;
    operator_delete_array_sized_aligned = "_ZdaPvmSt11align_val_t", 17;
    operator_delete_aligned_nothrow = "_ZdlPvSt11align_val_tRKSt9nothrow_t", 18;
    operator_delete_array_aligned_nothrow = "_ZdaPvSt11align_val_tRKSt9nothrow_t", 19;
}
