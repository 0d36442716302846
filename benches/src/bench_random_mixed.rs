//! `bench_random_mixed N W [MIN MAX]`: N operations over W slots. Each picks a
//! random slot (seeded xorshift); frees its block if it holds one, else mallocs
//! a random MIN..=MAX byte block (default 16..1024) and writes into it. Frees
//! everything at the end and prints ops/s. It calls malloc/free through the C
//! ABI (libc), so it runs under LD_PRELOAD with any allocator.

use std::time::Instant;

fn arg(args: &[String], i: usize, default: u64) -> u64 {
    match args.get(i) {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| {
            eprintln!("bench_random_mixed: argument {i} ({s:?}) is not a number");
            std::process::exit(2)
        }),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ops = arg(&args, 1, 10_000_000);
    let slots = arg(&args, 2, 8192).max(1) as usize;
    let min = arg(&args, 3, 16) as usize;
    let max = arg(&args, 4, 1024).max(min as u64) as usize;
    let mut table: Vec<*mut u8> = vec![std::ptr::null_mut(); slots];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let start = Instant::now();
    for _ in 0..ops {
        let r = next();
        let slot = (r as usize) % slots;
        let p = table[slot];
        if p.is_null() {
            let size = min + ((r >> 32) as usize) % (max - min + 1);
            // SAFETY: plain malloc; the result is checked before use.
            let q = unsafe { libc::malloc(size) } as *mut u8;
            if q.is_null() {
                eprintln!("bench_random_mixed: malloc({size}) failed");
                std::process::exit(1);
            }
            // SAFETY: q has at least `size` >= 1 writable bytes.
            unsafe {
                *q = slot as u8;
                *q.add(size - 1) = 0xa5;
            }
            table[slot] = q;
        } else {
            // SAFETY: p came from malloc above and is freed once.
            unsafe { libc::free(p.cast()) };
            table[slot] = std::ptr::null_mut();
        }
    }
    for p in table.iter_mut().filter(|p| !p.is_null()) {
        // SAFETY: as above.
        unsafe { libc::free((*p).cast()) };
        *p = std::ptr::null_mut();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "bench_random_mixed ops={ops} slots={slots} sizes={min}..{max} time={secs:.3}s ops/s={:.0}",
        ops as f64 / secs
    );
}
