//! Real programs under LD_PRELOAD=libhakmem.so: their output must equal a run
//! without it, and hakmem's HAKMEM_STATS tally must show it served them.
//!
//! Uses the release library (`cargo build --release -p hakmem`, done by
//! `just test`), or the one named by `HAKMEM_LIB`.

mod common;
use common::{lib, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Runs `cmd`, with hakmem preloaded or not. With hakmem, each process of
/// the run appends its tally to a stats file (not stderr, so programs that
/// check their own stderr are undisturbed); returns the output and those tallies.
fn run(cmd: &mut Command, preload: bool) -> (Output, Vec<serde_json::Value>) {
    // In a directory of its own, gone when this returns: a process of the
    // run that outlives it (a daemon a test suite starts) then writes no
    // tally anywhere, instead of leaving a stats file in /tmp.
    let dir = Scratch::new(&format!(
        "stats-{}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let stats = dir.join("stats");
    if preload {
        cmd.env("LD_PRELOAD", lib())
            .env("HAKMEM_STATS_FILE", &stats);
    } else {
        cmd.env_remove("LD_PRELOAD").env_remove("HAKMEM_STATS_FILE");
    }
    cmd.env_remove("HAKMEM_STATS");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} (preload {preload}) failed: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tallies = std::fs::read_to_string(&stats)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("hakmem-stats: "))
        .map(|j| serde_json::from_str(j).expect("stats JSON"))
        .collect();
    (out, tallies)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Slab acquisitions + legacy refills over every process of the run.
fn served(tallies: &[serde_json::Value]) -> u64 {
    assert!(
        !tallies.is_empty(),
        "no process wrote a tally: hakmem was not loaded"
    );
    tallies
        .iter()
        .map(|v| {
            v["probes"]["ss_acquire"].as_u64().unwrap()
                + v["probes"]["legacy_refill"].as_u64().unwrap()
        })
        .sum()
}

/// Runs without and with hakmem; the outputs (filtered by `keep`) must match.
/// Returns the slabs and refills hakmem served and the filtered output.
fn same_output_filtered(make: impl Fn() -> Command, keep: impl Fn(&str) -> bool) -> (u64, String) {
    let (plain, _) = run(&mut make(), false);
    let (hak, tallies) = run(&mut make(), true);
    let filter = |o: &Output| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| keep(l))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let kept = filter(&hak);
    assert_eq!(filter(&plain), kept);
    let n = served(&tallies);
    assert!(n > 0, "hakmem's tally is empty");
    (n, kept)
}

fn same_output(make: impl Fn() -> Command) -> u64 {
    same_output_filtered(make, |_| true).0
}

/// The real interpreter, not a version-manager shim script.
fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Loaded after start-up (`dlopen`, as ctypes does, or as a Rust plugin that
/// uses hakmem as its global allocator would be), the library's thread cache
/// must fit glibc's default static TLS surplus: the cache is initial-exec TLS.
#[test]
fn python_dlopens_the_library_and_allocates_through_it() {
    let out = Command::new(python())
        .args([
            "-c",
            r#"
import ctypes, sys
h = ctypes.CDLL(sys.argv[1])
h.malloc.restype = ctypes.c_void_p
h.malloc.argtypes = [ctypes.c_size_t]
h.free.argtypes = [ctypes.c_void_p]
ps = [h.malloc(n) for n in (16, 1000, 50000, 3 << 20)]
assert all(ps), ps
for p, n in zip(ps, (16, 1000, 50000, 3 << 20)):
    ctypes.memset(p, 7, n)
    h.free(p)
print("ok")
"#,
        ])
        .arg(lib())
        .env_remove("LD_PRELOAD")
        .env_remove("GLIBC_TUNABLES")
        .output()
        .expect("python3");
    assert!(
        out.status.success() && out.stdout == b"ok\n",
        "dlopen of {} failed: {}{}",
        lib().display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Rust library loaded with dlopen that uses hakmem as its global allocator
/// (`examples/plugin`, feature `dynamic-tls`) needs no static TLS: where none
/// is left, libhakmem.so (initial-exec) cannot load and the plugin can, and
/// hakmem serves its blocks on every thread.
/// `examples/plugin`, built (release, its own target directory).
fn plugin() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target/plugin");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(root.join("examples/plugin/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cargo");
    assert!(built.success(), "building examples/plugin failed");
    target.join("release/libhakmem_plugin_example.so")
}

#[test]
fn a_plugin_with_dynamic_tls_loads_where_static_tls_is_full() {
    let plugin = plugin();
    let load = |library: &Path| {
        Command::new(python())
            .args([
                "-c",
                r#"
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
if hasattr(lib, "plugin_churn"):
    lib.plugin_churn.restype = ctypes.c_uint64
    lib.plugin_churn.argtypes = [ctypes.c_uint32]
    print(lib.plugin_churn(3))
else:
    print("loaded")
"#,
            ])
            .arg(library)
            .env_remove("LD_PRELOAD")
            .env("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=0")
            .output()
            .expect("python3")
    };
    let out = load(&lib());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("static TLS"),
        "libhakmem.so should not fit with no static TLS surplus: {out:?}"
    );
    let out = load(&plugin);
    // Four threads, 200 rounds of 6 sizes each.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "4800",
        "the plugin did not load or hakmem did not serve it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two copies of hakmem in one process (libhakmem.so preloaded, a plugin
/// with hakmem inside loaded by the program): `hakctl mem` shows both, each
/// with its own levels.
#[test]
fn hakctl_mem_shows_both_copies_of_hakmem_in_one_process() {
    let plugin = plugin();
    let mut child = Command::new(python())
        .args([
            "-c",
            r#"
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.plugin_churn.restype = ctypes.c_uint64
lib.plugin_churn.argtypes = [ctypes.c_uint32]
print(lib.plugin_churn(1), flush=True)
sys.stdin.readline()
"#,
        ])
        .arg(&plugin)
        .env("LD_PRELOAD", lib())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "2400", "the plugin ran");
    let out = Command::new(common::hakctl())
        .args(["mem", &child.id().to_string(), "--json"])
        .output()
        .expect("hakctl");
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = doc["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(
        paths.iter().any(|p| p.ends_with("libhakmem.so")),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("libhakmem_plugin_example.so")),
        "{paths:?}"
    );
}

/// `malloc_trim(0)`, as Python services call it through ctypes to shrink
/// after a burst, gives hakmem's freed memory back at once: the large cache's
/// mappings and the free segments ACE keeps, which would otherwise wait for
/// later allocator calls (or, ACE's, for reuse).
#[test]
fn malloc_trim_returns_what_a_freed_burst_left_cached() {
    let mut cmd = Command::new(python());
    // Its premise is the default delays: with `HAKMEM_PURGE_DELAY_MS=0` a
    // freed burst goes back at once. The other tests keep the caller's
    // knobs, so `HAKMEM_PURGE_DELAY_MS=0 just real-programs` stresses them.
    for (knob, _) in std::env::vars().filter(|(k, _)| k.starts_with("HAKMEM_")) {
        cmd.env_remove(knob);
    }
    let out = cmd
        .args([
            "-c",
            r#"
import ctypes, os
libc = ctypes.CDLL(None)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
big = [bytearray(1 << 20) for _ in range(48)]
mid = [bytearray(40000) for _ in range(2000)]
peak = rss()
del big, mid
freed = rss()
r = libc.malloc_trim(0)
print(r, peak, freed, rss(), libc.malloc_trim(0))
"#,
        ])
        .env("LD_PRELOAD", lib())
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<i64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        out.status.success() && v.len() == 5,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (first, peak, freed, trimmed, second) = (v[0], v[1], v[2], v[3], v[4]);
    assert_eq!(first, 1, "the first trim returned memory: {text}");
    // 48 MiB of large blocks and 80 MB of mid-size ones were freed but kept.
    assert!(freed > peak - 32, "freeing kept the memory cached: {text}");
    assert!(trimmed < freed - 100, "the trim gave it back: {text}");
    assert_eq!(second, 0, "nothing was left for a second trim: {text}");
}

#[test]
fn python_allocating_heavily() {
    same_output(|| {
        let mut c = Command::new(python());
        c.args([
            "-c",
            r#"
import hashlib, json, random
random.seed(7)
d = {}
for i in range(300000):
    d[str(i)] = [random.random() for _ in range(i % 7)]
s = json.dumps(d, sort_keys=True)
print(len(s), hashlib.sha256(s.encode()).hexdigest())
l = sorted(("x" * (i % 300)) + str(i) for i in range(100000))
print(len(l), hashlib.sha256("".join(l).encode()).hexdigest())
"#,
        ]);
        c
    });
}

#[test]
fn python_with_threads() {
    same_output(|| {
        let mut c = Command::new(python());
        c.args(["-c", r#"
import threading, queue
q = queue.Queue()
def producer(k):
    for i in range(20000):
        q.put(bytes([k]) * (i % 2000))
def consumer(out):
    total = 0
    for _ in range(40000):
        total += len(q.get())
    out.append(total)
res = []
ts = [threading.Thread(target=producer, args=(k,)) for k in (1, 2)] + [threading.Thread(target=consumer, args=(res,))]
[t.start() for t in ts]; [t.join() for t in ts]
print(res)
"#]);
        c
    });
}

#[test]
fn git_init_add_commit_log() {
    let dir = Scratch::new("preload-git");
    let script = r#"
set -e
rm -rf repo && mkdir repo && cd repo
git init -q -b main .
for i in $(seq 1 200); do echo "line $i" > "f$i.txt"; done
git add .
git -c user.name=t -c user.email=t@e commit -q -m first
for i in $(seq 1 50); do echo "more $i" >> "f$i.txt"; done
git -c user.name=t -c user.email=t@e commit -q -am second
git log --format='%H %s'
git diff HEAD~1 --stat | tail -1
"#;
    same_output(|| {
        let mut c = Command::new("bash");
        c.args(["-c", script])
            .current_dir(&dir)
            .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
            .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z");
        c
    });
}

#[test]
fn sort_a_large_file() {
    let dir = Scratch::new("preload-sort");
    let input = dir.join("input.txt");
    let mut x: u64 = 88172645463325252;
    let mut text = String::new();
    for _ in 0..400_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{:x} {}\n", x, x % 1000));
    }
    std::fs::write(&input, text).unwrap();
    same_output(|| {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(format!("sort -S 64M {} | sha256sum", input.display()));
        c
    });
}

#[test]
fn gcc_compiles_a_program() {
    let dir = Scratch::new("preload-gcc");
    std::fs::write(
        dir.join("prog.c"),
        r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
struct node { struct node *next; char name[40]; };
int main(void) {
    struct node *head = NULL;
    for (int i = 0; i < 1000; i++) {
        struct node *n = malloc(sizeof *n);
        snprintf(n->name, sizeof n->name, "node-%d", i);
        n->next = head; head = n;
    }
    unsigned long sum = 0;
    while (head) { struct node *n = head; sum += strlen(n->name); head = n->next; free(n); }
    printf("%lu\n", sum);
    return 0;
}
"#,
    )
    .unwrap();
    same_output(|| {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg("gcc -O2 -Wall -o prog prog.c && ./prog && gcc -O2 -S -o - prog.c | sha256sum")
            .current_dir(&dir);
        c
    });
}

#[test]
fn sqlite3_runs_a_generated_workload() {
    let dir = Scratch::new("preload-sqlite");
    let sql = r#"
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, grp INTEGER, payload BLOB);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)
INSERT INTO t SELECT i, printf('name-%d-%s', i, hex(i * 7919)), i % 97, zeroblob(i % 300) FROM n;
CREATE INDEX t_grp ON t(grp, name);
SELECT grp, count(*), sum(length(payload)), min(name), max(name) FROM t GROUP BY grp ORDER BY grp LIMIT 10;
UPDATE t SET name = name || '-x' WHERE id % 3 = 0;
DELETE FROM t WHERE id % 5 = 0;
SELECT count(*), sum(length(name)) FROM t;
SELECT group_concat(name, ',') FROM (SELECT name FROM t ORDER BY name DESC LIMIT 50);
"#;
    std::fs::write(dir.join("work.sql"), sql).unwrap();
    same_output(|| {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg("rm -f db.sqlite && sqlite3 db.sqlite < work.sql")
            .current_dir(&dir);
        c
    });
}

