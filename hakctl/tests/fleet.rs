//! hakctl across processes with real eBPF: `watch --all` attached to the
//! library file itself. Skipped where BPF is unusable, except under
//! HAKMEM_REQUIRE_BPF=1 (CI), where they fail.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The interpreter itself, not a launcher script in front of it (pyenv's
/// shims run other programs first, which would be counted too).
fn python() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A program started with libhakmem.so preloaded and its exit tally going to `stats`.
fn preloaded(program: &Path, args: &[&str], stats: &Path) -> Command {
    preloaded_from(&release_lib(), program, args, stats)
}

/// `preloaded`, with the library at `lib`.
fn preloaded_from(lib: &Path, program: &Path, args: &[&str], stats: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LD_PRELOAD", lib)
        .env("HAKMEM_STATS_FILE", stats)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn own_tally(stats: &Path) -> Value {
    let text = std::fs::read_to_string(stats).expect("the program's exit tally");
    serde_json::from_str(
        text.lines()
            .last()
            .unwrap()
            .trim_start_matches("hakmem-stats: "),
    )
    .unwrap()
}

/// The rows of process `pid` in `watch --all --json`'s documents, in order.
fn rows_of(out: &str, pid: u32) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .flat_map(|d| d["processes"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["pid"] == pid)
        .collect()
}

#[test]
fn watch_all_counts_every_process_that_maps_the_library_even_those_started_later() {
    if !need_bpf("watch_all") {
        return;
    }
    let dir = scratch_dir("fleet");
    let stats = |name: &str| dir.join(format!("{name}.stats"));
    let py = python();
    // Started before hakctl; allocates once told to, after the attach.
    let mut early = preloaded(
        &py,
        &[
            "-c",
            "import sys; sys.stdin.readline(); x = [str(i) for i in range(100000)]",
        ],
        &stats("early"),
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let lib = release_lib();
    let ctl = Background::attached(&[
        "watch",
        "--all",
        "--lib",
        lib.to_str().unwrap(),
        "--drains",
        "-j",
        "-i",
        "0.3",
    ]);
    use std::io::Write;
    early.stdin.take().unwrap().write_all(b"go\n").unwrap();

    // Started after hakctl: every event of theirs is counted, so hakctl's
    // final counts equal their own exit tallies exactly.
    let c = c_workload();
    let mut later = vec![
        ("work", preloaded(&c, &[], &stats("work")).spawn().unwrap()),
        (
            "python",
            preloaded(
                &py,
                &[
                    "-c",
                    "import time; d = {i: str(i) * 3 for i in range(200000)}; time.sleep(1.2)",
                ],
                &stats("python"),
            )
            .spawn()
            .unwrap(),
        ),
    ];
    let mut sqlite = preloaded(Path::new("sqlite3"), &[":memory:"], &stats("sqlite3"))
        .spawn()
        .unwrap();
    sqlite
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"create table t(a, b);
              with recursive c(x) as (select 1 union all select x + 1 from c limit 50000)
              insert into t select x, hex(randomblob(40)) from c;
              create index i on t(b);
              select count(*) from t;\n",
        )
        .unwrap();
    later.push(("sqlite3", sqlite));
    let pids: Vec<(&str, u32)> = later.iter().map(|(n, c)| (*n, c.id())).collect();
    for (name, child) in &mut later {
        assert!(child.wait().unwrap().success(), "{name} failed");
    }
    assert!(early.wait().unwrap().success());
    // Two refreshes after the last exit: every process had its final row.
    std::thread::sleep(Duration::from_millis(900));
    let (out, err) = ctl.interrupt();
    assert!(err.contains("interrupted; detached"), "{err}");
    let docs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(docs.len() >= 3, "{out}");
    for (name, pid) in &pids {
        let rows = rows_of(&out, *pid);
        let last = rows
            .last()
            .unwrap_or_else(|| panic!("{name} ({pid}) never shown: {out}"));
        assert_eq!(last["exited"], true, "{name}: {last}");
        // Shown once as exited, then gone from the table.
        assert_eq!(
            rows.iter().filter(|r| r["exited"] == true).count(),
            1,
            "{name}"
        );
        let own = own_tally(&stats(name));
        assert!(
            last["counts"] == own,
            "{name}: hakctl counted {} and the program itself {own}",
            last["counts"]
        );
        let command = last["command"].as_str().unwrap();
        assert!(command.starts_with(&name[..4]), "{name} shown as {command}");
    }
    // The python that sleeps was seen alive, with its memory levels.
    let python_pid = pids.iter().find(|(n, _)| *n == "python").unwrap().1;
    let alive = rows_of(&out, python_pid)
        .into_iter()
        .find(|r| r["exited"] == false)
        .expect("a row while python was alive");
    assert!(
        alive["memory"]["rss_bytes"].as_u64().unwrap() > 1 << 20,
        "{alive}"
    );
    assert!(
        alive["memory"]["in_use_bytes"].as_u64().unwrap() > 0,
        "{alive}"
    );
    assert!(alive["events_per_s"].as_f64().unwrap() > 0.0 || alive["events"].as_u64().unwrap() > 0);
    // The one started before hakctl is in the first refresh already (it maps
    // the library), and counted from the attach on.
    assert!(
        docs[0]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == early.id()),
        "{}",
        docs[0]
    );
    let early_rows = rows_of(&out, early.id());
    let last = early_rows.last().expect("the early process is shown");
    assert!(last["events"].as_u64().unwrap() > 0, "{last}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(c.parent().unwrap());
}

#[test]
fn watch_all_goes_on_when_a_process_with_no_event_exits() {
    if !need_bpf("watch_all_no_event_exit") {
        return;
    }
    // `sleep` maps the library and makes no allocation while watched: its
    // row comes from its mappings alone, and when it exits there is no
    // per-process entry to drop (before: "bpf_map_delete_elem failed", and
    // hakctl stopped). Killed while watched and reaped only at the end: a
    // zombie for the refreshes after its exit.
    let mut quiet = Command::new("sleep")
        .arg("60")
        .env("LD_PRELOAD", release_lib())
        .spawn()
        .unwrap();
    let pid = quiet.id();
    std::thread::sleep(Duration::from_millis(200));
    let lib = release_lib();
    let ctl = Background::attached(&[
        "watch",
        "--all",
        "--lib",
        lib.to_str().unwrap(),
        "-j",
        "-i",
        "0.3",
    ]);
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(1000));
    let (out, err) = ctl.interrupt();
    let _ = quiet.wait();
    assert!(err.contains("interrupted; detached"), "{err}");
    let rows = rows_of(&out, pid);
    assert!(
        rows.iter().any(|p| p["exited"] == false),
        "never shown alive: {out}"
    );
    // Once, though it stays a zombie: before, it was listed for its
    // mappings and shown exited at every refresh.
    let exited = rows.iter().filter(|p| p["exited"] == true).count();
    assert_eq!(exited, 1, "rows that said sleep exited: {out}");
}

