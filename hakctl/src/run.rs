//! `hakctl run`: start a command with libhakmem.so preloaded and watch it from
//! its first allocation, across the programs it execs (a wrapper script that
//! execs the real program is common).
//!
//! Each program image stops itself at its first allocation
//! (`HAKMEM_STOP_AT_START`), when the library and its semaphores are mapped;
//! hakctl attaches then. USDT semaphores cannot follow an exec (the kernel
//! would find nothing to decrement in the new image and leak the uprobe), so
//! hakctl traces the child with ptrace only to learn of each exec, and
//! detaches its probes there, before the new image maps anything.

use crate::session::Session;
use crate::target;
use anyhow::{bail, Context, Result};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;

const PTRACE_EVENT_EXEC: i32 = 4;

/// What happened to the child since the last look.
pub enum Event {
    Running,
    /// A program image reached its first allocation: a new session is attached.
    Attached,
    Exited(i32),
}

pub struct Child {
    pub pid: i32,
    pub session: Option<Session>,
    /// Whether any image of the command loaded the library (stopped at its
    /// first allocation): if none did, nothing was watched.
    pub attached_once: bool,
    /// Attach the drain probes too (see `session::DRAIN_PROBES`).
    drains: bool,
}

/// Where the command's stdout and stderr go (`commands::child_output` decides).
pub enum Output {
    /// Both into this file; stdin from /dev/null.
    File(std::path::PathBuf, std::fs::File),
    /// stdout to hakctl's stderr, stderr and stdin inherited.
    Stderr,
}

impl Output {
    pub fn path(&self) -> Option<std::path::PathBuf> {
        match self {
            Output::File(p, _) => Some(p.clone()),
            Output::Stderr => None,
        }
    }
}

/// The library's path as `LD_PRELOAD` can carry it: ld.so splits that list
/// at spaces and colons and has no escape, so a library under such a path
/// (a checkout in "~/my projects") is preloaded through a link to it in a
/// directory of its own under the temporary directory, removed when dropped.
pub struct PreloadPath {
    pub path: std::path::PathBuf,
    link_dir: Option<std::path::PathBuf>,
}

impl PreloadPath {
    pub fn new(lib: &std::path::Path) -> Result<PreloadPath> {
        let splits = |p: &std::path::Path| {
            p.as_os_str()
                .as_encoded_bytes()
                .iter()
                .any(|b| b" :\t\n".contains(b))
        };
        if !splits(lib) {
            return Ok(PreloadPath {
                path: lib.to_path_buf(),
                link_dir: None,
            });
        }
        let tmp = std::env::temp_dir();
        if splits(&tmp) {
            bail!(
                "LD_PRELOAD cannot name {}: ld.so splits it at spaces and colons, and so would \
                 a link in the temporary directory {}; set TMPDIR to a directory without them",
                lib.display(),
                tmp.display()
            );
        }
        let dir = private_dir(&tmp.join("hakctl-preload-XXXXXX"))?;
        let path = dir.join("libhakmem.so");
        if let Err(e) = std::os::unix::fs::symlink(lib, &path) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e)
                .with_context(|| format!("linking {} to {}", path.display(), lib.display()));
        }
        Ok(PreloadPath {
            path,
            link_dir: Some(dir),
        })
    }
}

/// A new directory made from `template` (ending in XXXXXX) by `mkdtemp`:
/// a name nobody could have made before, mode 0700. hakctl runs as root: a
/// directory of a predictable name in a shared /tmp could be another user's,
/// who would swap the link for a library of theirs.
fn private_dir(template: &std::path::Path) -> Result<std::path::PathBuf> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut buf = std::ffi::CString::new(template.as_os_str().as_bytes())
        .context("temporary directory")?
        .into_bytes_with_nul();
    // SAFETY: a NUL-terminated buffer that mkdtemp rewrites in place.
    if unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) }.is_null() {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating {}", template.display()));
    }
    buf.pop();
    Ok(std::ffi::OsString::from_vec(buf).into())
}

impl Drop for PreloadPath {
    fn drop(&mut self) {
        if let Some(dir) = &self.link_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts `cmd` traced, with the preload and the stop request in its environment.
pub fn spawn(cmd: &[String], lib: &std::path::Path, drains: bool, output: Output) -> Result<Child> {
    let mut c = std::process::Command::new("/bin/sh");
    match output {
        Output::File(path, file) => {
            let copy = file
                .try_clone()
                .with_context(|| format!("{}", path.display()))?;
            c.stdin(std::process::Stdio::null())
                .stdout(copy)
                .stderr(file);
        }
        Output::Stderr => {
            let err = std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating stderr")?;
            c.stdout(err);
        }
    }
    c.arg("-c")
        .arg("HAKMEM_STOP_AT_START=$$ LD_PRELOAD=\"$HAKCTL_PRELOAD${LD_PRELOAD:+ $LD_PRELOAD}\" exec \"$@\"")
        .arg("hakctl-run")
        .args(cmd)
        .env("HAKCTL_PRELOAD", lib);
    // SAFETY: PTRACE_TRACEME is async-signal-safe and allocates nothing; the
    // child then stops at its exec of /bin/sh, which hakctl continues.
    unsafe {
        c.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c
        .spawn()
        .with_context(|| format!("cannot start {}", cmd[0]))?;
    let pid = child.id() as i32;
    // The exec of /bin/sh stops with SIGTRAP; from here on, report execs as events.
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid || !libc::WIFSTOPPED(status) {
        bail!("the command did not start (wait status {status:#x})");
    }
    let opts = libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_EXITKILL;
    // SAFETY: our stopped tracee; plain integer arguments.
    unsafe {
        libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts as libc::c_long);
        libc::ptrace(libc::PTRACE_CONT, pid, 0, 0);
    }
    Ok(Child {
        pid,
        session: None,
        attached_once: false,
        drains,
    })
}

impl Child {
    /// Handles every stop that is pending, without blocking.
    pub fn poll(&mut self) -> Result<Event> {
        let mut event = Event::Running;
        loop {
            let mut status = 0;
            // SAFETY: waiting for our own tracee without blocking.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG | libc::__WALL) };
            if r == 0 {
                return Ok(event);
            }
            if r < 0 {
                bail!("waitpid: {}", std::io::Error::last_os_error());
            }
            if libc::WIFEXITED(status) {
                return Ok(Event::Exited(libc::WEXITSTATUS(status)));
            }
            if libc::WIFSIGNALED(status) {
                return Ok(Event::Exited(128 + libc::WTERMSIG(status)));
            }
            let sig = libc::WSTOPSIG(status);
            let mut deliver = 0;
            if status >> 16 == PTRACE_EVENT_EXEC {
                // A new image: drop the probes before it maps the library again.
                self.session = None;
            } else if sig == libc::SIGSTOP && self.session.is_none() {
                // Its first allocation: attach, and swallow the stop.
                let objects = target::find_in_process(self.pid)?;
                self.session = Some(Session::attach(self.pid, objects, self.drains)?);
                self.attached_once = true;
                event = Event::Attached;
            } else {
                deliver = sig;
            }
            // SAFETY: resuming our stopped tracee, passing its signal on.
            unsafe { libc::ptrace(libc::PTRACE_CONT, self.pid, 0, deliver as libc::c_long) };
        }
    }
}
