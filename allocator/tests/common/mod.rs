//! What the LD_PRELOAD tests share.

use std::path::{Path, PathBuf};

/// The library the tests preload: `HAKMEM_LIB`, or the release build
/// (`cargo build --release -p hakmem`, done by `just test`).
#[allow(dead_code)] // Not every test file that shares this module preloads it.
pub fn lib() -> PathBuf {
    if let Some(p) = std::env::var_os("HAKMEM_LIB") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libhakmem.so");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p hakmem` (or run `just test`)",
        p.display()
    );
    p.canonicalize().unwrap()
}

/// The release hakctl (`cargo build --release`, done by `just test`).
#[allow(dead_code)] // Not every test file that shares this module runs hakctl.
pub fn hakctl() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/hakctl");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release` (or run `just test`)",
        p.display()
    );
    p
}
