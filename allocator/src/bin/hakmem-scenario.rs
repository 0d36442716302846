//! Scenario driver for the allocator's integration tests and for hakctl's:
//! a Rust program with hakmem as its global allocator that runs one named,
//! fixed workload and prints the tally of exactly that workload.
//!
//! `hakmem-scenario NAME [--wait-attach] [--hold]`
//!
//! With `--wait-attach` it first waits until a tracer has raised the semaphore
//! of every probe (the drain probes only if asked for), then for a line on stdin: the test writes it once hakctl
//! has said it is attached (the kernel raises a site's semaphore when its
//! uprobe is registered, a moment before hakctl links its program there), so
//! hakctl's counts cover exactly the workload. It then prints the workload's
//! tally (`tally: {json}`) with write(2) and exits with `_exit`, so nothing
//! allocates between the last counted event and the exit.

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
        "ace-burst" => ace_burst,
        "ace-free-threads" => ace_free_threads,
        "large-cache" => large_cache,
        "calloc-sparse" => calloc_sparse,
        "large-stale" => large_stale,
        "forever" => forever,
        "fork" => fork,
        "oom" => oom,
        "hopeless" => hopeless,
        "double-free" => double_free,
        "foreign-free" => foreign_free,
        "stale-free" => stale_free,
        "abandon" => abandon,
        "grown" => grown,
        "idle-burst" => idle_burst,
        "threads-burst" => threads_burst,
        "beyond-list" => beyond_list,
        "race-unowned-free" => race_unowned_free,
        "race-map-superslab" => race_map_superslab,
        "race-repark" => race_repark,
        "race-mlock-region" => race_mlock_region,
        "race-take-slab" => race_take_slab,
        "take-two-owners" => take_two_owners,
        "race-take-refused" => race_take_refused,
        "misuse" => misuse,
        "levels" => levels,
        _ => {
            eprintln!("usage: hakmem-scenario recycle|legacy|ace|ace-mapfail|stress|mixed|burst|ace-burst|ace-free-threads|large-cache|calloc-sparse|large-stale|forever|fork|oom|hopeless|double-free|foreign-free|stale-free|abandon|grown|idle-burst|threads-burst|beyond-list|race-unowned-free|race-map-superslab|race-repark|race-mlock-region|race-take-slab|take-two-owners|race-take-refused|misuse|levels [--wait-attach]");
            std::process::exit(2);
        }
    };
    if !hakmem::config::get().stats
        && !matches!(
            name,
            "forever" | "double-free" | "foreign-free" | "stale-free" | "misuse" | "levels"
        )
    {
        eprintln!("hakmem-scenario: run with HAKMEM_STATS=1");
        std::process::exit(2);
    }
    if wait_attach {
        println!("waiting for a tracer, pid {}", std::process::id());
        // Every probe but the two drain probes, which hakctl attaches on request.
        let (_, probes) = hakmem::probes_raised();
        while hakmem::probes_raised().0 < probes - 2 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        println!(
            "every probe is enabled ({} of {probes}); waiting for a line on stdin",
            hakmem::probes_raised().0
        );
        let mut line = [0u8; 64];
        // SAFETY: reading into a stack buffer of the given length.
        while unsafe { libc::read(0, line.as_mut_ptr().cast(), line.len()) } < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
    if matches!(
        name,
        "burst" | "ace-burst" | "large-cache" | "large-stale" | "threads-burst" | "idle-burst"
    ) {
        // Scenarios about delays: they pass when the scenario says (see
        // `allocate_after`), however slowly a busy machine runs it.
        hakmem::test_hooks::freeze_clock();
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

/// Remote frees (the freeing thread takes each slab at half its blocks) +
/// drain + recycle, then a Stage 1 hit in another class.
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
        // SAFETY: a plain malloc, freed below.
        .map(|_| unsafe { hakmem::api::malloc(1000) })
        .collect();
    // Many blocks of class 3: at least one new slab, which Stage 1 serves.
    let small: Vec<*mut u8> = (0..4096)
        // SAFETY: a plain malloc, freed below.
        .map(|_| unsafe { hakmem::api::malloc(60) })
        .collect();
    for p in again.into_iter().chain(small) {
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(p) };
    }
}

/// Allocates a block of `size(i)` bytes for each i, fills each, then checks and frees them all.
fn fill_then_free(n: usize, size: impl Fn(usize) -> usize) {
    let blocks: Vec<(*mut u8, usize, u8)> = (0..n)
        .map(|i| {
            let size = size(i);
            // SAFETY: plain allocation, checked.
            let p = unsafe { hakmem::api::malloc(size) };
            assert!(!p.is_null(), "malloc({size}) failed");
            fill(p, size, i as u8);
            (p, size, i as u8)
        })
        .collect();
    for (p, size, seed) in blocks {
        check(p, size, seed);
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(p) };
    }
}

/// With HAKMEM_SS_MAX small: Stage 3 hits the budget, shared_fail, the legacy path serves.
fn legacy() {
    fill_then_free(20_000, |i| 16 << (i % 7));
}

/// ACE: Threshold (with HAKMEM_ACE_MAX_BYTES) and Exhaustion (with HAKMEM_ACE_MAX_SEGMENTS).
fn ace() {
    fill_then_free(200, |i| if i % 2 == 0 { 30_000 } else { 3000 });
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

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Threads (STRESS_THREADS, default 4: more than the cores here) hand blocks of
/// every size range to each other; every block's contents are written by the
/// allocating thread and checked by the freeing one. STRESS_SECONDS > 0 turns
/// the fixed 20k rounds per thread into a soak of that many seconds.
fn stress() {
    let threads = env_usize("STRESS_THREADS", 4).max(2);
    let seconds = env_usize("STRESS_SECONDS", 0) as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mailboxes: Arc<Vec<Mailbox>> =
        Arc::new((0..threads).map(|_| Mutex::new(Vec::new())).collect());
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let mb = mailboxes.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut x = 0x1234_5678_9abc_def1u64 ^ ((t as u64) << 7);
                barrier.wait();
                let mut r = 0usize;
                while if seconds > 0 {
                    !r.is_multiple_of(1024) || std::time::Instant::now() < deadline
                } else {
                    r < 20_000
                } {
                    let size = random_size(&mut x);
                    // SAFETY: plain allocation, checked.
                    let p = unsafe { hakmem::api::malloc(size) };
                    assert!(!p.is_null());
                    let seed = (r as u8) ^ (t as u8);
                    fill(p, size, seed);
                    mb[(t + 1 + r % (threads - 1)) % threads]
                        .lock()
                        .unwrap()
                        .push((SendPtr(p), size, seed));
                    if r.is_multiple_of(8) {
                        let mine: Vec<_> = std::mem::take(&mut *mb[t].lock().unwrap());
                        for (p, size, seed) in mine {
                            check(p.0, size, seed);
                            // SAFETY: allocated by another thread, freed once here.
                            unsafe { hakmem::api::free(p.0) };
                        }
                    }
                    r += 1;
                }
                r
            })
        })
        .collect();
    let ops: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let mut leftover = 0;
    for mb in mailboxes.iter() {
        for (p, size, seed) in std::mem::take(&mut *mb.lock().unwrap()) {
            check(p.0, size, seed);
            // SAFETY: allocated by a worker, freed once here.
            unsafe { hakmem::api::free(p.0) };
            leftover += 1;
        }
    }
    println!("stress threads={threads} allocations={ops} checked_and_freed={ops} (leftover handed back at the end: {leftover})");
}

/// A fixed mix that fires every tiny-path probe: recycle, then stress.
fn mixed() {
    recycle();
    stress();
}

/// A `kB` line of /proc/self/status (`key` with its colon), 0 if missing.
fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
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

/// Two bursts of 60k 512-byte blocks (about 15 SuperSlabs), each freed
/// whole: the second burst takes the first's EMPTY slabs (Stage 1); once
/// they have been unused for the purge delay and the reserve's second, their
/// pages go back, the SuperSlabs beyond the hysteresis are retired to the
/// chunk cache, and RSS falls. Prints RSS
/// before, at the first peak, at once after the second burst's frees
/// (`freed`) and after the idle second (`after`).
fn burst() {
    let before = rss_kib();
    let first = make(60_000, 500, 500);
    let peak = rss_kib();
    free_all(&first);
    // Blocks of the reused chunks hold what was written into them.
    let second = make(60_000, 500, 500);
    for (i, &p) in second.iter().enumerate() {
        check(p as *mut u8, 500, i as u8);
    }
    free_all(&second);
    let freed = rss_kib();
    after_idle_reserve();
    let after = rss_kib();
    println!("rss_kib before={before} peak={peak} freed={freed} after={after}");
}

/// Two threads each grow 1,500 buffers by realloc (1.5x a step, each step's
/// new bytes written) to 40-250 KB, checking what each move copied; then
/// each frees the other's. Prints the page tables' size with all 3,000 live
/// (`vmpte_kib=`: with a 2 MiB chunk per buffer, 4 KiB each) and RSS once
/// all are freed and trimmed.
fn grown() {
    fn grow(seed: u8) -> Vec<usize> {
        (0..1500)
            .map(|i| {
                let target = 40_000 + (i * 7919) % 210_000;
                let mut cap = 64;
                // SAFETY: plain allocation, checked.
                let mut p = unsafe { hakmem::api::malloc(cap) };
                assert!(!p.is_null());
                fill(p, cap, seed);
                while cap < target {
                    let old = cap;
                    cap = (cap + cap / 2).min(target);
                    // SAFETY: `p` is live; the result replaces it.
                    p = unsafe { hakmem::api::realloc(p, cap) };
                    assert!(!p.is_null(), "realloc({cap}) failed");
                    check(p, old, seed);
                    // SAFETY: `p` has `cap` bytes.
                    fill(unsafe { p.add(old) }, cap - old, seed);
                }
                p as usize
            })
            .collect()
    }
    let a = std::thread::spawn(|| grow(1));
    let b = grow(2);
    let a = a.join().unwrap();
    println!("vmpte_kib={}", status_kib("VmPTE:"));
    let other = std::thread::spawn(move || free_all(&b));
    free_all(&a);
    other.join().unwrap();
    hakmem::api::trim();
    println!("rss_kib after={}", rss_kib());
}

