//! SuperSlab and slab layout: carving, the owner's local free list and the
//! atomic remote list.
//!
//! A SuperSlab is a 2 MiB-aligned mapping of 32 slabs of 64 KiB. Its header
//! (the slab metadata array) occupies the first 4 KiB of slab 0, which serves
//! no blocks: slabs 1 to 31 do (`FIRST_SLAB`). So no slab a thread owns
//! starts where a header does, and an owner's `free` needs no test of its own
//! that the pointer is not in one: the owned index, keyed by slab start,
//! cannot name a header (four of the 44 instructions of its fast path; the
//! rest of slab 0 is address space, decommitted whenever the chunk comes
//! from the chunk cache: `pool::map_superslab`). Block addresses
//! are `slab start + colour + i * block size`. The colour (0..15 cache lines,
//! by the slab's place) staggers where blocks start: without it the blocks of a
//! 1024-byte bin all began at one of 4 of the 64 L1 sets and 128 of the 2,048
//! sets of a 1 MiB L2, so the lines every malloc, free and user touch first
//! competed for a sixteenth of the cache. Slabs of the aligned bins
//! (`class::aligned_bin`) are not coloured: their blocks are aligned to their
//! size.
//!
//! A slab knows nothing of the pool: it counts `used` and reports EMPTY to
//! its caller, and the pool's recycle boundary decides.

use crate::class::{is_colored, is_multiple_of_bin, BINS, BIN_SIZES};
use crate::hardening;
use crate::registry::CHUNK;
use crate::segment::{SegHeader, SegKind};
// The states are defined once, where hakctl reads them too.
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use hakmem_common::levels as lv;

pub const SS_SIZE: usize = CHUNK;
pub const SLAB_SHIFT: u32 = 16;
pub const SLAB_SIZE: usize = 1 << SLAB_SHIFT;
pub const SLABS_PER_SS: usize = SS_SIZE / SLAB_SIZE;
pub const SS_HEADER_RESERVE: usize = 4096;
/// The first slab that serves blocks (slab 0 holds the header; see above).
pub const FIRST_SLAB: usize = 1;
/// Slabs of a SuperSlab that serve blocks.
pub const SERVING_SLABS: usize = SLABS_PER_SS - FIRST_SLAB;

/// The remote list is one word: the head block's address in the low
/// `REMOTE_ADDR_BITS` bits, the list's length above them. One CAS pushes a
/// block and counts it, and one swap gives the owner the list and its exact
/// length, so the owner can hand the list on without walking it (each block
/// on it was last written by another core: a miss per step).
pub const REMOTE_ADDR_BITS: u32 = 48;
const REMOTE_ADDR_MASK: u64 = (1 << REMOTE_ADDR_BITS) - 1;
// The length field holds any slab's capacity.
const _: () = assert!(SLAB_SIZE / BIN_SIZES[0] < 1 << (64 - REMOTE_ADDR_BITS));

/// A free block (every block is at least 16 bytes): the first word links to
/// the next free block, mangled, the second holds the double-free key (see
/// `hardening`). Only these functions read or write them.
#[repr(C)]
pub struct Block {
    link: usize,
    key: usize,
}

/// Every block start is a multiple of this (tiny and legacy: 16, ACE: 64).
pub const BLOCK_ALIGN: usize = 16;

impl Block {
    /// The block after `b` on its list (null at the end). With the feature
    /// `safe-linking`, aborts if the link does not decode to an aligned
    /// address: something wrote into a free block.
    ///
    /// # Safety
    /// `b` is a block on a free list, ours to read.
    #[inline(always)]
    pub unsafe fn next(b: *mut Block) -> *mut Block {
        // SAFETY: per the contract.
        let n = hardening::mangle(b as usize, unsafe { (*b).link });
        if cfg!(feature = "safe-linking") && n & (BLOCK_ALIGN - 1) != 0 {
            corrupted_list(b as usize);
        }
        n as *mut Block
    }

    /// Links `b` to `next` (null: the end of the list).
    ///
    /// # Safety
    /// `b` is a free block, ours to write.
    #[inline(always)]
    pub unsafe fn set_next(b: *mut Block, next: *mut Block) {
        // SAFETY: per the contract.
        unsafe { (*b).link = hardening::mangle(b as usize, next as usize) };
    }

