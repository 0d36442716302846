//! Every process at once: `hakctl watch --all` attaches to the hakmem library
//! files themselves (and binaries named with `--lib`), so every process that
//! maps one is counted, including those started after hakctl; the eBPF
//! program then also counts per process id. Shown as a top-like table, one
//! row per process, sorted, refreshed; processes that exit leave it.

use crate::report::{acquires_and_stage1, events, ratio, tally_json};
use crate::session::Session;
use crate::target::{self, HakmemObject};
use anyhow::{bail, Context, Result};
use hakmem_common::{ProbeId, Tally};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The hakmem files to attach to: those named, else `libhakmem.so` beside
/// hakctl (or `HAKMEM_LIB`) and every other file named `*hakmem*` that a
/// running process maps; one per file (the kernel places uprobes on
/// inodes: two paths to one file would count each event twice; `FileId`).
pub fn files(named: &[PathBuf]) -> Result<Vec<HakmemObject>> {
    let mut candidates: Vec<PathBuf> = named.to_vec();
    if named.is_empty() {
        if let Ok(lib) = crate::commands::preload_library() {
            candidates.push(lib);
        }
        candidates.extend(mapped_hakmem_files());
    }
    let mut ids = BTreeSet::new();
    let mut out = Vec::new();
    for path in candidates {
        let id = match FileId::of(&path) {
            Ok(id) => id,
            Err(e) if named.contains(&path) => bail!("--lib {}: {e}", path.display()),
            Err(_) => continue,
        };
        if !ids.insert(id) {
            continue;
        }
        match target::find_in_file(&path) {
            Ok(obj) => out.push(obj),
            Err(e) if named.contains(&path) => return Err(e),
            Err(_) => {}
        }
    }
    if out.is_empty() {
        bail!(
            "nothing to attach to: no libhakmem.so beside hakctl, none mapped by a running \
             process; name the library or a binary with hakmem inside with --lib PATH"
        );
    }
    Ok(out)
}

/// A file as the kernel's uprobes know it: by device and inode, but a file
/// seen through overlayfs by the inode of its layer's file. Each overlay
/// mount has a device of its own, while the uprobe goes on the layer's
/// inode, whose number, size and modification time overlay passes through:
/// two containers of one image map one file under two devices, and
/// attaching to both counted each event twice.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum FileId {
    Device {
        dev: u64,
        ino: u64,
    },
    Overlay {
        ino: u64,
        size: u64,
        mtime: (i64, i64),
    },
}

/// `statfs`'s filesystem type of overlayfs (`OVERLAYFS_SUPER_MAGIC`).
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        let meta = std::fs::metadata(path)?;
        Ok(if on_overlay(path) {
            FileId::Overlay {
                ino: meta.ino(),
                size: meta.size(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
            }
        } else {
            FileId::Device {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        })
    }
}

fn on_overlay(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is valid to be filled; `c` is a C string.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the struct outlives the call.
    unsafe { libc::statfs(c.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == OVERLAYFS_MAGIC }
}

/// Files named `*hakmem*` mapped by running processes, as their processes
/// see them (`target::mapping_file`: a container's copy, or one deleted
/// since, is found too).
fn mapped_hakmem_files() -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    for pid in pids() {
        let Ok(files) = target::mapped_files(pid as i32) else {
            continue;
        };
        for (path, &(start, end)) in &files {
            let name = Path::new(path).file_name().unwrap_or_default();
            if name.to_string_lossy().contains("hakmem") {
                found.insert(target::mapping_file(pid as i32, path, start, end));
            }
        }
    }
    found
}

fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Identity of a process across refreshes: its id and start time (an id
/// reused by a new process is a new row).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One process's row.
#[derive(Clone, Debug)]
pub struct Row {
    pub pid: u32,
    /// Gone since the last refresh: these are its final counts.
    pub exited: bool,
    pub command: String,
    pub tally: Tally,
    /// Events (every probe) since attach, and per second over the last interval.
    pub events: u64,
    pub events_per_s: f64,
    /// Slab acquisitions and the share of them Stage 1 served, since attach.
    pub acquires: u64,
    pub stage1: Option<f64>,
    /// Shared-pool and ACE failures since attach.
    pub failures: u64,
    /// Bytes in use, in thread caches, resident (None if unreadable).
    pub memory: Option<(u64, u64, u64)>,
}

impl Row {
    pub fn json(&self) -> Value {
        json!({
            "pid": self.pid,
            "command": self.command,
            "exited": self.exited,
            "events": self.events,
            "events_per_s": self.events_per_s,
            "acquires": self.acquires,
            "stage1_ratio": self.stage1,
            "failures": self.failures,
            "memory": self.memory.map(|(in_use, cached, rss)| json!({
                "in_use_bytes": in_use,
                "thread_cache_bytes": cached,
                "rss_bytes": rss,
            })),
            "counts": tally_json(&self.tally),
        })
    }
}

/// The per-process counts of a system-wide session, refreshed: rows of the
/// processes alive, the counts of exited ones dropped from the map.
pub struct Fleet {
    /// The attached files (`FileId`): processes that map one are shown
    /// from the first refresh on, even before their first event.
    ids: BTreeSet<FileId>,
    /// Per pid and start time: whether the process maps one of them (each
    /// process's maps are read once; one that maps the file later, by an
    /// exec or dlopen, shows up by its events).
    maps_file: BTreeMap<(u32, u64), bool>,
    /// Per pid: start time, events at the last refresh.
    seen: BTreeMap<u32, (u64, u64)>,
    /// Per pid: its command name at the last refresh.
    commands: BTreeMap<u32, String>,
    last: Instant,
    memory: bool,
}

impl Fleet {
    pub fn new(files: &[HakmemObject], memory: bool) -> Fleet {
        let ids = files
            .iter()
            .filter_map(|f| FileId::of(&f.attach_path).ok())
            .collect();
        Fleet {
            ids,
            maps_file: BTreeMap::new(),
            seen: BTreeMap::new(),
            commands: BTreeMap::new(),
            last: Instant::now(),
            memory,
        }
    }

    pub fn refresh(&mut self, session: &mut Session) -> Result<Vec<Row>> {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let mut tallies = session.process_tallies()?;
        for pid in self.mapping_processes() {
            tallies.entry(pid).or_default();
        }
        let mut rows = Vec::new();
        let mut seen = BTreeMap::new();
        for (pid, mut tally) in tallies {
            // A process that exited is shown once more, with its final counts, then forgotten.
            let exited = target::exited(pid as i32);
            // The name read while alive, else the one the kernel saw at its first event.
            let command = match self.commands.get(&pid) {
                Some(name) if exited => name.clone(),
                _ if exited => session.process_comm(pid).unwrap_or_else(|| "?".into()),
                _ => target::process_name(pid as i32),
            };
            if exited {
                // Read again now that it is gone: events between the read above
                // and its exit would be lost with the entry otherwise.
                if let Some(last) = session.process_tally(pid)? {
                    tally = last;
                }
                session.forget_process(pid)?;
                // A zombie still maps nothing but is still listed in /proc:
                // not shown again for its mappings at the next refresh.
                if let Some(start) = start_time(pid) {
                    self.maps_file.insert((pid, start), false);
                }
            }
            let events = events(&tally);
            // The same process as at the last refresh: same start time (an id
            // can be reused); an exited one is the one seen before.
            let start = start_time(pid);
            let before = match self.seen.get(&pid) {
                Some(&(s, e)) if exited || Some(s) == start => e,
                _ => 0,
            };
            if let (false, Some(start)) = (exited, start) {
                seen.insert(pid, (start, events));
                self.commands.insert(pid, command.clone());
            }
            let (acquires, stage1) = acquires_and_stage1(&tally);
            let memory = if self.memory && !exited {
                crate::mem::read(pid as i32).ok().map(|m| m.bytes())
            } else {
                None
            };
            rows.push(Row {
                pid,
                exited,
                command,
                events,
                events_per_s: events.saturating_sub(before) as f64 / secs,
                acquires,
                stage1: (acquires > 0).then(|| ratio(stage1, acquires)),
                failures: tally.probe(ProbeId::SharedFail) + tally.probe(ProbeId::AceFail),
                memory,
                tally,
            });
        }
        // What is kept per process goes with it, events or not.
        for gone in self.seen.keys().filter(|p| !seen.contains_key(p)) {
            crate::mem::forget(*gone as i32);
        }
        self.commands.retain(|p, _| seen.contains_key(p));
        self.seen = seen;
        Ok(rows)
    }
}

impl Fleet {
    /// The live processes that map one of the attached files (read from
    /// `/proc/PID/maps` the first time a process is seen).
    fn mapping_processes(&mut self) -> Vec<u32> {
        let mut alive = BTreeMap::new();
        for pid in pids() {
            let Some(start) = start_time(pid) else {
                continue;
            };
            let maps = *self
                .maps_file
                .entry((pid, start))
                .or_insert_with(|| maps_any(pid, &self.ids));
            alive.insert((pid, start), maps);
        }
        self.maps_file = alive;
        self.maps_file
            .iter()
            .filter(|(_, &maps)| maps)
            .map(|(&(pid, _), _)| pid)
            .collect()
    }
}

/// Whether `pid` maps one of these files (a file seen through overlayfs
/// under any mount's device: `FileId`).
fn maps_any(pid: u32, ids: &BTreeSet<FileId>) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    maps.lines().filter_map(target::parse_maps_line).any(|m| {
        let dev = libc::makedev(m.dev.0, m.dev.1);
        m.inode != 0
            && (ids.contains(&FileId::Device { dev, ino: m.inode })
                || ids.iter().any(|id| {
                    matches!(id, FileId::Overlay { ino, .. } if *ino == m.inode)
                        && FileId::of(&target::mapping_file(pid as i32, &m.path, m.start, m.end))
                            .is_ok_and(|mapped| mapped == *id)
                }))
    })
}