/// An overlay mount, unmounted when dropped.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lower: &Path, at: &Path) -> Overlay {
        let (upper, work) = (at.with_extension("upper"), at.with_extension("work"));
        for d in [at, upper.as_path(), work.as_path()] {
            std::fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Overlay(at.to_path_buf())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // Lazily: a failed test may leave a hakctl holding the file.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn watch_all_counts_a_library_seen_through_two_overlay_mounts_once() {
    if !need_bpf("watch_all_overlay") {
        return;
    }
    // Two containers of one image: one file of the image's layer, mapped
    // through two overlay mounts, each with a device of its own. The
    // kernel's uprobe goes on the layer's inode: attached through both
    // paths, every event was counted twice.
    let dir = scratch_dir("overlay");
    let lower = dir.join("layer");
    std::fs::create_dir_all(&lower).unwrap();
    std::fs::copy(release_lib(), lower.join("libhakmem.so")).unwrap();
    let mounts = [1, 2].map(|i| Overlay::mount(&lower, &dir.join(format!("container{i}"))));
    let libs = mounts.each_ref().map(|m| m.0.join("libhakmem.so"));
    let ctl = Background::attached(&[
        "watch",
        "--all",
        "--lib",
        libs[0].to_str().unwrap(),
        "--lib",
        libs[1].to_str().unwrap(),
        "--drains",
        "-j",
        "-i",
        "0.3",
    ]);
    assert!(
        ctl.said.contains("13 probe locations"),
        "attached once: {}",
        ctl.said
    );
    let py = python();
    let stats = |i: usize| dir.join(format!("{i}.stats"));
    let mut children: Vec<_> = libs
        .iter()
        .enumerate()
        .map(|(i, lib)| {
            preloaded_from(
                lib,
                &py,
                &["-c", "x = [str(i) for i in range(100000)]"],
                &stats(i),
            )
            .spawn()
            .unwrap()
        })
        .collect();
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    for c in &mut children {
        assert!(c.wait().unwrap().success());
    }
    std::thread::sleep(Duration::from_millis(900));
    let (out, err) = ctl.interrupt();
    assert!(err.contains("interrupted; detached"), "{err}");
    for (i, pid) in pids.iter().enumerate() {
        let rows = rows_of(&out, *pid);
        let last = rows
            .last()
            .unwrap_or_else(|| panic!("process {pid} never shown: {out}"));
        let own = own_tally(&stats(i));
        assert!(
            last["counts"] == own,
            "container {i}: hakctl counted {} and the program itself {own}",
            last["counts"]
        );
    }
    drop(mounts);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn watch_all_names_what_it_cannot_attach_to() {
    for (lib, says) in [
        (
            "/nonexistent/libhakmem.so",
            "--lib /nonexistent/libhakmem.so",
        ),
        ("/bin/true", "no hakmem probes in /bin/true"),
    ] {
        let out = hakctl()
            .args(["watch", "--all", "--lib", lib, "-j", "1", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{lib}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = hakctl()
        .args(["watch", "--all", "-p", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

/// A program whose only SuperSlab maps (Stage 3) come from one function, built with plain `gcc -O2`.
const KNOWN: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* The one function that makes the allocator map SuperSlabs: 200000 blocks
   of 512 bytes kept alive. */
__attribute__((noinline)) void **make_buffers(int n) {
    void **p = malloc(n * sizeof *p);
    for (int i = 0; i < n; i++) { p[i] = malloc(512); memset(p[i], 1, 16); }
    return p;
}
int main(void) {
    getchar();
    void **p = make_buffers(200000);
    printf("%p\n", p[7]);
    fflush(stdout);
    getchar(); /* until told to end (or stdin closes) */
    return 0;
}
"#;

/// `hakctl stacks ARGS` on `program` started with the preload, told to go once hakctl is attached:
/// (hakctl's stdout, its stderr, the program's own exit tally).
fn stacks_of(program: &Path, script: Option<&str>, args: &[&str]) -> (String, String, Value) {
    stacks_after(program, script, args, &release_lib(), |_| {})
}

/// `stacks_of`, with the library at `lib`, and `meanwhile` run on the
/// library's path once the program has mapped it, before hakctl starts.
fn stacks_after(
    program: &Path,
    script: Option<&str>,
    args: &[&str],
    lib: &Path,
    meanwhile: impl FnOnce(&Path),
) -> (String, String, Value) {
    use std::io::Write;
    let dir = scratch_dir("stacks");
    let stats = dir.join(format!(
        "{}.stats",
        program.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&stats);
    let mut target = preloaded_from(
        lib,
        program,
        script.map(|s| vec!["-c", s]).unwrap_or_default().as_slice(),
        &stats,
    )
    .spawn()
    .unwrap();
    // Loaded and waiting on stdin: its first allocations are done, libhakmem.so is mapped.
    std::thread::sleep(Duration::from_millis(300));
    meanwhile(lib);
    let pid = target.id().to_string();
    let mut all = vec!["stacks", pid.as_str()];
    all.extend(args);
    let ctl = Background::attached(&all);
    target.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(target.wait().unwrap().success());
    let (out, err) = ctl.finish();
    assert!(err.contains("exited; detached"), "{err}");
    (out, err, own_tally(&stats))
}

fn in_hakmem(frame: &Value) -> bool {
    frame["module"]
        .as_str()
        .is_some_and(|m| m.ends_with("libhakmem.so"))
}

#[test]
fn stacks_name_the_function_that_made_the_allocator_map_superslabs() {
    if !need_bpf("stacks") {
        return;
    }
    let exe = gcc_program("known", KNOWN);
    let (out, _, own) = stacks_of(
        &exe,
        None,
        &["--probe", "ss_acquire", "-a", "stage=3", "-j"],
    );
    let doc: Value = serde_json::from_str(&out).unwrap();
    let stacks = doc["stacks"].as_array().unwrap();
    // Every Stage 3 acquisition the program made (its own tally) has a stack.
    let stage3 = stage3_of(&own);
    let counted: u64 = stacks.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert!(stage3 > 0, "{own}");
    assert_eq!(counted + doc["lost"].as_u64().unwrap(), stage3, "{out}");
    assert_eq!(doc["lost"], 0, "{out}");
    // ... and the first frame outside hakmem is the one function that asks.
    for s in stacks {
        let frames = s["frames"].as_array().unwrap();
        assert!(in_hakmem(&frames[0]), "{s}");
        let caller = frames
            .iter()
            .find(|f| !in_hakmem(f))
            .expect("a frame outside hakmem");
        assert_eq!(caller["symbol"], "make_buffers", "{s}");
        assert!(
            caller["module"].as_str().unwrap().ends_with("/known"),
            "{s}"
        );
    }
    // Folded, for flame graph tools: command;...;make_buffers;...;[ss_acquire] COUNT.
    let (out, _, _) = stacks_of(
        &exe,
        None,
        &["--probe", "ss_acquire", "-a", "stage=3", "--folded"],
    );
    let mut total = 0;
    for line in out.lines() {
        let (stack, n) = line.rsplit_once(' ').unwrap();
        assert!(stack.starts_with("known;"), "{line}");
        assert!(stack.contains(";make_buffers;"), "{line}");
        assert!(stack.ends_with(";[ss_acquire]"), "{line}");
        total += n.parse::<u64>().unwrap();
    }
    assert_eq!(total, stage3, "{out}");
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

/// Every Stage 3 acquisition the program made, by its own tally.
fn stage3_of(own: &Value) -> u64 {
    own["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stage3"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_library_rebuilt_under_a_running_process_is_still_attached_and_symbolized() {
    if !need_bpf("a_library_rebuilt") {
        return;
    }
    // What `cargo build` or a package upgrade does to a process already
    // running: its library's path now names another file, and maps reads
    // "/PATH (deleted)". hakctl attaches to the file the process maps and
    // symbolizes against it, not against what the path names now.
    let exe = gcc_program("known", KNOWN);
    let lib = scratch_dir("rebuilt").join("libhakmem.so");
    std::fs::copy(release_lib(), &lib).unwrap();
    let (out, err, own) = stacks_after(
        &exe,
        None,
        &["--probe", "ss_acquire", "-a", "stage=3", "-j"],
        &lib,
        |lib| {
            std::fs::remove_file(lib).unwrap();
            std::fs::write(lib, b"not the library the process maps").unwrap();
        },
    );
    let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let counted: u64 = doc["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["count"].as_u64().unwrap())
        .sum();
    assert!(stage3_of(&own) > 0, "{own}");
    assert_eq!(counted, stage3_of(&own), "{out}");
    for s in doc["stacks"].as_array().unwrap() {
        let frames = s["frames"].as_array().unwrap();
        assert!(in_hakmem(&frames[0]), "{s}");
        assert!(
            frames[0]["symbol"].as_str().unwrap().contains("ss_acquire"),
            "the innermost frame symbolized against the mapped library: {s}"
        );
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
    let _ = std::fs::remove_dir_all(lib.parent().unwrap());
}

#[test]
fn in_its_own_pid_namespace_hakctl_names_processes_by_the_ids_it_sees() {
    if !need_bpf("pid_namespace") {
        return;
    }
    // A container without the host's pid namespace: hakctl, its /proc and
    // the target's pid are the container's; the kernel's plain ids are the
    // host's. Before, `stacks` found none of its target's events ("stacks":
    // []) and `watch --all` read every row as exited.
    let dir = scratch_dir("pidns");
    // The target allocates once both hakctls said they are attached (told
    // by a file), and lives a second more; hakctl starts once it maps the
    // library.
    let script = format!(
        "import os, time\nwhile not os.path.exists('{go}'): time.sleep(0.02)\n\
         d = {{i: [str(i)] * 4 for i in range(300000)}}; time.sleep(1)",
        go = dir.join("go").display()
    );
    let inside = format!(
        "LD_PRELOAD={lib} {py} -c \"$SCRIPT\" & target=$!; \
         until grep -q libhakmem /proc/$target/maps; do sleep 0.02; done; \
         {ctl} watch --all --lib {lib} 0.5 8 --json > {dir}/watch.json 2> {dir}/watch.err & \
         {ctl} stacks $target --json > {dir}/stacks.json 2> {dir}/stacks.err & \
         until grep -q attached {dir}/watch.err && grep -q 'recording stacks' {dir}/stacks.err; \
         do sleep 0.05; done; touch {dir}/go; wait",
        lib = release_lib().display(),
        py = python().display(),
        ctl = env!("CARGO_BIN_EXE_hakctl"),
        dir = dir.display(),
    );
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &inside])
        .env("SCRIPT", &script)
        .output()
        .expect("unshare");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let stacks: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stacks.json")).unwrap())
            .unwrap_or_else(|e| panic!("{e}: {said}"));
    assert_eq!(
        stacks["pid"], 2,
        "the target is pid 2 in the namespace: {said}"
    );
    assert!(
        !stacks["stacks"].as_array().unwrap().is_empty(),
        "no stacks in the namespace: {stacks}"
    );
    let watch = std::fs::read_to_string(dir.join("watch.json")).unwrap();
    let seen = watch
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .flat_map(|d| d["processes"].as_array().cloned().unwrap_or_default())
        .any(|p| p["pid"] == 2 && p["command"] == "python3" && p["events"].as_u64() > Some(0));
    assert!(seen, "no row for pid 2 with its counts: {watch}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stacks_of_python_reach_its_c_frames() {
    if !need_bpf("stacks_of_python") {
        return;
    }
    let script = "import sys; sys.stdin.readline(); d = {i: [str(i)] * 4 for i in range(300000)}";
    let (out, _, _) = stacks_of(&python(), Some(script), &["-j"]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    let stacks = doc["stacks"].as_array().unwrap();
    assert!(!stacks.is_empty(), "{out}");
    // The top stack goes from hakmem into CPython's own C functions, by name.
    let top = stacks[0]["frames"].as_array().unwrap();
    let caller = top
        .iter()
        .find(|f| !in_hakmem(f))
        .unwrap_or_else(|| panic!("{}", stacks[0]));
    assert!(
        caller["module"].as_str().unwrap().contains("python"),
        "{}",
        stacks[0]
    );
    assert_ne!(caller["symbol"], "[unknown]", "{}", stacks[0]);
}

/// A port on loopback nobody listens on (the moment it is asked: for
/// Prometheus, which cannot say which port it took).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The port `hakctl serve --listen 0` took, from its "serving http://HOST:PORT/metrics" line.
fn serving_port(said: &str) -> u16 {
    let url = said
        .split("serving http://")
        .nth(1)
        .unwrap_or_else(|| panic!("{said}"));
    let host_port = url.split('/').next().unwrap();
    host_port.rsplit(':').next().unwrap().parse().unwrap()
}

/// GET `path` from 127.0.0.1:`port` with `accept`: (status line, body).
fn http_get(port: u16, path: &str, accept: &str) -> std::io::Result<(String, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n\r\n"
    )?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// A Prometheus server from Debian's package, on loopback, scraping
/// 127.0.0.1:`target` every second; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("hakctl-prom-{}-{target}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: hakctl\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package `prometheus`, installed by scripts/setup.sh)");
        Prometheus { child, port, dir }
    }

    /// The result vector of an instant query (empty until Prometheus answers).
    fn query(&self, q: &str) -> Vec<Value> {
        self.raw_query(q)["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn raw_query(&self, q: &str) -> Value {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        match http_get(self.port, &format!("/api/v1/query?query={encoded}"), "*/*") {
            Ok((_, body)) => serde_json::from_str(&body).unwrap_or(Value::String(body)),
            Err(e) => Value::String(e.to_string()),
        }
    }

    /// Waits up to 60 s for `q` to give a series that `ok` accepts.
    fn wait_for(&self, q: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let start = std::time::Instant::now();
        loop {
            if let Some(found) = self.query(q).into_iter().find(|s| ok(s)) {
                return found;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "Prometheus never answered {q} as expected: {}; its targets: {:?}; its log: {}",
                self.raw_query(q),
                http_get(self.port, "/api/v1/targets", "*/*"),
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn value(series: &Value) -> f64 {
    series["value"][1].as_str().unwrap().parse().unwrap()
}

#[test]
fn prometheus_scrapes_serve_and_reads_back_the_programs_own_counts() {
    if !need_bpf("prometheus_scrapes_serve") {
        return;
    }
    use std::io::Write;
    let dir = scratch_dir("serve");
    let stats = dir.join("known.stats");
    let exe = gcc_program("known", KNOWN);
    let mut target = preloaded(&exe, &[], &stats)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = target.id().to_string();
    let ctl = Background::attached(&["serve", "-p", &pid, "--listen", "0"]);
    let port = serving_port(&ctl.said);
    let prometheus = Prometheus::start(port);
    // The program allocates once hakctl is attached, prints its line, and
    // waits on stdin: nothing more happens until the test says so.
    target.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(target.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Everything the program allocates is done now: wait for a scrape
    // after this moment (one scrape stores every series at one timestamp),
    // then read the Stage 3 count Prometheus stored.
    let done = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    prometheus.wait_for("max(timestamp(hakmem_processes))", |s| value(s) > done);
    let read_back = prometheus.wait_for("sum(hakmem_slab_acquires_total{stage=\"stage3\"})", |s| {
        value(s) > 0.0
    });
    let rss = prometheus.wait_for("hakmem_rss_bytes", |s| value(s) > 1e6);
    assert_eq!(rss["metric"]["job"], "hakctl", "{rss}");
    prometheus.wait_for(
        "histogram_quantile(0.5, sum by (le) (hakmem_slab_acquire_seconds_bucket{stage=\"stage3\"}))",
        |s| value(s) > 0.0 && value(s) < 1.0,
    );
    // The exposition passes Prometheus's own checker, in its classic text form.
    let (status, body) = http_get(port, "/metrics", "text/plain").unwrap();
    assert!(status.contains("200"), "{status}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let (status, _) = http_get(port, "/nowhere", "*/*").unwrap();
    assert!(status.contains("404"), "{status}");
    drop(target.stdin.take());
    assert!(target.wait().unwrap().success());
    let (_, err) = ctl.finish();
    assert!(err.contains("exited; detached"), "{err}");
    // What Prometheus read equals the program's own tally.
    let own = own_tally(&stats);
    let stage3: u64 = own["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stage3"].as_u64().unwrap())
        .sum();
    assert_eq!(value(&read_back), stage3 as f64, "{own}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

#[test]
fn serve_all_labels_each_process_and_refuses_a_port_in_use() {
    if !need_bpf("serve_all") {
        return;
    }
    let lib = release_lib();
    let ctl = Background::attached(&[
        "serve",
        "--all",
        "--lib",
        lib.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let port = serving_port(&ctl.said);
    // A second one on the same port says why it cannot start.
    let out = hakctl()
        .args([
            "serve",
            "--all",
            "--lib",
            lib.to_str().unwrap(),
            "--listen",
            &port.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the port is in use"), "{err}");
    // A process started after hakctl appears with its pid and command.
    let dir = scratch_dir("serve-all");
    let mut py = preloaded(
        &python(),
        &[
            "-c",
            "import sys; x = [str(i) for i in range(100000)]; sys.stdin.readline()",
        ],
        &dir.join("py.stats"),
    )
    .spawn()
    .unwrap();
    let pid = py.id().to_string();
    let start = std::time::Instant::now();
    let body = loop {
        let (_, body) = http_get(port, "/metrics", "application/openmetrics-text").unwrap();
        if body.contains(&format!("pid=\"{pid}\"")) && body.contains("hakmem_rss_bytes{") {
            break body;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.ends_with("# EOF\n"), "OpenMetrics when asked for it");
    let series = body
        .lines()
        .find(|l| {
            l.starts_with("hakmem_probe_events_total{") && l.contains(&format!("pid=\"{pid}\""))
        })
        .unwrap_or_else(|| panic!("{body}"));
    assert!(series.contains("command=\"python3"), "{series}");
    drop(py.stdin.take());
    assert!(py.wait().unwrap().success());
    let (_, err) = ctl.interrupt();
    assert!(err.contains("interrupted; detached"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `hakctl ARGS` as user nobody with exactly the capabilities `caps` (setpriv, util-linux).
fn as_nobody_with(caps: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if !caps.is_empty() {
        cmd.arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"));
    }
    cmd.arg(env!("CARGO_BIN_EXE_hakctl")).args(args);
    cmd
}

#[test]
fn least_privilege_capabilities_instead_of_root() {
    if !need_bpf("least_privilege") {
        return;
    }
    use std::io::Write;
    // Files nobody can read: the uprobe is placed on the library file, which
    // hakctl opens as the user it runs as.
    let dir = scratch_dir("caps");
    let lib = dir.join("libhakmem.so");
    std::fs::copy(release_lib(), &lib).unwrap();
    let exe = gcc_program("known", KNOWN);
    // The target runs as root: reading it needs CAP_SYS_PTRACE.
    let mut target = Command::new(&exe)
        .env("LD_PRELOAD", &lib)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = target.id().to_string();
    // CAP_SYS_ADMIN too: this kernel (6.18) refuses uprobe perf events to
    // CAP_PERFMON without it (docs/hakctl.md, "Privileges").
    let all = "+bpf,+perfmon,+sys_admin,+sys_ptrace";

    // Without CAP_SYS_PTRACE: a refusal that names it.
    let out = as_nobody_with("+bpf,+perfmon,+sys_admin", &["stacks", &pid, "-d", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("CAP_SYS_PTRACE"),
        "{err}"
    );
    // Without CAP_PERFMON: a refusal that names what is missing.
    let out = as_nobody_with("+bpf,+sys_ptrace", &["stacks", &pid, "-d", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_BPF and CAP_PERFMON"), "{err}");
    // CAP_BPF and CAP_PERFMON where the kernel wants CAP_SYS_ADMIN for uprobes: named.
    let lib_arg = lib.to_str().unwrap();
    let out = as_nobody_with(
        "+bpf,+perfmon,+sys_ptrace",
        &["watch", "--all", "--lib", lib_arg, "1", "1"],
    )
    .output()
    .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("wants CAP_SYS_ADMIN for uprobe events"),
            "{err}"
        );
    }

    // With the four: system-wide and per-process commands work.
    let out = as_nobody_with(
        all,
        &[
            "watch",
            "--all",
            "--lib",
            lib.to_str().unwrap(),
            "-j",
            "0.3",
            "2",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stacks = as_nobody_with(
        all,
        &[
            "stacks",
            &pid,
            "--probe",
            "ss_acquire",
            "-a",
            "stage=3",
            "-j",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut said = String::new();
    BufReader::new(stacks.stderr.as_mut().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert!(said.contains("attached to"), "{said}");
    target.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(target.wait().unwrap().success());
    let out = stacks.wait_with_output().unwrap();
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let frames = doc["stacks"][0]["frames"]
        .as_array()
        .unwrap_or_else(|| panic!("{doc}"));
    assert!(
        frames.iter().any(|f| f["symbol"] == "make_buffers"),
        "{doc}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}
