//! The header every hakmem segment starts with, and pointer -> segment lookup.
//!
//! Every block hakmem hands out lies in a 2 MiB-aligned chunk whose first bytes
//! are a `SegHeader` (SuperSlab, legacy segment, ACE segment, large mapping or
//! parcel chunk),
//! so `ptr & !(2 MiB - 1)` finds the header once the registry has vouched for it.

use crate::registry;
// The registry bytes are defined once, where hakctl reads them too.
pub use crate::registry::CHUNK;
use hakmem_common::levels as lv;

pub const SEG_MAGIC: u64 = u64::from_le_bytes(*b"HAKMEMsg");

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegKind {
    SuperSlab = lv::KIND_SUPERSLAB as u32,
    Legacy = lv::KIND_LEGACY as u32,
    Ace = 3,
    Large = lv::KIND_LARGE as u32,
    /// Eight realloc-grown buffers (see `parcel`).
    Parcel = lv::KIND_PARCEL as u32,
}

#[repr(C)]
pub struct SegHeader {
    pub magic: u64,
    pub kind: SegKind,
    /// Size class (legacy and ACE segments); unused otherwise.
    pub class: u32,
}

impl SegHeader {
    pub const fn new(kind: SegKind, class: u32) -> Self {
        SegHeader {
            magic: SEG_MAGIC,
            kind,
            class,
        }
    }
}

#[inline(always)]
pub fn chunk_of(ptr: usize) -> usize {
    ptr & !(CHUNK - 1)
}

/// Whether `ptr` lies in a live SuperSlab (one registry read, no header read).
#[inline(always)]
pub fn in_superslab(ptr: usize) -> bool {
    registry::kind(ptr) == SegKind::SuperSlab as u8
}

/// The registry's byte for `ptr`: 0 if not ours, `SegKind as u8`, or for an
/// ACE segment `ACE_BYTE + class` (see `ace_class_of`).
#[inline(always)]
pub fn kind_of(ptr: usize) -> u8 {
    registry::kind(ptr)
}

/// The registry byte of an ACE segment of class 0; class c is `ACE_BYTE + c`.
/// An ACE free learns its class from the byte the registry read anyway, with
/// no read of the segment header: every header sits at a 2 MiB-aligned
/// address, so the headers of all classes compete for the same cache sets.
pub const ACE_BYTE: u8 = lv::KIND_ACE;
const _: () = assert!(ACE_BYTE as usize + crate::class::ACE_CLASSES <= 256);

/// The registry byte for an ACE segment of `class`.
pub const fn ace_byte(class: usize) -> u8 {
    ACE_BYTE + class as u8
}

/// The ACE class a registry byte names, if it names one. (The registry holds
/// no larger byte; saying so here spares `free` a bounds check whose panic
/// path would give the whole function a stack frame.)
#[inline(always)]
pub fn ace_class_of(byte: u8) -> Option<usize> {
    let class = byte.wrapping_sub(ACE_BYTE) as usize;
    (class < crate::class::ACE_CLASSES).then_some(class)
}

/// The registry byte of the chunk where a large block aligned to a chunk or
/// more starts: that chunk is all user block, so its header sits in the chunk
/// before (see `large::alloc`). Not a `SegKind`: no header says it.
pub const LARGE_BODY_BYTE: u8 = lv::KIND_LARGE_BODY;

/// The segment header for `ptr`, or None if `ptr` is not inside a hakmem
/// segment (tests; `free` and its kin classify with `front::place`).
#[cfg(test)]
pub fn lookup(ptr: usize) -> Option<&'static SegHeader> {
    let chunk = match kind_of(ptr) {
        0 => return None,
        LARGE_BODY_BYTE => chunk_of(ptr) - CHUNK,
        _ => chunk_of(ptr),
    };
    // SAFETY: the registry's byte for `ptr` names `chunk` a segment's start.
    unsafe { header_at(chunk) }
}

/// The header at `chunk`, where a registry byte for a pointer said a
/// segment starts (the pointer's chunk, or for `LARGE_BODY_BYTE` the one
/// before); None if it carries no magic.
///
/// # Safety
/// The registry's byte for a pointer names `chunk` its segment's start.
#[inline]
pub unsafe fn header_at(chunk: usize) -> Option<&'static SegHeader> {
    // SAFETY: per the contract the chunk is registered: a live mapping that
    // starts with a SegHeader (registered after the header is written,
    // removed before unmapping); a LARGE_BODY chunk's mapping starts one
    // chunk before it with the header.
    let h = unsafe { &*(chunk as *const SegHeader) };
    (h.magic == SEG_MAGIC).then_some(h)
}
