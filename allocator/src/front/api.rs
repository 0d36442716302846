//! The front: size -> class, and routing to tiny / ACE / large; a freed
//! pointer classified once (`place`) and handed to its tier. These are the C
//! allocation semantics; `capi` exports them unprefixed, `HakMem` wraps them.
//!
//! The front hands each tier its part of the thread state (`thread`), and
//! its slow paths call `lifecycle` first (initialisation, registration,
//! upkeep): no tier calls upward.

use super::place::{self, Place};
use crate::class::{aligned_bin, tiny_bin, ACE_MAX, BIN_SIZES, TINY_MAX};
use crate::superslab::{is_block_start, SlabState};
use crate::thread::{self, with_cache};
use crate::tiny::Push;
use crate::{ace, chunks, large, legacy, lifecycle, misuse, os, parcel, pool, tiny};
use core::ptr::null_mut;

/// Alignment every malloc result has (glibc's too).
const MIN_ALIGN: usize = 16;
/// A block that `realloc` must move to grow past this goes to a parcel (past
/// `parcel::MAX`, or with a larger alignment, to the large path).
const GROW_IN_CHUNK: usize = 32 * 1024;

use crate::errno::set as set_errno;

/// `malloc`. Null with errno ENOMEM on failure.
///
/// # Safety
/// None beyond the C contract; unsafe because it hands out raw memory.
#[inline]
pub unsafe fn malloc(size: usize) -> *mut u8 {
    if size <= TINY_MAX {
        let p = with_cache(|tc| tiny::alloc_cached(&mut tc.tiny, tiny_bin(size)));
        if !p.is_null() {
            return p;
        }
    }
    // A tail call: the path above needs no stack frame.
    malloc_uncached(size)
}

