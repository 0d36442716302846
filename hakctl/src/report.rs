//! What hakctl shows: derived figures (rates, stage hit rates, the recycle
//! funnel, percentiles) and their renderings: tables for people, JSON for
//! programs (schema in docs/json-schema.md).

use crate::session::Snapshot;
use hakmem_common::codes::*;
use hakmem_common::hist::{
    bucket_high, HIST_ACQUIRE_NS, HIST_BUCKETS, HIST_REMOTE_DRAIN_BATCH, HIST_TLS_DRAIN_BATCH,
};
use hakmem_common::{ProbeId, Tally, PROBES};
use serde_json::{json, Value};
use std::fmt::Write;

pub const SCHEMA: &str = "hakctl/1";

/// The wall clock now, in seconds since the Unix epoch (`time_unix_s` in every document).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub struct Report<'a> {
    pub kind: &'static str,
    pub pid: i32,
    pub process: String,
    pub locations: usize,
    /// Whether the drain probes are attached (if not, their counts stay 0).
    pub drains: bool,
    /// Counts since attach.
    pub total: &'a Snapshot,
    /// Seconds since attach.
    pub elapsed: f64,
    /// What the last interval added (counts for rates, histogram buckets),
    /// and its length in seconds.
    pub interval: Option<(Snapshot, f64)>,
    pub target_exited: bool,
    /// The memory levels now (`hakctl mem`), if they could be read.
    pub memory: Option<crate::mem::Reading>,
}

/// The tally as JSON: the same document the allocator prints with HAKMEM_STATS=1.
pub fn tally_json(t: &Tally) -> Value {
    let mut s = String::new();
    hakmem_common::json::write_tally(&mut s, t).expect("writing to a String");
    serde_json::from_str(&s).expect("the tally writer emits JSON")
}

/// Percentiles of a histogram whose values the eBPF side kept in log-linear
/// buckets (`hakmem_common::hist`: exact below 16, then eight buckets per
/// power of two). Each figure is the upper bound of the bucket the percentile
/// falls in: the true value is at most it and at least 7/8 of it (exact
/// below 16); `max` is the upper bound of the highest bucket holding a value.
/// (Read through hdrhistogram, re-recording each bucket's lower bound, the
/// figures came out up to 12.5% low, and `max` a bucket floor: the buckets
/// are all the information there is, so they are read directly.)
#[derive(Clone, Copy, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

