//! hakctl: live eBPF view of hakmem's USDT probes in a running process.

mod attach;
mod commands;
mod fleet;
mod mem;
mod report;
mod run;
mod serve;
mod session;
mod stacks;
mod stapsdt;
mod target;
mod view;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  hakctl run -- python3 script.py        watch a command from its first allocation
  hakctl watch 4242                       full screen on a terminal, one line a second when piped
  hakctl watch -p 4242 2 5 -j             five JSON documents, two seconds apart
  hakctl stage-stats 4242 -d 10           stage hit rates over ten seconds
  hakctl trace 4242 --probe ss_acquire -c 3   one line per slab request of class 3 (64 B)
  hakctl trace 4242 -a stage=3            only Stage 3 acquisitions (filtered in the kernel)
  hakctl mem 4242 -j                      where the memory is, as JSON
  hakctl probes target/release/libhakmem.so
  hakctl completions bash > /etc/bash_completion.d/hakctl
  hakctl man > hakctl.1

A PID is a process that preloads libhakmem.so or has hakmem as its Rust
allocator; attaching needs root (or CAP_BPF and CAP_PERFMON).
JSON output: docs/json-schema.md.";

#[derive(Parser)]
#[command(
    name = "hakctl",
    version,
    about = "Watch the hakmem allocator's decisions live, in an unmodified running process",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which process: `PID` or `-p PID`.
#[derive(clap::Args)]
struct Target {
    /// The process id: one that preloads libhakmem.so or has hakmem as its allocator.
    #[arg(value_name = "PID", required_unless_present = "pid_flag")]
    pid: Option<i32>,
    /// The process id, as a flag (as in perf, bpftrace, BCC's tools).
    #[arg(short = 'p', long = "pid", value_name = "PID", conflicts_with = "pid")]
    pid_flag: Option<i32>,
}

impl Target {
    fn pid(&self) -> i32 {
        self.pid.or(self.pid_flag).expect("clap requires one")
    }
}