    /// With the double-free check on (`check`: `hardening::check_frees()`,
    /// or the thread cache's copy), marks `b` free (its key), or returns
    /// false if it already was (a double free, for the caller to report).
    ///
    /// # Safety
    /// `b` is a block start that its user hands back.
    #[inline(always)]
    #[must_use]
    pub unsafe fn mark_free(b: *mut Block, check: bool) -> bool {
        if !check {
            // Neither the read nor the write: with a link already written to
            // a line that missed, a second store to it cost 20% where frees
            // touch cold blocks (the store buffer fills; `docs/hardening.md`).
            return true;
        }
        let key = hardening::free_key(b as usize);
        // SAFETY: per the contract; every block has a second word.
        unsafe {
            if (*b).key == key {
                return false;
            }
            (*b).key = key;
        }
        true
    }

    /// With the double-free check on (`check`, as for `mark_free`), clears
    /// `b`'s key: it goes to a user. (Without it no key was written; the
    /// store cost 1% of bench_random_mixed.)
    ///
    /// # Safety
    /// `b` was just taken off a free list.
    #[inline(always)]
    pub unsafe fn mark_in_use(b: *mut Block, check: bool) {
        if check {
            // SAFETY: per the contract.
            unsafe { (*b).key = 0 };
        }
    }
}

#[cold]
#[inline(never)]
fn corrupted_list(b: usize) -> ! {
    crate::misuse::fatal(
        "malloc(): corrupted free list (a free block was overwritten)",
        b,
    )
}

/// Who holds a slab.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlabState {
    /// Never claimed (Stage 2 material); the zero of a fresh mapping.
    #[allow(dead_code)]
    Fresh = lv::SLAB_FRESH,
    /// Owned by a thread (or abandoned by an exited one, `pool::ABANDONED`), serving a class.
    InUse = lv::SLAB_IN_USE,
    /// On the shared pool's list of resident EMPTY slabs (Stage 1 material).
    Empty = lv::SLAB_EMPTY,
    /// EMPTY for the purge delay, its pages given back (see `empty_slabs`).
    Purged = lv::SLAB_PURGED,
}

/// One cache line per slab: slabs of one SuperSlab are owned by different
/// threads, and a slab straddling two lines shared each with its neighbour
/// (false sharing on every refill and drain).
#[repr(C, align(64))]
pub struct Slab {
    pub state: SlabState,
    /// The bin it serves (see `class`); its class is `class_of_bin(bin)`.
    pub bin: u8,
    /// Bytes between the slab's start and its first block (see the module doc).
    pub color: u16,
    pub block_size: u32,
    pub capacity: u32,
    /// Blocks handed out of this slab (including ones in a TLS SLL or on the remote list).
    pub used: u32,
    /// Blocks carved so far (bump index).
    pub carved: u32,
    /// When it became EMPTY (`empty_slabs::stamp`); set on the pool's lists only.
    pub emptied: u32,
    /// Owner-local free list; its length is `carved - used`.
    pub free: *mut Block,
    /// Frees from other threads, drained by the owner: head and length in
    /// one word (see `REMOTE_ADDR_BITS`). Its blocks still count in `used`.
    remote: AtomicU64,
    /// Owning thread id (0: none, `pool::ABANDONED`: its thread exited).
    pub owner: AtomicUsize,
    /// Links: the owner's per-class list, or the pool's empty list.
    pub next: *mut Slab,
    pub prev: *mut Slab,
}

#[repr(C)]
pub struct SuperSlab {
    pub hdr: SegHeader,
    /// Slabs claimed so far (Stage 2 cursor): `slabs[FIRST_SLAB..][..claimed]`.
    /// Pool lock.
    pub claimed: u32,
    /// Claimed slabs currently on the empty list. Pool lock.
    pub empty: u32,
    /// The pool's list of SuperSlabs with unclaimed slots. Pool lock.
    pub next_fresh: *mut SuperSlab,
    pub slabs: [Slab; SLABS_PER_SS],
}

const _: () = assert!(core::mem::size_of::<SuperSlab>() <= SS_HEADER_RESERVE);
const _: () = assert!(core::mem::size_of::<Slab>() == 64);

