//! The eBPF side of hakctl: one uprobe program attached to every hakmem USDT
//! probe location. The attach cookie says which probe fired; the arguments come
//! from registers (the probes pass integers only), so no user memory is read.
//!
//! Per hit it updates the per-CPU tally through `hakmem_common::tally::record`
//! (the same function the allocator's own `HAKMEM_STATS` tally uses), buckets
//! drain batches and slab acquire latencies into per-CPU log-linear
//! histograms, and, when `hakctl trace` asked for this probe, sends the event
//! through the ring buffer (counting what did not fit). Attached to a library
//! file for every process, it also counts per process (`PROCESS_TALLY`); for
//! `hakctl stacks` it counts the user call stacks of the chosen probes.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{bpf_pidns_info, BPF_F_USER_STACK};
use aya_ebpf::helpers::generated::{bpf_get_attach_cookie, bpf_get_ns_current_pid_tgid};
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use aya_ebpf::macros::{map, uprobe};
use aya_ebpf::maps::{
    Array, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace,
};
use aya_ebpf::programs::tracing::StackIdContext;
use aya_ebpf::programs::ProbeContext;
use aya_ebpf::EbpfContext;
use hakmem_common::hist::{
    bucket_of, HistRow, HIST_ACQUIRE_NS, HIST_BUCKETS, HIST_REMOTE_DRAIN_BATCH, HIST_ROWS,
    HIST_TLS_DRAIN_BATCH,
};
use hakmem_common::trace::{
    StackKey, TraceEvent, TraceFilter, CONFIG_ENTRIES, CONFIG_PER_PROCESS, CONFIG_PIDNS_DEV,
    CONFIG_PIDNS_INO, CONFIG_STACK_MASK, CONFIG_TRACE_MASK, DROPPED_FILTERED, DROPPED_FULL,
    DROPPED_STACK_MAP_FULL, DROP_REASONS, FILTER_ENTRIES, PROCESS_ENTRIES, STACK_ENTRIES,
};
use hakmem_common::{tally, ProbeId, Tally, STAGES, TALLY_SLOTS};

#[map(name = "TALLY")]
static TALLY: PerCpuArray<Tally> = PerCpuArray::with_max_entries(1, 0);

/// Per process (tgid), when `CONFIG_PER_PROCESS` is set.
#[map(name = "PROCESS_TALLY")]
static PROCESS_TALLY: LruPerCpuHashMap<u32, Tally> =
    LruPerCpuHashMap::with_max_entries(PROCESS_ENTRIES, 0);

/// Per process: its command name at its first event (for processes that
/// exit before hakctl reads `/proc`).
#[map(name = "PROCESS_COMM")]
static PROCESS_COMM: LruHashMap<u32, [u8; 16]> = LruHashMap::with_max_entries(PROCESS_ENTRIES, 0);

/// A zeroed tally, the first value of a new process's entry: a tally does
/// not fit on the eBPF stack (512 bytes). Never written.
#[map(name = "ZERO_TALLY")]
static ZERO_TALLY: Array<Tally> = Array::with_max_entries(1, 0);

/// User call stacks of the probes in `CONFIG_STACK_MASK`, and how often each came.
#[map(name = "STACKS")]
static STACKS: StackTrace = StackTrace::with_max_entries(STACK_ENTRIES, 0);

#[map(name = "STACK_COUNTS")]
static STACK_COUNTS: PerCpuHashMap<StackKey, u64> =
    PerCpuHashMap::with_max_entries(STACK_ENTRIES, 0);

#[map(name = "HIST")]
static HIST: PerCpuArray<HistRow> = PerCpuArray::with_max_entries(HIST_ROWS, 0);

/// The sum of the values recorded in each histogram row (Prometheus's `_sum`).
#[map(name = "HIST_SUM")]
static HIST_SUM: PerCpuArray<u64> = PerCpuArray::with_max_entries(HIST_ROWS, 0);

