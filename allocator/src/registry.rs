//! Which 2 MiB chunks of the address space are hakmem segments, and of which kind.
//!
//! One byte per 2 MiB chunk of the 47-bit user address space: 0 for "not
//! ours", else the segment's `SegKind`. That is 64 MiB of virtual memory
//! (zero-filled .bss): only the pages covering chunks hakmem uses are ever
//! touched (one 4 KiB page covers 8 GiB of address space). `free` reads one
//! byte before it reads any header, so a foreign pointer is detected instead
//! of dereferenced, and the byte already says which path frees the block.

use core::sync::atomic::{AtomicU8, Ordering};

pub const CHUNK_SHIFT: u32 = 21;
pub const CHUNK: usize = 1 << CHUNK_SHIFT;
const ADDR_BITS: u32 = 47;
const ENTRIES: usize = 1 << (ADDR_BITS - CHUNK_SHIFT);

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

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn table() -> *const AtomicU8 {
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
