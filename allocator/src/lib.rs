//! hakmem: a general-purpose allocator whose decisions are USDT probes.
//!
//! Each folder of `src/` is a layer; a module uses only its own layer and
//! those below it (`tests/layers.rs` checks every path, and that the module
//! graph has no cycle; docs/layers.md has the picture and the reasons):
//!
//! ```text
//! front      api, capi, cxx, global_alloc (C and C++ ABI, GlobalAlloc), place (free's classifier)
//! lifecycle  init, thread registration and exit, fork, upkeep (purge)
//! thread     the per-thread state: one part per tier, in static TLS
//! tiny       the tiny thread cache (TLS SLL, refill, drain), owned-slab index
//! pool       the shared slab pool: stages 1-3, the recycle boundary
//! tiers      superslab, legacy, ace, large, parcel
//! chunks     the chunk cache under every tier
//! base       os, registry, segment, hardening, test_hooks
//! leaf       errno, sync, class, config, cgroup, procfs, stats, probes, misuse
//! ```
//!
//! Nothing here allocates through malloc, and nothing on the malloc/free fast
//! path takes a lock or issues an atomic read-modify-write.

// The allocator is a set of raw-pointer data structures; every unsafe block
// carries a SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

mod front {
    pub mod api;
    #[cfg(feature = "c-abi")]
    pub mod capi;
    #[cfg(all(feature = "c-abi", target_arch = "x86_64"))]
    pub mod cxx;
    pub mod global_alloc;
    pub mod levels;
    pub mod place;
}
mod lifecycle;
mod pool;
mod thread;
mod tiny;
mod tiers {
    pub mod ace;
    pub mod large;
    pub mod legacy;
    pub mod parcel;
    pub mod superslab;
}
mod chunks;
mod base {
    pub mod hardening;
    pub mod os;
    pub mod registry;
    pub mod segment;
    pub mod test_hooks;
}
mod leaf {
    pub mod cgroup;
    pub mod class;
    pub mod clock;
    pub mod config;
    pub mod errno;
    pub mod misuse;
    pub mod probes;
    pub mod procfs;
    pub mod stats;
    pub mod sync;
}

// Every module by its own name (`crate::ace`), whatever its folder.
#[doc(hidden)]
pub use base::test_hooks;
use base::{hardening, os, registry, segment};
pub use front::api;
pub use front::global_alloc::HakMem;
use leaf::{cgroup, clock, errno, misuse, probes, procfs, sync};
pub use leaf::{class, config, stats};
/// Slots of the thread list hakctl reads: a thread beyond them keeps
/// nothing cached (for tests: `hakmem-scenario beyond-list`).
#[doc(hidden)]
pub use thread::THREAD_SLOTS;
use tiers::{ace, large, legacy, parcel, superslab};

#[cfg(feature = "probes")]
#[usdt::provider(provider = "hakmem")]
mod usdt_probes {
    fn slab_recycle(class: u64, outcome: u64, slab: u64, used: u64) {}
    fn ss_acquire_begin(class: u64) {}
    fn ss_acquire(class: u64, stage: u64, slab: u64) {}
    fn shared_fail(class: u64, reason: u64) {}
    fn ace_fail(kind: u64, size: u64, class: u64) {}
    fn tls_drain(class: u64, batch: u64, why: u64) {}
    fn remote_drain(class: u64, batch: u64) {}
    fn ss_map(bytes: u64, ss: u64) {}
    fn ss_unmap(bytes: u64, ss: u64) {}
    fn legacy_refill(class: u64, batch: u64) {}
    fn cache_take(bytes: u64, source: u64, user: u64) {}
    fn os_return(bytes: u64, why: u64, resident: u64, mappings: u64) {}
    fn cache_put(bytes: u64, user: u64, resident: u64) {}
}

/// Whether a tracer has raised the semaphore of `ss_acquire` (hakctl and
/// bpftrace raise it on attach). For programs that wait for a tracer.
pub fn probes_enabled() -> bool {
    probes::semaphore_raised!(ss_acquire)
}

/// How many probes have their semaphore raised by a tracer, of how many there
/// are (`hakmem-scenario --wait-attach` waits for every one).
pub fn probes_raised() -> (usize, usize) {
    let raised: [bool; hakmem_common::PROBE_COUNT] = [
        probes::semaphore_raised!(slab_recycle),
        probes::semaphore_raised!(ss_acquire_begin),
        probes::semaphore_raised!(ss_acquire),
        probes::semaphore_raised!(shared_fail),
        probes::semaphore_raised!(ace_fail),
        probes::semaphore_raised!(tls_drain),
        probes::semaphore_raised!(remote_drain),
        probes::semaphore_raised!(ss_map),
        probes::semaphore_raised!(ss_unmap),
        probes::semaphore_raised!(legacy_refill),
        probes::semaphore_raised!(cache_take),
        probes::semaphore_raised!(os_return),
        probes::semaphore_raised!(cache_put),
    ];
    (raised.iter().filter(|&&r| r).count(), raised.len())
}