/// Every process that maps the library instead of one (`watch`, `serve`).
#[derive(clap::Args)]
struct Everywhere {
    /// Every process that maps libhakmem.so (or a --lib file), now or later: one row (or
    /// label set) each.
    #[arg(long)]
    all: bool,
    /// With --all: attach to this library, or a binary with hakmem as its allocator
    /// (repeatable; default: libhakmem.so beside hakctl and every *hakmem* file mapped now).
    #[arg(long, value_name = "PATH", requires = "all")]
    lib: Vec<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// List the hakmem probes in a process (PID) or an ELF file, and whether each is enabled.
    Probes {
        /// A process id or a path to libhakmem.so / a binary with hakmem inside.
        target: String,
        /// One JSON document (schema: docs/json-schema.md).
        #[arg(short, long)]
        json: bool,
    },
    /// Attach and refresh live: totals, rates, stage hit rates, recycle funnel, failures, histograms.
    #[command(
        override_usage = "hakctl watch [OPTIONS] <PID> [INTERVAL [COUNT]]\n       hakctl watch [OPTIONS] -p <PID> [INTERVAL [COUNT]]\n       hakctl watch [OPTIONS] --all [INTERVAL [COUNT]]",
        after_help = "\
`hakctl watch PID 2 10`, as vmstat: a refresh every 2 seconds, 10 of them.
`hakctl watch --all`: a table of every process that maps libhakmem.so, also those started later."
    )]
    Watch {
        /// The process id, as a flag.
        #[arg(short = 'p', long = "pid", value_name = "PID", conflicts_with = "all")]
        pid_flag: Option<i32>,
        #[command(flatten)]
        everywhere: Everywhere,
        /// With --all: the table's order (s changes it in the full-screen view).
        #[arg(long, value_enum, default_value = "rate", requires = "all")]
        sort: fleet::SortBy,
        /// PID (unless -p), then INTERVAL seconds and COUNT refreshes (both optional).
        #[arg(value_name = "PID INTERVAL COUNT", num_args = 0..=3)]
        positional: Vec<String>,
        /// Seconds between refreshes.
        #[arg(short, long, value_parser = interval_seconds)]
        interval: Option<f64>,
        /// Stop after this many seconds (default: until Ctrl-C or the target exits).
        #[arg(short, long, value_parser = duration_seconds)]
        duration: Option<f64>,
        /// One JSON document per refresh (schema: docs/json-schema.md).
        #[arg(short, long)]
        json: bool,
        /// Also attach tls_drain and remote_drain (a trap per thread-cache drain:
        /// a busy program can run 10-15% slower while watched).
        #[arg(long)]
        drains: bool,
    },
    /// Attach for a while, then print per-class stage hit rates, legacy fallbacks and recycle outcomes.
    StageStats {
        #[command(flatten)]
        target: Target,
        /// Seconds to collect (default: until Ctrl-C or the target exits).
        #[arg(short, long, value_parser = duration_seconds)]
        duration: Option<f64>,
        /// Print the raw counts as JSON (schema: docs/json-schema.md).
        #[arg(short, long)]
        json: bool,
        /// Also attach tls_drain and remote_drain (see `watch --drains`).
        #[arg(long)]
        drains: bool,
    },
    /// One line per probe event, through a ring buffer.
    Trace {
        #[command(flatten)]
        target: Target,
        /// Only these probes (repeatable; default: all).
        #[arg(long = "probe")]
        probes: Vec<String>,
        /// Only events of this class: an index, not a size (tiny classes 0-7 are 8, 16,
        /// 32, ... 1024 bytes; for ace_fail, the ACE class). Filtered in the kernel;
        /// probes without a class are left out.
        #[arg(short, long, value_name = "INDEX")]
        class: Option<u64>,
        /// Only events whose argument NAME equals VALUE (decimal or 0x hex; names as
        /// `hakctl probes` lists them, e.g. stage=3, reason=1). Filtered in the kernel;
        /// probes without that argument are left out. Up to two conditions with --class.
        #[arg(short, long = "arg", value_name = "NAME=VALUE")]
        arg: Vec<String>,
        /// Stop after this many seconds.
        #[arg(short, long, value_parser = duration_seconds)]
        duration: Option<f64>,
        /// One JSON document per event, with its wall-clock time (schema: docs/json-schema.md).
        #[arg(short, long)]
        json: bool,
    },
    /// Serve the counts, memory levels and histograms to Prometheus (OpenMetrics text at /metrics).
    #[command(
        override_usage = "hakctl serve [OPTIONS] <PID>\n       hakctl serve [OPTIONS] -p <PID>\n       hakctl serve [OPTIONS] --all",
        after_help = "\
`hakctl serve --all`: every process that maps libhakmem.so, also those started later, each
series labelled with pid and command. Listens on loopback only unless told otherwise."
    )]
    Serve {
        /// The process id (or -p PID, or --all).
        #[arg(
            value_name = "PID",
            required_unless_present_any = ["all", "pid_flag"],
            conflicts_with_all = ["all", "pid_flag"]
        )]
        pid: Option<i32>,
        /// The process id, as a flag.
        #[arg(short = 'p', long = "pid", value_name = "PID", conflicts_with = "all")]
        pid_flag: Option<i32>,
        #[command(flatten)]
        everywhere: Everywhere,
        /// Where to listen: HOST:PORT, or a port on 127.0.0.1 (0: any free port, printed).
        #[arg(short, long, default_value = "127.0.0.1:9464")]
        listen: String,
        /// Also attach tls_drain and remote_drain (see `watch --drains`).
        #[arg(long)]
        drains: bool,
    },
    /// Count the user call stacks behind slow-path events and print the top ones.
    #[command(after_help = "\
Frames: the kernel follows frame pointers. libhakmem.so keeps them, so the frames inside
hakmem and the function that called malloc are always there; the program's frames further
out only where it keeps frame pointers too (gcc/clang -fno-omit-frame-pointer).")]
    Stacks {
        #[command(flatten)]
        target: Target,
        /// Only these probes (repeatable; default: ss_acquire, shared_fail, ace_fail, cache_take).
        #[arg(long = "probe")]
        probes: Vec<String>,
        /// Only events of this class (as `trace --class`; filtered in the kernel).
        #[arg(short, long)]
        class: Option<u64>,
        /// Only events whose argument NAME equals VALUE (as `trace --arg`).
        #[arg(short, long, value_name = "NAME=VALUE")]
        arg: Vec<String>,
        /// Seconds to collect (default: until Ctrl-C or the target exits).
        #[arg(short, long, value_parser = duration_seconds)]
        duration: Option<f64>,
        /// Stacks shown per probe.
        #[arg(short, long, default_value_t = 5)]
        top: usize,
        /// Folded stacks, one a line (`command;outer;...;inner;[probe] count`), for flame graph tools.
        #[arg(short, long, conflicts_with = "json")]
        folded: bool,
        /// One JSON document (schema: docs/json-schema.md).
        #[arg(short, long)]
        json: bool,
    },
    /// Where the process's memory is: bytes in use, in thread caches and resident, per tier and class.
    Mem {
        #[command(flatten)]
        target: Target,
        /// One JSON document (schema: docs/json-schema.md).
        #[arg(short, long)]
        json: bool,
    },
    /// Start CMD with libhakmem.so preloaded and watch it from its first allocation.
    Run {
        /// Seconds between refreshes.
        #[arg(short, long, default_value_t = 1.0, value_parser = interval_seconds)]
        interval: f64,
        /// One JSON document per refresh (schema: docs/json-schema.md).
        #[arg(short, long)]
        json: bool,
        /// Also attach tls_drain and remote_drain (see `watch --drains`).
        #[arg(long)]
        drains: bool,
        /// Write the command's stdout and stderr to FILE. Without it they go to
        /// a file in the temporary directory while the full-screen view is on,
        /// else the command's stdout goes to hakctl's stderr: hakctl's stdout
        /// carries only hakctl's output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), made from these definitions: `hakctl man | man -l -`.
    Man,
}

