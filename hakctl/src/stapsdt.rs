//! Reading SystemTap SDT v3 notes (`.note.stapsdt`) out of an ELF file.
//!
//! The note parser checks every length against the section it reads, so a
//! corrupt or truncated note is an error naming the note, never a panic.

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection, ObjectSegment};

/// One probe location in an ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    pub provider: String,
    pub name: String,
    /// The argument format string (e.g. `8@%rdi 8@%rsi`).
    pub args: String,
    /// Link-time address of the probe instruction and its offset in the file.
    pub pc: u64,
    pub pc_offset: u64,
    /// Link-time address of the semaphore (0: none) and its offset in the file.
    pub semaphore: u64,
    pub semaphore_offset: u64,
    /// Whether `pc` lies in an executable section. A note whose code the
    /// linker dropped keeps its entry with the address resolved against
    /// nothing (a few bytes into the file: inside the ELF header): a uprobe
    /// there would patch a byte of no instruction.
    pub in_code: bool,
}

/// A raw note: addresses as recorded, strings as written.
#[derive(Debug, PartialEq, Eq)]
pub struct RawNote {
    pub pc: u64,
    pub base: u64,
    pub semaphore: u64,
    pub provider: String,
    pub name: String,
    pub args: String,
}

const NT_STAPSDT: u32 = 3;

/// Parses the contents of a `.note.stapsdt` section.
pub fn parse_notes(data: &[u8]) -> Result<Vec<RawNote>> {
    let mut notes = Vec::new();
    each_note(data, |at, ntype, owner, desc| {
        if ntype == NT_STAPSDT && owner == b"stapsdt\0" {
            notes.push(parse_desc(desc).with_context(|| format!("note at offset {at}"))?);
        }
        Ok(())
    })?;
    Ok(notes)
}

