//! Real programs for `bench-suite --real`: interpreters, a database, a
//! compiler and text tools doing allocation-heavy jobs on inputs written here
//! (deterministic, scaled by `--scale`). Each is timed from start to exit,
//! under each allocator through LD_PRELOAD, like the synthetic workloads.
//! A program that is not installed is left out, with a note.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workloads::Rng;

/// A workload of the suite: a program and its arguments (the allocator is
/// the runner's to choose).
pub struct Job {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// A file for its standard input (else none).
    pub stdin: Option<PathBuf>,
    /// Where it runs (else the caller's directory): a program that writes
    /// files where it runs (rptest) writes them there.
    pub cwd: Option<PathBuf>,
    pub timing: Timing,
}

/// How a run's time is read.
#[derive(Clone, Copy)]
pub enum Timing {
    /// hakbench's own `time=` (its workload alone, without start-up).
    Reported,
    /// From start to exit, measured by the runner (a real program).
    Wall,
    /// A program that runs for a fixed time (or reports its own time): what
    /// this function reads off its standard output, in seconds or a time
    /// relative to them (lower is better), as mimalloc-bench's `bench.sh`
    /// reads it.
    Printed(fn(&str) -> Option<f64>),
}

/// The number just before `word` in `text` (`123 iterations`).
fn number_before(text: &str, word: &str) -> Option<f64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].starts_with(word))
        .and_then(|w| {
            w[0].trim_start_matches("...")
                .trim_start_matches('.')
                .parse()
                .ok()
        })
}

/// The number just after `key` in `text` (`rtime: 5.5`).
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

/// larson: its own `relative time: Xs`.
fn larson_time(text: &str) -> Option<f64> {
    number_after(text, "relative time:")
}

/// xmalloc-test: its own `rtime: X`.
fn xmalloc_time(text: &str) -> Option<f64> {
    number_after(text, "rtime:")
}

/// rptest: 2,000,000 over its `N memory ops/CPU second`.
fn rptest_time(text: &str) -> Option<f64> {
    number_before(text, "memory").map(|n| 2e6 / n)
}

/// glibc-thread (a fixed 2 s or so): 10^9 over its `N iterations`.
fn glibc_thread_time(text: &str) -> Option<f64> {
    number_before(text, "iterations").map(|n| 1e9 / n)
}

/// The names, in report order (for `--only`).
pub const REAL_WORKLOADS: &[&str] = &["python", "perl", "node", "sqlite", "jq", "sort", "gcc"];

/// Writes the inputs into `dir` and returns the workloads whose programs are
/// installed; each one left out is named on stderr.
pub fn prepare(dir: &Path, scale: f64) -> Result<Vec<Job>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let n = |base: f64| ((base * scale) as u64).max(1);
    let write = |file: &str, text: String| {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok::<String, String>(path.to_string_lossy().into_owned())
    };
    let mut all: Vec<(&'static str, &str, Vec<String>)> = Vec::new();
    // Dicts of lists, tuples and strings, sorted and dropped (CPython as
    // shipped: its small objects come from pymalloc, the rest from malloc).
    let py = write(
        "job.py",
        format!(
            "d = {{}}\nfor i in range({}):\n    d['k%d' % i] = [i, str(i) * 3, (i, i + 1)]\n\
             s = sorted(d.items(), key=lambda kv: kv[1][1])\ndel d, s\n",
            n(300_000.0)
        ),
    )?;
    all.push(("python", "python3", vec![py]));
    let pl = write(
        "job.pl",
        format!(
            "my %h; for my $i (1..{}) {{ $h{{\"k$i\"}} = [$i, \"$i\" x 3]; }} my @k = sort keys %h;\n",
            n(200_000.0)
        ),
    )?;
    all.push(("perl", "perl", vec![pl]));
    let js = format!(
        "const m = new Map(); for (let r = 0; r < 3; r++) {{ for (let i = 0; i < {}; i++) \
         m.set('k' + i, {{a: i, b: String(i).repeat(3)}}); m.clear(); }}",
        n(300_000.0)
    );
    all.push(("node", "node", vec!["-e".into(), js]));
    let sql = format!(
        "create table t(a integer primary key, b text, c real);\n\
         with recursive x(i) as (select 1 union all select i + 1 from x where i < {}) \
         insert into t select i, hex(randomblob(20)), random() from x;\n\
         create index tb on t(b);\nselect count(*), sum(length(b)) from t where b like 'A%';\n",
        n(300_000.0)
    );
    all.push(("sqlite", "sqlite3", vec![":memory:".into(), sql]));
    let json = write("data.json", json_records(n(200_000.0)))?;
    let filter = "map(select(.v > 0.5)) | group_by(.tags[0]) | length";
    all.push(("jq", "jq", vec!["-c".into(), filter.into(), json]));
    let nums = write("nums.txt", numbers(n(2_000_000.0)))?;
    all.push((
        "sort",
        "sort",
        vec!["-n".into(), "-o".into(), "/dev/null".into(), nums],
    ));
    let c = write("gen.c", c_source(n(80.0)))?;
    let gcc = vec!["-O2", "-c", "-o", "/dev/null", &c];
    all.push(("gcc", "gcc", gcc.into_iter().map(String::from).collect()));
    debug_assert!(all.iter().map(|w| w.0).eq(REAL_WORKLOADS.iter().copied()));

    let mut found = Vec::new();
    for (name, program, args) in all {
        match resolve(program) {
            Some(program) => found.push(Job {
                name,
                program,
                args,
                stdin: None,
                cwd: None,
                timing: Timing::Wall,
            }),
            None => eprintln!("bench-suite: {program} is not installed; {name} left out"),
        }
    }
    Ok(found)
}