/// `malloc` past the thread cache: a tiny refill, ACE or the large path.
#[inline(never)]
fn malloc_uncached(size: usize) -> *mut u8 {
    let p = if size <= TINY_MAX {
        tiny_refill(tiny_bin(size))
    } else {
        alloc_above_tiny(size)
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

/// A block of tiny bin `bin`.
#[inline]
fn tiny_alloc(bin: usize) -> *mut u8 {
    let p = with_cache(|tc| tiny::alloc_cached(&mut tc.tiny, bin));
    if !p.is_null() {
        return p;
    }
    tiny_refill(bin)
}

#[cold]
#[inline(never)]
fn tiny_refill(bin: usize) -> *mut u8 {
    lifecycle::before_refill();
    retried_after_refusal(|| with_cache(|tc| tc.tiny.refill(tc.mode, bin)))
}

/// Runs `alloc`, and once more if it came back null (the pointer it
/// returns, `Allocated::ptr`) because a mapping was refused meanwhile and
/// `lifecycle::after_refusal` gave something back (the pool's idle
/// SuperSlabs, the chunk cache). The retry is behind that cold call: this
/// adds a load and a branch to the slow paths it wraps.
#[inline(always)]
fn retried_after_refusal<T: Allocated>(mut alloc: impl FnMut() -> T) -> T {
    let refusals = os::refusals();
    let r = alloc();
    if r.ptr().is_null() && lifecycle::after_refusal(refusals) {
        return alloc();
    }
    r
}

/// What an allocation path returns: its block first.
trait Allocated {
    fn ptr(&self) -> *mut u8;
}

impl Allocated for *mut u8 {
    fn ptr(&self) -> *mut u8 {
        *self
    }
}

impl<T> Allocated for (*mut u8, T) {
    fn ptr(&self) -> *mut u8 {
        self.0
    }
}

fn alloc_above_tiny(size: usize) -> *mut u8 {
    above_tiny(size).0
}

/// A block of `size` (> TINY_MAX) from ACE or the large path, and how many
/// of its first bytes may hold anything but zero (what `calloc` clears):
/// all of them, but none of a large block fresh from the OS and only the
/// first two words of an ACE block carved from untouched pages.
#[inline(always)]
fn above_tiny(size: usize) -> (*mut u8, usize) {
    if size <= ACE_MAX {
        let (p, zero) = ace_alloc(size);
        if !p.is_null() {
            return (p, if zero { ace::CARVE_WRITES } else { size });
        }
    }
    let (p, zeroed) = large_alloc(size, MIN_ALIGN);
    (p, if zeroed { 0 } else { size })
}

/// A block of `size` (TINY_MAX < size <= ACE_MAX) from ACE, and whether it
/// reads as zero past `ace::CARVE_WRITES` (`AceCache::refill`); null if ACE
/// failed (its `ace_fail` probe fired), for the large path to serve.
/// Always inlined: the mid sizes' fast path (a thread-cache pop). Left to
/// LLVM, it stopped being inlined into `malloc_uncached` when the large
/// path grew its retry after a refusal, 6 instructions a call more on
/// hakbench `mid` (benches/instructions-guard.sh).
#[inline(always)]
fn ace_alloc(size: usize) -> (*mut u8, bool) {
    let Some(class) = ace::class_for(size) else {
        return (null_mut(), false);
    };
    let p = with_cache(|tc| tc.ace.alloc_cached(class));
    if !p.is_null() {
        return (p, false);
    }
    ace_refill(class, size)
}

#[cold]
#[inline(never)]
fn ace_refill(class: usize, size: usize) -> (*mut u8, bool) {
    lifecycle::before_refill();
    with_cache(|tc| tc.ace.refill(tc.mode, class, size))
}

/// A large block (`large::alloc`), after the lifecycle's slow-path duties.
fn large_alloc(size: usize, align: usize) -> (*mut u8, bool) {
    lifecycle::before_slow_path();
    retried_after_refusal(|| large::alloc(size, align))
}

/// `free`. Aborts (or logs, `HAKMEM_INVALID_FREE=ignore`) on a pointer hakmem
/// can tell it never handed out or already took back.
///
/// # Safety
/// `ptr` is null or a live block from this allocator.
#[inline(always)]
pub unsafe fn free(ptr: *mut u8) {
    if ptr.is_null() {
        return;
    }
    let p = ptr as usize;
    // A block of this thread's own slabs first, from its index alone (which
    // names no SuperSlab header: no serving slab holds one, `FIRST_SLAB`).
    // SAFETY: this thread's cache, the only reference while it lives; the
    // block per the contract.
    match unsafe { tiny::free_owned(&mut thread::cache().tiny, ptr) } {
        Push::Done => return,
        Push::OverLimit(bin) => return tiny_overflow(bin),
        Push::NotOurs => {}
    }
    match place::by_registry(p) {
        Ok(Place::Slab(slab)) => {
            // SAFETY: the registry vouched for the SuperSlab; the slab's
            // format fields do not change while any of its blocks is out.
            let s = unsafe { &*slab };
            if s.state != SlabState::InUse || !is_block_start(p, s.bin as usize) {
                return misuse::invalid_free("free(): invalid pointer", p);
            }
            // SAFETY: a block of an in-use slab, freed by its user.
            let pushed =
                with_cache(|tc| unsafe { tiny::free_if_owner(&mut tc.tiny, tc.mode, ptr, slab) });
            match pushed {
                Push::Done => {}
                Push::OverLimit(bin) => tiny_overflow(bin),
                // SAFETY: as above; another thread's slab.
                Push::NotOurs => match unsafe { tiny::free_remote(ptr, slab) } {
                    tiny::Remote::Done => {}
                    // SAFETY: as above; the block still pins the slab.
                    tiny::Remote::Take => with_cache(|tc| unsafe {
                        tiny::take_slab(&mut tc.tiny, tc.mode, ptr, slab)
                    }),
                },
            }
        }
        Ok(Place::Ace(class)) if ace::is_block_start(p, class) => ace_free(ptr, class),
        Ok(Place::Ace(class)) => free_ace_off_grid(p, class),
        Ok(_) => misuse::invalid_free("free(): invalid pointer", p),
        Err(byte) => free_in_segment(p, byte),
    }
}

/// The thread's list of tiny bin `bin` went over its limit.
#[cold]
#[inline(never)]
fn tiny_overflow(bin: usize) {
    with_cache(|tc| tc.tiny.overflow(tc.mode, bin));
}

/// Frees an ACE block of `class` into the thread's cache.
#[inline(always)]
fn ace_free(ptr: *mut u8, class: usize) {
    if with_cache(|tc| tc.ace.free(tc.mode, ptr, class)) {
        ace_overflow(class);
    }
}

#[cold]
#[inline(never)]
fn ace_overflow(class: usize) {
    lifecycle::before_overflow();
    if let Some(flushed) = with_cache(|tc| tc.ace.free_slow(tc.mode, class)) {
        // Outside the thread cache: the class lock, maybe the chunk cache.
        flushed.give_back();
    }
}

/// The ACE block that `p` names: its start, or the block an aligned
/// allocation was carved from (`take`: being freed); None for any other
/// pointer into the segment.
#[inline(always)]
fn ace_block(p: usize, class: usize, take: bool) -> Option<usize> {
    let start = ace::block_start(p, class)?;
    if start == p {
        return Some(p);
    }
    ace::aligned_block(p, start, take)
}

/// An ACE free of a pointer that is no block start: an aligned block carved
/// out of one, or a pointer in the header (most likely a large block freed
/// again after its chunk became this segment: they share the chunk cache),
/// in a colour pad, or inside a block.
#[cold]
#[inline(never)]
fn free_ace_off_grid(p: usize, class: usize) {
    match ace_block(p, class, true) {
        Some(b) => ace_free(b as *mut u8, class),
        None => misuse::invalid_free("free(): invalid pointer", p),
    }
}

/// A free of a pointer whose registry byte names a legacy, large or parcel
/// segment (`place::by_registry`).
#[inline(never)]
fn free_in_segment(p: usize, byte: u8) {
    match place::in_segment(byte, p) {
        Place::Legacy(bin) => {
            if !legacy::is_block_start(p, bin) {
                return misuse::invalid_free("free(): invalid pointer", p);
            }
            let pushed =
                with_cache(|tc| tiny::free_legacy(&mut tc.tiny, tc.mode, p as *mut u8, bin));
            if let Push::OverLimit(bin) = pushed {
                tiny_overflow(bin);
            }
        }
        Place::Large(chunk) => {
            if !large::is_live_block(p, chunk) {
                return misuse::invalid_free("free(): double free or invalid pointer", p);
            }
            large::free(chunk)
        }
        Place::Parcel => {
            if !parcel::free(p) {
                misuse::invalid_free("free(): double free or invalid pointer", p);
            }
        }
        // The registry names slabs and ACE segments: never here.
        Place::Slab(_) | Place::Ace(_) | Place::Foreign => {
            misuse::invalid_free("free(): invalid pointer", p)
        }
    }
}

/// `malloc_trim`: gives back to the OS the memory hakmem holds free for
/// reuse: the free segments ACE keeps, everything in the chunk cache and the
/// pages of EMPTY slabs (which otherwise go only at allocator calls after
/// their delay). Thread caches stay, and so do the EMPTY SuperSlabs kept by
/// `HAKMEM_SS_KEEP`, though without their pages. True if anything went back.
pub fn trim() -> bool {
    let ace = ace::trim();
    let slabs = pool::trim();
    chunks::trim() || ace || slabs
}

/// What `mallinfo2`, `malloc_stats` and `malloc_info` report, in glibc's terms.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapFigures {
    /// Bytes mapped for everything but live large blocks (glibc: the arena).
    pub arena: usize,
    /// Of those, bytes held free: the chunk cache's, EMPTY slabs' that keep
    /// their pages, and ACE segments' with every block free. Free blocks in
    /// partly used slabs and segments count as in use (as glibc counts the
    /// blocks in its thread caches).
    pub free: usize,
    /// Live large blocks (glibc: mmapped chunks) and the bytes mapped for them.
    pub large_blocks: usize,
    pub large_bytes: usize,
}

impl HeapFigures {
    /// Bytes in use in the arena.
    pub fn in_use(&self) -> usize {
        self.arena - self.free
    }
}

/// The figures now, from the gauges `hakctl mem` reads too (docs/levels.md:
/// bytes mapped, live large blocks, what the chunk cache may hold resident),
/// so that at a quiescent point the two agree. Each is read on its own (no
/// common lock), so they are a moment's picture, each within a call's worth
/// of its true value.
pub fn heap_figures() -> HeapFigures {
    let (large_blocks, large_bytes) = large::live();
    let arena = os::mapped_bytes().saturating_sub(large_bytes);
    let cached = chunks::RESIDENT.load(core::sync::atomic::Ordering::Relaxed) as usize;
    let free = cached + pool::resident_empty_bytes() + ace::free_segment_bytes();
    HeapFigures {
        arena,
        free: free.min(arena),
        large_blocks,
        large_bytes,
    }
}

/// `malloc_usable_size` (0 for null or a pointer that is not ours).
pub fn usable_size(ptr: *const u8) -> usize {
    let p = ptr as usize;
    usable_in(place::of(p), p).unwrap_or(0)
}

/// Usable size of the block at `p`, which lies at `place`; None if `p` is
/// no pointer an allocation returned.
fn usable_in(place: Place, p: usize) -> Option<usize> {
    Some(match place {
        Place::Slab(slab) => {
            // SAFETY: as in `free`.
            let s = unsafe { &*slab };
            if s.state != SlabState::InUse || !is_block_start(p, s.bin as usize) {
                return None;
            }
            s.block_size as usize
        }
        Place::Legacy(bin) => legacy::is_block_start(p, bin).then_some(BIN_SIZES[bin])?,
        Place::Ace(class) => ace::usable_from(p, ace_block(p, class, false)?, class),
        Place::Large(chunk) => large::is_live_block(p, chunk).then(|| large::usable_size(chunk))?,
        Place::Parcel => parcel::usable_size(p)?,
        Place::Foreign => return None,
    })
}

/// `calloc`: overflow-checked, zeroed. What reads as zero already is not
/// written: a large block fresh from the OS, an ACE block carved from pages
/// nobody wrote since they were mapped or purged (but its first two words). A
/// program that callocs mid-size buffers and touches a few bytes of each
/// (1,000 of 200,000 bytes, one byte each) took 193 MiB of RSS when every
/// block was cleared; glibc, whose blocks of that size are mappings, 9 MiB
/// (docs/performance.md, nineteenth session).
///
/// # Safety
/// As `malloc`.
pub unsafe fn calloc(n: usize, size: usize) -> *mut u8 {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return null_mut();
    };
    let (p, dirty) = if total <= TINY_MAX {
        // SAFETY: forwarding.
        (unsafe { malloc(total) }, total)
    } else {
        above_tiny(total)
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    } else {
        // SAFETY: `p` has at least `total` writable bytes.
        unsafe { core::ptr::write_bytes(p, 0, dirty.min(total)) };
    }
    p
}

