//! Sequences of malloc / free / realloc / calloc / aligned allocation, driven
//! by the fuzzer's bytes, with every live block's contents written and checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

const SLOTS: usize = 64;

struct Live {
    ptr: *mut u8,
    size: usize,
    fill: u8,
}

fn check(l: &Live) {
    // SAFETY: a live block of `size` bytes we filled.
    let s = unsafe { std::slice::from_raw_parts(l.ptr, l.size) };
    assert!(s.iter().all(|&b| b == l.fill), "block contents changed");
}

fn fill(l: &Live) {
    // SAFETY: a live block of at least `size` bytes.
    unsafe { std::ptr::write_bytes(l.ptr, l.fill, l.size) };
}

/// A request size: mostly in the tiers' ranges, sometimes at their
/// boundaries, sometimes one no allocator can serve (near `usize::MAX`, a
/// negative length cast to `size_t`), which must come back null.
fn size_from(b: &[u8]) -> usize {
    let raw = u32::from_le_bytes([b[0], b[1], b[2], 0]) as usize;
    match b[3] % 16 {
        0..=7 => raw % 1100,
        8..=10 => raw % 40_000,
        11 => raw % 600_000,
        // A tier boundary, +-2.
        12 | 13 => {
            const EDGES: [usize; 10] = [0, 8, 16, 1024, 2048, 32768, 262_144, 2 << 20, 4 << 20, 3 << 20];
            (EDGES[raw % EDGES.len()] + (raw >> 8) % 5).saturating_sub(2)
        }
        // Past what any mapping can hold.
        _ => usize::MAX - raw % (1 << 20),
    }
}

/// Sizes nobody can have: every call must return null.
fn impossible(size: usize) -> bool {
    size > isize::MAX as usize
}

fuzz_target!(|data: &[u8]| {
    let mut slots: Vec<Option<Live>> = (0..SLOTS).map(|_| None).collect();
    for (i, op) in data.chunks_exact(6).enumerate() {
        let slot = op[1] as usize % SLOTS;
        let size = size_from(&op[2..6]);
        let fill_byte = i as u8 | 1;
        // SAFETY: every pointer passed back to hakmem came from it and is freed once.
        unsafe {
            match op[0] % 5 {
                0 | 1 => {
                    if let Some(old) = slots[slot].take() {
                        check(&old);
                        hakmem::api::free(old.ptr);
                    }
                    let ptr = if op[0] % 5 == 0 { hakmem::api::malloc(size) } else { hakmem::api::calloc(1, size) };
                    if impossible(size) {
                        assert!(ptr.is_null(), "a block of {size:#x} bytes");
                        continue;
                    }
                    assert!(!ptr.is_null());
                    assert!(hakmem::api::usable_size(ptr) >= size);
                    if op[0] % 5 == 1 {
                        assert!(std::slice::from_raw_parts(ptr, size).iter().all(|&b| b == 0), "calloc not zeroed");
                    }
                    let l = Live { ptr, size, fill: fill_byte };
                    fill(&l);
                    slots[slot] = Some(l);
                }
                2 => {
                    if let Some(old) = slots[slot].take() {
                        check(&old);
                        hakmem::api::free(old.ptr);
                    }
                }
                3 => {
                    if let Some(old) = slots[slot].take() {
                        check(&old);
                        let new_size = size.max(1);
                        let ptr = hakmem::api::realloc(old.ptr, new_size);
                        if impossible(new_size) {
                            // Refused: the old block stays, intact.
                            assert!(ptr.is_null(), "a block of {new_size:#x} bytes");
                            check(&old);
                            slots[slot] = Some(old);
                            continue;
                        }
                        assert!(!ptr.is_null());
                        let kept = old.size.min(new_size);
                        assert!(std::slice::from_raw_parts(ptr, kept).iter().all(|&b| b == old.fill), "realloc lost contents");
                        let l = Live { ptr, size: new_size, fill: fill_byte };
                        fill(&l);
                        slots[slot] = Some(l);
                    }
                }
                _ => {
                    if let Some(old) = slots[slot].take() {
                        check(&old);
                        hakmem::api::free(old.ptr);
                    }
                    // Every power of two to 2^30 (a chunk and more: header in the chunk before).
                    let align = 1usize << (op[2] % 31);
                    // Big alignments with small sizes: the fuzzer holds 64 blocks.
                    let size = if align > 1 << 20 && !impossible(size) { size % 100_000 } else { size };
                    let ptr = hakmem::api::alloc_aligned(align, size);
                    if impossible(size) {
                        assert!(ptr.is_null(), "a block of {size:#x} bytes aligned to {align}");
                        continue;
                    }
                    assert!(!ptr.is_null());
                    assert_eq!(ptr as usize % align, 0, "misaligned");
                    assert!(hakmem::api::usable_size(ptr) >= size);
                    let l = Live { ptr, size, fill: fill_byte };
                    fill(&l);
                    slots[slot] = Some(l);
                }
            }
        }
    }
    for l in slots.into_iter().flatten() {
        check(&l);
        // SAFETY: live block from hakmem.
        unsafe { hakmem::api::free(l.ptr) };
    }
});