/// The executable `program` names on PATH. For python3, the interpreter
/// itself: a version manager's shim (pyenv's is a shell script) would add its
/// own start-up to every run.
fn resolve(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())?;
    if program != "python3" {
        return Some(found);
    }
    let out = Command::new(&found)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    let exe = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(exe.trim())).filter(|p| p.is_file())
}

fn numbers(count: u64) -> String {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut s = String::new();
    for _ in 0..count {
        let _ = writeln!(s, "{}", rng.range(0, 999_999_999));
    }
    s
}

fn json_records(count: u64) -> String {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut s = String::from("[");
    for i in 0..count {
        let tags: Vec<String> = (0..5)
            .map(|_| format!("\"t{}\"", rng.range(0, 99)))
            .collect();
        let v = rng.range(0, 999_999) as f64 / 1e6;
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            s,
            "{sep}{{\"id\":{i},\"name\":\"n{i}\",\"tags\":[{}],\"v\":{v}}}",
            tags.join(",")
        );
    }
    s.push(']');
    s
}

/// `count` functions with switches, loops and calls: work for gcc's optimiser.
fn c_source(count: u64) -> String {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut s = String::from("#include <string.h>\n");
    for f in 0..count {
        let _ = writeln!(
            s,
            "int f{f}(int x, const char *s) {{ int a[16]; for (int i = 0; i < 16; i++) a[i] = x * {} + i;\n switch (x & 7) {{",
            rng.range(1, 99)
        );
        for c in 0..8 {
            let _ = writeln!(
                s,
                " case {c}: x += a[{c}] * (int)strlen(s) + {}; if (x > {}) x ^= f{}(x - 1, s + 1); break;",
                rng.range(0, 999),
                rng.range(0, 9_999),
                f.saturating_sub(1)
            );
        }
        s.push_str(" }\n return x; }\n");
    }
    s
}

