//! The pool's EMPTY slabs (Stage 1 material), in two lists.
//!
//! *Resident* slabs keep their pages: newest first, so Stage 1 reuses the
//! slab whose lines and pages are most likely still warm, and the oldest at
//! the back. A slab that stays EMPTY for the purge delay
//! (`HAKMEM_PURGE_DELAY_MS`, 100 ms) has its pages given back to the OS
//! (`MADV_DONTNEED`, the address space kept) and moves to the *purged* list,
//! which Stage 1 takes from only when no resident slab is left: a purged slab
//! costs page faults again, like a fresh one. As in the chunk cache, a
//! reserve waits longer (a second): the newest `HAKMEM_SS_KEEP` SuperSlabs'
//! worth of slabs (62, about 3.9 MiB), for programs that free and allocate in cycles.
//!
//! Without this, a SuperSlab went back only when all its slabs were EMPTY. The
//! slabs of one SuperSlab serve many threads, and every thread keeps its active
//! slab of each bin and the slabs its cached blocks pin, so after a burst on
//! many threads nearly every SuperSlab stayed with most of its pages EMPTY and
//! resident: 64 threads that freed everything they made kept 390-466 MB
//! (glibc 388-447 MB, mimalloc 739-750 MB; now 179-244 MB, 161 MB with the
//! purge thread).
//!
//! Everything here runs under the pool lock.

use crate::superslab::{Slab, SlabState};
use core::ptr::null_mut;

/// A slab's EMPTY time: `os::now_ns() >> STAMP_SHIFT` (about 1 ms units,
/// wrapping after 52 days; ages are computed with wrapping arithmetic).
const STAMP_SHIFT: u32 = 20;

pub fn stamp(now_ns: u64) -> u32 {
    (now_ns >> STAMP_SHIFT) as u32
}

/// How long `slab` has been EMPTY at `now_ns`.
///
/// # Safety
/// `slab` is on one of the lists (its `emptied` stamp is set).
pub unsafe fn age_ns(slab: *const Slab, now_ns: u64) -> u64 {
    // SAFETY: per the contract.
    let emptied = unsafe { (*slab).emptied };
    (stamp(now_ns).wrapping_sub(emptied) as u64) << STAMP_SHIFT
}

/// A doubly linked list through `Slab::next` / `prev`.
struct SlabList {
    head: *mut Slab,
    tail: *mut Slab,
}

impl SlabList {
    const NEW: SlabList = SlabList {
        head: null_mut(),
        tail: null_mut(),
    };

    /// # Safety
    /// `slab` is on no list.
    unsafe fn push_front(&mut self, slab: *mut Slab) {
        // SAFETY: per the contract; the list's slabs are the pool's.
        unsafe {
            (*slab).prev = null_mut();
            (*slab).next = self.head;
            if self.head.is_null() {
                self.tail = slab;
            } else {
                (*self.head).prev = slab;
            }
        }
        self.head = slab;
    }

    /// Walks the list: each slab in `state`, unowned, its links agreeing
    /// both ways; returns its length.
    #[cfg(any(test, feature = "invariants"))]
    fn check(&self, state: SlabState) -> Result<usize, &'static str> {
        let (mut s, mut prev, mut n) = (self.head, null_mut(), 0);
        // SAFETY: the list's slabs are the pool's (lock held by the caller).
        unsafe {
            while !s.is_null() {
                if (*s).prev != prev {
                    return Err("invariant: an EMPTY slab's back link is wrong");
                }
                if (*s).state != state {
                    return Err("invariant: a slab on an EMPTY list is in another state");
                }
                if (*s).owner.load(core::sync::atomic::Ordering::Relaxed) != 0 {
                    return Err("invariant: a slab on an EMPTY list has an owner");
                }
                prev = s;
                s = (*s).next;
                n += 1;
            }
        }
        if self.tail != prev {
            return Err("invariant: an EMPTY list's tail is not its last slab");
        }
        Ok(n)
    }

    /// # Safety
    /// `slab` is on this list.
    unsafe fn unlink(&mut self, slab: *mut Slab) {
        // SAFETY: per the contract, the list links are valid.
        unsafe {
            let (prev, next) = ((*slab).prev, (*slab).next);
            if prev.is_null() {
                self.head = next;
            } else {
                (*prev).next = next;
            }
            if next.is_null() {
                self.tail = prev;
            } else {
                (*next).prev = prev;
            }
            (*slab).next = null_mut();
            (*slab).prev = null_mut();
        }
    }
}

pub struct EmptySlabs {
    resident: SlabList,
    /// Slabs on `resident`.
    resident_len: usize,
    purged: SlabList,
}

impl EmptySlabs {
    pub const NEW: EmptySlabs = EmptySlabs {
        resident: SlabList::NEW,
        resident_len: 0,
        purged: SlabList::NEW,
    };

    /// Resident EMPTY slabs.
    pub fn resident_len(&self) -> usize {
        self.resident_len
    }

