//! `hakctl serve`: the counts, memory levels and histograms of one process,
//! or of every process that maps libhakmem.so (`--all`, a `pid` and a
//! `command` label on each per-process series), as an OpenMetrics text
//! endpoint for Prometheus. The exposition is prometheus-client's encoder,
//! the HTTP server hyper's, on hakctl's tokio runtime. Each scrape reads
//! the eBPF maps at that moment: nothing is polled while nobody scrapes.
//!
//! Counters carry the values since hakctl attached (a restart of hakctl is
//! a counter reset, which Prometheus's rate() handles).

use crate::commands::{End, Stop};
use crate::fleet::Fleet;
use crate::session::{Session, Snapshot};
use anyhow::{bail, Context, Result};
use hakmem_common::codes::*;
use hakmem_common::hist::{
    bucket_high, HIST_ACQUIRE_NS, HIST_BUCKETS, HIST_REMOTE_DRAIN_BATCH, HIST_TLS_DRAIN_BATCH,
};
use hakmem_common::tally::*;
use hakmem_common::{ProbeId, Tally, PROBES};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

type Labels = Vec<(String, String)>;

/// What the endpoint shows: one process, or every process of a system-wide session.
enum Scope {
    Process(i32),
    Everywhere(Fleet),
}

struct Exporter {
    session: Session,
    scope: Scope,
}

