//! Records that the eBPF programs pass to hakctl.

/// One probe hit, sent through the trace ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns` at the hit.
    pub ts_ns: u64,
    /// `bpf_get_current_pid_tgid`: tgid in the high half, thread id in the low.
    pub pid_tgid: u64,
    pub probe: u32,
    pub _pad: u32,
    /// The first four probe arguments (unused ones are whatever the registers held).
    pub args: [u64; 4],
}

/// Index of the trace configuration word in the eBPF `CONFIG` array: a bit
/// mask of the probe ids to send through the ring buffer (0: tracing off).
pub const CONFIG_TRACE_MASK: u32 = 0;
pub const CONFIG_ENTRIES: u32 = 1;
