//! hakctl against real processes with real eBPF. As root with BPF usable these
//! always run; where BPF is unusable they are skipped, except under
//! HAKMEM_REQUIRE_BPF=1 (CI), where they fail.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Target {
    child: Child,
    pid: i32,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

fn start_scenario(name: &str, env: &[(&str, &str)], wait_attach: bool) -> Target {
    let mut cmd = Command::new(built("hakmem-scenario"));
    cmd.arg(name)
        .env("HAKMEM_STATS", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if wait_attach {
        cmd.arg("--wait-attach");
    }
    let mut child = cmd.spawn().expect("start hakmem-scenario");
    let pid = child.id() as i32;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    if wait_attach {
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("waiting for a tracer"), "{first}");
    } else {
        std::thread::sleep(Duration::from_millis(200));
    }
    Target { child, pid, lines }
}

/// hakctl attached to a scenario, and the scenario's tally.
struct Attached {
    ctl: Background,
    tally: String,
}

impl Attached {
    /// Starts `hakctl ARGS` on a scenario started with `--wait-attach` and
    /// lets the workload begin once every probe's semaphore is raised and
    /// hakctl says it is attached (every program linked); waits for the
    /// scenario's tally.
    fn start(t: &mut Target, args: &[&str]) -> Attached {
        use std::io::Write;
        let ctl = Background::attached(args);
        let enabled = t.lines.next().unwrap().unwrap();
        assert!(enabled.starts_with("every probe is enabled"), "{enabled}");
        t.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let tally = t
            .lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.strip_prefix("tally: ").map(str::to_string))
            })
            .expect("the scenario printed its tally");
        Attached { ctl, tally }
    }

    /// Waits for hakctl: its output and its whole stderr.
    fn finish(self) -> (Output, String) {
        let (status, stdout, stderr) = self.ctl.wait();
        let out = Output {
            status,
            stdout: stdout.into_bytes(),
            stderr: Vec::new(),
        };
        (out, stderr)
    }
}

/// Runs a scenario under `hakctl stage-stats --json` and returns (hakctl's counts, the target's own tally).
fn traced(name: &str, env: &[(&str, &str)]) -> (Value, Value) {
    let mut t = start_scenario(name, env, true);
    let pid = t.pid.to_string();
    let a = Attached::start(&mut t, &["stage-stats", &pid, "--json", "--drains"]);
    let tally_line = a.tally.clone();
    let status = t.child.wait().unwrap();
    let (out, stderr) = a.finish();
    assert!(out.status.success(), "hakctl failed: {stderr}");
    assert!(status.success(), "scenario {name} failed: {status:?}");
    assert!(
        stderr.contains("exited"),
        "hakctl says the target exited: {stderr}"
    );
    let tally: Value = serde_json::from_str(&tally_line).unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).expect("stage-stats --json output");
    assert_eq!(report["schema"], "hakctl/1");
    assert_eq!(report["target_exited"], true);
    (report["counts"].clone(), tally)
}