/// A histogram whose buckets were counted elsewhere (in the eBPF maps):
/// per-bucket counts with their upper bounds, the sum and the count.
#[derive(Debug)]
struct Bucketed {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl EncodeMetric for Bucketed {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Histograms of one metric, one per label set.
#[derive(Debug)]
struct BucketedFamily(Vec<(Labels, Bucketed)>);

impl EncodeMetric for BucketedFamily {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        for (labels, h) in &self.0 {
            h.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The log-linear buckets of one row merged at powers of two: the same 35
/// `le` bounds at every scrape (a bound that came and went would break
/// `rate()` over the buckets), each the exact upper bound of a bucket, so no
/// value is counted on the wrong side of it; divided by `unit` (1e9: ns to seconds).
fn bucketed(buckets: &[u64; HIST_BUCKETS], sum: u64, unit: f64) -> Bucketed {
    let mut out: Vec<(f64, u64)> = Vec::new();
    let mut pending = 0;
    for (b, &n) in buckets.iter().enumerate() {
        pending += n;
        let high = bucket_high(b);
        if high == u64::MAX {
            out.push((f64::INFINITY, pending));
        } else if (high + 1).is_power_of_two() {
            out.push((high as f64 / unit, pending));
            pending = 0;
        }
    }
    Bucketed {
        count: buckets.iter().sum(),
        sum: sum as f64 / unit,
        buckets: out,
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Adds one tally's counters to the families, each series labelled with `base` first.
struct Counters {
    events: Family<Labels, Counter>,
    acquires: Family<Labels, Counter>,
    recycles: Family<Labels, Counter>,
    shared_failures: Family<Labels, Counter>,
    ace_failures: Family<Labels, Counter>,
    legacy_blocks: Family<Labels, Counter>,
    superslab_bytes: Family<Labels, Counter>,
    cache_takes: Family<Labels, Counter>,
    returned_bytes: Family<Labels, Counter>,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            events: Family::default(),
            acquires: Family::default(),
            recycles: Family::default(),
            shared_failures: Family::default(),
            ace_failures: Family::default(),
            legacy_blocks: Family::default(),
            superslab_bytes: Family::default(),
            cache_takes: Family::default(),
            returned_bytes: Family::default(),
        }
    }

    fn add(&self, base: &[(&str, String)], t: &Tally, attached: &dyn Fn(ProbeId) -> bool) {
        let with = |extra: &[(&str, String)]| {
            let mut l = labels(base);
            l.extend(labels(extra));
            l
        };
        let inc = |f: &Family<Labels, Counter>, l: Labels, n: u64| {
            f.get_or_create(&l).inc_by(n);
        };
        for p in PROBES.iter().filter(|p| attached(p.id)) {
            inc(
                &self.events,
                with(&[("probe", p.name.into())]),
                t.probe(p.id),
            );
        }
        for (c, size) in TINY_CLASS_SIZES.iter().enumerate() {
            let class = ("class_bytes", size.to_string());
            for (s, stage) in STAGE_NAMES.iter().enumerate() {
                inc(
                    &self.acquires,
                    with(&[class.clone(), ("stage", stage.to_string())]),
                    t.acquire(c, s + 1),
                );
            }
            for (o, outcome) in OUTCOME_NAMES.iter().enumerate() {
                inc(
                    &self.recycles,
                    with(&[class.clone(), ("outcome", outcome.to_string())]),
                    t.slots[SLOT_RECYCLE + c * OUTCOMES + o],
                );
            }
            for (r, reason) in REASON_NAMES.iter().enumerate() {
                inc(
                    &self.shared_failures,
                    with(&[class.clone(), ("reason", reason.to_string())]),
                    t.shared_fail(c, r),
                );
            }
            inc(&self.legacy_blocks, with(&[class]), t.legacy_blocks(c));
        }
        for (k, kind) in ACE_KIND_NAMES.iter().enumerate() {
            inc(
                &self.ace_failures,
                with(&[("kind", kind.to_string())]),
                t.slots[SLOT_ACE_FAIL + k],
            );
        }
        let (mapped, unmapped) = t.ss_bytes();
        inc(
            &self.superslab_bytes,
            with(&[("direction", "mapped".into())]),
            mapped,
        );
        inc(
            &self.superslab_bytes,
            with(&[("direction", "unmapped".into())]),
            unmapped,
        );
        for (u, user) in CACHE_USER_NAMES.iter().enumerate() {
            for (s, source) in SOURCE_NAMES.iter().enumerate() {
                inc(
                    &self.cache_takes,
                    with(&[("user", user.to_string()), ("source", source.to_string())]),
                    t.user_takes_at(u, s),
                );
            }
        }
        for (w, why) in RETURN_WHY_NAMES.iter().enumerate() {
            inc(
                &self.returned_bytes,
                with(&[("why", why.to_string())]),
                t.slots[SLOT_RETURNED_BYTES + w],
            );
        }
    }

    fn register(self, r: &mut Registry) {
        r.register(
            "hakmem_probe_events",
            "Probe events since hakctl attached",
            self.events,
        );
        r.register(
            "hakmem_slab_acquires",
            "Slabs the shared pool handed out, by tiny class and stage (1: reused EMPTY slab, 2: fresh slot, 3: new SuperSlab)",
            self.acquires,
        );
        r.register(
            "hakmem_slab_recycles",
            "Slab recycle attempts, by tiny class and outcome",
            self.recycles,
        );
        r.register(
            "hakmem_shared_pool_failures",
            "Times the shared pool gave up and the legacy path served, by tiny class and reason",
            self.shared_failures,
        );
        r.register(
            "hakmem_ace_failures",
            "Mid-size (ACE) requests the pool could not serve, by kind",
            self.ace_failures,
        );
        r.register(
            "hakmem_legacy_blocks",
            "Blocks the legacy slab allocator refilled, by tiny class",
            self.legacy_blocks,
        );
        r.register(
            "hakmem_superslab_bytes",
            "SuperSlab bytes mapped and unmapped",
            self.superslab_bytes,
        );
        r.register(
            "hakmem_cache_takes",
            "Chunks taken from the OS-facing cache, by user and whether fresh or cached",
            self.cache_takes,
        );
        r.register(
            "hakmem_os_returned_bytes",
            "Bytes given back to the OS, by why",
            self.returned_bytes,
        );
    }
}

/// Memory levels of one process (`hakctl mem`), as gauges.
struct Levels {
    in_use: Family<Labels, Gauge>,
    cached: Family<Labels, Gauge>,
    rss: Family<Labels, Gauge>,
}

impl Levels {
    fn new() -> Levels {
        Levels {
            in_use: Family::default(),
            cached: Family::default(),
            rss: Family::default(),
        }
    }

    fn set(&self, base: &[(&str, String)], (in_use, cached, rss): (u64, u64, u64)) {
        let l = labels(base);
        self.in_use.get_or_create(&l).set(in_use as i64);
        self.cached.get_or_create(&l).set(cached as i64);
        self.rss.get_or_create(&l).set(rss as i64);
    }

