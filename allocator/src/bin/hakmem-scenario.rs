//! Scenario driver for the allocator's integration tests and for hakctl's:
//! a Rust program with hakmem as its global allocator that runs one named,
//! fixed workload and prints the tally of exactly that workload.
//!
//! `hakmem-scenario NAME [--wait-attach] [--hold]`
//!
//! With `--wait-attach` it first waits until a tracer raises the semaphore of
//! `ss_acquire` (so hakctl's counts cover the same interval), then prints the
//! workload's tally (`tally: {json}`) with write(2) and exits with `_exit`, so
//! nothing allocates between the last counted event and the exit.

use hakmem::HakMem;
use hakmem_common::Tally;
use std::sync::{Arc, Barrier, Mutex};

#[global_allocator]
static GLOBAL: HakMem = HakMem;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("");
    let wait_attach = args.iter().any(|a| a == "--wait-attach");
    let workload: fn() = match name {
        "recycle" => recycle,
        "legacy" => legacy,
        "ace" => ace,
        "ace-mapfail" => ace_mapfail,
        "stress" => stress,
        "mixed" => mixed,
        "burst" => burst,
        "forever" => forever,
        _ => {
            eprintln!("usage: hakmem-scenario recycle|legacy|ace|ace-mapfail|stress|mixed|burst|forever [--wait-attach]");
            std::process::exit(2);
        }
    };
    if !hakmem::config::get().stats && name != "forever" {
        eprintln!("hakmem-scenario: run with HAKMEM_STATS=1");
        std::process::exit(2);
    }
    if wait_attach {
        println!("waiting for a tracer, pid {}", std::process::id());
        while !hakmem::probes_enabled() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The tracer attaches its probes one after another; give the last ones time.
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let before = hakmem::stats::snapshot();
    workload();
    let after = hakmem::stats::snapshot();
    print_tally(&after.since(&before));
    if wait_attach {
        // SAFETY: _exit ends the process without running anything that could allocate.
        unsafe { libc::_exit(0) };
    }
}

fn print_tally(t: &Tally) {
    let mut buf = hakmem::stats::StackBuf::<8192>::new();
    use std::fmt::Write;
    let _ = buf.write_str("tally: ");
    let _ = hakmem_common::json::write_tally(&mut buf, t);
    let _ = buf.write_str("\n");
    hakmem::stats::write_fd(1, buf.as_bytes());
}

fn fill(p: *mut u8, len: usize, seed: u8) {
    // SAFETY: p has len writable bytes (checked by the callers' allocation).
    unsafe { std::ptr::write_bytes(p, seed, len) };
}

fn check(p: *const u8, len: usize, seed: u8) {
    // SAFETY: p has len readable bytes.
    let s = unsafe { std::slice::from_raw_parts(p, len) };
    assert!(
        s.iter().all(|&b| b == seed),
        "block {p:?} ({len} bytes) was overwritten"
    );
}

struct SendPtr(*mut u8);

/// Blocks handed to one thread: (block, size, fill byte).
type Mailbox = Mutex<Vec<(SendPtr, usize, u8)>>;
// SAFETY: the pointer is handed from one thread to another, never shared.
unsafe impl Send for SendPtr {}

/// Remote frees + drain + recycle, then a Stage 1 hit in another class.
fn recycle() {
    const N: usize = 256;
    let blocks: Vec<SendPtr> = (0..N)
        .map(|i| {
            // SAFETY: plain allocation, checked.
            let p = unsafe { hakmem::api::malloc(1000) };
            assert!(!p.is_null());
            fill(p, 1000, i as u8);
            SendPtr(p)
        })
        .collect();
    std::thread::spawn(move || {
        for (i, b) in blocks.into_iter().enumerate() {
            check(b.0, 1000, i as u8);
            // SAFETY: allocated above, freed once, from another thread: a remote free.
            unsafe { hakmem::api::free(b.0) };
        }
    })
    .join()
    .unwrap();
    // Refill class 7 until the owner drains its remote lists.
    let again: Vec<*mut u8> = (0..128)
        .map(|_| unsafe { hakmem::api::malloc(1000) })
        .collect();
    // Many blocks of class 3: at least one new slab, which Stage 1 serves.
    let small: Vec<*mut u8> = (0..4096)
        .map(|_| unsafe { hakmem::api::malloc(60) })
        .collect();
    for p in again.into_iter().chain(small) {
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(p) };
    }
}

/// With HAKMEM_SS_MAX small: Stage 3 hits the budget, shared_fail, legacy serves.
fn legacy() {
    let mut v = Vec::new();
    for i in 0..20_000usize {
        let size = 16 << (i % 7);
        // SAFETY: plain allocation, checked.
        let p = unsafe { hakmem::api::malloc(size) };
        assert!(
            !p.is_null(),
            "legacy path must serve when the pool gives up"
        );
        fill(p, size, i as u8);
        v.push((p, size, i as u8));
    }
    for (p, size, seed) in v {
        check(p, size, seed);
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(p) };
    }
}

