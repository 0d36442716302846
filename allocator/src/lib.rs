//! hakmem: a general-purpose allocator whose decisions are USDT probes.
//!
//! Layering (each layer uses only those below it; `probes`, `stats`, `config`
//! and the shared codes are leaves):
//!
//! ```text
//! capi (malloc, free, ...) / HakMem (GlobalAlloc)
//!   -> api: size -> class, route to tiny / ACE / large
//!     -> tiny: thread cache (TLS SLL, refill, drain, thread exit)
//!       -> pool: stages 1-3, legacy fallback, the recycle boundary
//!         -> superslab, legacy, ace, parcel, large
//!           -> registry, os
//! ```
//!
//! Nothing here allocates through malloc, and nothing on the malloc/free fast
//! path takes a lock or issues an atomic read-modify-write.

// The allocator is a set of raw-pointer data structures; every unsafe block
// carries a SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

mod ace;
pub mod api;
#[cfg(feature = "c-abi")]
mod capi;
mod cgroup;
pub mod class;
pub mod config;
mod empty_slabs;
mod errno;
mod global;
mod hardening;
mod large;
mod legacy;
mod misuse;
mod os;
mod owned_index;
mod parcel;
mod pool;
mod probes;
mod purge;
mod registry;
mod segment;
pub mod stats;
mod superslab;
mod sync;
#[doc(hidden)]
pub mod test_hooks;
mod thread;
mod tiny;
mod tls;

pub use global::HakMem;

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
