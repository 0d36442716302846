//! Each allocator path, driven end to end by `hakmem-scenario` in a child
//! process (so the knobs are real environment variables and the test harness's
//! own threads do not disturb the counts). Assertions are on the tally of
//! exactly the scenario's workload.

use serde_json::Value;
use std::process::Command;

/// Every scenario runs in seconds; a hang (a lock taken twice, say) fails the test.
const DEADLINE_SECS: u64 = 120;

fn scenario(name: &str, env: &[(&str, &str)]) -> Value {
    tally_of(&scenario_stdout(name, env))
}

/// Runs scenario `name` (which must succeed) and returns what it printed.
fn scenario_stdout(name: &str, env: &[(&str, &str)]) -> String {
    let out = run_with_deadline(name, env, DEADLINE_SECS);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scenario {name} failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The `tally: {json}` line of a scenario's output.
fn tally_of(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tally: "))
        .expect("tally line");
    serde_json::from_str(line).expect("tally is JSON")
}

fn class(t: &Value, c: usize) -> &Value {
    &t["classes"][c]
}

fn n(v: &Value) -> u64 {
    v.as_u64().expect("counter")
}

#[test]
fn remote_free_drain_recycle_then_stage1_hit_in_another_class() {
    let t = scenario("recycle", &[]);
    let c7 = class(&t, 7);
    // The freeing thread takes each of the 4 slabs (`tiny::take_slab`) at
    // its second try, the owner (waiting for the join) having made no slow
    // path since the first: tries come when the remote list is about to
    // hold half the slab's 63-64 blocks and at every 16th block after, so a
    // slab is taken with 31 or 47 blocks on its list, which the taker
    // drains; its other frees are its own. (Before slabs were taken, the
    // owner drained all 256.)
    let drained = n(&c7["remote_drain_blocks"]);
    assert!(
        (4 * 30..=4 * 47).contains(&drained),
        "each slab was taken at its second try past half: {c7}"
    );
    assert!(
        n(&c7["recycle"]["empty"]) >= 2,
        "class 7 slabs were detected EMPTY: {c7}"
    );
    assert!(
        n(&c7["recycle"]["released"]) >= 2,
        "and released to the pool: {c7}"
    );
    assert!(
        n(&class(&t, 3)["stage1"]) >= 1,
        "class 3 was served from the Stage 1 list: {}",
        class(&t, 3)
    );
    assert_eq!(n(&t["probes"]["shared_fail"]), 0);
}

#[test]
fn superslab_budget_sends_requests_to_legacy() {
    let t = scenario("legacy", &[("HAKMEM_SS_MAX", "1")]);
    let fails: u64 = (0..8)
        .map(|c| n(&class(&t, c)["shared_fail"]["budget"]))
        .sum();
    let legacy: u64 = (0..8).map(|c| n(&class(&t, c)["legacy_blocks"])).sum();
    assert!(fails > 0, "Stage 3 hit the budget: {t}");
    assert_eq!(n(&t["probes"]["shared_fail"]), fails);
    assert_eq!(
        n(&t["probes"]["legacy_refill"]),
        fails,
        "each failure is served by one legacy refill"
    );
    assert!(legacy > 0);
    assert_eq!(
        n(&t["probes"]["ss_map"]),
        0,
        "no SuperSlab beyond the budget"
    );
}

#[test]
fn superslab_off_serves_everything_from_legacy() {
    let t = scenario("legacy", &[("HAKMEM_TINY_USE_SUPERSLAB", "0")]);
    assert_eq!(n(&t["probes"]["ss_acquire"]), 0);
    assert_eq!(n(&t["probes"]["shared_fail"]), 0);
    assert!(n(&t["probes"]["legacy_refill"]) > 0);
}

#[test]
fn ace_threshold_failures() {
    let t = scenario("ace", &[("HAKMEM_ACE_MAX_BYTES", "16384")]);
    assert_eq!(
        n(&t["ace_fail"]["threshold"]),
        100,
        "every 30000-byte request is above the threshold: {t}"
    );
    assert_eq!(n(&t["ace_fail"]["exhaustion"]), 0);
}

#[test]
fn ace_exhaustion_failures() {
    // The 100 blocks of 30,000 bytes take the 30 KiB class: one 2 MiB segment
    // (4 KiB of header, blocks 30 KiB + 64 bytes apart) holds 67 of them, and
    // the other 33 exhaust the class. The 100 of 3,000 bytes fit in one segment.
    let t = scenario("ace", &[("HAKMEM_ACE_MAX_SEGMENTS", "1")]);
    assert_eq!(n(&t["ace_fail"]["exhaustion"]), 33, "{t}");
    assert_eq!(n(&t["ace_fail"]["threshold"]), 0);
}

#[test]
fn ace_map_failures_and_enomem() {
    let t = scenario("ace-mapfail", &[("HAKMEM_OS_LIMIT_MB", "16")]);
    assert!(n(&t["ace_fail"]["map_fail"]) >= 1, "{t}");
}

#[test]
fn multithreaded_stress_with_cross_thread_frees_keeps_contents() {
    let t = scenario("stress", &[]);
    let remote: u64 = (0..8)
        .map(|c| n(&class(&t, c)["remote_drain_blocks"]))
        .sum();
    assert!(remote > 0, "the stress handed blocks across threads: {t}");
}

#[test]
fn a_freed_burst_of_superslabs_serves_the_next_burst_from_stage_1_then_goes_back() {
    let stdout = scenario_stdout("burst", &[]);
    let t = tally_of(&stdout);
    let (made, retired) = (n(&t["probes"]["ss_map"]), n(&t["probes"]["ss_unmap"]));
    // The second burst took the first's EMPTY slabs (Stage 1): no new
    // SuperSlab, no page fault.
    let c6 = class(&t, 6);
    assert!((12..=20).contains(&made), "one burst's SuperSlabs: {t}");
    assert_eq!(n(&c6["stage3"]), made, "{c6}");
    assert!(
        n(&c6["stage1"]) >= 400,
        "the second burst's 470 slabs or so: {c6}"
    );
    // Once purged (the idle second), they left the pool.
    assert!(
        retired >= made - 4,
        "all but the kept SuperSlabs were retired: {t}"
    );
    let cache = &t["large_cache"];
    let (peak, after) = kept_at_first(&stdout, 8 * 1024);
    assert!(
        after * 2 < peak,
        "RSS fell after the reserve's idle second: {peak} -> {after} KiB"
    );
    // Their pages went back as EMPTY slabs (purged) or as chunks (idle).
    let returned = &cache["returned_bytes"];
    assert!(
        n(&returned["slabs"]) + n(&returned["idle"]) >= 20 << 20,
        "{t}"
    );
}

#[test]
fn buffers_grown_by_realloc_share_chunks_and_their_page_tables() {
    let stdout = scenario_stdout("grown", &[]);
    // 3,000 buffers of 40-250 KB (about 430 MB): with a 2 MiB chunk each,
    // 12 MB of page tables; eight to a chunk, about 1.5 MB.
    let pte = number_after(&stdout, "vmpte_kib=");
    assert!(pte < 4 * 1024, "{stdout}");
    // Freed (half by the other thread) and trimmed: the chunks went back.
    let after = rss_field(&stdout, "after=");
    assert!(after < 64 * 1024, "{stdout}");
    // The large cache tells parcel chunks apart: at least 3,000 / 8 of
    // them, and no large block (every buffer fits a parcel's 252 KiB).
    let by_user = &tally_of(&stdout)["large_cache"]["by_user"];
    let takes = |user: &str| n(&by_user[user]["fresh"]) + n(&by_user[user]["cached"]);
    assert!(takes("parcel") >= 375, "{by_user}");
    assert_eq!(takes("large"), 0, "{by_user}");
}

#[test]
fn threads_that_freed_a_burst_and_stay_alive_give_back_their_empty_slabs_pages() {
    // Eight threads free about 10 MB each and stay alive: their active
    // slabs and cached blocks keep most SuperSlabs from retiring, so this is
    // the EMPTY slabs' pages going back (75 MB stayed before they did).
    let stdout = scenario_stdout("threads-burst", &[]);
    let (peak, after) = kept_at_first(&stdout, 8 * 1024);
    assert!(peak >= 60 * 1024, "{stdout}");
    assert!(after * 3 < peak, "given back after the delays: {stdout}");
    let t = tally_of(&stdout);
    assert!(
        n(&t["large_cache"]["returned_bytes"]["slabs"]) >= 20 << 20,
        "{t}"
    );
}

#[test]
fn an_idle_process_gets_a_freed_burst_back_only_with_the_purge_thread() {
    // 100 MiB of small blocks freed, then 1.5 s without an allocator call.
    let without = scenario_stdout("idle-burst", &[]);
    let (peak, after) = peak_and_after(&without);
    assert!(peak >= 90 * 1024, "{without}");
    assert!(
        after + 10 * 1024 >= peak,
        "no allocator call, no thread: kept for reuse: {without}"
    );
    let with = scenario_stdout("idle-burst", &[("HAKMEM_PURGE_THREAD", "1")]);
    let (peak, after) = kept_at_first(&with, 10 * 1024);
    assert!(after * 4 < peak, "the purge thread returned it: {with}");
}

/// `rss_kib peak=P freed=F after=A` from a scenario's output, checking that
/// what was freed stayed for reuse at first (F within `slack_kib` of P).
fn kept_at_first(stdout: &str, slack_kib: u64) -> (u64, u64) {
    let (peak, after) = peak_and_after(stdout);
    let freed = rss_field(stdout, "freed=");
    assert!(
        freed + slack_kib >= peak,
        "kept for reuse at first: {stdout}"
    );
    (peak, after)
}

/// `rss_kib peak=P after=A` from a scenario's output.
fn peak_and_after(stdout: &str) -> (u64, u64) {
    (rss_field(stdout, "peak="), rss_field(stdout, "after="))
}

#[test]
fn threads_beyond_the_thread_list_own_no_slab_and_keep_their_blocks() {
    // Again with every free checked: the key a free leaves in a block is
    // cleared when the block is handed out again.
    for env in [&[][..], &[("HAKMEM_CHECK_FREES", "1")]] {
        let out = scenario_stdout("beyond-list", env);
        // While only the two threads beyond the list ran: 2 x 50 rounds
        // of 200 blocks, each taken one at a time.
        assert_eq!(
            number_after(&out, "beyond-list acquired: "),
            0,
            "a thread with no owner id took a slab ({env:?})"
        );
        assert!(number_after(&out, "beyond-list legacy: ") >= 2 * 50 * 200);
    }
}

/// The number that follows `prefix` at the start of a line of a scenario's output.
fn number_after(stdout: &str, prefix: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?}: {stdout}"))
}

