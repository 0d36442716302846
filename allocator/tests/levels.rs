//! `hakctl mem` against what a workload knows it holds (the scenario
//! `levels`): at two quiescent points, before and after the workload makes a
//! known set of blocks of every tier (some freed into three live threads'
//! caches, some on a live thread's remote list, some left by a thread that
//! exited), hakctl's bytes in use per tier must grow by exactly the set's
//! usable bytes, what it counts resident must fit under the process's RSS,
//! and the rest of the RSS (the program, its libraries and stacks) stay
//! under a fixed bound. The same on a `strip -s` copy of the binary.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

mod common;
use common::{hakctl, Scratch};
use std::process::{Command, Stdio};

/// What the rest of the RSS may be (the scenario binary, libc, stacks).
const UNACCOUNTED_MAX: u64 = 24 << 20;

fn mem(pid: u32) -> Value {
    let out = Command::new(hakctl())
        .args(["mem", &pid.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hakctl mem: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&doc["schema"], &doc["kind"]),
        (&"hakctl/1".into(), &"mem".into())
    );
    assert!(doc["time_unix_s"].as_f64().unwrap() > 1.7e9, "{doc}");
    doc
}

fn in_use(doc: &Value, tier: &str) -> u64 {
    doc["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["in_use_bytes"][tier].as_u64().unwrap())
        .sum()
}

fn check(binary: &Path, env: &[(&str, &str)]) {
    let mut child = Command::new(binary)
        .arg("levels")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: u32 = line
        .trim()
        .strip_prefix("ready ")
        .expect(&line)
        .parse()
        .unwrap();
    let before = mem(pid);
    assert_eq!(before["copies"].as_array().unwrap().len(), 1, "{before}");
    stdin.write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let held: Vec<u64> = line
        .trim()
        .strip_prefix("held ")
        .expect(&line)
        .split(' ')
        .map(|kv| kv.split_once('=').unwrap().1.parse().unwrap())
        .collect();
    let after = mem(pid);
    stdin.write_all(b"done\n").unwrap();
    assert!(child.wait().unwrap().success());
    // mallinfo2's figures come from the gauges hakctl reads: they agree.
    let c = &after["copies"][0];
    let large_mapped = c["large"]["mapped_bytes"].as_u64().unwrap();
    assert_eq!(
        held[4],
        c["mapped_bytes"].as_u64().unwrap() - large_mapped,
        "arena: {c}"
    );
    assert_eq!(
        held[5],
        c["large"]["blocks"].as_u64().unwrap(),
        "hblks: {c}"
    );
    assert_eq!(held[6], large_mapped, "hblkhd: {c}");
    for (tier, want) in ["tiny", "ace", "large", "parcel"].iter().zip(&held) {
        let grew = in_use(&after, tier) as i64 - in_use(&before, tier) as i64;
        assert_eq!(grew, *want as i64, "{tier}: hakctl saw {grew} more bytes in use, the workload holds {want}\nbefore {before}\nafter {after}");
    }
    assert_eq!(
        c["threads"].as_u64(),
        Some(4),
        "main and three live workers listed: {c}"
    );
    let legacy = env.contains(&("HAKMEM_TINY_USE_SUPERSLAB", "0"));
    if !legacy {
        assert!(c["remote_list_bytes"].as_u64().unwrap() >= 50 * 48, "{c}");
    }
    assert!(
        c["thread_cache_bytes"]["tiny"].as_u64().unwrap() >= 3 * 100 * 64,
        "{c}"
    );
    let (rss, accounted) = (
        after["rss_bytes"].as_u64().unwrap(),
        after["accounted_resident_bytes"].as_u64().unwrap(),
    );
    assert!(accounted <= rss, "accounted {accounted} > RSS {rss}");
    assert!(
        rss - accounted <= UNACCOUNTED_MAX,
        "unaccounted {} > {UNACCOUNTED_MAX}",
        rss - accounted
    );
}

#[test]
fn hakctl_mem_sees_exactly_what_the_workload_holds() {
    check(Path::new(env!("CARGO_BIN_EXE_hakmem-scenario")), &[]);
}

#[test]
fn hakctl_mem_sees_exactly_what_the_legacy_path_holds() {
    // Every tiny block from the legacy allocator (its gauge, no slabs).
    check(
        Path::new(env!("CARGO_BIN_EXE_hakmem-scenario")),
        &[("HAKMEM_TINY_USE_SUPERSLAB", "0")],
    );
}

#[test]
fn hakctl_mem_reads_a_stripped_binary_too() {
    let dir = Scratch::new("levels");
    let copy = dir.join("hakmem-scenario-stripped");
    std::fs::copy(env!("CARGO_BIN_EXE_hakmem-scenario"), &copy).unwrap();
    let st = Command::new("strip").arg("-s").arg(&copy).status().unwrap();
    assert!(st.success());
    let syms = Command::new("nm").arg(&copy).output().unwrap();
    assert!(
        !syms.status.success() || syms.stdout.is_empty(),
        "strip -s left symbols"
    );
    check(&copy, &[]);
}
