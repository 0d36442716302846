//! A thread's index of the slabs it owns, by address: what its `free` reads
//! to learn that a block is its own and of which bin, instead of the registry
//! byte and the slab's line. Those two lie on pages of their own; with a
//! program's blocks spread over a thousand pages, the TLB did not keep them,
//! and an owner's free paid for both (bench_random_mixed: +7% without them).
//!
//! Direct-mapped by slab number, SLOTS slots: a thread's slabs within one
//! 64 MiB stretch of addresses never collide. It was 128 slots (8 MiB) until
//! glibc's bench-malloc-thread (mimalloc-bench's glibc-thread, 2 threads)
//! ran at two speeds from one run to the next, ASLR off or on: in the slow
//! runs (about 135M iterations against 175M) 37% of `free`'s samples were
//! on the registry path. Each thread's slabs lay in SuperSlabs spread over
//! the chunks mapped around the threads' 8 MiB stacks, and two of them 8 MiB
//! apart took the same slots. With 256 slots (16 MiB), 16 runs of 16 were
//! fast (173-184M). Then a program holding more than 16 MiB of tiny blocks
//! found half of its frees on the registry path (bench_random_mixed with
//! 65,536 slots: about 22 MiB of slabs; callgrind counted the registry
//! lookup on about half of the 1M frees), and ran at 0.889 of tcmalloc's speed
//! (pinned, 9 repetitions). 1024 slots (8 KiB an index, of which a thread
//! touches the pages its slabs' slots fall on, and the first, for slot 0):
//! that workload 1.13x as many operations a second (pinned, 11 pairs:
//! quartiles 1.10-1.16), and with 8192 slots 0.996 (0.989-1.003); hakbench
//! pinned, 5 repetitions: prodcons 1.003, mixed-2t 0.991, larson 1.035, working-set-2t 1.018, tiny 1.001;
//! glibc-thread level (6 runs each). 512 slots had cost prodcons 5% when
//! 256 were chosen, by the index lines a free of the other thread's blocks
//! reads; that cost did not show with 1024 slots in this code (unpinned,
//! 3 and 5 repetitions: 0.973, 1.028).
//!
//! A slab that lost its slot to another, or a thread whose index could not
//! be mapped, takes the slower path, which reads the slab's line. So the
//! index is a cache of `Slab::owner`, never a second authority: a slot names
//! a slab only while this thread owns it (set when the thread links the
//! slab, cleared when it unlinks it, or by another thread that takes the
//! slab, before it takes it: see below). A free that read the slot just
//! before a take puts its block on this thread's list all the same; the
//! thread's drain looks at each block's owner (`TinyCache::drain`).
//!
//! Indexes live outside the thread cache, which must fit glibc's static TLS
//! surplus (see `tls`): 8 KiB each and the gate, carved from 64 KiB mappings
//! and kept on a free list when their threads exit (never unmapped, so a
//! stale pointer to one is still memory: `try_gate_of`).
//!
//! The index also carries its thread's *gate*: the lock under which the
//! thread works on its slabs (refills, drains, its exit) and under which
//! another thread may take one of them (`TinyCache::take_slab`); the
//! directory finds a thread's index by its owner id. So a slab's slot is
//! cleared either by its owner or, under the owner's gate, by the thread
//! that takes the slab, and slots are atomics: the owner's `free` reads
//! them without the gate.

use crate::class::BINS;
use crate::os;
use crate::superslab::{BLOCK_ALIGN, FIRST_SLAB, SLAB_SIZE, SS_SIZE};
use crate::sync::{OwnerGuard, OwnerLock, SpinLock};
use core::ptr::null_mut;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

pub const SLOTS: usize = 1024;
const _: () = assert!(SLOTS * SLAB_SIZE == 64 << 20);

