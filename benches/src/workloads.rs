//! The names of hakbench's workloads, in the order the suite reports them,
//! and the random numbers workloads draw (shared by `hakbench` and
//! `bench-suite`).

/// A seeded xorshift generator: the same numbers on every run.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() >> 16) as usize % (hi - lo + 1)
    }
}

pub const WORKLOADS: &[&str] = &[
    "tiny",
    "mixed",
    "mid",
    "big",
    "large",
    "mixed-2t",
    "prodcons",
    "larson",
    "realloc",
    "realloc-kept",
    "kept",
    "stress",
    "phases",
    "large-zeroed",
    "working-set-2t",
    "simple",
];
