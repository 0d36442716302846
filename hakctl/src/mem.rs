//! `hakctl mem PID`: where a process's memory is, read from outside while it
//! runs (`hakmem_common::levels`, docs/levels.md).
//!
//! For each copy of hakmem mapped in the process (its `.note.hakmem`), the
//! layout it points at says where the chunk registry, the thread list and
//! the gauges are. hakctl reads the registry's used pages, then each
//! segment's header (SuperSlab slab counts, ACE segment counts, large and
//! parcel headers), the thread caches' counts and the legacy gauge, through
//! `/proc/PID/mem`, and the residency of each segment through
//! `/proc/PID/pagemap`. Nothing in the process stops or changes: figures
//! read while it allocates are each a moment's value, not one instant's; at
//! a quiescent point they are exact.

use crate::report::mib;
use anyhow::{bail, Context, Result};
use hakmem_common::levels::{self as lv, LevelsLayout};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

type Layout = LevelsLayout<u64>;

/// Reads the target's memory.
struct Mem {
    mem: File,
    pagemap: Option<File>,
}

impl Mem {
    fn open(pid: i32) -> Result<Mem> {
        let mem = File::open(format!("/proc/{pid}/mem")).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                crate::target::denied("/proc/PID/mem", pid)
            } else {
                anyhow::anyhow!("cannot read /proc/{pid}/mem: {e}")
            }
        })?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap")).ok();
        Ok(Mem { mem, pagemap })
    }

    fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_exact_at(&mut buf, addr)
            .with_context(|| format!("reading {len} bytes at {addr:#x}"))?;
        Ok(buf)
    }

    /// Pages of `addr..addr + len` resident (pagemap's present bit); None
    /// if pagemap cannot be read.
    fn resident_pages(&self, addr: u64, len: u64) -> Option<u64> {
        // In steps of 2 MiB of the target (a 4 KiB read each), however big
        // the mapping is.
        const STEP: u64 = 512;
        let f = self.pagemap.as_ref()?;
        let (first, pages) = (addr / 4096, len.div_ceil(4096));
        let mut buf = [0u8; STEP as usize * 8];
        let mut resident = 0;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(STEP) as usize;
            f.read_exact_at(&mut buf[..n * 8], (first + done) * 8)
                .ok()?;
            resident += buf[..n * 8]
                .chunks_exact(8)
                .filter(|e| e[7] >> 7 == 1)
                .count() as u64;
            done += n as u64;
        }
        Some(resident)
    }
}