    /// The lists' invariants (feature `invariants`): links that agree both
    /// ways, each slab in the state its list says, no owner, and the
    /// resident count. Under the pool lock.
    #[cfg(any(test, feature = "invariants"))]
    pub fn check(&self) -> Result<(), &'static str> {
        let resident = self.resident.check(SlabState::Empty)?;
        if resident != self.resident_len {
            return Err("invariant: the resident EMPTY count is not the list's length");
        }
        self.purged.check(SlabState::Purged).map(|_| ())
    }

    /// Adds a slab that has just become EMPTY (its state already says so)
    /// at `now_ns`.
    ///
    /// # Safety
    /// `slab` is on no list and nobody else refers to it.
    pub unsafe fn push(&mut self, slab: *mut Slab, now_ns: u64) {
        // SAFETY: per the contract.
        unsafe {
            (*slab).emptied = stamp(now_ns);
            self.resident.push_front(slab);
        }
        self.resident_len += 1;
    }

    /// The slab for Stage 1, off its list: the newest resident one, else a
    /// purged one. The flag says it was purged (its pages are not resident).
    pub fn take(&mut self) -> Option<(*mut Slab, bool)> {
        let (slab, purged) = if !self.resident.head.is_null() {
            (self.resident.head, false)
        } else if !self.purged.head.is_null() {
            (self.purged.head, true)
        } else {
            return None;
        };
        // SAFETY: the head of one of our lists.
        unsafe { self.unlink(slab) };
        Some((slab, purged))
    }

    /// Takes `slab` off whichever list holds it (a SuperSlab retiring).
    ///
    /// # Safety
    /// `slab` is on one of the lists.
    pub unsafe fn unlink(&mut self, slab: *mut Slab) {
        // SAFETY: per the contract; the state says which list.
        unsafe {
            if (*slab).state == SlabState::Purged {
                self.purged.unlink(slab)
            } else {
                self.resident.unlink(slab);
                self.resident_len -= 1;
            }
        }
    }

    /// Every slab on the lists, resident first (lock held, lists unchanged
    /// while it is walked).
    pub fn iter(&self) -> impl Iterator<Item = *mut Slab> + '_ {
        let walk = |head: *mut Slab| {
            core::iter::successors(Some(head).filter(|s| !s.is_null()), |&s| {
                // SAFETY: a slab on a list of ours; its link is the list's.
                let next = unsafe { (*s).next };
                Some(next).filter(|n| !n.is_null())
            })
        };
        walk(self.resident.head).chain(walk(self.purged.head))
    }

    /// The resident slab that has been EMPTY longest.
    pub fn oldest_resident(&self) -> Option<*mut Slab> {
        Some(self.resident.tail).filter(|s| !s.is_null())
    }

    /// Moves a resident slab whose pages were just given back to the purged list.
    ///
    /// # Safety
    /// `slab` is on the resident list.
    pub unsafe fn mark_purged(&mut self, slab: *mut Slab) {
        // SAFETY: per the contract.
        unsafe {
            self.unlink(slab);
            (*slab).state = SlabState::Purged;
            self.purged.push_front(slab);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::superslab::SLABS_PER_SS;

    fn slabs() -> Box<[Slab; SLABS_PER_SS]> {
        // SAFETY: an all-zero Slab is valid (state Fresh, null links): the
        // state a fresh SuperSlab's slots have.
        Box::new(unsafe { core::mem::zeroed() })
    }

    #[test]
    fn stage1_takes_the_newest_resident_then_purged_ones_and_ages_wrap() {
        let mut s = slabs();
        let mut e = EmptySlabs::NEW;
        let [a, b, c] = [0, 1, 2].map(|i| {
            s[i].state = SlabState::Empty;
            &mut s[i] as *mut Slab
        });
        let t0 = 5u64 << 40;
        // SAFETY: the slabs are ours and on no list.
        unsafe {
            e.push(a, t0);
            e.push(b, t0 + 50_000_000);
            e.push(c, t0 + 90_000_000);
            assert_eq!(e.oldest_resident(), Some(a));
            assert!(age_ns(a, t0 + 100_000_000) >= 99_000_000);
            assert!(age_ns(c, t0 + 100_000_000) <= 11_000_000);
            assert_eq!(e.resident_len(), 3);
            e.mark_purged(a);
            assert_eq!(e.check(), Ok(()));
            assert_eq!(e.oldest_resident(), Some(b));
            e.unlink(b);
            assert_eq!(e.resident_len(), 1);
        }
        // The checker sees a slab in the wrong state, an owner, a count off.
        s[2].state = SlabState::InUse;
        assert!(e.check().unwrap_err().contains("another state"));
        s[2].state = SlabState::Empty;
        s[0].owner.store(9, core::sync::atomic::Ordering::Relaxed);
        assert!(e.check().unwrap_err().contains("owner"));
        s[0].owner.store(0, core::sync::atomic::Ordering::Relaxed);
        e.resident_len += 1;
        assert!(e.check().unwrap_err().contains("count"));
        e.resident_len -= 1;
        assert_eq!(e.check(), Ok(()));
        assert_eq!(e.take(), Some((c, false)), "the resident one first");
        assert_eq!(e.take(), Some((a, true)));
        assert_eq!(e.take(), None);
        // A stamp taken just before the 32-bit wrap still ages correctly.
        let before_wrap = (u32::MAX as u64) << STAMP_SHIFT;
        // SAFETY: as above.
        unsafe {
            e.push(a, before_wrap);
            assert_eq!(
                age_ns(a, before_wrap + (2 << STAMP_SHIFT)),
                2 << STAMP_SHIFT
            );
        }
    }
}