/// How the table is ordered.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum SortBy {
    /// Events per second over the last interval (then events since attach).
    Rate,
    /// Events since attach.
    Events,
    /// Failures since attach.
    Failures,
    /// Resident memory.
    Rss,
    /// Process id.
    Pid,
}

impl SortBy {
    pub fn next(self) -> SortBy {
        match self {
            SortBy::Rate => SortBy::Events,
            SortBy::Events => SortBy::Failures,
            SortBy::Failures => SortBy::Rss,
            SortBy::Rss => SortBy::Pid,
            SortBy::Pid => SortBy::Rate,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SortBy::Rate => "events/s",
            SortBy::Events => "events",
            SortBy::Failures => "failures",
            SortBy::Rss => "rss",
            SortBy::Pid => "pid",
        }
    }

    pub fn sort(self, rows: &mut [Row]) {
        let rss = |r: &Row| r.memory.map(|m| m.2).unwrap_or(0);
        rows.sort_by(|a, b| match self {
            SortBy::Rate => b
                .events_per_s
                .total_cmp(&a.events_per_s)
                .then(b.events.cmp(&a.events)),
            SortBy::Events => b.events.cmp(&a.events),
            SortBy::Failures => b.failures.cmp(&a.failures).then(b.events.cmp(&a.events)),
            SortBy::Rss => rss(b).cmp(&rss(a)),
            SortBy::Pid => a.pid.cmp(&b.pid),
        });
    }
}

pub const TABLE_HEADER: &str =
    "    PID COMMAND           EVENTS/S    EVENTS STAGE1 FAILS     IN USE        RSS";

/// A row of the table, 78 columns.
pub fn table_line(r: &Row) -> String {
    let (in_use, rss) = match r.memory {
        Some((u, _, rss)) => (
            compact(u as f64, 1024.0, "B"),
            compact(rss as f64, 1024.0, "B"),
        ),
        None => ("-".into(), "-".into()),
    };
    let mut command: String = r.command.chars().take(15).collect();
    if r.exited {
        command = format!("{:<.9} exited", command);
    }
    format!(
        "{:>7} {:<15} {:>10} {:>9} {:>6} {:>5} {:>10} {:>10}",
        r.pid,
        command,
        compact(r.events_per_s, 1000.0, ""),
        compact(r.events as f64, 1000.0, ""),
        r.stage1
            .map(|s| format!("{:.0}%", s * 100.0))
            .unwrap_or_else(|| "-".into()),
        r.failures,
        in_use,
        rss
    )
}

/// `v` in at most 7 characters: as is below `base`, else with k/M/G/T/P
/// (decimal for counts, binary for bytes: `base` 1024 and `unit` B gives KiB...).
fn compact(v: f64, base: f64, unit: &str) -> String {
    const PREFIXES: [&str; 6] = ["", "k", "M", "G", "T", "P"];
    let mut v = v.max(0.0);
    let mut i = 0;
    while v >= base && i + 1 < PREFIXES.len() {
        v /= base;
        i += 1;
    }
    let prefix = match (PREFIXES[i], base == 1024.0) {
        ("", _) => String::new(),
        ("k", true) => "Ki".into(),
        (p, true) => format!("{p}i"),
        (p, false) => p.into(),
    };
    if i == 0 {
        format!("{v:.0}{}{unit}", if unit.is_empty() { "" } else { " " })
    } else {
        format!("{v:.1}{prefix}{unit}")
    }
}

