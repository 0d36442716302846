//! `bench-suite [--reps N] [--scale F] [--out DIR] [--only a,b] [--real] [--pin CPU]` (`--help`):
//! runs every hakbench workload under every allocator (glibc, hakmem, and the
//! Debian peers that are installed) via LD_PRELOAD, interleaved, N times;
//! reports median time, ratio to glibc, peak RSS, and the geometric mean over
//! workloads, as a Markdown table (stdout and DIR/suite.md), a CSV
//! (DIR/suite.csv) and a chart (DIR/suite.svg). With `--real`, the same for
//! real programs (`real`), into DIR/real.{md,csv,svg}.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod real;
mod workloads;
use real::{Job, Timing, REAL_WORKLOADS};
use workloads::WORKLOADS;
const PEERS: &[(&str, &str)] = &[
    ("jemalloc", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    (
        "tcmalloc",
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    ),
    ("mimalloc", "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2"),
];

struct Run {
    secs: f64,
    rss_kib: u64,
}

fn run_one(job: &Job, preload: Option<&Path>) -> Result<Run, String> {
    let workload = job.name;
    let mut cmd = Command::new(&job.program);
    cmd.args(&job.args);
    if let Some(dir) = &job.cwd {
        cmd.current_dir(dir);
    }
    if let Some(file) = &job.stdin {
        let f = std::fs::File::open(file)
            .map_err(|e| format!("cannot open {} ({workload}): {e}", file.display()))?;
        cmd.stdin(f);
    }
    cmd.stdout(std::process::Stdio::piped());
    match preload {
        Some(lib) => cmd.env("LD_PRELOAD", lib),
        None => cmd.env_remove("LD_PRELOAD"),
    };
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?} ({workload}): {e}", cmd.get_program()))?;
    let pid = child.id() as i32;
    let mut stdout = child.stdout.ok_or("no stdout")?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).map_err(|e| e.to_string())?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid out-pointers.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
        return Err("wait4 failed".into());
    }
    let wall = start.elapsed().as_secs_f64();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{workload} failed (status {status:#x}): {text}"));
    }
    let secs = match job.timing {
        Timing::Wall => wall,
        Timing::Printed(read) => {
            read(&text).ok_or_else(|| format!("{workload}: no timing in its output {text:?}"))?
        }
        Timing::Reported => text
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("time="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no time in {text:?}"))?,
    };
    Ok(Run {
        secs,
        rss_kib: usage.ru_maxrss as u64,
    })
}

/// The order the allocators run in, in repetition `rep`: a shuffle
/// (xorshift, seeded by the repetition, the same every time), so that none
/// always runs in the same place or after the same one. A run that follows
/// another's exit may pay for the memory that exit gave back (this VM
/// reports freed pages to its host, which faults them in again): in the
/// fixed order hakmem always followed glibc, and in one collection run
/// malloc-large (500 MiB) took 1.35x tcmalloc's time in all five
/// repetitions, while alternating the two alone gave 1.13-1.45 s against
/// 1.24-2.27 s. A fixed order makes such an effect systematic; shuffled,
/// it is noise the median absorbs.
fn run_order(n: usize, rep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(rep as u64 + 1);
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs every hakbench workload under glibc, hakmem and the installed peers
/// (LD_PRELOAD), interleaved; reports medians, ratios to glibc and peak RSS as
/// a Markdown table, a CSV and an SVG chart.
#[derive(clap::Parser)]
#[command(name = "bench-suite")]
struct Args {
    /// Interleaved repetitions of every (workload, allocator) pair.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Multiplies every workload's operation count.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    scale: f64,
    /// Where suite.md, suite.csv and suite.svg go.
    #[arg(long, default_value = "target/bench-suite")]
    out: PathBuf,
    /// Only these workloads (comma-separated; with --real, of the real programs).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Real programs instead of hakbench's workloads: CPython, Perl, Node.js,
    /// SQLite, jq, sort and gcc on inputs written into DIR/real-inputs (those
    /// installed). Writes DIR/real.{md,csv,svg}.
    #[arg(long)]
    real: bool,
    /// mimalloc-bench's programs instead of hakbench's workloads, built in
    /// DIR/build from the sources in DIR/bench (`benches/collection.sh`
    /// fetches and builds them outside the repository), and
    /// bench_random_mixed. Writes collection.{md,csv,svg}.
    #[arg(long, value_name = "DIR", conflicts_with = "real")]
    collection: Option<PathBuf>,
    /// The thread count of the collection's N-thread programs.
    #[arg(long, default_value_t = 2)]
    procs: usize,
    /// Runs every workload on this CPU alone (the runner pins itself; its
    /// children inherit it). Less noise on a shared machine; threaded
    /// workloads then share one core.
    #[arg(long)]
    pin: Option<usize>,
}

/// Pins this process, and so every child it starts, to `cpu`.
fn pin_to(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("CPU {cpu} is out of range"));
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside the set (cpu < CPU_SETSIZE, checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread's process; the set is valid for its size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(format!(
            "cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn main() {
    let Args {
        reps,
        scale,
        out,
        only,
        real,
        collection,
        procs,
        pin,
    } = clap::Parser::parse();
    if let Some(cpu) = pin {
        if let Err(e) = pin_to(cpu) {
            eprintln!("bench-suite: {e}");
            std::process::exit(2);
        }
    }
    let collection_names: Vec<&str> = real::COLLECTION
        .iter()
        .map(|c| c.0)
        .chain(["random-mixed", "random-mixed-64k"])
        .collect();
    let known: &[&str] = if real {
        REAL_WORKLOADS
    } else if collection.is_some() {
        &collection_names
    } else {
        WORKLOADS
    };
    if let Some(bad) = only.iter().flatten().find(|w| !known.contains(&w.as_str())) {
        eprintln!(
            "bench-suite: no workload {bad:?}{}; the workloads are {}",
            if real { " among the real programs" } else { "" },
            known.join(", ")
        );
        std::process::exit(2);
    }
    let reps = reps as usize;
    // Before the runs, so that a bad --out fails at once, not after the suite.
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("bench-suite: cannot create {}: {e}", out.display());
        std::process::exit(2);
    }
    let dir_of_exe = std::env::current_exe()
        .expect("own path")
        .parent()
        .expect("target dir")
        .to_path_buf();
    let bench = dir_of_exe.join("hakbench");
    let hakmem = dir_of_exe.join("libhakmem.so");
    if !hakmem.exists() {
        eprintln!(
            "bench-suite: {} is missing: cargo build --release",
            hakmem.display()
        );
        std::process::exit(2);
    }
    let mut allocators: Vec<(String, Option<PathBuf>)> =
        vec![("glibc".into(), None), ("hakmem".into(), Some(hakmem))];
    for (name, path) in PEERS {
        if Path::new(path).exists() {
            allocators.push((name.to_string(), Some(PathBuf::from(path))));
        } else {
            eprintln!("bench-suite: {name} not installed ({path}); scripts/setup.sh installs it");
        }
    }
    let wanted = |w: &Job| only.as_ref().is_none_or(|o| o.iter().any(|x| x == w.name));
    let jobs: Vec<Job> = if real {
        let found = real::prepare(&out.join("real-inputs"), scale).unwrap_or_else(|e| {
            eprintln!("bench-suite: {e}");
            std::process::exit(1)
        });
        found.into_iter().filter(wanted).collect()
    } else if let Some(dir) = &collection {
        let found = real::collection(dir, &dir_of_exe, procs);
        found.into_iter().filter(wanted).collect()
    } else {
        let hakbench = |name| Job {
            name,
            program: bench.clone(),
            args: vec![name.to_string(), scale.to_string()],
            stdin: None,
            cwd: None,
            timing: Timing::Reported,
        };
        WORKLOADS
            .iter()
            .map(|&w| hakbench(w))
            .filter(wanted)
            .collect()
    };
    if jobs.is_empty() {
        eprintln!("bench-suite: nothing to run (the programs asked for are not installed)");
        std::process::exit(1);
    }
    let workloads: Vec<&str> = jobs.iter().map(|j| j.name).collect();
    // (workload, allocator) -> runs
    let mut results: BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for rep in 1..=reps {
        for job in &jobs {
            let w = job.name;
            for k in run_order(allocators.len(), rep) {
                let (name, lib) = &allocators[k];
                match run_one(job, lib.as_deref()) {
                    Ok(r) => {
                        eprintln!(
                            "rep {rep} {w:<9} {name:<9} {:>8.4}s {:>8} KiB",
                            r.secs, r.rss_kib
                        );
                        let e = results.entry((w.to_string(), name.clone())).or_default();
                        e.0.push(r.secs);
                        e.1.push(r.rss_kib as f64);
                    }
                    Err(e) => {
                        eprintln!("bench-suite: {name}: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    let names: Vec<&str> = allocators.iter().map(|(n, _)| n.as_str()).collect();
    let mut med: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for ((w, a), (t, r)) in results.iter_mut() {
        med.insert((w.clone(), a.clone()), (median(t), median(r)));
    }
    let ratio = |w: &str, a: &str| {
        med[&(w.to_string(), a.to_string())].0 / med[&(w.to_string(), "glibc".to_string())].0
    };

    let mut md = String::new();
    let what = if real {
        "real programs, timed from start to exit"
    } else if collection.is_some() {
        "mimalloc-bench's programs (built from its sources) and bench_random_mixed, timed from \
         start to exit, or for those that run a fixed time by what they print, as its bench.sh \
         reads it (larson, xmalloc-test: their relative time; rptest: 2e6 / memory ops per CPU \
         second; glibc-thread: 1e9 / iterations)"
    } else {
        "hakbench workloads"
    };
    let what = match pin {
        Some(cpu) => format!("{what}, all on CPU {cpu}"),
        None => what.to_string(),
    };
    let _ = writeln!(md, "Median of {reps} interleaved runs (the allocators in a shuffled order each repetition), scale {scale}, {what}. Cells: time in seconds (ratio to glibc, lower is better) / peak RSS MiB.\n");
    let _ = writeln!(md, "| workload | {} |", names.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(names.len()));
    let mut csv = String::from("workload,allocator,median_s,ratio_to_glibc,peak_rss_kib\n");
    for w in &workloads {
        let mut row = format!("| {w} |");
        for a in &names {
            let (t, rss) = med[&(w.to_string(), a.to_string())];
            let _ = write!(row, " {t:.3} ({:.2}) / {:.1} |", ratio(w, a), rss / 1024.0);
            let _ = writeln!(csv, "{w},{a},{t:.5},{:.4},{rss:.0}", ratio(w, a));
        }
        let _ = writeln!(md, "{row}");
    }
    let mut geo_row = String::from("| **geomean vs glibc** |");
    let mut geos = Vec::new();
    for a in &names {
        let g = (workloads.iter().map(|w| ratio(w, a).ln()).sum::<f64>() / workloads.len() as f64)
            .exp();
        geos.push(g);
        let _ = write!(geo_row, " **{g:.3}** |");
    }
    let _ = writeln!(md, "{geo_row}");
    print!("{md}");
    let svg = svg(&workloads, &names, &ratio, &geos);
    let stem = if real {
        "real"
    } else if collection.is_some() {
        "collection"
    } else {
        "suite"
    };
    for (ext, text) in [("md", &md), ("csv", &csv), ("svg", &svg)] {
        let path = out.join(format!("{stem}.{ext}"));
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("bench-suite: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    eprintln!(
        "bench-suite: wrote {}/{stem}.md, {stem}.csv, {stem}.svg",
        out.display()
    );
}

/// Grouped bars: time relative to glibc per workload (1.0 line marked), plus the geomean.
fn svg(
    workloads: &[&str],
    names: &[&str],
    ratio: &dyn Fn(&str, &str) -> f64,
    geos: &[f64],
) -> String {
    const COLORS: &[&str] = &[
        "#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
    ];
    let groups: Vec<(String, Vec<f64>)> = workloads
        .iter()
        .map(|w| (w.to_string(), names.iter().map(|a| ratio(w, a)).collect()))
        .chain(std::iter::once(("geomean".to_string(), geos.to_vec())))
        .collect();
    let max = groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0f64, f64::max)
        .min(6.0)
        * 1.1;
    let (bw, gap, left, top, h) = (14.0, 18.0, 50.0, 40.0, 300.0);
    let gw = bw * names.len() as f64 + gap;
    let width = left + gw * groups.len() as f64 + 20.0;
    let y = |v: f64| top + h - (v.min(max) / max) * h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" font-family="sans-serif" font-size="11">"#,
        top + h + 70.0
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="14">Time relative to glibc (lower is better)</text>"#
    );
    let mut tick = 0.0;
    while tick <= max {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.0}" y1="{:.1}" y2="{:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{tick:.1}</text>"##,
            width - 10.0,
            y(tick),
            y(tick),
            left - 5.0,
            y(tick) + 4.0
        );
        tick += 0.5;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{:.0}" y1="{:.1}" y2="{:.1}" stroke="#000" stroke-dasharray="4 3"/>"##,
        width - 10.0,
        y(1.0),
        y(1.0)
    );
    for (g, (label, vals)) in groups.iter().enumerate() {
        let x0 = left + gap / 2.0 + g as f64 * gw;
        for (i, v) in vals.iter().enumerate() {
            let x = x0 + i as f64 * bw;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {label}: {v:.3}</title></rect>"#,
                y(*v),
                bw - 2.0,
                top + h - y(*v),
                COLORS[i % COLORS.len()],
                names[i]
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            x0 + bw * names.len() as f64 / 2.0,
            top + h + 15.0
        );
    }
    for (i, n) in names.iter().enumerate() {
        let x = left + i as f64 * 90.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.0}" y="{:.0}" width="10" height="10" fill="{}"/><text x="{:.0}" y="{:.0}">{n}</text>"#,
            top + h + 35.0,
            COLORS[i % COLORS.len()],
            x + 14.0,
            top + h + 44.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_repetition_runs_every_allocator_once_in_an_order_of_its_own() {
        let orders: Vec<Vec<usize>> = (1..=5).map(|rep| super::run_order(5, rep)).collect();
        for o in &orders {
            let mut sorted = o.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3, 4], "{orders:?}");
        }
        // glibc (0) neither always first nor always right before hakmem (1).
        assert!(orders.iter().any(|o| o[0] != 0), "{orders:?}");
        let after_glibc = orders.iter().filter(|o| o.windows(2).any(|w| w == [0, 1]));
        assert!(after_glibc.count() < 5, "{orders:?}");
        assert_eq!(super::run_order(1, 3), [0]);
    }
}
