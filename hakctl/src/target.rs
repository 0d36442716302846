//! Finding hakmem in a process: `/proc/PID/maps`, then each mapped ELF's
//! `.note.stapsdt`; and the checks that turn missing privileges or kernel
//! features into messages a person understands.

use crate::stapsdt::{probe_sites, ProbeSite};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const PROVIDER: &str = "hakmem";

/// One ELF object with hakmem probes, as mapped in a process (or a plain file).
#[derive(Debug, Clone)]
pub struct HakmemObject {
    /// The path as the process sees it (for people).
    pub path: String,
    /// A path that names the mapped inode itself (for the kernel).
    pub attach_path: PathBuf,
    /// Run-time address minus link-time address (0 for a file).
    pub load_bias: u64,
    pub sites: Vec<ProbeSite>,
}

/// Whether `pid` exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// An error naming why `pid` cannot be read: no such process, or one that
/// has exited (a zombie's maps and memory read as empty).
pub fn check_running(pid: i32) -> Result<()> {
    if pid <= 0 || !alive(pid) {
        bail!("no such process: {pid}");
    }
    // Said only where /proc shows it (with hidepid its files read as gone:
    // the read that follows says what is refused).
    if exited(pid) && std::fs::metadata(format!("/proc/{pid}/stat")).is_ok() {
        bail!("process {pid} has exited (its parent has not reaped it yet)");
    }
    Ok(())
}

/// Whether `pid` is gone or a zombie (exited, not yet reaped).
pub fn exited(pid: i32) -> bool {
    if !alive(pid) {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie leader whose other threads run on is alive: its process
        // exits with its last thread (field 20, num_threads, counts them).
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| {
                let threads: u32 = rest
                    .split(' ')
                    .nth(17)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(1);
                (rest.starts_with('Z') || rest.starts_with('X')) && threads <= 1
            })
            .unwrap_or(false),
        Err(_) => true,
    }
}

pub fn process_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// An ELF file mapped in a process: its path, a path to its inode, its
/// bytes, and its run-time minus link-time address.
pub struct MappedElf {
    pub path: String,
    pub attach_path: PathBuf,
    pub data: Vec<u8>,
    pub load_bias: u64,
    /// Where its first mapping starts (`mapped_files`).
    pub start: u64,
}

/// Why reading `what` of process `pid` was refused, as a person can act on
/// it: another user's process needs CAP_SYS_PTRACE (or root); and where
/// Yama restricts ptrace, even one's own processes need it for some reads.
pub fn denied(what: &str, pid: i32) -> anyhow::Error {
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let yama_says = match yama {
        Some(3) => "; Yama's ptrace_scope is 3 here: no process may read another's memory until reboot".to_string(),
        Some(n @ 1..=2) => format!(
            "; Yama's ptrace_scope is {n} here (/proc/sys/kernel/yama/ptrace_scope): without CAP_SYS_PTRACE hakctl may only read {}",
            if n == 1 { "its own descendants (as `hakctl run` does)" } else { "nothing of other processes" }
        ),
        _ => String::new(),
    };
    anyhow::anyhow!(
        "cannot read {what} of process {pid}: permission denied (run hakctl as root, or as the process's user with CAP_SYS_PTRACE; another user's process always needs CAP_SYS_PTRACE){yama_says}"
    )
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// The device (major, minor) and inode of the file (0 for none).
    pub dev: (u32, u32),
    pub inode: u64,
    /// The rest of the line: a path (spaces kept, ` (deleted)` too), `[heap]`, or empty.
    pub path: String,
}

/// Reads one line of `/proc/PID/maps`; None if it is not one.
pub fn parse_maps_line(line: &str) -> Option<MapsLine> {
    let mut f = line.split_whitespace();
    let (range, perms, offset, dev, inode) =
        (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.contains('x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
        path: f.collect::<Vec<_>>().join(" "),
    })
}

/// The files mapped in `pid` (`/proc/PID/maps`): path -> (lowest start of
/// a mapping at file offset 0, its end). A file deleted or replaced since it
/// was mapped keeps its ` (deleted)` suffix: a process still running a
/// library that was rebuilt under it is attached to the copy it maps
/// (`mapping_file`).
pub fn mapped_files(pid: i32) -> Result<BTreeMap<String, (u64, u64)>> {
    check_running(pid)?;
    let maps_path = format!("/proc/{pid}/maps");
    let maps = std::fs::read_to_string(&maps_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            denied("/proc/PID/maps", pid)
        } else if !alive(pid) {
            anyhow::anyhow!("process {pid} exited")
        } else {
            anyhow::anyhow!("cannot read {maps_path}: {e}")
        }
    })?;
    let mut files: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for m in maps.lines().filter_map(parse_maps_line) {
        if !m.path.starts_with('/') || m.offset != 0 {
            continue;
        }
        files
            .entry(m.path)
            .and_modify(|e| {
                if m.start < e.0 {
                    *e = (m.start, m.end)
                }
            })
            .or_insert((m.start, m.end));
    }
    Ok(files)
}