/// A burst of 200,000 blocks of 500 bytes (about 100 MiB of SuperSlabs),
/// freed, then 1.5 s with no allocator call at all (RSS is read without
/// allocating): what the chunk cache holds goes back only if the purge
/// thread (`HAKMEM_PURGE_THREAD=1`) returns it. Prints RSS at the peak, at
/// once after the frees and after the pause.
fn idle_burst() {
    let blocks = make(200_000, 500, 500);
    let peak = rss_kib_without_allocating();
    free_all(&blocks);
    let freed = rss_kib_without_allocating();
    hakmem::test_hooks::advance_clock(1500);
    // Without the purge thread nothing can go back (no allocator call): 1.5 s
    // shows it. With it, the thread acts when its own sleep ends (real time):
    // wait until it has, up to 20 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut after = rss_kib_without_allocating();
    let pause = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    while std::time::Instant::now() < pause
        || (hakmem::config::get().purge_thread
            && after * 4 >= peak
            && std::time::Instant::now() < deadline)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
        after = rss_kib_without_allocating();
    }
    drop(blocks);
    println!("rss_kib peak={peak} freed={freed} after={after}");
}

/// Eight threads each make and free 20,000 blocks of 16..1024 bytes (about
/// 10 MB), then stay alive and idle, holding their thread caches and active
/// slabs: the SuperSlabs they shared cannot retire, so what goes back is the
/// pages of their EMPTY slabs, after the purge delay (and the reserve's
/// second). The main thread waits 1.2 s and makes one large allocation (a
/// slow path). Prints RSS at the peak, at once after the frees and after.
fn threads_burst() {
    const THREADS: usize = 8;
    let made = std::sync::Barrier::new(THREADS + 1);
    let freed = std::sync::Barrier::new(THREADS + 1);
    let done = std::sync::Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (made, freed, done) = (&made, &freed, &done);
            s.spawn(move || {
                let blocks: Vec<(usize, usize)> = (0..20_000)
                    .map(|i| {
                        let size = 16 + (i * 7919 + t * 104_729) % 1009;
                        (make(1, size, size)[0], size)
                    })
                    .collect();
                made.wait();
                for &(p, size) in &blocks {
                    check(p as *const u8, size, 0);
                    // SAFETY: ours, freed once.
                    unsafe { hakmem::api::free(p as *mut u8) };
                }
                drop(blocks);
                freed.wait();
                done.wait();
            });
        }
        made.wait();
        let peak = rss_kib();
        freed.wait();
        let at_once = rss_kib();
        hakmem::test_hooks::advance_clock(1200);
        // SAFETY: plain allocation, freed at once.
        unsafe { hakmem::api::free(hakmem::api::malloc(4 << 20)) };
        let after = rss_kib();
        println!("rss_kib peak={peak} freed={at_once} after={after}");
        done.wait();
    });
}

/// More live threads than hakctl's thread list has slots: a thread beyond
/// it gets no owner id (ids come with a slot) and keeps nothing cached.
/// Two such threads make blocks and free each other's, round after round,
/// each checking the other's first word (only that is written, so that
/// under `HAKMEM_CHECK_FREES=1` a double-free key left in the second would
/// be found at the next free). They must own no slab (a slab stamped with
/// id 0 would be the own slab of each of them): while only they run, no
/// slab is acquired, and their blocks come from the legacy path. Prints
/// both counts of that window.
fn beyond_list() {
    const SIZE: usize = 300;
    const WRITTEN: usize = 8;
    const BLOCKS: usize = 200;
    const ROUNDS: usize = 50;
    // Main holds a slot, and so do the holders but the last.
    let holders = hakmem::THREAD_SLOTS;
    // Leaked: a holder may still wait on them if this thread panics.
    let gates: &'static (Barrier, Barrier) = Box::leak(Box::new((
        Barrier::new(holders + 1),
        Barrier::new(holders + 1),
    )));
    let ids = spawn_holders(holders, gates);
    gates.0.wait();
    // Main and the two workers: the window opens and closes with nothing
    // but the workers running (the holders wait on `gates.1`).
    let window = Barrier::new(3);
    let swap = Barrier::new(2);
    let boxes: [Mutex<Vec<usize>>; 2] = Default::default();
    let during = std::thread::scope(|w| {
        for me in 0..2 {
            let (window, swap, boxes) = (&window, &swap, &boxes);
            w.spawn(move || {
                window.wait();
                for _ in 0..ROUNDS {
                    *boxes[me].lock().unwrap() = make(BLOCKS, SIZE, WRITTEN);
                    swap.wait();
                    let theirs = std::mem::take(&mut *boxes[1 - me].lock().unwrap());
                    for (i, &p) in theirs.iter().enumerate() {
                        check(p as *const u8, WRITTEN, i as u8);
                    }
                    free_all(&theirs);
                    swap.wait();
                }
                window.wait();
            });
        }
        let before = hakmem::stats::snapshot();
        window.wait();
        window.wait();
        hakmem::stats::snapshot().since(&before)
    });
    gates.1.wait();
    for id in ids {
        // SAFETY: a thread made by `spawn_holders`, joined once.
        assert_eq!(unsafe { libc::pthread_join(id, std::ptr::null_mut()) }, 0);
    }
    let legacy: u64 = (0..hakmem_common::TINY_CLASSES)
        .map(|c| during.legacy_blocks(c))
        .sum();
    println!(
        "beyond-list acquired: {}",
        during.probe(hakmem_common::ProbeId::SsAcquire)
    );
    println!("beyond-list legacy: {legacy}");
}

/// `n` threads that each take a slot of the thread list (their first
/// refill) and hold it between the two barriers of `gates`. Raw pthreads
/// with 64 KiB stacks: std's threads each map a signal stack and its guard
/// page besides their own, and 16,384 of them went past the kernel's
/// 65,530 mappings a process (vm.max_map_count).
fn spawn_holders(n: usize, gates: &'static (Barrier, Barrier)) -> Vec<libc::pthread_t> {
    extern "C" fn hold_a_slot(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the leaked `gates` of `beyond_list`.
        let (listed, leave) = unsafe { &*(arg as *const (Barrier, Barrier)) };
        // SAFETY: a plain allocation, freed below.
        let p = unsafe { hakmem::api::malloc(8) };
        assert!(!p.is_null());
        listed.wait();
        leave.wait();
        // SAFETY: allocated above, freed once.
        unsafe { hakmem::api::free(p) };
        std::ptr::null_mut()
    }
    // SAFETY: pthread_attr_init initialises any storage; it is destroyed below.
    let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::pthread_attr_init(&mut attr), 0);
        assert_eq!(libc::pthread_attr_setstacksize(&mut attr, 64 << 10), 0);
    }
    let arg = gates as *const (Barrier, Barrier) as *mut libc::c_void;
    let ids = (0..n)
        .map(|i| {
            let mut id: libc::pthread_t = 0;
            // SAFETY: `arg` lives as long as the process (leaked).
            let rc = unsafe { libc::pthread_create(&mut id, &attr, hold_a_slot, arg) };
            let why = std::io::Error::from_raw_os_error(rc);
            assert_eq!(rc, 0, "holder {i}: pthread_create: {why}");
            id
        })
        .collect();
    // SAFETY: initialised above.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    ids
}

/// RSS from /proc/self/statm through a stack buffer: no allocator call.
fn rss_kib_without_allocating() -> u64 {
    let mut buf = [0u8; 128];
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(c"/proc/self/statm".as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0, "open /proc/self/statm");
    // SAFETY: `buf` has room for what is read.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    assert!(n > 0, "read /proc/self/statm");
    let pages = buf[..n as usize]
        .split(|&b| b == b' ')
        .nth(1)
        .and_then(|f| std::str::from_utf8(f).ok())
        .and_then(|f| f.parse::<u64>().ok())
        .expect("statm's second field");
    pages * 4
}

/// A burst of 6,000 mid blocks of 32 KiB (192 MiB, about 100 ACE segments)
/// written whole and freed: prints RSS at the peak, at once after the frees,
/// and after the chunk cache's burst delay (the segments' chunks wait
/// there), `idle=` after the chunk cache's reserve's second (its chunks go
/// back) and `kept=` after 10 s (the class's kept segments' pages go back).
fn ace_burst() {
    let size = 32 << 10;
    free_burst(&make(6000, size, size));
    after_idle_reserve();
    let idle = rss_kib();
    allocate_after(10_000);
    println!("rss_kib idle={idle} kept={}", rss_kib());
}

