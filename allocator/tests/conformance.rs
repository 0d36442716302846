//! Differential conformance with glibc as the oracle: `conformance/contract.c`
//! walks glibc's documented allocation contract and prints one normalised
//! line per case (`case -> behaviour`); run once plainly and once under
//! `LD_PRELOAD=libhakmem.so`, the two outputs must agree case by case.
//!
//! `CONFORMANCE_TABLE=path` also writes every case with both results as a
//! Markdown table. Uses the release library (`cargo build --release -p
//! hakmem`), or the one named by `HAKMEM_LIB`.

mod common;
use common::lib;
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

/// Compiles the contract program into `dir`.
fn compile(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/contract.c");
    let exe = dir.join("contract");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
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
    let mut cmd = Command::new(exe);
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
    if let Some(lib) = preload {
        cmd.env("LD_PRELOAD", lib).env("HAKMEM_STATS", "1");
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
fn table<'a>(rows: impl IntoIterator<Item = &'a Row>, mark: bool) -> String {
    let mut t = String::from(if mark {
        "| | case | glibc | hakmem |\n|---|---|---|---|\n"
    } else {
        "| case | glibc | hakmem |\n|---|---|---|\n"
    });
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
    let lib = lib();
    let dir = std::env::temp_dir().join(format!("hakmem-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = compile(&dir);
    let glibc = run(&exe, None);
    let hakmem = run(&exe, Some(&lib));
    let _ = std::fs::remove_dir_all(&dir);

    let (g, h) = (cases(&glibc), cases(&hakmem));
    let rows = rows(&g, &h);
    let differing: Vec<&Row> = rows.iter().filter(|r| r.differs()).collect();
    if let Some(path) = std::env::var_os("CONFORMANCE_TABLE") {
        let md = format!(
            "# hakmem vs glibc: allocation contract\n\n{} cases, {} differ.\n\n{}",
            rows.len(),
            differing.len(),
            table(&rows, true)
        );
        std::fs::write(&path, md)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.to_string_lossy()));
    }
    println!(
        "conformance: {} cases, {} differ from glibc",
        rows.len(),
        differing.len()
    );

    let hak_stderr = String::from_utf8_lossy(&hakmem.stderr);
    let mut problems = Vec::new();
    if !glibc.status.success() {
        problems.push(format!(
            "the program itself failed under glibc ({}):\n{}",
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
    if !differing.is_empty() {
        let mut msg = format!(
            "{} of {} cases differ from glibc:\n\n{}",
            differing.len(),
            rows.len(),
            table(differing, false)
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
}
