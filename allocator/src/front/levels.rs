//! What lets hakctl read the memory levels of a running process from
//! outside (`hakmem_common::levels`): the layout it reads, and the ELF note
//! that says where the layout is. Nothing here runs: the note is read from
//! the file, the layout and what it points at from the process's memory.

use crate::class::{ACE_CLASSES, ACE_CLASS_SIZES, BINS, BIN_SIZES};
use crate::segment::SegHeader;
use crate::superslab::{Slab, SuperSlab, REMOTE_ADDR_BITS, SLABS_PER_SS, SS_HEADER_RESERVE};
use crate::thread::{ThreadCache, THREADS, THREAD_SLOTS};
use crate::{ace, chunks, large, legacy, os, parcel, pool, registry, tiny};
use core::mem::{offset_of, size_of};
use hakmem_common::levels::{LevelsLayout, MAGIC, NOTE_TYPE, VERSION};

/// The layout, with run-time pointers (relocated at load).
#[repr(transparent)]
pub struct Layout(pub LevelsLayout<*const ()>);

// SAFETY: never written after load; its pointers are only addresses, which
// hakctl reads from outside; nothing in the process dereferences them.
unsafe impl Sync for Layout {}

// The registry table (defined in assembly, `registry`).
unsafe extern "C" {
    static hakmem_registry: u8;
}

const fn table<const N: usize>(values: &[usize]) -> [u32; N] {
    let mut t = [0u32; N];
    let mut i = 0;
    while i < values.len() {
        t[i] = values[i] as u32;
        i += 1;
    }
    t
}

const _: () = assert!(BINS <= 32 && ACE_CLASSES <= 48);

#[used]
pub static LAYOUT: Layout = Layout(LevelsLayout {
    magic: MAGIC,
    version: VERSION,
    size: size_of::<LevelsLayout<*const ()>>() as u32,
    registry: (&raw const hakmem_registry).cast(),
    registry_len: registry::ENTRIES as u64,
    touched: (&raw const registry::TOUCHED).cast(),
    touched_words: registry::TOUCHED_WORDS as u64,
    threads: (&raw const THREADS).cast(),
    threads_len: THREAD_SLOTS as u64,
    legacy_out: (&raw const legacy::OUT).cast(),
    cached_resident: (&raw const chunks::RESIDENT).cast(),
    mapped: (&raw const os::MAPPED).cast(),
    chunk_shift: registry::CHUNK_SHIFT,
    bins: BINS as u32,
    ace_classes: ACE_CLASSES as u32,
    page: os::PAGE as u32,
    bin_size: table(&BIN_SIZES),
    ace_block_size: table(&ACE_CLASS_SIZES),
    tc_size: size_of::<ThreadCache>() as u32,
    tc_slot: offset_of!(ThreadCache, slot) as u32,
    tc_tiny_count: (offset_of!(ThreadCache, tiny) + tiny::LIST_COUNT_AT) as u32,
    tc_tiny_stride: tiny::LIST_STRIDE as u32,
    tc_ace_count: (offset_of!(ThreadCache, ace) + ace::CACHE_COUNT_AT) as u32,
    tc_ace_stride: ace::CACHE_STRIDE as u32,
    ss_header: SS_HEADER_RESERVE as u32,
    ss_slabs: offset_of!(SuperSlab, slabs) as u32,
    ss_slab_count: SLABS_PER_SS as u32,
    ss_slab_size: size_of::<Slab>() as u32,
    slab_state: offset_of!(Slab, state) as u32,
    slab_bin: offset_of!(Slab, bin) as u32,
    slab_capacity: offset_of!(Slab, capacity) as u32,
    slab_used: offset_of!(Slab, used) as u32,
    slab_carved: offset_of!(Slab, carved) as u32,
    slab_remote: Slab::REMOTE_AT as u32,
    slab_owner: offset_of!(Slab, owner) as u32,
    remote_len_shift: REMOTE_ADDR_BITS,
    ace_header: ace::HEADER_RESERVE as u32,
    ace_used: ace::SEG_USED_AT as u32,
    ace_capacity: ace::SEG_CAPACITY_AT as u32,
    ace_carved: ace::SEG_CARVED_AT as u32,
    large_map_size: offset_of!(chunks::MapHeader, map_size) as u32,
    large_extent: offset_of!(chunks::MapHeader, extent) as u32,
    large_live: offset_of!(chunks::MapHeader, live) as u32,
    large_usable: large::USABLE_AT as u32,
    parcel_live: parcel::LIVE_AT as u32,
    parcel_usable: parcel::USABLE_AT as u32,
    parcels: parcel::PARCELS as u32,
    seg_class: offset_of!(SegHeader, class) as u32,
    owner_abandoned: pool::ABANDONED as u64,
    seg_magic: crate::segment::SEG_MAGIC,
    seg_kind: offset_of!(SegHeader, kind) as u32,
    seg_kind_ace: crate::segment::SegKind::Ace as u32,
});

// The note: not allocated (like `.note.stapsdt`), so its address is the
// link-time one, which hakctl relocates with the object's load bias; it
// survives `strip -s`.
core::arch::global_asm!(
    ".pushsection .note.hakmem,\"\",@note",
    ".balign 4",
    ".long 7",
    ".long 16",
    ".long {note_type}",
    ".asciz \"hakmem\"",
    ".balign 4",
    ".quad {version}",
    ".quad {layout}",
    ".popsection",
    note_type = const NOTE_TYPE,
    version = const VERSION,
    layout = sym LAYOUT,
);