/// `realloc` with glibc's semantics: null ptr is malloc, size 0 frees and
/// returns null, failure returns null and leaves the block alone.
///
/// # Safety
/// `ptr` is null or a live block from this allocator.
pub unsafe fn realloc(ptr: *mut u8, size: usize) -> *mut u8 {
    // SAFETY: forwarding the caller's contract.
    unsafe { realloc_aligned(ptr, MIN_ALIGN, size) }
}

/// `realloc` keeping alignment `align`.
///
/// # Safety
/// As `realloc`; `ptr` was allocated with alignment `align`.
pub unsafe fn realloc_aligned(ptr: *mut u8, align: usize, size: usize) -> *mut u8 {
    if ptr.is_null() {
        // SAFETY: forwarding.
        return unsafe { alloc_aligned(align, size) };
    }
    if size == 0 {
        // SAFETY: forwarding the caller's contract.
        unsafe { free(ptr) };
        return null_mut();
    }
    let p = ptr as usize;
    let place = place::of(p);
    let Some(old) = usable_in(place, p) else {
        misuse::invalid_free("realloc(): invalid pointer", p);
        set_errno(libc::EINVAL);
        return null_mut();
    };
    // Keep the block when the new size still fits and does not waste over half.
    if size <= old && size > old / 2 {
        return ptr;
    }
    let grown_in_place = size > old
        && match place {
            Place::Large(chunk) => large::resize_in_place(chunk, size),
            Place::Parcel => parcel::resize_in_place(p, size),
            _ => false,
        };
    if grown_in_place {
        return ptr;
    }
    // A block that grows by realloc tends to grow again (strings, vectors).
    // Past GROW_IN_CHUNK it moves to a parcel, where it grows in place up to
    // 252 KiB, and then to a large block, which grows in its chunk (up to
    // 2 MiB, then by mremap); below, it gets room to double, so that only
    // every other growth step copies. Where that headroom cannot be had,
    // the block is moved to one of the size alone.
    let new = if size <= old {
        let saved_errno = crate::errno::get();
        // SAFETY: forwarding.
        let new = unsafe { alloc_aligned(align, size) };
        if new.is_null() {
            // A shrink that would have moved: the block already holds it
            // (glibc's shrinks never fail).
            set_errno(saved_errno);
            return ptr;
        }
        new
    } else if size > GROW_IN_CHUNK {
        // The new block, and how many of its first bytes an earlier user
        // may have made resident.
        // (A parcel's block is 128-aligned: Rust's growing vectors of
        // 32- to 128-aligned elements take one too, not a 2 MiB chunk each.)
        let (p, touched) = if size <= parcel::MAX && align <= parcel::ALIGN {
            lifecycle::before_slow_path();
            let errno_before = crate::errno::get();
            match retried_after_refusal(|| parcel::alloc(size)) {
                // No parcel could be had (a new one needs a 2 MiB chunk): a
                // block of the size and alignment alone (ACE's caches).
                (p, _) if p.is_null() => (sized_instead(align, size, errno_before), usize::MAX),
                got => got,
            }
        } else {
            let (p, fresh) = large_alloc(size, align.max(MIN_ALIGN));
            (p, if fresh { 0 } else { usize::MAX })
        };
        if p.is_null() {
            set_errno(libc::ENOMEM);
        } else if touched < old {
            // The copy below writes these pages at once: one syscall, not a
            // page fault each.
            // SAFETY: the block's first `old` bytes lie in its mapping.
            unsafe { os::populate(p.add(touched), old - touched) };
        }
        p
    } else {
        let room = old.saturating_mul(2).min(GROW_IN_CHUNK);
        let errno_before = crate::errno::get();
        // SAFETY: forwarding.
        match unsafe { alloc_aligned(align, size.max(room)) } {
            p if p.is_null() && room > size => sized_instead(align, size, errno_before),
            p => p,
        }
    };
    if new.is_null() {
        return null_mut();
    }
    // SAFETY: both blocks are live and distinct; copying the smaller size.
    unsafe {
        core::ptr::copy_nonoverlapping(ptr, new, old.min(size));
        free(ptr);
    }
    new
}