/// One refresh as a JSON document (`watch --all --json`).
pub fn json(session: &Session, rows: &[Row], files: &[HakmemObject]) -> Value {
    json!({
        "schema": crate::report::SCHEMA,
        "kind": "watch_all",
        "time_unix_s": crate::report::unix_now(),
        "elapsed_s": session.started.elapsed().as_secs_f64(),
        "files": files.iter().map(|f| f.path.clone()).collect::<Vec<_>>(),
        "probe_locations": session.locations,
        "drains_attached": session.drains,
        "processes": rows.iter().map(Row::json).collect::<Vec<_>>(),
    })
}

/// The plain-text refresh (piped output): a header line, then the table.
pub fn text(session: &Session, rows: &[Row], sort: SortBy) -> String {
    let mut o = format!(
        "{} processes  {:.1}s since attach  sorted by {}\n{TABLE_HEADER}\n",
        rows.len(),
        session.started.elapsed().as_secs_f64(),
        sort.name()
    );
    for r in rows {
        o += &table_line(r);
        o.push('\n');
    }
    o
}

/// What the person at the terminal chose for the full-screen table.
struct Keys {
    sort: SortBy,
    paused: bool,
}

impl Keys {
    /// Reads pending keys: q/Esc/Ctrl-C quit, s sorts by the next key, p or space pauses.
    fn read(&mut self) -> Result<Option<bool>> {
        use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
        let mut redraw = None;
        while event::poll(std::time::Duration::ZERO).context("reading the terminal")? {
            match event::read().context("reading the terminal")? {
                Event::Resize(..) => redraw = Some(false),
                Event::Key(k) if k.kind != KeyEventKind::Release && crate::view::is_quit(&k) => {
                    return Ok(Some(true))
                }
                Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
                    KeyCode::Char('s') => {
                        self.sort = self.sort.next();
                        redraw = Some(false);
                    }
                    KeyCode::Char('p') | KeyCode::Char(' ') => {
                        self.paused = !self.paused;
                        redraw = Some(false);
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        Ok(redraw)
    }
}

fn render(f: &mut ratatui::Frame, header: &str, rows: &[Row], keys: &Keys) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::text::Line;
    use ratatui::widgets::Paragraph;
    let [top, body, bottom] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(vec![
            Line::from(header.to_string()),
            Line::styled(TABLE_HEADER, Style::new().add_modifier(Modifier::REVERSED)),
        ]),
        top,
    );
    let lines: Vec<Line> = rows.iter().map(|r| Line::from(table_line(r))).collect();
    f.render_widget(Paragraph::new(lines), body);
    f.render_widget(
        Paragraph::new(format!(
            "q quit  s sort (by {})  p pause{}",
            keys.sort.name(),
            if keys.paused { "  PAUSED" } else { "" }
        )),
        bottom,
    );
}

/// `hakctl watch --all`: refreshes every `interval` seconds until a signal,
/// the quit key, `duration` seconds or `count` refreshes.
#[allow(clippy::too_many_arguments)]
pub async fn watch_all(
    named: &[PathBuf],
    interval: f64,
    count: Option<u64>,
    duration: Option<f64>,
    json_out: bool,
    drains: bool,
    sort: SortBy,
) -> Result<std::process::ExitCode> {
    use crate::commands::{wait, End, Stop};
    use std::io::{IsTerminal, Write};
    use std::time::Duration;
    if !(interval > 0.0 && interval.is_finite()) {
        bail!("--interval must be a positive number of seconds");
    }
    let mut stop = Stop::new()?;
    let (mut session, files) = attach_files(named, drains)?;
    eprintln!(
        "hakctl: attached to {} probe locations in {} for every process that maps {}",
        session.locations,
        files
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if files.len() == 1 { "it" } else { "one" }
    );
    let stop_at = Instant::now()
        + duration
            .map(|d| Duration::from_secs_f64(d.max(0.0)))
            .unwrap_or(Duration::from_secs(u32::MAX as u64));
    let mut fleet = Fleet::new(&files, true);
    let mut screen = (std::io::stdout().is_terminal() && !json_out)
        .then(crate::view::Screen::enter)
        .transpose()?;
    let mut keys = Keys {
        sort,
        paused: false,
    };
    let mut shown: Vec<Row> = Vec::new();
    let mut refreshes = 0u64;
    let end = loop {
        let mut step = || -> Result<bool> {
            let Some(screen) = screen.as_mut() else {
                return Ok(false);
            };
            match keys.read()? {
                Some(true) => Ok(true),
                Some(false) => {
                    keys.sort.sort(&mut shown);
                    let header = header_line(&session, shown.len());
                    screen.draw_with(|f| render(f, &header, &shown, &keys))?;
                    Ok(false)
                }
                None => Ok(false),
            }
        };
        let end = wait(
            -1,
            Some(Duration::from_secs_f64(interval)),
            stop_at,
            &mut stop,
            &mut step,
        )
        .await?;
        let mut rows = fleet.refresh(&mut session)?;
        keys.sort.sort(&mut rows);
        match screen.as_mut() {
            Some(screen) => {
                if !keys.paused {
                    shown = rows;
                }
                let header = header_line(&session, shown.len());
                screen.draw_with(|f| render(f, &header, &shown, &keys))?;
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = if json_out {
                    writeln!(out, "{}", json(&session, &rows, &files))
                } else {
                    writeln!(out, "{}", text(&session, &rows, keys.sort))
                };
                let _ = out.flush();
                shown = rows;
            }
        }
        refreshes += 1;
        if end != End::Elapsed || Instant::now() >= stop_at || count.is_some_and(|c| refreshes >= c)
        {
            break end;
        }
    };
    if screen.take().is_some() {
        let _ = write!(std::io::stdout(), "{}", text(&session, &shown, keys.sort));
    }
    end.say(-1);
    Ok(std::process::ExitCode::SUCCESS)
}

fn header_line(session: &Session, processes: usize) -> String {
    format!(
        "hakctl watch --all: {processes} processes  {} probe locations  {:.0}s since attach",
        session.locations,
        session.started.elapsed().as_secs_f64()
    )
}

/// The files to attach to (`files`: a `--lib` path that cannot be used is
/// named before privileges are checked), attached to for every process.
pub fn attach_files(named: &[PathBuf], drains: bool) -> Result<(Session, Vec<HakmemObject>)> {
    let files = files(named)?;
    target::check_environment()?;
    Ok((Session::attach_everywhere(files.clone(), drains)?, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: u32, rate: f64, events: u64, rss: u64) -> Row {
        Row {
            pid,
            exited: false,
            command: "x".repeat(40),
            tally: Tally::default(),
            events,
            events_per_s: rate,
            acquires: 0,
            stage1: None,
            failures: 0,
            memory: Some((0, 0, rss)),
        }
    }

    #[test]
    fn rows_sort_by_each_key_and_fit_80_columns() {
        let mut rows = vec![row(3, 1.0, 50, 7), row(1, 9.0, 5, 9), row(2, 1.0, 70, 8)];
        SortBy::Rate.sort(&mut rows);
        assert_eq!(rows.iter().map(|r| r.pid).collect::<Vec<_>>(), [1, 2, 3]);
        SortBy::Events.sort(&mut rows);
        assert_eq!(rows.iter().map(|r| r.pid).collect::<Vec<_>>(), [2, 3, 1]);
        SortBy::Rss.sort(&mut rows);
        assert_eq!(rows.iter().map(|r| r.pid).collect::<Vec<_>>(), [1, 2, 3]);
        SortBy::Pid.sort(&mut rows);
        assert_eq!(rows.iter().map(|r| r.pid).collect::<Vec<_>>(), [1, 2, 3]);
        let mut sort = SortBy::Rate;
        for _ in 0..5 {
            sort = sort.next();
        }
        assert_eq!(sort, SortBy::Rate);
        let big = Row {
            events_per_s: 1e9,
            events: u64::MAX / 2,
            memory: Some((1 << 40, 0, 1 << 40)),
            ..row(4_194_304, 0.0, 0, 0)
        };
        assert!(
            table_line(&big).chars().count() <= 80,
            "{}",
            table_line(&big)
        );
        assert!(TABLE_HEADER.len() <= 80);
        assert_eq!(compact(999.0, 1000.0, ""), "999");
        assert_eq!(compact(12_345.0, 1000.0, ""), "12.3k");
        assert_eq!(compact(3.0 * 1048576.0, 1024.0, "B"), "3.0MiB");
        assert_eq!(compact(512.0, 1024.0, "B"), "512 B");
    }
}
