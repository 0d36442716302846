//! Where the thread cache lives.
//!
//! On x86_64 Linux the cache is a zero-initialised block in `.tbss` reached
//! with the *initial-exec* TLS model: the thread pointer (`fs:0`) plus an offset
//! the dynamic linker writes into the GOT once at load. That is two
//! instructions. Rust's `thread_local!` in a shared library uses the
//! general-dynamic model instead, a call to `__tls_get_addr` on every malloc
//! and every free (11% of all instructions of bench_random_mixed under
//! callgrind). glibc's own tcache, jemalloc, tcmalloc and mimalloc use
//! initial-exec for the same reason.
//!
//! The cost of the model: the block comes from the static TLS area, which is
//! sized at program start. Preloaded or linked at start (the ways a malloc is
//! used) it always fits; a `dlopen` of libhakmem.so into a running process
//! needs the block to fit glibc's surplus (`glibc.rtld.optional_static_tls`),
//! otherwise dlopen fails with "cannot allocate memory in static TLS block".
//! glibc 2.36's default surplus holds the block with about 190 bytes to spare
//! (the library's TLS segment is 1,520 bytes since the per-thread state
//! became one part per tier plus their `CacheMode`, 1,512 before; the
//! CPython here dlopens up to 1,712; the test
//! `python_dlopens_the_library_and_allocates_through_it` checks it), so
//! fields added to `ThreadCache` must be paid for elsewhere in it.
//!
//! A library that uses hakmem as its global allocator and is itself loaded
//! with dlopen can turn on the `dynamic-tls` feature instead: the portable
//! `thread_local!` (general-dynamic in a shared object), which needs no static
//! TLS at all (`examples/plugin`, and the test
//! `a_plugin_with_dynamic_tls_loads_where_static_tls_is_full`). libhakmem.so
//! cannot: the C library allocates dynamic TLS blocks with malloc.
//!
//! Elsewhere, the portable `thread_local!` (const-initialised, no destructor).

use super::state::ThreadCache;

// The cache starts as zero bytes (`.tbss`, or a zeroed dynamic TLS block).
const _: () = assert!(ThreadCache::NEW.is_zero());

#[cfg(all(feature = "dynamic-tls", feature = "c-abi"))]
compile_error!("`dynamic-tls` cannot serve the C ABI: glibc allocates dynamic TLS with malloc");

#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "dynamic-tls")
))]
mod imp {
    use super::ThreadCache;

    // The block: global so inline asm in any codegen unit (or a crate that
    // inlines the fast path) links to it, hidden so it is not exported from
    // libhakmem.so nor interposed.
    core::arch::global_asm!(
        ".pushsection .tbss,\"awT\",@nobits",
        ".globl hakmem_thread_cache",
        ".hidden hakmem_thread_cache",
        ".type hakmem_thread_cache,@object",
        ".p2align 6",
        "hakmem_thread_cache:",
        ".zero {size}",
        ".size hakmem_thread_cache, {size}",
        ".popsection",
        size = const SIZE,
    );

    const SIZE: usize = core::mem::size_of::<ThreadCache>();
    const _: () = assert!(core::mem::align_of::<ThreadCache>() <= 64);
    // What glibc's default static TLS surplus holds for a dlopen (module doc).
    const _: () = assert!(
        SIZE <= 1600,
        "the thread cache outgrew the static TLS surplus"
    );

    #[inline(always)]
    pub fn cache_ptr() -> *mut ThreadCache {
        let p: *mut ThreadCache;
        // SAFETY: reads the thread pointer's self-pointer (fs:0, set by the C
        // library for every thread) and the GOT slot holding the block's offset
        // from it (written by the dynamic linker before any code runs). Neither
        // changes during the thread's life, so `pure, nomem` is honest: the
        // same thread always gets the same address.
        unsafe {
            core::arch::asm!(
                "mov {p}, qword ptr fs:[0]",
                "add {p}, qword ptr [rip + hakmem_thread_cache@GOTTPOFF]",
                p = out(reg) p,
                options(pure, nomem, nostack),
            );
        }
        p
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "dynamic-tls")
)))]
mod imp {
    use super::ThreadCache;
    use core::cell::UnsafeCell;

    thread_local! {
        // Const-initialised and without Drop, so the first access neither
        // allocates nor registers a destructor; thread exit comes from the
        // pthread key in `thread`.
        static CACHE: UnsafeCell<ThreadCache> = const { UnsafeCell::new(ThreadCache::NEW) };
    }

    #[inline(always)]
    pub fn cache_ptr() -> *mut ThreadCache {
        CACHE.with(|c| c.get())
    }
}

pub use imp::cache_ptr;