/// The block a growing `realloc` takes when its headroom (a parcel, twice
/// the size) could not be had: one of the size and alignment alone, as
/// `aligned_alloc` would give, for glibc's realloc fails only when the size
/// itself cannot be had. Null with ENOMEM if not even that; on success
/// errno is `errno_before` again (the failed try's ENOMEM is not the caller's).
#[cold]
fn sized_instead(align: usize, size: usize, errno_before: i32) -> *mut u8 {
    // SAFETY: forwarding.
    let p = unsafe { alloc_aligned(align, size) };
    if !p.is_null() {
        set_errno(errno_before);
    }
    p
}

/// Allocation with alignment `align` (a power of two). Null with errno
/// ENOMEM if memory cannot be had (a size near `usize::MAX` included).
///
/// Where each alignment goes: the aligned tiny bins (aligned to their size)
/// up to 1 KiB; ACE, whose blocks are 64-byte aligned, for mid sizes; for
/// more alignment, a block carved out of an ACE block `align` bytes larger
/// (address space in proportion to the request, not a chunk each); beyond
/// ACE, the large path, which aligns in its mapping.
///
/// # Safety
/// As `malloc`.
#[inline]
pub unsafe fn alloc_aligned(align: usize, size: usize) -> *mut u8 {
    if align <= MIN_ALIGN {
        // SAFETY: forwarding.
        return unsafe { malloc(size) };
    }
    let need = size.max(align);
    let p = if need <= TINY_MAX {
        tiny_alloc(aligned_bin(need.next_power_of_two()))
    } else {
        let pad = align.saturating_sub(ace::COLOR);
        let from_ace = match size.checked_add(pad) {
            Some(total) if total <= ACE_MAX && pad == 0 => ace_alloc(size.max(TINY_MAX + 1)).0,
            Some(total) if total <= ACE_MAX => {
                let b = ace_alloc(ace::aligned_request(size, align)).0;
                if b.is_null() {
                    b
                } else {
                    ace::carve_aligned(b, align)
                }
            }
            _ => null_mut(),
        };
        if from_ace.is_null() {
            large_alloc(size, align).0
        } else {
            from_ace
        }
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

/// `alloc_aligned`, zeroed.
///
/// # Safety
/// As `malloc`.
pub unsafe fn alloc_aligned_zeroed(align: usize, size: usize) -> *mut u8 {
    if align <= MIN_ALIGN {
        // SAFETY: forwarding.
        return unsafe { calloc(1, size) };
    }
    // SAFETY: forwarding.
    let p = unsafe { alloc_aligned(align, size) };
    if !p.is_null() {
        // SAFETY: `p` has at least `size` writable bytes.
        unsafe { core::ptr::write_bytes(p, 0, size) };
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::{class_of_bin, tiny_bin, tiny_class};
    use crate::segment::{self, SegKind};
    use crate::superslab::{slab_of, Block};

    #[test]
    fn pointers_find_their_segment_and_slab() {
        for size in [
            1usize,
            8,
            9,
            100,
            1000,
            1024,
            1025,
            5000,
            32768,
            32769,
            40_000,
            ACE_MAX,
            ACE_MAX + 1,
            300_000,
            5 << 20,
        ] {
            // SAFETY: plain allocation, checked, freed below.
            let p = unsafe { malloc(size) };
            assert!(!p.is_null());
            let h = segment::lookup(p as usize).expect("our pointer is in a registered segment");
            if size <= TINY_MAX {
                assert!(
                    matches!(h.kind, SegKind::SuperSlab | SegKind::Legacy),
                    "size {size}"
                );
                if h.kind == SegKind::SuperSlab {
                    let (ss, slab, idx) = slab_of(p as usize);
                    assert_eq!(ss as usize, p as usize & !(crate::registry::CHUNK - 1));
                    // SAFETY: the slab of a live block.
                    let s = unsafe { &*slab };
                    assert_eq!(s.bin as usize, tiny_bin(size));
                    assert_eq!(class_of_bin(s.bin as usize), tiny_class(size));
                    assert!(p as usize >= s.area() && idx < crate::superslab::SLABS_PER_SS);
                    assert!(
                        idx >= crate::superslab::FIRST_SLAB,
                        "slab 0 serves no blocks"
                    );
                }
            } else if size <= ACE_MAX {
                assert_eq!(h.kind, SegKind::Ace, "size {size}");
            } else {
                assert_eq!(h.kind, SegKind::Large, "size {size}");
            }
            assert!(usable_size(p) >= size);
            // SAFETY: allocated above.
            unsafe { free(p) };
        }
        let on_stack = 5u64;
        assert!(segment::lookup(&on_stack as *const u64 as usize).is_none());
        assert!(segment::lookup(0x1000).is_none());
        assert!(segment::lookup(usize::MAX - 7).is_none());
        assert_eq!(usable_size(&on_stack as *const u64 as *const u8), 0);
    }

    #[test]
    fn aligned_allocations_honour_their_alignment() {
        for shift in 3..=30 {
            let align = 1usize << shift;
            let sizes: &[usize] = if shift <= 20 {
                &[1, 24, 100, 1024, 3000, 50_000]
            } else {
                // A chunk or more: the header goes in the chunk before.
                &[1, 5000, 3 << 20]
            };
            for &size in sizes {
                // Tiny ones by the hundred: enough to span slabs of several
                // colours (see `superslab`).
                let n = if size.max(align) <= TINY_MAX { 200 } else { 2 };
                let blocks: Vec<*mut u8> = (0..n)
                    .map(|_| {
                        // SAFETY: plain allocation, checked, freed below.
                        let p = unsafe { alloc_aligned(align, size) };
                        assert!(!p.is_null(), "align {align} size {size}");
                        assert_eq!(p as usize % align, 0, "align {align} size {size}");
                        assert!(usable_size(p) >= size);
                        // SAFETY: p has size writable bytes.
                        unsafe { core::ptr::write_bytes(p, 0xab, size) };
                        p
                    })
                    .collect();
                for p in blocks {
                    // SAFETY: allocated above, freed once.
                    unsafe { free(p) };
                }
            }
        }
    }

    #[test]
    fn sizes_near_the_top_of_the_address_space_get_null_at_every_alignment() {
        for size in [
            usize::MAX,
            usize::MAX - 1,
            usize::MAX - 4095,
            usize::MAX / 2 + 1,
            (-100isize) as usize,
        ] {
            for shift in 0..=30 {
                // SAFETY: plain allocation calls, expected to fail.
                let p = unsafe { alloc_aligned(1 << shift, size) };
                assert!(p.is_null(), "align 2^{shift} size {size:#x}");
            }
            // SAFETY: as above.
            unsafe {
                assert!(malloc(size).is_null());
                assert!(calloc(1, size).is_null());
            }
        }
    }

    #[test]
    fn successful_calls_leave_errno_alone() {
        const SENTINEL: i32 = 4321;
        crate::errno::set(SENTINEL);
        // SAFETY: plain allocation calls on blocks of this test.
        unsafe {
            for size in [8usize, 3000, 100_000, 3 << 20, 40 << 20] {
                let p = malloc(size);
                let q = realloc(p, size * 3);
                let r = alloc_aligned(4 << 20, size);
                free(q);
                free(r);
            }
            trim();
        }
        // A failed mapping (mremap, mmap) on the way must not show.
        assert_eq!(crate::errno::get(), SENTINEL);
        // SAFETY: as above, a request no mapping can hold.
        assert!(unsafe { malloc(usize::MAX / 2) }.is_null());
        assert_eq!(crate::errno::get(), libc::ENOMEM);
    }

    #[test]
    fn aligned_blocks_realloc_and_free_like_any_other() {
        // Carved out of an ACE block (128), moved to the large path as it
        // grows (4096), chunk-aligned (4 MiB): realloc finds their usable
        // size and block and keeps the contents; the pointers it moved away
        // from are no blocks any more (tag cleared, large block not live).
        for (align, size) in [(128usize, 3000usize), (4096, 20_000), (4 << 20, 5000)] {
            // SAFETY: each block is written within its size and freed once.
            unsafe {
                let p = alloc_aligned(align, size);
                assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                assert!(usable_size(p) >= size);
                core::ptr::write_bytes(p, 0x3c, size);
                let grown = realloc_aligned(p, align, size * 3);
                assert!((grown as usize).is_multiple_of(align), "align {align}");
                assert!(core::slice::from_raw_parts(grown, size)
                    .iter()
                    .all(|&b| b == 0x3c));
                let shrunk = realloc_aligned(grown, align, size / 4);
                assert!(core::slice::from_raw_parts(shrunk, size / 4)
                    .iter()
                    .all(|&b| b == 0x3c));
                assert!(usable_size(shrunk) >= size / 4);
                free(shrunk);
                // The carve-out's ACE block went to this thread's cache: no
                // other test can hand it out again, so its tag must be gone.
                // (A large block's chunk goes to the chunk cache, which the
                // tests running beside this one share: it may be live again.)
                if grown != shrunk && align < 4096 {
                    assert_eq!(
                        usable_size(grown),
                        0,
                        "align {align}: the old block is gone"
                    );
                }
            }
        }
    }

    #[test]
    fn mid_alignments_take_no_chunk_each() {
        let before = os::mapped_bytes();
        let blocks: Vec<*mut u8> = (0..2000)
            .map(|_| {
                // SAFETY: plain allocation, freed below.
                let p = unsafe { alloc_aligned(128, 2048) };
                assert!(!p.is_null() && (p as usize).is_multiple_of(128));
                assert!(usable_size(p) >= 2048);
                p
            })
            .collect();
        // 2000 x 2 KiB: some 4 MiB of blocks; a chunk each would be 4 GiB.
        let grown = os::mapped_bytes().saturating_sub(before);
        // (Process-wide: other tests map at the same time.)
        assert!(
            grown < 256 << 20,
            "mapped {grown} bytes for 4 MiB of blocks"
        );
        for p in blocks {
            // SAFETY: allocated above, freed once.
            unsafe { free(p) };
        }
    }

    #[test]
    fn realloc_growth_gets_headroom_then_a_parcel_then_a_chunk() {
        // SAFETY: each call follows the C contract; every block is written within its size.
        unsafe {
            let p = malloc(3000);
            core::ptr::write_bytes(p, 5, 3000);
            let old = usable_size(p);
            let q = realloc(p, 5000);
            // Room to double what it had: the next step stays in place.
            assert!(usable_size(q) >= 2 * old);
            let r = realloc(q, 2 * old);
            assert_eq!(r, q);
            let grown = realloc(r, 40_000);
            assert_eq!(
                segment::lookup(grown as usize).unwrap().kind,
                SegKind::Parcel
            );
            assert!(core::slice::from_raw_parts(grown, 3000)
                .iter()
                .all(|&b| b == 5));
            core::ptr::write_bytes(grown, 6, 40_000);
            let more = realloc(grown, 200_000);
            assert_eq!(more, grown, "a parcel's block grows in place");
            let big = realloc(more, 300_000);
            assert_eq!(segment::lookup(big as usize).unwrap().kind, SegKind::Large);
            assert!(core::slice::from_raw_parts(big, 40_000)
                .iter()
                .all(|&b| b == 6));
            let bigger = realloc(big, 1 << 20);
            assert_eq!(bigger, big, "a chunk-backed block grows in place");
            free(bigger);
            // A plain malloc of the same size stays in ACE.
            let m = malloc(40_000);
            assert_eq!(segment::lookup(m as usize).unwrap().kind, SegKind::Ace);
            free(m);
        }
    }

    #[test]
    fn aligned_growth_past_32_kib_takes_a_parcel_not_a_chunk() {
        for align in [32, 64, 128] {
            // SAFETY: each call follows the C contract; every block is
            // written within its size and freed once.
            unsafe {
                let p = alloc_aligned(align, 20_000);
                core::ptr::write_bytes(p, 7, 20_000);
                let q = realloc_aligned(p, align, 40_000);
                assert!((q as usize).is_multiple_of(align), "{q:?} for {align}");
                assert_eq!(
                    segment::lookup(q as usize).unwrap().kind,
                    SegKind::Parcel,
                    "align {align}"
                );
                assert!(core::slice::from_raw_parts(q, 20_000)
                    .iter()
                    .all(|&b| b == 7));
                let r = realloc_aligned(q, align, 200_000);
                assert_eq!(r, q, "grows in its parcel");
                free(r);
            }
        }
    }

    #[test]
    fn calloc_overflow_and_realloc_semantics() {
        // SAFETY: each call follows the C contract.
        unsafe {
            assert!(calloc(usize::MAX / 2, 3).is_null());
            let p = calloc(100, 10);
            assert!(core::slice::from_raw_parts(p, 1000).iter().all(|&b| b == 0));
            core::ptr::write_bytes(p, 7, 1000);
            let q = realloc(p, 20_000);
            assert!(core::slice::from_raw_parts(q, 1000).iter().all(|&b| b == 7));
            assert!(realloc(q, 0).is_null());
            let r = realloc(core::ptr::null_mut(), 10);
            assert!(!r.is_null());
            free(r);
        }
    }

    #[test]
    fn the_owners_free_is_served_by_its_index_and_no_other_threads_is() {
        use std::sync::mpsc::channel;
        let (block_tx, block_rx) = channel();
        let (done_tx, done_rx) = channel::<()>();
        let owner = std::thread::spawn(move || {
            // SAFETY: plain allocations, freed once below or by the main thread.
            let (p, q) = unsafe { (malloc(48), malloc(48)) };
            assert!(!p.is_null() && !q.is_null());
            let hit = with_cache(|tc| {
                // SAFETY: q is a live block of a slab this thread owns.
                unsafe { tiny::free_owned(&mut tc.tiny, q) }
            });
            assert!(matches!(hit, Push::Done), "the owner's free hits its index");
            let head = with_cache(|tc| tc.tiny.head(tiny_bin(48)));
            assert_eq!(head, q as *mut Block, "q went onto the owner's TLS list");
            block_tx.send(p as usize).unwrap();
            done_rx.recv().unwrap();
        });
        let p = block_rx.recv().unwrap() as *mut u8;
        let hit = with_cache(|tc| {
            // SAFETY: p is live; a miss does nothing.
            unsafe { tiny::free_owned(&mut tc.tiny, p) }
        });
        assert!(
            matches!(hit, Push::NotOurs),
            "another thread's block misses"
        );
        // SAFETY: p is live and freed once (onto its slab's remote list).
        unsafe { free(p) };
        done_tx.send(()).unwrap();
        owner.join().unwrap();
    }

    /// `place::of(p)` against the segment header `segment::lookup` reads.
    fn placed_as_its_header_says(p: usize) {
        let h = segment::lookup(p).expect("a block of ours");
        let chunk = h as *const segment::SegHeader as usize;
        match (h.kind, place::of(p)) {
            (SegKind::SuperSlab, Place::Slab(s)) => assert_eq!(s, slab_of(p).1),
            (SegKind::Legacy, Place::Legacy(bin)) => assert_eq!(bin, h.class as usize),
            (SegKind::Ace, Place::Ace(class)) => assert_eq!(class, h.class as usize),
            (SegKind::Large, Place::Large(start)) => assert_eq!(start, chunk),
            (SegKind::Parcel, Place::Parcel) => {}
            (kind, _) => panic!("{p:#x}: header says {kind:?}, place disagrees"),
        }
    }

    #[test]
    fn every_kind_of_block_is_placed_where_its_segment_header_says() {
        // SAFETY: each block is allocated here and freed once.
        unsafe {
            for (size, align) in [
                (8, 16),
                (100, 16),
                (1000, 16),
                (5000, 16),
                (100_000, 16),
                (300_000, 16),
                (3 << 20, 16),
                (2048, 128),
                (5000, 4 << 20),
            ] {
                let p = alloc_aligned(align, size);
                placed_as_its_header_says(p as usize);
                free(p);
            }
            // A parcel: a buffer realloc grew past 32 KiB.
            let p = realloc(malloc(3000), 40_000);
            placed_as_its_header_says(p as usize);
            free(p);
        }
        // A legacy block (what serves when the pool gives up).
        let mut head = core::ptr::null_mut::<Block>();
        let bin = crate::class::tiny_bin(64);
        assert_eq!(crate::legacy::refill(bin, 1, &mut head), 1);
        placed_as_its_header_says(head as usize);
        // SAFETY: the one block just refilled.
        unsafe { crate::legacy::give_back(bin, head, head, 1) };
        // Nothing of ours, and a SuperSlab's header.
        let on_stack = 0u64;
        assert!(matches!(
            place::of(&on_stack as *const u64 as usize),
            Place::Foreign
        ));
        assert!(matches!(place::of(usize::MAX - 7), Place::Foreign));
        // SAFETY: a plain allocation, freed below.
        let p = unsafe { malloc(64) };
        if segment::kind_of(p as usize) == SegKind::SuperSlab as u8 {
            let header = segment::chunk_of(p as usize) + 64;
            assert!(matches!(place::of(header), Place::Foreign));
        }
        // SAFETY: allocated above.
        unsafe { free(p) };
    }
}
