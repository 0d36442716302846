//! The probes of provider `hakmem`: ids (also used as the BPF cookie) and argument names.
//!
//! Argument order is part of the contract with every tracer (hakctl, bpftrace
//! scripts): all arguments are 64-bit integers in registers, in the order listed.

/// Probe ids. The numeric value is the BPF attach cookie hakctl passes, so the
/// eBPF program knows which probe fired without reading user memory.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeId {
    SlabRecycle = 0,
    SsAcquireBegin = 1,
    SsAcquire = 2,
    SharedFail = 3,
    AceFail = 4,
    TlsDrain = 5,
    RemoteDrain = 6,
    SsMap = 7,
    SsUnmap = 8,
    LegacyRefill = 9,
    CacheTake = 10,
    OsReturn = 11,
    CachePut = 12,
}

pub const PROBE_COUNT: usize = 13;

/// Static description of one probe.
pub struct ProbeDesc {
    pub id: ProbeId,
    pub name: &'static str,
    pub args: &'static [&'static str],
}

pub const PROBES: [ProbeDesc; PROBE_COUNT] = [
    ProbeDesc {
        id: ProbeId::SlabRecycle,
        name: "slab_recycle",
        args: &["class", "outcome", "slab", "used"],
    },
    ProbeDesc {
        id: ProbeId::SsAcquireBegin,
        name: "ss_acquire_begin",
        args: &["class"],
    },
    ProbeDesc {
        id: ProbeId::SsAcquire,
        name: "ss_acquire",
        args: &["class", "stage", "slab"],
    },
    ProbeDesc {
        id: ProbeId::SharedFail,
        name: "shared_fail",
        args: &["class", "reason"],
    },
    ProbeDesc {
        id: ProbeId::AceFail,
        name: "ace_fail",
        args: &["kind", "size", "class"],
    },
    ProbeDesc {
        id: ProbeId::TlsDrain,
        name: "tls_drain",
        args: &["class", "batch", "why"],
    },
    ProbeDesc {
        id: ProbeId::RemoteDrain,
        name: "remote_drain",
        args: &["class", "batch"],
    },
    ProbeDesc {
        id: ProbeId::SsMap,
        name: "ss_map",
        args: &["bytes", "ss"],
    },
    ProbeDesc {
        id: ProbeId::SsUnmap,
        name: "ss_unmap",
        args: &["bytes", "ss"],
    },
    ProbeDesc {
        id: ProbeId::LegacyRefill,
        name: "legacy_refill",
        args: &["class", "batch"],
    },
    ProbeDesc {
        id: ProbeId::CacheTake,
        name: "cache_take",
        args: &["bytes", "source", "user"],
    },
    ProbeDesc {
        id: ProbeId::OsReturn,
        name: "os_return",
        args: &["bytes", "why", "resident", "mappings"],
    },
    ProbeDesc {
        id: ProbeId::CachePut,
        name: "cache_put",
        args: &["bytes", "user", "resident"],
    },
];

impl ProbeId {
    pub const fn from_u32(v: u32) -> Option<ProbeId> {
        if (v as usize) < PROBE_COUNT {
            Some(PROBES[v as usize].id)
        } else {
            None
        }
    }

    pub const fn name(self) -> &'static str {
        PROBES[self as usize].name
    }

    pub fn from_name(name: &str) -> Option<ProbeId> {
        PROBES.iter().find(|p| p.name == name).map(|p| p.id)
    }
}
