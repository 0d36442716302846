//! Size classes and bins.
//!
//! The probes and the tally speak of the eight tiny *classes* of DESIGN.md
//! (class c serves requests up to 8 << c bytes). Inside a class, requests are
//! served from *bins* spaced by a quarter of the class (a multiple of 16 bytes):
//! class 7 (513..1024) has bins 640, 768, 896 and 1024. With powers of two
//! alone a uniform request mix wastes about a quarter of its memory, and the
//! larger working set costs cache misses on every access; bins cut the waste
//! to about a tenth. Every bin size is a multiple of 16 (16-byte alignment).
//!
//! Slabs of these bins are coloured (`superslab::Slab::format`), so their
//! blocks are 64-byte aligned, no more. Aligned requests of 128..1024 bytes
//! take the *aligned bins* after them: the same sizes, uncoloured, every
//! block aligned to its size.

pub use hakmem_common::{ACE_CLASSES, ACE_CLASS_SIZES, TINY_CLASSES, TINY_CLASS_SIZES};

/// Largest tiny request.
pub const TINY_MAX: usize = 1024;
/// Largest request ACE can ever serve (its largest class).
pub const ACE_MAX: usize = ACE_CLASS_SIZES[ACE_CLASSES - 1];

/// Number of tiny bins: the coloured ones, then the aligned ones.
pub const BINS: usize = COLORED_BINS + 4;
/// Bins `tiny_bin` hands out; the rest serve aligned requests (`aligned_bin`).
pub const COLORED_BINS: usize = 21;
/// Block size of each bin. Bin 0 serves requests of 1..=8 bytes (class 0)
/// with 16-byte blocks: a free block holds a link and a double-free key
/// (`superslab::Block`), two words, and every malloc result is 16-byte
/// aligned, as glibc's are (glibc's smallest chunk is 32 bytes).
pub const BIN_SIZES: [usize; BINS] = [
    16, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
    1024, // the aligned bins:
    128, 256, 512, 1024,
];
/// `u64::MAX / size + 1` for each bin: `n * BIN_DIVISOR[b] < BIN_DIVISOR[b]`
/// (wrapping, 64 bits) exactly when `n` is a multiple of the bin's size, for
/// every `n < 2^32` (Lemire, Kaser and Kurz, "Faster remainder by direct
/// computation", 2019: a 64-bit constant for 32-bit operands; the 32-bit
/// constant is not exact for every divisor): a multiply instead of a
/// division on `free`.
const BIN_DIVISOR: [u64; BINS] = {
    let mut t = [0u64; BINS];
    let mut b = 0;
    while b < BINS {
        t[b] = u64::MAX / BIN_SIZES[b] as u64 + 1;
        b += 1;
    }
    t
};

/// Whether `off` (below 2^32) is a whole number of `bin`'s blocks.
#[inline(always)]
pub fn is_multiple_of_bin(off: u32, bin: usize) -> bool {
    debug_assert!(bin < BINS);
    // SAFETY: callers pass bins of slab metadata or the owner's index, all
    // below BINS (no bounds-check panic path on `free`'s fast path).
    let c = unsafe { *BIN_DIVISOR.get_unchecked(bin) };
    (off as u64).wrapping_mul(c) < c
}

/// Largest alignment a coloured bin's blocks keep (colours are whole cache lines).
pub const COLORED_ALIGN: usize = 64;

/// The largest request each bin serves: its block size, but 8 for bin 0.
const BIN_REQUEST_MAX: [usize; BINS] = {
    let mut t = BIN_SIZES;
    t[0] = 8;
    t
};

/// Bin of every size rounded up to 8 bytes: index `(size + 7) / 8` (sizes 0
/// and 1..=8 land on bin 0, so `tiny_bin` needs no branch).
const BIN_BY_8: [u8; TINY_MAX / 8 + 1] = {
    let mut t = [0u8; TINY_MAX / 8 + 1];
    let mut i = 1;
    while i < t.len() {
        let size = i * 8;
        let mut b = 0;
        while BIN_REQUEST_MAX[b] < size {
            b += 1;
        }
        t[i] = b as u8;
        i += 1;
    }
    t
};

/// The class (probe and tally unit) of each bin.
const CLASS_OF_BIN: [u8; BINS] = {
    let mut t = [0u8; BINS];
    let mut b = 0;
    while b < BINS {
        t[b] = tiny_class(BIN_REQUEST_MAX[b]) as u8;
        b += 1;
    }
    t
};

/// Tiny class of `size` (`size <= TINY_MAX`); 0 and 1..=8 are class 0.
#[inline(always)]
pub const fn tiny_class(size: usize) -> usize {
    if size <= 8 {
        0
    } else {
        // ceil(log2(size)) - 3
        (usize::BITS - (size - 1).leading_zeros()) as usize - 3
    }
}

/// Bin of `size` (`size <= TINY_MAX`): the smallest bin that holds it.
#[inline(always)]
pub fn tiny_bin(size: usize) -> usize {
    BIN_BY_8[(size + 7) >> 3] as usize
}