/// The programs of mimalloc-bench (github.com/daanx/mimalloc-bench), built
/// from its sources outside this repository (`benches/collection.sh` fetches
/// and builds them), run with the arguments its `bench.sh` gives them on a
/// machine of `procs` cores, plus bench_random_mixed; the outside check of
/// the suite's look-alikes. `dir` holds the collection's `bench/` (sources,
/// inputs) and `build/` (the programs). Those that run for a fixed time are
/// timed by what they print, as `bench.sh` does (`Timing::Printed`).
pub const COLLECTION: &[(&str, &str, &str)] = &[
    (
        "cfrac",
        "cfrac",
        "17545186520507317056371138836327483792789528",
    ),
    ("espresso", "espresso", "{bench}/espresso/largest.espresso"),
    ("barnes", "barnes", "<{bench}/barnes/input"),
    ("alloc-test1", "alloc-test", "1"),
    ("alloc-testN", "alloc-test", "{procs}"),
    ("larsonN", "larson", "5 8 1000 5000 100 4141 {procs}"),
    (
        "larsonN-sized",
        "larson-sized",
        "5 8 1000 5000 100 4141 {procs}",
    ),
    ("xmalloc-testN", "xmalloc-test", "-w {procs} -t 5 -s 64"),
    ("cache-thrash1", "cache-thrash", "1 1000 1 2000000 {procs}"),
    (
        "cache-thrashN",
        "cache-thrash",
        "{procs} 1000 1 2000000 {procs}",
    ),
    (
        "cache-scratch1",
        "cache-scratch",
        "1 1000 1 2000000 {procs}",
    ),
    (
        "cache-scratchN",
        "cache-scratch",
        "{procs} 1000 1 2000000 {procs}",
    ),
    ("malloc-large", "malloc-large", ""),
    ("mstressN", "mstress", "{procs} 50 25"),
    ("mleak10", "mleak", "5"),
    ("mleak100", "mleak", "50"),
    ("rptestN", "rptest", "{procs} 0 1 2 500 1000 100 8 16000"),
    ("glibc-simple", "glibc-simple", ""),
    ("glibc-thread", "glibc-thread", "{procs}"),
];

/// The collection's jobs found in `dir/build` (each one missing is named on
/// stderr), and bench_random_mixed from `release` in two shapes. A job's
/// argument `<file` is its standard input.
pub fn collection(dir: &Path, release: &Path, procs: usize) -> Vec<Job> {
    // Absolute, as the programs run in its `build/` (see `cwd`).
    let dir = &dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let bench = dir.join("bench");
    let mut jobs: Vec<Job> = COLLECTION
        .iter()
        .filter_map(|&(name, program, args)| {
            let program = dir.join("build").join(program);
            if !program.exists() {
                eprintln!("bench-suite: {name}: {} is not built", program.display());
                return None;
            }
            let args = args
                .replace("{bench}", &bench.to_string_lossy())
                .replace("{procs}", &procs.to_string());
            let (stdin, args): (Vec<&str>, Vec<&str>) =
                args.split_whitespace().partition(|a| a.starts_with('<'));
            Some(Job {
                name,
                program,
                args: args.into_iter().map(String::from).collect(),
                stdin: stdin.first().map(|f| PathBuf::from(&f[1..])),
                // rptest writes its results where it runs: outside the
                // repository, as under mimalloc-bench's own bench.sh.
                cwd: Some(dir.join("build")),
                timing: match name {
                    "larsonN" | "larsonN-sized" => Timing::Printed(larson_time),
                    "xmalloc-testN" => Timing::Printed(xmalloc_time),
                    "rptestN" => Timing::Printed(rptest_time),
                    "glibc-thread" => Timing::Printed(glibc_thread_time),
                    _ => Timing::Wall,
                },
            })
        })
        .collect();
    for (name, slots) in [("random-mixed", "8192"), ("random-mixed-64k", "65536")] {
        jobs.push(Job {
            name,
            program: release.join("bench_random_mixed"),
            args: vec!["10000000".into(), slots.into()],
            stdin: None,
            cwd: None,
            timing: Timing::Wall,
        });
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collections_own_timings_are_read_as_bench_sh_reads_them() {
        let larson = "Throughput = 19755336 operations per second, relative time: 50.619s.\nDone sleeping...";
        assert_eq!(larson_time(larson), Some(50.619));
        assert_eq!(
            xmalloc_time("rtime: 5.502, free/sec: 18.174 M"),
            Some(5.502)
        );
        let rptest =
            "crt 2 threads random ... 100 ops: ........2164213 memory ops/CPU second (30MiB peak)";
        assert_eq!(rptest_time(rptest), Some(2e6 / 2164213.0));
        assert_eq!(
            glibc_thread_time("110437014 iterations\n"),
            Some(1e9 / 110437014.0)
        );
        assert_eq!(glibc_thread_time("no figure"), None);
    }
}