/// 300 short-lived threads, each of which only frees 48 blocks of 40 KiB that
/// the main thread made (a pool of consumers), then exits. What they free
/// must not stay behind with them: prints `rss_kib first= last=`, after the
/// first round and the last.
fn ace_free_threads() {
    extern "C" fn consume(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` points to the round's Vec, which outlives this thread
        // (joined before the Vec is dropped).
        free_all(unsafe { &*(arg as *const Vec<usize>) });
        core::ptr::null_mut()
    }
    let mut first = 0;
    for round in 0..300 {
        let blocks = make(48, 40 << 10, 40 << 10);
        let mut t: libc::pthread_t = 0;
        // A raw thread, not std's: it must allocate nothing of its own, as a
        // C consumer thread would not.
        // SAFETY: `consume` matches the start routine's signature and the
        // argument lives until the join below.
        let rc = unsafe {
            libc::pthread_create(
                &mut t,
                core::ptr::null(),
                consume,
                &blocks as *const Vec<usize> as *mut libc::c_void,
            )
        };
        assert_eq!(rc, 0, "pthread_create");
        // SAFETY: `t` is the thread just created, joined once.
        unsafe { libc::pthread_join(t, core::ptr::null_mut()) };
        if round == 0 {
            first = rss_kib();
        }
    }
    println!("rss_kib first={first} last={}", rss_kib());
}

/// `n` blocks of `size` bytes with their first `touch` bytes written.
fn make(n: usize, size: usize, touch: usize) -> Vec<usize> {
    (0..n)
        .map(|i| {
            // SAFETY: plain allocation, checked.
            let p = unsafe { hakmem::api::malloc(size) };
            assert!(!p.is_null());
            fill(p, touch, i as u8);
            p as usize
        })
        .collect()
}

fn free_all(blocks: &[usize]) {
    for &p in blocks {
        // SAFETY: allocated by `make`, freed once.
        unsafe { hakmem::api::free(p as *mut u8) };
    }
}

/// Frees `blocks` at once and prints RSS before (`peak`), right after
/// (`freed`) and after the chunk cache's burst delay (`after`).
fn free_burst(blocks: &[usize]) {
    let peak = rss_kib();
    free_all(blocks);
    let freed = rss_kib();
    after_burst_delay();
    let after = rss_kib();
    println!("rss_kib peak={peak} freed={freed} after={after}");
}

/// Lets freed big blocks wait out the chunk cache's burst delay (100 ms),
/// then makes one allocator call: what waited beyond 64 MiB goes back.
fn after_burst_delay() {
    allocate_after(150);
}

/// Lets the chunk cache's reserve go unused for its second, then makes one
/// allocator call: everything cached goes back.
fn after_idle_reserve() {
    allocate_after(1100);
}

/// Lets `ms` pass on the allocator's (frozen) clock, then makes (and frees)
/// one large block, an allocator slow path.
fn allocate_after(ms: u64) {
    hakmem::test_hooks::advance_clock(ms);
    free_all(&make(1, 1 << 20, 0));
}

/// A cached chunk reused for a small block still holds what the big block
/// before it wrote, and the cache must count it: 30 blocks of 1.9 MiB written
/// whole and freed; 30 blocks of 300 KB (reusing those chunks, one page
/// written) kept while 30 more of 1.9 MiB are made and written; those freed,
/// then the small ones.
/// Prints RSS before, at once after, and after the burst delay (the cache
/// may keep 64 MiB).
fn large_stale() {
    let whole = 1900 * 1024;
    let before = rss_kib();
    free_all(&make(30, whole, whole));
    let small = make(30, 300 * 1024, 4096);
    let big = make(30, whole, whole);
    free_all(&big);
    free_all(&small);
    let freed = rss_kib();
    after_burst_delay();
    let after = rss_kib();
    println!("rss_kib before={before} freed={freed} after={after}");
}

/// The chunk cache keeps blocks that were barely touched and lets go of
/// blocks that were: 500 blocks of 1 MiB with one page written, freed and made
/// again (prints how many came back at the same address), then 100 blocks of
/// 1.9 MiB written whole and freed (prints RSS at the peak, at once after the
/// frees, and after the burst delay), then a `malloc_trim` (prints RSS after).
fn large_cache() {
    let first = make(500, 1 << 20, 4096);
    free_all(&first);
    let second = make(500, 1 << 20, 4096);
    let reused = second.iter().filter(|p| first.contains(p)).count();
    free_all(&second);
    println!("large_reused {reused} of 500");
    let whole = 1900 * 1024;
    free_burst(&make(100, whole, whole));
    // What the reserve kept goes back at a `malloc_trim`.
    let trimmed = hakmem::api::trim();
    println!("trim returned={trimmed} rss_kib={}", rss_kib());
}

/// Mid-size callocs that the program touches in one byte each: those ACE
/// carves from untouched pages are not written (`api::calloc`). Each block
/// must read zero where the test looks, fresh or after a dirty reuse.
fn calloc_sparse() {
    // The largest classes (a refill takes one block) and a smaller one
    // (a refill takes four: one of them known to read zero).
    let shapes = [(1000, 200_000), (1000, 20_000)];
    let before = rss_kib();
    let mut blocks = Vec::new();
    for (n, size) in shapes {
        for _ in 0..n {
            // SAFETY: plain allocation, checked, freed below.
            let p = unsafe { hakmem::api::calloc(1, size) };
            assert!(!p.is_null());
            // SAFETY: a byte of the block.
            unsafe { *p.add(size / 2) = 1 };
            blocks.push((p, size));
        }
    }
    let grown = rss_kib() - before;
    let fresh_zero = blocks
        .iter()
        .all(|&(p, size)| reads_zero_but_middle(p, size));
    // The same blocks written all over, freed and calloc'd again: cleared.
    for &(p, size) in &blocks {
        // SAFETY: the block is the scenario's; freed once.
        unsafe {
            core::ptr::write_bytes(p, 0xA5, size);
            hakmem::api::free(p);
        }
    }
    let again: Vec<_> = blocks
        .iter()
        .map(|&(_, size)| {
            // SAFETY: plain allocation, checked, freed below.
            let p = unsafe { hakmem::api::calloc(1, size) };
            assert!(!p.is_null());
            // SAFETY: as above.
            unsafe { *p.add(size / 2) = 1 };
            (p, size)
        })
        .collect();
    let reused_zero = again
        .iter()
        .all(|&(p, size)| reads_zero_but_middle(p, size));
    for (p, _) in again {
        // SAFETY: allocated above, freed once.
        unsafe { hakmem::api::free(p) };
    }
    println!("calloc_sparse grown_kib={grown} fresh_zero={fresh_zero} reused_zero={reused_zero}");
}

/// Whether every byte of a calloc'd block of `size` bytes reads zero but
/// the one at the middle that `calloc_sparse` wrote. (Called after the RSS
/// is read: reading untouched pages maps the shared zero page.)
fn reads_zero_but_middle(p: *mut u8, size: usize) -> bool {
    // SAFETY: `p` has `size` readable bytes.
    let bytes = unsafe { core::slice::from_raw_parts(p, size) };
    let (before, after) = bytes.split_at(size / 2);
    before.iter().chain(&after[1..]).all(|&b| b == 0) && after[0] == 1
}

/// Allocates and frees in a loop until killed (a target for attach/detach tests).
fn forever() {
    let mut round = 0u64;
    loop {
        let v: Vec<*mut u8> = (0..2000)
            // SAFETY: a plain malloc, freed below.
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

fn random_size(x: &mut u64) -> usize {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    match *x % 16 {
        0 => 1025 + (*x >> 8) as usize % 31_000,
        1 => 33_000 + (*x >> 8) as usize % 300_000,
        _ => 1 + (*x >> 8) as usize % 1024,
    }
}

/// Allocates, fills, checks and frees `n` blocks of random sizes.
fn churn(n: usize, seed: u64) {
    let mut x = seed | 1;
    let mut live: Vec<(*mut u8, usize, u8)> = Vec::with_capacity(64);
    for i in 0..n {
        let size = random_size(&mut x);
        // SAFETY: plain allocation, checked.
        let p = unsafe { hakmem::api::malloc(size) };
        assert!(!p.is_null());
        fill(p, size, i as u8);
        live.push((p, size, i as u8));
        if live.len() == 64 {
            for (p, size, seed) in live.drain(..) {
                check(p, size, seed);
                // SAFETY: allocated above.
                unsafe { hakmem::api::free(p) };
            }
        }
    }
    for (p, size, seed) in live {
        check(p, size, seed);
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(p) };
    }
}

/// fork() from a multi-threaded process while other threads allocate; the
/// child allocates (and half the time execs), the parent goes on.
fn fork() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    churn(500, t * 1000 + round);
                    round += 1;
                }
            })
        })
        .collect();
    for i in 0..40 {
        // SAFETY: fork; the child only allocates, frees and exits or execs.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            churn(2000, 77 + i);
            if i % 2 == 0 {
                let prog = c"/bin/true";
                let argv = [prog.as_ptr(), std::ptr::null()];
                // SAFETY: a NUL-terminated argv; execv only returns on failure.
                unsafe { libc::execv(prog.as_ptr(), argv.as_ptr()) };
            }
            // SAFETY: leave the child without running the parent's atexit work.
            unsafe { libc::_exit(0) };
        }
        churn(500, i);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {i} failed: {status:#x}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}

/// With RLIMIT_AS lowered: every path returns NULL with ENOMEM instead of
/// crashing, the probes fire, and overflowing calloc/realloc are refused.
fn oom() {
    use std::io::Error;
    let errno = || Error::last_os_error().raw_os_error();
    // SAFETY: each call follows the C contract; results are checked.
    unsafe {
        assert!(hakmem::api::calloc(usize::MAX / 4, 8).is_null());
        assert_eq!(errno(), Some(libc::ENOMEM));
        let keep = hakmem::api::malloc(100);
        fill(keep, 100, 9);
        // Blocks to grow at the limit, and blocks of their new sizes' classes
        // to free into the thread cache once nothing else can be had.
        // (from, to, alignment): 128 as Rust's realloc of a vector of
        // 128-aligned elements asks.
        let grows = [
            (20_000, 40_000, 16),
            (16_000, 17_000, 16),
            (20_000, 40_000, 128),
        ];
        let to_grow = grows.map(|(from, _, align)| hakmem::api::alloc_aligned(align, from));
        let spares = grows.map(|(_, to, align)| hakmem::api::alloc_aligned(align, to));
        for (p, (from, _, _)) in to_grow.iter().zip(grows) {
            fill(*p, from, 5);
        }
        // Blocks of 40,000's class to be freed last, two not 128-aligned at
        // the head of the thread cache (ACE's blocks are 64-aligned, every
        // other one 128): what a plain malloc(40,000) would hand the
        // 128-aligned growth (the first growth of that class takes the other).
        let mut unaligned: [*mut u8; 6] = [std::ptr::null_mut(); 6];
        for b in unaligned.iter_mut() {
            *b = hakmem::api::malloc(40_000);
        }
        unaligned.sort_by_key(|&b| (b as usize).is_multiple_of(128));
        assert!(
            !(unaligned[1] as usize).is_multiple_of(128),
            "{unaligned:?}"
        );
        unaligned.reverse();
        limit_address_space(96 << 20);
        // Fill the address space with each kind until it says no.
        let mut held: [*mut u8; 40_000] = [std::ptr::null_mut(); 40_000];
        let mut n = 0;
        for size in [1_000_000usize, 20_000, 700] {
            loop {
                let p = hakmem::api::malloc(size);
                if p.is_null() {
                    assert_eq!(errno(), Some(libc::ENOMEM), "size {size}");
                    break;
                }
                assert!(
                    n < held.len(),
                    "the limit was never reached for size {size}"
                );
                held[n] = p;
                n += 1;
            }
        }
        // A failing realloc leaves the block alone.
        assert!(hakmem::api::realloc(keep, 50_000_000).is_null());
        check(keep, 100, 9);
        // A growth that cannot have its headroom (a parcel, twice the size)
        // takes what malloc of the size would: here a block in the thread
        // cache. glibc's realloc fails only when `size` bytes cannot be had.
        for b in spares.into_iter().chain(unaligned) {
            hakmem::api::free(b);
        }
        let mut grown = [(std::ptr::null_mut(), 0); 3];
        for ((q, p), (_, to, align)) in grown.iter_mut().zip(to_grow).zip(grows) {
            *libc::__errno_location() = 0;
            *q = (
                hakmem::api::realloc_aligned(p, align, to),
                errno().unwrap_or(-1),
            );
        }
        // Checked with the memory given back: a failed assertion's message
        // and backtrace need some (std's backtrace hangs at an allocation
        // failure inside it).
        for p in &held[..n] {
            hakmem::api::free(*p);
        }
        for ((q, errno_after), (from, to, align)) in grown.into_iter().zip(grows) {
            assert!(!q.is_null(), "realloc({from} -> {to}) at the limit failed");
            assert!(
                (q as usize).is_multiple_of(align),
                "{q:?} for alignment {align}"
            );
            assert_eq!(
                errno_after, 0,
                "realloc({from} -> {to}) succeeded and set errno"
            );
            check(q, from, 5);
            hakmem::api::free(q);
        }
        hakmem::api::free(keep);
    }
}

/// Requests no mapping could hold (more than memory and swap, than
/// `RLIMIT_AS`, than the budget) are refused without emptying the caches; one that memory given
/// back could serve empties them and is served. Under HAKMEM_OS_LIMIT_MB=64
/// (the test's), 40 MiB is such a request; without a limit it is served at
/// once. Prints what each part gave back to the OS for the refusal.
fn hopeless() {
    use hakmem_common::codes::ReturnWhy;
    let errno = || std::io::Error::last_os_error().raw_os_error();
    let refused = || hakmem::stats::snapshot().returned_bytes(ReturnWhy::Refused);
    // SAFETY: each call follows the C contract; results are checked.
    unsafe {
        // Eight 4 MiB mappings into the chunk cache.
        let blocks: [*mut u8; 8] = std::array::from_fn(|_| hakmem::api::malloc(4 << 20));
        for &b in &blocks {
            assert!(!b.is_null());
            fill(b, 4096, 1);
        }
        for b in blocks {
            hakmem::api::free(b);
        }
        let before = refused();
        let refuse_all = |size: usize| {
            assert!(hakmem::api::malloc(size).is_null(), "malloc({size})");
            assert_eq!(errno(), Some(libc::ENOMEM));
            assert!(hakmem::api::calloc(size, 1).is_null(), "calloc({size})");
            assert!(
                hakmem::api::alloc_aligned(4 << 20, size).is_null(),
                "aligned({size})"
            );
            assert_eq!(errno(), Some(libc::ENOMEM));
        };
        // Beyond memory and swap (2^45: 32 TiB), where the kernel's default
        // overcommit heuristic refuses such a mapping.
        let heuristic = std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
            .is_ok_and(|m| m.trim() == "0");
        if heuristic {
            refuse_all(1 << 45);
        }
        // Beyond RLIMIT_AS, in any mode: 4 GiB (within memory and swap
        // here) against a limit of what is mapped now and 128 MiB more.
        limit_address_space(128 << 20);
        refuse_all(4 << 30);
        println!("hopeless gave back: {}", refused() - before);
        let before = refused();
        let p = hakmem::api::malloc(40 << 20);
        assert!(!p.is_null(), "malloc(40 MiB)");
        println!("curable gave back: {}", refused() - before);
        hakmem::api::free(p);
    }
}

/// Sets `RLIMIT_AS` to the address space in use now plus `more` bytes.
fn limit_address_space(more: u64) {
    let mut status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    status.clear();
    drop(status);
    // The stack grows into the address space too: were it to grow past
    // the limit, the process would die of SIGSEGV whatever the
    // allocator does (1 run in 10 died so in `flush_refused`'s frame,
    // as ASLR placed the stack). Its pages are made now, before.
    grow_stack();
    let rl = libc::rlimit {
        rlim_cur: vm_kib * 1024 + more,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setting this process's own limit from a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
}

/// Touches 256 KiB of stack below the caller, so that the calls after it
/// need no new stack pages.
#[inline(never)]
fn grow_stack() {
    let mut pad = [0u8; 256 << 10];
    std::hint::black_box(&mut pad);
}

/// A double free: aborts with a message, or is logged and ignored with HAKMEM_INVALID_FREE=ignore.
fn double_free() {
    // SAFETY: deliberately wrong, to test the detection.
    unsafe {
        let p = hakmem::api::malloc(64);
        hakmem::api::free(p);
        hakmem::api::free(p);
        let q = hakmem::api::malloc(100_000);
        hakmem::api::free(q);
        hakmem::api::free(q);
    }
    println!("survived");
}

/// A free of a pointer hakmem never handed out.
fn foreign_free() {
    let on_stack = [0u64; 4];
    // SAFETY: deliberately wrong, to test the detection.
    unsafe { hakmem::api::free(on_stack.as_ptr() as *mut u8) };
    println!("survived");
}

/// A large block freed, its chunk taken by a new ACE segment (they share the
/// chunk cache), then the large block freed again.
fn stale_free() {
    let chunk_of = |p: *mut u8| p as usize & !((2 << 20) - 1);
    // SAFETY: deliberately wrong (the second free of `big`), to test the detection.
    unsafe {
        let big = hakmem::api::malloc(1 << 20);
        fill(big, 4096, 1);
        hakmem::api::free(big);
        let mut mid = Vec::new();
        while mid.len() < 1000 {
            let p = hakmem::api::malloc(30_000);
            mid.push(p);
            if chunk_of(p) == chunk_of(big) {
                break;
            }
        }
        println!(
            "chunk reused: {}",
            chunk_of(*mid.last().unwrap()) == chunk_of(big)
        );
        hakmem::api::free(big);
        for p in mid {
            hakmem::api::free(p);
        }
    }
    println!("survived");
}

/// A thread allocates 20k blocks and exits with all of them still out; the
/// main thread frees them: the abandoned slabs must come back (recycled, and
/// their SuperSlabs unmapped beyond the hysteresis).
fn abandon() {
    let blocks: Vec<SendPtr> = std::thread::spawn(|| {
        (0..20_000)
            .map(|i| {
                // SAFETY: plain allocation, checked.
                let p = unsafe { hakmem::api::malloc(500) };
                assert!(!p.is_null());
                fill(p, 500, i as u8);
                SendPtr(p)
            })
            .collect()
    })
    .join()
    .unwrap();
    for (i, b) in blocks.iter().enumerate() {
        check(b.0, 500, i as u8);
        // SAFETY: allocated by the exited thread, freed once here.
        unsafe { hakmem::api::free(b.0) };
    }
}

/// The blocks a helper thread frees when a race hook says so (addresses).
static RACE_BLOCKS: [std::sync::atomic::AtomicUsize; 2] = [
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
];
/// 0: waiting; 1: the hook asks the helper to free RACE_BLOCKS; 2: done.
static RACE_STAGE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// The point whose first arrival opens the window.
static RACE_POINT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// At the first arrival at `RACE_POINT`: another thread frees the other
/// blocks of the slab, then everything the chunk cache holds goes back to
/// the OS (`malloc_trim`), as its policy may do at any moment; then the
/// paused thread goes on. Code that still read the slab after letting its
/// block go would read an unmapped SuperSlab here (SIGSEGV). Allocates
/// nothing itself.
fn race_hook(point: hakmem::test_hooks::Point, _slab: usize) {
    use std::sync::atomic::Ordering;
    if point as u32 == RACE_POINT.load(Ordering::Relaxed) && hold_window() {
        hakmem::api::trim();
    }
}

/// At the first call only (false at any later one): RACE_STAGE goes to 1
/// and the caller waits until another thread sets it to 2.
fn hold_window() -> bool {
    use std::sync::atomic::Ordering;
    if RACE_STAGE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    while RACE_STAGE.load(Ordering::Acquire) != 2 {
        std::thread::yield_now();
    }
    true
}

/// A thread fills slabs of 1000-byte blocks past one SuperSlab, keeps `1 +
/// others` blocks of its last slab, frees the rest and exits: its last slab
/// is abandoned with those blocks out, the only slab in use in its
/// SuperSlab. This thread frees the first kept block, pausing at `point`
/// while a helper frees the others (see `race_hook`). Run with
/// `HAKMEM_SS_KEEP=0 HAKMEM_PURGE_DELAY_MS=0`, so that a SuperSlab whose slabs are all EMPTY is
/// retired at once.
fn race_orphan(point: hakmem::test_hooks::Point, others: usize) {
    use std::sync::atomic::Ordering;
    // The exited thread leaves its kept blocks here: a Vec it returned would
    // be a block of its own in a slab of the same SuperSlab, keeping it mapped.
    static FIRST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    std::thread::spawn(move || {
        let blocks: Vec<usize> = (0..2200)
            .map(|_| {
                // SAFETY: plain allocation, checked.
                let p = unsafe { hakmem::api::malloc(1000) };
                assert!(!p.is_null());
                p as usize
            })
            .collect();
        let last_slab = blocks[blocks.len() - 1] >> 16;
        let mut kept = 0;
        for b in blocks {
            if b >> 16 == last_slab && kept <= others {
                let slot = if kept == 0 {
                    &FIRST
                } else {
                    &RACE_BLOCKS[kept - 1]
                };
                slot.store(b, Ordering::Relaxed);
                kept += 1;
            } else {
                // SAFETY: allocated above, freed once.
                unsafe { hakmem::api::free(b as *mut u8) };
            }
        }
    })
    .join()
    .unwrap();
    let helper = std::thread::spawn(|| {
        while RACE_STAGE.load(Ordering::Acquire) != 1 {
            std::thread::yield_now();
        }
        for slot in &RACE_BLOCKS {
            let b = slot.load(Ordering::Relaxed);
            if b != 0 {
                // SAFETY: a kept block of the exited thread, freed once.
                unsafe { hakmem::api::free(b as *mut u8) };
            }
        }
        RACE_STAGE.store(2, Ordering::Release);
    });
    RACE_POINT.store(point as u32, Ordering::Relaxed);
    hakmem::test_hooks::set(Some(race_hook));
    let before = hakmem::stats::snapshot();
    // SAFETY: a kept block of the exited thread, freed once.
    unsafe { hakmem::api::free(FIRST.load(Ordering::Relaxed) as *mut u8) };
    let retired = hakmem::stats::snapshot()
        .since(&before)
        .probe(hakmem_common::ProbeId::SsUnmap);
    hakmem::test_hooks::set(None);
    helper.join().unwrap();
    assert_eq!(
        RACE_STAGE.load(Ordering::Relaxed),
        2,
        "the window was never reached"
    );
    // The slab's last blocks went back within this one free (with the
    // helper's, in the window): its SuperSlab had nothing else in use.
    assert!(
        retired >= 1,
        "the orphaned slab's SuperSlab was not retired"
    );
    println!("the slab's last frees raced at {point:?}, its SuperSlab was retired, and the process survived");
}

/// Two frees into an orphaned slab: the first pauses before it decides
/// where its block goes, while the second frees the slab's last other block.
fn race_unowned_free() {
    race_orphan(hakmem::test_hooks::Point::UnownedFree, 1);
}

/// `mlockall(MCL_FUTURE)` lands between the region rule's look (no
/// `MCL_FUTURE` in force: mapped writable) and the region's mapping
/// (`Point::MapRegion`), as another thread's call may: the writable region
/// comes back resident and locked, all 32 MiB of it. `os::map_region` sees
/// its first page resident and maps it again reserved, so the chunks not
/// yet taken are not resident. Checked on the new region's top chunk:
/// `---p` in /proc/self/maps and not resident. Needs
/// CAP_IPC_LOCK (root); fails where `mlockall` is refused.
fn race_mlock_region() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static LOCKED: AtomicBool = AtomicBool::new(false);
    fn hook(point: hakmem::test_hooks::Point, prot: usize) {
        let writable = (libc::PROT_READ | libc::PROT_WRITE) as usize;
        if point == hakmem::test_hooks::Point::MapRegion
            && prot == writable
            && !LOCKED.swap(true, Ordering::Relaxed)
        {
            // SAFETY: no argument but the flags; allocates nothing.
            let rc = unsafe { libc::mlockall(libc::MCL_FUTURE) };
            assert_eq!(rc, 0, "mlockall(MCL_FUTURE) refused: run as root");
        }
    }
    const CHUNK: usize = 2 << 20;
    const REGION: usize = 16 * CHUNK;
    // Unprivileged, mlockall(MCL_FUTURE) may succeed and the locked 32 MiB
    // mapping then fail (RLIMIT_MEMLOCK): say so rather than fail below.
    // SAFETY: no argument.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "race-mlock-region needs root");
    hakmem::test_hooks::set(Some(hook));
    // Blocks of 1.5 MiB take a chunk each, until one needs a new region.
    let mut blocks = Vec::with_capacity(64);
    let mut last = 0;
    while !LOCKED.load(Ordering::Relaxed) && blocks.len() < 64 {
        // SAFETY: plain allocation, checked, freed below.
        last = unsafe { hakmem::api::malloc(1536 << 10) } as usize;
        assert!(last != 0);
        blocks.push(last);
    }
    hakmem::test_hooks::set(None);
    // The new region's first chunk holds the last block (a reserved region
    // hands chunks out from its bottom); its top chunk is the last to go,
    // untaken by what this scenario allocates from here on.
    let top = (last & !(CHUNK - 1)) + REGION - CHUNK;
    let mut resident = [0u8; 1];
    // SAFETY: one page's residency into a one-byte vector; `top` is page-aligned.
    let rc = unsafe { libc::mincore(top as *mut libc::c_void, 4096, resident.as_mut_ptr()) };
    // Read while locked: unlocking may merge the reserved mapping with a
    // neighbour, which would move its end.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    // SAFETY: no argument.
    unsafe { libc::munlockall() };
    assert!(
        LOCKED.load(Ordering::Relaxed),
        "no region was mapped writable: is vm.overcommit_memory 2?"
    );
    let prot = maps.lines().find_map(|l| {
        let (range, rest) = l.split_once(' ')?;
        let (lo, hi) = range.split_once('-')?;
        let lo = usize::from_str_radix(lo, 16).ok()?;
        let hi = usize::from_str_radix(hi, 16).ok()?;
        (lo..hi).contains(&top).then(|| (rest[..4].to_string(), hi))
    });
    for b in blocks {
        // SAFETY: allocated above, freed once.
        unsafe { hakmem::api::free(b as *mut u8) };
    }
    // Reserved, and ending where the region does: a writable region (no
    // remap) hands its top chunk out first, so `top` would lie past it.
    let region_end = (last & !(CHUNK - 1)) + REGION;
    assert_eq!(
        prot,
        Some(("---p".to_string(), region_end)),
        "the new region's top chunk (its mapping's protection and end)"
    );
    assert!(
        rc == 0 && resident[0] & 1 == 0,
        "the new region's top chunk is resident (mincore {rc})"
    );
    println!(
        "mlockall(MCL_FUTURE) came between the region rule and the mapping, and the region was mapped reserved"
    );
}

/// A reclaimer that drained an orphaned slab, with blocks still out, pauses
/// before parking it again, while another thread frees those last blocks.
fn race_repark() {
    race_orphan(hakmem::test_hooks::Point::BeforeRepark, 2);
}

/// Set by the owner just before it allocates in the take's window.
static OWNER_ASKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set by the owner once its allocations in the window are done.
static OWNER_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Whether the owner was still waiting when the taker let its gate go.
static OWNER_WAITED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The owner thread's id (gettid), for its state in /proc.
static OWNER_TID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The state letter of thread `tid` (/proc/self/task/TID/stat), read into a
/// buffer on the stack (the hook may not allocate: its thread holds a gate).
fn thread_state(tid: i32) -> u8 {
    // "/proc/self/task/" TID "/stat" NUL, the TID without leading zeros
    // (which /proc refuses).
    let mut path = [0u8; 40];
    path[..16].copy_from_slice(b"/proc/self/task/");
    let mut digits = [0u8; 10];
    let (mut n, mut k) = (tid as u32, 0);
    loop {
        digits[k] = b'0' + (n % 10) as u8;
        k += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..k {
        path[16 + i] = digits[k - 1 - i];
    }
    path[16 + k..16 + k + 5].copy_from_slice(b"/stat");
    let mut buf = [0u8; 512];
    // SAFETY: a NUL-terminated path and a buffer of ours.
    let len = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY);
        if fd < 0 {
            return 0;
        }
        let len = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        len
    };
    let text = &buf[..len.max(0) as usize];
    // "pid (comm) S ...": the letter after the last ')'.
    match text.iter().rposition(|&c| c == b')') {
        Some(i) if i + 2 < text.len() => text[i + 2],
        _ => 0,
    }
}

