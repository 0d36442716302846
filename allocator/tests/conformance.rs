//! Differential conformance with glibc as the oracle: `conformance/contract.c`
//! walks glibc's documented allocation contract and prints one normalised
//! line per case (`case -> behaviour`); run once plainly and once under
//! `LD_PRELOAD=libhakmem.so`, the two outputs must agree case by case.
//! `conformance/contract.cc` does the same for the C++ operators, with
//! libstdc++'s as the oracle, except where libstdc++ breaks C++'s own
//! contract (`CXX_DELIBERATE`).
//!
//! `CONFORMANCE_TABLE=path` (and `CONFORMANCE_TABLE_CXX=path`) also writes
//! every case with both results as a Markdown table. Uses the release
//! library (`cargo build --release -p hakmem`), or the one named by
//! `HAKMEM_LIB`.

mod common;
use common::{lib, Scratch};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

/// A contract program and how to build it.
struct Program {
    /// Under `tests/conformance/`.
    source: &'static str,
    /// The variable that names the compiler, and the compiler without it.
    compiler: (&'static str, &'static str),
    flags: &'static [&'static str],
    /// After the source (libraries).
    libs: &'static [&'static str],
    /// The variable that names a file for the Markdown table.
    table_var: &'static str,
    title: &'static str,
    /// Whose behaviour the plain run shows.
    oracle: &'static str,
}

/// A C program built with the C contract's flags, with no table.
const fn c_program(source: &'static str) -> Program {
    Program {
        source,
        compiler: ("CC", "cc"),
        flags: &["-std=c11", "-O1", "-Wall", "-Werror"],
        libs: &[],
        table_var: "",
        title: "",
        oracle: "",
    }
}

/// A C++ program built with the C++ contract's flags, with no table.
const fn cxx_program(source: &'static str) -> Program {
    Program {
        compiler: ("CXX", "c++"),
        flags: &["-std=c++17", "-O1", "-Wall", "-Werror"],
        ..c_program(source)
    }
}

const C_CONTRACT: Program = Program {
    table_var: "CONFORMANCE_TABLE",
    title: "hakmem vs glibc: allocation contract",
    oracle: "glibc",
    ..c_program("contract.c")
};

const CXX_CONTRACT: Program = Program {
    libs: &["-ldl"],
    table_var: "CONFORMANCE_TABLE_CXX",
    title: "hakmem vs libstdc++: the C++ allocation operators",
    oracle: "libstdc++",
    ..cxx_program("contract.cc")
};

/// Replaces two operators (`replaced.cc`).
const REPLACED: Program = Program {
    oracle: "libstdc++",
    ..cxx_program("replaced.cc")
};

/// A C program and the C++ plugin it loads privately (`private-cxx*`).
const PRIVATE_CXX_MAIN: Program = c_program("private-cxx-main.c");
const PRIVATE_CXX_PLUGIN: Program = Program {
    flags: &["-std=c++17", "-O1", "-shared", "-fPIC"],
    ..cxx_program("private-cxx.cc")
};

/// Takes the addresses of `free`, `malloc` and `new` in position-dependent
/// code (`nonpie.cc`).
const NON_PIE: Program = Program {
    flags: &[
        "-std=c++17",
        "-O1",
        "-Wall",
        "-Werror",
        "-fno-pic",
        "-no-pie",
    ],
    ..cxx_program("nonpie.cc")
};

/// A tool preloaded before hakmem that wraps `new` and `delete` with
/// `RTLD_NEXT` (`wrapper-new.cc`), and a program that allocates under it
/// (`wrapped.cc`).
const WRAPPER_NEW: Program = Program {
    flags: &["-std=c++17", "-O1", "-shared", "-fPIC"],
    libs: &["-ldl"],
    ..cxx_program("wrapper-new.cc")
};
const WRAPPED: Program = cxx_program("wrapped.cc");
/// A tool preloaded before hakmem that replaces only `malloc`, `calloc`,
/// `realloc` and `free` (`malloc-tool.c`).
const MALLOC_TOOL: Program = Program {
    flags: &["-std=c11", "-O1", "-Wall", "-Werror", "-shared", "-fPIC"],
    libs: &["-ldl"],
    ..c_program("malloc-tool.c")
};

