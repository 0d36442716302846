//! The C++ allocation operators (`operator new`, `new[]`, `delete`,
//! `delete[]`: plain, nothrow, sized and aligned), exported with their
//! Itanium names for LD_PRELOAD (feature `c-abi`, x86_64), as tcmalloc,
//! jemalloc and mimalloc export them.
//!
//! Why: without them a C++ program's `new` runs libstdc++'s operator, which
//! loops around `malloc` through the PLT; every `new` and `delete` pays that
//! wrapper and a second indirect jump. In mimalloc-bench's alloc-test
//! (`perf record`, pinned) the wrappers and the hop took 2.5% of the samples
//! under hakmem, and none under the peers, which export the operators.
//!
//! **Failure keeps C++'s contract** (the new-handler loop, then
//! `std::bad_alloc`; null from the nothrow forms) without a line of it here:
//! hakmem cannot throw (Rust, built with `panic = "abort"`, may not be
//! unwound through). Each `new` is a naked stub that calls hakmem; when that
//! returns null (no memory, or an alignment that is not a power of two) the
//! stub jumps, its own frame gone, to the same operator of the next library
//! that defines it (libstdc++, or libc++): that one runs its new-handler loop
//! around `malloc` or `aligned_alloc`, which are hakmem's, and throws. So a
//! block that comes back is always hakmem's, and an exception never crosses
//! a Rust frame. `tests/conformance.rs` runs `conformance/contract.cc` with
//! and without the preload and compares every case.
//!
//! The deletes are plain functions: every form is `free` (libstdc++'s are
//! too); a sized delete's size is not checked.

use crate::api;
use crate::stats::{write_fd, StackBuf};
use core::ffi::{c_char, c_void};
use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The operators' names, in the order of `cxx_next_new`'s index: plain,
/// array, their nothrow forms, then the same four aligned (index + 4).
const NEW_NAMES: [&[u8]; 8] = [
    b"_Znwm\0",
    b"_Znam\0",
    b"_ZnwmRKSt9nothrow_t\0",
    b"_ZnamRKSt9nothrow_t\0",
    b"_ZnwmSt11align_val_t\0",
    b"_ZnamSt11align_val_t\0",
    b"_ZnwmSt11align_val_tRKSt9nothrow_t\0",
    b"_ZnamSt11align_val_tRKSt9nothrow_t\0",
];
static NEXT_NEW: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

/// `operator new(size)` and the nothrow form's first try: hakmem's `malloc`.
extern "C" fn cxx_try_new(size: usize) -> *mut u8 {
    // SAFETY: malloc has no precondition.
    unsafe { api::malloc(size) }
}

/// The aligned forms' first try. An alignment that is not a power of two is
/// left to the next library's operator (libstdc++ throws `bad_alloc`).
extern "C" fn cxx_try_new_aligned(size: usize, align: usize) -> *mut u8 {
    if !align.is_power_of_two() {
        return core::ptr::null_mut();
    }
    // SAFETY: `align` is a power of two, as `alloc_aligned` requires.
    unsafe { api::alloc_aligned(align, size) }
}

/// Where a `new` that got no block from hakmem goes: the address of the next
/// library's operator `NEW_NAMES[index]` (called with the stub's `size` and
/// `align`), or for an aligned form whose size cannot be rounded up to its
/// alignment, the plain form of the same kind (`index - 4`).
///
/// Why the latter: libstdc++ 12's aligned `new` rounds the size up to the
/// alignment without checking, so `new(SIZE_MAX, align_val_t(64))` wraps to
/// 0 and returns a zero-byte block instead of throwing (the oracle run of
/// `conformance/contract.cc` shows it). No block can serve such a size; the
/// plain form runs the same new-handler loop around `malloc` and throws, or
/// returns null from a nothrow form, as C++ requires.
///
/// Looked up once per operator (`dlsym` may call `malloc`: this runs outside
/// every lock of hakmem's, on a path that has already failed). Aborts,
/// naming the operator, if no other library defines it: hakmem cannot throw
/// `bad_alloc` itself.
extern "C" fn cxx_next_new(index: usize, size: usize, align: usize) -> usize {
    let index = if index >= 4 && align.is_power_of_two() && size > usize::MAX - (align - 1) {
        index - 4
    } else {
        index
    };
    let slot = &NEXT_NEW[index];
    let cached = slot.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    let name = NEW_NAMES[index];
    let ours = ours(index);
    // SAFETY: `name` is NUL-terminated; the handles are dlsym's own constants.
    let mut found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast::<c_char>()) };
    if found.is_null() || found as usize == ours {
        // Loaded after the C++ runtime (not preloaded): its operator is
        // the first definition, if it is not ours.
        // SAFETY: as above.
        found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr().cast::<c_char>()) };
    }
    if found.is_null() || found as usize == ours {
        let what = core::str::from_utf8(&name[..name.len() - 1]).unwrap_or("operator new");
        no_cxx_runtime(what);
    }
    slot.store(found as usize, Ordering::Release);
    found as usize
}

