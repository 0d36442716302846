//! The subcommands.

use crate::report::Report;
use crate::session::{Session, Snapshot, DRAIN_PROBES};
use crate::target::{self, HakmemObject};
use anyhow::{bail, Context, Result};
use hakmem_common::trace::{TraceEvent, TraceFilter, FILTER_CONDITIONS};
use hakmem_common::{ProbeId, PROBES, PROBE_COUNT};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How a collection loop ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// A signal (SIGINT, SIGTERM, SIGHUP) or a quit key: what ended it.
    Stopped(&'static str),
    Elapsed,
    TargetExited,
}

impl End {
    /// What hakctl says on stderr when it stops for this reason.
    pub(crate) fn say(self, pid: i32) {
        match self {
            // Written without eprintln!, which panics when the terminal hung up.
            End::TargetExited => say(format_args!("process {pid} exited; detached")),
            End::Stopped(why) => say(format_args!("{why}; detached")),
            End::Elapsed => {}
        }
    }
}

/// A line on stderr that is lost, not a panic, when stderr is gone (a hung-up terminal).
fn say(what: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "hakctl: {what}");
}

/// Whether `sig` was inherited as ignored (`nohup`, a background job's
/// SIGINT): such a signal is left ignored, as the shell meant.
fn inherited_ignored(sig: libc::c_int) -> bool {
    // SAFETY: an all-zero sigaction is valid to be filled; querying only (act is null).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid signal number and out-pointer.
    unsafe {
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// The signals that end a collection loop as Ctrl-C does, so that the
/// terminal is given back and the figures so far are printed: SIGINT,
/// SIGTERM (kill, systemd, timeout) and SIGHUP (the terminal went away).
/// Signals inherited as ignored stay ignored.
pub(crate) struct Stop {
    int: Option<Signal>,
    term: Option<Signal>,
    hup: Option<Signal>,
}

impl Stop {
    pub(crate) fn new() -> Result<Stop> {
        let on = |sig, kind| -> Result<Option<Signal>> {
            if inherited_ignored(sig) {
                return Ok(None);
            }
            signal(kind).map(Some).context("cannot handle signals")
        };
        Ok(Stop {
            int: on(libc::SIGINT, SignalKind::interrupt())?,
            term: on(libc::SIGTERM, SignalKind::terminate())?,
            hup: on(libc::SIGHUP, SignalKind::hangup())?,
        })
    }

    pub(crate) async fn signalled(&mut self) -> &'static str {
        async fn recv(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => "interrupted",
            _ = recv(&mut self.term) => "terminated (SIGTERM)",
            _ = recv(&mut self.hup) => "hung up (SIGHUP)",
        }
    }
}

/// Waits up to `d` (or forever), returning early on a signal or when the
/// target exits (`pid` -1: no one target); every 50 ms it calls `step`,
/// which ends the wait by returning true (the view's quit key).
pub(crate) async fn wait(
    pid: i32,
    d: Option<Duration>,
    until: Instant,
    stop: &mut Stop,
    step: &mut dyn FnMut() -> Result<bool>,
) -> Result<End> {
    let deadline = d.map(|d| until.min(Instant::now() + d));
    loop {
        if pid != -1 && target::exited(pid) {
            return Ok(End::TargetExited);
        }
        if step()? {
            return Ok(End::Stopped("quit"));
        }
        let step = Duration::from_millis(50);
        let sleep = match deadline {
            Some(dl) => {
                let now = Instant::now();
                if now >= dl {
                    return Ok(End::Elapsed);
                }
                step.min(dl - now)
            }
            None => step,
        };
        tokio::select! {
            why = stop.signalled() => return Ok(End::Stopped(why)),
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// No step between the waits of a loop that shows nothing live.
pub(crate) fn no_step() -> Result<bool> {
    Ok(false)
}

pub fn probes(target_arg: &str, json: bool) -> Result<ExitCode> {
    let (pid, objects) = match target_arg.parse::<i32>() {
        Ok(pid) => (Some(pid), target::find_in_process(pid)?),
        Err(_) => (
            None,
            vec![target::find_in_file(std::path::Path::new(target_arg))?],
        ),
    };
    if json {
        println!("{}", probes_json(pid, &objects));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18} {:>5}  {:<18} {:<10} ARGUMENTS",
        "PROBE", "SITES", "SEMAPHORE", "ENABLED"
    );
    for obj in &objects {
        println!("# {}", obj.path);
        let mut by_name: BTreeMap<&str, Vec<&crate::stapsdt::ProbeSite>> = BTreeMap::new();
        for s in &obj.sites {
            by_name.entry(s.name.as_str()).or_default().push(s);
        }
        for (name, sites) in by_name {
            let s = sites[0];
            let addr = semaphore_address(obj, s).map_or("-".into(), |a| format!("{a:#x}"));
            let enabled = match pid {
                Some(pid) => match target::read_semaphore(pid, obj, s) {
                    Some(v) => format!("{} ({v})", if v > 0 { "yes" } else { "no" }),
                    None => "unknown".into(),
                },
                None => "-".into(),
            };
            let args = ProbeId::from_name(name)
                .map(|id| PROBES[id as usize].args.join(", "))
                .unwrap_or_else(|| s.args.clone());
            println!(
                "{name:<18} {:>5}  {addr:<18} {enabled:<10} {args}",
                sites.len(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a site's semaphore is in the process; None for a site without one
/// (a provider built without semaphores: its address field is 0).
fn semaphore_address(obj: &HakmemObject, site: &crate::stapsdt::ProbeSite) -> Option<u64> {
    (site.semaphore != 0).then(|| obj.load_bias.wrapping_add(site.semaphore))
}

pub(crate) fn attach(pid: i32, drains: bool) -> Result<(Session, Vec<HakmemObject>)> {
    target::check_environment()?;
    let objects = target::find_in_process(pid)?;
    let session = Session::attach(pid, objects.clone(), drains).map_err(|e| {
        if target::exited(pid) {
            anyhow::anyhow!("process {pid} exited while hakctl was attaching")
        } else {
            e
        }
    })?;
    Ok((session, objects))
}

fn report<'a>(
    s: &Session,
    kind: &'static str,
    total: &'a Snapshot,
    prev: Option<&Snapshot>,
    exited: bool,
) -> Report<'a> {
    Report {
        kind,
        pid: s.pid,
        process: s.process.clone(),
        locations: s.locations,
        drains: s.drains,
        total,
        elapsed: total.at.duration_since(s.started).as_secs_f64(),
        interval: prev.map(|p| (total.since(p), total.secs_since(p))),
        target_exited: exited,
        memory: if exited {
            None
        } else {
            crate::mem::read(s.pid).ok()
        },
    }
}

pub async fn watch(
    pid: i32,
    interval: f64,
    count: Option<u64>,
    duration: Option<f64>,
    json: bool,
    drains: bool,
) -> Result<ExitCode> {
    let (session, _) = attach(pid, drains)?;
    watch_session(&session, interval, count, duration, json, "watch").await?;
    Ok(ExitCode::SUCCESS)
}

/// Refreshes every `interval` seconds until the target exits, a signal or
/// the quit key, `duration` seconds, or `count` refreshes.
async fn watch_session(
    session: &Session,
    interval: f64,
    count: Option<u64>,
    duration: Option<f64>,
    json: bool,
    kind: &'static str,
) -> Result<End> {
    if !(interval > 0.0 && interval.is_finite()) {
        bail!("--interval must be a positive number of seconds");
    }
    let stop_at = duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d.max(0.0)))
        .unwrap_or(Instant::now() + Duration::from_secs(u32::MAX as u64));
    let mut stop = Stop::new()?;
    let mut prev = session.snapshot()?;
    let mut live = Live::new(json, kind)?;
    live.first(session, &prev)?;
    let mut refreshes = 0u64;
    let end = loop {
        let end = wait(
            session.pid,
            Some(Duration::from_secs_f64(interval)),
            stop_at,
            &mut stop,
            &mut || live.keys(Some(session)),
        )
        .await?;
        let exited = end == End::TargetExited;
        let cur = session.snapshot()?;
        live.show(session, cur.clone(), Some(prev), exited)?;
        prev = cur;
        refreshes += 1;
        if end != End::Elapsed || Instant::now() >= stop_at || count.is_some_and(|c| refreshes >= c)
        {
            break end;
        }
    };
    live.finish(Some(session), end == End::TargetExited)?;
    end.say(session.pid);
    Ok(end)
}

/// How `watch` and `run` show each refresh: the full-screen view on a
/// terminal (`view`), else one JSON document or one plain line per refresh.
struct Live {
    screen: Option<crate::view::Screen>,
    view: crate::view::View,
    json: bool,
    kind: &'static str,
    /// The refresh on screen: its snapshot, the one before, whether the
    /// target had exited (drawn again when a key changes the view).
    shown: Option<(Snapshot, Option<Snapshot>, bool)>,
}

impl Live {
    fn new(json: bool, kind: &'static str) -> Result<Live> {
        let tty = std::io::stdout().is_terminal() && !json;
        Ok(Live {
            screen: tty.then(crate::view::Screen::enter).transpose()?,
            view: crate::view::View::default(),
            json,
            kind,
            shown: None,
        })
    }

    fn full_screen(&self) -> bool {
        self.screen.is_some()
    }

    /// Draws the view at once on attach (the first refresh is an interval away).
    fn first(&mut self, session: &Session, at_attach: &Snapshot) -> Result<()> {
        if self.full_screen() {
            self.shown = Some((at_attach.clone(), None, false));
            self.redraw(session)?;
        }
        Ok(())
    }

    /// One refresh: `cur`, with `prev` the start of its interval.
    fn show(
        &mut self,
        session: &Session,
        cur: Snapshot,
        prev: Option<Snapshot>,
        exited: bool,
    ) -> Result<()> {
        if self.full_screen() {
            if !self.view.paused || exited {
                self.shown = Some((cur, prev, exited));
            }
            return self.redraw(session);
        }
        let r = report(session, self.kind, &cur, prev.as_ref(), exited);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{}",
            if self.json {
                r.json().to_string()
            } else {
                r.line()
            }
        );
        let _ = out.flush();
        Ok(())
    }

    fn redraw(&mut self, session: &Session) -> Result<()> {
        let (Some(screen), Some((cur, prev, exited))) = (&mut self.screen, &self.shown) else {
            return Ok(());
        };
        screen.draw(
            &self.view,
            &report(session, self.kind, cur, prev.as_ref(), *exited),
        )
    }

    /// Keys pressed since the last look, redrawing what they change; true on quit.
    fn keys(&mut self, session: Option<&Session>) -> Result<bool> {
        if !self.full_screen() {
            return Ok(false);
        }
        match self.view.read_keys()? {
            crate::view::Asked::Quit => Ok(true),
            crate::view::Asked::Redraw => {
                if let Some(session) = session {
                    self.redraw(session)?;
                }
                Ok(false)
            }
            crate::view::Asked::Nothing => Ok(false),
        }
    }

    /// A new program image (`run` across an exec): its counts start again.
    fn restart(&mut self) {
        self.shown = None;
    }

    /// Gives the terminal back and prints the final tables there.
    fn finish(mut self, session: Option<&Session>, exited: bool) -> Result<()> {
        if self.screen.take().is_none() {
            return Ok(());
        }
        if let Some(session) = session {
            let last = session.snapshot()?;
            // Lost, not a panic, when the terminal hung up.
            let _ = write!(
                std::io::stdout(),
                "{}",
                report(session, self.kind, &last, None, exited).tables()
            );
        }
        Ok(())
    }
}

pub async fn stage_stats(
    pid: i32,
    duration: Option<f64>,
    json: bool,
    drains: bool,
) -> Result<ExitCode> {
    // Before attach: a signal after the "attached" line ends the wait, not hakctl.
    let mut stop = Stop::new()?;
    let (session, _) = attach(pid, drains)?;
    eprintln!(
        "hakctl: attached to {} probe locations in process {pid}",
        session.locations
    );
    let end = wait(
        pid,
        duration.map(|d| Duration::from_secs_f64(d.max(0.0))),
        Instant::now() + Duration::from_secs(u32::MAX as u64),
        &mut stop,
        &mut no_step,
    )
    .await?;
    let snap = session.snapshot()?;
    let r = report(
        &session,
        "stage-stats",
        &snap,
        None,
        end == End::TargetExited,
    );
    // Written without println!, which panics when the terminal hung up (the
    // SIGHUP that ended the wait).
    let report = if json {
        serde_json::to_string_pretty(&r.json())? + "\n"
    } else {
        r.tables()
    };
    let _ = std::io::stdout().lock().write_all(report.as_bytes());
    if end == End::TargetExited {
        say(format_args!(
            "process {pid} exited; counts cover its whole run after attach"
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The trace filters of `--class` and `--arg NAME=VALUE`, per probe in
/// `mask`; probes that lack an argument a condition names leave the mask.
/// The probes named (bit = probe id; 0 when none are).
pub(crate) fn probe_mask(probes: &[String]) -> Result<u64> {
    let mut mask = 0u64;
    for name in probes {
        let id = ProbeId::from_name(name).with_context(|| {
            format!(
                "unknown probe {name:?}; known: {}",
                PROBES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
            )
        })?;
        mask |= 1 << id as u32;
    }
    Ok(mask)
}

pub(crate) fn trace_filters(
    mut mask: u64,
    class: Option<u64>,
    args: &[String],
) -> Result<(u64, Vec<(ProbeId, TraceFilter)>)> {
    let mut conditions: Vec<(&str, u64)> = Vec::new();
    for a in args {
        let (name, value) = a
            .split_once('=')
            .with_context(|| format!("--arg {a:?}: expected NAME=VALUE (e.g. --arg stage=3)"))?;
        let value = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        }
        .with_context(|| format!("--arg {a:?}: {value:?} is not a number"))?;
        conditions.push((name, value));
    }
    if conditions.len() + class.is_some() as usize > FILTER_CONDITIONS {
        bail!("at most {FILTER_CONDITIONS} conditions (--class and --arg together)");
    }
    if let Some(name) = conditions
        .iter()
        .map(|c| c.0)
        .find(|n| !PROBES.iter().any(|p| p.args.contains(n)))
    {
        bail!("no probe has an argument {name:?} (`hakctl probes FILE` lists them)");
    }
    let mut filters = Vec::new();
    let asked = mask;
    for p in PROBES.iter().filter(|p| asked & (1 << p.id as u32) != 0) {
        let mut f = TraceFilter::default();
        let mut applies = true;
        if let Some(c) = class {
            match class_arg(p.id) {
                Some(i) => applies &= f.require(i, c),
                None => applies = false,
            }
        }
        for &(name, value) in &conditions {
            match p.args.iter().position(|a| *a == name) {
                Some(i) => applies &= f.require(i, value),
                None => applies = false,
            }
        }
        if applies {
            filters.push((p.id, f));
        } else {
            mask &= !(1 << p.id as u32);
        }
    }
    if mask == 0 {
        bail!("no probe asked for has every argument the filters name");
    }
    Ok((mask, filters))
}

pub async fn trace(
    pid: i32,
    probes: &[String],
    class: Option<u64>,
    args: &[String],
    duration: Option<f64>,
    json: bool,
) -> Result<ExitCode> {
    let mask = match probe_mask(probes)? {
        0 => (1 << PROBE_COUNT) - 1,
        m => m,
    };
    let (mask, filters) = trace_filters(mask, class, args)?;
    // Tracing is asking for events: the drain probes too, unless filtered out.
    let drains = DRAIN_PROBES.iter().any(|&id| mask & (1 << id as u32) != 0);
    let mut stop = Stop::new()?;
    let (mut session, _) = attach(pid, drains)?;
    for (id, f) in filters {
        session.set_trace_filter(id, f)?;
    }
    session.set_trace_mask(mask)?;
    eprintln!(
        "hakctl: attached to {} probe locations in process {pid}; tracing",
        session.locations
    );
    let mut events = session.take_events()?;
    let stop_at = duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d.max(0.0)))
        .unwrap_or(Instant::now() + Duration::from_secs(u32::MAX as u64));
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    let offset = mono_to_unix_ns();
    let line = |ev: &TraceEvent| {
        if json {
            event_json(ev, offset).to_string()
        } else {
            format_event(ev)
        }
    };
    let end = loop {
        while let Some(item) = events.next() {
            if item.len() < std::mem::size_of::<TraceEvent>() {
                continue;
            }
            // SAFETY: the eBPF program writes whole TraceEvents; read_unaligned copes with ring buffer alignment.
            let ev: TraceEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if writeln!(out, "{}", line(&ev)).is_err() {
                return Ok(ExitCode::SUCCESS); // reader went away (e.g. `| head`)
            }
            printed += 1;
        }
        let _ = out.flush();
        let end = wait(
            pid,
            Some(Duration::from_millis(100)),
            stop_at,
            &mut stop,
            &mut no_step,
        )
        .await?;
        if end != End::Elapsed || Instant::now() >= stop_at {
            break end;
        }
    };
    // Drain what arrived before the end.
    while let Some(item) = events.next() {
        if item.len() >= std::mem::size_of::<TraceEvent>() {
            // SAFETY: as above.
            let ev: TraceEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let _ = writeln!(out, "{}", line(&ev));
            printed += 1;
        }
    }
    drop(out);
    let drops = session.snapshot()?.trace_drops;
    let filtered = session.trace_filtered()?;
    say(format_args!(
        "{printed} events printed, {drops} dropped (ring buffer full), {filtered} filtered out in the kernel{}",
        if end == End::TargetExited {
            "; target exited"
        } else {
            ""
        }
    ));
    Ok(ExitCode::SUCCESS)
}

/// `probes --json`: one document, each object's probes with their sites,
/// semaphore address and (for a process) semaphore count.
fn probes_json(pid: Option<i32>, objects: &[HakmemObject]) -> serde_json::Value {
    let objects: Vec<serde_json::Value> = objects
        .iter()
        .map(|obj| {
            let mut by_name: BTreeMap<&str, Vec<&crate::stapsdt::ProbeSite>> = BTreeMap::new();
            for s in &obj.sites {
                by_name.entry(s.name.as_str()).or_default().push(s);
            }
            let probes: Vec<serde_json::Value> = by_name
                .into_iter()
                .map(|(name, sites)| {
                    let s = sites[0];
                    let semaphore_count = pid.and_then(|pid| target::read_semaphore(pid, obj, s));
                    serde_json::json!({
                        "probe": name,
                        "sites": sites.iter().map(|s| obj.load_bias.wrapping_add(s.pc)).collect::<Vec<_>>(),
                        "semaphore": semaphore_address(obj, s),
                        "semaphore_count": semaphore_count,
                        "args": ProbeId::from_name(name).map(|id| PROBES[id as usize].args.to_vec()),
                    })
                })
                .collect();
            serde_json::json!({ "path": obj.path, "probes": probes })
        })
        .collect();
    serde_json::json!({
        "schema": crate::report::SCHEMA,
        "kind": "probes",
        "pid": pid,
        "time_unix_s": crate::report::unix_now(),
        "objects": objects,
    })
}

/// `trace --json`: one document per event. `ts_ns` is the kernel's
/// monotonic clock at the hit; `time_unix_s` the wall clock it corresponds to
/// (`mono_to_unix_ns`: the two clocks' difference, read when tracing began).
fn event_json(ev: &TraceEvent, mono_to_unix_ns: i128) -> serde_json::Value {
    let probe = ProbeId::from_u32(ev.probe);
    let mut args = serde_json::Map::new();
    if let Some(p) = probe {
        for (name, v) in PROBES[p as usize].args.iter().zip(ev.args) {
            args.insert(name.to_string(), v.into());
        }
    }
    serde_json::json!({
        "schema": crate::report::SCHEMA,
        "kind": "event",
        "probe": probe.map(|p| p.name()),
        "pid": ev.pid_tgid >> 32,
        "tid": ev.pid_tgid & 0xffff_ffff,
        "ts_ns": ev.ts_ns,
        "time_unix_s": (ev.ts_ns as i128 + mono_to_unix_ns) as f64 / 1e9,
        "args": args,
        "text": format_event(ev),
    })
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC (what `bpf_ktime_get_ns` reads), in ns.
fn mono_to_unix_ns() -> i128 {
    let read = |clock| {
        // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: a valid clock id and out-pointer.
        unsafe { libc::clock_gettime(clock, &mut t) };
        t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// Which argument of probe `id` is its class (`trace --class`), if any.
fn class_arg(id: ProbeId) -> Option<usize> {
    match id {
        ProbeId::AceFail => Some(2),
        ProbeId::SsMap
        | ProbeId::SsUnmap
        | ProbeId::CacheTake
        | ProbeId::OsReturn
        | ProbeId::CachePut => None,
        _ => Some(0),
    }
}

/// `[SLAB_RECYCLE] EMPTY cls=7 slab=0x... used=0`, in the spirit of the old debug logs.
pub fn format_event(ev: &TraceEvent) -> String {
    use hakmem_common::codes::*;
    let tid = ev.pid_tgid & 0xffff_ffff;
    let a = ev.args;
    let pick = |names: &[&'static str], i: u64| {
        names
            .get(i as usize)
            .map(|s| s.to_uppercase())
            .unwrap_or_else(|| format!("?{i}"))
    };
    let body = match ProbeId::from_u32(ev.probe) {
        Some(ProbeId::SlabRecycle) => format!(
            "{} cls={} slab={:#x} used={}",
            pick(&OUTCOME_NAMES, a[1]),
            a[0],
            a[2],
            a[3]
        ),
        Some(ProbeId::SsAcquireBegin) => format!("cls={}", a[0]),
        Some(ProbeId::SsAcquire) => format!("STAGE{} cls={} slab={:#x}", a[1], a[0], a[2]),
        Some(ProbeId::SharedFail) => {
            format!("{} cls={} -> legacy", pick(&REASON_NAMES, a[1]), a[0])
        }
        Some(ProbeId::AceFail) => format!(
            "{} size={} cls={}",
            pick(&ACE_KIND_NAMES, a[0]),
            a[1],
            a[2] as i64
        ),
        Some(ProbeId::TlsDrain) => format!(
            "cls={} batch={} why={}",
            a[0],
            a[1],
            if a[2] == 0 { "overflow" } else { "thread_exit" }
        ),
        Some(ProbeId::RemoteDrain) => format!("cls={} batch={}", a[0], a[1]),
        Some(ProbeId::SsMap) | Some(ProbeId::SsUnmap) => format!("bytes={} ss={:#x}", a[0], a[1]),
        Some(ProbeId::LegacyRefill) => format!("cls={} batch={}", a[0], a[1]),
        Some(ProbeId::CacheTake) => format!(
            "{} bytes={} for={}",
            pick(&SOURCE_NAMES, a[1]),
            a[0],
            pick(&CACHE_USER_NAMES, a[2])
        ),
        Some(ProbeId::CachePut) => format!(
            "bytes={} resident<={} from={}",
            a[0],
            a[2],
            pick(&CACHE_USER_NAMES, a[1])
        ),
        Some(ProbeId::OsReturn) => format!(
            "{} bytes={} resident<={} mappings={}",
            pick(&RETURN_WHY_NAMES, a[1]),
            a[0],
            a[2],
            a[3]
        ),
        None => format!("probe {} args {:?}", ev.probe, a),
    };
    let name = ProbeId::from_u32(ev.probe)
        .map(|p| p.name().to_uppercase())
        .unwrap_or_else(|| "?".into());
    format!(
        "{:>14.6} tid={tid:<7} [{name}] {body}",
        ev.ts_ns as f64 / 1e9
    )
}

/// The library `run` preloads: HAKMEM_LIB, or libhakmem.so beside hakctl.
pub fn preload_library() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("HAKMEM_LIB") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("locating hakctl")?;
    let lib = exe.with_file_name("libhakmem.so");
    if !lib.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p hakmem) or name it with HAKMEM_LIB",
            lib.display()
        );
    }
    Ok(lib)
}

/// Where `run` sends the command's output so that it never mixes with
/// hakctl's: to `--output FILE` when given; else, while the full-screen view
/// owns the terminal, to a file in the temporary directory (named when the
/// view closes; the command's stdin is then /dev/null, the keys are
/// hakctl's); else (JSON or lines on stdout) the command's stdout goes to
/// hakctl's stderr, so that hakctl's stdout holds only its own documents.
fn child_output(output: Option<&std::path::Path>, full_screen: bool) -> Result<crate::run::Output> {
    let path = match output {
        Some(p) => p.to_path_buf(),
        None if full_screen => {
            std::env::temp_dir().join(format!("hakctl-run-{}.log", std::process::id()))
        }
        None => return Ok(crate::run::Output::Stderr),
    };
    // A file of hakctl's own choosing is made new, readable by its owner only
    // (never through a link someone else left at that name); -o FILE is the user's.
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    if output.is_none() {
        std::os::unix::fs::OpenOptionsExt::mode(open.create_new(true), 0o600);
    }
    let file = open
        .open(&path)
        .with_context(|| format!("cannot create {} for the command's output", path.display()))?;
    Ok(crate::run::Output::File(path, file))
}

pub async fn run(
    cmd: &[String],
    interval: f64,
    json: bool,
    drains: bool,
    output: Option<&std::path::Path>,
) -> Result<ExitCode> {
    if !(interval > 0.0 && interval.is_finite()) {
        bail!("--interval must be a positive number of seconds");
    }
    let lib = preload_library()?.canonicalize().context("libhakmem.so")?;
    target::find_in_file(&lib)?;
    target::check_environment()?;
    let full_screen = std::io::stdout().is_terminal() && !json;
    let output = child_output(output, full_screen)?;
    let log = output.path();
    let preload = crate::run::PreloadPath::new(&lib)?;
    let mut child = crate::run::spawn(cmd, &preload.path, drains, output)?;
    let mut stop = Stop::new()?;
    let mut live = Live::new(json, "run")?;
    let mut prev: Option<Snapshot> = None;
    let mut code = None;
    let mut stopped = None;
    while code.is_none() && stopped.is_none() {
        let tick = Instant::now() + Duration::from_secs_f64(interval);
        while Instant::now() < tick {
            match child.poll()? {
                crate::run::Event::Running => {}
                crate::run::Event::Attached => {
                    prev = None;
                    live.restart();
                }
                crate::run::Event::Exited(c) => {
                    code = Some(c);
                    break;
                }
            }
            if live.keys(child.session.as_ref())? {
                stopped = Some("quit");
                break;
            }
            tokio::select! {
                why = stop.signalled() => { stopped = Some(why); break; }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        if let Some(session) = &child.session {
            let cur = session.snapshot()?;
            live.show(session, cur.clone(), prev.take(), code.is_some())?;
            prev = Some(cur);
        }
    }
    live.finish(child.session.as_ref(), code.is_some())?;
    if let Some(log) = log {
        say(format_args!("the command's output is in {}", log.display()));
    }
    if code.is_some() && !child.attached_once {
        say(format_args!(
            "{} exited without an allocation through {}: nothing was watched (it made none, \
             or ignored LD_PRELOAD as statically linked and set-user-ID programs do)",
            cmd[0],
            lib.display()
        ));
    }
    match code {
        Some(c) => {
            say(format_args!("{} exited with status {c}", cmd[0]));
            Ok(ExitCode::from(c.clamp(0, 255) as u8))
        }
        None => {
            say(format_args!(
                "{}; the command is ended with hakctl",
                stopped.unwrap_or("interrupted")
            ));
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn trace_filters_leave_out_probes_without_the_named_arguments() {
        let all = (1u64 << PROBE_COUNT) - 1;
        let bit = |id: ProbeId| 1u64 << id as u32;
        // --class: every probe with a class argument, ace_fail by its third.
        let (mask, filters) = trace_filters(all, Some(3), &[]).unwrap();
        assert_eq!(mask & bit(ProbeId::SsMap), 0);
        assert_ne!(mask & bit(ProbeId::AceFail), 0);
        let ace = filters.iter().find(|f| f.0 == ProbeId::AceFail).unwrap().1;
        assert!(ace.passes(&[0, 0, 3, 0]) && !ace.passes(&[3, 0, 0, 0]));
        // --arg stage=3 keeps ss_acquire alone; with --class both conditions hold.
        let (mask, filters) = trace_filters(all, Some(7), &strings(&["stage=0x3"])).unwrap();
        assert_eq!(mask, bit(ProbeId::SsAcquire));
        let f = filters[0].1;
        assert!(f.passes(&[7, 3, 0, 0]) && !f.passes(&[7, 2, 0, 0]) && !f.passes(&[6, 3, 0, 0]));
        for (class, args, says) in [
            (None, vec!["stage"], "NAME=VALUE"),
            (None, vec!["stage=x"], "not a number"),
            (None, vec!["nosuch=1"], "no probe has an argument"),
            (Some(1), vec!["stage=1", "slab=2"], "at most 2"),
        ] {
            let e = trace_filters(all, class, &strings(&args)).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{args:?}: {e:#}");
        }
        let e = trace_filters(bit(ProbeId::SsMap), Some(1), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("no probe asked for"), "{e:#}");
    }
}