/// Calls hakmem's `operator new` from a C program (`no-cxx-runtime.c`).
const NO_CXX_RUNTIME: Program = c_program("no-cxx-runtime.c");

/// A case where hakmem answers differently from the oracle on purpose: the
/// oracle's answer breaks the documented contract.
struct Deliberate {
    case: &'static str,
    oracle: &'static str,
    hakmem: &'static str,
}

/// libstdc++ 12's aligned `operator new` rounds the size up to the alignment
/// without checking: SIZE_MAX and SIZE_MAX - 1 wrap to 0 and come back as a
/// zero-byte block, where C++ requires `bad_alloc` (or null from nothrow)
/// after the new-handler loop. hakmem's stub sends such a size to the plain
/// operator instead (`front/cxx.rs`, `cxx_next_new`).
const CXX_DELIBERATE: &[Deliberate] = &[
    Deliberate {
        case: "new(SIZE_MAX, align 64), handler gives up at its 3rd call",
        oracle: "nonnull calls=0",
        hakmem: "threw bad_alloc calls=3",
    },
    Deliberate {
        case: "new(0xffffffffffffffff, align 4096)",
        oracle: "nonnull",
        hakmem: "threw bad_alloc",
    },
    Deliberate {
        case: "new[](0xffffffffffffffff, align 64, nothrow)",
        oracle: "nonnull",
        hakmem: "NULL",
    },
    Deliberate {
        case: "new(0xfffffffffffffffe, align 4096)",
        oracle: "nonnull",
        hakmem: "threw bad_alloc",
    },
    Deliberate {
        case: "new[](0xfffffffffffffffe, align 64, nothrow)",
        oracle: "nonnull",
        hakmem: "NULL",
    },
];

/// Compiles `prog` into `dir`.
fn compile(dir: &Path, prog: &Program) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/conformance")
        .join(prog.source);
    let exe = dir.join(prog.source.replace('.', "-"));
    let (var, default) = prog.compiler;
    let cc = std::env::var(var).unwrap_or_else(|_| default.into());
    let out = Command::new(&cc)
        .args(prog.flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .args(prog.libs)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs the program with no allocator knobs from the caller's environment:
/// under glibc, or under hakmem with its exit tally on stderr.
fn run(exe: &Path, preload: Option<&Path>) -> Output {
    run_with(exe, &[], preload.as_slice())
}

/// `run` with arguments.
fn run_with(exe: &Path, args: &[&Path], preload: &[&Path]) -> Output {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("HAKMEM_")
            || key.starts_with("MALLOC_")
            || key == "GLIBC_TUNABLES"
            || key == "LD_PRELOAD"
        {
            cmd.env_remove(&*key);
        }
    }
    if !preload.is_empty() {
        let libs: Vec<_> = preload.iter().map(|l| l.as_os_str()).collect();
        cmd.env("LD_PRELOAD", libs.join(" ".as_ref()))
            .env("HAKMEM_STATS", "1");
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status:?}"),
    }
}

/// `case -> behaviour` lines, in order.
fn cases(out: &Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.split_once(" -> ") {
            Some((case, got)) => (case.to_string(), got.to_string()),
            None => (l.to_string(), "(malformed line)".to_string()),
        })
        .collect()
}

/// One case with both results; `None` where the run printed no such line
/// (a group that crashed before reaching it).
struct Row {
    case: String,
    glibc: Option<String>,
    hakmem: Option<String>,
}

impl Row {
    fn differs(&self) -> bool {
        self.glibc != self.hakmem
    }

    /// Differs as a deliberate entry says: hakmem gives the contract's
    /// answer, the oracle the one listed (or, fixed, the contract's too).
    fn is_deliberate(&self, deliberate: &[Deliberate]) -> bool {
        deliberate.iter().any(|d| {
            let oracle = self.glibc.as_deref().map(str::trim);
            d.case == self.case
                && self.hakmem.as_deref().map(str::trim) == Some(d.hakmem)
                && (oracle == Some(d.oracle) || oracle == Some(d.hakmem))
        })
    }
}