/// A slot holds `slab start | bin << BIN_SHIFT`, or 0: empty.
///
/// `bin_of_block` compares a slot with an address in one XOR: the slab
/// start's bits and the address's grid bits (the low four, zero for every
/// block: blocks start on the 16-byte grid; block sizes, colours and slab
/// starts are multiples of 16, and were one not, its blocks would take the
/// slower path, not a wrong one) must come out zero, the bin's bits are
/// masked off. Against the masks, shifts and second constant of a key built
/// from the address, five of `free`'s fast-path instructions.
const BIN_SHIFT: u32 = 4;
const BIN_MASK: usize = 0xff;
const GRID_BITS: usize = BLOCK_ALIGN - 1;
/// The bits of `slot ^ address` that must be zero for a match.
const MATCH_MASK: usize = !(SLAB_SIZE - 1) | GRID_BITS;
const _: () = assert!(BIN_MASK << BIN_SHIFT & MATCH_MASK == 0);
/// An empty slot (0) matches only addresses below SLAB_SIZE, all of which
/// fall in slot 0. Slot 0 names slabs that start on a multiple of 64 MiB,
/// so at the start of a SuperSlab: slab 0, the header's, which never serves
/// (`FIRST_SLAB`). So slot 0 never names a slab and holds this instead, a
/// slab start of slot 1, which no address of slot 0 matches: no address
/// matches an empty slot, the lowest ones (`free((void *)16)`) included.
const SLOT0: usize = SLAB_SIZE;
const _: () = assert!((SLOTS * SLAB_SIZE).is_multiple_of(SS_SIZE) && FIRST_SLAB > 0);

#[repr(C)]
pub struct OwnedIndex {
    slots: [AtomicUsize; SLOTS],
    gate: OwnerLock<Gate>,
}

/// What the gate guards besides the thread's slabs: whose index this is,
/// and what takers changed of the thread's rings that the thread's own
/// state, in its thread cache, still says otherwise. All zero: a spare
/// index's (fresh mappings read as zero). Atomics, though the gate orders
/// every use: a taker holding a stale pointer may read `id` while a new
/// owner, not listed yet, writes its copies (no field is shared then, but
/// a reference to the whole would be).
pub struct Gate {
    /// The owner id of the thread whose index this is; 0 while it is spare
    /// (a taker holding a stale pointer finds another id or 0 here).
    pub id: AtomicUsize,
    /// Bit `bin`: a slab of the bin was taken since the thread last looked
    /// (`TinyCache::enter`).
    pub taken_bins: AtomicU32,
    /// Per bin (`SlabRef`s), the thread's ring head and active slab, as
    /// the thread sets them in its thread cache (which no other thread may
    /// write) and as a take changes them: the thread copies a taken bin's
    /// back at its next `enter`, without reading a slab it may no longer
    /// own (whose SuperSlab may be gone by then).
    pub head: [AtomicU32; BINS],
    pub active: [AtomicU32; BINS],
    /// The owner's slow paths so far (`TinyCache::enter`): a taker that
    /// finds it unchanged since its last try knows the owner is idle.
    pub entries: AtomicU32,
    /// This thread's last tries to take (as a taker), one per owner id
    /// modulo `TRIED`: whose gate, and that gate's `entries` then. More than
    /// one, so that a thread freeing into the slabs of two idle owners in
    /// turn still finds each idle at its second try (with one, the other
    /// owner's try always came between: neither was ever taken).
    pub tried: [Tried; TRIED],
}

/// How many owners a taker remembers its last try of (`Gate::tried`).
pub const TRIED: usize = 4;

/// A taker's last try of one owner (`Gate::tried`).
pub struct Tried {
    pub owner: AtomicUsize,
    pub entries: AtomicU32,
}

impl Gate {
    /// What a spare index's gate holds (and a fresh one's: all zero).
    fn clear(&self) {
        self.id.store(0, Ordering::Relaxed);
        self.taken_bins.store(0, Ordering::Relaxed);
        for (h, a) in self.head.iter().zip(&self.active) {
            h.store(0, Ordering::Relaxed);
            a.store(0, Ordering::Relaxed);
        }
        self.entries.store(0, Ordering::Relaxed);
        for t in &self.tried {
            t.owner.store(0, Ordering::Relaxed);
            t.entries.store(0, Ordering::Relaxed);
        }
    }
}

const _: () = assert!(BINS <= 32);

