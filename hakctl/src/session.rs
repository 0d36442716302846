//! A tracing session: the eBPF object loaded, attached to every hakmem probe
//! location of one process, and its maps read on demand.

use crate::attach::{self, UprobeLink};
use crate::target::HakmemObject;
use anyhow::{anyhow, Context, Result};
use aya::maps::stack_trace::StackTraceMap;
use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::UProbe;
use aya::Ebpf;
use hakmem_common::hist::{HIST_BUCKETS, HIST_ROWS};
use hakmem_common::trace::{
    StackKey, TraceFilter, CONFIG_PER_PROCESS, CONFIG_PIDNS_DEV, CONFIG_PIDNS_INO,
    CONFIG_STACK_MASK, CONFIG_TRACE_MASK, DROPPED_FILTERED, DROPPED_FULL, DROPPED_STACK_MAP_FULL,
    FILTER_CONDITIONS,
};
use hakmem_common::{ProbeId, Tally, TALLY_SLOTS};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

const PROGRAM: &str = "hakmem_probe";

/// Probes that fire once per thread-cache drain: tens of thousands of times a
/// second in a busy program, each a trap into the kernel (bench_random_mixed
/// ran 12-16% slower with them attached). Attached only on request.
pub const DRAIN_PROBES: [ProbeId; 2] = [ProbeId::TlsDrain, ProbeId::RemoteDrain];

/// Everything hakctl reads from the maps at one moment.
#[derive(Clone)]
pub struct Snapshot {
    pub at: Instant,
    pub tally: Tally,
    pub hists: Vec<[u64; HIST_BUCKETS]>,
    /// The sum of the values recorded into each histogram row.
    pub hist_sums: Vec<u64>,
    pub trace_drops: u64,
    /// Kernel run-time statistics of the program (0 if the kernel keeps none).
    pub bpf_run_time_ns: u64,
    pub bpf_run_count: u64,
}

impl Snapshot {
    /// What happened between `earlier` and this snapshot: counts, histogram
    /// buckets and eBPF run time of that interval (taken at this one's time).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let hists = self
            .hists
            .iter()
            .zip(&earlier.hists)
            .map(|(now, then)| std::array::from_fn(|b| now[b].saturating_sub(then[b])))
            .collect();
        Snapshot {
            at: self.at,
            tally: self.tally.since(&earlier.tally),
            hists,
            hist_sums: self
                .hist_sums
                .iter()
                .zip(&earlier.hist_sums)
                .map(|(now, then)| now.wrapping_sub(*then))
                .collect(),
            trace_drops: self.trace_drops.saturating_sub(earlier.trace_drops),
            bpf_run_time_ns: self.bpf_run_time_ns.saturating_sub(earlier.bpf_run_time_ns),
            bpf_run_count: self.bpf_run_count.saturating_sub(earlier.bpf_run_count),
        }
    }

    /// Seconds from `earlier` to this snapshot (never 0, to divide by).
    pub fn secs_since(&self, earlier: &Snapshot) -> f64 {
        self.at.duration_since(earlier.at).as_secs_f64().max(1e-9)
    }
}

pub struct Session {
    ebpf: Ebpf,
    _links: Vec<UprobeLink>,
    _stats: Option<OwnedFd>,
    pub pid: i32,
    /// The process's name at attach (it may be gone when the last report is written).
    pub process: String,
    pub locations: usize,
    /// Whether the `DRAIN_PROBES` are attached.
    pub drains: bool,
    pub started: Instant,
}

/// Sets word `index` of the program's `CONFIG` array.
fn set_config_in(ebpf: &mut Ebpf, index: u32, value: u64) -> Result<()> {
    let mut config: Array<&mut MapData, u64> =
        Array::try_from(ebpf.map_mut("CONFIG").context("CONFIG map")?)?;
    config.set(index, value, 0)?;
    Ok(())
}