    fn register(self, r: &mut Registry) {
        r.register(
            "hakmem_in_use_bytes",
            "Bytes in blocks the program holds",
            self.in_use,
        );
        r.register(
            "hakmem_thread_cache_bytes",
            "Bytes in free blocks held by thread caches",
            self.cached,
        );
        r.register(
            "hakmem_rss_bytes",
            "The process's resident set size",
            self.rss,
        );
    }
}

fn histograms(r: &mut Registry, snap: &Snapshot) {
    let row = |i: u32| (&snap.hists[i as usize], snap.hist_sums[i as usize]);
    for (name, help, index) in [
        (
            "hakmem_tls_drain_batch_blocks",
            "Blocks per thread-cache drain (with --drains)",
            HIST_TLS_DRAIN_BATCH,
        ),
        (
            "hakmem_remote_drain_batch_blocks",
            "Blocks per remote-free drain (with --drains)",
            HIST_REMOTE_DRAIN_BATCH,
        ),
    ] {
        let (b, sum) = row(index);
        r.register(name, help, bucketed(b, sum, 1.0));
    }
    let acquire = BucketedFamily(
        STAGE_NAMES
            .iter()
            .enumerate()
            .map(|(s, stage)| {
                let (b, sum) = row(HIST_ACQUIRE_NS + s as u32);
                (
                    labels(&[("stage", stage.to_string())]),
                    bucketed(b, sum, 1e9),
                )
            })
            .collect(),
    );
    r.register(
        "hakmem_slab_acquire_seconds",
        "Time from a slab request to the slab, by the stage that served it",
        acquire,
    );
}

impl Exporter {
    fn metrics(&mut self) -> Result<String> {
        let mut r = Registry::default();
        let counters = Counters::new();
        let levels = Levels::new();
        let drains = self.session.drains;
        let attached = move |p: ProbeId| drains || !crate::session::DRAIN_PROBES.contains(&p);
        let snap = self.session.snapshot()?;
        let processes = Gauge::<i64>::default();
        match &mut self.scope {
            Scope::Process(pid) => {
                counters.add(&[], &snap.tally, &attached);
                if let Ok(m) = crate::mem::read(*pid) {
                    levels.set(&[], m.bytes());
                }
                processes.set(crate::target::alive(*pid) as i64);
            }
            Scope::Everywhere(fleet) => {
                let rows = fleet.refresh(&mut self.session)?;
                processes.set(rows.iter().filter(|r| !r.exited).count() as i64);
                for row in rows {
                    let base = [
                        ("pid", row.pid.to_string()),
                        ("command", row.command.clone()),
                    ];
                    counters.add(&base, &row.tally, &attached);
                    if let Some(m) = row.memory {
                        levels.set(&base, m);
                    }
                }
            }
        }
        counters.register(&mut r);
        levels.register(&mut r);
        histograms(&mut r, &snap);
        r.register(
            "hakmem_processes",
            "Processes hakctl is attached to that are alive",
            processes,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).context("encoding the metrics")?;
        Ok(out)
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same metrics in Prometheus's classic text format (0.0.4), for
/// clients that do not ask for OpenMetrics (curl, promtool check metrics):
/// a counter's family is named with its `_total` suffix there, and there is
/// no `# EOF` (prometheus-client writes OpenMetrics only; Prometheus asks
/// for OpenMetrics first, so it gets that).
fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out += renamed.as_deref().unwrap_or(line);
        out.push('\n');
    }
    out
}

fn respond(
    exporter: &RefCell<Exporter>,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match exporter.borrow_mut().metrics() {
            Ok(text) if wants_openmetrics(req) => reply(StatusCode::OK, OPENMETRICS, text),
            Ok(text) => reply(StatusCode::OK, PROMETHEUS_TEXT, classic_text(&text)),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("hakctl: cannot read the eBPF maps: {e:#}\n"),
            ),
        },
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain",
            "hakctl serve: the metrics are at /metrics\n".into(),
        ),
        (_, "/metrics") | (_, "/") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics\n".into(),
        ),
    }
}

fn wants_openmetrics(req: &Request<hyper::body::Incoming>) -> bool {
    req.headers().get_all("accept").iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    })
}