/// Every case of the glibc run in its order, then any only hakmem printed.
fn rows(glibc: &[(String, String)], hakmem: &[(String, String)]) -> Vec<Row> {
    let hak: HashMap<&str, &str> = hakmem
        .iter()
        .map(|(c, r)| (c.as_str(), r.as_str()))
        .collect();
    let seen: HashSet<&str> = glibc.iter().map(|(c, _)| c.as_str()).collect();
    let mut rows: Vec<Row> = glibc
        .iter()
        .map(|(case, got)| Row {
            case: case.clone(),
            glibc: Some(got.clone()),
            hakmem: hak.get(case.as_str()).map(|s| (*s).to_owned()),
        })
        .collect();
    rows.extend(
        hakmem
            .iter()
            .filter(|(c, _)| !seen.contains(c.as_str()))
            .map(|(case, got)| Row {
                case: case.clone(),
                glibc: None,
                hakmem: Some(got.clone()),
            }),
    );
    rows
}

fn cell(s: Option<&String>) -> String {
    match s {
        Some(s) => format!("`{}`", s.trim().replace('|', "\\|")),
        None => "*(not printed)*".to_string(),
    }
}

/// A Markdown table of `rows`, with a marker column when `mark` is set.
fn table<'a>(rows: impl IntoIterator<Item = &'a Row>, oracle: &str, mark: bool) -> String {
    let mut t = if mark {
        format!("| | case | {oracle} | hakmem |\n|---|---|---|---|\n")
    } else {
        format!("| case | {oracle} | hakmem |\n|---|---|---|\n")
    };
    for r in rows {
        if mark {
            t.push_str(if r.differs() { "| ✗ " } else { "| " });
        }
        t.push_str(&format!(
            "| {} | {} | {} |\n",
            cell(Some(&r.case)),
            cell(r.glibc.as_ref()),
            cell(r.hakmem.as_ref())
        ));
    }
    t
}

#[test]
fn hakmem_keeps_glibcs_allocation_contract() {
    check_against_oracle(&C_CONTRACT, &[]);
}

#[test]
fn hakmem_exports_the_cxx_operators_and_keeps_their_contract() {
    let (oracle, hakmem) = check_against_oracle(&CXX_CONTRACT, CXX_DELIBERATE);
    // The program names the library each operator's name resolves to.
    let from = |out: &Output| -> Vec<(String, String)> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| l.strip_prefix("operator "))
            .filter_map(|l| l.split_once(" from: "))
            .map(|(name, lib)| (name.to_owned(), lib.to_owned()))
            .collect()
    };
    // ... and hakmem says it serves them (with HAKMEM_STATS=1, as `run` sets).
    let said = String::from_utf8_lossy(&hakmem.stderr);
    assert!(said.contains("hakmem-cxx: serve\n"), "{said}");
    let (ours, theirs) = (from(&hakmem), from(&oracle));
    assert_eq!(ours.len(), 20, "{ours:?}");
    assert_eq!(theirs.len(), 20, "{theirs:?}");
    let not_ours: Vec<_> = ours
        .iter()
        .filter(|(_, l)| !l.contains("libhakmem"))
        .collect();
    assert!(
        not_ours.is_empty(),
        "under the preload, not hakmem's: {not_ours:?}"
    );
    assert!(
        theirs.iter().all(|(_, l)| !l.contains("libhakmem")),
        "without the preload: {theirs:?}"
    );
}

/// A program that replaces `new` and `delete` (only those two) keeps its
/// own for every form under the preload: hakmem's forward to the C++
/// runtime's, which call the program's.
#[test]
fn a_program_that_replaces_two_operators_keeps_them_for_every_form() {
    let (_, hakmem) = check_against_oracle(&REPLACED, &[]);
    let said = String::from_utf8_lossy(&hakmem.stderr);
    assert!(
        said.contains("hakmem-cxx: forward (_Znwm is defined before hakmem)"),
        "{said}"
    );
    let out = String::from_utf8_lossy(&hakmem.stdout);
    assert!(
        out.contains("delete int (sized) -> - news+0 deletes+1"),
        "{out}"
    );
    assert!(!out.contains("NOT-in-arena"), "{out}");
}