pub fn percentiles(buckets: &[u64; HIST_BUCKETS]) -> Percentiles {
    let count: u64 = buckets.iter().sum();
    if count == 0 {
        return Percentiles::default();
    }
    // The bucket holding the ceil(q * count)-th value, by its upper bound.
    let at = |q: f64| {
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (b, &n) in buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_high(b);
            }
        }
        unreachable!("rank <= count")
    };
    Percentiles {
        count,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn pct_json(p: Percentiles) -> Value {
    json!({"count": p.count, "p50": p.p50, "p90": p.p90, "p99": p.p99, "max": p.max})
}

/// The histogram rows by name, each as its percentiles.
fn histograms_json(h: &[[u64; HIST_BUCKETS]]) -> Value {
    let row = |r: u32| pct_json(h.get(r as usize).map(percentiles).unwrap_or_default());
    json!({
        "tls_drain_batch": row(HIST_TLS_DRAIN_BATCH),
        "remote_drain_batch": row(HIST_REMOTE_DRAIN_BATCH),
        "acquire_ns": {
            "stage1": row(HIST_ACQUIRE_NS),
            "stage2": row(HIST_ACQUIRE_NS + 1),
            "stage3": row(HIST_ACQUIRE_NS + 2),
        },
    })
}

/// The histogram rows as people read them: a name, its row, and the probe that fills it.
pub const HISTOGRAM_ROWS: [(&str, u32, ProbeId); 5] = [
    ("tls_drain batch", HIST_TLS_DRAIN_BATCH, ProbeId::TlsDrain),
    (
        "remote_drain batch",
        HIST_REMOTE_DRAIN_BATCH,
        ProbeId::RemoteDrain,
    ),
    ("acquire stage1 ns", HIST_ACQUIRE_NS, ProbeId::SsAcquire),
    ("acquire stage2 ns", HIST_ACQUIRE_NS + 1, ProbeId::SsAcquire),
    ("acquire stage3 ns", HIST_ACQUIRE_NS + 2, ProbeId::SsAcquire),
];

/// Per class: (stage 1, 2, 3 acquires, shared_fail total).
pub fn stage_counts(t: &Tally, class: usize) -> ([u64; STAGES], u64) {
    let s = [
        t.acquire(class, 1),
        t.acquire(class, 2),
        t.acquire(class, 3),
    ];
    let fails = (0..REASONS).map(|r| t.shared_fail(class, r)).sum();
    (s, fails)
}

pub fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

impl Report<'_> {
    /// Whether probe `id` was attached (its count means something).
    pub fn attached(&self, id: ProbeId) -> bool {
        self.drains || !crate::session::DRAIN_PROBES.contains(&id)
    }

    pub fn json(&self) -> Value {
        let t = &self.total.tally;
        let hit_rates: Vec<Value> = (0..TINY_CLASSES)
            .map(|c| {
                let (s, fails) = stage_counts(t, c);
                let requests = s.iter().sum::<u64>() + fails;
                json!({
                    "class": c, "size": TINY_CLASS_SIZES[c], "requests": requests,
                    "stage1": ratio(s[0], requests), "stage2": ratio(s[1], requests),
                    "stage3": ratio(s[2], requests), "legacy": ratio(fails, requests),
                })
            })
            .collect();
        let rates = self.interval.as_ref().map(|(d, secs)| {
            let mut m = serde_json::Map::new();
            for p in PROBES.iter() {
                m.insert(p.name.to_string(), json!(d.tally.probe(p.id) as f64 / secs));
            }
            Value::Object(m)
        });
        let events = events(t);
        json!({
            "schema": SCHEMA,
            "kind": self.kind,
            "time_unix_s": unix_now(),
            "pid": self.pid,
            "process": self.process,
            "elapsed_s": self.elapsed,
            "target_exited": self.target_exited,
            "probe_locations": self.locations,
            "drains_attached": self.drains,
            "counts": tally_json(t),
            "rates_per_s": rates,
            "stage_hit_rates": hit_rates,
            "funnel": self.funnel_json(),
            "histograms": histograms_json(&self.total.hists),
            "histograms_interval": self.interval.as_ref().map(|(d, _)| histograms_json(&d.hists)),
            "memory": self.memory.as_ref().map(|m| m.json()),
            "cost": {
                "events": events,
                "events_per_s": events as f64 / self.elapsed.max(1e-9),
                "bpf_run_count": self.total.bpf_run_count,
                "bpf_run_time_ns": self.total.bpf_run_time_ns,
                "bpf_ns_per_event": ratio(self.total.bpf_run_time_ns, self.total.bpf_run_count),
                "trace_drops": self.total.trace_drops,
            },
        })
    }

    pub fn funnel_json(&self) -> Value {
        let t = &self.total.tally;
        let sum = |o: RecycleOutcome| (0..TINY_CLASSES).map(|c| t.recycle(c, o)).sum::<u64>();
        let reused: u64 = (0..TINY_CLASSES).map(|c| t.acquire(c, 1)).sum();
        json!({
            "empty": sum(RecycleOutcome::Empty),
            "released": sum(RecycleOutcome::Released),
            "skip_active": sum(RecycleOutcome::SkipActive),
            "skip_disabled": sum(RecycleOutcome::SkipDisabled),
            "reused_stage1": reused,
        })
    }

    /// Full tables (`stage-stats`, and what `watch` and `run` leave on the terminal).
    pub fn tables(&self) -> String {
        let t = &self.total.tally;
        let mut o = String::new();
        let state = if self.target_exited {
            "  [target exited]"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "hakctl {} pid {} ({})  attached {:.1}s  {} probe locations{state}",
            self.kind, self.pid, self.process, self.elapsed, self.locations
        );
        let _ = writeln!(o, "\nPROBE              TOTAL        RATE/s");
        for p in PROBES.iter() {
            if !self.attached(p.id) {
                let _ = writeln!(o, "{:<16} {:>9} {:>12}", p.name, "off", "--drains");
                continue;
            }
            let rate = match &self.interval {
                Some((d, secs)) => format!("{:>12.0}", d.tally.probe(p.id) as f64 / secs),
                None => format!("{:>12}", "-"),
            };
            let _ = writeln!(o, "{:<16} {:>9} {rate}", p.name, t.probe(p.id));
        }
        let _ = writeln!(
            o,
            "\nCLASS  SIZE   STAGE1   STAGE2   STAGE3  LEGACY  STAGE1%"
        );
        for (c, size) in TINY_CLASS_SIZES.iter().enumerate() {
            let (s, fails) = stage_counts(t, c);
            let requests = s.iter().sum::<u64>() + fails;
            let r = ratio(s[0], requests);
            let _ = writeln!(
                o,
                "{c:>5} {size:>5} {:>8} {:>8} {:>8} {:>7}  {:>6.1}%",
                s[0],
                s[1],
                s[2],
                fails,
                r * 100.0
            );
        }
        let _ = writeln!(
            o,
            "\nRECYCLE FUNNEL (per class: EMPTY detected -> released -> reused by Stage 1)"
        );
        let _ = writeln!(
            o,
            "CLASS    EMPTY  RELEASED  SKIP_ACTIVE  SKIP_DISABLED  STAGE1_REUSE"
        );
        for c in 0..TINY_CLASSES {
            let _ = writeln!(
                o,
                "{c:>5} {:>8} {:>9} {:>12} {:>14} {:>13}",
                t.recycle(c, RecycleOutcome::Empty),
                t.recycle(c, RecycleOutcome::Released),
                t.recycle(c, RecycleOutcome::SkipActive),
                t.recycle(c, RecycleOutcome::SkipDisabled),
                t.acquire(c, 1)
            );
        }
        let f = self.funnel_json();
        let n = |k: &str| f[k].as_u64().unwrap_or(0);
        let _ = writeln!(
            o,
            "{}",
            funnel_line(n("empty"), n("released"), n("reused_stage1"))
        );
        let _ = writeln!(o, "\nSHARED_FAIL -> LEGACY (class: map_failed/budget)");
        let fails: Vec<String> = (0..TINY_CLASSES)
            .filter(|&c| (0..REASONS).any(|r| t.shared_fail(c, r) > 0))
            .map(|c| format!("c{c}: {}/{}", t.shared_fail(c, 0), t.shared_fail(c, 1)))
            .collect();
        let _ = writeln!(
            o,
            "  {}",
            if fails.is_empty() {
                "none".to_string()
            } else {
                fails.join("  ")
            }
        );
        let _ = writeln!(
            o,
            "\nACE FAILURES  threshold {}  exhaustion {}  map_fail {}",
            t.ace_fail(AceFailKind::Threshold),
            t.ace_fail(AceFailKind::Exhaustion),
            t.ace_fail(AceFailKind::MapFail)
        );
        o.push_str(&os_memory(t));
        let h = &self.total.hists;
        let _ = writeln!(
            o,
            "\nHISTOGRAM              COUNT      P50      P90      P99      MAX"
        );
        for (name, row, probe) in HISTOGRAM_ROWS {
            let row = row as usize;
            if !self.attached(probe) {
                let _ = writeln!(o, "{name:<20} {:>7}", "off");
                continue;
            }
            let p = percentiles(&h[row]);
            let _ = writeln!(
                o,
                "{name:<20} {:>7} {:>8} {:>8} {:>8} {:>8}",
                p.count, p.p50, p.p90, p.p99, p.max
            );
        }
        if let Some(m) = &self.memory {
            let _ = write!(o, "\n{}", m.summary());
        }
        let events = events(t);
        let _ = writeln!(
            o,
            "\nCOST  {events} events ({:.0}/s)  eBPF: {} runs, {:.0} ns/run, {:.3} ms total{}",
            events as f64 / self.elapsed.max(1e-9),
            self.total.bpf_run_count,
            ratio(self.total.bpf_run_time_ns, self.total.bpf_run_count),
            self.total.bpf_run_time_ns as f64 / 1e6,
            if self.total.trace_drops > 0 {
                format!("  trace drops {}", self.total.trace_drops)
            } else {
                String::new()
            }
        );
        o
    }

    /// One line per tick for logs and pipes. Beside the Stage 1 share since
    /// attach, the last interval's: a run's first acquisitions are all fresh
    /// slabs (Stage 2), and they dominate the total long after the program
    /// has settled.
    pub fn line(&self) -> String {
        let t = &self.total.tally;
        let (acquires, s1) = acquires_and_stage1(t);
        let fails = t.probe(ProbeId::SharedFail);
        let rate = self.interval.as_ref().map(|(d, secs)| {
            let n = events(&d.tally);
            n as f64 / secs
        });
        // Counted as the total's share is: shared-pool failures are requests too.
        let recent = match &self.interval {
            Some((d, secs)) => match acquires_and_stage1(&d.tally) {
                (n, s1) if n + d.tally.probe(ProbeId::SharedFail) > 0 => format!(
                    " (last {secs:.1}s: {s1} of {})",
                    n + d.tally.probe(ProbeId::SharedFail)
                ),
                _ => format!(" (last {secs:.1}s: none)"),
            },
            None => String::new(),
        };
        format!(
            "t={:.1}s events/s={:.0} acquires={acquires} stage1={:.1}%{recent} shared_fail={fails} recycled={} ace_fail={}{}{}",
            self.elapsed,
            rate.unwrap_or(0.0),
            ratio(s1, acquires + fails) * 100.0,
            (0..TINY_CLASSES).map(|c| t.recycle(c, RecycleOutcome::Released)).sum::<u64>(),
            t.probe(ProbeId::AceFail),
            self.memory.as_ref().map_or(String::new(), |m| format!(" {}", m.short())),
            if self.target_exited { " [target exited]" } else { "" }
        )
    }
}