/// One `key=value` of the `rss_kib` lines of a scenario's output.
fn rss_field(stdout: &str, key: &str) -> u64 {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("rss_kib "))
        .flat_map(str::split_whitespace)
        .find_map(|kv| kv.strip_prefix(key))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_large_cache_keeps_barely_touched_blocks_and_returns_touched_ones() {
    let stdout = scenario_stdout("large-cache", &[]);
    let reused = number_after(&stdout, "large_reused ");
    // Counting whole blocks, 64 MiB of cache held 63 of them.
    assert!(reused >= 450, "{stdout}");
    // 100 blocks of 1.9 MiB written whole: 190 MiB at the peak. Freed as a
    // burst, they wait 100 ms for reuse; after that the cache keeps 64 MiB.
    let (peak, after) = kept_at_first(&stdout, 10 * 1024);
    assert!(peak >= after + 100 * 1024, "{stdout}");
    // The reserve (up to 64 MiB of those blocks) goes at a trim.
    let trim = stdout
        .lines()
        .find_map(|l| l.strip_prefix("trim returned=true rss_kib="))
        .unwrap_or_else(|| panic!("the trim returned memory: {stdout}"));
    let trimmed: u64 = trim.parse().unwrap();
    assert!(after >= trimmed + 32 * 1024, "{stdout}");
}

