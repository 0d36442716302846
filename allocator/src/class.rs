//! Size classes: tiny (8 B .. 1 KiB, powers of two) and ACE (mid sizes up to 32 KiB).

pub use hakmem_common::{ACE_CLASSES, ACE_CLASS_SIZES, TINY_CLASSES, TINY_CLASS_SIZES};

/// Largest tiny request.
pub const TINY_MAX: usize = 1024;
/// Largest request ACE can ever serve (its largest class).
pub const ACE_MAX: usize = ACE_CLASS_SIZES[ACE_CLASSES - 1];

/// Tiny class of `size` (`size <= TINY_MAX`); 0 and 1..=8 are class 0.
#[inline(always)]
pub fn tiny_class(size: usize) -> usize {
    debug_assert!(size <= TINY_MAX);
    if size <= 8 {
        0
    } else {
        // ceil(log2(size)) - 3
        (usize::BITS - (size - 1).leading_zeros()) as usize - 3
    }
}

/// ACE class of `size` (`TINY_MAX < size <= ACE_MAX`).
#[inline]
pub fn ace_class(size: usize) -> usize {
    debug_assert!(size > TINY_MAX && size <= ACE_MAX);
    ACE_CLASS_SIZES
        .iter()
        .position(|&s| size <= s)
        .unwrap_or(ACE_CLASSES - 1)
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
    fn ace_classes_cover_their_sizes() {
        assert_eq!(ace_class(1025), 0);
        assert_eq!(ace_class(2048), 0);
        assert_eq!(ace_class(2049), 1);
        assert_eq!(ace_class(32768), ACE_CLASSES - 1);
        for size in TINY_MAX + 1..=ACE_MAX {
            let c = ace_class(size);
            assert!(ACE_CLASS_SIZES[c] >= size);
            if c > 0 {
                assert!(ACE_CLASS_SIZES[c - 1] < size);
            }
        }
    }
}