/// A path that opens the file `pid` maps at `start..end` under `path`: its
/// `map_files` link, which names the mapped inode even if the path was
/// replaced or deleted since, or failing that (no `CAP_SYS_ADMIN`) the path
/// as the process sees it (`/proc/PID/root`: a container's own file).
pub fn mapping_file(pid: i32, path: &str, start: u64, end: u64) -> PathBuf {
    let by_mapping = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    // A deleted file has no other name: its map_files link even when that is
    // refused, so that the read says "permission denied", not "not found".
    if path.ends_with(" (deleted)") || std::fs::metadata(&by_mapping).is_ok() {
        return by_mapping;
    }
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

/// The ELF files mapped in `pid`, and how many mapped files could not be
/// read for want of privilege.
pub fn mapped_elfs(pid: i32) -> Result<(Vec<MappedElf>, usize)> {
    let files = mapped_files(pid)?;
    let mut out = Vec::new();
    let mut refused = 0;
    for (path, (start, end)) in files {
        let attach_path = mapping_file(pid, &path, start, end);
        let data = match std::fs::read(&attach_path) {
            Ok(data) => data,
            Err(e) => {
                refused += (e.kind() == std::io::ErrorKind::PermissionDenied) as usize;
                continue;
            }
        };
        if !data.starts_with(b"\x7fELF") {
            continue;
        }
        let load_bias = start.wrapping_sub(first_load_vaddr(&data));
        out.push(MappedElf {
            path,
            attach_path,
            data,
            load_bias,
            start,
        });
    }
    Ok((out, refused))
}

/// The hakmem objects mapped in `pid`.
pub fn find_in_process(pid: i32) -> Result<Vec<HakmemObject>> {
    let mut found = Vec::new();
    let mut outside_code = Vec::new();
    let (elfs, refused) = mapped_elfs(pid)?;
    for elf in elfs {
        let sites = match probe_sites(&elf.data) {
            Ok(sites) => sites,
            Err(e) if has_hakmem_note(&elf.data) => return Err(e.context(elf.path.clone())),
            Err(_) => continue,
        };
        // A file whose every hakmem site lies outside its code is passed
        // over here (a binary that links hakmem without using it keeps only
        // notes of dropped code): the process's other copies still count.
        let sites = match ours_in_code(sites, &elf.path) {
            Ok(sites) => sites,
            Err(e) => {
                outside_code.push(e);
                continue;
            }
        };
        if sites.is_empty() {
            continue;
        }
        found.push(HakmemObject {
            path: elf.path,
            attach_path: elf.attach_path,
            load_bias: elf.load_bias,
            sites,
        });
    }
    if found.is_empty() {
        if !alive(pid) {
            bail!("process {pid} exited");
        }
        if refused > 0 {
            return Err(denied(&format!("{refused} of the files mapped"), pid));
        }
        if let Some(e) = outside_code.into_iter().next() {
            return Err(e.context(format!("no usable hakmem probes in process {pid}")));
        }
        bail!(
            "no hakmem probes in process {pid} ({}): it neither preloads libhakmem.so nor links hakmem as its allocator",
            process_name(pid)
        );
    }
    Ok(found)
}

/// The hakmem probes of an ELF file on disk.
pub fn find_in_file(path: &Path) -> Result<HakmemObject> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let sites = probe_sites(&data).with_context(|| format!("{}", path.display()))?;
    let sites = ours_in_code(sites, &path.display().to_string())?;
    if sites.is_empty() {
        bail!("no hakmem probes in {}", path.display());
    }
    // A file attached as such serves processes that map it later, which
    // need the kernel to raise the semaphores (see the function).
    if let Ok(shared) = crate::stapsdt::semaphores_on_shared_pages(&data) {
        if !shared.is_empty() {
            eprintln!(
                "hakctl: warning: {}: the semaphores of {} share a file page with another \
                 segment: processes that map it after this attach will not fire those probes",
                path.display(),
                shared.join(", ")
            );
        }
    }
    Ok(HakmemObject {
        path: path.display().to_string(),
        // `/proc/PID/root/...` is kept as is: the kernel follows the magic
        // link into the process's root (a container's file), where
        // canonicalizing would read the link as "/" and name the host's file.
        attach_path: if path.starts_with("/proc/") {
            path.to_path_buf()
        } else {
            path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
        },
        load_bias: 0,
        sites,
    })
}