/// Walks the ELF notes of a note section: `visit(offset, type, owner
/// name with its NUL, descriptor)` for each, in order, until one is
/// truncated (an error naming it) or `visit` fails.
pub fn each_note(
    data: &[u8],
    mut visit: impl FnMut(usize, u32, &[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let mut off = 0usize;
    while off < data.len() {
        let at = off;
        let header = data
            .get(off..off + 12)
            .with_context(|| format!("note at offset {at}: truncated header"))?;
        let namesz = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
        let descsz = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let ntype = u32::from_le_bytes(header[8..12].try_into().unwrap());
        off += 12;
        let name_end = off.checked_add(namesz).filter(|&e| e <= data.len());
        let name_end = name_end.with_context(|| {
            format!("note at offset {at}: name size {namesz} runs past the section")
        })?;
        let owner = &data[off..name_end];
        off = align4(name_end);
        let desc_end = off.checked_add(descsz).filter(|&e| e <= data.len());
        let desc_end = desc_end.with_context(|| {
            format!("note at offset {at}: descriptor size {descsz} runs past the section")
        })?;
        let desc = &data[off..desc_end];
        off = align4(desc_end);
        visit(at, ntype, owner, desc)?;
    }
    Ok(())
}

fn align4(v: usize) -> usize {
    v.saturating_add(3) & !3
}

fn parse_desc(desc: &[u8]) -> Result<RawNote> {
    if desc.len() < 24 {
        bail!(
            "descriptor of {} bytes is shorter than its three addresses",
            desc.len()
        );
    }
    let word = |i: usize| u64::from_le_bytes(desc[i * 8..i * 8 + 8].try_into().unwrap());
    let mut strings = desc[24..].split(|&b| b == 0);
    let mut next = |what: &str| -> Result<String> {
        let s = strings.next().with_context(|| format!("missing {what}"))?;
        String::from_utf8(s.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    };
    let provider = next("provider")?;
    let name = next("probe name")?;
    let args = next("argument string")?;
    if !desc[24..].ends_with(&[0]) {
        bail!("strings are not NUL-terminated");
    }
    if provider.is_empty() || name.is_empty() {
        bail!("empty provider or probe name");
    }
    Ok(RawNote {
        pc: word(0),
        base: word(1),
        semaphore: word(2),
        provider,
        name,
        args,
    })
}

/// All SDT probe sites of an ELF image, with file offsets resolved.
pub fn probe_sites(data: &[u8]) -> Result<Vec<ProbeSite>> {
    let file = object::File::parse(data).context("not an ELF file this tool can read")?;
    let Some(section) = file.section_by_name(".note.stapsdt") else {
        return Ok(Vec::new());
    };
    let notes_data = section.data().context(".note.stapsdt cannot be read")?;
    let notes = parse_notes(notes_data).context("corrupt .note.stapsdt")?;
    let actual_base = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (s.address(), offset, size)
        })
        .collect();
    // Executable sections (SHF_EXECINSTR), not segments: with gold or
    // `-z noseparate-code` the first segment is executable from the ELF
    // header on, and a stale site in the header would pass.
    let code: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| match s.flags() {
            object::SectionFlags::Elf { sh_flags } => {
                sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0
            }
            _ => false,
        })
        .map(|s| (s.address(), s.size()))
        .collect();
    let in_code = |vaddr: u64| code.iter().any(|&(a, size)| vaddr >= a && vaddr - a < size);
    let to_offset = |vaddr: u64| -> Option<u64> {
        segments
            .iter()
            .find(|&&(addr, _, size)| vaddr >= addr && vaddr < addr + size)
            .map(|&(addr, offset, _)| vaddr - addr + offset)
    };
    let mut sites = Vec::new();
    for n in notes {
        // Prelinking moves code; the note records the link-time base.
        let delta = actual_base.map(|b| b.wrapping_sub(n.base)).unwrap_or(0);
        let pc = n.pc.wrapping_add(delta);
        let semaphore = if n.semaphore == 0 {
            0
        } else {
            n.semaphore.wrapping_add(delta)
        };
        let Some(pc_offset) = to_offset(pc) else {
            // Left by code the linker dropped: its address (near 0) lies in
            // no segment of a non-PIE file. Kept as a site outside the code,
            // which callers skip with a warning, as in a PIE file.
            sites.push(ProbeSite {
                provider: n.provider,
                name: n.name,
                args: n.args,
                pc,
                pc_offset: 0,
                semaphore,
                semaphore_offset: 0,
                in_code: false,
            });
            continue;
        };
        let semaphore_offset = if semaphore == 0 {
            0
        } else {
            to_offset(semaphore).with_context(|| {
                format!(
                    "semaphore of {}:{} at {semaphore:#x} lies in no loaded segment",
                    n.provider, n.name
                )
            })?
        };
        sites.push(ProbeSite {
            provider: n.provider,
            name: n.name,
            args: n.args,
            pc,
            pc_offset,
            semaphore,
            semaphore_offset,
            in_code: in_code(pc),
        });
    }
    Ok(sites)
}