impl SuperSlab {
    /// How far from its start the SuperSlab's resident pages can reach: to
    /// the end of its last claimed slab that was not purged (the header's
    /// page if all were). What a retiring SuperSlab tells the chunk cache.
    pub fn resident_extent(&self) -> usize {
        (FIRST_SLAB..FIRST_SLAB + self.claimed as usize)
            .rev()
            .find(|&i| self.slabs[i].state != SlabState::Purged)
            .map_or(SS_HEADER_RESERVE, |i| (i + 1) * SLAB_SIZE)
    }

    /// The metadata of the slabs claimed so far of the SuperSlab at `ss`, in
    /// the order they were claimed. Pointers, not references: other threads
    /// own slabs of a SuperSlab and write their metadata meanwhile.
    ///
    /// # Safety
    /// `ss` is a live SuperSlab of the pool, whose lock the caller holds
    /// (`claimed` does not change).
    pub unsafe fn claimed_slabs(ss: *mut SuperSlab) -> impl Iterator<Item = *mut Slab> {
        // SAFETY: per the contract.
        let claimed = unsafe { (*ss).claimed } as usize;
        // SAFETY: i < FIRST_SLAB + SERVING_SLABS = SLABS_PER_SS, inside the
        // live header per the contract; the place is only named, not read.
        (FIRST_SLAB..FIRST_SLAB + claimed)
            .map(move |i| unsafe { core::ptr::addr_of_mut!((*ss).slabs[i]) })
    }

    /// Whether a SuperSlab at `base` can serve: its blocks' addresses must fit
    /// the remote list's address field. (Linux maps above 2^47 only when a
    /// hint asks for it.)
    pub fn addressable(base: usize) -> bool {
        (base + SS_SIZE) as u64 <= 1 << REMOTE_ADDR_BITS
    }

    /// Writes a fresh header into a chunk: a new mapping, or one the large
    /// cache kept (an earlier SuperSlab, ACE segment or large block), so
    /// every byte of the header is written.
    ///
    /// # Safety
    /// `base` is a writable, SS_SIZE-aligned mapping of SS_SIZE bytes owned by the caller.
    pub unsafe fn init(base: *mut u8) -> *mut SuperSlab {
        let ss = base as *mut SuperSlab;
        // SAFETY: per the contract the header area is ours and writable. All
        // zero bytes are a valid (Fresh, null) Slab, so only the non-zero
        // fields are written after the zeroing.
        unsafe {
            core::ptr::write_bytes(ss, 0, 1);
            core::ptr::addr_of_mut!((*ss).hdr).write(SegHeader::new(SegKind::SuperSlab, 0));
        }
        ss
    }
}

/// Colour of slab `idx` of the SuperSlab at `ss`: 0..15 cache lines. Slabs
/// are claimed in order, and 5 is prime to 16, so consecutive slabs (and the
/// same slab of consecutive SuperSlabs) get different colours.
#[inline(always)]
fn slab_color(ss: usize, idx: usize) -> usize {
    ((idx * 5 + (ss >> 21) * 3) % 16) * 64
}

/// Whether `p`, a pointer into a slab in use of `bin` (so never slab 0, the
/// header's: callers check the slab's state first), is where one of its
/// blocks starts (not inside a block or in the colour pad): from the
/// address and the bin, as `Slab::format` lays the blocks out. A few shifts
/// and a multiply (see `hardening`).
#[inline(always)]
pub fn is_block_start(p: usize, bin: usize) -> bool {
    let ss = p & !(SS_SIZE - 1);
    let idx = (p - ss) >> SLAB_SHIFT;
    let color = if is_colored(bin) {
        slab_color(ss, idx)
    } else {
        0
    };
    let in_slab = p & (SLAB_SIZE - 1);
    // Wraps (and fails) in the colour's pad; the last block ends in the slab.
    let off = in_slab.wrapping_sub(color);
    debug_assert!(bin < BINS);
    // SAFETY: bins come from slab metadata, which holds only bin numbers
    // below BINS.
    let size = unsafe { *BIN_SIZES.get_unchecked(bin) };
    off < SLAB_SIZE && in_slab + size <= SLAB_SIZE && is_multiple_of_bin(off as u32, bin)
}

