//! The tally: a flat array of event counters that both the allocator
//! (`HAKMEM_STATS=1`) and the eBPF programs fill from the same probe arguments,
//! through the same [`record`] function. hakctl's counts and the allocator's own
//! tally are therefore the same numbers by construction of the layout, and a test
//! that compares them checks only what can really differ: whether every event
//! reached the tracer with the right arguments.

use crate::codes::*;
use crate::probe::{ProbeId, PROBE_COUNT};

pub const SLOT_PROBES: usize = 0;
pub const SLOT_ACQUIRE: usize = SLOT_PROBES + PROBE_COUNT;
pub const SLOT_RECYCLE: usize = SLOT_ACQUIRE + TINY_CLASSES * STAGES;
pub const SLOT_SHARED_FAIL: usize = SLOT_RECYCLE + TINY_CLASSES * OUTCOMES;
pub const SLOT_ACE_FAIL: usize = SLOT_SHARED_FAIL + TINY_CLASSES * REASONS;
pub const SLOT_TLS_DRAIN_BLOCKS: usize = SLOT_ACE_FAIL + ACE_KINDS;
pub const SLOT_REMOTE_DRAIN_BLOCKS: usize = SLOT_TLS_DRAIN_BLOCKS + TINY_CLASSES;
pub const SLOT_LEGACY_BLOCKS: usize = SLOT_REMOTE_DRAIN_BLOCKS + TINY_CLASSES;
pub const SLOT_SS_MAPPED_BYTES: usize = SLOT_LEGACY_BLOCKS + TINY_CLASSES;
pub const SLOT_SS_UNMAPPED_BYTES: usize = SLOT_SS_MAPPED_BYTES + 1;
pub const SLOT_TAKE_BYTES: usize = SLOT_SS_UNMAPPED_BYTES + 1;
pub const SLOT_RETURNED_BYTES: usize = SLOT_TAKE_BYTES + SOURCES;
pub const SLOT_PUT_BYTES: usize = SLOT_RETURNED_BYTES + RETURN_WHYS;
pub const SLOT_USER_TAKES: usize = SLOT_PUT_BYTES + 1;
/// Number of counters in a tally.
pub const TALLY_SLOTS: usize = SLOT_USER_TAKES + CACHE_USERS * SOURCES;

/// A tally as plain counters (userspace and eBPF map value layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    pub slots: [u64; TALLY_SLOTS],
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            slots: [0; TALLY_SLOTS],
        }
    }
}

/// Calls `add(slot, n)` for each counter that one probe event increments.
/// Out-of-range codes are counted in the per-probe total only, so a corrupt or
/// future argument can never index outside the tally.
#[inline(always)]
pub fn record(probe: u32, a0: u64, a1: u64, a2: u64, mut add: impl FnMut(usize, u64)) {
    if probe as usize >= PROBE_COUNT {
        return;
    }
    add(SLOT_PROBES + probe as usize, 1);
    let class = a0 as usize;
    match probe {
        p if p == ProbeId::SlabRecycle as u32 => {
            let outcome = a1 as usize;
            if class < TINY_CLASSES && outcome < OUTCOMES {
                add(SLOT_RECYCLE + class * OUTCOMES + outcome, 1);
            }
        }
        p if p == ProbeId::SsAcquire as u32 => {
            let stage = a1 as usize;
            if class < TINY_CLASSES && (1..=STAGES).contains(&stage) {
                add(SLOT_ACQUIRE + class * STAGES + stage - 1, 1);
            }
        }
        p if p == ProbeId::SharedFail as u32 => {
            let reason = a1 as usize;
            if class < TINY_CLASSES && reason < REASONS {
                add(SLOT_SHARED_FAIL + class * REASONS + reason, 1);
            }
        }
        p if p == ProbeId::AceFail as u32 => {
            let kind = a0 as usize;
            if kind < ACE_KINDS {
                add(SLOT_ACE_FAIL + kind, 1);
            }
        }
        p if p == ProbeId::TlsDrain as u32 && class < TINY_CLASSES => {
            add(SLOT_TLS_DRAIN_BLOCKS + class, a1)
        }
        p if p == ProbeId::RemoteDrain as u32 && class < TINY_CLASSES => {
            add(SLOT_REMOTE_DRAIN_BLOCKS + class, a1)
        }
        p if p == ProbeId::LegacyRefill as u32 && class < TINY_CLASSES => {
            add(SLOT_LEGACY_BLOCKS + class, a1)
        }
        p if p == ProbeId::SsMap as u32 => add(SLOT_SS_MAPPED_BYTES, a0),
        p if p == ProbeId::SsUnmap as u32 => add(SLOT_SS_UNMAPPED_BYTES, a0),
        p if p == ProbeId::CacheTake as u32
            && (a1 as usize) < SOURCES
            && (a2 as usize) < CACHE_USERS =>
        {
            add(SLOT_USER_TAKES + a2 as usize * SOURCES + a1 as usize, 1);
            add(SLOT_TAKE_BYTES + a1 as usize, a0);
        }
        p if p == ProbeId::OsReturn as u32 && (a1 as usize) < RETURN_WHYS => {
            add(SLOT_RETURNED_BYTES + a1 as usize, a0)
        }
        p if p == ProbeId::CachePut as u32 => add(SLOT_PUT_BYTES, a0),
        _ => {}
    }
}