/// Bin for an aligned request: `need` is a power of two up to `TINY_MAX`, at
/// least the size and the alignment; every block of the bin is aligned to it.
#[inline]
pub fn aligned_bin(need: usize) -> usize {
    debug_assert!(need.is_power_of_two() && need <= TINY_MAX);
    if need <= COLORED_ALIGN {
        tiny_bin(need)
    } else {
        // 128 -> the first aligned bin.
        COLORED_BINS + need.trailing_zeros() as usize - 7
    }
}

/// Whether slabs of `bin` are coloured (see the module doc).
#[inline]
pub fn is_colored(bin: usize) -> bool {
    bin < COLORED_BINS
}

/// The class a bin belongs to.
#[inline(always)]
pub fn class_of_bin(bin: usize) -> usize {
    CLASS_OF_BIN[bin] as usize
}

/// ACE class of every size rounded up to a KiB: index `(size + 1023) / 1024`
/// (the ACE classes are whole KiB, so the rounding never skips one).
const ACE_BY_KIB: [u8; ACE_MAX / 1024 + 1] = {
    let mut t = [0u8; ACE_MAX / 1024 + 1];
    let mut kib = 1;
    while kib < t.len() {
        let mut c = 0;
        while ACE_CLASS_SIZES[c] < kib * 1024 {
            c += 1;
        }
        t[kib] = c as u8;
        kib += 1;
    }
    t
};
const _: () = {
    let mut c = 0;
    while c < ACE_CLASSES {
        assert!(ACE_CLASS_SIZES[c].is_multiple_of(1024));
        c += 1;
    }
};

/// ACE class of `size` (`TINY_MAX < size <= ACE_MAX`): one table load, no
/// search (a search over the classes mispredicts on mixed sizes).
#[inline]
pub fn ace_class(size: usize) -> usize {
    debug_assert!(size > TINY_MAX && size <= ACE_MAX);
    ACE_BY_KIB[(size + 1023) >> 10] as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_classes_cover_their_sizes() {
        assert_eq!(tiny_class(0), 0);
        assert_eq!(tiny_class(1), 0);
        assert_eq!(tiny_class(8), 0);
        assert_eq!(tiny_class(9), 1);
        assert_eq!(tiny_class(16), 1);
        assert_eq!(tiny_class(17), 2);
        assert_eq!(tiny_class(1024), 7);
        for size in 1..=TINY_MAX {
            let c = tiny_class(size);
            assert!(TINY_CLASS_SIZES[c] >= size, "size {size} class {c}");
            if c > 0 {
                assert!(
                    TINY_CLASS_SIZES[c - 1] < size,
                    "size {size} not in smallest class"
                );
            }
        }
    }

    #[test]
    fn bins_are_the_smallest_fit_inside_the_right_class() {
        for size in 0..=TINY_MAX {
            let b = tiny_bin(size);
            assert!(BIN_SIZES[b] >= size, "size {size} bin {b}");
            if b > 0 {
                assert!(
                    BIN_REQUEST_MAX[b - 1] < size.max(1),
                    "size {size}: bin {b} is not the smallest fit"
                );
            }
            assert_eq!(
                class_of_bin(b),
                tiny_class(size),
                "size {size}: bin {b} lies in another class"
            );
        }
        for (b, &s) in BIN_SIZES.iter().enumerate() {
            assert_eq!(s % 16, 0, "bin {b} keeps 16-byte alignment");
        }
        for &pow2 in TINY_CLASS_SIZES.iter().skip(1) {
            assert_eq!(
                BIN_SIZES[tiny_bin(pow2)],
                pow2,
                "the power of two {pow2} has a bin of its own (aligned allocation)"
            );
        }
    }

    #[test]
    fn ace_classes_cover_their_sizes() {
        assert_eq!(ace_class(1025), 0);
        assert_eq!(ace_class(2048), 0);
        assert_eq!(ace_class(2049), 1);
        assert_eq!(ace_class(32768), 22);
        assert_eq!(ace_class(32769), 23);
        assert_eq!(ace_class(ACE_MAX), ACE_CLASSES - 1);
        for size in TINY_MAX + 1..=ACE_MAX {
            let c = ace_class(size);
            assert!(ACE_CLASS_SIZES[c] >= size);
            if c > 0 {
                assert!(ACE_CLASS_SIZES[c - 1] < size);
            }
        }
    }

    #[test]
    fn the_divisibility_test_agrees_with_the_remainder() {
        for (bin, &size) in BIN_SIZES.iter().enumerate() {
            for off in (0..(1u32 << 21)).step_by(8).chain([u32::MAX - 1, u32::MAX]) {
                assert_eq!(
                    is_multiple_of_bin(off, bin),
                    (off as usize).is_multiple_of(size),
                    "bin {bin} off {off}"
                );
            }
        }
    }
}