/// At the first `TakeSlab`: the taker holds the owner's gate. It lets the
/// owner start its slow path (a refill, its exit or a fork: each needs the
/// gate) and waits up to 5 s for it to be asleep (the futex of the gate) or
/// done (its flag, or its thread gone from /proc); it notes whether the
/// owner was asleep and not done. Allocates nothing.
fn take_hook(point: hakmem::test_hooks::Point, _slab: usize) {
    use std::sync::atomic::Ordering;
    if point != hakmem::test_hooks::Point::TakeSlab
        || RACE_STAGE
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    while !OWNER_ASKING.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let tid = OWNER_TID.load(Ordering::Acquire);
    let mut asleep = false;
    for _ in 0..500 {
        if OWNER_DONE.load(Ordering::Acquire) {
            break;
        }
        match thread_state(tid) {
            // Exited (its task is gone).
            0 => {
                OWNER_DONE.store(true, Ordering::Release);
                break;
            }
            b'S' => {
                asleep = true;
                break;
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    OWNER_WAITED.store(
        asleep && !OWNER_DONE.load(Ordering::Acquire),
        Ordering::Release,
    );
    RACE_STAGE.store(2, Ordering::Release);
}

/// `race_take_slab`'s block size (a bin of 64 KiB slabs, `TAKE_SLAB`).
const TAKE_SIZE: usize = 768;
const TAKE_SLAB: usize = 64 << 10;

/// The owner's 60 blocks of `TAKE_SIZE`, a new thread's first of the bin:
/// its first slab of the bin holds most of them. The caller frees them.
fn owners_first_blocks() -> [usize; 60] {
    let mut first = [0usize; 60];
    for b in first.iter_mut() {
        // SAFETY: plain allocation, checked.
        *b = unsafe { hakmem::api::malloc(TAKE_SIZE) } as usize;
        assert!(*b != 0);
    }
    first
}

/// Whether RACE_STAGE reaches `stage` within 5 s (a run that misses its
/// window then fails, it does not hang). Allocates nothing.
fn stage_reaches(stage: u32) -> bool {
    use std::sync::atomic::Ordering;
    for _ in 0..500 {
        if RACE_STAGE.load(Ordering::Acquire) >= stage {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// Takes decided (`Point::TakeSlab`), counted by `count_takes`.
static TAKES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_takes(point: hakmem::test_hooks::Point, _slab: usize) {
    if point == hakmem::test_hooks::Point::TakeSlab {
        TAKES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Two owners make their first slab of a bin and go idle; this thread frees
/// their blocks in turn, one of each. A free tries to take a slab when its
/// remote list reaches half, then 16 frees later, and takes only from an
/// owner idle since the thread's last try of that owner: with one record
/// of the last try, the other owner's try came between and neither was
/// ever taken. Prints "takes: N".
fn take_two_owners() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // Published through statics, and idle by polling them: an owner that
    // allocated after its blocks went out (a channel's waker, a lock's
    // queue) would make a slow path between this thread's two tries.
    static BLOCKS: [[AtomicUsize; 60]; 2] = [const { [const { AtomicUsize::new(0) }; 60] }; 2];
    static READY: AtomicUsize = AtomicUsize::new(0);
    static DONE: AtomicBool = AtomicBool::new(false);
    let owners: Vec<_> = (0..2)
        .map(|o| {
            std::thread::spawn(move || {
                for (slot, b) in BLOCKS[o].iter().zip(owners_first_blocks()) {
                    slot.store(b, Ordering::Relaxed);
                }
                READY.fetch_add(1, Ordering::Release);
                while !DONE.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        })
        .collect();
    while READY.load(Ordering::Acquire) < 2 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    hakmem::test_hooks::set(Some(count_takes));
    for i in 0..60 {
        for owner in &BLOCKS {
            // SAFETY: an owner's block, freed once, here.
            unsafe { hakmem::api::free(owner[i].load(Ordering::Relaxed) as *mut u8) };
        }
    }
    hakmem::test_hooks::set(None);
    println!("takes: {}", TAKES.load(Ordering::Relaxed));
    DONE.store(true, Ordering::Release);
    for o in owners {
        o.join().unwrap();
    }
}

/// What the owner does while a free takes its slab (`RACE_OWNER`).
#[derive(Clone, Copy)]
enum OwnerAct {
    /// Allocates 40 blocks more of the bin: a refill.
    Refill,
    /// Returns: its thread's exit gives every slab back.
    Exit,
    /// Forks; the child allocates 40 blocks of the bin (a refill) and exits.
    Fork,
}

/// A thread (the owner) allocates 60 blocks of 768 bytes: its first slab
/// of that bin, its active one, holds them. This thread frees the owner's
/// blocks of that slab; at the second try past half its blocks (the owner,
/// waiting, made no slow path since the first), the free takes the slab
/// (`tiny::take_slab`) and pauses at `Point::TakeSlab`, holding the owner's
/// gate, while the owner goes into a slow path that needs it (`RACE_OWNER`,
/// see `take_hook`): it must be found asleep on the gate, not done.
/// - `refill` (the default): a refill that did not wait would work on the
///   slab under the taker; it must then carve from another slab, not the one
///   taken from it, which its state still named as active.
/// - `exit`: the exit hook would give the slab back to the pool (or park
///   it) under the taker.
/// - `fork`: the child would be made with the gate held by a taker it does
///   not have, and its first refill would sleep forever (the child must
///   exit within 10 s).
///
/// Then both free everything.
fn race_take_slab() {
    use std::sync::atomic::Ordering;
    let act = match std::env::var("RACE_OWNER").as_deref() {
        Ok("exit") => OwnerAct::Exit,
        Ok("fork") => OwnerAct::Fork,
        Ok("refill") | Err(_) => OwnerAct::Refill,
        Ok(other) => panic!("RACE_OWNER={other}: refill, exit or fork"),
    };
    let (tx, rx) = std::sync::mpsc::channel::<[usize; 60]>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let owner = std::thread::spawn(move || {
        let first = owners_first_blocks();
        // SAFETY: gettid has no preconditions.
        OWNER_TID.store(unsafe { libc::gettid() }, Ordering::Release);
        tx.send(first).unwrap();
        while RACE_STAGE.load(Ordering::Acquire) != 1 {
            std::thread::yield_now();
        }
        // Nothing allocated from here to the slow path, which alone may sleep.
        OWNER_ASKING.store(true, Ordering::Release);
        match act {
            OwnerAct::Refill => owner_refills(first[0] / TAKE_SLAB, &go_rx),
            OwnerAct::Exit => {}
            OwnerAct::Fork => owner_forks(),
        }
    });
    let first = rx.recv().unwrap();
    let taken = first[0] / TAKE_SLAB;
    let in_slab: Vec<usize> = first
        .iter()
        .copied()
        .filter(|&b| b / TAKE_SLAB == taken)
        .collect();
    assert!(
        in_slab.len() >= 50,
        "the owner's blocks are not in one slab"
    );
    hakmem::test_hooks::set(Some(take_hook));
    for &b in &in_slab {
        // SAFETY: the owner's block, freed once, here.
        unsafe { hakmem::api::free(b as *mut u8) };
    }
    hakmem::test_hooks::set(None);
    assert_eq!(
        RACE_STAGE.load(Ordering::Acquire),
        2,
        "no free took the slab"
    );
    let waited = OWNER_WAITED.load(Ordering::Acquire);
    // Only a refilling owner waits for it (the others may be gone).
    let _ = go_tx.send(());
    let joined = owner.join();
    assert!(
        waited,
        "{}",
        match act {
            OwnerAct::Refill => "the owner refilled while another thread held its gate",
            OwnerAct::Exit => "the owner's exit went on while another thread held its gate",
            OwnerAct::Fork => "the owner forked while another thread held its gate",
        }
    );
    if let Err(e) = joined {
        std::panic::resume_unwind(e);
    }
    for b in first.iter().copied().filter(|&b| b / TAKE_SLAB != taken) {
        // SAFETY: the owner's other blocks, freed once.
        unsafe { hakmem::api::free(b as *mut u8) };
    }
    // The taken slab is this thread's now: the frees after the take kept
    // its blocks in this thread's cache, and they come back to it.
    let again: Vec<usize> = (0..in_slab.len())
        // SAFETY: plain allocation, checked, freed below.
        .map(|_| unsafe { hakmem::api::malloc(TAKE_SIZE) } as usize)
        .collect();
    assert!(again.iter().all(|&b| b != 0));
    assert!(
        again.iter().any(|&b| b / TAKE_SLAB == taken),
        "the taken slab's blocks did not come back to the taker"
    );
    for b in again {
        // SAFETY: allocated above, freed once.
        unsafe { hakmem::api::free(b as *mut u8) };
    }
    println!(
        "the owner waited for the taker's gate ({})",
        match act {
            OwnerAct::Refill => "refill; it refilled from another slab",
            OwnerAct::Exit => "exit",
            OwnerAct::Fork => "fork; the child allocated and exited",
        }
    );
}

/// `race_take_slab`'s owner, refilling in the window: 40 blocks more of the
/// bin, which must not come from the slab `taken` (by 64 KiB index).
fn owner_refills(taken: usize, go: &std::sync::mpsc::Receiver<()>) {
    use std::sync::atomic::Ordering;
    let mut more = [0usize; 40];
    for b in more.iter_mut() {
        // SAFETY: plain allocation, checked.
        *b = unsafe { hakmem::api::malloc(TAKE_SIZE) } as usize;
        assert!(*b != 0);
    }
    OWNER_DONE.store(true, Ordering::Release);
    go.recv().unwrap();
    assert!(
        more[more.len() - 1] / TAKE_SLAB != taken,
        "the owner refilled from the slab taken from it"
    );
    for b in more {
        // SAFETY: allocated above, freed once.
        unsafe { hakmem::api::free(b as *mut u8) };
    }
}

/// `race_take_slab`'s owner, forking in the window (see
/// `fork_a_refilling_child`).
fn owner_forks() {
    use std::sync::atomic::Ordering;
    let pid = fork_a_refilling_child();
    OWNER_DONE.store(true, Ordering::Release);
    // Awake until the hook has looked (a sleep here would read as waiting).
    while RACE_STAGE.load(Ordering::Acquire) != 2 {
        std::thread::yield_now();
    }
    reap_within_10s(pid);
}

/// Forks a child that allocates 40 blocks of `TAKE_SIZE` (a refill, under
/// its copy of the forking thread's gate) and exits.
fn fork_a_refilling_child() -> libc::pid_t {
    // SAFETY: fork; the child only allocates through hakmem and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        for _ in 0..40 {
            // SAFETY: plain allocation, kept until the exit.
            if unsafe { hakmem::api::malloc(TAKE_SIZE) }.is_null() {
                // SAFETY: leaving the child without the parent's atexit work.
                unsafe { libc::_exit(1) };
            }
        }
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    pid
}

/// Waits up to 10 s for child `pid` to exit with status 0; kills it and
/// fails after that.
fn reap_within_10s(pid: libc::pid_t) {
    let mut status = 0;
    for _ in 0..1000 {
        // SAFETY: our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the child failed: {status:#x}"
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: our own child, then reaped.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0);
    }
    panic!("the child did not exit in 10 s: its first refill waits for a gate nobody holds");
}

/// A free's try to take a slab is refused: its owner holds its gate in the
/// fork's prepare handler (`Point::ForkHoldsGate`). The fork is made while
/// the refused taker has not yet let go of the gate's taker word
/// (`Point::TakeRefused`): the child's copy of the gate must read free, or
/// its first refill sleeps for good (the child allocates 40 blocks of the
/// bin and must exit within 10 s). The owner allocates 60 blocks of
/// `TAKE_SIZE` (one slab holds most), this thread frees them; the try
/// comes when the slab's remote list is about to hold half its blocks.
/// Allocates nothing in the hook.
fn race_take_refused() {
    use std::sync::atomic::Ordering;
    // RACE_STAGE: 1 the fork holds the owner's gate; 2 a taker was refused
    // and holds the taker word; 3 the fork is made.
    fn hook(point: hakmem::test_hooks::Point, _: usize) {
        use hakmem::test_hooks::Point;
        let (from, to, until) = match point {
            Point::ForkHoldsGate => (0, 1, 2),
            Point::TakeRefused => (1, 2, 3),
            _ => return,
        };
        if RACE_STAGE
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if !stage_reaches(until) {
            TIMED_OUT.store(true, Ordering::Release);
        }
    }
    static TIMED_OUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    hakmem::test_hooks::set(Some(hook));
    let (tx, rx) = std::sync::mpsc::channel::<[usize; 60]>();
    let owner = std::thread::spawn(move || {
        tx.send(owners_first_blocks()).unwrap();
        let pid = fork_a_refilling_child();
        let _ = RACE_STAGE.compare_exchange(2, 3, Ordering::AcqRel, Ordering::Relaxed);
        reap_within_10s(pid);
    });
    let first = rx.recv().unwrap();
    let slab = first[0] / TAKE_SLAB;
    stage_reaches(1);
    // The slab's blocks first: the try comes at half of them.
    let (in_slab, rest): (Vec<usize>, Vec<usize>) =
        first.iter().partition(|&&b| b / TAKE_SLAB == slab);
    for &b in in_slab.iter().chain(&rest) {
        // SAFETY: the owner's block, freed once, here.
        unsafe { hakmem::api::free(b as *mut u8) };
    }
    let joined = owner.join();
    hakmem::test_hooks::set(None);
    if let Err(e) = joined {
        std::panic::resume_unwind(e);
    }
    assert!(
        RACE_STAGE.load(Ordering::Acquire) == 3 && !TIMED_OUT.load(Ordering::Acquire),
        "no free was refused while the fork held the owner's gate"
    );
    println!("a taker refused by the fork's hold was copied into the child; the child allocated and exited");
}

/// A thread that needs a new SuperSlab pauses after letting the pool lock go
/// and before mapping it (`Point::MapSuperSlab`); meanwhile this thread
/// takes the pool lock (`malloc_trim` purges the pool's EMPTY slabs under
/// it). With the lock held across the mapping, the trim would wait for the
/// paused thread, which waits for the trim: the scenario would hang (the
/// test's deadline fails it). Then a third thread that needs a slab must
/// wait for the paused one's SuperSlab, not map another. Allocates nothing
/// in the hook.
fn race_map_superslab() {
    use std::sync::atomic::Ordering;
    thread_local! {
        // Only the growing thread pauses: the others may map a SuperSlab
        // too, before the window opens, and must go on.
        static GROWER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    fn hook(point: hakmem::test_hooks::Point, _: usize) {
        if point == hakmem::test_hooks::Point::MapSuperSlab && GROWER.with(|g| g.get()) {
            hold_window();
        }
    }
    hakmem::test_hooks::set(Some(hook));
    // A thread that will need a slab while the window is open: it must wait
    // for the grower's SuperSlab, not map one of its own (one mapping at a
    // time; see `pool::map_new`). Started now, so that nothing it needs to
    // start comes from the pool in the window, where this thread, which the
    // grower waits for, must not wait for the grower.
    let waiter = std::thread::spawn(|| {
        while RACE_STAGE.load(Ordering::Acquire) != 1 {
            std::thread::yield_now();
        }
        // SAFETY: plain allocation, checked, freed once.
        unsafe {
            let p = hakmem::api::malloc(1000);
            assert!(!p.is_null());
            hakmem::api::free(p);
        }
    });
    // Slabs of 1000-byte blocks until the pool has no slot left: about 2 MiB
    // fills a SuperSlab, so 6 MiB reach Stage 3 whatever earlier calls took.
    let grower = std::thread::spawn(|| {
        GROWER.with(|g| g.set(true));
        let blocks: Vec<usize> = (0..6 * 1024)
            .map(|_| {
                // SAFETY: plain allocation, checked.
                let p = unsafe { hakmem::api::malloc(1000) };
                assert!(!p.is_null());
                p as usize
            })
            .collect();
        for b in blocks {
            // SAFETY: allocated above, freed once.
            unsafe { hakmem::api::free(b as *mut u8) };
        }
    });
    while RACE_STAGE.load(Ordering::Acquire) != 1 {
        assert!(!grower.is_finished(), "the grower never mapped a SuperSlab");
        std::thread::yield_now();
    }
    hakmem::api::trim();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "a second SuperSlab was mapped while the first was"
    );
    RACE_STAGE.store(2, Ordering::Release);
    grower.join().unwrap();
    waiter.join().unwrap();
    hakmem::test_hooks::set(None);
    println!("the pool lock was free while a SuperSlab was being mapped, and one mapped at a time");
}

/// One misuse, named by `MISUSE` (`MISUSE_SIZE` picks the block size):
/// each must abort with a message naming the call and the pointer (see
/// `tests/scenarios.rs`), never go on with a corrupted heap. Prints
/// "survived" if it did not abort.
fn misuse() {
    use hakmem::api::{free, malloc};
    let kind = std::env::var("MISUSE").unwrap_or_default();
    let size = env_usize("MISUSE_SIZE", 64);
    // SAFETY: deliberately wrong, to test the detection; every wrong call is
    // the last one before the expected abort.
    unsafe {
        match kind.as_str() {
            // The block is not the head of the thread's list any more.
            "double-free-deep" => {
                let (a, b) = (malloc(size), malloc(size));
                free(a);
                free(b);
                free(a);
            }
            // The first free drained to the slab's (or segment's) free list;
            // the block after it stays out, so its slab stays in use.
            "double-free-drained" => {
                let a = malloc(size);
                let more: Vec<usize> = (0..5000).map(|_| malloc(size) as usize).collect();
                free(a);
                for &p in &more[1..] {
                    free(p as *mut u8);
                }
                free(a);
            }
            // Another thread's free put it on the slab's remote list.
            "double-free-remote" => {
                let (tx, rx) = std::sync::mpsc::channel();
                let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
                let owner = std::thread::spawn(move || {
                    tx.send(malloc(size) as usize).unwrap();
                    done_rx.recv().unwrap();
                });
                let a = rx.recv().unwrap() as *mut u8;
                free(a);
                free(a);
                done_tx.send(()).unwrap();
                owner.join().unwrap();
            }
            // The owner freed it into its own cache; this thread frees it
            // again. (No channel: its allocations could take the block back.)
            "double-free-other-cache" => {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static BLOCK: AtomicUsize = AtomicUsize::new(0);
                let freed = std::sync::Arc::new(Barrier::new(2));
                let done = std::sync::Arc::new(Barrier::new(2));
                let (f, d) = (freed.clone(), done.clone());
                let owner = std::thread::spawn(move || {
                    let a = malloc(size);
                    free(a);
                    BLOCK.store(a as usize, Ordering::Release);
                    f.wait();
                    d.wait();
                });
                freed.wait();
                free(BLOCK.load(Ordering::Acquire) as *mut u8);
                done.wait();
                owner.join().unwrap();
            }
            "double-free-repeated" => {
                let a = malloc(size);
                free(a);
                free(a);
            }
            // A buffer realloc grew into a parcel, freed twice.
            "double-free-parcel" => {
                let a = hakmem::api::realloc(malloc(3000), size.max(40_000));
                free(a);
                free(a);
            }
            // Another thread's block: its free reads the slab's metadata.
            "interior-remote" => {
                let a = std::thread::spawn(move || malloc(size) as usize)
                    .join()
                    .unwrap() as *mut u8;
                free(a.add(if size > 16 { (size / 2) & !15 } else { 8 }));
            }
            "interior" => {
                let a = malloc(size);
                // Inside the block: past its first word, not at the next block.
                free(a.add(if size > 16 { (size / 2) & !15 } else { 8 }));
            }
            "misaligned" => {
                let a = malloc(size);
                free(a.add(1));
            }
            // Into the header at the start of the block's 2 MiB chunk (a
            // SuperSlab's, an ACE segment's), from the thread that owns
            // slabs of that SuperSlab: its free reads its index first.
            "segment-header" => {
                let a = malloc(size);
                let chunk = a as usize & !((2 << 20) - 1);
                free((chunk + 64) as *mut u8);
            }
            // Addresses no slab can hold, on the grid, from a thread whose
            // owned index is in use: the lowest (slot 0, which holds
            // `owned_index::SLOT0`) and one in the kernel's half.
            "low-address" | "kernel-address" => {
                let a = malloc(size);
                assert!(!a.is_null());
                free(if kind == "low-address" {
                    16 as *mut u8
                } else {
                    0xffff_8000_0000_0010usize as *mut u8
                });
            }
            // Into slab 0 past the header (on the grid), where no slab serves,
            // for tiny sizes; for mid ones, into an ACE segment's block.
            "slab-zero" | "slab-zero-realloc" => {
                let a = malloc(size);
                let p = ((a as usize & !((2 << 20) - 1)) + 0x8000) as *mut u8;
                if kind == "slab-zero" {
                    free(p);
                } else {
                    hakmem::api::realloc(p, 100);
                }
            }
            // A realloc of a freed block that realloc's growth had put in a
            // parcel (a second one is live beside it): it took that parcel
            // again, freed it and returned it.
            "realloc-freed-parcel" => {
                use hakmem::api::realloc;
                let kept = realloc(malloc(size), 40_000);
                let a = realloc(malloc(size), 40_000);
                assert!(!kept.is_null() && !a.is_null());
                free(a);
                realloc(a, 40_000);
            }
            // A use-after-free write of a plain pointer into the link word:
            // it must not become the next block handed out.
            "use-after-free-link" => {
                let target = Box::into_raw(Box::new([0u64; 8])) as usize;
                let a = loop {
                    let a = malloc(size);
                    // A block whose mangling changes the low bits, so the
                    // forged link decodes misaligned (15 blocks in 16).
                    if (a as usize >> 12) & 15 != 0 {
                        break a;
                    }
                };
                free(a);
                (a as *mut usize).write(target);
                let again = malloc(size);
                let forged = malloc(size);
                println!("handed out {again:p} then {forged:p} (forged {target:#x})");
            }
            _ => {
                eprintln!("MISUSE=double-free-deep|double-free-drained|double-free-remote|double-free-other-cache|double-free-repeated|interior|interior-remote|misaligned|segment-header|low-address|kernel-address|slab-zero|slab-zero-realloc|use-after-free-link");
                std::process::exit(2);
            }
        }
    }
    println!("survived");
}

/// What `hakctl mem` must see (`tests/levels.rs`): the workload holds a known
/// set of blocks of every tier, some freed into the caches of three live
/// threads, some on a live thread's remote list, some left by a thread that
/// exited. Driven through stdin and stdout with read(2)/write(2), and with
/// raw pthreads, so that between its two reports nothing allocates or frees
/// but the known set:
/// - prints `ready PID` once every thread is up (the baseline), waits for a line;
/// - makes the set, prints `held tiny=B ace=B large=B parcel=B` (usable bytes
///   of the blocks held, by tier) and mallinfo2's arena, hblks and hblkhd,
///   waits for a line, and exits.
fn levels() {
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
    const WORKERS: usize = 3;
    /// Blocks handed to main: the remote ones (main frees them), the
    /// exited thread's (main keeps them).
    static HANDED: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];
    static HELD: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
    /// 0: wait; 1: make the set; 2: exit. Threads count themselves done.
    static PHASE: AtomicU32 = AtomicU32::new(0);
    static DONE: AtomicU32 = AtomicU32::new(0);

    fn tier(size: usize) -> usize {
        use hakmem::class::{ACE_MAX, TINY_MAX};
        match size {
            0..=TINY_MAX => 0,
            s if s <= ACE_MAX => 1,
            _ => 2,
        }
    }
    /// Allocates `n` blocks of `size`, counting their usable bytes as held
    /// if `count` (not: they are freed or handed on).
    fn make(size: usize, n: usize, count: bool) -> Vec<*mut u8> {
        (0..n)
            .map(|_| {
                // SAFETY: a plain allocation, checked.
                let p = unsafe { hakmem::api::malloc(size) };
                assert!(!p.is_null());
                if count {
                    HELD[tier(size)].fetch_add(hakmem::api::usable_size(p), SeqCst);
                }
                p
            })
            .collect()
    }
    fn wait_for(phase: u32) {
        while PHASE.load(SeqCst) < phase {
            std::hint::spin_loop();
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    /// A live worker: holds tiny and ACE blocks, frees some into its cache;
    /// worker 0 also hands blocks to main, which frees them onto its remote list.
    extern "C" fn worker(arg: *mut libc::c_void) -> *mut libc::c_void {
        let i = arg as usize;
        // Registered and cached before the baseline.
        let warm = make(64, 1, false);
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(warm[0]) };
        drop(warm);
        DONE.fetch_add(1, SeqCst);
        wait_for(1);
        let tiny = make(64, 200, true);
        let ace = make(5000, 20, true);
        for &p in tiny[..100].iter().chain(&ace[..10]) {
            HELD[tier(hakmem::api::usable_size(p))].fetch_sub(hakmem::api::usable_size(p), SeqCst);
            // SAFETY: allocated above, freed once (into this thread's cache).
            unsafe { hakmem::api::free(p) };
        }
        if i == 0 {
            for (k, p) in make(48, 50, false).into_iter().enumerate() {
                HANDED[k].store(p as usize, SeqCst);
            }
        }
        // The vectors go (their blocks stay held): nothing but the set is kept.
        drop((tiny, ace));
        DONE.fetch_add(1, SeqCst);
        wait_for(2);
        std::ptr::null_mut()
    }
    /// A thread that makes blocks, hands them to main and exits.
    extern "C" fn leaver(_: *mut libc::c_void) -> *mut libc::c_void {
        // Registered before the baseline, like the workers.
        let warm = make(32, 1, false);
        // SAFETY: allocated above.
        unsafe { hakmem::api::free(warm[0]) };
        drop(warm);
        DONE.fetch_add(1, SeqCst);
        wait_for(1);
        for (k, p) in make(32, 100, true)
            .into_iter()
            .chain(make(3000, 5, true))
            .enumerate()
        {
            HANDED[100 + k].store(p as usize, SeqCst);
        }
        std::ptr::null_mut()
    }
    fn say(msg: &str) {
        // SAFETY: a valid buffer of its length; no allocation.
        unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
    }
    fn read_line() {
        let mut b = [0u8; 1];
        // SAFETY: reads into a one-byte stack buffer.
        while unsafe { libc::read(0, b.as_mut_ptr().cast(), 1) } == 1 && b[0] != b'\n' {}
    }
    let mut threads = [0 as libc::pthread_t; WORKERS + 1];
    for (i, t) in threads.iter_mut().enumerate() {
        let body: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void =
            if i < WORKERS { worker } else { leaver };
        // SAFETY: valid out-pointer, default attributes, an extern "C" body.
        let rc = unsafe { libc::pthread_create(t, std::ptr::null(), body, i as *mut libc::c_void) };
        assert_eq!(rc, 0);
    }
    while DONE.load(SeqCst) < WORKERS as u32 + 1 {
        std::hint::spin_loop();
    }
    // Main's own blocks, and room for the report, made before the baseline.
    let mut report = String::with_capacity(256);
    report.push_str(&format!("ready {}\n", std::process::id()));
    say(&report);
    read_line();
    PHASE.store(1, SeqCst);
    for (size, n) in [
        (8, 50),
        (24, 50),
        (100, 50),
        (1000, 50),
        (2000, 10),
        (9000, 10),
        (100_000, 5),
        (300_000, 2),
        (3 << 20, 2),
    ] {
        // Held to the end (only the vector goes).
        drop(make(size, n, true));
    }
    // Two parcels: buffers realloc grew past 32 KiB.
    for _ in 0..2 {
        // SAFETY: a plain allocation grown by realloc.
        let p = unsafe { hakmem::api::realloc(hakmem::api::malloc(3000), 40_000) };
        assert!(!p.is_null());
        HELD[3].fetch_add(hakmem::api::usable_size(p), SeqCst);
    }
    while DONE.load(SeqCst) < 2 * WORKERS as u32 + 1 {
        std::hint::spin_loop();
    }
    // SAFETY: the leaver's thread, joined once.
    unsafe { libc::pthread_join(threads[WORKERS], std::ptr::null_mut()) };
    // Half the exited thread's 32-byte blocks, freed here: onto its
    // abandoned slab (reclaimed), or, legacy ones, into this thread's cache.
    for slot in &HANDED[100..150] {
        let p = slot.load(SeqCst) as *mut u8;
        HELD[0].fetch_sub(hakmem::api::usable_size(p), SeqCst);
        // SAFETY: a block the leaver made and handed over, freed once.
        unsafe { hakmem::api::free(p) };
    }
    // Worker 0's blocks, freed here: onto its slab's remote list.
    for slot in &HANDED[..50] {
        // SAFETY: a block worker 0 made and handed over, freed once.
        unsafe { hakmem::api::free(slot.load(SeqCst) as *mut u8) };
    }
    report.clear();
    let held = HELD.each_ref().map(|h| h.load(SeqCst));
    use std::fmt::Write;
    let f = hakmem::api::heap_figures();
    let _ = writeln!(
        report,
        "held tiny={} ace={} large={} parcel={} mallinfo_arena={} mallinfo_large_blocks={} mallinfo_large_bytes={}",
        held[0], held[1], held[2], held[3], f.arena, f.large_blocks, f.large_bytes
    );
    say(&report);
    read_line();
    PHASE.store(2, SeqCst);
    // SAFETY: exits without running destructors: the test has what it needs.
    unsafe { libc::_exit(0) };
}