/// ACE: Threshold (with HAKMEM_ACE_MAX_BYTES) and Exhaustion (with HAKMEM_ACE_MAX_SEGMENTS).
fn ace() {
    let mut v = Vec::new();
    for i in 0..200usize {
        let size = if i % 2 == 0 { 30_000 } else { 3000 };
        // SAFETY: plain allocation, checked.
        let p = unsafe { hakmem::api::malloc(size) };
        assert!(!p.is_null());
        fill(p, size, i as u8);
        v.push((p, size, i as u8));
    }
    for (p, size, seed) in v {
        check(p, size, seed);
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(p) };
    }
}

/// With HAKMEM_OS_LIMIT_MB small: ACE cannot map a segment (MapFail), and
/// malloc finally returns NULL with ENOMEM instead of crashing.
fn ace_mapfail() {
    let mut v = Vec::new();
    let mut nulls = 0;
    for _ in 0..2000 {
        // SAFETY: plain allocation; NULL is expected once the limit is reached.
        let p = unsafe { hakmem::api::malloc(20_000) };
        if p.is_null() {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::ENOMEM)
            );
            nulls += 1;
            if nulls > 3 {
                break;
            }
        } else {
            v.push(p);
        }
    }
    assert!(nulls > 0, "the OS limit was never reached");
    for p in v {
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(p) };
    }
}

/// Threads hand blocks of every size range to each other; every block's
/// contents are written by the allocating thread and checked by the freeing one.
fn stress() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 20_000;
    let mailboxes: Arc<Vec<Mailbox>> =
        Arc::new((0..THREADS).map(|_| Mutex::new(Vec::new())).collect());
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let mb = mailboxes.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut x = 0x1234_5678_9abc_def1u64 ^ (t as u64) << 7;
                barrier.wait();
                for r in 0..ROUNDS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let size = match x % 16 {
                        0 => 1024 + (x >> 8) as usize % 40_000,
                        1 => 40_000 + (x >> 8) as usize % 200_000,
                        _ => 1 + (x >> 8) as usize % 1024,
                    };
                    // SAFETY: plain allocation, checked.
                    let p = unsafe { hakmem::api::malloc(size) };
                    assert!(!p.is_null());
                    let seed = (r as u8) ^ (t as u8);
                    fill(p, size, seed);
                    mb[(t + 1) % THREADS]
                        .lock()
                        .unwrap()
                        .push((SendPtr(p), size, seed));
                    if r % 8 == 0 {
                        let mine: Vec<_> = std::mem::take(&mut *mb[t].lock().unwrap());
                        for (p, size, seed) in mine {
                            check(p.0, size, seed);
                            // SAFETY: allocated by another thread, freed once here.
                            unsafe { hakmem::api::free(p.0) };
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for mb in mailboxes.iter() {
        for (p, size, seed) in std::mem::take(&mut *mb.lock().unwrap()) {
            check(p.0, size, seed);
            // SAFETY: allocated by a worker, freed once here.
            unsafe { hakmem::api::free(p.0) };
        }
    }
}

/// A fixed mix that fires every tiny-path probe: recycle, then stress.
fn mixed() {
    recycle();
    stress();
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

/// A burst of 60k 512-byte blocks (about 15 SuperSlabs), all freed: EMPTY
/// SuperSlabs beyond the hysteresis go back to the OS and RSS falls.
fn burst() {
    let before = rss_kib();
    let blocks: Vec<*mut u8> = (0..60_000)
        .map(|i| {
            // SAFETY: plain allocation, checked.
            let p = unsafe { hakmem::api::malloc(500) };
            assert!(!p.is_null());
            fill(p, 500, i as u8);
            p
        })
        .collect();
    let peak = rss_kib();
    for (i, p) in blocks.iter().enumerate() {
        check(*p, 500, i as u8);
        // SAFETY: allocated above, freed once.
        unsafe { hakmem::api::free(*p) };
    }
    drop(blocks);
    let after = rss_kib();
    println!("rss_kib before={before} peak={peak} after={after}");
}

/// Allocates and frees in a loop until killed (a target for attach/detach tests).
fn forever() {
    let mut round = 0u64;
    loop {
        let v: Vec<*mut u8> = (0..2000)
            .map(|i| unsafe { hakmem::api::malloc(16 + (i * 37 + round as usize) % 1000) })
            .collect();
        for p in v {
            // SAFETY: allocated above.
            unsafe { hakmem::api::free(p) };
        }
        round += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