/// hakmem's probe sites among `sites`, but for those outside the code
/// (`ProbeSite::in_code`), each named on stderr: never attached to.
fn ours_in_code(sites: Vec<ProbeSite>, path: &str) -> Result<Vec<ProbeSite>> {
    let ours: Vec<ProbeSite> = sites
        .into_iter()
        .filter(|s| s.provider == PROVIDER)
        .collect();
    let had_any = !ours.is_empty();
    let kept: Vec<ProbeSite> = ours
        .into_iter()
        .filter(|s| {
            if !s.in_code {
                eprintln!(
                    "hakctl: {path}: skipping probe {}:{} at {:#x}: its note points outside the code \
                     (left by code the linker dropped)",
                    s.provider, s.name, s.pc
                );
            }
            s.in_code
        })
        .collect();
    if had_any && kept.is_empty() {
        bail!(
            "{path}: every hakmem probe site lies outside the code (a corrupt .note.stapsdt, or \
             one whose addresses do not match the file)"
        );
    }
    Ok(kept)
}

fn has_hakmem_note(data: &[u8]) -> bool {
    data.windows(PROVIDER.len() + 1).any(|w| w == b"hakmem\0")
}

/// Link-time address of the mapping at file offset 0 (the first PT_LOAD, page-aligned).
fn first_load_vaddr(data: &[u8]) -> u64 {
    use object::{Object, ObjectSegment};
    let Ok(file) = object::File::parse(data) else {
        return 0;
    };
    let min = file
        .segments()
        .filter(|s| s.file_range().0 == 0)
        .map(|s| s.address())
        .min();
    min.unwrap_or(0) & !0xfff
}

/// Reads a probe's semaphore in the live process (None if it cannot be read).
pub fn read_semaphore(pid: i32, obj: &HakmemObject, site: &ProbeSite) -> Option<u16> {
    use std::os::unix::fs::FileExt;
    if site.semaphore == 0 {
        return None;
    }
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = [0u8; 2];
    f.read_exact_at(&mut buf, obj.load_bias.wrapping_add(site.semaphore))
        .ok()?;
    Some(u16::from_ne_bytes(buf))
}

/// Checks that this process may load BPF programs and open uprobe events,
/// and that the kernel has uprobes with reference counters.
pub fn check_environment() -> Result<()> {
    let release = kernel_release();
    if let Some(version) = release.as_deref().and_then(kernel_version) {
        if version < (5, 15) {
            bail!(
                "this kernel is Linux {} and hakctl needs 5.15 or later: it links its eBPF programs \
                 to uprobes with attach cookies (BPF perf links, Linux 5.15)",
                release.unwrap_or_default()
            );
        }
    }
    let pmu = Path::new("/sys/bus/event_source/devices/uprobe");
    if !pmu.join("type").exists() {
        bail!("this kernel has no uprobe event source (/sys/bus/event_source/devices/uprobe): it was built without CONFIG_UPROBE_EVENTS");
    }
    if !pmu.join("format/ref_ctr_offset").exists() {
        bail!("this kernel's uprobes have no reference-counter support (needs Linux 4.20+): USDT semaphores cannot be raised");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let caps = effective_caps();
        const CAP_PERFMON: u32 = 38;
        const CAP_BPF: u32 = 39;
        let has = |c: u32| caps & (1u64 << c) != 0;
        let allowed = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
        if !allowed {
            bail!("not enough privilege: hakctl loads eBPF programs and opens uprobe perf events, which needs root, or the capabilities CAP_BPF and CAP_PERFMON (plus CAP_SYS_PTRACE to read another user's process)");
        }
    }
    Ok(())
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> Option<String> {
    // SAFETY: an all-zero utsname is valid; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: uname writes NUL-terminated strings.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

/// Major and minor of a kernel release string (`6.18.0-1-amd64` -> (6, 18)).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub const CAP_SYS_ADMIN: u32 = 21;

/// Whether capability `cap` is in this process's effective set (root's
/// usually holds every one; a root with a reduced bounding set may not).
pub fn has_cap(cap: u32) -> bool {
    effective_caps() & (1u64 << cap) != 0
}

fn effective_caps() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_are_read_with_their_device_inode_and_whole_path() {
        let m = parse_maps_line(
            "7f0000001000-7f0000005000 r-xp 00002000 fd:01 1234   /opt/my lib/libx.so (deleted)",
        )
        .unwrap();
        assert_eq!(
            (m.start, m.end, m.offset),
            (0x7f0000001000, 0x7f0000005000, 0x2000)
        );
        assert!(m.executable);
        assert_eq!((m.dev, m.inode), ((0xfd, 1), 1234));
        assert_eq!(m.path, "/opt/my lib/libx.so (deleted)");
        let anon = parse_maps_line("7f00-7f10 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(
            (anon.inode, anon.path.as_str(), anon.executable),
            (0, "", false)
        );
        assert_eq!(parse_maps_line("garbage"), None);
    }

    #[test]
    fn kernel_releases_are_read_to_major_and_minor() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < (5, 15));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version(&kernel_release().unwrap()).is_some());
    }
}