/// The inode of the initial pid namespace (the kernel's `PROC_PID_INIT_INO`).
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// The pid namespace whose ids `/proc` shows, and so the user's pids, as
/// `bpf_get_ns_current_pid_tgid` takes it (the device of its `ns/pid` link
/// encoded as the kernel's `dev_t`, its inode); None for the initial
/// namespace (or without `/proc`), whose ids the program's plain helper
/// gives. In a container without the host's pid namespace, `/proc` and the
/// user's pids are the container's: counts, stacks and traces are keyed by
/// those ids too. `/proc`'s namespace is its pid 1's; where pid 1's links
/// are closed to hakctl (no `CAP_SYS_PTRACE`), hakctl's own if `/proc/self`
/// names hakctl's pid (a host `/proc` seen from a child namespace does not:
/// then the initial namespace's ids are taken).
fn own_pid_namespace() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/1/ns/pid")
        .or_else(|e| {
            let in_proc = std::fs::read_link("/proc/self")?;
            if in_proc.to_str() == Some(&std::process::id().to_string()) {
                std::fs::metadata("/proc/self/ns/pid")
            } else {
                Err(e)
            }
        })
        .ok()?;
    if ns.ino() == INITIAL_PID_NAMESPACE {
        return None;
    }
    let dev = ns.dev();
    let kernel_dev = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
    Some((kernel_dev, ns.ino()))
}

impl Session {
    /// Loads the programs and attaches them to every hakmem probe site of
    /// `objects` in `pid` (the `DRAIN_PROBES` only if `drains`).
    pub fn attach(pid: i32, objects: Vec<HakmemObject>, drains: bool) -> Result<Session> {
        Session::load(pid, objects, drains)
    }

    /// Attaches to the probe sites of `files` (libraries or executables on
    /// disk) in every process that maps them, now or later, and counts per
    /// process too (`process_tallies`). The kernel raises the probes'
    /// semaphores in each process as it maps the file. `pid` is -1.
    pub fn attach_everywhere(files: Vec<HakmemObject>, drains: bool) -> Result<Session> {
        let mut s = Session::load(-1, files, drains)?;
        s.set_config(CONFIG_PER_PROCESS, 1)?;
        s.process = "every process".into();
        Ok(s)
    }