/// A selection of CPython's own regression suite: its result line must read SUCCESS both ways.
fn python_regrtest(modules: &[&str]) {
    let (_, summary) = same_output_filtered(
        || {
            let mut c = Command::new(python());
            c.args(["-m", "test", "-q"]).args(modules);
            c
        },
        |l| l.starts_with("Result:") || l.starts_with("Total tests:"),
    );
    // Equal is not enough: both runs could print nothing, or both fail alike.
    assert!(
        summary.lines().any(|l| l.trim() == "Result: SUCCESS"),
        "regrtest did not say it passed: {summary:?}"
    );
}

#[test]
fn python_regression_suite_short() {
    python_regrtest(&["test_dict", "test_list", "test_json", "test_queue"]);
}

/// The longer selection (`just real-programs`): threads, gc, weakrefs, subprocesses.
#[test]
#[ignore]
fn python_regression_suite_long() {
    // test_threading is left out: one of its tests fails on these machines without hakmem too.
    python_regrtest(&[
        "test_thread",
        "test_gc",
        "test_weakref",
        "test_set",
        "test_unicode",
        "test_bytes",
        "test_subprocess",
    ]);
}

/// A larger gcc job (`just real-programs`): 40 translation units of generated C.
#[test]
#[ignore]
fn gcc_compiles_many_units() {
    let dir = Scratch::new("preload-gcc-many");
    for i in 0..40 {
        let mut src = String::from("#include <stdio.h>\n#include <string.h>\n");
        for f in 0..60 {
            src.push_str(&format!("int f{i}_{f}(const char *s) {{ int h = {f}; for (size_t k = 0; k < strlen(s); k++) h = h * 31 + s[k]; return h ^ {i}; }}\n"));
        }
        std::fs::write(dir.join(format!("u{i}.c")), src).unwrap();
    }
    same_output(|| {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg("gcc -O2 -c u*.c && sha256sum u*.o | sha256sum")
            .current_dir(&dir);
        c
    });
}
