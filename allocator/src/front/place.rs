//! What a pointer handed back to hakmem is: one registry read names the
//! tier and its slab or segment, and `free`, `realloc` and
//! `malloc_usable_size` dispatch on that. Whether the pointer is a block's
//! start is each tier's own check on the classified form.

use crate::segment::{self, SegKind, ACE_BYTE, LARGE_BODY_BYTE};
use crate::superslab::{slab_of, Slab, SS_HEADER_RESERVE, SS_SIZE};

#[derive(Clone, Copy)]
pub enum Place {
    /// In a SuperSlab, past its header: the slab's metadata.
    Slab(*mut Slab),
    /// In an ACE segment of this class.
    Ace(usize),
    /// In a legacy segment of this tiny bin.
    Legacy(usize),
    /// In a large mapping (or a cached one) starting at this address.
    Large(usize),
    /// In a parcel chunk.
    Parcel,
    /// Nowhere hakmem hands out blocks (not ours, or a SuperSlab's header).
    Foreign,
}

/// Where `p` lies: one registry read, then the segment header only for
/// the tiers that keep their facts there (legacy, large, parcel).
#[inline(always)]
pub fn of(p: usize) -> Place {
    match by_registry(p) {
        Ok(place) => place,
        Err(byte) => in_segment(byte, p),
    }
}

/// The first half of `of`: the place the registry byte names alone (a
/// SuperSlab's slab, an ACE class, nothing of ours), or the byte, for
/// `in_segment` to read the header. (`free` finishes out of line, so that
/// its fast paths need no stack frame.)
#[inline(always)]
pub fn by_registry(p: usize) -> Result<Place, u8> {
    let byte = segment::kind_of(p);
    if byte == SegKind::SuperSlab as u8 {
        if p & (SS_SIZE - 1) < SS_HEADER_RESERVE {
            return Ok(Place::Foreign);
        }
        return Ok(Place::Slab(slab_of(p).1));
    }
    if let Some(class) = segment::ace_class_of(byte) {
        return Ok(Place::Ace(class));
    }
    if byte == 0 {
        return Ok(Place::Foreign);
    }
    Err(byte)
}

/// The second half of `of`: the place of `p` in the segment its registry
/// byte (legacy, large, parcel, a large block's body) names; the header says.
#[inline]
pub fn in_segment(byte: u8, p: usize) -> Place {
    debug_assert!(byte < ACE_BYTE);
    let chunk = match byte {
        LARGE_BODY_BYTE => segment::chunk_of(p) - segment::CHUNK,
        _ => segment::chunk_of(p),
    };
    // SAFETY: the registry's byte for `p` names `chunk` its segment's start.
    let Some(h) = (unsafe { segment::header_at(chunk) }) else {
        return Place::Foreign;
    };
    match h.kind {
        SegKind::Legacy => Place::Legacy(h.class as usize),
        SegKind::Large => Place::Large(chunk),
        SegKind::Parcel => Place::Parcel,
        // Named by their registry bytes above: a header that disagrees is
        // no segment of ours.
        SegKind::SuperSlab | SegKind::Ace => Place::Foreign,
    }
}