#[test]
fn mid_size_callocs_write_only_what_may_not_read_zero() {
    // Also with every free checked: the key a taken block's second word
    // holds is cleared as it goes to the caller, within what calloc clears.
    for env in [&[][..], &[("HAKMEM_CHECK_FREES", "1")][..]] {
        let stdout = scenario_stdout("calloc-sparse", env);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("calloc_sparse "))
            .unwrap_or_else(|| panic!("no calloc_sparse line ({env:?}): {stdout}"));
        assert!(
            line.contains("fresh_zero=true reused_zero=true"),
            "{env:?}: {stdout}"
        );
        // 1000 blocks of 200,000 bytes and 1000 of 20,000, one byte touched
        // in each: 215 MiB when every block was cleared (193 of them for the
        // big ones); now a page or two each for the big ones, and three of
        // four of the small ones cleared (one refill's first block is known
        // zero).
        let grown: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grown_kib="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no grown_kib ({env:?}): {stdout}"));
        assert!(grown < 48 * 1024, "{env:?}: {stdout}");
    }
}

#[test]
fn without_a_purge_delay_a_freed_burst_goes_back_at_once() {
    let stdout = scenario_stdout("large-cache", &[("HAKMEM_PURGE_DELAY_MS", "0")]);
    let (peak, _) = peak_and_after(&stdout);
    let freed = rss_field(&stdout, "freed=");
    assert!(peak >= freed + 100 * 1024, "{stdout}");
}

