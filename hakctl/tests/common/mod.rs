//! Helpers shared by the test files that run hakctl against real processes.
#![allow(dead_code)] // each test file uses its own subset

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub fn hakctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hakctl"))
}

/// Sibling binaries of this test's build (target/<profile>/...).
pub fn built(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace` (or `just test`) so that it is built",
        p.display()
    );
    p
}

/// The release libhakmem.so (`cargo build --release -p hakmem`, done by `just test`), or HAKMEM_LIB.
pub fn release_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("HAKMEM_LIB") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/libhakmem.so");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p hakmem` (or run `just test`)",
        p.display()
    );
    p
}

pub fn bpf_usable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    if !std::path::Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        return Err("no uprobe PMU".into());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("no kernel BTF".into());
    }
    Ok(())
}

/// True if the BPF tests should run; panics if BPF is required but unusable.
pub fn need_bpf(test: &str) -> bool {
    match bpf_usable() {
        Ok(()) => true,
        Err(why) if std::env::var("HAKMEM_REQUIRE_BPF").as_deref() == Ok("1") => {
            panic!("{test}: BPF is required (HAKMEM_REQUIRE_BPF=1) but unusable here: {why}")
        }
        Err(why) => {
            eprintln!("{test}: skipped, BPF unusable: {why}");
            false
        }
    }
}

/// The JSON documents, one a line, of a command that must have succeeded.
pub fn json_lines(out: &std::process::Output) -> Vec<Value> {
    stdout_of_success(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The standard output of a command that must have succeeded (else its stderr is the failure).
pub fn stdout_of_success(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A C program built here with plain `gcc -O2`: tiny, mid and large blocks
/// (slabs from every stage, ACE, the large path), a line on stdout and one
/// on stderr.
pub fn c_workload() -> PathBuf {
    gcc_program(
        "work",
        r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
    static void *p[60000];
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 60000; i++) { p[i] = malloc(16 << (round + i % 4)); memset(p[i], 1, 8); }
        for (int i = 0; i < 60000; i++) free(p[i]);
    }
    for (int i = 0; i < 200; i++) { void *m = malloc(100000 + i * 100); memset(m, 2, 64); free(m); }
    for (int i = 0; i < 20; i++) { void *l = malloc((size_t)(i + 1) << 20); memset(l, 3, 4096); free(l); }
    printf("out-of-the-command\n");
    fprintf(stderr, "err-of-the-command\n");
    return 0;
}
"#,
    )
}

/// `source` built with plain `gcc -O2` (as users build) in a directory of
/// its own (tests run in parallel threads): the path of the program, named `name`.
pub fn gcc_program(name: &str, source: &str) -> PathBuf {
    static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hakctl-c-{}-{n}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let exe = dir.join(name);
    let st = Command::new("gcc")
        .arg("-O2")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc -O2 {}", src.display());
    exe
}

/// A hakctl command running in the background, its stdout and stderr read
/// by threads (a pipe nobody reads would stall it).
pub struct Background {
    /// The line in which it said it is attached.
    pub said: String,
    child: Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Background {
    /// Starts hakctl with `args` and returns once it said it is attached.
    pub fn attached(args: &[&str]) -> Background {
        let mut child = hakctl()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let mut errs = BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        errs.read_line(&mut said).unwrap();
        assert!(said.contains("attached to"), "hakctl said: {said}");
        let first = said.clone();
        let stderr = std::thread::spawn(move || {
            let mut s = said;
            let _ = errs.read_to_string(&mut s);
            s
        });
        Background {
            said: first,
            child,
            stdout,
            stderr,
        }
    }

    /// Stops it as Ctrl-C does; its stdout and stderr.
    pub fn interrupt(self) -> (String, String) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.finish()
    }

    /// Waits for it to end: its stdout and stderr; it must have succeeded.
    pub fn finish(self) -> (String, String) {
        let (status, out, err) = self.wait();
        assert!(status.success(), "hakctl failed: {err}");
        (out, err)
    }

    /// Waits for it to end: its exit status, stdout and stderr.
    pub fn wait(mut self) -> (std::process::ExitStatus, String, String) {
        let status = self.child.wait().unwrap();
        (
            status,
            self.stdout.join().unwrap(),
            self.stderr.join().unwrap(),
        )
    }
}

/// A directory of its own for one test (tests run in parallel threads), readable by every user.
pub fn scratch_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("hakctl-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}
