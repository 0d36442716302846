//! A tracing session: the eBPF object loaded, attached to every hakmem probe
//! location of one process, and its maps read on demand.

use crate::attach::{self, UprobeLink};
use crate::target::HakmemObject;
use anyhow::{anyhow, Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::UProbe;
use aya::Ebpf;
use hakmem_common::hist::{HIST_BUCKETS, HIST_ROWS};
use hakmem_common::trace::{
    TraceFilter, CONFIG_TRACE_MASK, DROPPED_FILTERED, DROPPED_FULL, FILTER_CONDITIONS,
};
use hakmem_common::{ProbeId, Tally, TALLY_SLOTS};
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

impl Session {
    /// Loads the programs and attaches them to every hakmem probe site of
    /// `objects` in `pid` (the `DRAIN_PROBES` only if `drains`).
    pub fn attach(pid: i32, objects: Vec<HakmemObject>, drains: bool) -> Result<Session> {
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

    /// Sends the probes in `mask` (bit = probe id) through the trace ring buffer.
    pub fn set_trace_mask(&mut self, mask: u64) -> Result<()> {
        let mut config: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut("CONFIG").context("CONFIG map")?)?;
        config.set(CONFIG_TRACE_MASK, mask, 0)?;
        Ok(())
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
        let drops: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("DROPS").context("DROPS map")?)?;
        Ok(drops.get(&DROPPED_FILTERED, 0)?.iter().sum())
    }

    pub fn take_events(&mut self) -> Result<RingBuf<aya::maps::MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        let tally_map: PerCpuArray<&MapData, [u64; TALLY_SLOTS]> =
            PerCpuArray::try_from(self.ebpf.map("TALLY").context("TALLY map")?)?;
        let mut tally = Tally::default();
        for cpu in tally_map.get(&0, 0)?.iter() {
            for (t, v) in tally.slots.iter_mut().zip(cpu.iter()) {
                *t += v;
            }
        }
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
        let drops_map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("DROPS").context("DROPS map")?)?;
        let trace_drops = drops_map.get(&DROPPED_FULL, 0)?.iter().sum();
        let (bpf_run_time_ns, bpf_run_count) = self.program_stats();
        Ok(Snapshot {
            at: Instant::now(),
            tally,
            hists,
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

fn load_error(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        anyhow!("cannot load eBPF programs: not enough privilege (needs root, or CAP_BPF and CAP_PERFMON): {text}")
    } else {
        anyhow!("cannot load the eBPF programs: {text}")
    }
}
