//! The per-thread state's shape: one struct of each tier's part.

use crate::ace::AceCache;
use crate::hardening::CacheMode;
use crate::tiny::TinyCache;

/// In this order (`repr(C)`): the tiny lists at the start of the block, so
/// that `malloc`'s fast path reads them with no added offset (see
/// `TinyCache`).
#[repr(C)]
pub struct ThreadCache {
    pub tiny: TinyCache,
    pub ace: AceCache,
    /// What the parts may keep (the exit hook armed, every free checked).
    pub mode: CacheMode,
    /// Its slot in the list hakctl reads (`thread::list_current`), + 1; 0: none.
    pub slot: u32,
    /// Its exit hook ran: it registers and caches no more (a later
    /// destructor's frees go straight back), so it takes no slot again.
    pub exited: bool,
}

impl ThreadCache {
    /// An empty cache: all zero bytes (see `tls`, which relies on it).
    pub const NEW: ThreadCache = ThreadCache {
        tiny: TinyCache::NEW,
        ace: AceCache::NEW,
        mode: CacheMode::NEW,
        slot: 0,
        exited: false,
    };

    /// Whether every field is zero (what `tls` checks of `NEW`).
    pub const fn is_zero(&self) -> bool {
        self.tiny.is_zero()
            && self.ace.is_zero()
            && self.mode.is_zero()
            && self.slot == 0
            && !self.exited
    }
}
