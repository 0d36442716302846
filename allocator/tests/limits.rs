//! Running out of memory under the limits a host sets is malloc returning
//! NULL with ENOMEM, never a crash: `limits/exhaust.c` allocates until it is
//! refused in every tier, frees, and allocates again, under `RLIMIT_AS` and
//! under a memory cgroup this test makes (glibc, as the control, must die
//! there: a cgroup that killed nobody would prove nothing).
//!
//! Uses the release library, or `HAKMEM_LIB`. The cgroup test needs root and
//! a writable memory cgroup (v1 or v2): skipped without, failed under
//! `HAKMEM_REQUIRE_BPF=1` (the CI, which runs as root on such a host).

mod common;
use common::{lib, Scratch};
use std::ffi::CString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Compiles `limits/{program}.c` into a directory of the calling test's own,
/// which goes when the returned `Scratch` does.
fn compile(test: &str, program: &str) -> (Scratch, PathBuf) {
    let dir = Scratch::new(&format!("limits-{test}"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/limits/{program}.c"));
    let exe = dir.join(program);
    let out = Command::new("cc")
        .args(["-std=c11", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("cc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir, exe)
}

/// Runs the program, hakmem preloaded or not, with `setup` run in the child
/// before exec (async-signal-safe calls only).
fn run(
    exe: &Path,
    args: &[&str],
    preload: bool,
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Output {
    run_with(exe, args, preload, &[], setup)
}

/// `run` with `knobs` (`HAKMEM_*` settings) in the environment.
fn run_with(
    exe: &Path,
    args: &[&str],
    preload: bool,
    knobs: &[(&str, &str)],
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Output {
    let mut cmd = Command::new(exe);
    cmd.args(args).env_remove("LD_PRELOAD");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HAKMEM_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(knobs.iter().copied());
    if preload {
        cmd.env("LD_PRELOAD", lib());
    }
    // SAFETY: `setup` makes only async-signal-safe calls (setrlimit, open,
    // write, close) and allocates nothing.
    unsafe { cmd.pre_exec(setup) };
    cmd.output().unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "{:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every tier was refused with ENOMEM and allocated again after the frees.
fn assert_refused_cleanly(out: &Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{what}: {}", describe(out));
    for tier in ["tiny", "mid", "large", "aligned"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{tier}:")))
            .unwrap_or("");
        assert!(
            line.contains("NULL with ENOMEM") && line.contains("allocates again"),
            "{what}, {tier}: {}",
            describe(out)
        );
    }
}

/// A `pre_exec` setup that sets `resource` to `bytes`, soft and hard.
fn rlimit(
    resource: libc::__rlimit_resource_t,
    bytes: u64,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    move || {
        let rl = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: setrlimit with a valid struct; async-signal-safe.
        if unsafe { libc::setrlimit(resource, &rl) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// exhaust.c under `resource` at 1 GiB, glibc (the control) and hakmem.
fn refused_cleanly_under(resource: libc::__rlimit_resource_t, name: &str) {
    let (_dir, exe) = compile(&name.to_lowercase(), "exhaust");
    let limit = || rlimit(resource, 1 << 30);
    for (preload, who) in [(false, "glibc"), (true, "hakmem")] {
        let out = run(&exe, &[], preload, limit());
        assert_refused_cleanly(&out, &format!("{who} under {name} 1 GiB"));
    }
}

#[test]
fn under_rlimit_as_running_out_is_null_with_enomem() {
    refused_cleanly_under(libc::RLIMIT_AS, "RLIMIT_AS");
}

/// `RLIMIT_DATA` counts private writable mappings, not reserved (`PROT_NONE`)
/// ones, so under it hakmem reserves its regions (`os::region_prot`) and it
/// refuses the `mprotect` that makes a region's chunk writable, the path
/// whose refused chunk is unmapped (`os::chunk_from_region`), and every tier
/// still gets NULL with ENOMEM and allocates again after the frees.
#[test]
fn under_rlimit_data_running_out_is_null_with_enomem() {
    refused_cleanly_under(libc::RLIMIT_DATA, "RLIMIT_DATA");
}

/// `mlock.c`'s resident KiB after its `mlockall`.
const RSS: &str = "rss_kib ";

/// The figure `mlock.c` printed after `key`.
fn mlock_figure(
    exe: &Path,
    args: &[&str],
    preload: bool,
    knobs: &[(&str, &str)],
    key: &str,
) -> u64 {
    let out = run_with(exe, args, preload, knobs, || Ok(()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "mlockall needs CAP_IPC_LOCK or RLIMIT_MEMLOCK: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key}line: {}", describe(&out)))
}

/// `mlock.c` (compiled for `test`) run with `args`, under glibc and under
/// hakmem: the figure each printed after `key`, and the program.
fn mlock_against_glibc(test: &str, args: &[&str], key: &str) -> (u64, u64, (Scratch, PathBuf)) {
    let (dir, exe) = compile(test, "mlock");
    let glibc = mlock_figure(&exe, args, false, &[], key);
    let hakmem = mlock_figure(&exe, args, true, &[], key);
    (glibc, hakmem, (dir, exe))
}

/// A program that calls `mlockall(MCL_CURRENT)` after its first allocation
/// locks what is mapped writable then: a writable region's untaken chunks
/// too (`os::region_prot`), 36.5 MB resident, unless hakmem's `mlockall`
/// gives them back first (`capi::mlockall`); `HAKMEM_RESERVE_REGIONS=1`
/// maps regions reserved from the start (for a program that makes the
/// system call itself). Needs CAP_IPC_LOCK (root).
#[test]
fn mlockall_after_the_first_allocation_locks_no_untaken_chunks() {
    let (glibc, writable, (_dir, exe)) = mlock_against_glibc("mlock", &[], RSS);
    let reserved = mlock_figure(&exe, &[], true, &[("HAKMEM_RESERVE_REGIONS", "1")], RSS);
    eprintln!("resident after mlockall: glibc {glibc} KiB, hakmem {writable}, reserved {reserved}");
    // 2 MiB chunks are what hakmem has taken at its first allocation; a
    // writable region's other 30 MiB must not be there.
    for (what, kib) in [
        ("writable regions", writable),
        ("reserved regions", reserved),
    ] {
        assert!(
            kib < glibc + 16 * 1024,
            "with {what} {kib} KiB resident (glibc {glibc})"
        );
    }
}

/// A program that makes the `mlockall(MCL_CURRENT | MCL_FUTURE)` system call
/// before its first allocation (hakmem not yet initialised; the system call
/// itself, so hakmem's `mlockall` does not step in) locks what is mapped
/// writable then: the registry's 64 MiB `.bss` table was, until hakmem's
/// initialisation made it read-only (71 MB resident, glibc 2.4); it is
/// read-only from the library's load now (`registry::protect_at_load`).
/// Needs CAP_IPC_LOCK (root).
#[test]
fn mlockall_before_the_first_allocation_locks_no_registry_table() {
    let (glibc, hakmem, _) = mlock_against_glibc("mlock-first", &["first"], RSS);
    eprintln!("resident after mlockall then malloc: glibc {glibc} KiB, hakmem {hakmem}");
    assert!(
        hakmem < glibc + 16 * 1024,
        "{hakmem} KiB resident (glibc {glibc})"
    );
}

/// What a program maps after `mlockall(MCL_CURRENT)` alone is not locked
/// (the kernel locks the mappings there are at the call): glibc's next
/// `mmap`ed block is not, and hakmem's next chunk must not be either. When
/// hakmem's `mlockall` made the region's untaken chunks `PROT_NONE` instead
/// of giving them back, they stayed locked, and the next chunk came in
/// locked (smaps: 4096 KiB of its mapping). Needs CAP_IPC_LOCK (root).
#[test]
fn what_is_allocated_after_mlockall_of_current_mappings_is_not_locked() {
    let key = "locked_kib_of_block ";
    let (glibc, hakmem, _) = mlock_against_glibc("mlock-current", &["current"], key);
    eprintln!(
        "locked of the mapping of a block made after mlockall(MCL_CURRENT): glibc {glibc} KiB, hakmem {hakmem}"
    );
    assert_eq!(
        hakmem, 0,
        "KiB locked of the block's mapping (glibc {glibc})"
    );
}

/// A memory cgroup made for the test, removed when dropped.
struct TestCgroup {
    dir: PathBuf,
    procs: CString,
}

impl TestCgroup {
    /// A child of this process's memory cgroup limited to `bytes`, or why not.
    fn new(bytes: usize) -> Result<TestCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("hakmem-limits-{}", std::process::id());
        for line in own.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(id), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (base, files): (&str, &[(&str, String)]) = if ctl.split(',').any(|c| c == "memory")
            {
                (
                    "/sys/fs/cgroup/memory",
                    &[("memory.limit_in_bytes", bytes.to_string())],
                )
            } else if id == "0" && ctl.is_empty() {
                (
                    "/sys/fs/cgroup",
                    &[
                        ("memory.max", bytes.to_string()),
                        ("memory.swap.max", "0".into()),
                    ],
                )
            } else {
                continue;
            };
            let dir = Path::new(base)
                .join(path.trim_start_matches('/'))
                .join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let made = TestCgroup {
                procs: CString::new(dir.join("cgroup.procs").to_str().unwrap()).unwrap(),
                dir,
            };
            for (file, value) in files {
                std::fs::write(made.dir.join(file), value)
                    .map_err(|e| format!("{}: {e}", made.dir.join(file).display()))?;
            }
            return Ok(made);
        }
        Err("no writable memory cgroup (v1 or v2) under this process's".into())
    }

    /// Moves the calling process into the group (for `pre_exec`).
    fn join(procs: &CString) -> std::io::Result<()> {
        // SAFETY: open/write/close on a NUL-terminated path and a stack
        // buffer; async-signal-safe, no allocation.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn under_a_memory_cgroup_running_out_is_null_with_enomem_where_glibc_is_killed() {
    let (_dir, exe) = compile("cgroup", "exhaust");
    let cg = match TestCgroup::new(256 << 20) {
        Ok(cg) => cg,
        Err(why) if std::env::var_os("HAKMEM_REQUIRE_BPF").is_none() => {
            eprintln!("skipped: {why}");
            return;
        }
        Err(why) => panic!("HAKMEM_REQUIRE_BPF=1 and {why}"),
    };
    let join = |procs: CString| move || TestCgroup::join(&procs);
    let glibc = run(&exe, &["touch"], false, join(cg.procs.clone()));
    assert_eq!(
        glibc.status.signal(),
        Some(libc::SIGKILL),
        "glibc was not OOM-killed in the 256 MiB cgroup (is the limit enforced?): {}",
        describe(&glibc)
    );
    let hakmem = run(&exe, &["touch"], true, join(cg.procs.clone()));
    assert_refused_cleanly(&hakmem, "hakmem in a 256 MiB memory cgroup");
    println!(
        "glibc: {}\nhakmem:\n{}",
        describe(&glibc),
        String::from_utf8_lossy(&hakmem.stdout)
    );
}