/// Start time of a slab request per thread, between `ss_acquire_begin` and its end.
#[map(name = "ACQUIRE_START")]
static ACQUIRE_START: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_ENTRIES, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per probe id: which of its events `trace` wants (`TraceFilter`).
#[map(name = "FILTERS")]
static FILTERS: Array<TraceFilter> = Array::with_max_entries(FILTER_ENTRIES, 0);

/// Traced events not sent: the ring buffer was full, or a filter kept them out.
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

#[uprobe]
pub fn hakmem_probe(ctx: ProbeContext) -> u32 {
    handle(&ctx);
    0
}

#[inline(always)]
fn handle(ctx: &ProbeContext) {
    // SAFETY: the helper reads the cookie hakctl attached with; ctx is the program's context.
    let probe = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let a0: u64 = ctx.arg(0).unwrap_or(0);
    let a1: u64 = ctx.arg(1).unwrap_or(0);
    let a2: u64 = ctx.arg(2).unwrap_or(0);

    if let Some(t) = TALLY.get_ptr_mut(0) {
        count(t, probe, a0, a1, a2);
    }

    let pid_tgid = bpf_get_current_pid_tgid();
    if config(CONFIG_PER_PROCESS) != 0 {
        let tgid = (seen_pid_tgid() >> 32) as u32;
        if tgid != 0 {
            if let Some(t) = process_tally(tgid) {
                count(t, probe, a0, a1, a2);
            }
        }
    }
    match probe {
        p if p == ProbeId::TlsDrain as u32 => hist(HIST_TLS_DRAIN_BATCH, a1),
        p if p == ProbeId::RemoteDrain as u32 => hist(HIST_REMOTE_DRAIN_BATCH, a1),
        p if p == ProbeId::SsAcquireBegin as u32 => {
            // SAFETY: the helper has no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            let _ = ACQUIRE_START.insert(pid_tgid, now, 0);
        }
        p if p == ProbeId::SsAcquire as u32 => {
            // SAFETY: the map value is a plain u64 copied out at once.
            if let Some(&start) = unsafe { ACQUIRE_START.get(pid_tgid) } {
                // SAFETY: the helper has no preconditions.
                let now = unsafe { bpf_ktime_get_ns() };
                if (1..=STAGES as u64).contains(&a1) {
                    hist(HIST_ACQUIRE_NS + a1 as u32 - 1, now.wrapping_sub(start));
                }
                let _ = ACQUIRE_START.remove(pid_tgid);
            }
        }
        p if p == ProbeId::SharedFail as u32 => {
            let _ = ACQUIRE_START.remove(pid_tgid);
        }
        _ => {}
    }

    let args = [a0, a1, a2, ctx.arg(3).unwrap_or(0)];
    stack(ctx, probe, &args);
    trace(probe, args);
}