#[test]
fn threads_that_only_free_mid_size_blocks_leave_nothing_behind_when_they_exit() {
    let stdout = scenario_stdout("ace-free-threads", &[]);
    // 300 threads each freed 48 blocks of 40 KiB. Without the exit hook,
    // each left the blocks its cache held: 24 MiB more after the rounds.
    let (first, last) = (rss_field(&stdout, "first="), rss_field(&stdout, "last="));
    assert!(last <= first + 2048, "{stdout}");
}

#[test]
fn a_freed_burst_of_ace_segments_waits_in_the_large_cache_and_the_class_then_goes_back() {
    let stdout = scenario_stdout("ace-burst", &[]);
    // 192 MiB of 32 KiB blocks; the class keeps 4 free segments (8 MiB), the
    // large cache 64 MiB after the burst delay.
    let (peak, after) = kept_at_first(&stdout, 10 * 1024);
    assert!(peak >= 180 * 1024, "{stdout}");
    assert!(after + 100 * 1024 <= peak, "{stdout}");
    // The class keeps 4 segments (about 8 MiB) resident after the large
    // cache's reserve has gone back, and gives their pages back 10 s later
    // (before it did, 11.7 MiB stayed for good).
    let (idle, kept) = (rss_field(&stdout, "idle="), rss_field(&stdout, "kept="));
    assert!(kept + 7 * 1024 <= idle && kept < 8 * 1024, "{stdout}");
    let t = tally_of(&stdout);
    assert!(
        n(&t["large_cache"]["returned_bytes"]["ace"]) >= 7 << 20,
        "{t}"
    );
    // Without a purge delay they go back at the first chance: already gone
    // when the large cache's reserve has.
    let stdout = scenario_stdout("ace-burst", &[("HAKMEM_PURGE_DELAY_MS", "0")]);
    assert!(rss_field(&stdout, "idle=") < 8 * 1024, "{stdout}");
}

#[test]
fn the_large_cache_counts_what_a_reused_chunk_still_holds() {
    let stdout = scenario_stdout("large-stale", &[]);
    // 60 chunks of 1.9 MiB written whole pass through a cache of 64 MiB;
    // counting only what the last (small) users asked for kept all 111 MiB
    // (here: after the burst delay, when what is beyond 64 MiB goes back).
    let (before, after) = (rss_field(&stdout, "before="), rss_field(&stdout, "after="));
    assert!(after < before + 80 * 1024, "{stdout}");
}

