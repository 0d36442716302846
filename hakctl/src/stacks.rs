//! `hakctl stacks`: who asked for the slow path. The eBPF program takes the
//! user call stack (`bpf_get_stackid`, the kernel's frame-pointer walk) of
//! every event of the chosen probes that passes the filters, and counts
//! (probe, stack) pairs in the kernel; hakctl symbolizes the return addresses
//! with blazesym against the ELF files the process maps and prints the top
//! stacks, or folded stacks for a flame graph tool.
//!
//! The walk follows frame pointers: libhakmem.so is built with them
//! (docs/hakctl.md, "Stacks", has the cost), so the frames inside hakmem and
//! the first frame of the program, the function that called malloc, are
//! always there; the program's frames further out are there when it keeps
//! frame pointers too (`-fno-omit-frame-pointer`; a plain `gcc -O2` build
//! does not, and its outer frames are cut or wrong).

use crate::commands::{probe_mask, trace_filters, wait, End, Stop};
use crate::session::{Session, DRAIN_PROBES};
use anyhow::Result;
use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use hakmem_common::trace::StackKey;
use hakmem_common::{ProbeId, PROBES};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The probes `stacks` records by default: those that fire on slow paths only.
pub const DEFAULT_PROBES: [ProbeId; 4] = [
    ProbeId::SsAcquire,
    ProbeId::SharedFail,
    ProbeId::AceFail,
    ProbeId::CacheTake,
];

/// An executable mapping of a file in the process.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    /// As maps names it: ` (deleted)` ends it when the file was deleted or
    /// replaced since it was mapped (only the copy opened through map_files,
    /// `Resolver::files`, is then the right one).
    maps_path: String,
}

impl Mapping {
    /// The file's name, without maps' ` (deleted)`.
    fn name(&self) -> &str {
        self.maps_path.trim_end_matches(" (deleted)")
    }

    fn deleted(&self) -> bool {
        self.maps_path.ends_with(" (deleted)")
    }
}

/// The executable file mappings of `pid` (`/proc/PID/maps`).
fn exec_mappings(pid: i32) -> Vec<Mapping> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    maps.lines().filter_map(parse_mapping).collect()
}

fn parse_mapping(line: &str) -> Option<Mapping> {
    let m = crate::target::parse_maps_line(line)?;
    if !m.executable || !m.path.starts_with('/') {
        return None;
    }
    Some(Mapping {
        start: m.start,
        end: m.end,
        offset: m.offset,
        maps_path: m.path,
    })
}

/// One frame, symbolized.
#[derive(Clone, Debug)]
pub struct Frame {
    pub addr: u64,
    /// The function, or `[unknown]` (the kernel's and perf's word for it).
    pub symbol: String,
    /// The file's name and the offset in it, when the address is in a mapped file.
    pub module: Option<(String, u64)>,
}

impl Frame {
    fn json(&self) -> Value {
        json!({
            "addr": format!("{:#x}", self.addr),
            "symbol": self.symbol,
            "module": self.module.as_ref().map(|m| &m.0),
            "file_offset": self.module.as_ref().map(|m| m.1),
        })
    }

    fn module_name(&self) -> &str {
        self.module
            .as_ref()
            .and_then(|(p, _)| p.rsplit('/').next())
            .unwrap_or("?")
    }
}

/// Symbolizes addresses of one process with the mappings seen while it lived.
struct Resolver {
    symbolizer: Symbolizer,
    mappings: Vec<Mapping>,
    /// The file of each mapping (by its start and path), opened while the process
    /// lived through `target::mapping_file`: the file it maps even if the path
    /// now names another (deleted or replaced since, or a container's own),
    /// and still readable once the process has exited. Symbolized through
    /// `/proc/self/fd/N`.
    files: BTreeMap<(u64, String), std::fs::File>,
    cache: BTreeMap<u64, Frame>,
}

impl Resolver {
    fn new() -> Resolver {
        Resolver {
            symbolizer: Symbolizer::new(),
            mappings: Vec::new(),
            files: BTreeMap::new(),
            cache: BTreeMap::new(),
        }
    }

    /// Reads the process's mappings again (kept when it has exited).
    fn refresh(&mut self, pid: i32) {
        let now = exec_mappings(pid);
        if now.is_empty() {
            return;
        }
        self.files.retain(|(start, path), _| {
            now.iter()
                .any(|m| m.start == *start && m.maps_path == *path)
        });
        for m in &now {
            let key = (m.start, m.maps_path.clone());
            if let std::collections::btree_map::Entry::Vacant(e) = self.files.entry(key) {
                // By its maps name, ` (deleted)` and all: a deleted file is
                // opened only through map_files, never by the name it had.
                let path = crate::target::mapping_file(pid, &m.maps_path, m.start, m.end);
                if let Ok(f) = std::fs::File::open(path) {
                    e.insert(f);
                }
            }
        }
        self.mappings = now;
    }

