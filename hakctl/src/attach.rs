//! Attaching a loaded BPF program to one USDT location with the kernel's
//! uprobe reference counter (aya's UProbe has no `ref_ctr_offset`): a uprobe
//! perf event opened by hand, then a BPF perf link carrying the probe id as
//! its cookie. The kernel raises the semaphore on attach and drops it when the
//! fds close, also when hakctl is killed.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_UPROBE_REF_CTR_OFFSET_SHIFT: u64 = 32;
const PERF_ATTR_SIZE: usize = 136;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PERF_EVENT: u32 = 41;

/// A live attachment; dropping it detaches.
pub struct UprobeLink {
    _link: OwnedFd,
    _perf: OwnedFd,
}

/// The uprobe PMU's type number.
pub fn uprobe_pmu_type() -> Result<u32> {
    let path = "/sys/bus/event_source/devices/uprobe/type";
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {path}: this kernel has no uprobe event source"))?;
    s.trim()
        .parse()
        .with_context(|| format!("unexpected contents of {path}: {s:?}"))
}

/// Attaches `prog_fd` at file offset `offset` of `path` for process `pid`,
/// or for every process that maps the file if `pid` is -1 (a uprobe event
/// is then opened on CPU 0, as perf and BCC do: the kernel runs the BPF
/// program on whichever CPU hits the probe).
pub fn attach(
    pmu: u32,
    prog_fd: RawFd,
    path: &Path,
    offset: u64,
    ref_ctr_offset: u64,
    pid: i32,
    cookie: u64,
) -> Result<UprobeLink> {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).context("path contains NUL")?;
    let mut attr = [0u64; PERF_ATTR_SIZE / 8];
    attr[0] = pmu as u64 | ((PERF_ATTR_SIZE as u64) << 32);
    attr[1] = ref_ctr_offset << PERF_UPROBE_REF_CTR_OFFSET_SHIFT;
    attr[5] = 1; // disabled until the BPF link is in place
    attr[7] = cpath.as_ptr() as u64;
    attr[8] = offset;
    // SAFETY: perf_event_open reads a perf_event_attr of the size we declare;
    // the path pointer stays valid for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            pid,
            if pid == -1 { 0 } else { -1 },
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ESRCH) => bail!("process {pid} exited"),
            Some(libc::EACCES) | Some(libc::EPERM) if std::fs::File::open(path).is_err() => bail!(
                "cannot open {}: the kernel places the uprobe on the file, so hakctl must be able to open it (permission denied: a directory on the way, or the file, is not readable by this user)",
                path.display()
            ),
            Some(libc::EACCES) | Some(libc::EPERM) if !crate::target::has_cap(crate::target::CAP_SYS_ADMIN) => bail!(
                "perf_event_open refused the uprobe event: this kernel wants CAP_SYS_ADMIN for uprobe events \
                 (CAP_PERFMON alone is refused on some kernels, this one among them){}",
                if pid != -1 { ", plus CAP_SYS_PTRACE for another user's process" } else { "" }
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => bail!("perf_event_open refused the uprobe event: {e}"),
            Some(libc::EINVAL) => bail!("perf_event_open rejected the uprobe at {}+{offset:#x} (ref_ctr_offset {ref_ctr_offset:#x}): {e}; if another tracer attached to this probe with a different semaphore offset, the kernel refuses a second one", path.display()),
            _ => bail!("perf_event_open for uprobe at {}+{offset:#x}: {e}", path.display()),
        }
    }
    // SAFETY: a new fd we own.
    let perf = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };

    let mut link_attr = [0u64; 8];
    link_attr[0] = prog_fd as u32 as u64 | ((perf.as_raw_fd() as u32 as u64) << 32);
    link_attr[1] = BPF_PERF_EVENT as u64; // attach_type, flags = 0
    link_attr[2] = cookie; // perf_event.bpf_cookie
                           // SAFETY: BPF_LINK_CREATE reads a bpf_attr prefix of the given size.
    let lfd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            link_attr.as_ptr(),
            std::mem::size_of_val(&link_attr),
        )
    };
    if lfd < 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot link the BPF program to the uprobe (BPF perf links with cookies need Linux 5.15+): {e}");
    }
    // SAFETY: a new fd we own.
    let link = unsafe { OwnedFd::from_raw_fd(lfd as RawFd) };
    // SAFETY: ioctl on our perf fd with an integer argument.
    if unsafe { libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } < 0 {
        bail!(
            "cannot enable the uprobe event: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(UprobeLink {
        _link: link,
        _perf: perf,
    })
}