/// `hakctl serve`: listens on `listen` until a signal (or, for one
/// process, until it exits).
pub async fn serve(
    pid: Option<i32>,
    named: &[PathBuf],
    listen: SocketAddr,
    drains: bool,
) -> Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {listen}: the port is in use (another hakctl serve, or another exporter?); choose one with --listen")
        } else {
            anyhow::anyhow!("cannot listen on {listen}: {e}")
        }
    })?;
    let mut stop = Stop::new()?;
    let (session, scope, what) = match pid {
        Some(pid) => {
            let (session, _) = crate::commands::attach(pid, drains)?;
            (session, Scope::Process(pid), format!("process {pid}"))
        }
        None => {
            let (session, files) = crate::fleet::attach_files(named, drains)?;
            let what = format!(
                "every process that maps {}",
                files
                    .iter()
                    .map(|f| f.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let fleet = Fleet::new(&files, true);
            (session, Scope::Everywhere(fleet), what)
        }
    };
    let local = listener.local_addr().unwrap_or(listen);
    eprintln!(
        "hakctl: attached to {} probe locations in {what}; serving http://{local}/metrics",
        session.locations
    );
    if !local.ip().is_loopback() {
        eprintln!("hakctl: listening beyond loopback ({local}): anyone who reaches it reads these metrics");
    }
    let exporter = Rc::new(RefCell::new(Exporter { session, scope }));
    let connections = tokio::task::LocalSet::new();
    let end = connections
        .run_until(async {
            // One timer for the whole loop: a future made afresh at every turn
            // would never complete while connections keep coming.
            let mut exit_check = tokio::time::interval(std::time::Duration::from_millis(200));
            loop {
                tokio::select! {
                    why = stop.signalled() => return End::Stopped(why),
                    _ = exit_check.tick() => {
                        if pid.is_some_and(crate::target::exited) {
                            return End::TargetExited;
                        }
                    }
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let exporter = exporter.clone();
                        tokio::task::spawn_local(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let response = respond(&exporter, &req);
                                async move { Ok::<_, std::convert::Infallible>(response) }
                            });
                            let io = hyper_util::rt::TokioIo::new(stream);
                            // A client that goes away mid-request is its own business.
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        });
                    }
                }
            }
        })
        .await;
    end.say(pid.unwrap_or(-1));
    Ok(ExitCode::SUCCESS)
}

/// The listen address: HOST:PORT, or a port alone (on loopback).
pub fn listen_address(s: &str) -> Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    match s.parse() {
        Ok(a) => Ok(a),
        Err(_) => {
            bail!("--listen {s:?}: expected HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464) or a port")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hakmem_common::hist::bucket_of;

    #[test]
    fn buckets_merge_into_powers_of_two_without_moving_a_value() {
        let mut b = [0u64; HIST_BUCKETS];
        let values = [0u64, 1, 15, 16, 17, 31, 32, 1000, 1023, 1024, 5_000_000];
        for v in values {
            b[bucket_of(v)] += 1;
        }
        let h = bucketed(&b, values.iter().sum(), 1.0);
        assert_eq!(h.count, values.len() as u64);
        assert_eq!(h.sum, values.iter().sum::<u64>() as f64);
        // Cumulative at each bound = the values at or below it.
        let mut cumulative = 0;
        for &(le, n) in &h.buckets {
            cumulative += n;
            let below = values.iter().filter(|&&v| v as f64 <= le).count() as u64;
            assert_eq!(cumulative, below, "le {le}");
        }
        assert_eq!(h.buckets.len(), 35);
        assert_eq!(h.buckets.last().unwrap().0, f64::INFINITY);
        let empty = bucketed(&[0; HIST_BUCKETS], 0, 1e9);
        assert_eq!(empty.count, 0);
        let bounds = |h: &Bucketed| h.buckets.iter().map(|b| b.0).collect::<Vec<_>>();
        assert_eq!(
            bounds(&empty),
            bounds(&bucketed(&b, 0, 1e9)),
            "the same bounds always"
        );
    }

    #[test]
    fn the_classic_text_names_counter_families_with_total_and_has_no_eof() {
        let om = "# HELP a_events Events.\n# TYPE a_events counter\na_events_total{p=\"x\"} 3\n\
                  # HELP b Bytes.\n# TYPE b gauge\n# UNIT b bytes\nb 7\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP a_events_total Events.\n# TYPE a_events_total counter\na_events_total{p=\"x\"} 3\n\
             # HELP b Bytes.\n# TYPE b gauge\nb 7\n"
        );
    }

    #[test]
    fn listen_addresses_default_to_loopback() {
        assert_eq!(
            listen_address("9464").unwrap().to_string(),
            "127.0.0.1:9464"
        );
        assert_eq!(listen_address("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert!(listen_address("localhost")
            .unwrap_err()
            .to_string()
            .contains("HOST:PORT"));
    }
}