    /// The frame at return address (or, for the innermost, instruction
    /// address) `addr`. A return address is looked up one byte back, inside
    /// the call, as debuggers do: a call can be a function's last instruction.
    fn frame(&mut self, addr: u64, innermost: bool) -> Frame {
        let key = if innermost {
            addr
        } else {
            addr.wrapping_sub(1)
        };
        if let Some(f) = self.cache.get(&key) {
            return Frame { addr, ..f.clone() };
        }
        let frame = match self.mappings.iter().find(|m| m.start <= key && key < m.end) {
            Some(m) => {
                let offset = key - m.start + m.offset;
                let file = match self.files.get(&(m.start, m.maps_path.clone())) {
                    Some(f) => Some(PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))),
                    // The path names another file now: no symbol rather than a wrong one.
                    None if m.deleted() => None,
                    None => Some(PathBuf::from(m.name())),
                };
                let symbol = file
                    .and_then(|file| {
                        let src = Source::Elf(Elf::new(file));
                        match self
                            .symbolizer
                            .symbolize_single(&src, Input::FileOffset(offset))
                        {
                            Ok(Symbolized::Sym(sym)) => Some(sym.name.into_owned()),
                            _ => None,
                        }
                    })
                    .unwrap_or_else(|| "[unknown]".to_string());
                Frame {
                    addr,
                    symbol,
                    module: Some((m.name().to_string(), offset)),
                }
            }
            None => Frame {
                addr,
                symbol: "[unknown]".into(),
                module: None,
            },
        };
        self.cache.insert(key, frame.clone());
        frame
    }
}

/// One distinct (probe, stack) and how often it came.
pub struct Counted {
    pub probe: ProbeId,
    pub count: u64,
    /// Innermost first.
    pub frames: Vec<Frame>,
}

/// The counted stacks of `pid` so far, symbolized, most frequent first, and
/// the events whose stack the kernel could not take.
fn collect(session: &Session, pid: i32, resolver: &mut Resolver) -> Result<(Vec<Counted>, u64)> {
    let mut out = Vec::new();
    let mut lost = 0;
    for (
        StackKey {
            tgid,
            probe,
            stack_id,
        },
        count,
    ) in session.stack_counts()?
    {
        if tgid as i32 != pid {
            continue;
        }
        let Some(probe) = ProbeId::from_u32(probe) else {
            continue;
        };
        if stack_id < 0 {
            lost += count;
            continue;
        }
        let ips = match session.stack(stack_id as u32) {
            Ok(ips) => ips,
            Err(_) => {
                lost += count;
                continue;
            }
        };
        let frames = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| resolver.frame(ip, i == 0))
            .collect();
        out.push(Counted {
            probe,
            count,
            frames,
        });
    }
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then((a.probe as u32).cmp(&(b.probe as u32)))
    });
    // Not per process: in a one-process session, all of them are its.
    lost += session.stacks_dropped()?;
    Ok((out, lost))
}

/// A stack as one line of the folded format flame graph tools read:
/// `command;outermost;...;innermost;[probe] count`.
pub fn folded(command: &str, c: &Counted) -> String {
    let mut parts = vec![command.replace([';', ' '], "_")];
    parts.extend(
        c.frames
            .iter()
            .rev()
            .map(|f| f.symbol.replace([';', ' '], "_")),
    );
    parts.push(format!("[{}]", c.probe.name()));
    format!("{} {}", parts.join(";"), c.count)
}

fn report(command: &str, stacks: &[Counted], lost: u64, top: usize) -> String {
    let mut o = String::new();
    for p in PROBES.iter() {
        let of_probe: Vec<&Counted> = stacks.iter().filter(|c| c.probe == p.id).collect();
        if of_probe.is_empty() {
            continue;
        }
        let total: u64 = of_probe.iter().map(|c| c.count).sum();
        o += &format!(
            "{}: {total} events, {} distinct stacks in {command}{}\n",
            p.name,
            of_probe.len(),
            if of_probe.len() > top {
                format!(" (the top {top})")
            } else {
                String::new()
            }
        );
        for c in of_probe.iter().take(top) {
            o += &format!(
                "  {} events ({:.1}%)\n",
                c.count,
                100.0 * c.count as f64 / total as f64
            );
            for (i, f) in c.frames.iter().enumerate() {
                o += &format!(
                    "    #{i:<2} {:#014x} {} ({})\n",
                    f.addr,
                    f.symbol,
                    f.module_name()
                );
            }
        }
    }
    if lost > 0 {
        o += &format!("{lost} events whose stack the kernel could not take (stack map full or a hash collision)\n");
    }
    if o.is_empty() {
        o += "no events with stacks: the probes asked for did not fire\n";
    }
    o
}