impl Tally {
    /// Counts one event whose third argument is 0 or unused.
    pub fn record(&mut self, probe: u32, a0: u64, a1: u64) {
        self.record3(probe, a0, a1, 0);
    }

    pub fn record3(&mut self, probe: u32, a0: u64, a1: u64, a2: u64) {
        record(probe, a0, a1, a2, |slot, n| self.slots[slot] += n);
    }

    pub fn probe(&self, p: ProbeId) -> u64 {
        self.slots[SLOT_PROBES + p as usize]
    }
    pub fn acquire(&self, class: usize, stage: usize) -> u64 {
        self.slots[SLOT_ACQUIRE + class * STAGES + stage - 1]
    }
    pub fn recycle(&self, class: usize, outcome: RecycleOutcome) -> u64 {
        self.slots[SLOT_RECYCLE + class * OUTCOMES + outcome as usize]
    }
    pub fn shared_fail(&self, class: usize, reason: usize) -> u64 {
        self.slots[SLOT_SHARED_FAIL + class * REASONS + reason]
    }
    pub fn ace_fail(&self, kind: AceFailKind) -> u64 {
        self.slots[SLOT_ACE_FAIL + kind as usize]
    }
    pub fn tls_drain_blocks(&self, class: usize) -> u64 {
        self.slots[SLOT_TLS_DRAIN_BLOCKS + class]
    }
    pub fn remote_drain_blocks(&self, class: usize) -> u64 {
        self.slots[SLOT_REMOTE_DRAIN_BLOCKS + class]
    }
    pub fn legacy_blocks(&self, class: usize) -> u64 {
        self.slots[SLOT_LEGACY_BLOCKS + class]
    }
    pub fn ss_bytes(&self) -> (u64, u64) {
        (
            self.slots[SLOT_SS_MAPPED_BYTES],
            self.slots[SLOT_SS_UNMAPPED_BYTES],
        )
    }
    /// Mappings large blocks, ACE segments and SuperSlabs took from `source`, and their bytes.
    pub fn takes(&self, source: TakeSource) -> (u64, u64) {
        self.takes_at(source as usize)
    }
    /// As `takes`, for source code `s` (below `SOURCES`): the count is the
    /// sum over the users (saturating: counters never get near, but a sum
    /// must not panic).
    pub fn takes_at(&self, s: usize) -> (u64, u64) {
        let n = (0..CACHE_USERS)
            .map(|u| self.user_takes_at(u, s))
            .fold(0u64, u64::saturating_add);
        (n, self.slots[SLOT_TAKE_BYTES + s])
    }
    /// Mappings user `user` (a `CacheUser` code, below `CACHE_USERS`) took
    /// from `source`.
    pub fn user_takes(&self, user: usize, source: TakeSource) -> u64 {
        self.user_takes_at(user, source as usize)
    }
    /// As `user_takes`, for source code `s` (below `SOURCES`).
    pub fn user_takes_at(&self, user: usize, s: usize) -> u64 {
        self.slots[SLOT_USER_TAKES + user * SOURCES + s]
    }
    /// Bytes the large cache gave back to the OS for `why`.
    pub fn returned_bytes(&self, why: ReturnWhy) -> u64 {
        self.slots[SLOT_RETURNED_BYTES + why as usize]
    }
    /// Bytes of mappings freed into the large cache (kept or, over its
    /// bounds, returned at once).
    pub fn put_bytes(&self) -> u64 {
        self.slots[SLOT_PUT_BYTES]
    }
    /// Bytes of mappings the large cache holds: put in, less taken out and
    /// returned (for counts read since the process started; a tracer that
    /// attached later sees the change since then).
    pub fn held_bytes(&self) -> i64 {
        // Purged slabs' and ACE segments' pages never were in the cache.
        let returned: u64 = ReturnWhy::ALL
            .iter()
            .filter(|&&why| !matches!(why, ReturnWhy::Slabs | ReturnWhy::AceSegments))
            .map(|&why| self.slots[SLOT_RETURNED_BYTES + why as usize])
            .sum();
        self.put_bytes() as i64 - self.takes(TakeSource::Cached).1 as i64 - returned as i64
    }

