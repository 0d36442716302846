//! hakctl: live eBPF view of hakmem's USDT probes in a running process.

mod attach;
mod commands;
mod mem;
mod report;
mod run;
mod session;
mod stapsdt;
mod target;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hakctl",
    version,
    about = "Watch the hakmem allocator's decisions live, in an unmodified running process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the hakmem probes in a process (PID) or an ELF file, and whether each is enabled.
    Probes {
        /// A process id or a path to libhakmem.so / a binary with hakmem inside.
        target: String,
    },
    /// Attach and refresh live: totals, rates, stage hit rates, recycle funnel, failures, histograms.
    Watch {
        pid: i32,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many seconds (default: until Ctrl-C or the target exits).
        #[arg(long)]
        duration: Option<f64>,
        /// One JSON document per refresh (schema: docs/json-schema.md).
        #[arg(long)]
        json: bool,
        /// Also attach tls_drain and remote_drain (a trap per thread-cache drain:
        /// a busy program can run 10-15% slower while watched).
        #[arg(long)]
        drains: bool,
    },
    /// Attach for a while, then print per-class stage hit rates, legacy fallbacks and recycle outcomes.
    StageStats {
        pid: i32,
        /// Seconds to collect (default: until Ctrl-C or the target exits).
        #[arg(long)]
        duration: Option<f64>,
        /// Print the raw counts as JSON (schema: docs/json-schema.md).
        #[arg(long)]
        json: bool,
        /// Also attach tls_drain and remote_drain (see `watch --drains`).
        #[arg(long)]
        drains: bool,
    },
    /// One line per probe event, through a ring buffer.
    Trace {
        pid: i32,
        /// Only these probes (repeatable; default: all).
        #[arg(long = "probe")]
        probes: Vec<String>,
        /// Only events of this size class.
        #[arg(long)]
        class: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
    },
    /// Where the process's memory is: bytes in use, in thread caches and resident, per tier and class.
    Mem {
        pid: i32,
        /// One JSON document (schema: docs/json-schema.md).
        #[arg(long)]
        json: bool,
    },
    /// Start CMD with libhakmem.so preloaded and watch it from its first allocation.
    Run {
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long)]
        json: bool,
        /// Also attach tls_drain and remote_drain (see `watch --drains`).
        #[arg(long)]
        drains: bool,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
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
            Command::Probes { target } => commands::probes(&target),
            Command::Watch {
                pid,
                interval,
                duration,
                json,
                drains,
            } => commands::watch(pid, interval, duration, json, drains).await,
            Command::StageStats {
                pid,
                duration,
                json,
                drains,
            } => commands::stage_stats(pid, duration, json, drains).await,
            Command::Trace {
                pid,
                probes,
                class,
                duration,
            } => commands::trace(pid, &probes, class, duration).await,
            Command::Mem { pid, json } => mem::mem(pid, json),
            Command::Run {
                interval,
                json,
                drains,
                cmd,
            } => commands::run(&cmd, interval, json, drains).await,
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