/// The semaphores (`provider:name`) whose file page more than one loadable
/// segment maps. The kernel raises a semaphore in a process that maps the
/// file after the probe was attached by writing through the first writable
/// mapping of the file that holds the semaphore's file offset (uprobes'
/// `valid_ref_ctr_vma`); when the last page of the RELRO segment is the
/// same file page, that is the RELRO copy, so the real semaphore stays 0
/// and such a process never fires the probe. libhakmem.so page-aligns its
/// semaphores' section (`allocator/src/leaf/probes.rs`) so that this list
/// stays empty.
pub fn semaphores_on_shared_pages(data: &[u8]) -> Result<Vec<String>> {
    const PAGE: u64 = 4096;
    let file = object::File::parse(data).context("not an ELF file this tool can read")?;
    let pages: Vec<(u64, u64)> = file
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset / PAGE, (offset + size).div_ceil(PAGE))
        })
        .collect();
    Ok(probe_sites(data)?
        .into_iter()
        .filter(|s| s.semaphore != 0)
        .filter(|s| {
            let page = s.semaphore_offset / PAGE;
            pages
                .iter()
                .filter(|&&(a, b)| page >= a && page < b)
                .count()
                > 1
        })
        .map(|s| format!("{}:{}", s.provider, s.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(provider: &str, name: &str, args: &str) -> Vec<u8> {
        let mut desc = Vec::new();
        for w in [0x1000u64, 0x2000, 0x3000] {
            desc.extend_from_slice(&w.to_le_bytes());
        }
        for s in [provider, name, args] {
            desc.extend_from_slice(s.as_bytes());
            desc.push(0);
        }
        let mut n = Vec::new();
        n.extend_from_slice(&8u32.to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&3u32.to_le_bytes());
        n.extend_from_slice(b"stapsdt\0");
        n.extend_from_slice(&desc);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n
    }

    #[test]
    fn parses_well_formed_notes() {
        let mut data = note("hakmem", "ss_acquire", "8@%rdi 8@%rsi");
        data.extend(note("hakmem", "shared_fail", "8@%rdi"));
        let notes = parse_notes(&data).unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].name, "ss_acquire");
        assert_eq!(notes[0].semaphore, 0x3000);
        assert_eq!(notes[1].args, "8@%rdi");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let data = note("hakmem", "ss_acquire", "8@%rdi");
        for len in 1..data.len() {
            // Cutting inside padding may still parse; what matters is no panic.
            let _ = parse_notes(&data[..len]);
        }
        assert!(parse_notes(&data[..10]).is_err());
        assert!(parse_notes(&data[..30]).is_err());
    }

    #[test]
    fn corrupt_sizes_and_strings_are_reported() {
        let mut data = note("hakmem", "ss_acquire", "8@%rdi");
        data[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = format!("{:#}", parse_notes(&data).unwrap_err());
        assert!(err.contains("runs past the section"), "{err}");
        let mut short = note("hakmem", "x", "");
        short[4..8].copy_from_slice(&10u32.to_le_bytes());
        assert!(parse_notes(&short).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x2545F4914F6CDD1D;
        for _ in 0..20_000 {
            let mut data = note("hakmem", "slab_recycle", "8@%rdi 8@%rsi");
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % data.len();
                data[i] = (x >> 32) as u8;
            }
            let _ = parse_notes(&data);
        }
    }

    /// The release library, built by `just test` before the tests run
    /// (`HAKMEM_LIB` names another, as for the allocator's tests).
    fn shipped_library() -> Vec<u8> {
        let path = std::env::var("HAKMEM_LIB").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/libhakmem.so"
            )
            .into()
        });
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (cargo build --release first)"))
    }

    #[test]
    fn every_probe_site_of_the_shipped_library_lies_in_its_code() {
        let sites = probe_sites(&shipped_library()).unwrap();
        assert!(sites.len() >= 13, "one site per probe at least: {sites:?}");
        let stale: Vec<_> = sites.iter().filter(|s| !s.in_code).collect();
        assert!(
            stale.is_empty(),
            "notes pointing outside the code: {stale:?}"
        );
    }

    /// Processes started after hakctl attached fire the probes only if no
    /// other segment maps the semaphores' file page (see
    /// `semaphores_on_shared_pages`). Found when a change of code size put
    /// them on the RELRO segment's last page: hakctl's fleet test saw no
    /// event from any process started after it.
    #[test]
    fn no_semaphore_of_the_shipped_library_shares_its_file_page_with_another_segment() {
        let data = shipped_library();
        let sites = probe_sites(&data).unwrap();
        assert!(sites.iter().filter(|s| s.semaphore != 0).count() >= 13);
        let shared = semaphores_on_shared_pages(&data).unwrap();
        assert!(
            shared.is_empty(),
            "semaphores on a shared file page: {shared:?}"
        );
    }

    #[test]
    fn a_note_pointing_outside_the_code_is_marked() {
        let mut data = shipped_library();
        let file = object::File::parse(&*data).unwrap();
        let notes = file.section_by_name(".note.stapsdt").unwrap();
        let (offset, _) = notes.file_range().unwrap();
        // The first note's pc: past its 12-byte header and "stapsdt\0".
        let pc_at = offset as usize + 12 + 8;
        data[pc_at..pc_at + 8].copy_from_slice(&0x8au64.to_le_bytes());
        let sites = probe_sites(&data).unwrap();
        assert_eq!(sites.iter().filter(|s| !s.in_code).count(), 1);
        assert_eq!(sites.iter().find(|s| !s.in_code).unwrap().pc, 0x8a);
    }
}