    /// `self - earlier`, counter by counter (saturating, for counters read at two times).
    pub fn since(&self, earlier: &Tally) -> Tally {
        let mut out = Tally::default();
        for (i, o) in out.slots.iter_mut().enumerate() {
            *o = self.slots[i].saturating_sub(earlier.slots[i]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::PROBES;

    #[test]
    fn each_probe_counts_itself_and_its_arguments() {
        let mut t = Tally::default();
        t.record(ProbeId::SsAcquire as u32, 7, 1);
        t.record(ProbeId::SsAcquire as u32, 7, 3);
        t.record(
            ProbeId::SlabRecycle as u32,
            2,
            RecycleOutcome::Released as u64,
        );
        t.record(ProbeId::SharedFail as u32, 5, FailReason::Budget as u64);
        t.record(ProbeId::AceFail as u32, AceFailKind::MapFail as u64, 40_000);
        t.record(ProbeId::TlsDrain as u32, 3, 17);
        t.record(ProbeId::RemoteDrain as u32, 4, 9);
        t.record(ProbeId::LegacyRefill as u32, 6, 32);
        t.record(ProbeId::SsMap as u32, 2 << 20, 0);
        t.record3(
            ProbeId::CacheTake as u32,
            4 << 20,
            TakeSource::Cached as u64,
            CacheUser::SuperSlab as u64,
        );
        t.record(ProbeId::CacheTake as u32, 2 << 20, TakeSource::Fresh as u64);
        t.record3(
            ProbeId::CacheTake as u32,
            2 << 20,
            TakeSource::Fresh as u64,
            CacheUser::Ace as u64,
        );
        t.record(ProbeId::OsReturn as u32, 6 << 20, ReturnWhy::Burst as u64);
        t.record(ProbeId::CachePut as u32, 16 << 20, CacheUser::Ace as u64);
        assert_eq!(t.acquire(7, 1), 1);
        assert_eq!(t.acquire(7, 3), 1);
        assert_eq!(t.recycle(2, RecycleOutcome::Released), 1);
        assert_eq!(t.shared_fail(5, FailReason::Budget as usize), 1);
        assert_eq!(t.ace_fail(AceFailKind::MapFail), 1);
        assert_eq!(
            (
                t.tls_drain_blocks(3),
                t.remote_drain_blocks(4),
                t.legacy_blocks(6)
            ),
            (17, 9, 32)
        );
        assert_eq!(t.ss_bytes(), (2 << 20, 0));
        assert_eq!(t.takes(TakeSource::Cached), (1, 4 << 20));
        assert_eq!(t.takes(TakeSource::Fresh), (2, 4 << 20));
        let user_takes = |u: CacheUser, s| t.user_takes(u as usize, s);
        assert_eq!(user_takes(CacheUser::SuperSlab, TakeSource::Cached), 1);
        assert_eq!(user_takes(CacheUser::Ace, TakeSource::Fresh), 1);
        assert_eq!(user_takes(CacheUser::Large, TakeSource::Fresh), 1);
        assert_eq!(user_takes(CacheUser::Large, TakeSource::Cached), 0);
        assert_eq!(t.returned_bytes(ReturnWhy::Burst), 6 << 20);
        assert_eq!(t.returned_bytes(ReturnWhy::Idle), 0);
        assert_eq!(t.put_bytes(), 16 << 20);
        assert_eq!(t.held_bytes(), (16 - 4 - 6) << 20);
        let total: u64 = PROBES.iter().map(|p| t.probe(p.id)).sum();
        assert_eq!(total, 14);
    }

    #[test]
    fn out_of_range_codes_count_only_the_probe() {
        let mut t = Tally::default();
        t.record(ProbeId::SsAcquire as u32, 99, 1);
        t.record(ProbeId::SsAcquire as u32, 1, 0);
        t.record(ProbeId::SlabRecycle as u32, 1, 77);
        t.record(ProbeId::AceFail as u32, 9, 1);
        t.record(ProbeId::CacheTake as u32, 1 << 20, SOURCES as u64);
        t.record3(
            ProbeId::CacheTake as u32,
            1 << 20,
            SOURCES as u64,
            CacheUser::Ace as u64,
        );
        t.record3(ProbeId::CacheTake as u32, 1 << 20, 0, CACHE_USERS as u64);
        t.record(ProbeId::OsReturn as u32, 1 << 20, RETURN_WHYS as u64);
        t.record(1000, 0, 0);
        assert_eq!(t.probe(ProbeId::SsAcquire), 2);
        assert_eq!(t.probe(ProbeId::SlabRecycle), 1);
        let per_class: u64 = t.slots[SLOT_ACQUIRE..].iter().sum();
        assert_eq!(per_class, 0, "nothing outside the per-probe totals");
    }

    #[test]
    fn since_subtracts_counter_by_counter() {
        let mut a = Tally::default();
        a.record(ProbeId::TlsDrain as u32, 1, 5);
        let mut b = a;
        b.record(ProbeId::TlsDrain as u32, 1, 7);
        let d = b.since(&a);
        assert_eq!(d.probe(ProbeId::TlsDrain), 1);
        assert_eq!(d.tls_drain_blocks(1), 7);
    }
}
