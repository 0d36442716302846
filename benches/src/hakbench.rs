//! `hakbench WORKLOAD [SCALE]`: the workloads of the benchmark suite. Every
//! allocation goes through the C ABI (libc::malloc & co.), so the same binary
//! measures any allocator under LD_PRELOAD. Prints one line:
//! `hakbench workload=NAME ops=N time=S ops/s=R`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use workloads::{Rng, WORKLOADS};

mod workloads;

struct Ptr(*mut u8);

/// Blocks handed to one thread: (block, size).
type Board = Mutex<Vec<(Ptr, usize)>>;
/// Blocks handed to one thread: (block, size, fill byte).
type Mailbox = Mutex<Vec<(Ptr, usize, u8)>>;
// SAFETY: blocks are handed between threads, never shared.
unsafe impl Send for Ptr {}

fn malloc(size: usize) -> *mut u8 {
    // SAFETY: plain malloc; checked.
    let p = unsafe { libc::malloc(size) } as *mut u8;
    if p.is_null() {
        eprintln!("hakbench: malloc({size}) failed");
        std::process::exit(1);
    }
    p
}

fn free(p: *mut u8) {
    // SAFETY: p came from malloc/realloc and is freed once.
    unsafe { libc::free(p.cast()) }
}

/// Writes the first and last byte (touching the block as a program would).
fn touch(p: *mut u8, size: usize, v: u8) {
    // SAFETY: p has size >= 1 bytes.
    unsafe {
        *p = v;
        *p.add(size - 1) = v;
    }
}

fn check(p: *mut u8, size: usize, v: u8) {
    // SAFETY: as in touch.
    let ok = unsafe { *p == v && *p.add(size - 1) == v };
    if !ok {
        eprintln!("hakbench: block {p:?} ({size} bytes) was corrupted");
        std::process::exit(3);
    }
}

/// bench_random_mixed's loop: `ops` operations over `slots` slots, sizes lo..=hi.
fn random_mixed(ops: u64, slots: usize, lo: usize, hi: usize, seed: u64) -> u64 {
    let mut table: Vec<(*mut u8, usize)> = vec![(std::ptr::null_mut(), 0); slots];
    let mut rng = Rng(seed | 1);
    for _ in 0..ops {
        let slot = rng.next() as usize % slots;
        let (p, size) = table[slot];
        if p.is_null() {
            let size = rng.range(lo, hi);
            let q = malloc(size);
            touch(q, size, slot as u8);
            table[slot] = (q, size);
        } else {
            check(p, size, slot as u8);
            free(p);
            table[slot] = (std::ptr::null_mut(), 0);
        }
    }
    for (p, _) in table {
        if !p.is_null() {
            free(p);
        }
    }
    ops
}

fn threads<F: Fn(usize) -> u64 + Send + Sync + 'static>(n: usize, f: F) -> u64 {
    let f = Arc::new(f);
    let hs: Vec<_> = (0..n)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || f(t))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).sum()
}

/// A producer allocates and fills blocks, a consumer checks and frees them: every free is remote.
/// The queue is bounded (the producer waits while it holds more than `QUEUE_MAX` blocks), as
/// real pipelines are: unbounded, the peak RSS measured how far the scheduler let the producer
/// run ahead (3-27 MiB from run to run under one allocator), not the allocator.
fn producer_consumer(items: u64) -> u64 {
    const QUEUE_MAX: usize = 4096;
    let queue: Arc<Mutex<Vec<(Ptr, usize)>>> = Arc::new(Mutex::new(Vec::with_capacity(4096)));
    let done = Arc::new(AtomicUsize::new(0));
    let (q2, d2) = (queue.clone(), done.clone());
    let consumer = std::thread::spawn(move || {
        let mut freed = 0u64;
        let mut batch = Vec::with_capacity(4096);
        loop {
            std::mem::swap(&mut batch, &mut *q2.lock().unwrap());
            if batch.is_empty() {
                if d2.load(Ordering::Acquire) == 1 && q2.lock().unwrap().is_empty() {
                    break;
                }
                std::thread::yield_now();
                continue;
            }
            for (p, size) in batch.drain(..) {
                check(p.0, size, size as u8);
                free(p.0);
                freed += 1;
            }
        }
        freed
    });
    let mut rng = Rng(0xfeed);
    let mut local = Vec::with_capacity(256);
    for _ in 0..items {
        let size = rng.range(16, 1024);
        let p = malloc(size);
        touch(p, size, size as u8);
        local.push((Ptr(p), size));
        if local.len() == 256 {
            queue.lock().unwrap().append(&mut local);
            while queue.lock().unwrap().len() > QUEUE_MAX {
                std::thread::yield_now();
            }
        }
    }
    queue.lock().unwrap().append(&mut local);
    done.store(1, Ordering::Release);
    items + consumer.join().unwrap()
}