/// The current thread's ids (tgid << 32 | pid) as hakctl sees them: in its
/// pid namespace when it runs in one (`CONFIG_PIDNS_INO`), else the initial
/// namespace's. 0 for a thread of a process hakctl cannot see.
#[inline(always)]
fn seen_pid_tgid() -> u64 {
    let ino = config(CONFIG_PIDNS_INO);
    if ino == 0 {
        return bpf_get_current_pid_tgid();
    }
    let mut ids = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes at most `size` bytes into `ids`, a local of that size.
    let r = unsafe {
        bpf_get_ns_current_pid_tgid(
            config(CONFIG_PIDNS_DEV),
            ino,
            &mut ids,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    if r != 0 {
        return 0;
    }
    ((ids.tgid as u64) << 32) | ids.pid as u64
}

#[inline(always)]
fn config(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

#[inline(always)]
fn count(t: *mut Tally, probe: u32, a0: u64, a1: u64, a2: u64) {
    tally::record(probe, a0, a1, a2, |slot, n| {
        if slot < TALLY_SLOTS {
            // SAFETY: `t` is this CPU's copy of a per-CPU map value, and no
            // other program writes it meanwhile: the kernel runs one tracing
            // program at a time per CPU (bpf_prog_active; a hit while one runs,
            // from a task that preempted it, is skipped and counted as missed,
            // migration is disabled while it runs); slot is in bounds.
            unsafe { *(*t).slots.get_unchecked_mut(slot) += n };
        }
    });
}

/// This CPU's tally of process `tgid`, made on its first event.
#[inline(always)]
fn process_tally(tgid: u32) -> Option<*mut Tally> {
    if let Some(t) = PROCESS_TALLY.get_ptr_mut(tgid) {
        return Some(t);
    }
    if let Ok(comm) = bpf_get_current_comm() {
        let _ = PROCESS_COMM.insert(tgid, comm, 0);
    }
    let zero = ZERO_TALLY.get(0)?;
    // NOEXIST: another CPU may have made it meanwhile; then it is used as is.
    let _ = PROCESS_TALLY.insert(tgid, zero, aya_ebpf::bindings::BPF_NOEXIST as u64);
    PROCESS_TALLY.get_ptr_mut(tgid)
}

/// Whether the probe's `FILTERS` entry (`--class`, `--arg`) lets this event through.
#[inline(always)]
fn passes(probe: u32, args: &[u64; 4]) -> bool {
    FILTERS.get(probe).is_none_or(|f| f.passes(args))
}

/// Counts the user call stack of this event if `hakctl stacks` asked for its probe.
#[inline(always)]
fn stack(ctx: &ProbeContext, probe: u32, args: &[u64; 4]) {
    let mask = config(CONFIG_STACK_MASK);
    if probe >= 64 || mask & (1u64 << probe) == 0 || !passes(probe, args) {
        return;
    }
    let pid_tgid = seen_pid_tgid();
    if pid_tgid == 0 {
        return;
    }
    let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(e) => e as i64,
    };
    let key = StackKey {
        tgid: (pid_tgid >> 32) as u32,
        probe,
        stack_id,
    };
    if STACK_COUNTS.get_ptr_mut(key).is_none() {
        // NOEXIST: when another CPU made it first, this CPU's slot of it is used.
        let _ = STACK_COUNTS.insert(key, 0, aya_ebpf::bindings::BPF_NOEXIST as u64);
    }
    if let Some(n) = STACK_COUNTS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU map value (one program at a time per CPU, as in `count`).
        unsafe { *n += 1 };
    } else {
        dropped(DROPPED_STACK_MAP_FULL);
    }
}

#[inline(always)]
fn hist(row: u32, value: u64) {
    if let Some(h) = HIST.get_ptr_mut(row) {
        let b = bucket_of(value) & (HIST_BUCKETS - 1);
        // SAFETY: this CPU's row (one program at a time per CPU, as in `count`); b < HIST_BUCKETS.
        unsafe { *(*h).buckets.get_unchecked_mut(b) += 1 };
    }
    if let Some(sum) = HIST_SUM.get_ptr_mut(row) {
        // SAFETY: this CPU's counter (one program at a time per CPU, as in `count`).
        unsafe { *sum = (*sum).wrapping_add(value) };
    }
}

#[inline(always)]
fn trace(probe: u32, args: [u64; 4]) {
    let mask = config(CONFIG_TRACE_MASK);
    if probe >= 64 || mask & (1u64 << probe) == 0 {
        return;
    }
    if !passes(probe, &args) {
        dropped(DROPPED_FILTERED);
        return;
    }
    match EVENTS.reserve::<TraceEvent>(0) {
        Some(mut entry) => {
            let ev = TraceEvent {
                // SAFETY: the helper has no preconditions.
                ts_ns: unsafe { bpf_ktime_get_ns() },
                pid_tgid: seen_pid_tgid(),
                probe,
                _pad: 0,
                args,
            };
            entry.write(ev);
            entry.submit(0);
        }
        None => dropped(DROPPED_FULL),
    }
}

#[inline(always)]
fn dropped(why: u32) {
    if let Some(d) = DROPS.get_ptr_mut(why) {
        // SAFETY: this CPU's counter (one program at a time per CPU, as in `count`).
        unsafe { *d += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: every index above is checked; the verifier rejects any path here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