/// A `new` got no memory from hakmem and no other library defines it to run
/// the new-handler loop and throw `std::bad_alloc`: hakmem cannot throw,
/// and returning null would break `new`'s contract.
#[cold]
#[inline(never)]
fn no_cxx_runtime(operator: &str) -> ! {
    let mut msg = StackBuf::<200>::new();
    let _ = writeln!(
        msg,
        "hakmem: {operator}: out of memory, and no C++ runtime loaded after hakmem \
         defines it to throw std::bad_alloc"
    );
    write_fd(2, msg.as_bytes());
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

/// Defines a `new` as a naked stub: the argument registers (size, alignment,
/// the nothrow tag) saved, hakmem's try called; a block returned, or the
/// registers restored and a jump to the next library's operator.
macro_rules! operator_new {
    ($($name:ident = $sym:literal, $index:literal, $try:ident;)*) => {
        /// The address of our operator `NEW_NAMES[index]` (so that a lookup
        /// that finds it is not taken for the next library's).
        fn ours(index: usize) -> usize {
            [$($name as *const () as usize),*][index]
        }
        $(
            #[doc = concat!("`", $sym, "`: see the module's comment.")]
            #[unsafe(naked)]
            #[export_name = $sym]
            pub unsafe extern "C" fn $name() {
                core::arch::naked_asm!(
                    ".cfi_startproc",
                    // Three pushes: the stack is 16-byte aligned at the call.
                    "push rdi",
                    ".cfi_adjust_cfa_offset 8",
                    "push rsi",
                    ".cfi_adjust_cfa_offset 8",
                    "push rdx",
                    ".cfi_adjust_cfa_offset 8",
                    "call {try}",
                    "test rax, rax",
                    "jz 2f",
                    "add rsp, 24",
                    ".cfi_remember_state",
                    ".cfi_adjust_cfa_offset -24",
                    "ret",
                    ".cfi_restore_state",
                    "2:",
                    // cxx_next_new(index, size, align), from the saved rdi, rsi.
                    "mov edi, {index}",
                    "mov rsi, [rsp + 16]",
                    "mov rdx, [rsp + 8]",
                    "call {next}",
                    "mov r11, rax",
                    "pop rdx",
                    ".cfi_adjust_cfa_offset -8",
                    "pop rsi",
                    ".cfi_adjust_cfa_offset -8",
                    "pop rdi",
                    ".cfi_adjust_cfa_offset -8",
                    "jmp r11",
                    ".cfi_endproc",
                    try = sym $try,
                    next = sym cxx_next_new,
                    index = const $index,
                )
            }
        )*
    };
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

/// Defines the deletes: each is `free` of its first argument; the others
/// (size, alignment, nothrow tag) are not read.
macro_rules! operator_delete {
    ($($name:ident = $sym:literal;)*) => {$(
        #[doc = concat!("`", $sym, "`: `free`.")]
        #[export_name = $sym]
        pub unsafe extern "C" fn $name(ptr: *mut c_void) {
            // SAFETY: C++'s contract: `ptr` is null or came from a `new`,
            // which is hakmem's (ours, or the next library's around our malloc).
            unsafe { api::free(ptr.cast()) }
        }
    )*};
}

operator_delete! {
    operator_delete = "_ZdlPv";
    operator_delete_array = "_ZdaPv";
    operator_delete_sized = "_ZdlPvm";
    operator_delete_array_sized = "_ZdaPvm";
    operator_delete_nothrow = "_ZdlPvRKSt9nothrow_t";
    operator_delete_array_nothrow = "_ZdaPvRKSt9nothrow_t";
    operator_delete_aligned = "_ZdlPvSt11align_val_t";
    operator_delete_array_aligned = "_ZdaPvSt11align_val_t";
    operator_delete_sized_aligned = "_ZdlPvmSt11align_val_t";
    operator_delete_array_sized_aligned = "_ZdaPvmSt11align_val_t";
    operator_delete_aligned_nothrow = "_ZdlPvSt11align_val_tRKSt9nothrow_t";
    operator_delete_array_aligned_nothrow = "_ZdaPvSt11align_val_tRKSt9nothrow_t";
}