/// In the spirit of larson: each thread replaces random blocks in its array and,
/// every so often, swaps a chunk of its array with a neighbour's, so blocks are
/// freed by threads that did not allocate them.
fn larson(nthreads: usize, rounds: u64) -> u64 {
    const SLOTS: usize = 1024;
    let boards: Arc<Vec<Board>> = Arc::new((0..nthreads).map(|_| Mutex::new(Vec::new())).collect());
    threads(nthreads, move |t| {
        let mut rng = Rng(0xabcdef ^ ((t as u64 + 1) * 7919));
        let mut mine: Vec<(Ptr, usize)> = (0..SLOTS)
            .map(|_| {
                let s = rng.range(16, 512);
                let p = malloc(s);
                touch(p, s, s as u8);
                (Ptr(p), s)
            })
            .collect();
        let mut ops = 0;
        for r in 0..rounds {
            let i = rng.next() as usize % SLOTS;
            check(mine[i].0 .0, mine[i].1, mine[i].1 as u8);
            free(mine[i].0 .0);
            let s = rng.range(16, 512);
            let p = malloc(s);
            touch(p, s, s as u8);
            mine[i] = (Ptr(p), s);
            ops += 2;
            if r % 4096 == 0 {
                // Hand 64 blocks to the next thread, take whatever was handed to us.
                let give: Vec<_> = mine.drain(..64).collect();
                boards[(t + 1) % boards.len()].lock().unwrap().extend(give);
                let got: Vec<_> = std::mem::take(&mut *boards[t].lock().unwrap());
                mine.extend(got);
                while mine.len() < SLOTS {
                    let s = rng.range(16, 512);
                    let p = malloc(s);
                    touch(p, s, s as u8);
                    mine.push((Ptr(p), s));
                }
                for (p, _) in mine.drain(SLOTS..) {
                    free(p.0);
                }
            }
        }
        for (p, _) in mine {
            free(p.0);
        }
        for (p, _) in std::mem::take(&mut *boards[t].lock().unwrap()) {
            free(p.0);
        }
        ops
    })
}

/// Strings growing by realloc, as a text buffer or a vector would; `keep`
/// buffers stay live at once (each batch is freed when the next would pass it).
fn realloc_growth(buffers: u64, keep: usize) -> u64 {
    let mut ops = 0;
    let mut rng = Rng(0x5eed);
    let mut live: Vec<*mut u8> = Vec::new();
    for b in 0..buffers {
        let mut cap = 16usize;
        let mut p = malloc(cap);
        touch(p, cap, 1);
        let target = rng.range(64, 64 * 1024);
        while cap < target {
            let old = cap;
            cap = cap + cap / 2 + 8;
            // SAFETY: p is live; the result replaces it.
            let q = unsafe { libc::realloc(p.cast(), cap) } as *mut u8;
            if q.is_null() {
                std::process::exit(1);
            }
            p = q;
            check(p, old, 1);
            // Append: a text buffer or a vector writes what it grew by.
            // SAFETY: p has cap bytes.
            unsafe { std::ptr::write_bytes(p.add(old), 1, cap - old) };
            ops += 1;
        }
        live.push(p);
        if live.len() > keep || b + 1 == buffers {
            for q in live.drain(..) {
                free(q);
                ops += 1;
            }
        }
    }
    ops
}