fn u32_at(b: &[u8], at: u32) -> u32 {
    u32::from_ne_bytes(b[at as usize..at as usize + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: u32) -> u64 {
    u64::from_ne_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

/// A copy of hakmem in the process and where its layout is.
#[derive(Clone)]
struct Copy {
    path: String,
    /// Where its object's first mapping starts: a copy still mapped there is
    /// the same (an exec or a reload maps it elsewhere, or not at all).
    start: u64,
    layout: Layout,
}

/// The `.note.hakmem` notes of an ELF file: (version, layout's link-time address).
fn levels_notes(data: &[u8]) -> Vec<(u64, u64)> {
    use object::{Object, ObjectSection};
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let Some(section) = file.section_by_name(".note.hakmem") else {
        return Vec::new();
    };
    let Ok(d) = section.data() else {
        return Vec::new();
    };
    parse_levels_notes(d)
}

/// The levels notes in a `.note.hakmem` section's bytes; others, and a
/// truncated one, are skipped.
fn parse_levels_notes(d: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    // A truncated note ends the walk; the notes before it stand.
    let _ = crate::stapsdt::each_note(d, |_, kind, owner, desc| {
        if kind == lv::NOTE_TYPE && owner == b"hakmem\0" && desc.len() == 16 {
            out.push((u64_at(desc, 0), u64_at(desc, 8)));
        }
        Ok(())
    });
    out
}

/// A clear refusal of a library whose levels this hakctl cannot read.
fn check_version(path: &str, version: u64) -> Result<()> {
    if version != lv::VERSION as u64 {
        bail!(
            "{path}: its memory levels are version {version}, this hakctl reads version {} (use the hakctl built with that library)",
            lv::VERSION
        );
    }
    Ok(())
}

/// A copy's layout, read and checked: every count and offset within the
/// bounds hakctl reads with (`hakmem_common::levels::MAX_*`).
fn read_layout(mem: &Mem, path: &str, version: u64, addr: u64) -> Result<Layout> {
    check_version(path, version)?;
    let size = std::mem::size_of::<Layout>();
    let bytes = mem.read(addr, size)?;
    // SAFETY: `Layout` is repr(C) of integers and arrays of them: any
    // bytes are a value; read_unaligned copies them out.
    let l: Layout = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    if l.magic != lv::MAGIC || l.size as usize != size {
        bail!(
            "the memory layout at {addr:#x} is not one this hakctl knows (magic {:?}, size {} not {size})",
            l.magic,
            l.size
        );
    }
    if !in_bounds(&l) {
        bail!("the memory layout at {addr:#x} holds counts or offsets out of bounds: not read");
    }
    Ok(l)
}

/// Whether every count and offset of `l` is within what hakctl reads with.
fn in_bounds(l: &Layout) -> bool {
    let within =
        |at: u32, width: u32, header: u32| at.checked_add(width).is_some_and(|e| e <= header);
    let ss_slabs_end = l
        .ss_slab_count
        .checked_mul(l.ss_slab_size)
        .and_then(|n| n.checked_add(l.ss_slabs));
    let slab_fields = [
        (l.slab_state, 1),
        (l.slab_bin, 1),
        (l.slab_capacity, 4),
        (l.slab_used, 4),
        (l.slab_carved, 4),
        (l.slab_remote, 8),
        (l.slab_owner, 8),
    ];
    // The end of the last of `n` u32 counts `stride` apart from `at`.
    let tc_end = |at: u32, n: u32, stride: u32| {
        n.saturating_sub(1)
            .checked_mul(stride)
            .and_then(|x| x.checked_add(at))
            .and_then(|x| x.checked_add(4))
    };
    l.bins <= lv::MAX_BINS
        && l.ace_classes <= lv::MAX_ACE_CLASSES
        && l.threads_len <= lv::MAX_THREAD_SLOTS
        && l.touched_words <= 1 << 16
        && (12..=30).contains(&l.chunk_shift)
        && l.page == 4096
        && l.parcels <= 8
        && l.remote_len_shift < 64
        && l.ss_header <= lv::MAX_HEADER
        && l.tc_size <= lv::MAX_HEADER
        && ss_slabs_end.is_some_and(|e| e <= l.ss_header)
        && slab_fields
            .iter()
            .all(|&(at, w)| within(at, w, l.ss_slab_size))
        && [(l.ace_used, 4), (l.ace_capacity, 4), (l.ace_carved, 4)]
            .iter()
            .all(|&(at, w)| within(at, w, 64))
        && [
            (l.large_map_size, 8),
            (l.large_extent, 8),
            (l.large_live, 1),
            (l.large_usable, 8),
        ]
        .iter()
        .all(|&(at, w)| within(at, w, 64))
        && within(l.parcel_live, 1, 128)
        && within(l.parcel_usable, 4 * l.parcels, 128)
        && within(l.seg_kind, 4, 64)
        && within(l.seg_class, 4, 64)
        && within(l.tc_slot, 4, l.tc_size)
        && tc_end(l.tc_tiny_count, l.bins, l.tc_tiny_stride).is_some_and(|e| e <= l.tc_size)
        && tc_end(l.tc_ace_count, l.ace_classes, l.tc_ace_stride).is_some_and(|e| e <= l.tc_size)
}

/// Every copy of hakmem in `pid` whose levels hakctl can read; the others
/// are named in the second list with why (a copy of another version, an
/// object mapped but not loaded).
fn copies(pid: i32, mem: &Mem) -> Result<(Vec<Copy>, Vec<String>)> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for elf in crate::target::mapped_elfs(pid)?.0 {
        for (version, link_addr) in levels_notes(&elf.data) {
            let addr = elf.load_bias.wrapping_add(link_addr);
            match read_layout(mem, &elf.path, version, addr) {
                Ok(layout) => out.push(Copy {
                    path: elf.path.clone(),
                    start: elf.start,
                    layout,
                }),
                Err(e) => skipped.push(format!("{}: {e:#}", elf.path)),
            }
        }
    }
    if out.is_empty() {
        if !crate::target::alive(pid) {
            bail!("process {pid} exited");
        }
        if !skipped.is_empty() {
            bail!(
                "no readable hakmem memory levels in process {pid}: {}",
                skipped.join("; ")
            );
        }
        bail!(
            "no hakmem memory levels in process {pid} ({}): no copy of hakmem with a .note.hakmem is mapped in it",
            crate::target::process_name(pid)
        );
    }
    Ok((out, skipped))
}

#[derive(Default, Clone, Copy)]
struct BinLevel {
    /// Blocks out of slabs and legacy lists (thread caches and remote lists included).
    out: u64,
    remote: u64,
    cached: u64,
    slabs_in_use: u64,
    slabs_abandoned: u64,
    slabs_empty: u64,
    slabs_purged: u64,
    /// Blocks carved and free in slabs (on the owners' free lists).
    free_in_slabs: u64,
}

#[derive(Default, Clone, Copy)]
struct AceLevel {
    out: u64,
    cached: u64,
    segments: u64,
    free_segments: u64,
}

/// Bytes resident by where they are.
#[derive(Default)]
struct Resident {
    superslabs: u64,
    legacy: u64,
    ace: u64,
    large: u64,
    parcels: u64,
    cache: u64,
    registry: u64,
}

impl Resident {
    fn total(&self) -> u64 {
        self.superslabs
            + self.legacy
            + self.ace
            + self.large
            + self.parcels
            + self.cache
            + self.registry
    }
}

/// Bytes by where they are, summed over bins and classes.
struct Totals {
    tiny: u64,
    ace: u64,
    /// Tiny, ACE, large and parcels.
    in_use: u64,
    tiny_cached: u64,
    ace_cached: u64,
    cached: u64,
    remote: u64,
}

/// One copy's levels.
struct Levels {
    path: String,
    bins: Vec<(u32, BinLevel)>,
    ace: Vec<(u32, AceLevel)>,
    superslabs: u64,
    legacy_segments: u64,
    large_blocks: u64,
    large_usable: u64,
    large_mapped: u64,
    parcel_blocks: u64,
    parcel_usable: u64,
    cached_mappings: u64,
    cached_mapped: u64,
    cached_resident: u64,
    mapped: u64,
    threads: u64,
    /// Bytes of segment headers (SuperSlab, ACE, legacy, large, parcel)
    /// and of the registry's used pages: hakmem's own books.
    metadata: u64,
    resident: Resident,
    /// Pages that could not be read (a segment that went away meanwhile).
    unreadable: u64,
}

impl Levels {
    fn tiny_in_use(&self, bin: usize) -> u64 {
        let b = &self.bins[bin].1;
        b.out.saturating_sub(b.remote + b.cached)
    }

    fn ace_in_use(&self, class: usize) -> u64 {
        let a = &self.ace[class].1;
        a.out.saturating_sub(a.cached)
    }

    /// The byte sums every view shows.
    fn totals(&self) -> Totals {
        let tiny = self.tiny_bytes(|b| self.tiny_in_use(b));
        let ace = self.ace_bytes(|c| self.ace_in_use(c));
        let tiny_cached = self.tiny_bytes(|b| self.bins[b].1.cached);
        let ace_cached = self.ace_bytes(|c| self.ace[c].1.cached);
        Totals {
            tiny,
            ace,
            in_use: tiny + ace + self.large_usable + self.parcel_usable,
            tiny_cached,
            ace_cached,
            cached: tiny_cached + ace_cached,
            remote: self.tiny_bytes(|b| self.bins[b].1.remote),
        }
    }

    fn tiny_bytes(&self, f: impl Fn(usize) -> u64) -> u64 {
        (0..self.bins.len())
            .map(|b| f(b) * self.bins[b].0 as u64)
            .sum()
    }

    fn ace_bytes(&self, f: impl Fn(usize) -> u64) -> u64 {
        (0..self.ace.len())
            .map(|c| f(c) * self.ace[c].0 as u64)
            .sum()
    }
}

fn read_levels(mem: &Mem, c: &Copy) -> Result<Levels> {
    let l = &c.layout;
    let bins = l.bins as usize;
    let classes = l.ace_classes as usize;
    let mut lv_bins = vec![BinLevel::default(); bins];
    let mut lv_ace = vec![AceLevel::default(); classes];
    let mut out = Levels {
        path: c.path.clone(),
        bins: Vec::new(),
        ace: Vec::new(),
        superslabs: 0,
        legacy_segments: 0,
        large_blocks: 0,
        large_usable: 0,
        large_mapped: 0,
        parcel_blocks: 0,
        parcel_usable: 0,
        cached_mappings: 0,
        cached_mapped: 0,
        cached_resident: u64_at(&mem.read(l.cached_resident, 8)?, 0),
        mapped: u64_at(&mem.read(l.mapped, 8)?, 0),
        threads: 0,
        metadata: 0,
        resident: Resident::default(),
        unreadable: 0,
    };
    let chunk = 1u64 << l.chunk_shift;
    let resident = |addr: u64, len: u64| mem.resident_pages(addr, len).unwrap_or(0) * l.page as u64;
    // The registry's used pages, then each segment it names.
    let touched = mem.read(l.touched, l.touched_words as usize * 8)?;
    for (w, word) in touched.chunks_exact(8).enumerate() {
        let bits = u64::from_ne_bytes(word.try_into().unwrap());
        for bit in (0..64).filter(|b| bits >> b & 1 == 1) {
            let page = (w * 64 + bit) as u64;
            let table_page = l.registry + page * 4096;
            let entries = mem.read(table_page, 4096)?;
            out.resident.registry += resident(table_page, 4096);
            out.metadata += 4096;
            for (i, &kind) in entries.iter().enumerate().filter(|e| *e.1 != 0) {
                let base = (page * 4096 + i as u64) << l.chunk_shift;
                if read_segment(
                    mem,
                    l,
                    kind,
                    base,
                    chunk,
                    &mut out,
                    &mut lv_bins,
                    &mut lv_ace,
                    &resident,
                )
                .is_err()
                {
                    out.unreadable += 1;
                }
            }
        }
    }
    // Blocks out of the legacy lists.
    let legacy = mem.read(l.legacy_out, bins * 8)?;
    for (b, level) in lv_bins.iter_mut().enumerate() {
        level.out += u64_at(&legacy, b as u32 * 8);
    }
    // What the listed thread caches hold.
    let slots = mem.read(l.threads, l.threads_len as usize * 8)?;
    for (i, s) in slots.chunks_exact(8).enumerate() {
        let tc = u64::from_ne_bytes(s.try_into().unwrap());
        if tc == 0 {
            continue;
        }
        let Ok(cache) = mem.read(tc, l.tc_size as usize) else {
            continue;
        };
        // A thread that left its slot between the two reads: not counted.
        if u32_at(&cache, l.tc_slot) != i as u32 + 1 {
            continue;
        }
        out.threads += 1;
        for (b, level) in lv_bins.iter_mut().enumerate() {
            level.cached += u32_at(&cache, l.tc_tiny_count + b as u32 * l.tc_tiny_stride) as u64;
        }
        for (c, level) in lv_ace.iter_mut().enumerate() {
            level.cached += u32_at(&cache, l.tc_ace_count + c as u32 * l.tc_ace_stride) as u64;
        }
    }
    out.bins = lv_bins
        .into_iter()
        .enumerate()
        .map(|(b, v)| (l.bin_size[b], v))
        .collect();
    out.ace = lv_ace
        .into_iter()
        .enumerate()
        .map(|(c, v)| (l.ace_block_size[c], v))
        .collect();
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn read_segment(
    mem: &Mem,
    l: &Layout,
    kind: u8,
    base: u64,
    chunk: u64,
    out: &mut Levels,
    bins: &mut [BinLevel],
    ace: &mut [AceLevel],
    resident: &dyn Fn(u64, u64) -> u64,
) -> Result<()> {
    if kind == lv::KIND_LARGE_BODY {
        // The rest of a chunk-aligned large block: its header is a chunk before.
        return Ok(());
    }
    // The header must say what the registry byte says: a chunk being handed
    // from one tier to another (or unmapped and reused) is skipped, never
    // read as what it no longer is.
    let seg = mem.read(base, 64)?;
    let is_ace = kind >= lv::KIND_ACE;
    let want_kind = if is_ace { l.seg_kind_ace } else { kind as u32 };
    let class_ok = !is_ace || u32_at(&seg, l.seg_class) == (kind - lv::KIND_ACE) as u32;
    if u64_at(&seg, 0) != l.seg_magic || u32_at(&seg, l.seg_kind) != want_kind || !class_ok {
        bail!("segment at {base:#x} changed while read");
    }
    match kind {
        lv::KIND_SUPERSLAB => {
            let h = mem.read(base, l.ss_header as usize)?;
            out.superslabs += 1;
            out.metadata += l.ss_header as u64;
            out.resident.superslabs += resident(base, chunk);
            for k in 0..l.ss_slab_count {
                let s = l.ss_slabs + k * l.ss_slab_size;
                let bin = h[(s + l.slab_bin) as usize] as usize;
                match h[(s + l.slab_state) as usize] {
                    lv::SLAB_IN_USE if bin < bins.len() => {
                        let b = &mut bins[bin];
                        let used = u32_at(&h, s + l.slab_used) as u64;
                        b.out += used;
                        b.remote += u64_at(&h, s + l.slab_remote) >> l.remote_len_shift;
                        b.free_in_slabs +=
                            (u32_at(&h, s + l.slab_carved) as u64).saturating_sub(used);
                        if u64_at(&h, s + l.slab_owner) == l.owner_abandoned {
                            b.slabs_abandoned += 1;
                        } else {
                            b.slabs_in_use += 1;
                        }
                    }
                    lv::SLAB_EMPTY if bin < bins.len() => bins[bin].slabs_empty += 1,
                    lv::SLAB_PURGED if bin < bins.len() => bins[bin].slabs_purged += 1,
                    _ => {}
                }
            }
        }
        lv::KIND_LEGACY => {
            out.legacy_segments += 1;
            out.metadata += l.page as u64;
            out.resident.legacy += resident(base, chunk);
        }
        lv::KIND_LARGE => {
            let h = seg;
            let map = u64_at(&h, l.large_map_size);
            let page = l.page as u64;
            if !(chunk..=1 << 47).contains(&map) || !map.is_multiple_of(page) {
                bail!("large mapping at {base:#x}: size {map} out of bounds");
            }
            out.metadata += l.page as u64;
            if h[l.large_live as usize] != 0 {
                out.large_blocks += 1;
                out.large_usable += u64_at(&h, l.large_usable).min(map);
                out.large_mapped += map;
                out.resident.large += resident(base, map);
            } else {
                out.cached_mappings += 1;
                out.cached_mapped += map;
                out.resident.cache += resident(base, map);
            }
        }
        lv::KIND_PARCEL => {
            let h = mem.read(base, 128)?;
            let parcel = chunk / l.parcels.max(1) as u64;
            out.metadata += 128;
            let live = h[l.parcel_live as usize];
            for p in (0..l.parcels).filter(|p| live >> p & 1 == 1) {
                out.parcel_blocks += 1;
                out.parcel_usable += (u32_at(&h, l.parcel_usable + p * 4) as u64).min(parcel);
            }
            out.resident.parcels += resident(base, chunk);
        }
        k if k >= lv::KIND_ACE && ((k - lv::KIND_ACE) as usize) < ace.len() => {
            let h = seg;
            out.metadata += l.ace_header as u64;
            let a = &mut ace[(k - lv::KIND_ACE) as usize];
            let used = u32_at(&h, l.ace_used) as u64;
            a.out += used;
            a.segments += 1;
            if used == 0 {
                a.free_segments += 1;
            }
            out.resident.ace += resident(base, chunk);
        }
        _ => {}
    }
    Ok(())
}

/// The process's resident set (VmRSS), in bytes.
fn rss(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn levels_json(v: &Levels) -> Value {
    let t = v.totals();
    json!({
        "path": v.path,
        "threads": v.threads,
        "mapped_bytes": v.mapped,
        "in_use_bytes": {
            "tiny": t.tiny,
            "ace": t.ace,
            "large": v.large_usable,
            "parcel": v.parcel_usable,
            "total": t.in_use,
        },
        "thread_cache_bytes": {
            "tiny": t.tiny_cached,
            "ace": t.ace_cached,
        },
        "remote_list_bytes": t.remote,
        "metadata_bytes": v.metadata,
        "superslabs": v.superslabs,
        "legacy_segments": v.legacy_segments,
        "large": {"blocks": v.large_blocks, "usable_bytes": v.large_usable, "mapped_bytes": v.large_mapped},
        "parcels": {"blocks": v.parcel_blocks, "usable_bytes": v.parcel_usable},
        "chunk_cache": {"mappings": v.cached_mappings, "mapped_bytes": v.cached_mapped, "resident_bound_bytes": v.cached_resident},
        "resident_bytes": {
            "superslabs": v.resident.superslabs,
            "legacy": v.resident.legacy,
            "ace": v.resident.ace,
            "large": v.resident.large,
            "parcels": v.resident.parcels,
            "chunk_cache": v.resident.cache,
            "registry": v.resident.registry,
            "total": v.resident.total(),
        },
        "bins": v.bins.iter().enumerate().map(|(b, (size, l))| json!({
            "bin": b, "block_size": size, "in_use_blocks": v.tiny_in_use(b),
            "thread_cache_blocks": l.cached, "remote_blocks": l.remote,
            "free_in_slabs_blocks": l.free_in_slabs, "slabs_in_use": l.slabs_in_use,
            "slabs_abandoned": l.slabs_abandoned, "slabs_empty": l.slabs_empty, "slabs_purged": l.slabs_purged,
        })).collect::<Vec<_>>(),
        "ace": v.ace.iter().enumerate().map(|(c, (size, a))| json!({
            "class": c, "block_size": size, "in_use_blocks": v.ace_in_use(c),
            "thread_cache_blocks": a.cached, "segments": a.segments, "free_segments": a.free_segments,
        })).collect::<Vec<_>>(),
        "unreadable_segments": v.unreadable,
    })
}

fn print_levels(v: &Levels) {
    let t = v.totals();
    println!(
        "# {} ({} threads listed, {} mapped from the OS)",
        v.path,
        v.threads,
        mib(v.mapped)
    );
    println!(
        "{:<12} {:>12} {:>14} {:>12}",
        "TIER", "IN USE", "THREAD CACHES", "RESIDENT"
    );
    let r = &v.resident;
    let row = |name: &str, used: u64, cached: Option<u64>, res: u64| {
        let cached = cached.map_or(String::from("-"), mib);
        println!("{name:<12} {:>12} {cached:>14} {:>12}", mib(used), mib(res));
    };
    row("tiny", t.tiny, Some(t.tiny_cached), r.superslabs + r.legacy);
    row("ace", t.ace, Some(t.ace_cached), r.ace);
    row("large", v.large_usable, None, r.large);
    row("parcels", v.parcel_usable, None, r.parcels);
    row("chunk cache", 0, None, r.cache);
    row("registry", 0, None, r.registry);
    row("total", t.in_use, Some(t.cached), r.total());
    println!(
        "remote lists {}  metadata {}  superslabs {}  legacy segments {}\nlarge blocks {}  parcels {}  cached mappings {} ({})",
        mib(t.remote),
        mib(v.metadata),
        v.superslabs,
        v.legacy_segments,
        v.large_blocks,
        v.parcel_blocks,
        v.cached_mappings,
        mib(v.cached_mapped)
    );
    println!();
    println!(
        "{:>6} {:>11} {:>10} {:>9} {:>8} {:>8}  SLABS use/abandoned/empty/purged",
        "BIN", "IN USE", "BLOCKS", "CACHED", "REMOTE", "FREE"
    );
    for (b, (size, l)) in v.bins.iter().enumerate() {
        let used = v.tiny_in_use(b);
        if used + l.cached + l.remote + l.slabs_empty + l.slabs_purged == 0 && l.slabs_in_use == 0 {
            continue;
        }
        println!(
            "{:>6} {:>11} {:>10} {:>9} {:>8} {:>8}  {}/{}/{}/{}",
            size,
            mib(used * *size as u64),
            used,
            l.cached,
            l.remote,
            l.free_in_slabs,
            l.slabs_in_use,
            l.slabs_abandoned,
            l.slabs_empty,
            l.slabs_purged
        );
    }
    let ace_rows: Vec<_> = v
        .ace
        .iter()
        .enumerate()
        .filter(|(_, (_, a))| a.segments > 0)
        .collect();
    if !ace_rows.is_empty() {
        println!();
        println!(
            "{:>8} {:>11} {:>10} {:>9}  SEGMENTS (free)",
            "ACE", "IN USE", "BLOCKS", "CACHED"
        );
        for (c, (size, a)) in ace_rows {
            let used = v.ace_in_use(c);
            println!(
                "{:>8} {:>11} {:>10} {:>9}  {} ({})",
                size,
                mib(used * *size as u64),
                used,
                a.cached,
                a.segments,
                a.free_segments
            );
        }
    }
}

/// A reading of every copy of hakmem in a process.
pub struct Reading {
    pid: i32,
    rss: u64,
    levels: Vec<Levels>,
    /// Copies not read, with why.
    skipped: Vec<String>,
    /// Whether `/proc/PID/pagemap` could be read (if not, resident figures are 0).
    pagemap: bool,
}

impl Reading {
    fn accounted(&self) -> u64 {
        self.levels.iter().map(|v| v.resident.total()).sum()
    }

    fn in_use(&self) -> u64 {
        self.levels.iter().map(|v| v.totals().in_use).sum()
    }

    fn cached(&self) -> u64 {
        self.levels.iter().map(|v| v.totals().cached).sum()
    }

    /// The document `hakctl mem --json` prints, and `watch`'s `memory`.
    pub fn json(&self) -> Value {
        let accounted = self.accounted();
        json!({
            "pid": self.pid,
            "levels_version": lv::VERSION,
            "rss_bytes": self.rss,
            "accounted_resident_bytes": accounted,
            "unaccounted_bytes": self.rss.saturating_sub(accounted),
            "in_use_bytes": self.in_use(),
            "thread_cache_bytes": self.cached(),
            "pagemap_readable": self.pagemap,
            "skipped_copies": self.skipped,
            "copies": self.levels.iter().map(levels_json).collect::<Vec<_>>(),
        })
    }

    /// `watch`'s MEMORY lines.
    pub fn summary(&self) -> String {
        let accounted = self.accounted();
        let mut o = format!(
            "MEMORY  RSS {}  hakmem resident {}  unaccounted {}\n",
            mib(self.rss),
            mib(accounted),
            mib(self.rss.saturating_sub(accounted))
        );
        for v in &self.levels {
            let (r, t) = (&v.resident, v.totals());
            o += &format!(
                "  in use    tiny {}  ace {}  large {}  parcels {}\n",
                mib(t.tiny),
                mib(t.ace),
                mib(v.large_usable),
                mib(v.parcel_usable),
            );
            o += &format!(
                "  held      thread caches {}  remote lists {}  metadata {}\n",
                mib(t.cached),
                mib(t.remote),
                mib(v.metadata),
            );
            o += &format!(
                "  resident  slabs {}  ace {}  large {}  cache {}  other {}\n",
                mib(r.superslabs),
                mib(r.ace),
                mib(r.large),
                mib(r.cache),
                mib(r.legacy + r.parcels + r.registry),
            );
        }
        o
    }

    /// Bytes in use, in thread caches, resident (RSS).
    pub fn bytes(&self) -> (u64, u64, u64) {
        (self.in_use(), self.cached(), self.rss)
    }

    /// One line's worth for `watch`'s piped output.
    pub fn short(&self) -> String {
        format!(
            "in_use={} cached={} rss={}",
            mib(self.in_use()).replace(' ', ""),
            mib(self.cached()).replace(' ', ""),
            mib(self.rss).replace(' ', "")
        )
    }
}

/// The copies found in each process, kept between the refreshes of `watch`:
/// its ELF files are read again only when a copy is no longer mapped where
/// it was (`hakctl run` follows a process across its execs).
static FOUND: std::sync::Mutex<BTreeMap<i32, Found>> = std::sync::Mutex::new(BTreeMap::new());

/// A process's readable copies, and the ones skipped with why.
type Found = (Vec<Copy>, Vec<String>);

/// Forgets what was found in `pid` (it exited; its id may be reused).
pub fn forget(pid: i32) {
    FOUND.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
}

/// Reads the levels of every copy of hakmem in `pid`.
pub fn read(pid: i32) -> Result<Reading> {
    crate::target::check_running(pid)?;
    let m = Mem::open(pid)?;
    let mut found = FOUND.lock().unwrap_or_else(|e| e.into_inner());
    let still_mapped = |c: &[Copy]| {
        let files = crate::target::mapped_files(pid).unwrap_or_default();
        c.iter()
            .all(|c| files.get(&c.path).map(|f| f.0) == Some(c.start))
    };
    let (copies, skipped) = match found.get(&pid) {
        Some((c, s)) if still_mapped(c) => (c.clone(), s.clone()),
        _ => {
            let (c, s) = copies(pid, &m)?;
            found.insert(pid, (c.clone(), s.clone()));
            (c, s)
        }
    };
    drop(found);
    let levels: Result<Vec<Levels>> = copies
        .iter()
        .map(|c| read_levels(&m, c).with_context(|| c.path.clone()))
        .collect();
    let levels = match levels {
        Ok(l) => l,
        Err(_) if !crate::target::alive(pid) => bail!("process {pid} exited"),
        Err(e) => return Err(e),
    };
    Ok(Reading {
        pid,
        rss: rss(pid).context("cannot read the process's RSS")?,
        levels,
        skipped,
        pagemap: m.pagemap.is_some(),
    })
}

/// `hakctl mem PID [--json]`.
pub fn mem(pid: i32, json_out: bool) -> Result<std::process::ExitCode> {
    let reading = read(pid)?;
    if json_out {
        let mut doc = reading.json();
        doc["schema"] = crate::report::SCHEMA.into();
        doc["kind"] = "mem".into();
        doc["time_unix_s"] = crate::report::unix_now().into();
        println!("{doc}");
    } else {
        let accounted = reading.accounted();
        println!(
            "process {pid} ({}): RSS {}, of which hakmem's {} (accounted), the rest {} (unaccounted: program, libraries, stacks)",
            crate::target::process_name(pid),
            mib(reading.rss),
            mib(accounted),
            mib(reading.rss.saturating_sub(accounted))
        );
        for v in &reading.levels {
            println!();
            print_levels(v);
        }
        for s in &reading.skipped {
            println!("\nnot read: {s}");
        }
        if !reading.pagemap {
            println!("\n/proc/{pid}/pagemap could not be read: resident figures are 0");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(kind: u32, version: u64, addr: u64) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend(7u32.to_ne_bytes());
        n.extend(16u32.to_ne_bytes());
        n.extend(kind.to_ne_bytes());
        n.extend(b"hakmem\0\0");
        n.extend(version.to_ne_bytes());
        n.extend(addr.to_ne_bytes());
        n
    }

    #[test]
    fn the_library_in_this_build_carries_a_note_hakctl_reads() {
        let lib =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libhakmem.so");
        let Ok(data) = std::fs::read(&lib) else {
            return; // Built by `just test` before the tests run; nothing to check without it.
        };
        let notes = levels_notes(&data);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].0, lv::VERSION as u64);
        assert!(notes[0].1 != 0);
    }

    /// The layout as the library file holds it (its pointers unrelocated):
    /// its counts and offsets are what the process will hold.
    fn layout_in_file(data: &[u8], link_addr: u64) -> Layout {
        use object::{Object, ObjectSegment};
        let file = object::File::parse(data).unwrap();
        let seg = file
            .segments()
            .find(|s| (s.address()..s.address() + s.size()).contains(&link_addr))
            .unwrap();
        let at = (seg.file_range().0 + link_addr - seg.address()) as usize;
        // SAFETY: as in `read_layout`.
        unsafe { std::ptr::read_unaligned(data[at..].as_ptr().cast()) }
    }

    #[test]
    fn the_shipped_layout_is_in_bounds_and_a_corrupt_one_is_not() {
        let lib =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libhakmem.so");
        let Ok(data) = std::fs::read(&lib) else {
            return; // Built by `just test` before the tests run.
        };
        let (_, addr) = levels_notes(&data)[0];
        let good = layout_in_file(&data, addr);
        assert_eq!(good.magic, lv::MAGIC);
        assert!(in_bounds(&good));
        let corrupt: [fn(&mut Layout); 6] = [
            |l| l.bins = 1000,
            |l| l.threads_len = u64::MAX,
            |l| l.ss_header = u32::MAX,
            |l| l.slab_used = 62,
            |l| l.tc_ace_stride = 1 << 20,
            |l| l.chunk_shift = 64,
        ];
        for (i, c) in corrupt.iter().enumerate() {
            let mut l = good;
            c(&mut l);
            assert!(!in_bounds(&l), "corruption {i} passed");
        }
    }

    #[test]
    fn a_library_of_another_levels_version_is_refused_by_name() {
        let err = check_version("/x/libhakmem.so", lv::VERSION as u64 + 1).unwrap_err();
        let msg = format!("{err}");
        assert!(
            msg.contains("/x/libhakmem.so") && msg.contains("version"),
            "{msg}"
        );
        assert!(check_version("/x", lv::VERSION as u64).is_ok());
    }

    #[test]
    fn notes_of_another_type_and_truncated_ones_are_skipped() {
        let mut d = note(3, 1, 0x1000);
        d.extend(note(lv::NOTE_TYPE, 1, 0x2000));
        assert_eq!(parse_levels_notes(&d), [(1, 0x2000)]);
        for len in 0..d.len() {
            assert!(parse_levels_notes(&d[..len]).len() <= 1);
        }
    }
}
