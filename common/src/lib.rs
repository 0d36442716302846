//! The probe catalogue shared by the allocator, the eBPF programs and hakctl.
//!
//! Everything here is `no_std`, allocation-free and `#[repr(C)]`/integer based, so
//! the same definitions compile into the allocator, into eBPF bytecode and into
//! the userspace tool. One definition of every code means the three can never
//! disagree about what "stage 2" or "outcome 3" is.
#![no_std]

pub mod codes;
pub mod hist;
pub mod json;
pub mod levels;
pub mod probe;
pub mod tally;
pub mod trace;

pub use codes::*;
pub use probe::{ProbeId, PROBES, PROBE_COUNT};
pub use tally::{Tally, TALLY_SLOTS};
