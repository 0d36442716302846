//! The C allocation API, exported unprefixed for LD_PRELOAD (feature `c-abi`).

use crate::api;
use core::ffi::c_void;

const PAGE: usize = 4096;

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
pub unsafe extern "C" fn cfree(ptr: *mut c_void) {
    // SAFETY: as free.
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
        // SAFETY: errno slot of this thread.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        return core::ptr::null_mut();
    };
    // SAFETY: C contract: ptr is null or ours.
    unsafe { api::realloc(ptr.cast(), total).cast() }
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
    if !align.is_power_of_two() {
        // SAFETY: errno slot of this thread.
        unsafe { *libc::__errno_location() = libc::EINVAL };
        return core::ptr::null_mut();
    }
    // SAFETY: C contract.
    unsafe { api::alloc_aligned(align, size).cast() }
}

#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // glibc rounds a non-power-of-two alignment up.
    let align = align
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(usize::MAX);
    // SAFETY: C contract.
    unsafe { api::alloc_aligned(align, size).cast() }
}

#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: C contract.
    unsafe { api::alloc_aligned(PAGE, size).cast() }
}

#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let Some(rounded) = size.max(1).checked_add(PAGE - 1) else {
        // SAFETY: errno slot of this thread.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        return core::ptr::null_mut();
    };
    // SAFETY: C contract.
    unsafe { api::alloc_aligned(PAGE, rounded & !(PAGE - 1)).cast() }
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