/// A position-dependent program's canonical PLT entries (what `dlsym`
/// returns for `free` when the program takes its address) are no
/// definitions: hakmem still serves.
#[test]
fn a_non_pie_program_that_takes_free_s_address_is_served() {
    let dir = Scratch::new("nonpie");
    let exe = compile(&dir, &NON_PIE);
    let out = run(&exe, Some(&lib()));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{}: {stderr}", describe(out.status));
    assert!(stdout.contains("addresses taken -> distinct"), "{stdout}");
    assert!(stderr.contains("hakmem-cxx: serve\n"), "{stderr}");
}

/// A C program that loads a C++ plugin privately (`RTLD_LOCAL`): hakmem's
/// `new`, which the plugin's calls reach, finds the runtime there and the
/// plugin catches `bad_alloc`, as without the preload.
#[test]
fn a_privately_loaded_cxx_runtime_still_throws_bad_alloc() {
    let dir = Scratch::new("private-cxx");
    let plugin = compile(&dir, &PRIVATE_CXX_PLUGIN);
    let main = compile(&dir, &PRIVATE_CXX_MAIN);
    let plain = run_with(&main, &[&plugin], &[]);
    let preloaded = run_with(&main, &[&plugin], &[&lib()]);
    let (plain_out, ours) = (
        String::from_utf8_lossy(&plain.stdout),
        String::from_utf8_lossy(&preloaded.stdout),
    );
    assert!(
        plain_out.contains("-> caught bad_alloc"),
        "without the preload: {plain_out}"
    );
    assert_eq!(
        ours,
        plain_out,
        "{}; stderr: {}",
        describe(preloaded.status),
        String::from_utf8_lossy(&preloaded.stderr)
    );
    assert!(preloaded.status.success(), "{}", describe(preloaded.status));
}

/// Runs `wrapped.cc` under `tool` alone and under `tool` then hakmem, both
/// preloaded; both must succeed, print the same (1000 `new`s, then a `new`
/// that throws `bad_alloc`), and hakmem must say it forwards because of
/// `name`. Returns the count the tool prints after `count` in each run.
fn wrapped_under_a_tool_before_hakmem(tool: &Program, name: &str, count: &str) -> (u64, u64) {
    let dir = Scratch::new(&format!("tool-{name}"));
    let tool = compile(&dir, tool);
    let exe = compile(&dir, &WRAPPED);
    let alone = run_with(&exe, &[], &[&tool]);
    let both = run_with(&exe, &[], &[&tool, &lib()]);
    let said = String::from_utf8_lossy(&both.stderr);
    assert!(alone.status.success(), "{}", describe(alone.status));
    assert!(both.status.success(), "{}: {said}", describe(both.status));
    let theirs = String::from_utf8_lossy(&alone.stdout);
    assert!(
        theirs.contains("new(SIZE_MAX / 2) -> threw bad_alloc"),
        "{theirs}"
    );
    assert_eq!(String::from_utf8_lossy(&both.stdout), theirs, "{said}");
    let forward = format!("hakmem-cxx: forward ({name} is defined before hakmem)");
    assert!(said.contains(&forward), "{said}");
    let seen = |out: &Output| {
        let err = String::from_utf8_lossy(&out.stderr);
        err.lines()
            .find_map(|l| l.strip_prefix(count))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no count from the tool: {err}"))
    };
    (seen(&alone), seen(&both))
}

/// A wrapper preloaded before hakmem (a heap profiler's way) sees every
/// `new`, reaches hakmem's through `RTLD_NEXT`, and the program runs as with
/// the wrapper alone: hakmem forwards to the C++ runtime's operator, found
/// after hakmem, not to the first definition (the wrapper: an endless loop).
#[test]
fn a_wrapper_preloaded_before_hakmem_sees_every_new_and_nothing_loops() {
    let (alone, both) =
        wrapped_under_a_tool_before_hakmem(&WRAPPER_NEW, "_Znwm", "wrapper-new: news=");
    // Every `new` of the program (1001), and what the runtime makes.
    assert!(alone > 1000, "{alone}");
    assert_eq!(both, alone);
}

/// A tool preloaded before hakmem that replaces only the C functions (a
/// counter, a leak checker) still sees a C++ program's `new`: hakmem's
/// operators forward to the C++ runtime's, which call `malloc`. Served by
/// hakmem instead, the tool would count a handful of mallocs, not 1000.
#[test]
fn a_malloc_tool_preloaded_before_hakmem_sees_every_new() {
    let (_, both) =
        wrapped_under_a_tool_before_hakmem(&MALLOC_TOOL, "malloc", "malloc-tool: mallocs=");
    assert!(both >= 1000, "{both}");
}