/// Runs a scenario with a deadline (a hang is a deadlock, not a slow test).
fn run_with_deadline(name: &str, env: &[(&str, &str)], secs: u64) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hakmem-scenario"))
        .arg(name)
        .env("HAKMEM_STATS", "1")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("scenario {name} still running after {secs}s: deadlock?");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn fork_from_a_multithreaded_process_then_allocate_and_exec() {
    let out = run_with_deadline("fork", &[], DEADLINE_SECS);
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn out_of_memory_returns_null_with_enomem_and_fires_the_probes() {
    let t = scenario("oom", &[]);
    let map_failed: u64 = (0..8)
        .map(|c| n(&class(&t, c)["shared_fail"]["map_failed"]))
        .sum();
    assert!(map_failed >= 1, "Stage 3 could not map: {t}");
    assert!(n(&t["ace_fail"]["map_fail"]) >= 1, "ACE could not map: {t}");
}

#[test]
fn a_thread_freeing_into_two_idle_owners_slabs_in_turn_takes_both() {
    // Before, a taker remembered only its last try: 0 takes.
    let out = scenario_stdout("take-two-owners", &[]);
    assert_eq!(number_after(&out, "takes: "), 2, "{out}");
}

#[test]
fn a_request_no_mapping_could_hold_keeps_the_caches() {
    // With 32 MiB in the chunk cache: 2^45 bytes (beyond memory and swap,
    // where overcommit's heuristic applies) and 4 GiB beyond an RLIMIT_AS,
    // through malloc, calloc and a chunk-aligned allocation. Before, each
    // refusal emptied the cache (33,587,200 bytes given back).
    let out = scenario_stdout("hopeless", &[]);
    assert_eq!(number_after(&out, "hopeless gave back: "), 0, "{out}");
    assert_eq!(number_after(&out, "curable gave back: "), 0, "{out}");
    // Beyond a budget too; but a request that memory given back can serve
    // still empties the cache and is served.
    let out = scenario_stdout("hopeless", &[("HAKMEM_OS_LIMIT_MB", "64")]);
    assert_eq!(number_after(&out, "hopeless gave back: "), 0, "{out}");
    assert!(
        number_after(&out, "curable gave back: ") >= 32 << 20,
        "{out}"
    );
}

#[test]
fn double_free_aborts_with_a_message_or_is_ignored_by_request() {
    use std::os::unix::process::ExitStatusExt;
    let out = run_with_deadline("double-free", &[], 30);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
    assert!(
        stderr.contains("hakmem: free(): double free detected"),
        "{stderr}"
    );
    let out = run_with_deadline("double-free", &[("HAKMEM_INVALID_FREE", "ignore")], 30);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("(ignored)").count(),
        2,
        "the tiny and the large double free: {stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("survived"));
}

#[test]
fn foreign_pointer_free_aborts_with_a_message() {
    use std::os::unix::process::ExitStatusExt;
    let out = run_with_deadline("foreign-free", &[], 30);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
    assert!(
        stderr.contains("hakmem: free(): invalid pointer: 0x"),
        "{stderr}"
    );
}

#[test]
fn a_large_block_freed_again_after_its_chunk_became_an_ace_segment_is_caught() {
    use std::os::unix::process::ExitStatusExt;
    let out = run_with_deadline("stale-free", &[], 30);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("chunk reused: true"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
    assert!(
        stderr.contains("hakmem: free(): invalid pointer: 0x"),
        "{stderr}"
    );
    let out = run_with_deadline("stale-free", &[("HAKMEM_INVALID_FREE", "ignore")], 30);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("survived"));
}

#[test]
fn slabs_abandoned_by_an_exited_thread_come_back_when_their_blocks_are_freed() {
    let t = scenario(
        "abandon",
        &[("HAKMEM_SS_KEEP", "0"), ("HAKMEM_PURGE_DELAY_MS", "0")],
    );
    let c6 = class(&t, 6);
    // 20k blocks of 512 bytes fill about 157 slabs; all but the few that are
    // still some thread's current slab must be released once freed.
    assert!(n(&c6["recycle"]["released"]) >= 150, "{c6}");
    // The main thread's frees go straight back to the orphaned slabs (each
    // while its block pins the slab: `pool::free_unowned`), not through
    // their remote lists.
    assert!(n(&c6["remote_drain_blocks"]) < 1_000, "{c6}");
    assert!(n(&t["probes"]["ss_unmap"]) >= 4, "{t}");
}

/// A race forced by `hakmem::test_hooks` (see `race_orphan` in the scenario
/// driver): the window is held open while another thread frees the slab's
/// last blocks and the chunk goes back to the OS. The scenario must survive
/// and the slab's SuperSlab must have been retired (the state the window
/// exists for was reached).
fn forced_race(name: &str) {
    let t = scenario(
        name,
        &[("HAKMEM_SS_KEEP", "0"), ("HAKMEM_PURGE_DELAY_MS", "0")],
    );
    assert!(
        n(&t["probes"]["ss_unmap"]) >= 1,
        "no SuperSlab retired: {t}"
    );
}

#[test]
fn a_free_into_an_orphaned_slab_decides_while_its_block_still_pins_the_slab() {
    forced_race("race-unowned-free");
}

#[test]
fn a_reclaimer_parks_an_orphaned_slab_and_looks_at_its_remote_list_under_one_lock() {
    forced_race("race-repark");
}

/// A free takes a slab from its owner while the owner allocates: the owner's
/// refill waits for the gate the taker holds, and then refills from another
/// slab, not the one its state named as active (`race_take_slab` in the
/// scenario driver).
#[test]
fn a_slab_taken_from_its_owner_is_taken_under_the_owners_gate() {
    a_slab_is_taken_while_its_owner("refill", "refilled from another slab");
}

/// The owner's thread exits while a free takes its slab: the exit hook,
/// which gives every slab of the thread back, waits for the gate the taker
/// holds (`race_take_slab`, `RACE_OWNER=exit`).
#[test]
fn an_owner_exiting_while_its_slab_is_taken_waits_for_the_taker() {
    a_slab_is_taken_while_its_owner("exit", "taker's gate (exit)");
}

/// The owner forks while a free takes its slab: the fork waits for the
/// gate, so the child is not made with its gate held by a taker it does
/// not have (its first refill would sleep forever; `race_take_slab`,
/// `RACE_OWNER=fork`).
#[test]
fn an_owner_forking_while_its_slab_is_taken_waits_for_the_taker() {
    a_slab_is_taken_while_its_owner("fork", "the child allocated and exited");
}

/// A free's try to take a slab, refused because the owner's fork holds its
/// gate, is still between its two steps when the fork is made: the child's
/// gate must read free, or its first refill sleeps for good
/// (`race_take_refused` in the scenario driver).
#[test]
fn a_taker_refused_by_a_forking_owner_leaves_the_childs_gate_free() {
    let out = scenario_stdout("race-take-refused", &[]);
    assert!(out.contains("the child allocated and exited"), "{out}");
}

/// Runs `race_take_slab` with the owner doing `act` (`RACE_OWNER`) in the
/// take's window; it must succeed and say `says`.
fn a_slab_is_taken_while_its_owner(act: &str, says: &str) {
    let out = scenario_stdout("race-take-slab", &[("RACE_OWNER", act)]);
    assert!(out.contains(says), "{out}");
}

/// `mlockall(MCL_FUTURE)` between the region rule's look and the region's
/// mapping: the region, found resident, is mapped again reserved
/// (`race_mlock_region` in the scenario driver). Needs root; fails, does not
/// skip, without it.
#[test]
fn a_region_mapped_writable_under_a_fresh_mlockall_is_mapped_again_reserved() {
    let out = scenario_stdout("race-mlock-region", &[]);
    assert!(out.contains("mapped reserved"), "{out}");
}

/// A thread mapping a new SuperSlab does it with the pool lock let go:
/// another thread takes the lock (`malloc_trim`) while the first is held in
/// that window (`race_map_superslab` in the scenario driver; with the lock
/// held across it hangs, and the deadline fails it), and a third that needs
/// a slab meanwhile waits for that SuperSlab instead of mapping its own.
#[test]
fn a_superslab_is_mapped_without_the_pool_lock() {
    let t = scenario("race-map-superslab", &[]);
    assert!(n(&t["probes"]["ss_map"]) >= 2, "{t}");
    assert_eq!(n(&t["probes"]["shared_fail"]), 0, "{t}");
}

/// Runs `misuse` with `MISUSE=kind` and the block size and knobs given: it
/// must abort (SIGABRT) with a message that names the call (`message` is part
/// of it) and the pointer.
fn misuse_aborts(kind: &str, size: usize, env: &[(&str, &str)], message: &str) {
    use std::os::unix::process::ExitStatusExt;
    let size = size.to_string();
    let mut all = vec![("MISUSE", kind), ("MISUSE_SIZE", size.as_str())];
    all.extend_from_slice(env);
    let out = run_with_deadline("misuse", &all, 30);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{kind} of {size} bytes {env:?} was not stopped: {:?}\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("hakmem: "))
        .unwrap_or("");
    assert!(
        line.contains(message) && line.contains(": 0x"),
        "{kind} of {size} bytes {env:?}: {stderr}"
    );
}

