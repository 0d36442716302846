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

/// A directory of its own for one test's files (`hakmem-NAME-PID` in the
/// temp directory), removed when dropped (a failing assertion too).
#[allow(dead_code)] // Not every test file that shares this module writes files.
pub struct Scratch(PathBuf);

#[allow(dead_code)]
impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hakmem-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}