/// The index in its SuperSlab of the slab whose metadata is at `meta`.
fn meta_index(meta: usize) -> usize {
    let ss = crate::segment::chunk_of(meta);
    (meta - ss - core::mem::offset_of!(SuperSlab, slabs)) / core::mem::size_of::<Slab>()
}

/// A slab named in 32 bits, its SuperSlab's number and its index there:
/// what the thread cache keeps per bin, as it must stay small (see `tls`).
/// SuperSlabs lie below 2^REMOTE_ADDR_BITS, so the number fits; 0 names no
/// slab (no SuperSlab starts at address 0).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SlabRef(u32);

const _: () =
    assert!(REMOTE_ADDR_BITS - SS_SIZE.trailing_zeros() + SLABS_PER_SS.trailing_zeros() <= 32);

impl SlabRef {
    pub const NONE: SlabRef = SlabRef(0);

    pub fn new(slab: *mut Slab) -> SlabRef {
        if slab.is_null() {
            return SlabRef::NONE;
        }
        let ss = crate::segment::chunk_of(slab as usize);
        SlabRef(((ss / SS_SIZE) * SLABS_PER_SS + meta_index(slab as usize)) as u32)
    }

    /// The slab's metadata; null for NONE.
    pub fn get(self) -> *mut Slab {
        if self == SlabRef::NONE {
            return core::ptr::null_mut();
        }
        let n = self.0 as usize;
        slab_of((n / SLABS_PER_SS) * SS_SIZE + (n % SLABS_PER_SS) * SLAB_SIZE).1
    }

    /// The 32 bits (for a copy kept in an atomic).
    pub const fn raw(self) -> u32 {
        self.0
    }

    pub const fn from_raw(raw: u32) -> SlabRef {
        SlabRef(raw)
    }

    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
}

/// The SuperSlab and slab holding `ptr` (which must lie in a SuperSlab segment).
#[inline(always)]
pub fn slab_of(ptr: usize) -> (*mut SuperSlab, *mut Slab, usize) {
    let ss = crate::segment::chunk_of(ptr);
    let idx = (ptr - ss) >> SLAB_SHIFT;
    let ssp = ss as *mut SuperSlab;
    // SAFETY: idx < SLABS_PER_SS because ptr - ss < SS_SIZE; the pointer is
    // only formed here, dereferenced by callers that know ss is a SuperSlab.
    let slab = unsafe { core::ptr::addr_of_mut!((*ssp).slabs[idx]) };
    (ssp, slab, idx)
}

impl Slab {
    /// Where the remote list's word lies (hakctl reads its length).
    pub const REMOTE_AT: usize = core::mem::offset_of!(Slab, remote);

    /// The SuperSlab this slab belongs to.
    pub fn superslab(&self) -> *mut SuperSlab {
        crate::segment::chunk_of(self as *const _ as usize) as *mut SuperSlab
    }

    fn index(&self) -> usize {
        meta_index(self as *const _ as usize)
    }

    pub fn area(&self) -> usize {
        // No serving slab holds the header: its blocks start at its first
        // byte and the colour.
        debug_assert!(self.index() >= FIRST_SLAB);
        self.base() + self.color as usize
    }

    /// The slab's first byte.
    pub fn base(&self) -> usize {
        self.superslab() as usize + self.index() * SLAB_SIZE
    }

    /// One past the slab's last byte.
    fn end(&self) -> usize {
        self.base() + SLAB_SIZE
    }

    /// Gives the pages of an EMPTY slab back to the OS (`os::decommit`);
    /// they read as zero when touched again. Returns the bytes given back.
    /// Its free list lay in those pages: only `format` may follow.
    pub fn purge(&self) -> usize {
        let start = self.base();
        let end = self.end();
        // SAFETY: the slab's part of its SuperSlab's mapping, with no block
        // out (the pool holds it EMPTY); the header lies before `start`.
        // (Refused, the pages keep their bytes: `format` writes what it
        // reads, and tiny blocks are never taken for zero.)
        let _ = unsafe { crate::os::decommit(start as *mut u8, end - start) };
        end - start
    }