/// Memory to and from the OS: SuperSlabs, and the large cache in front of
/// large blocks, ACE segments and SuperSlabs (what it served each without a
/// syscall, what it gave back and why). Where a program's RSS goes, in one place.
pub fn os_memory(t: &Tally) -> String {
    let (ss_made, ss_retired) = t.ss_bytes();
    let (cached, cached_bytes) = t.takes(TakeSource::Cached);
    let (fresh, fresh_bytes) = t.takes(TakeSource::Fresh);
    let returned: Vec<String> = ReturnWhy::ALL
        .into_iter()
        .map(|why| {
            format!(
                "{} {}",
                RETURN_WHY_NAMES[why as usize],
                mib(t.returned_bytes(why))
            )
        })
        .collect();
    let by_user: Vec<String> = CACHE_USER_NAMES
        .iter()
        .enumerate()
        .map(|(u, name)| {
            let cached = t.user_takes(u, TakeSource::Cached);
            let all = cached + t.user_takes(u, TakeSource::Fresh);
            format!("{name} {cached} of {all}")
        })
        .collect();
    let held = t.held_bytes();
    format!(
        "\nOS MEMORY  superslabs: made {}  retired {}\n  large cache: {cached} of {} takes cached ({:.1}%, {})  {fresh} mapped fresh ({})\n  cached takes by user: {}\n  freed into it {}, holding {}{} more than at attach\n  returned: {}\n",
        mib(ss_made),
        mib(ss_retired),
        cached + fresh,
        ratio(cached, cached + fresh) * 100.0,
        mib(cached_bytes),
        mib(fresh_bytes),
        by_user.join("  "),
        mib(t.put_bytes()),
        if held < 0 { "-" } else { "" },
        mib(held.unsigned_abs()),
        returned.join("  ")
    )
}

