//! A library a host loads with `dlopen` (a Python extension module, a plugin)
//! that uses hakmem as its Rust global allocator. Loaded after start-up, it
//! gets no static TLS beyond glibc's small surplus, so it builds hakmem with
//! the `dynamic-tls` feature; the host's own malloc stays the C library's.

use hakmem::HakMem;

#[global_allocator]
static ALLOC: HakMem = HakMem;

/// Sizes from each tier: tiny, mid-size (ACE), large.
const SIZES: [usize; 6] = [16, 100, 1000, 5000, 50_000, 3 << 20];
const ROUNDS: usize = 200;

/// Makes and frees `ROUNDS` blocks of each of `SIZES` on the calling thread
/// and on `threads` more; returns how many of them hakmem served with their
/// contents intact (all of them: `(threads + 1) * ROUNDS * SIZES.len()`).
#[no_mangle]
pub extern "C" fn plugin_churn(threads: u32) -> u64 {
    let spawned: Vec<_> = (0..threads)
        .map(|t| std::thread::spawn(move || churn(t as u8)))
        .collect();
    let here = churn(threads as u8);
    here + spawned
        .into_iter()
        .map(|h| h.join().unwrap_or(0))
        .sum::<u64>()
}

fn churn(seed: u8) -> u64 {
    let mut served = 0;
    for round in 0..ROUNDS {
        let fill = seed.wrapping_add(round as u8);
        let blocks: Vec<Vec<u8>> = SIZES.iter().map(|&n| vec![fill; n]).collect();
        for b in &blocks {
            let ours = hakmem::api::usable_size(b.as_ptr()) >= b.len();
            if ours && b.iter().all(|&x| x == fill) {
                served += 1;
            }
        }
    }
    served
}