/// Rounds of `per_round` blocks of lo..=hi bytes (first and last byte
/// written) made, all kept, checked and freed in the order made: a program's
/// buffers for one request, one file, one frame; or, in one round of millions
/// of small blocks, a program that builds a big data structure and drops it.
fn kept_rounds(rounds: u64, per_round: usize, lo: usize, hi: usize) -> u64 {
    rounds_of_ranges(rounds, per_round, &[(lo, hi)], 0x1a29e)
}

/// Phases that each fill and free `per_phase` blocks of one size range, the
/// ranges going round the tiny classes in a shifting order (16-32 B, then
/// 257-512 B, ...): the slabs one phase leaves EMPTY are what the next
/// needs for another class (Stage 1 of the shared pool).
fn phases(phases: u64, per_phase: usize) -> u64 {
    const RANGES: [(usize, usize); 8] = [
        (16, 32),
        (257, 512),
        (33, 64),
        (513, 1024),
        (65, 128),
        (129, 256),
        (17, 24),
        (800, 1024),
    ];
    rounds_of_ranges(phases, per_phase, &RANGES, 0xf00d)
}

/// `rounds` rounds of `per_round` blocks (first and last byte written),
/// round r's sizes from `ranges[r % ranges.len()]`, all kept, then checked
/// and freed in the order made.
fn rounds_of_ranges(rounds: u64, per_round: usize, ranges: &[(usize, usize)], seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut live: Vec<(*mut u8, usize)> = Vec::with_capacity(per_round);
    for r in 0..rounds {
        let (lo, hi) = ranges[r as usize % ranges.len()];
        for _ in 0..per_round {
            let size = rng.range(lo, hi);
            let p = malloc(size);
            touch(p, size, r as u8);
            live.push((p, size));
        }
        for (p, size) in live.drain(..) {
            check(p, size, r as u8);
            free(p);
        }
    }
    rounds * per_round as u64 * 2
}

/// Big zero-initialised buffers replaced at random, as `std::make_unique<char[]>(n)`
/// makes them (operator new, then every byte written with zero): `slots`
/// buffers of `lo..=hi` bytes; each new buffer is made before the one it
/// replaces is freed.
fn zeroed_buffers(replacements: u64, slots: usize, lo: usize, hi: usize) -> u64 {
    let mut table: Vec<*mut u8> = vec![std::ptr::null_mut(); slots];
    let mut rng = Rng(0xb16);
    for r in 0..replacements {
        let slot = rng.next() as usize % slots;
        let size = rng.range(lo, hi);
        // Hidden from the optimiser: LLVM turns malloc + memset(0) into
        // calloc, which a C++ compiler does not do for operator new.
        let p = std::hint::black_box(malloc(size));
        // SAFETY: p has size bytes.
        unsafe { std::ptr::write_bytes(p, 0, size) };
        touch(p, size, r as u8);
        if !table[slot].is_null() {
            free(table[slot]);
        }
        table[slot] = p;
    }
    for p in table.into_iter().filter(|p| !p.is_null()) {
        free(p);
    }
    replacements
}

/// glibc's bench-malloc-thread's shape: each thread frees and remakes a random
/// slot of its working set of 1024, sizes 4..32768 drawn with an
/// inverse-square distribution (most are small), every byte written.
fn working_set_threads(nthreads: usize, iters: u64) -> u64 {
    threads(nthreads, move |t| {
        const SLOTS: usize = 1024;
        let mut rng = Rng(0x88 + t as u64);
        let mut set: Vec<*mut u8> = vec![std::ptr::null_mut(); SLOTS];
        let (min, max) = (4f64, 32768f64);
        for _ in 0..iters {
            let slot = rng.next() as usize % SLOTS;
            // Inverse square: the inverse of the CDF of x^-2 on [min, max].
            let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let size = (1.0 / (1.0 / min - u * (1.0 / min - 1.0 / max))) as usize;
            free(set[slot]);
            let p = malloc(size);
            // SAFETY: p has size bytes.
            unsafe { std::ptr::write_bytes(p, slot as u8, size) };
            set[slot] = p;
        }
        for p in set {
            free(p);
        }
        iters * 2
    })
}