    /// Faults in the slab's block area in one syscall (`os::populate`):
    /// for a slab that a growing program will fill.
    pub fn populate(&self) {
        let area = self.area();
        // SAFETY: the area is this slab's part of its SuperSlab's mapping.
        unsafe { crate::os::populate(area as *mut u8, self.end() - area) };
    }

    /// Prepares the slab to serve `bin` for `owner`.
    pub fn format(&mut self, bin: usize, owner: usize) {
        let block_size = BIN_SIZES[bin];
        let idx = self.index();
        let color = if is_colored(bin) {
            slab_color(self.superslab() as usize, idx)
        } else {
            0
        };
        self.state = SlabState::InUse;
        self.bin = bin as u8;
        self.color = color as u16;
        self.block_size = block_size as u32;
        self.capacity = ((self.end() - self.area()) / block_size) as u32;
        self.used = 0;
        self.carved = 0;
        self.free = null_mut();
        self.remote.store(0, Ordering::Relaxed);
        self.owner.store(owner, Ordering::Release);
        self.next = null_mut();
        self.prev = null_mut();
    }

    /// Moves blocks onto the singly linked list at `*head`: the whole free
    /// list without walking it when `*head` is empty and the list holds at
    /// most `whole_max`, else up to `want`. Returns how many. Owner only.
    pub fn take_batch(&mut self, want: u32, whole_max: u32, head: &mut *mut Block) -> u32 {
        let free_len = self.carved.saturating_sub(self.used);
        if head.is_null() && !self.free.is_null() && free_len <= whole_max {
            *head = self.free;
            self.free = null_mut();
            self.used += free_len;
            return free_len;
        }
        let mut n = 0;
        while n < want && !self.free.is_null() {
            let b = self.free;
            // SAFETY: blocks on the owner's free list are ours and unused; the
            // first word holds the link.
            unsafe {
                self.free = Block::next(b);
                Block::set_next(b, *head);
            }
            *head = b;
            n += 1;
        }
        if n < want && self.carved < self.capacity {
            let area = self.area();
            let bs = self.block_size as usize;
            let take = (want - n).min(self.capacity - self.carved);
            // Highest first, so that the list hands blocks out in address
            // order: a program that walks its blocks in the order it made
            // them then walks memory forwards, as prefetchers expect.
            for i in (0..take).rev() {
                let b = (area + (self.carved + i) as usize * bs) as *mut Block;
                // SAFETY: an uncarved block inside this slab's area, never handed out.
                unsafe { Block::set_next(b, *head) };
                *head = b;
            }
            self.carved += take;
            n += take;
        }
        self.used += n;
        n
    }

    /// Returns one block to the owner's free list. Returns true if the slab became EMPTY.
    /// Owner only.
    #[inline]
    pub fn give_back(&mut self, b: *mut Block) -> bool {
        if self.used == 0 {
            // More blocks came back than went out: some block was freed twice.
            crate::misuse::invalid_free(
                "free(): double free detected (slab over-freed)",
                b as usize,
            );
            return false;
        }
        // SAFETY: `b` is a block of this slab that its user has freed.
        unsafe { Block::set_next(b, self.free) };
        self.free = b;
        self.used -= 1;
        self.used == 0
    }

    /// Blocks on the remote list now (other threads may add to it meanwhile).
    #[inline]
    pub fn remote_len(&self) -> u32 {
        (self.remote.load(Ordering::Relaxed) >> REMOTE_ADDR_BITS) as u32
    }