/// Every tiny class (the 8-byte one included), a mid (ACE) size, and the
/// legacy path.
const MISUSE_SIZES: [usize; 5] = [8, 48, 1000, 5000, 40_000];
const LEGACY: (&str, &str) = ("HAKMEM_TINY_USE_SUPERSLAB", "0");
const CHECK_FREES: (&str, &str) = ("HAKMEM_CHECK_FREES", "1");

#[test]
fn a_double_free_is_caught_on_every_list_the_block_can_sit_on() {
    for size in MISUSE_SIZES {
        for kind in [
            "double-free-deep",
            "double-free-drained",
            "double-free-remote",
            "double-free-other-cache",
        ] {
            // (A drained ACE segment may have gone to the large cache: the
            // large path's "double free or invalid pointer" then.)
            misuse_aborts(kind, size, &[CHECK_FREES], "free(): double free");
        }
    }
    for size in [8, 100, 1000] {
        for kind in [
            "double-free-deep",
            "double-free-drained",
            "double-free-remote",
        ] {
            misuse_aborts(
                kind,
                size,
                &[LEGACY, CHECK_FREES],
                "free(): double free detected",
            );
        }
    }
}

#[test]
fn without_the_full_checks_a_repeated_free_is_still_caught() {
    misuse_aborts(
        "double-free-parcel",
        40_000,
        &[],
        "free(): double free or invalid pointer",
    );
    for size in MISUSE_SIZES {
        misuse_aborts("double-free-repeated", size, &[], "free(): double free");
    }
    misuse_aborts(
        "double-free-repeated",
        100,
        &[LEGACY],
        "free(): double free",
    );
}

