//! How hakctl finds and reads the allocator's memory levels from outside
//! the process (docs/levels.md).
//!
//! The allocator carries a non-allocated ELF note, `.note.hakmem` (name
//! "hakmem", type `NOTE_TYPE`), whose descriptor is `{ version: u64,
//! layout: u64 }`: the link-time address of its `LevelsLayout`. Like the
//! stapsdt notes, it survives `strip -s`, and each copy of hakmem in a
//! process has its own. hakctl adds the object's load bias and reads the
//! layout from the process's memory; the layout holds the run-time
//! addresses of what to read next (the chunk registry, which of its pages
//! are in use, the list of thread caches, the gauges) and the offsets of the
//! fields hakctl reads in each header. Everything else (slab counts, ACE
//! segments' used blocks, large blocks, parcels) is read from the
//! structures the allocator keeps anyway: nothing is counted on a fast path.
//!
//! `version` changes whenever the meaning or layout of anything here
//! changes; hakctl refuses a version it does not know, naming both.

/// The note's type.
pub const NOTE_TYPE: u32 = 0x6c76_6c73; // "slvl"
/// What `LevelsLayout::magic` holds.
pub const MAGIC: [u8; 8] = *b"HAKMEMlv";
/// This layout's version.
pub const VERSION: u32 = 1;

/// The registry bytes: 0 is not ours. The allocator's `SegKind` and its
/// registry bytes are these (`segment`), so the two cannot disagree.
pub const KIND_SUPERSLAB: u8 = 1;
pub const KIND_LEGACY: u8 = 2;
pub const KIND_LARGE: u8 = 4;
pub const KIND_PARCEL: u8 = 5;
/// A chunk-aligned large block's first chunk (its header is in the chunk before).
pub const KIND_LARGE_BODY: u8 = 6;
/// ACE class c's segments: `KIND_ACE + c`.
pub const KIND_ACE: u8 = 16;

/// A slab's states (`SlabState`).
pub const SLAB_FRESH: u8 = 0;
pub const SLAB_IN_USE: u8 = 1;
pub const SLAB_EMPTY: u8 = 2;
pub const SLAB_PURGED: u8 = 3;

/// The layout. Pointers are run-time addresses in the target process;
/// offsets are bytes from the start of the structure named.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LevelsLayout<P: Copy> {
    pub magic: [u8; 8],
    pub version: u32,
    /// `size_of` this structure.
    pub size: u32,
    /// The chunk registry: one byte per 2^chunk_shift bytes of address space.
    pub registry: P,
    pub registry_len: u64,
    /// Which 4 KiB pages of the registry were ever written: a bitmap of
    /// `touched_words` u64 words.
    pub touched: P,
    pub touched_words: u64,
    /// The registered threads' caches: `threads_len` slots, each the
    /// address of a thread's cache or 0. A thread that finds no free slot
    /// keeps nothing cached, so every block in a cache is in a listed one.
    pub threads: P,
    pub threads_len: u64,
    /// Per bin, blocks taken out of the legacy allocator's lists (u64 each).
    pub legacy_out: P,
    /// Bytes the chunk cache may hold resident (u64), and bytes mapped from
    /// the OS in all (usize).
    pub cached_resident: P,
    pub mapped: P,
    pub chunk_shift: u32,
    pub bins: u32,
    pub ace_classes: u32,
    pub page: u32,
    pub bin_size: [u32; 32],
    pub ace_block_size: [u32; 48],
    /// The thread cache: its size, where it keeps its slot's index (u32,
    /// slot + 1: a cache whose index is not its slot's is stale), and per
    /// bin / ACE class the u32 count of blocks it holds (offset of the
    /// first, stride).
    pub tc_size: u32,
    pub tc_slot: u32,
    pub tc_tiny_count: u32,
    pub tc_tiny_stride: u32,
    pub tc_ace_count: u32,
    pub tc_ace_stride: u32,
    /// A SuperSlab: its header's size, where its slabs' metadata starts,
    /// how many, each's size; in a slab: state (u8), bin (u8), capacity,
    /// used (u32: blocks out of it, those on its remote list included),
    /// remote (u64: the list's length above `remote_len_shift`), owner.
    pub ss_header: u32,
    pub ss_slabs: u32,
    pub ss_slab_count: u32,
    pub ss_slab_size: u32,
    pub slab_state: u32,
    pub slab_bin: u32,
    pub slab_capacity: u32,
    pub slab_used: u32,
    pub slab_carved: u32,
    pub slab_remote: u32,
    pub slab_owner: u32,
    pub remote_len_shift: u32,
    /// An ACE segment: its header's size; used, capacity, carved (u32).
    pub ace_header: u32,
    pub ace_used: u32,
    pub ace_capacity: u32,
    pub ace_carved: u32,
    /// A large mapping (also a cached one): map size, extent (usize), live
    /// (u8); a live block's usable bytes (usize).
    pub large_map_size: u32,
    pub large_extent: u32,
    pub large_live: u32,
    pub large_usable: u32,
    /// A parcel chunk: the live mask (u8) and each parcel's usable bytes (u32).
    pub parcel_live: u32,
    pub parcel_usable: u32,
    pub parcels: u32,
    /// A segment header's class (u32: a legacy segment's bin).
    pub seg_class: u32,
    /// Owner ids that are no thread's (an exited thread's slab).
    pub owner_abandoned: u64,
    /// Every segment starts with a header: this magic (u64) at offset 0 and
    /// its kind (u32, `KIND_*` but ACE's 3) at `seg_kind`. hakctl checks
    /// both against the registry's byte before it trusts the header.
    pub seg_magic: u64,
    pub seg_kind: u32,
    pub seg_kind_ace: u32,
}

/// Bounds a layout's counts and offsets must keep for hakctl to read with
/// it: a layout past them is refused, never followed.
pub const MAX_BINS: u32 = 32;
pub const MAX_ACE_CLASSES: u32 = 48;
pub const MAX_THREAD_SLOTS: u64 = 1 << 20;
pub const MAX_HEADER: u32 = 64 << 10;