    /// Pushes a block freed by a non-owner thread. Any thread.
    #[inline]
    pub fn push_remote(&self, b: *mut Block) {
        debug_assert!(b as u64 & !REMOTE_ADDR_MASK == 0);
        let mut old = self.remote.load(Ordering::Relaxed);
        loop {
            // SAFETY: `b` was freed by its user and is ours to link.
            unsafe { Block::set_next(b, (old & REMOTE_ADDR_MASK) as *mut Block) };
            let new = b as u64 | ((old >> REMOTE_ADDR_BITS) + 1) << REMOTE_ADDR_BITS;
            match self
                .remote
                .compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(h) => old = h,
            }
        }
    }

    /// Moves the remote list onto the local free list and subtracts its
    /// length from `used`; returns that length. Owner only. With an empty free
    /// list (a refill's case) this is O(1): the list becomes the free list,
    /// unwalked.
    pub fn drain_remote(&mut self) -> u32 {
        if !self.has_remote() {
            return 0;
        }
        let word = self.remote.swap(0, Ordering::Acquire);
        let list = (word & REMOTE_ADDR_MASK) as *mut Block;
        let n = (word >> REMOTE_ADDR_BITS) as u32;
        if self.free.is_null() {
            self.free = list;
        } else {
            let mut tail = list;
            // SAFETY: the swap gave us exclusive ownership of the n >= 1 blocks.
            unsafe {
                for _ in 1..n {
                    tail = Block::next(tail);
                }
                Block::set_next(tail, self.free);
            }
            self.free = list;
        }
        if n > self.used {
            crate::misuse::invalid_free(
                "free(): double free detected (remote frees exceed blocks out)",
                self.free as usize,
            );
            self.used = n;
        }
        self.used -= n;
        n
    }

    pub fn has_free(&self) -> bool {
        !self.free.is_null() || self.carved < self.capacity
    }

    /// The slab's invariants (feature `invariants`), as its owner sees it:
    /// counts within capacity, the free list `carved - used` long, each of
    /// its blocks a block start of this slab. Owner only (it walks the free
    /// list).
    #[cfg(any(test, feature = "invariants"))]
    pub fn check(&self) -> Result<(), &'static str> {
        if self.state != SlabState::InUse {
            return Err("invariant: a slab in a thread's hands is not in use");
        }
        if self.carved > self.capacity || self.used > self.carved {
            return Err("invariant: slab counts out of order (used <= carved <= capacity)");
        }
        let (mut b, mut n) = (self.free, 0u32);
        while !b.is_null() {
            let p = b as usize;
            if p < self.area() || p >= self.end() || !is_block_start(p, self.bin as usize) {
                return Err("invariant: a slab's free list holds no block of it");
            }
            n += 1;
            if n > self.carved - self.used {
                return Err("invariant: a slab's free list is longer than carved - used");
            }
            // SAFETY: a block of this slab on its owner's free list.
            b = unsafe { Block::next(b) };
        }
        if n != self.carved - self.used {
            return Err("invariant: a slab's free list is shorter than carved - used");
        }
        Ok(())
    }

    pub fn has_remote(&self) -> bool {
        self.remote.load(Ordering::Relaxed) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os;

    /// A SuperSlab on a fresh chunk of its own (not the pool's, registered
    /// nowhere), and its base.
    fn fresh_superslab() -> (*mut u8, *mut SuperSlab) {
        let base = os::map_chunk();
        assert!(!base.is_null());
        // SAFETY: a fresh SS_SIZE-aligned mapping of ours.
        (base, unsafe { SuperSlab::init(base) })
    }

    fn slab_at(ss: *mut SuperSlab, idx: usize) -> &'static mut Slab {
        // SAFETY: a slab of a SuperSlab from `fresh_superslab`, which only
        // the calling test uses.
        unsafe { &mut *core::ptr::addr_of_mut!((*ss).slabs[idx]) }
    }

    #[test]
    fn the_slab_checker_finds_counts_and_lists_that_disagree() {
        let (base, ss) = fresh_superslab();
        // SAFETY: slab 3 of our SuperSlab.
        let s = unsafe { &mut *core::ptr::addr_of_mut!((*ss).slabs[3]) };
        s.format(2, 7);
        let mut head = null_mut();
        assert_eq!(s.take_batch(10, 10, &mut head), 10);
        assert_eq!(s.check(), Ok(()));
        // Blocks given back: the free list and `used` agree.
        for _ in 0..4 {
            let b = head;
            // SAFETY: blocks of the batch above.
            head = unsafe { Block::next(b) };
            s.give_back(b);
        }
        assert_eq!(s.check(), Ok(()));
        s.used += 1;
        assert!(s.check().unwrap_err().contains("longer"));
        s.used -= 2;
        assert!(s.check().unwrap_err().contains("shorter"));
        s.used += 1;
        s.carved = s.capacity + 1;
        assert!(s.check().unwrap_err().contains("counts"));
        // SAFETY: ours, nothing refers to it.
        unsafe { os::unmap(base, SS_SIZE) };
    }

    #[test]
    fn a_slab_ref_names_its_slab_and_none_names_none() {
        let (base, ss) = fresh_superslab();
        for idx in [0, 1, SLABS_PER_SS - 1] {
            let slab: *mut Slab = slab_at(ss, idx);
            let r = SlabRef::new(slab);
            assert!(!r.is_none());
            assert_eq!(r.get(), slab, "slab {idx}");
            // SAFETY: the slab's metadata, formatted by nobody: base() reads no field.
            assert_eq!(unsafe { (*slab).base() }, base as usize + idx * SLAB_SIZE);
        }
        assert!(SlabRef::new(core::ptr::null_mut()).is_none());
        assert!(SlabRef::NONE.get().is_null());
        // SAFETY: the test's own chunk, unused now.
        unsafe { os::unmap(base, SS_SIZE) };
    }

    #[test]
    fn a_populated_slab_has_its_whole_area_resident_and_no_more() {
        let (base, ss) = fresh_superslab();
        let slab = slab_at(ss, 3);
        slab.format(crate::class::tiny_bin(100), 7);
        let start = base as usize + 3 * SLAB_SIZE;
        assert_eq!(os::resident_bytes(start, 3 * SLAB_SIZE), Some(0));
        slab.populate();
        // The colour's lines before the first block share its page.
        assert_eq!(os::resident_bytes(start, SLAB_SIZE), Some(SLAB_SIZE));
        assert_eq!(
            os::resident_bytes(start + SLAB_SIZE, 2 * SLAB_SIZE),
            Some(0)
        );
        assert_eq!(os::resident_bytes(start - SLAB_SIZE, SLAB_SIZE), Some(0));
        // SAFETY: ours, unused by anything else.
        unsafe { os::unmap(base, SS_SIZE) };
    }

    #[test]
    fn a_purged_slab_has_no_page_resident_and_the_extent_ends_before_it() {
        let (base, ss) = fresh_superslab();
        // SAFETY: ours alone (see `fresh_superslab`).
        unsafe { (*ss).claimed = 4 };
        let serving = FIRST_SLAB..FIRST_SLAB + 4;
        for i in serving.clone() {
            let slab = slab_at(ss, i);
            slab.format(crate::class::tiny_bin(100), 7);
            slab.populate();
            slab.state = SlabState::Empty;
        }
        let last = serving.end - 1;
        assert_eq!(
            os::resident_bytes(base as usize, FIRST_SLAB * SLAB_SIZE),
            Some(SS_HEADER_RESERVE),
            "of slab 0 only the header's page is touched"
        );
        // SAFETY: as above.
        let extent = || unsafe { (*ss).resident_extent() };
        assert_eq!(extent(), serving.end * SLAB_SIZE);
        let start = base as usize + last * SLAB_SIZE;
        assert_eq!(slab_at(ss, last).purge(), SLAB_SIZE);
        assert_eq!(os::resident_bytes(start, SLAB_SIZE), Some(0));
        assert_eq!(
            os::resident_bytes(start - SLAB_SIZE, SLAB_SIZE),
            Some(SLAB_SIZE),
            "its neighbour keeps its pages"
        );
        slab_at(ss, last).state = SlabState::Purged;
        assert_eq!(extent(), last * SLAB_SIZE);
        for i in FIRST_SLAB..last {
            slab_at(ss, i).purge();
            slab_at(ss, i).state = SlabState::Purged;
        }
        assert_eq!(extent(), SS_HEADER_RESERVE, "the header's page stays");
        assert_eq!(os::resident_bytes(base as usize, SS_SIZE), Some(4096));
        // SAFETY: ours, unused by anything else.
        unsafe { os::unmap(base, SS_SIZE) };
    }

    #[test]
    fn slabs_of_a_bin_start_their_blocks_on_different_cache_lines_but_aligned_bins_do_not() {
        use crate::class::{aligned_bin, tiny_bin};
        let (base, ss) = fresh_superslab();
        let slab_at = |idx: usize| slab_at(ss, idx);
        let mut starts = std::collections::HashSet::new();
        for idx in 1..=16 {
            let slab = slab_at(idx);
            slab.format(tiny_bin(1024), 7);
            starts.insert(slab.area() % 4096);
            let end = base as usize + (idx + 1) * SLAB_SIZE;
            assert!(slab.area() + slab.capacity as usize * 1024 <= end);
            assert!(slab.capacity >= 63);
        }
        assert_eq!(starts.len(), 16, "16 consecutive slabs, 16 colours");
        for need in [128, 256, 512, 1024] {
            let slab = slab_at(17);
            slab.format(aligned_bin(need), 7);
            assert_eq!(slab.block_size as usize, need);
            assert_eq!(slab.area() % need, 0);
            assert_eq!(slab.capacity as usize, SLAB_SIZE / need);
        }
        // SAFETY: the mapping is ours and nothing in it is in use.
        unsafe { os::unmap(base, SS_SIZE) };
    }

    /// Carved batches hand blocks out in address order, batch after batch:
    /// a program that walks its blocks in the order made walks forwards.
    #[test]
    fn carved_blocks_come_out_in_address_order() {
        let (base, ss) = fresh_superslab();
        let slab = slab_at(ss, 1);
        slab.format(4, 7); // bin 4: 64-byte blocks
        let mut handed_out = Vec::new();
        for _ in 0..3 {
            let mut head = null_mut();
            assert_eq!(slab.take_batch(64, 0, &mut head), 64);
            while !head.is_null() {
                handed_out.push(head as usize);
                // SAFETY: walking the list take_batch built.
                head = unsafe { Block::next(head) };
            }
        }
        let expected: Vec<usize> = (0..3 * 64).map(|i| slab.area() + i * 64).collect();
        assert_eq!(handed_out, expected);
        // SAFETY: the mapping is ours and nothing in it is in use.
        unsafe { os::unmap(base, SS_SIZE) };
    }

    /// Blocks pushed from several threads at once come back in one drain with
    /// their exact count, each block once, and `used` falls by that count.
    #[test]
    fn concurrent_remote_frees_drain_with_their_exact_count() {
        const THREADS: usize = 4;
        let (base, ss) = fresh_superslab();
        let slab = slab_at(ss, 1);
        slab.format(4, 7); // bin 4: 64-byte blocks, about 1024 of them
        let mut head = null_mut();
        let mut taken = 0;
        while taken < slab.capacity {
            taken += slab.take_batch(64, 0, &mut head);
        }
        assert_eq!((taken, slab.used), (slab.capacity, slab.capacity));
        let mut blocks = Vec::new();
        while !head.is_null() {
            blocks.push(head as usize);
            // SAFETY: walking the list take_batch built.
            head = unsafe { Block::next(head) };
        }
        let per_thread = blocks.len() / THREADS;
        let slab_addr = slab as *mut Slab as usize;
        std::thread::scope(|s| {
            for chunk in blocks.chunks(per_thread) {
                s.spawn(move || {
                    // SAFETY: the slab outlives the scope; push_remote takes &self.
                    let slab = unsafe { &*(slab_addr as *const Slab) };
                    for &b in chunk {
                        slab.push_remote(b as *mut Block);
                    }
                });
            }
        });
        let n = slab.drain_remote();
        assert_eq!(n as usize, blocks.len());
        assert_eq!(slab.used, 0);
        let mut seen = std::collections::HashSet::new();
        let mut cur = slab.free;
        while !cur.is_null() {
            assert!(seen.insert(cur as usize), "a block came back twice");
            // SAFETY: walking the drained free list.
            cur = unsafe { Block::next(cur) };
        }
        assert_eq!(seen.len(), blocks.len());
        assert!(!slab.has_remote());
        // A refill into an empty cache takes the whole list when it is short enough...
        let mut head = null_mut();
        assert_eq!(slab.take_batch(16, 2048, &mut head), slab.capacity);
        assert_eq!((slab.used, slab.free), (slab.capacity, null_mut()));
        // ...and a batch of `want` when it is not.
        for &b in &blocks[..100] {
            assert!(!slab.give_back(b as *mut Block));
        }
        let mut head = null_mut();
        assert_eq!(slab.take_batch(16, 32, &mut head), 16);
        // SAFETY: the mapping is ours and nothing refers to it any more.
        unsafe { os::unmap(base, SS_SIZE) };
    }
}
