//! Numeric codes carried in probe arguments.

/// Number of tiny size classes (8 B .. 1024 B, powers of two).
pub const TINY_CLASSES: usize = 8;
/// Block size of each tiny class.
pub const TINY_CLASS_SIZES: [usize; TINY_CLASSES] = [8, 16, 32, 64, 128, 256, 512, 1024];

/// Number of ACE (mid-size) classes.
pub const ACE_CLASSES: usize = 47;
/// Block size of each ACE class: 1024 < size <= 256 KiB, every KiB up to 8 KiB, then eight
/// classes per doubling (steps of 1/8 of the lower power of two, as mimalloc and tcmalloc
/// space theirs), so that internal waste stays under an eighth and a block reused by a
/// request of about its size has its last pages where the previous user had them. Against
/// 18 classes of 1.33x-1.5x steps: mid 19% less time, big 36% less (TLB misses).
pub const ACE_CLASS_SIZES: [usize; ACE_CLASSES] = [
    2048, 3072, 4096, 5120, 6144, 7168, 8192, 9216, 10240, 11264, 12288, 13312, 14336, 15360,
    16384, 18432, 20480, 22528, 24576, 26624, 28672, 30720, 32768, 36864, 40960, 45056, 49152,
    53248, 57344, 61440, 65536, 73728, 81920, 90112, 98304, 106496, 114688, 122880, 131072, 147456,
    163840, 180224, 196608, 212992, 229376, 245760, 262144,
];
/// `class` argument of `ace_fail` when the size matches no class.
pub const NO_CLASS: u64 = 255;

/// Shared pool stage that served a slab request (`ss_acquire` argument `stage`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// An EMPTY slab reused from the Stage 1 list.
    ReuseEmpty = 1,
    /// A never-used slot claimed in an existing SuperSlab.
    ClaimFresh = 2,
    /// A newly mapped SuperSlab.
    MapNew = 3,
}
pub const STAGES: usize = 3;
pub const STAGE_NAMES: [&str; STAGES] = ["stage1", "stage2", "stage3"];

/// Outcome of a recycle check at a drain boundary (`slab_recycle` argument `outcome`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecycleOutcome {
    /// `used == 0 && capacity > 0`: the slab is EMPTY.
    Empty = 0,
    /// The EMPTY slab was released to the shared pool (pushed on the Stage 1 list).
    Released = 1,
    /// EMPTY, but it is the thread's current slab for its class: kept, not released.
    SkipActive = 2,
    /// EMPTY, but recycling is turned off (`HAKMEM_TINY_RECYCLE=0`).
    SkipDisabled = 3,
}
pub const OUTCOMES: usize = 4;
pub const OUTCOME_NAMES: [&str; OUTCOMES] = ["empty", "released", "skip_active", "skip_disabled"];

/// Why the shared pool gave up and the legacy path served (`shared_fail` argument `reason`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// Stage 3 asked the OS for a SuperSlab and was refused.
    MapFailed = 0,
    /// Stage 3 would exceed the SuperSlab budget (`HAKMEM_SS_MAX`).
    Budget = 1,
}
pub const REASONS: usize = 2;
pub const REASON_NAMES: [&str; REASONS] = ["map_failed", "budget"];

/// Kind of ACE failure (`ace_fail` argument `kind`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AceFailKind {
    /// The size matches no (enabled) ACE class.
    Threshold = 0,
    /// The class's pool is depleted and may not grow (segment budget reached).
    Exhaustion = 1,
    /// The OS refused memory for a new segment.
    MapFail = 2,
}
pub const ACE_KINDS: usize = 3;
pub const ACE_KIND_NAMES: [&str; ACE_KINDS] = ["threshold", "exhaustion", "map_fail"];

/// Why a TLS SLL was drained (`tls_drain` argument `why`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainWhy {
    Overflow = 0,
    ThreadExit = 1,
}

/// Who took a mapping from the large cache or freed one into it
/// (`cache_take` and `cache_put` argument `user`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheUser {
    /// A large block (above ACE, or one ACE could not serve).
    Large = 0,
    /// A new ACE segment.
    Ace = 1,
    /// A new SuperSlab.
    SuperSlab = 2,
    /// A new chunk of realloc-grown parcels.
    Parcel = 3,
}
pub const CACHE_USERS: usize = 4;
pub const CACHE_USER_NAMES: [&str; CACHE_USERS] = ["large", "ace", "superslab", "parcel"];

/// Where a mapping for a large block, an ACE segment or a SuperSlab came from
/// (`cache_take` argument `source`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeSource {
    /// Mapped fresh from the OS (a syscall, and page faults as it is touched).
    Fresh = 0,
    /// Reused from the large cache (no syscall; touched pages stay resident).
    Cached = 1,
}
pub const SOURCES: usize = 2;
pub const SOURCE_NAMES: [&str; SOURCES] = ["fresh", "cached"];

/// Why the large cache gave mappings back to the OS (`os_return` argument `why`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnWhy {
    /// Within the reserve, unused for a second.
    Idle = 0,
    /// Beyond the reserve, unused for the burst delay (`HAKMEM_PURGE_DELAY_MS`).
    Burst = 1,
    /// Over the cache's bounds (bytes or slots), or too big to cache at all.
    Bound = 2,
    /// The OS refused a new mapping, so everything cached went back first.
    Refused = 3,
    /// The program called `malloc_trim`.
    Trim = 4,
    /// Not the large cache: the pages of EMPTY slabs unused for the purge
    /// delay (or at `malloc_trim`), their address space kept. `mappings`
    /// counts slabs.
    Slabs = 5,
    /// Not the large cache: the pages of ACE segments kept with every block
    /// free and unused for 10 s (at once with `HAKMEM_PURGE_DELAY_MS=0`),
    /// their address space kept. `mappings` counts segments.
    AceSegments = 6,
}
pub const RETURN_WHYS: usize = 7;
impl ReturnWhy {
    /// Every reason, in code order.
    pub const ALL: [ReturnWhy; RETURN_WHYS] = [
        ReturnWhy::Idle,
        ReturnWhy::Burst,
        ReturnWhy::Bound,
        ReturnWhy::Refused,
        ReturnWhy::Trim,
        ReturnWhy::Slabs,
        ReturnWhy::AceSegments,
    ];
}
const _: () = {
    let mut i = 0;
    while i < RETURN_WHYS {
        assert!(ReturnWhy::ALL[i] as usize == i);
        i += 1;
    }
};
pub const RETURN_WHY_NAMES: [&str; RETURN_WHYS] =
    ["idle", "burst", "bound", "refused", "trim", "slabs", "ace"];