/// With no C++ runtime to throw `bad_alloc`, a failed `operator new` aborts
/// with a message naming it: it must neither return null nor hang.
#[test]
fn operator_new_with_no_cxx_runtime_aborts_naming_the_operator() {
    let dir = Scratch::new("no-cxx");
    let exe = compile(&dir, &NO_CXX_RUNTIME);
    let out = run(&exe, Some(&lib()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("new(100) -> nonnull"), "stdout: {stdout}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{}; stdout: {stdout}; stderr: {stderr}",
        describe(out.status)
    );
    assert!(
        stderr.contains("hakmem: _Znwm: out of memory, and no C++ runtime is loaded"),
        "stderr: {stderr}"
    );
}

/// Runs `prog` plainly and under hakmem and fails on any case whose two
/// results differ, other than the `deliberate` ones. Returns both runs.
fn check_against_oracle(prog: &Program, deliberate: &[Deliberate]) -> (Output, Output) {
    let lib = lib();
    let dir = Scratch::new(&format!("conformance-{}", prog.source));
    let exe = compile(&dir, prog);
    let glibc = run(&exe, None);
    let hakmem = run(&exe, Some(&lib));

    let (g, h) = (cases(&glibc), cases(&hakmem));
    let rows = rows(&g, &h);
    let differing: Vec<&Row> = rows
        .iter()
        .filter(|r| r.differs() && !r.is_deliberate(deliberate))
        .collect();
    if let Some(path) = std::env::var_os(prog.table_var) {
        let md = format!(
            "# {}\n\n{} cases, {} differ{}.\n\n{}",
            prog.title,
            rows.len(),
            rows.iter().filter(|r| r.differs()).count(),
            if deliberate.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} on purpose: the oracle breaks the documented contract there; \
                     see `tests/conformance.rs`)",
                    deliberate.len()
                )
            },
            table(&rows, prog.oracle, true)
        );
        std::fs::write(&path, md)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.to_string_lossy()));
    }
    println!(
        "conformance ({}): {} cases, {} differ from the oracle",
        prog.source,
        rows.len(),
        differing.len()
    );

    let hak_stderr = String::from_utf8_lossy(&hakmem.stderr);
    let mut problems = Vec::new();
    if !glibc.status.success() {
        problems.push(format!(
            "the program itself failed without the preload ({}):\n{}",
            describe(glibc.status),
            String::from_utf8_lossy(&glibc.stderr)
        ));
    }
    if !hakmem.status.success() {
        problems.push(format!(
            "the program failed under hakmem ({})",
            describe(hakmem.status)
        ));
    }
    if !hak_stderr.contains("hakmem-stats:") {
        problems.push(format!(
            "no `hakmem-stats:` line on stderr: {} was not loaded",
            lib.display()
        ));
    }
    let mut unique = HashSet::new();
    let dups: Vec<&str> = g
        .iter()
        .map(|(c, _)| c.as_str())
        .filter(|c| !unique.insert(*c))
        .collect();
    if !dups.is_empty() {
        problems.push(format!("case names printed twice: {dups:?}"));
    }
    for d in deliberate {
        if !rows
            .iter()
            .any(|r| r.is_deliberate(std::slice::from_ref(d)))
        {
            problems.push(format!(
                "deliberate difference no longer seen (the oracle or hakmem changed): {:?}: \
                 oracle {:?}, hakmem {:?}",
                d.case, d.oracle, d.hakmem
            ));
        }
    }
    if !differing.is_empty() {
        let mut msg = format!(
            "{} of {} cases differ from the oracle:\n\n{}",
            differing.len(),
            rows.len(),
            table(differing, prog.oracle, false)
        );
        // What hakmem said (an abort's reason), without its tally.
        let said: Vec<&str> = hak_stderr
            .lines()
            .filter(|l| !l.starts_with("hakmem-stats:"))
            .take(40)
            .collect();
        if !said.is_empty() {
            msg.push_str("\nstderr under hakmem (first lines):\n");
            msg.push_str(&said.join("\n"));
        }
        problems.push(msg);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    (glibc, hakmem)
}