/// Indexes by owner id (`id % DIRECTORY_SLOTS`): the one a taker locks. A
/// thread whose slot another live thread holds is not listed: its slabs
/// are not taken (it holds its gate all the same, and may take others').
const DIRECTORY_SLOTS: usize = 4096;
#[allow(clippy::declare_interior_mutable_const)]
const UNLISTED: AtomicPtr<OwnedIndex> = AtomicPtr::new(null_mut());
static DIRECTORY: [AtomicPtr<OwnedIndex>; DIRECTORY_SLOTS] = [UNLISTED; DIRECTORY_SLOTS];

#[inline(always)]
fn slot(addr: usize) -> usize {
    (addr / SLAB_SIZE) % SLOTS
}

impl OwnedIndex {
    /// The bin of the slab holding `addr`, if the index names that slab and
    /// `addr` is on the 16-byte grid blocks start on (one test does both,
    /// see `MATCH_MASK`).
    #[inline(always)]
    pub fn bin_of_block(&self, addr: usize) -> Option<usize> {
        let e = self.slots[slot(addr)].load(Ordering::Relaxed);
        if (e ^ addr) & MATCH_MASK != 0 {
            return None;
        }
        Some(e >> BIN_SHIFT & BIN_MASK)
    }

    /// Names the slab at `base` (its first byte) as serving `bin`, in place
    /// of whichever slab held its slot. The owner, under its gate if listed.
    pub fn insert(&self, base: usize, bin: usize) {
        debug_assert!(base.is_multiple_of(SLAB_SIZE) && bin <= BIN_MASK);
        debug_assert!(slot(base) != 0, "slab {base:#x} is a SuperSlab's slab 0");
        self.slots[slot(base)].store(base | bin << BIN_SHIFT, Ordering::Relaxed);
    }