#[test]
fn counts_equal_the_allocators_own_tally_for_every_probe() {
    if !need_bpf("counts_equal_the_allocators_own_tally_for_every_probe") {
        return;
    }
    let runs: &[(&str, &[(&str, &str)])] = &[
        ("mixed", &[]),
        ("legacy", &[("HAKMEM_SS_MAX", "1")]),
        ("ace", &[("HAKMEM_ACE_MAX_BYTES", "16384")]),
        ("ace", &[("HAKMEM_ACE_MAX_SEGMENTS", "1")]),
        ("ace-mapfail", &[("HAKMEM_OS_LIMIT_MB", "16")]),
        ("burst", &[]),
        ("large-cache", &[]),
    ];
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    for (name, env) in runs {
        let (counts, tally) = traced(name, env);
        assert_eq!(
            counts, tally,
            "hakctl's counts differ from the allocator's tally for scenario {name} {env:?}"
        );
        for (probe, n) in tally["probes"].as_object().unwrap() {
            *seen.entry(probe.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    for (probe, n) in &seen {
        assert!(
            *n > 0,
            "probe {probe} never fired across the scenarios: {seen:?}"
        );
    }
    assert_eq!(seen.len(), hakmem_common::PROBE_COUNT);
}

/// (probe, "yes"/"no") for every probe of the process.
fn semaphores(pid: i32) -> Vec<(String, String)> {
    let out = hakctl()
        .args(["probes", &pid.to_string()])
        .output()
        .unwrap();
    stdout_of_success(&out)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("PROBE"))
        .map(|l| {
            let mut cols = l.split_whitespace();
            let name = cols.next().unwrap_or("").to_string();
            (name, cols.nth(2).unwrap_or("").to_string())
        })
        .collect()
}

fn all_down(pid: i32) -> bool {
    semaphores(pid).iter().all(|(_, s)| s == "no")
}

#[test]
fn sigkill_drops_the_semaphores_and_the_target_runs_on() {
    if !need_bpf("sigkill_drops_the_semaphores_and_the_target_runs_on") {
        return;
    }
    let mut t = start_scenario("forever", &[], false);
    assert!(all_down(t.pid), "nobody listens yet");
    let mut watch = hakctl()
        .args(["watch", &t.pid.to_string(), "--json", "--interval", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut watch_lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&watch_lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["kind"], "watch");
    // Without --drains, every semaphore but the drain probes' is raised.
    for (probe, state) in semaphores(t.pid) {
        let drain = probe == "tls_drain" || probe == "remote_drain";
        assert_eq!(
            state,
            if drain { "no" } else { "yes" },
            "{probe} while watched"
        );
    }
    // SAFETY: killing our own child.
    unsafe { libc::kill(watch.id() as i32, libc::SIGKILL) };
    let _ = watch.wait();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !all_down(t.pid) {
        assert!(
            Instant::now() < deadline,
            "semaphores still raised after SIGKILL: {:?}",
            semaphores(t.pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(t.child.try_wait().unwrap().is_none(), "the target runs on");
    let _ = t.child.kill();
    let _ = t.child.wait();
}

#[test]
fn watch_with_p_interval_and_count_prints_count_documents_and_stops() {
    if !need_bpf("watch_with_p_interval_and_count_prints_count_documents_and_stops") {
        return;
    }
    let mut t = start_scenario("forever", &[], false);
    let started = Instant::now();
    let out = hakctl()
        .args(["watch", "-p", &t.pid.to_string(), "0.2", "3", "-j"])
        .output()
        .unwrap();
    let docs = json_lines(&out);
    assert_eq!(docs.len(), 3, "{docs:?}");
    assert!(docs
        .iter()
        .all(|d| d["kind"] == "watch" && d["pid"] == t.pid));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(t.child.try_wait().unwrap().is_none(), "the target runs on");
    let _ = t.child.kill();
    let _ = t.child.wait();
}

#[test]
fn trace_and_probes_speak_json_with_wall_clock_times() {
    if !need_bpf("trace_and_probes_speak_json_with_wall_clock_times") {
        return;
    }
    let mut t = start_scenario("forever", &[], false);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    let out = hakctl()
        .args([
            "trace",
            "-p",
            &t.pid.to_string(),
            "--probe",
            "tls_drain",
            "-d",
            "1",
            "-j",
        ])
        .output()
        .unwrap();
    let after = now();
    let events = json_lines(&out);
    assert!(
        !events.is_empty(),
        "the scenario drains its caches all the time"
    );
    for e in &events {
        assert_eq!(
            (e["kind"].as_str(), e["probe"].as_str()),
            (Some("event"), Some("tls_drain"))
        );
        assert_eq!(e["pid"], t.pid, "{e}");
        let time = e["time_unix_s"].as_f64().unwrap();
        assert!(
            time > before - 0.5 && time < after + 0.5,
            "{time} not in [{before}, {after}]"
        );
        assert!(e["args"]["batch"].as_u64().unwrap() > 0, "{e}");
        assert!(e["args"]["class"].as_u64().unwrap() < 8, "{e}");
    }
    let out = hakctl()
        .args(["probes", &t.pid.to_string(), "--json"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_str(&stdout_of_success(&out)).unwrap();
    assert_eq!(doc["kind"], "probes");
    let probes = doc["objects"][0]["probes"].as_array().unwrap();
    assert_eq!(probes.len(), hakmem_common::PROBE_COUNT, "{doc}");
    for p in probes {
        assert_eq!(
            p["sites"].as_array().unwrap().len(),
            1,
            "one site per probe: {p}"
        );
        assert_eq!(p["semaphore_count"], 0, "nobody attached now: {p}");
    }
    let _ = t.child.kill();
    let _ = t.child.wait();
}

#[test]
fn run_preloads_and_watches_from_the_first_allocation() {
    if !need_bpf("run_preloads_and_watches_from_the_first_allocation") {
        return;
    }
    let out = hakctl()
        .env("HAKMEM_LIB", release_lib())
        .args([
            "run",
            "--json",
            "--interval",
            "0.5",
            "--",
            "sh",
            "-c",
            "sleep 1.2; exec python3 -c 'import time; x = [bytes(i % 900) for i in range(200000)]; time.sleep(1.2)'",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let last: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a JSON line"),
    )
    .unwrap();
    assert_eq!(last["target_exited"], true);
    assert!(
        last["counts"]["probes"]["ss_acquire"].as_u64().unwrap() > 0,
        "{last}"
    );
    // From the first allocation: the first slabs of the process come from Stage 3 (a new SuperSlab).
    assert!(
        last["counts"]["probes"]["ss_map"].as_u64().unwrap() >= 1,
        "{last}"
    );
    // The memory levels follow the process across its execs (the shell's,
    // read at a refresh, then the interpreter's): read from the new image's
    // hakmem, not at the shell's addresses.
    let in_use: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|d| d["memory"]["in_use_bytes"].as_u64())
        .collect();
    assert!(
        in_use.iter().any(|&b| b > 1 << 20),
        "no refresh read the interpreter's memory: {in_use:?}"
    );
}

#[test]
fn run_preloads_a_library_under_a_path_ld_so_would_split_and_says_when_nothing_was_watched() {
    if !need_bpf("run_preloads_a_library_under_a_path_ld_so_would_split") {
        return;
    }
    // LD_PRELOAD splits at spaces and colons with no escape: a checkout in
    // "~/my projects" would preload nothing, and run watched nothing, silently.
    let dir = scratch_dir("run path").join("my build:release");
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libhakmem.so");
    std::fs::copy(release_lib(), &lib).unwrap();
    let run = |args: &[&str]| {
        hakctl()
            .env("HAKMEM_LIB", &lib)
            .args(["run", "--json", "--interval", "0.2", "--"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "python3",
        "-c",
        "x = [bytes(i % 900) for i in range(100000)]",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let docs = json_lines(&out);
    let last = docs
        .last()
        .unwrap_or_else(|| panic!("no document; hakctl said: {stderr}"));
    assert_eq!(last["target_exited"], true);
    assert!(
        last["counts"]["probes"]["ss_acquire"].as_u64().unwrap() > 0,
        "{last}"
    );
    assert!(!stderr.contains("nothing was watched"), "{stderr}");
    // A program that ignores the preload (ldconfig is statically linked) is
    // named, not passed over.
    let out = run(&["/sbin/ldconfig", "--version"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing was watched"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

fn fails_with(out: Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
}

#[test]
fn clear_errors_for_bad_targets() {
    fails_with(
        hakctl()
            .args(["stage-stats", "2147483000", "--duration", "1"])
            .output()
            .unwrap(),
        "no such process: 2147483000",
    );
    fails_with(
        hakctl().args(["probes", "2147483000"]).output().unwrap(),
        "no such process",
    );
    fails_with(
        hakctl().args(["mem", "2147483000"]).output().unwrap(),
        "no such process: 2147483000",
    );
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    fails_with(
        hakctl()
            .args(["watch", &sleeper.id().to_string()])
            .output()
            .unwrap(),
        "no hakmem probes in process",
    );
    fails_with(
        hakctl()
            .args(["mem", &sleeper.id().to_string(), "--json"])
            .output()
            .unwrap(),
        "no hakmem memory levels in process",
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // Exited, not yet reaped: said so, not "no hakmem probes".
    let mut zombie = Command::new("true").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for cmd in ["watch", "mem", "stacks"] {
        fails_with(
            hakctl()
                .args([cmd, &zombie.id().to_string()])
                .output()
                .unwrap(),
            "has exited (its parent has not reaped it yet)",
        );
    }
    let _ = zombie.wait();
    fails_with(
        hakctl().args(["probes", "/bin/ls"]).output().unwrap(),
        "no hakmem probes in /bin/ls",
    );
    fails_with(
        hakctl()
            .args(["probes", "/nonexistent/file"])
            .output()
            .unwrap(),
        "cannot read /nonexistent/file",
    );
    fails_with(
        hakctl()
            .args(["trace", "1", "--probe", "nope"])
            .output()
            .unwrap(),
        "unknown probe \"nope\"",
    );
}

#[test]
fn a_corrupt_note_is_an_error_not_a_panic() {
    let mut data = std::fs::read(built("hakmem-scenario")).unwrap();
    // Every stapsdt note: make its descriptor size run past the section.
    let owner = b"stapsdt\0";
    let mut hits = 0;
    let mut i = 0;
    while let Some(pos) = data[i..].windows(owner.len()).position(|w| w == owner) {
        let at = i + pos;
        if at >= 12
            && data[at - 4..at] == 3u32.to_le_bytes()
            && data[at - 12..at - 8] == 8u32.to_le_bytes()
        {
            data[at - 8..at - 4].copy_from_slice(&0x7fff_ff00u32.to_le_bytes());
            hits += 1;
        }
        i = at + owner.len();
    }
    assert!(hits > 0, "found the notes");
    let path = std::env::temp_dir().join(format!("hakctl-corrupt-{}", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let out = hakctl().arg("probes").arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    fails_with(out, "corrupt .note.stapsdt");
}

#[test]
fn a_note_outside_every_segment_is_skipped_not_fatal() {
    // A note left by code the linker dropped points near 0, which in a
    // non-PIE file lies in no segment: that site is skipped with a warning,
    // the others are listed (before, the whole file was refused).
    let mut data = std::fs::read(built("hakmem-scenario")).unwrap();
    let owner = b"stapsdt\0";
    let at = data
        .windows(owner.len() + 32)
        .position(|w| w.starts_with(owner) && w[owner.len() + 24..].starts_with(b"hakmem\0"))
        .expect("a hakmem note");
    let pc = at + owner.len();
    data[pc..pc + 8].copy_from_slice(&0x7fff_0000_0000u64.to_le_bytes());
    let path = std::env::temp_dir().join(format!("hakctl-dropped-{}", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let out = hakctl().arg("probes").arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipping probe hakmem:") && stderr.contains("0x7fff00000000"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ss_acquire"));
    // Every site so: an error naming the notes, not a quiet "no probes".
    let mut all = std::fs::read(built("hakmem-scenario")).unwrap();
    let mut moved = 0;
    let mut i = 0;
    while let Some(pos) = all[i..]
        .windows(owner.len() + 32)
        .position(|w| w.starts_with(owner) && w[owner.len() + 24..].starts_with(b"hakmem\0"))
    {
        let pc = i + pos + owner.len();
        all[pc..pc + 8].copy_from_slice(&0x7fff_0000_0000u64.to_le_bytes());
        moved += 1;
        i = pc + 8;
    }
    assert!(moved > 10, "{moved} notes");
    std::fs::write(&path, &all).unwrap();
    let out = hakctl().arg("probes").arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    fails_with(out, "every hakmem probe site lies outside the code");
}

#[test]
fn side_by_side_with_bpftrace_and_with_another_hakctl() {
    if !need_bpf("side_by_side_with_bpftrace_and_with_another_hakctl") {
        return;
    }
    let mut t = start_scenario("forever", &[], false);
    let pid = t.pid.to_string();
    let exe = built("hakmem-scenario");
    let probe = format!(
        "usdt:{}:hakmem:tls_drain {{ @drains = count(); }} interval:s:3 {{ exit(); }}",
        exe.display()
    );
    let bpftrace = Command::new("bpftrace")
        .args(["-p", &pid, "-e", &probe])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let bpftrace = match bpftrace {
        Ok(b) => b,
        Err(e) => panic!("bpftrace is needed for this test (scripts/setup.sh installs it): {e}"),
    };
    std::thread::sleep(Duration::from_millis(1000));
    let a = hakctl()
        .args(["stage-stats", &pid, "--duration", "1", "--json", "--drains"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = hakctl()
        .args(["stage-stats", &pid, "--duration", "1", "--json", "--drains"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for out in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v["counts"]["probes"]["tls_drain"].as_u64().unwrap() > 0,
            "{v}"
        );
    }
    let bt = bpftrace.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&bt.stdout);
    let drains: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("@drains: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        drains > 0,
        "bpftrace counted beside hakctl: {text}\n{}",
        String::from_utf8_lossy(&bt.stderr)
    );
    assert!(t.child.try_wait().unwrap().is_none(), "the target runs on");
    assert!(all_down(t.pid), "all tracers gone: semaphores back to 0");
    let _ = t.child.kill();
    let _ = t.child.wait();
}

#[test]
fn an_ordinary_user_gets_a_clear_refusal() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // needs root to switch to an ordinary user
    }
    let mut t = start_scenario("forever", &[], false);
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_hakctl"))
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
    };
    let pid = t.pid.to_string();
    fails_with(
        as_nobody(&["stage-stats", &pid, "--duration", "1"]),
        "not enough privilege",
    );
    fails_with(as_nobody(&["probes", &pid]), "permission denied");
    assert!(
        t.child.try_wait().unwrap().is_none(),
        "the target is unharmed"
    );
    let _ = t.child.kill();
    let _ = t.child.wait();
}

/// What the pane's shell prints when the program it ran has exited.
const ENDED: &str = "PROGRAM-ENDED";

/// A tmux server of its own (a socket per test: tests run in parallel), one pane.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(width: u16, height: u16) -> Tmux {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Tmux {
            socket: format!("hakctl-test-{}-{n}", std::process::id()),
        };
        let size = [width.to_string(), height.to_string()];
        t.ok(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            &size[0],
            "-y",
            &size[1],
        ]);
        t
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is needed for this test (scripts/setup.sh installs it)")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd` in the pane (replacing what ran there), under a shell
    /// that stays after it (a dead pane's cursor state is tmux's, not the
    /// program's: tmux writes its "Pane is dead" line there).
    fn respawn(&self, cmd: &str) {
        self.ok(&[
            "respawn-pane",
            "-k",
            &format!("{cmd}; echo {ENDED}; exec sleep 600"),
        ]);
    }

    /// The pid of the program the pane's shell runs.
    fn program_pid(&self) -> i32 {
        let shell = self.show("#{pane_pid}");
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the pane's shell {shell} runs nothing"))
    }

    fn screen(&self) -> String {
        self.ok(&["capture-pane", "-p"])
    }

    fn show(&self, format: &str) -> String {
        self.ok(&["display-message", "-p", format])
            .trim()
            .to_string()
    }

    /// Waits until the pane shows every one of `parts`; the screen then.
    fn wait_for(&self, parts: &[&str]) -> String {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.screen();
            if parts.iter().all(|p| s.contains(p)) {
                return s;
            }
            assert!(
                Instant::now() < until,
                "{parts:?} never shown; the pane:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend(keys);
        self.ok(&args);
    }

    /// Waits until the pane's program exited; the terminal's state then:
    /// (alternate screen on, cursor visible).
    fn after_exit(&self) -> (bool, bool) {
        self.wait_for(&[ENDED]);
        (
            self.show("#{alternate_on}") == "1",
            self.show("#{cursor_flag}") == "1",
        )
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn fits(screen: &str, width: usize) {
    for line in screen.lines() {
        assert!(
            line.chars().count() <= width,
            "a line wider than {width}: {line:?}"
        );
    }
}

#[test]
fn the_system_wide_table_fits_80x24_names_a_rust_binary_by_path_sorts_and_quits() {
    if !need_bpf("the_system_wide_table") {
        return;
    }
    // hakmem-scenario carries hakmem as its Rust allocator: named by path.
    let mut t = start_scenario("forever", &[], false);
    let tmux = Tmux::start(80, 24);
    let watch = format!(
        "{} watch --all --lib {}",
        env!("CARGO_BIN_EXE_hakctl"),
        built("hakmem-scenario").display()
    );
    tmux.respawn(&watch);
    let pid = t.pid.to_string();
    let s = tmux.wait_for(&[
        "hakctl watch --all",
        &pid,
        "hakmem-scenari",
        "(by events/s)",
    ]);
    assert_eq!(s.lines().count(), 24, "{s}");
    fits(&s, 80);
    assert_eq!(tmux.show("#{alternate_on}"), "1");
    tmux.keys(&["s"]);
    tmux.wait_for(&["(by events)  p pause"]);
    tmux.keys(&["q"]);
    assert_eq!(
        tmux.after_exit(),
        (false, true),
        "the terminal is given back"
    );
    let s = tmux.screen();
    assert!(s.contains("sorted by events") && s.contains(&pid), "{s}");
    let _ = t.child.kill();
    let _ = t.child.wait();
}

#[test]
fn the_full_screen_view_fits_80x24_takes_keys_follows_resizes_and_gives_the_terminal_back() {
    if !need_bpf("the_full_screen_view") {
        return;
    }
    let mut t = start_scenario("forever", &[], false);
    let tmux = Tmux::start(80, 24);
    let watch = format!("{} watch {}", env!("CARGO_BIN_EXE_hakctl"), t.pid);
    tmux.respawn(&watch);
    let s = tmux.wait_for(&["hakctl watch pid", "┌ Stages", "q quit", "all: "]);
    assert_eq!(s.lines().count(), 24, "{s}");
    fits(&s, 80);
    assert_eq!(tmux.show("#{alternate_on} #{cursor_flag}"), "1 0");
    // Keys: next pane, pause, the last interval, a pane by its digit, sort, histograms.
    tmux.keys(&["Tab"]);
    tmux.wait_for(&["┌ Probes", "ss_acquire", "RATE/s"]);
    tmux.keys(&["p"]);
    tmux.wait_for(&["PAUSED"]);
    let paused = tmux.screen();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(tmux.screen(), paused, "a paused view stays as it was");
    tmux.keys(&["p", "i"]);
    tmux.wait_for(&["last ", "s of ", "i since attach"]);
    tmux.keys(&["s"]);
    tmux.wait_for(&["sort (by count)"]);
    tmux.keys(&["5"]);
    let s = tmux.wait_for(&["┌ Histograms", "acquire stage1 ns", "values up to"]);
    fits(&s, 80);
    tmux.keys(&["4"]);
    tmux.wait_for(&["┌ Memory", "RSS", "OS MEMORY"]);
    // A larger terminal shows every pane at once.
    tmux.ok(&["resize-window", "-x", "200", "-y", "60"]);
    let s = tmux.wait_for(&[
        "┌ Stages",
        "┌ Probes",
        "┌ Funnel & failures",
        "┌ Histograms",
        "┌ Memory",
    ]);
    assert_eq!(s.lines().count(), 60, "{s}");
    fits(&s, 200);
    tmux.ok(&["resize-window", "-x", "80", "-y", "24"]);
    tmux.wait_for(&["1 Stages|2 Probes"]);
    tmux.keys(&["q"]);
    assert_eq!(
        tmux.after_exit(),
        (false, true),
        "terminal given back after q"
    );
    tmux.wait_for(&["COST", "quit; detached"]);
    // Signals end it the same way: the alternate screen off, the cursor shown.
    for (signal, says) in [
        (libc::SIGTERM, "terminated (SIGTERM)"),
        (libc::SIGHUP, "hung up (SIGHUP)"),
    ] {
        tmux.respawn(&watch);
        tmux.wait_for(&["┌ Stages"]);
        let pid = tmux.program_pid();
        // SAFETY: a signal to the hakctl this test started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        assert_eq!(tmux.after_exit(), (false, true), "after {says}");
        tmux.wait_for(&[says]);
    }
    assert!(t.child.try_wait().unwrap().is_none(), "the target runs on");
    let _ = t.child.kill();
    let _ = t.child.wait();
}

#[test]
fn run_across_an_exec_counts_from_the_first_allocation_exactly_and_keeps_the_output_apart() {
    if !need_bpf("run_across_an_exec") {
        return;
    }
    let exe = c_workload();
    let stats = exe.with_file_name("stats");
    let _ = std::fs::remove_file(&stats);
    // The shell allocates (its own session), then execs the program: hakctl
    // detaches at the exec and attaches again at the program's first allocation.
    let script = format!("echo from-the-shell; exec {}", exe.display());
    let out = hakctl()
        .env("HAKMEM_LIB", release_lib())
        .env("HAKMEM_STATS_FILE", &stats)
        .args([
            "run", "-j", "-i", "0.2", "--drains", "--", "sh", "-c", &script,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // hakctl's stdout holds its JSON documents only; the command's output went to stderr.
    let docs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    for line in ["from-the-shell", "out-of-the-command", "err-of-the-command"] {
        assert!(stderr.contains(line), "{line} not on stderr: {stderr}");
    }
    // Exactly the program's own tally (written by its copy of hakmem at exit).
    let last = docs.last().expect("a document");
    assert_eq!(last["target_exited"], true);
    let own: Value = serde_json::from_str(
        std::fs::read_to_string(&stats)
            .expect("the program's exit tally")
            .lines()
            .last()
            .unwrap()
            .trim_start_matches("hakmem-stats: "),
    )
    .unwrap();
    assert!(
        last["counts"] == own,
        "hakctl's counts {} against the program's own {own}",
        last["counts"]
    );
    assert!(own["probes"]["ss_map"].as_u64().unwrap() >= 1, "{own}");
    assert!(own["probes"]["tls_drain"].as_u64().unwrap() >= 1, "{own}");

    // With -o the output goes to the file, in any mode.
    let log = exe.with_file_name("out.log");
    let out = hakctl()
        .env("HAKMEM_LIB", release_lib())
        .arg("run")
        .arg("-o")
        .arg(&log)
        .args(["-j", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    for line in ["from-the-shell", "out-of-the-command", "err-of-the-command"] {
        assert!(
            text.contains(line),
            "{line} not in {}: {text}",
            log.display()
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains(line));
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

/// `hakctl trace` on the `mixed` scenario with `args`: (its events, its
/// stderr, the scenario's tally).
fn traced_events(args: &[&str]) -> (Vec<Value>, String, Value) {
    let mut t = start_scenario("mixed", &[], true);
    let pid = t.pid.to_string();
    let mut all = vec!["trace", &pid, "--json"];
    all.extend(args);
    let a = Attached::start(&mut t, &all);
    let tally: Value = serde_json::from_str(&a.tally).unwrap();
    assert!(t.child.wait().unwrap().success());
    let (out, stderr) = a.finish();
    assert!(out.status.success(), "{stderr}");
    (json_lines(&out), stderr, tally)
}

#[test]
fn trace_prints_exactly_the_events_the_allocator_counts_and_filters_in_the_kernel() {
    if !need_bpf("trace_prints_exactly_the_events") {
        return;
    }
    // Every probe: as many events of each as the scenario's own tally counts.
    let (events, stderr, tally) = traced_events(&[]);
    assert!(stderr.contains(" 0 dropped"), "{stderr}");
    for (probe, n) in tally["probes"].as_object().unwrap() {
        let printed = events.iter().filter(|e| e["probe"] == *probe).count() as u64;
        assert_eq!(printed, n.as_u64().unwrap(), "{probe}: printed vs counted");
    }
    let stage_events = |events: &[Value], class: u64, stage: u64| {
        events
            .iter()
            .filter(|e| e["args"]["class"] == class && e["args"]["stage"] == stage)
            .count() as u64
    };
    let stage2 = |tally: &Value| tally["classes"][7]["stage2"].as_u64().unwrap();
    assert_eq!(stage_events(&events, 7, 2), stage2(&tally));
    // Class 7's Stage 2 acquisitions only: the others never reach the ring
    // buffer. (The workload's threads make the figures differ between runs.)
    let (events, stderr, tally) =
        traced_events(&["--probe", "ss_acquire", "-c", "7", "-a", "stage=2"]);
    let expected = stage2(&tally);
    assert_eq!(events.len() as u64, expected, "{stderr}");
    assert_eq!(stage_events(&events, 7, 2), expected);
    let kept_out = tally["probes"]["ss_acquire"].as_u64().unwrap() - expected;
    assert!(
        stderr.contains(&format!(", {kept_out} filtered out in the kernel")),
        "{kept_out} expected filtered: {stderr}"
    );
}