    fn load(pid: i32, objects: Vec<HakmemObject>, drains: bool) -> Result<Session> {
        crate::target::check_environment()?;
        // Run-time statistics (best effort: older kernels or missing privilege just show 0).
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/hakmem-probes"
        )))
        .map_err(|e| load_error(e.into()))?;
        let prog: &mut UProbe = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the eBPF object has no program {PROGRAM}"))?
            .try_into()
            .context("eBPF program type")?;
        prog.load().map_err(|e| load_error(e.into()))?;
        let prog_fd = prog.fd().context("eBPF program fd")?.as_fd().as_raw_fd();
        // Before the first event: ids in hakctl's pid namespace from the start.
        if let Some((dev, ino)) = own_pid_namespace() {
            set_config_in(&mut ebpf, CONFIG_PIDNS_DEV, dev)?;
            set_config_in(&mut ebpf, CONFIG_PIDNS_INO, ino)?;
        }
        let pmu = attach::uprobe_pmu_type()?;
        let mut links = Vec::new();
        for obj in &objects {
            for site in &obj.sites {
                let Some(id) = ProbeId::from_name(&site.name) else {
                    // A newer allocator may have probes this hakctl does not know.
                    continue;
                };
                if !drains && DRAIN_PROBES.contains(&id) {
                    continue;
                }
                let link = attach::attach(
                    pmu,
                    prog_fd,
                    &obj.attach_path,
                    site.pc_offset,
                    site.semaphore_offset,
                    pid,
                    id as u64,
                )
                .with_context(|| {
                    format!(
                        "attaching to {}:{} in {}",
                        site.provider, site.name, obj.path
                    )
                })?;
                links.push(link);
            }
        }
        let locations = links.len();
        Ok(Session {
            ebpf,
            _links: links,
            _stats: stats,
            pid,
            process: crate::target::process_name(pid),
            locations,
            drains,
            started: Instant::now(),
        })
    }

    fn set_config(&mut self, index: u32, value: u64) -> Result<()> {
        set_config_in(&mut self.ebpf, index, value)
    }

    /// Sends the probes in `mask` (bit = probe id) through the trace ring buffer.
    pub fn set_trace_mask(&mut self, mask: u64) -> Result<()> {
        self.set_config(CONFIG_TRACE_MASK, mask)
    }

    /// Records the user call stack of every event of the probes in `mask`
    /// that passes the probe's trace filter.
    pub fn set_stack_mask(&mut self, mask: u64) -> Result<()> {
        self.set_config(CONFIG_STACK_MASK, mask)
    }

    /// How often each (process, probe, user stack) came so far.
    pub fn stack_counts(&self) -> Result<Vec<(StackKey, u64)>> {
        let map: PerCpuHashMap<&MapData, [u64; 2], u64> =
            PerCpuHashMap::try_from(self.ebpf.map("STACK_COUNTS").context("STACK_COUNTS map")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (k, per_cpu) = entry?;
            let key = StackKey {
                tgid: k[0] as u32,
                probe: (k[0] >> 32) as u32,
                stack_id: k[1] as i64,
            };
            out.push((key, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// The return addresses of user stack `id`, innermost first.
    pub fn stack(&self, id: u32) -> Result<Vec<u64>> {
        let map: StackTraceMap<&MapData> =
            StackTraceMap::try_from(self.ebpf.map("STACKS").context("STACKS map")?)?;
        Ok(map.get(&id, 0)?.frames().iter().map(|f| f.ip).collect())
    }

    /// Counts per process so far (`attach_everywhere` sessions), by process id.
    pub fn process_tallies(&self) -> Result<BTreeMap<u32, Tally>> {
        let map: PerCpuHashMap<&MapData, u32, [u64; TALLY_SLOTS]> = PerCpuHashMap::try_from(
            self.ebpf
                .map("PROCESS_TALLY")
                .context("PROCESS_TALLY map")?,
        )?;
        let mut out = BTreeMap::new();
        for entry in map.iter() {
            let (pid, per_cpu) = entry?;
            out.insert(pid, sum_per_cpu(per_cpu.iter()));
        }
        Ok(out)
    }

    /// One process's counts so far (`attach_everywhere` sessions).
    pub fn process_tally(&self, pid: u32) -> Result<Option<Tally>> {
        let map: PerCpuHashMap<&MapData, u32, [u64; TALLY_SLOTS]> = PerCpuHashMap::try_from(
            self.ebpf
                .map("PROCESS_TALLY")
                .context("PROCESS_TALLY map")?,
        )?;
        match map.get(&pid, 0) {
            Ok(per_cpu) => Ok(Some(sum_per_cpu(per_cpu.iter()))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A process's command name at its first event (`attach_everywhere` sessions).
    pub fn process_comm(&self, pid: u32) -> Option<String> {
        let map: aya::maps::HashMap<&MapData, u32, [u8; 16]> =
            aya::maps::HashMap::try_from(self.ebpf.map("PROCESS_COMM")?).ok()?;
        let comm = map.get(&pid, 0).ok()?;
        let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        Some(String::from_utf8_lossy(&comm[..len]).into_owned())
    }

    /// Drops the per-process counts of a process that exited (its id may be reused).
    pub fn forget_process(&mut self, pid: u32) -> Result<()> {
        if let Some(map) = self.ebpf.map_mut("PROCESS_COMM") {
            let mut comms: aya::maps::HashMap<&mut MapData, u32, [u8; 16]> =
                aya::maps::HashMap::try_from(map)?;
            let _ = comms.remove(&pid);
        }
        let mut map: PerCpuHashMap<&mut MapData, u32, [u64; TALLY_SLOTS]> =
            PerCpuHashMap::try_from(
                self.ebpf
                    .map_mut("PROCESS_TALLY")
                    .context("PROCESS_TALLY map")?,
            )?;
        match map.remove(&pid) {
            // A process with no event since the attach has no entry (the
            // fleet lists those that map the file too): aya says so with
            // the syscall's ENOENT, not `KeyNotFound`.
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends only the events of probe `id` that pass `filter` through the ring buffer.
    pub fn set_trace_filter(&mut self, id: ProbeId, filter: TraceFilter) -> Result<()> {
        let mut filters: Array<&mut MapData, [u64; 2 * FILTER_CONDITIONS]> =
            Array::try_from(self.ebpf.map_mut("FILTERS").context("FILTERS map")?)?;
        filters.set(id as u32, filter.words(), 0)?;
        Ok(())
    }

    /// Events the trace filters kept out of the ring buffer so far.
    pub fn trace_filtered(&self) -> Result<u64> {
        self.drops(DROPPED_FILTERED)
    }

    /// Events whose stack was taken but not counted: the stack counts were full.
    pub fn stacks_dropped(&self) -> Result<u64> {
        self.drops(DROPPED_STACK_MAP_FULL)
    }

    fn drops(&self, why: u32) -> Result<u64> {
        let drops: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("DROPS").context("DROPS map")?)?;
        Ok(drops.get(&why, 0)?.iter().sum())
    }

    pub fn take_events(&mut self) -> Result<RingBuf<aya::maps::MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        let tally_map: PerCpuArray<&MapData, [u64; TALLY_SLOTS]> =
            PerCpuArray::try_from(self.ebpf.map("TALLY").context("TALLY map")?)?;
        let tally = sum_per_cpu(tally_map.get(&0, 0)?.iter());
        let hist_map: PerCpuArray<&MapData, [u64; HIST_BUCKETS]> =
            PerCpuArray::try_from(self.ebpf.map("HIST").context("HIST map")?)?;
        let mut hists = Vec::with_capacity(HIST_ROWS as usize);
        for row in 0..HIST_ROWS {
            let mut sum = [0u64; HIST_BUCKETS];
            for cpu in hist_map.get(&row, 0)?.iter() {
                for (s, v) in sum.iter_mut().zip(cpu.iter()) {
                    *s += v;
                }
            }
            hists.push(sum);
        }
        let sums_map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("HIST_SUM").context("HIST_SUM map")?)?;
        let hist_sums = (0..HIST_ROWS)
            .map(|row| {
                Ok(sums_map
                    .get(&row, 0)?
                    .iter()
                    .fold(0u64, |a, v| a.wrapping_add(*v)))
            })
            .collect::<Result<Vec<u64>>>()?;
        let drops_map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("DROPS").context("DROPS map")?)?;
        let trace_drops = drops_map.get(&DROPPED_FULL, 0)?.iter().sum();
        let (bpf_run_time_ns, bpf_run_count) = self.program_stats();
        Ok(Snapshot {
            at: Instant::now(),
            tally,
            hists,
            hist_sums,
            trace_drops,
            bpf_run_time_ns,
            bpf_run_count,
        })
    }

    fn program_stats(&self) -> (u64, u64) {
        let Some(prog) = self.ebpf.program(PROGRAM) else {
            return (0, 0);
        };
        match prog.info() {
            Ok(info) => (info.run_time().as_nanos() as u64, info.run_count()),
            Err(_) => (0, 0),
        }
    }
}

/// One tally from each CPU's copy of it.
fn sum_per_cpu<'a>(cpus: impl Iterator<Item = &'a [u64; TALLY_SLOTS]>) -> Tally {
    let mut tally = Tally::default();
    for cpu in cpus {
        for (t, v) in tally.slots.iter_mut().zip(cpu.iter()) {
            *t += v;
        }
    }
    tally
}

fn load_error(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        anyhow!("cannot load eBPF programs: not enough privilege (needs root, or CAP_BPF and CAP_PERFMON): {text}")
    } else {
        anyhow!("cannot load the eBPF programs: {text}")
    }
}
