//! Real programs under LD_PRELOAD=libhakmem.so: their output must equal a run
//! without it, and hakmem's HAKMEM_STATS tally must show it served them.
//!
//! Uses the release library (`cargo build --release -p hakmem`, done by
//! `just test`), or the one named by `HAKMEM_LIB`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lib() -> PathBuf {
    if let Some(p) = std::env::var_os("HAKMEM_LIB") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libhakmem.so");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p hakmem` (or run `just test`)",
        p.display()
    );
    p.canonicalize().unwrap()
}

fn run(cmd: &mut Command, preload: bool) -> Output {
    if preload {
        cmd.env("LD_PRELOAD", lib()).env("HAKMEM_STATS", "1");
    } else {
        cmd.env_remove("LD_PRELOAD").env_remove("HAKMEM_STATS");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} (preload {preload}) failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Total slab acquisitions + legacy refills + ACE/large activity over every
/// process of the run (each prints one `hakmem-stats:` line at exit).
fn served(out: &Output) -> u64 {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut total = 0;
    let mut lines = 0;
    for l in stderr.lines() {
        if let Some(json) = l.strip_prefix("hakmem-stats: ") {
            let v: serde_json::Value = serde_json::from_str(json).expect("stats JSON");
            lines += 1;
            total += v["probes"]["ss_acquire"].as_u64().unwrap()
                + v["probes"]["legacy_refill"].as_u64().unwrap();
        }
    }
    assert!(
        lines > 0,
        "no hakmem-stats line: hakmem was not loaded\n{stderr}"
    );
    total
}

fn same_output(make: impl Fn() -> Command) -> u64 {
    let plain = run(&mut make(), false);
    let hak = run(&mut make(), true);
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        String::from_utf8_lossy(&hak.stdout)
    );
    let n = served(&hak);
    assert!(n > 0, "hakmem's tally is empty");
    n
}

/// The real interpreter, not a version-manager shim script.
fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
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
    let dir = tempdir("git");
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
    let dir = tempdir("sort");
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
    let dir = tempdir("gcc");
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

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hakmem-preload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