#[allow(clippy::too_many_arguments)]
pub async fn stacks(
    pid: i32,
    probes: &[String],
    class: Option<u64>,
    args: &[String],
    duration: Option<f64>,
    top: usize,
    folded_out: bool,
    json_out: bool,
) -> Result<ExitCode> {
    let mask = match probe_mask(probes)? {
        0 => DEFAULT_PROBES.iter().fold(0, |m, &p| m | 1 << p as u32),
        m => m,
    };
    let (mask, filters) = trace_filters(mask, class, args)?;
    let drains = DRAIN_PROBES.iter().any(|&id| mask & (1 << id as u32) != 0);
    let mut stop = Stop::new()?;
    let (mut session, _) = crate::commands::attach(pid, drains)?;
    for (id, f) in filters {
        session.set_trace_filter(id, f)?;
    }
    session.set_stack_mask(mask)?;
    let command = crate::target::process_name(pid);
    eprintln!(
        "hakctl: attached to {} probe locations in process {pid} ({command}); recording stacks",
        session.locations
    );
    let mut resolver = Resolver::new();
    resolver.refresh(pid);
    let stop_at = duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d.max(0.0)))
        .unwrap_or(Instant::now() + Duration::from_secs(u32::MAX as u64));
    // The mappings are read again every second while the process lives, so
    // that stacks of libraries it loads later, and of a process that has
    // exited by the end, can still be symbolized.
    let end = loop {
        let end = wait(
            pid,
            Some(Duration::from_secs(1)),
            stop_at,
            &mut stop,
            &mut crate::commands::no_step,
        )
        .await?;
        if end != End::TargetExited {
            resolver.refresh(pid);
        }
        if end != End::Elapsed || Instant::now() >= stop_at {
            break end;
        }
    };
    let (stacks, lost) = collect(&session, pid, &mut resolver)?;
    let mut out = std::io::stdout().lock();
    let _ = if json_out {
        let doc = json!({
            "schema": crate::report::SCHEMA,
            "kind": "stacks",
            "time_unix_s": crate::report::unix_now(),
            "pid": pid,
            "command": command,
            "lost": lost,
            "stacks": stacks.iter().map(|c| json!({
                "probe": c.probe.name(),
                "count": c.count,
                "frames": c.frames.iter().map(Frame::json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{doc}")
    } else if folded_out {
        stacks
            .iter()
            .try_for_each(|c| writeln!(out, "{}", folded(&command, c)))
    } else {
        write!(out, "{}", report(&command, &stacks, lost, top))
    };
    drop(out);
    end.say(pid);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_file_mappings_are_read_from_maps_lines() {
        let m = parse_mapping(
            "7f0000001000-7f0000005000 r-xp 00002000 08:01 1234   /usr/lib/libx.so (deleted)",
        );
        assert_eq!(
            m,
            Some(Mapping {
                start: 0x7f0000001000,
                end: 0x7f0000005000,
                offset: 0x2000,
                maps_path: "/usr/lib/libx.so (deleted)".into(),
            })
        );
        let m = m.unwrap();
        assert_eq!((m.name(), m.deleted()), ("/usr/lib/libx.so", true));
        assert_eq!(parse_mapping("7f-80 rw-p 0 08:01 1 /usr/lib/libx.so"), None);
        assert_eq!(parse_mapping("7f-80 r-xp 0 00:00 0 [vdso]"), None);
        assert!(exec_mappings(std::process::id() as i32)
            .iter()
            .any(|m| m.name().ends_with("hakctl") || m.name().contains("hakctl-")));
    }

    #[test]
    fn folded_lines_go_from_the_outermost_frame_to_the_probe() {
        let frame = |s: &str| Frame {
            addr: 1,
            symbol: s.into(),
            module: None,
        };
        let c = Counted {
            probe: ProbeId::SsAcquire,
            count: 7,
            frames: vec![
                frame("acquire"),
                frame("malloc"),
                frame("make buffers"),
                frame("main"),
            ],
        };
        assert_eq!(
            folded("my;prog", &c),
            "my_prog;main;make_buffers;malloc;acquire;[ss_acquire] 7"
        );
    }
}
