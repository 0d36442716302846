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
/// Index of the per-process switch: non-zero when hakctl attached to a
/// library file for every process (`watch --all`, `serve --all`), so the
/// program also counts into `PROCESS_TALLY`, keyed by process id.
pub const CONFIG_PER_PROCESS: u32 = 1;
/// Index of the stack mask: probe ids (bit = id) whose events record the
/// user call stack into `STACK_COUNTS` (`hakctl stacks`), after the probe's
/// `FILTERS` entry passes.
pub const CONFIG_STACK_MASK: u32 = 2;
/// Indexes of hakctl's pid namespace, the device and inode of its
/// `/proc/self/ns/pid` (the device as the kernel encodes it), when that is
/// not the initial namespace: the program then names processes by their ids
/// in it (`bpf_get_ns_current_pid_tgid`), as hakctl's `/proc` does, and
/// leaves out of the per-process counts and stacks those it cannot see.
/// Inode 0: the initial namespace, whose ids the plain helper gives.
pub const CONFIG_PIDNS_DEV: u32 = 3;
pub const CONFIG_PIDNS_INO: u32 = 4;
pub const CONFIG_ENTRIES: u32 = 5;

/// Processes `PROCESS_TALLY` holds at once (least recently updated evicted;
/// hakctl removes the ones that exited at every refresh).
pub const PROCESS_ENTRIES: u32 = 4096;

/// Call stacks `STACKS` can hold, and (process, probe, stack) counters.
pub const STACK_ENTRIES: u32 = 16384;

/// Key of the `STACK_COUNTS` map: how many events of `probe` in process
/// `tgid` came with the user stack `stack_id` (an id in `STACKS`; negative:
/// the kernel could not take the stack, its error code).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    pub tgid: u32,
    pub probe: u32,
    pub stack_id: i64,
}

/// Conditions a trace filter can hold per probe.
pub const FILTER_CONDITIONS: usize = 2;

/// Which events of one probe go through the ring buffer (`hakctl trace
/// --class`, `--arg`): those whose argument `arg[i] - 1` equals `value[i]`
/// for every condition `i` that is set (`arg[i] != 0`). Evaluated in the
/// eBPF program before anything is reserved, so events filtered out never
/// take room in the ring buffer. Kept in the `FILTERS` array, by probe id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// Argument index + 1 of each condition (0: unset).
    pub arg: [u64; FILTER_CONDITIONS],
    pub value: [u64; FILTER_CONDITIONS],
}

impl TraceFilter {
    /// Adds the condition "argument `index` equals `value`"; false when full.
    pub fn require(&mut self, index: usize, value: u64) -> bool {
        match self.arg.iter().position(|&a| a == 0) {
            Some(i) => {
                self.arg[i] = index as u64 + 1;
                self.value[i] = value;
                true
            }
            None => false,
        }
    }

    /// The filter as the map stores it (`repr(C)`: the arguments, then the values).
    pub fn words(&self) -> [u64; 2 * FILTER_CONDITIONS] {
        let mut w = [0; 2 * FILTER_CONDITIONS];
        w[..FILTER_CONDITIONS].copy_from_slice(&self.arg);
        w[FILTER_CONDITIONS..].copy_from_slice(&self.value);
        w
    }

    /// Whether an event with these arguments passes every condition. Written
    /// without indexing by a variable, for the eBPF verifier.
    #[inline(always)]
    pub fn passes(&self, args: &[u64; 4]) -> bool {
        let mut i = 0;
        while i < FILTER_CONDITIONS {
            let got = match self.arg[i] {
                0 => self.value[i],
                1 => args[0],
                2 => args[1],
                3 => args[2],
                4 => args[3],
                _ => return false,
            };
            if got != self.value[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// The `FILTERS` array's length: one entry per probe id.
pub const FILTER_ENTRIES: u32 = 64;

/// Index in the eBPF `DROPS` array of events the ring buffer had no room
/// for, and of events a trace filter kept out.
pub const DROPPED_FULL: u32 = 0;
pub const DROPPED_FILTERED: u32 = 1;
/// Stacks not counted: `STACK_COUNTS` was full.
pub const DROPPED_STACK_MAP_FULL: u32 = 2;
pub const DROP_REASONS: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_passes_what_every_condition_allows() {
        let mut f = TraceFilter::default();
        assert!(f.passes(&[1, 2, 3, 4]), "no condition: everything");
        assert!(f.require(0, 7));
        assert!(f.passes(&[7, 0, 0, 0]) && !f.passes(&[6, 0, 0, 0]));
        assert!(f.require(3, 9));
        assert!(f.passes(&[7, 0, 0, 9]) && !f.passes(&[7, 0, 0, 8]));
        assert!(!f.require(1, 1), "two conditions at most");
        assert_eq!(f.words(), [1, 4, 7, 9]);
        assert_eq!(core::mem::size_of::<TraceFilter>(), 8 * f.words().len());
        f.arg[0] = 5;
        assert!(!f.passes(&[7, 0, 0, 9]), "an argument that does not exist");
    }
}