/// Bytes as MiB, one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Events of every probe in a tally.
pub fn events(t: &Tally) -> u64 {
    PROBES.iter().map(|p| t.probe(p.id)).sum()
}

/// Slab acquisitions of every tiny class and stage, and those from Stage 1.
pub fn acquires_and_stage1(t: &Tally) -> (u64, u64) {
    let all = (0..TINY_CLASSES)
        .flat_map(|c| (1..=STAGES).map(move |s| (c, s)))
        .map(|(c, s)| t.acquire(c, s))
        .sum();
    (all, (0..TINY_CLASSES).map(|c| t.acquire(c, 1)).sum())
}

/// The funnel of every class on one line, and where it breaks if it does.
pub fn funnel_line(empty: u64, released: u64, reused: u64) -> String {
    format!(
        "  all: {empty} EMPTY -> {released} released -> {reused} reused{}",
        funnel_break(empty, released, reused)
    )
}

fn funnel_break(e: u64, r: u64, u: u64) -> &'static str {
    if e == 0 {
        "   <- no slab ever became EMPTY"
    } else if r == 0 {
        "   <- EMPTY slabs are never released"
    } else if u == 0 {
        "   <- released slabs are never reused"
    } else {
        ""
    }
}

pub fn bar(fraction: f64, width: usize) -> String {
    let filled = (fraction.clamp(0.0, 1.0) * width as f64).round() as usize;
    format!("{}{}", "█".repeat(filled), "·".repeat(width - filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquisitions(stages: &[u64]) -> Tally {
        let mut t = Tally::default();
        for &stage in stages {
            t.record(ProbeId::SsAcquire as u32, 7, stage);
        }
        t
    }

    fn snapshot(tally: Tally) -> Snapshot {
        Snapshot {
            at: std::time::Instant::now(),
            tally,
            hists: Vec::new(),
            hist_sums: Vec::new(),
            trace_drops: 0,
            bpf_run_time_ns: 0,
            bpf_run_count: 0,
        }
    }

    #[test]
    fn the_line_gives_the_last_intervals_stage1_share_beside_the_total() {
        // 50 fresh slabs at start-up, then 3 acquisitions, 2 of them recycled.
        let mut all = vec![2; 50];
        all.extend([1, 1, 2]);
        let total = snapshot(acquisitions(&all));
        let mut r = Report {
            kind: "run",
            pid: 1,
            process: "p".into(),
            locations: 19,
            drains: false,
            total: &total,
            elapsed: 3.0,
            interval: Some((snapshot(acquisitions(&[1, 1, 2])), 1.0)),
            target_exited: false,
            memory: None,
        };
        assert!(line_has(&r, "acquires=53 stage1=3.8% (last 1.0s: 2 of 3) "));
        r.interval = Some((snapshot(Tally::default()), 1.0));
        assert!(line_has(&r, "stage1=3.8% (last 1.0s: none) "));
        // A shared-pool failure is a request that Stage 1 did not serve.
        let mut failed = Tally::default();
        failed.record(ProbeId::SharedFail as u32, 7, 0);
        r.interval = Some((snapshot(failed), 1.0));
        assert!(line_has(&r, "(last 1.0s: 0 of 1) "));
        r.interval = None;
        assert!(line_has(&r, "stage1=3.8% shared_fail=0"));
    }

    #[test]
    fn os_memory_shows_what_the_large_cache_served_and_gave_back_by_reason() {
        let mut t = Tally::default();
        t.record(ProbeId::SsMap as u32, 4 << 20, 0);
        t.record(ProbeId::CacheTake as u32, 2 << 20, TakeSource::Fresh as u64);
        t.record(ProbeId::CacheTake as u32, 2 << 20, TakeSource::Fresh as u64);
        t.record3(
            ProbeId::CacheTake as u32,
            2 << 20,
            TakeSource::Cached as u64,
            CacheUser::SuperSlab as u64,
        );
        t.record(ProbeId::OsReturn as u32, 6 << 20, ReturnWhy::Burst as u64);
        t.record(ProbeId::OsReturn as u32, 1 << 20, ReturnWhy::Refused as u64);
        // EMPTY slabs' pages: returned, but never in the cache.
        t.record(ProbeId::OsReturn as u32, 5 << 20, ReturnWhy::Slabs as u64);
        t.record(ProbeId::CachePut as u32, 12 << 20, CacheUser::Large as u64);
        let text = os_memory(&t);
        for part in [
            "superslabs: made 4.0 MiB  retired 0.0 MiB",
            "1 of 3 takes cached (33.3%, 2.0 MiB)  2 mapped fresh (4.0 MiB)",
            "cached takes by user: large 0 of 2  ace 0 of 0  superslab 1 of 1  parcel 0 of 0",
            "idle 0.0 MiB  burst 6.0 MiB  bound 0.0 MiB  refused 1.0 MiB  trim 0.0 MiB  slabs 5.0 MiB",
            "freed into it 12.0 MiB, holding 3.0 MiB more than at attach",
        ] {
            assert!(text.contains(part), "{part:?} not in {text:?}");
        }
    }

    fn line_has(r: &Report, part: &str) -> bool {
        let line = r.line();
        line.contains(part) || panic!("{part:?} not in {line:?}")
    }
    #[test]
    fn percentiles_are_the_upper_bounds_of_their_buckets_never_below_the_truth() {
        use hakmem_common::hist::bucket_of;
        let mut b = [0u64; HIST_BUCKETS];
        // 98 values of 5 (exact: below 16), one of 100, one of 1000.
        b[bucket_of(5)] += 98;
        b[bucket_of(100)] += 1;
        b[bucket_of(1000)] += 1;
        let p = percentiles(&b);
        assert_eq!((p.count, p.p50, p.p90), (100, 5, 5));
        // The 99th value is the 100: its bucket is 96..=103.
        assert_eq!(p.p99, 103);
        assert!((100..=100 * 9 / 8).contains(&p.p99));
        // max: the 1000's bucket, 960..=1023, never a floor below the truth.
        assert_eq!(p.max, 1023);
        assert_eq!(percentiles(&[0; HIST_BUCKETS]).count, 0);
    }
}
