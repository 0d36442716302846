//! Log-linear histogram buckets, computed in eBPF and expanded in userspace.
//!
//! Values below 16 get a bucket each; above, every power of two is split into
//! 8 linear sub-buckets (12.5% resolution). The last bucket collects everything
//! at or above 2^35 (about 34 seconds in nanoseconds).

pub const HIST_BUCKETS: usize = 256;
const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;
const MAX_EXP: u32 = 4 + ((HIST_BUCKETS as u32 - 16) >> SUB_BITS) - 1;

/// Histogram rows kept by the eBPF programs (index into the histogram map).
pub const HIST_TLS_DRAIN_BATCH: u32 = 0;
pub const HIST_REMOTE_DRAIN_BATCH: u32 = 1;
/// Acquire latency (ns) for stage s is row `HIST_ACQUIRE_NS + s - 1`.
pub const HIST_ACQUIRE_NS: u32 = 2;
pub const HIST_ROWS: u32 = 5;

/// One histogram row as stored in the eBPF map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HistRow {
    pub buckets: [u64; HIST_BUCKETS],
}

/// floor(log2(v)) for v > 0, written as a branchy binary search because the
/// BPF instruction set has no count-leading-zeros.
#[inline(always)]
fn log2(mut v: u64) -> u32 {
    let mut r = 0;
    if v >> 32 != 0 {
        v >>= 32;
        r += 32;
    }
    if v >> 16 != 0 {
        v >>= 16;
        r += 16;
    }
    if v >> 8 != 0 {
        v >>= 8;
        r += 8;
    }
    if v >> 4 != 0 {
        v >>= 4;
        r += 4;
    }
    if v >> 2 != 0 {
        v >>= 2;
        r += 2;
    }
    if v >> 1 != 0 {
        r += 1;
    }
    r
}

/// Bucket index of `v`, always `< HIST_BUCKETS`.
#[inline(always)]
pub fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = log2(v);
    if e > MAX_EXP {
        return HIST_BUCKETS - 1;
    }
    let sub = (v >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    let idx = 16 + ((e - 4) << SUB_BITS) as u64 + sub;
    (idx as usize) & (HIST_BUCKETS - 1)
}

/// The smallest value that falls into bucket `b` (a representative value for
/// re-recording the bucket into an hdrhistogram).
pub fn bucket_low(b: usize) -> u64 {
    if (b as u64) < LINEAR {
        return b as u64;
    }
    let e = 4 + ((b as u32 - 16) >> SUB_BITS);
    let sub = (b as u64 - 16) & ((1 << SUB_BITS) - 1);
    (1u64 << e) | (sub << (e - SUB_BITS))
}

/// The largest value that falls into bucket `b` (the last bucket: `u64::MAX`).
pub fn bucket_high(b: usize) -> u64 {
    if b + 1 >= HIST_BUCKETS {
        return u64::MAX;
    }
    bucket_low(b + 1) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_round_trip() {
        let mut last = 0;
        for v in 0..100_000u64 {
            let b = bucket_of(v);
            assert!(b >= last, "bucket went backwards at {v}");
            assert!(bucket_low(b) <= v);
            last = b;
        }
        for b in 0..HIST_BUCKETS - 1 {
            assert_eq!(bucket_of(bucket_low(b)), b);
            assert_eq!(bucket_of(bucket_high(b)), b);
            // 12.5% resolution: a bucket spans at most an eighth of its floor.
            assert!(
                bucket_high(b) - bucket_low(b) <= bucket_low(b) / 8,
                "bucket {b}"
            );
        }
        assert_eq!(bucket_of(u64::MAX), HIST_BUCKETS - 1);
    }
}