    /// Forgets the slab at `base`, if it holds its slot. The owner, or a
    /// taker of the slab, under the owner's gate if it is listed.
    pub fn remove(&self, base: usize) {
        let s = &self.slots[slot(base)];
        if s.load(Ordering::Relaxed) & !(SLAB_SIZE - 1) == base {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// Writes slot 0's constant (see `SLOT0`); with every other slot 0, the
    /// index names no slab.
    fn clear_slot0(&self) {
        self.slots[0].store(SLOT0, Ordering::Relaxed);
    }

    fn is_empty(&self) -> bool {
        self.slots[0].load(Ordering::Relaxed) == SLOT0
            && self.slots[1..]
                .iter()
                .all(|s| s.load(Ordering::Relaxed) == 0)
    }

    /// Holds the gate (the owner, at each of its slow paths that work on
    /// its slabs), waiting while a taker holds it.
    pub fn lock_gate(&self) -> OwnerGuard<'_, Gate> {
        self.gate.enter()
    }

    /// The gate's data without holding it: for the owner's copy of its ring
    /// head and active slab (`TinyCache::set_owned`, `set_active`), which it
    /// writes in its slow paths (holding the gate if it is listed).
    pub fn gate_copy(&self) -> &Gate {
        // SAFETY: every field is atomic; the lock orders their use.
        unsafe { &*self.gate.data_ptr() }
    }

    /// Lists the index under owner id `id`, if its directory slot is free or
    /// already this index's; false if another live thread holds the slot.
    /// The owner, before it first locks its gate.
    pub fn list(&self, id: usize) -> bool {
        let slot = &DIRECTORY[id % DIRECTORY_SLOTS];
        let me = self as *const OwnedIndex as *mut OwnedIndex;
        let cur = slot.load(Ordering::Acquire);
        if cur == me {
            return true;
        }
        if !cur.is_null() {
            return false;
        }
        // The id first: a taker that finds the index checks it under the gate.
        self.gate.enter().id.store(id, Ordering::Relaxed);
        slot.compare_exchange(null_mut(), me, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Whether a taker may find this index under owner id `id` and the
    /// owner does not hold its gate: the owner must not touch its rings then
    /// (`TinyCache::check_gate_held`).
    #[cfg(feature = "invariants")]
    pub fn exposed(&self, id: usize) -> bool {
        let me = self as *const OwnedIndex as *mut OwnedIndex;
        DIRECTORY[id % DIRECTORY_SLOTS].load(Ordering::Relaxed) == me && !self.gate.owner_holds()
    }

    /// Lets go of the owner's hold that `TinyCache::hold_gate_for_fork` kept
    /// (its guard forgotten); in the `child`, the gate as new (see
    /// `OwnerLock::reset_after_fork_child`).
    pub fn release_owner_after_fork(&self, child: bool) {
        if child {
            self.gate.reset_after_fork_child();
        } else {
            self.gate.release_owner();
        }
    }

    /// Takes the index out of the directory (its thread exits); the caller,
    /// its owner, holds the gate (and clears it before the give-back).
    pub fn unlist(&self, gate: &Gate) {
        let me = self as *const OwnedIndex as *mut OwnedIndex;
        let _ = DIRECTORY[gate.id.load(Ordering::Relaxed) % DIRECTORY_SLOTS].compare_exchange(
            me,
            null_mut(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// The gate of the thread whose owner id is `id`, if it is listed and the
/// gate is free: held, checked to be that thread's (not a spare index's, nor
/// another thread's since). None otherwise; never waits.
pub fn try_gate_of(id: usize) -> Option<(&'static OwnedIndex, OwnerGuard<'static, Gate>)> {
    let ix = DIRECTORY[id % DIRECTORY_SLOTS].load(Ordering::Acquire);
    // SAFETY: indexes are never unmapped (spare ones go on a free list), so
    // even a stale pointer is to an index; which thread's, the gate says.
    let ix: &'static OwnedIndex = unsafe { ix.as_ref()? };
    let gate = ix
        .gate
        .try_take(|| crate::test_hooks::at(crate::test_hooks::Point::TakeRefused, id))?;
    (gate.id.load(Ordering::Relaxed) == id).then_some((ix, gate))
}

/// Indexes of exited threads (linked through their first slot) and the
/// uncarved rest of the last mapping.
struct Spare {
    free: *mut OwnedIndex,
    next: usize,
    end: usize,
}

// SAFETY: the pointers are to memory the pool owns; the lock serialises them.
unsafe impl Send for Spare {}

static SPARE: SpinLock<Spare> = SpinLock::new(Spare {
    free: null_mut(),
    next: 0,
    end: 0,
});

const MAPPING: usize = 64 * 1024;
const SIZE: usize = core::mem::size_of::<OwnedIndex>();
const _: () = assert!(SIZE <= MAPPING);

/// An empty index for a thread; null if the OS refuses the memory (the
/// thread then frees through the slower path).
pub fn take() -> *mut OwnedIndex {
    let mut spare = SPARE.lock();
    let ix = spare.free;
    if !ix.is_null() {
        // SAFETY: indexes on the free list are ours, empty but for the link.
        unsafe {
            spare.free = (*ix).slots[0].load(Ordering::Relaxed) as *mut OwnedIndex;
            (*ix).clear_slot0();
        }
        return ix;
    }
    if spare.end - spare.next < SIZE {
        let m = os::map_aligned(MAPPING, os::PAGE) as usize;
        if m == 0 {
            return null_mut();
        }
        spare.next = m;
        spare.end = m + MAPPING;
    }
    let ix = spare.next as *mut OwnedIndex;
    spare.next += SIZE;
    // SAFETY: carved from our mapping, which reads as zero (a free gate,
    // owner id 0, nothing taken: see `Gate`), for this caller alone: all it
    // needs to be empty is slot 0.
    unsafe { (*ix).clear_slot0() };
    ix
}

/// Takes back the (empty) index of an exiting thread.
///
/// # Safety
/// `ix` came from `take` and nothing uses it any more.
pub unsafe fn give_back(ix: *mut OwnedIndex) {
    // SAFETY: per the contract the index is ours again (a taker holding a
    // stale pointer touches only its gate, which says id 0 from here).
    let ix_ref = unsafe { &*ix };
    debug_assert!(ix_ref.is_empty());
    ix_ref.gate.enter().clear();
    let mut spare = SPARE.lock();
    ix_ref.slots[0].store(spare.free as usize, Ordering::Relaxed);
    spare.free = ix;
}

pub fn lock_for_fork() {
    SPARE.acquire_for_fork();
}

/// Lets the spare list go after a fork; in the `child`, first makes each
/// spare index's gate as new. A taker that read a directory entry just
/// before the index went back (`try_gate_of`) holds the spare's gate for a
/// moment, finds another id and lets it go: a fork in that moment copies
/// the gate held, and the next thread of the child that takes the index
/// would sleep at its first `enter` (see `OwnerLock::reset_after_fork_child`).
pub fn unlock_after_fork(child: bool) {
    if child {
        // SAFETY: the list is ours while the prepare handler's hold lasts,
        // and the child has no other thread.
        unsafe { reset_gates_after_fork((*SPARE.data_ptr_for_fork()).free) };
    }
    SPARE.release_after_fork();
}

/// Resets the gate of each index on the spare list that starts at `ix`.
///
/// # Safety
/// The list is the caller's alone (the child's only thread, holding it).
unsafe fn reset_gates_after_fork(mut ix: *mut OwnedIndex) {
    while !ix.is_null() {
        // SAFETY: a spare index, linked through its first slot (`give_back`).
        unsafe {
            (*ix).gate.reset_after_fork_child();
            ix = (*ix).slots[0].load(Ordering::Relaxed) as *mut OwnedIndex;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index from `take`, ours alone until `give_back`.
    fn fresh_index() -> &'static OwnedIndex {
        let ix = take();
        assert!(!ix.is_null());
        // SAFETY: a fresh index, handed to nobody else.
        unsafe { &*ix }
    }

    /// Inserts `slabs` into a fresh index (bin: the slab's position, modulo
    /// the bins there are) and checks that each still names its slab, then
    /// empties it.
    fn each_keeps_its_slot(slabs: &[usize]) {
        let ix = fresh_index();
        for (i, &s) in slabs.iter().enumerate() {
            ix.insert(s, i % 25);
        }
        for (i, &s) in slabs.iter().enumerate() {
            assert_eq!(ix.bin_of_block(s + 48), Some(i % 25), "slab {s:#x}");
        }
        for &s in slabs {
            ix.remove(s);
        }
        // SAFETY: empty and no longer used.
        unsafe { give_back(ix as *const OwnedIndex as *mut OwnedIndex) };
    }

    #[test]
    fn a_fork_child_finds_the_gates_of_spare_indexes_free() {
        // Two indexes linked as the spare list links them, each gate held
        // as a taker that found another id would hold it at the fork.
        let (a, b) = (fresh_index(), fresh_index());
        a.slots[0].store(b as *const OwnedIndex as usize, Ordering::Relaxed);
        b.slots[0].store(0, Ordering::Relaxed);
        for ix in [a, b] {
            core::mem::forget(ix.gate.try_take(|| {}).expect("a free gate"));
            assert!(ix.gate.try_take(|| {}).is_none());
        }
        // SAFETY: the list is this test's alone.
        unsafe { reset_gates_after_fork(a as *const OwnedIndex as *mut OwnedIndex) };
        for ix in [a, b] {
            assert!(
                ix.gate.try_take(|| {}).is_some(),
                "a spare's gate is still held in the child"
            );
        }
        for ix in [a, b] {
            ix.clear_slot0();
            // SAFETY: empty and no longer used.
            unsafe { give_back(ix as *const OwnedIndex as *mut OwnedIndex) };
        }
    }

    #[test]
    fn slabs_of_superslabs_8_mib_apart_keep_their_slots() {
        // glibc-thread's threads had slabs in SuperSlabs 8 MiB apart (the
        // chunks between their 8 MiB stacks); with 128 slots they took each
        // other's slots and a third of `free`'s time went to the registry path.
        let first = 0x7f00_0000_0000 + 5 * SLAB_SIZE;
        let slabs: Vec<usize> = (0..2)
            .flat_map(|k| (0..8).map(move |i| first + k * (8 << 20) + i * 3 * SLAB_SIZE))
            .collect();
        each_keeps_its_slot(&slabs);
    }

    #[test]
    fn every_slab_of_a_40_mib_stretch_keeps_its_slot() {
        // bench_random_mixed with 65,536 slots held about 22 MiB of slabs;
        // with 256 slots (16 MiB) slabs 16 MiB apart displaced each other
        // and half of its frees took the registry path.
        let first = 0x7f00_0000_0000 + 7 * SLAB_SIZE;
        let slabs: Vec<usize> = (0..(40 << 20) / SLAB_SIZE)
            .map(|i| first + i * SLAB_SIZE)
            .collect();
        each_keeps_its_slot(&slabs);
    }

    #[test]
    fn a_pointer_off_the_16_byte_grid_is_no_block_of_the_index() {
        let ix = fresh_index();
        let a = 0x7f00_0000_0000 + 9 * SLAB_SIZE;
        ix.insert(a, BIN_MASK);
        for off in [0, 16, 4096, SLAB_SIZE - 16] {
            assert_eq!(ix.bin_of_block(a + off), Some(BIN_MASK), "offset {off}");
            for low in 1..=GRID_BITS {
                // `free` sends such a pointer to the path that refuses it.
                assert_eq!(ix.bin_of_block(a + off + low), None, "offset {off} + {low}");
            }
        }
        ix.remove(a);
        // SAFETY: empty and no longer used.
        unsafe { give_back(ix as *const OwnedIndex as *mut OwnedIndex) };
    }

    #[test]
    fn no_address_matches_an_empty_index_not_even_the_lowest() {
        let ix = fresh_index();
        let slot0 = 0x7f00_0000_0000; // a multiple of 64 MiB: slot 0
        for base in [0, slot0, slot0 + SLOTS * SLAB_SIZE] {
            for off in (0..SLAB_SIZE).step_by(16) {
                // An empty slot 0 would take these for blocks of bin 0.
                assert_eq!(ix.bin_of_block(base + off), None, "{:#x}", base + off);
            }
        }
        for addr in (SLAB_SIZE..SLOTS * SLAB_SIZE).step_by(SLAB_SIZE / 2) {
            assert_eq!(ix.bin_of_block(addr), None, "{addr:#x}");
        }
        // SAFETY: empty and no longer used.
        unsafe { give_back(ix as *const OwnedIndex as *mut OwnedIndex) };
    }

    #[test]
    fn names_a_slab_until_removed_or_displaced() {
        let ix = fresh_index();
        let a = 0x7f00_0000_0000 + 3 * SLAB_SIZE;
        // Same slot as `a`, 64 MiB on.
        let b = a + SLOTS * SLAB_SIZE;
        assert_eq!(ix.bin_of_block(a + 96), None);
        ix.insert(a, 7);
        assert_eq!(ix.bin_of_block(a), Some(7));
        assert_eq!(ix.bin_of_block(a + SLAB_SIZE - 16), Some(7));
        assert_eq!(ix.bin_of_block(a + SLAB_SIZE), None, "the next slab");
        assert_eq!(
            ix.bin_of_block(b + 96),
            None,
            "another slab in the same slot"
        );
        ix.insert(b, 0);
        assert_eq!(ix.bin_of_block(a + 96), None, "displaced");
        assert_eq!(ix.bin_of_block(b + 96), Some(0));
        ix.remove(a);
        assert_eq!(
            ix.bin_of_block(b + 96),
            Some(0),
            "removing a displaced slab leaves the slot"
        );
        ix.remove(b);
        assert!(ix.is_empty());
        // Low addresses never match an empty slot.
        assert_eq!(ix.bin_of_block(16), None);
        // SAFETY: empty and no longer used.
        unsafe { give_back(ix as *const OwnedIndex as *mut OwnedIndex) };
        let again = take();
        // SAFETY: handed out again, ours alone.
        assert!(unsafe { (*again).is_empty() });
        // SAFETY: as above.
        unsafe { give_back(again) };
    }
}