/// glibc's bench-malloc-simple's shape: rounds of `n` blocks of one size made
/// (every byte written), the first half freed in the order made and the
/// second half in reverse, for n in 25, 100, 400, 1600 and sizes 16, 32, 64.
fn simple_rounds(blocks: u64) -> u64 {
    let mut arr: Vec<*mut u8> = Vec::with_capacity(1600);
    let mut ops = 0;
    for size in [16, 32, 64] {
        for n in [25usize, 100, 400, 1600] {
            for _ in 0..blocks / n as u64 {
                for _ in 0..n {
                    let p = malloc(size);
                    // SAFETY: p has size bytes.
                    unsafe { std::ptr::write_bytes(p, n as u8, size) };
                    arr.push(p);
                }
                for &p in &arr[..n / 2] {
                    free(p);
                }
                for &p in arr[n / 2..].iter().rev() {
                    free(p);
                }
                arr.clear();
                ops += 2 * n as u64;
            }
        }
    }
    ops
}

/// Many threads (4x the cores here), sizes across tiny, mid and large, blocks
/// handed between threads, every block's contents checked before its free.
fn stress(nthreads: usize, rounds: u64) -> u64 {
    let boxes: Arc<Vec<Mailbox>> =
        Arc::new((0..nthreads).map(|_| Mutex::new(Vec::new())).collect());
    threads(nthreads, move |t| {
        let mut rng = Rng(0x77 + t as u64 * 131);
        let mut ops = 0;
        for r in 0..rounds {
            let size = match rng.next() % 32 {
                0 => rng.range(33_000, 200_000),
                1..=4 => rng.range(1025, 32_768),
                _ => rng.range(1, 1024),
            };
            let p = malloc(size);
            let v = (r as u8) ^ (t as u8);
            // SAFETY: p has size bytes.
            unsafe { std::ptr::write_bytes(p, v, size.min(256)) };
            boxes[(t + 1 + r as usize % (nthreads - 1)) % nthreads]
                .lock()
                .unwrap()
                .push((Ptr(p), size, v));
            ops += 1;
            if r % 16 == 0 {
                for (p, size, v) in std::mem::take(&mut *boxes[t].lock().unwrap()) {
                    // SAFETY: p has size bytes, the first min(size, 256) written with v.
                    let s = unsafe { std::slice::from_raw_parts(p.0, size.min(256)) };
                    if !s.iter().all(|&b| b == v) {
                        eprintln!("hakbench: stress block corrupted");
                        std::process::exit(3);
                    }
                    free(p.0);
                    ops += 1;
                }
            }
        }
        ops
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("");
    let scale: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let n = move |base: u64| ((base as f64 * scale) as u64).max(1);
    let start = Instant::now();
    let ops = match name {
        "tiny" => random_mixed(n(10_000_000), 8192, 16, 128, 1),
        "mixed" => random_mixed(n(10_000_000), 8192, 16, 1024, 2),
        "mid" => random_mixed(n(2_000_000), 2048, 1025, 32 * 1024, 3),
        "big" => random_mixed(n(400_000), 1024, 32 * 1024 + 1, 256 * 1024, 4),
        "mixed-2t" => threads(2, move |t| {
            random_mixed(n(5_000_000), 8192, 16, 1024, 10 + t as u64)
        }),
        "prodcons" => producer_consumer(n(3_000_000)),
        "larson" => larson(4, n(1_000_000)),
        "realloc" => realloc_growth(n(20_000), 64),
        "realloc-kept" => realloc_growth(n(20_000), usize::MAX),
        "large" => kept_rounds(n(10), 1000, 256 * 1024, 2 << 20),
        "kept" => kept_rounds(1, n(3_000_000) as usize, 16, 128),
        "stress" => stress(8, n(200_000)),
        "phases" => phases(n(64), 100_000),
        "large-zeroed" => zeroed_buffers(n(400), 20, 5 << 20, 25 << 20),
        "working-set-2t" => working_set_threads(2, n(25_000_000)),
        "simple" => simple_rounds(n(2_000_000)),
        _ => {
            eprintln!("usage: hakbench {} [SCALE]", WORKLOADS.join("|"));
            std::process::exit(2);
        }
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "hakbench workload={name} ops={ops} time={secs:.4} ops/s={:.0}",
        ops as f64 / secs
    );
}