/// The longest duration or interval taken, in seconds (about three years):
/// past it a deadline could overflow the clock's type.
const MAX_SECONDS: f64 = 1e8;
/// The shortest interval between refreshes: a view redrawn more often than
/// every 10 ms only floods the terminal.
const MIN_INTERVAL: f64 = 0.01;

/// Seconds in `s`, refused unless `low` says they are enough (`at_least`
/// names that bound in the message) and at most `MAX_SECONDS`.
fn seconds_within(s: &str, low: impl Fn(f64) -> bool, at_least: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(low(v) && v <= MAX_SECONDS) {
        return Err(format!(
            "{s} seconds: it must be {at_least} and at most {MAX_SECONDS}"
        ));
    }
    Ok(v)
}

/// `--duration`: seconds, more than none (`-d 0` would stop at once).
fn duration_seconds(s: &str) -> Result<f64, String> {
    seconds_within(s, |v| v > 0.0, "more than 0")
}

/// `--interval` and `watch`'s positional interval.
fn interval_seconds(s: &str) -> Result<f64, String> {
    seconds_within(
        s,
        |v| v >= MIN_INTERVAL,
        &format!("at least {MIN_INTERVAL}"),
    )
}

/// `watch`'s process (None: `--all`), interval and count from `-p`, its
/// positionals and `--interval`.
fn watch_args(
    pid_flag: Option<i32>,
    all: bool,
    positional: &[String],
    interval: Option<f64>,
) -> Result<(Option<i32>, f64, Option<u64>)> {
    let mut rest = positional.iter();
    let pid = match pid_flag {
        _ if all => None,
        Some(pid) => Some(pid),
        None => {
            let Some(p) = rest.next() else {
                bail!("which process? `hakctl watch PID` or `hakctl watch -p PID`");
            };
            Some(
                p.parse()
                    .with_context(|| format!("{p:?} is not a process id"))?,
            )
        }
    };
    let positional_interval = rest
        .next()
        .map(|v| interval_seconds(v).map_err(anyhow::Error::msg))
        .transpose()?;
    let count = rest
        .next()
        .map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|&c| c > 0)
                .with_context(|| format!("count {v:?} is not a positive whole number"))
        })
        .transpose()?;
    if let Some(extra) = rest.next() {
        bail!("unexpected argument {extra:?}: `hakctl watch [-p] PID [INTERVAL [COUNT]]`");
    }
    if positional_interval.is_some() && interval.is_some() {
        bail!("the interval is given twice (positional and --interval)");
    }
    Ok((pid, positional_interval.or(interval).unwrap_or(1.0), count))
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`hakctl trace PID | head`), like other CLI tools.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hakctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Probes { target, json } => commands::probes(&target, json),
            Command::Watch {
                pid_flag,
                everywhere: Everywhere { all, lib },
                sort,
                positional,
                interval,
                duration,
                json,
                drains,
            } => match watch_args(pid_flag, all, &positional, interval)? {
                (Some(pid), interval, count) => {
                    commands::watch(pid, interval, count, duration, json, drains).await
                }
                (None, interval, count) => {
                    fleet::watch_all(&lib, interval, count, duration, json, drains, sort).await
                }
            },
            Command::StageStats {
                target,
                duration,
                json,
                drains,
            } => commands::stage_stats(target.pid(), duration, json, drains).await,
            Command::Trace {
                target,
                probes,
                class,
                arg,
                duration,
                json,
            } => commands::trace(target.pid(), &probes, class, &arg, duration, json).await,
            Command::Serve {
                pid,
                pid_flag,
                everywhere: Everywhere { all: _, lib },
                listen,
                drains,
            } => {
                serve::serve(
                    pid.or(pid_flag),
                    &lib,
                    serve::listen_address(&listen)?,
                    drains,
                )
                .await
            }
            Command::Stacks {
                target,
                probes,
                class,
                arg,
                duration,
                top,
                folded,
                json,
            } => {
                stacks::stacks(
                    target.pid(),
                    &probes,
                    class,
                    &arg,
                    duration,
                    top,
                    folded,
                    json,
                )
                .await
            }
            Command::Mem { target, json } => mem::mem(target.pid(), json),
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "hakctl",
                    &mut std::io::stdout(),
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Man => {
                clap_mangen::Man::new(Cli::command())
                    .render(&mut std::io::stdout())
                    .context("cannot write the manual page")?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Run {
                interval,
                json,
                drains,
                output,
                cmd,
            } => commands::run(&cmd, interval, json, drains, output.as_deref()).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hakctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn watch_takes_pid_interval_count_as_vmstat_does() {
        assert_eq!(
            watch_args(None, false, &strings(&["42"]), None).unwrap(),
            (Some(42), 1.0, None)
        );
        assert_eq!(
            watch_args(None, false, &strings(&["42", "2", "10"]), None).unwrap(),
            (Some(42), 2.0, Some(10))
        );
        assert_eq!(
            watch_args(Some(42), false, &strings(&["0.5", "3"]), None).unwrap(),
            (Some(42), 0.5, Some(3))
        );
        assert_eq!(
            watch_args(None, true, &strings(&["0.5", "3"]), None).unwrap(),
            (None, 0.5, Some(3))
        );
        assert_eq!(
            watch_args(Some(42), false, &[], Some(2.0)).unwrap(),
            (Some(42), 2.0, None)
        );
        for (flag, pos, interval, says) in [
            (None, vec![], None, "which process"),
            (None, vec!["x"], None, "not a process id"),
            (Some(1), vec!["x"], None, "not a number"),
            (Some(1), vec!["1", "0"], None, "positive whole"),
            (Some(1), vec!["1", "2", "3"], None, "unexpected"),
            (Some(1), vec!["1"], Some(1.0), "twice"),
        ] {
            let e = watch_args(flag, false, &strings(&pos), interval).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{pos:?}: {e:#}");
        }
    }

    #[test]
    fn durations_and_intervals_outside_what_a_clock_holds_are_refused() {
        for args in [
            &["hakctl", "stage-stats", "42", "-d", "inf"][..],
            &["hakctl", "stage-stats", "42", "-d", "1e19"],
            &["hakctl", "stacks", "42", "-d", "nan"],
            &["hakctl", "trace", "42", "--duration=-5"],
            &["hakctl", "watch", "42", "-d", "0"],
            &["hakctl", "watch", "42", "-i", "1e-12"],
            &["hakctl", "watch", "42", "-i", "1e20"],
            &["hakctl", "run", "-i", "1e20", "true"],
        ] {
            let e = Cli::try_parse_from(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} taken"));
            assert!(e.to_string().contains("seconds"), "{args:?}: {e}");
        }
        for (pos, says) in [(["42", "1e19"], "at most"), (["42", "x"], "not a number")] {
            let e = watch_args(None, false, &strings(&pos), None).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{pos:?}: {e:#}");
        }
        if let Err(e) = Cli::try_parse_from(["hakctl", "watch", "42", "-d", "0.5", "-i", "0.01"]) {
            panic!("{e}");
        }
    }

    #[test]
    fn the_command_line_definition_is_consistent_and_takes_pid_either_way() {
        Cli::command().debug_assert();
        for args in [
            &["hakctl", "mem", "42"][..],
            &["hakctl", "mem", "-p", "42", "-j"],
            &["hakctl", "stage-stats", "--pid", "42", "-d", "1"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let (Command::Mem { target, .. } | Command::StageStats { target, .. }) = cli.command
            else {
                panic!("{args:?}");
            };
            assert_eq!(target.pid(), 42);
        }
        assert!(Cli::try_parse_from(["hakctl", "mem"]).is_err());
        assert!(Cli::try_parse_from(["hakctl", "mem", "1", "-p", "2"]).is_err());
    }
}