#[test]
fn a_free_inside_a_block_or_off_its_alignment_is_refused() {
    for size in MISUSE_SIZES {
        for kind in ["interior", "misaligned"] {
            misuse_aborts(kind, size, &[CHECK_FREES], "free(): invalid pointer");
        }
        // Without the full checks: off the grid always, and inside a block
        // wherever the free reads the block's metadata (not the owner's
        // own tiny blocks, whose free reads only its index).
        misuse_aborts("misaligned", size, &[], "free(): invalid pointer");
        misuse_aborts("interior-remote", size, &[], "free(): invalid pointer");
    }
    for kind in ["interior", "misaligned"] {
        misuse_aborts(kind, 100, &[LEGACY], "free(): invalid pointer");
    }
}

/// A pointer into a SuperSlab's header (or an ACE segment's) is no block, also
/// for the thread that owns slabs of that SuperSlab, whose `free` reads
/// only its owned index first: no slab in the index may start where a
/// header does (`superslab::FIRST_SLAB`). Nor is one into the rest of slab
/// 0, which serves no blocks (`free` and `realloc`), nor the lowest address
/// on the grid or one in the kernel's half, which an empty slot must not
/// match (`owned_index::SLOT0`).
#[test]
fn a_free_into_a_segment_header_is_refused() {
    for size in MISUSE_SIZES {
        misuse_aborts("segment-header", size, &[], "free(): invalid pointer");
        misuse_aborts("slab-zero", size, &[], "free(): invalid pointer");
        misuse_aborts("low-address", size, &[], "free(): invalid pointer");
        misuse_aborts("kernel-address", size, &[], "free(): invalid pointer");
        misuse_aborts("slab-zero-realloc", size, &[], "realloc(): invalid pointer");
        misuse_aborts(
            "segment-header",
            size,
            &[CHECK_FREES],
            "free(): invalid pointer",
        );
    }
}

/// A realloc of a freed block in a parcel (blocks that realloc grew past
/// 32 KiB) is refused, as in the large tier; it read as a live block of 0
/// bytes, took that parcel again, freed it and returned it.
#[test]
fn a_realloc_of_a_freed_parcel_is_refused() {
    misuse_aborts(
        "realloc-freed-parcel",
        3000,
        &[],
        "realloc(): invalid pointer",
    );
}

#[cfg(feature = "safe-linking")]
#[test]
fn a_use_after_free_write_of_a_pointer_does_not_steer_malloc() {
    for size in [16, 48, 1000, 5000] {
        misuse_aborts(
            "use-after-free-link",
            size,
            &[],
            "malloc(): corrupted free list (a free block was overwritten)",
        );
    }
}
