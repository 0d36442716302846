//! The memory limit of the process's cgroup, read once at initialisation,
//! without allocating (stack buffers, open/read/close).
//!
//! Why: hakmem maps memory lazily (MAP_NORESERVE) and the kernel charges a
//! cgroup for pages when they are touched, so under `memory.max` (v2) or
//! `memory.limit_in_bytes` (v1) a program whose heap outgrows the limit is
//! not refused memory: it is OOM-killed at a page fault. Capping what hakmem
//! maps (`os`'s budget, as `HAKMEM_OS_LIMIT_MB` does) at the room the cgroup
//! had when the program started turns that into malloc returning NULL with
//! ENOMEM, which a program can handle. The cap counts address space mapped,
//! not pages touched, so a program that maps much and touches little is
//! refused earlier than the kernel would kill it; `HAKMEM_CGROUP_LIMIT=0`
//! turns it off.
//!
//! The cap is the limit less a margin, not less what the group uses: usage
//! counts page cache, which the kernel reclaims before it kills anyone (a
//! container that has read files sits near its limit with little to spare
//! in anonymous memory), and other processes of the group, whose memory a
//! cap taken at one moment cannot follow. Not below `MIN_BUDGET`.
//!
//! Read: the memory controller's line of `/proc/self/cgroup` (v1:
//! `N:...memory...:/path`, under `/sys/fs/cgroup/memory`; v2: `0::/path`,
//! under `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`), the limit of that
//! cgroup and of each ancestor (the lowest applies), and its usage now. A
//! limit that changes after the first allocation is not followed.

use crate::procfs::{read_file, read_number, Buf};

/// Room kept for what the process needs besides hakmem's heap (stacks, the
/// program's own mappings and files): an eighth of the limit, at least this.
const MIN_MARGIN: usize = 4 << 20;
/// The least the cap is: a few chunks, so that a tiny limit still lets a
/// program start (the kernel then decides, as without the cap).
const MIN_BUDGET: usize = 16 << 20;

/// Where a cgroup's memory files live: the hierarchy's mount and the
/// group's path in it.
struct Group<'a> {
    mount: &'static [u8],
    path: &'a [u8],
    limit_file: &'static [u8],
}

impl Group<'_> {
    fn file(&self, path: &[u8], name: &[u8]) -> Option<Buf> {
        let mut b = Buf::new();
        b.push(self.mount)?;
        b.push(path)?;
        if !path.ends_with(b"/") {
            b.push(b"/")?;
        }
        b.push(name)?;
        Some(b)
    }

    /// The lowest limit on the way from the group to the root (v1 reports
    /// "no limit" as a number near 2^63: above 2^62 counts as none).
    fn limit(&self) -> Option<usize> {
        let mut path = self.path;
        let mut lowest: Option<usize> = None;
        loop {
            if let Some(l) = self
                .file(path, self.limit_file)
                .and_then(|f| read_number(&f))
                .filter(|&l| l < 1 << 62)
            {
                lowest = Some(lowest.map_or(l, |m| m.min(l)));
            }
            if path.len() <= 1 {
                return lowest;
            }
            // The parent: cut the last component.
            let cut = path.iter().rposition(|&b| b == b'/').unwrap_or(0);
            path = &path[..cut.max(1)];
        }
    }
}

/// The groups `/proc/self/cgroup` names that hold a memory controller.
fn each_memory_group(
    cgroups: &[u8],
    mut f: impl FnMut(Group<'_>) -> Option<usize>,
) -> Option<usize> {
    for line in cgroups.split(|&b| b == b'\n') {
        let mut fields = line.splitn(3, |&b| b == b':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let groups: &[(&'static [u8], &'static [u8])] = if id == b"0" && controllers.is_empty() {
            &[
                (b"/sys/fs/cgroup", b"memory.max"),
                (b"/sys/fs/cgroup/unified", b"memory.max"),
            ]
        } else if controllers.split(|&b| b == b',').any(|c| c == b"memory") {
            &[(b"/sys/fs/cgroup/memory", b"memory.limit_in_bytes")]
        } else {
            continue;
        };
        for &(mount, limit_file) in groups {
            let group = Group {
                mount,
                path,
                limit_file,
            };
            if let Some(v) = f(group) {
                return Some(v);
            }
        }
    }
    None
}

/// What hakmem may map under the process's cgroup memory limit: the limit
/// less a margin; None where no limit applies (or none can be read).
pub fn heap_budget() -> Option<usize> {
    let mut path = Buf::new();
    path.push(b"/proc/self/cgroup")?;
    let mut buf = [0u8; 2048];
    let cgroups = read_file(&path, &mut buf)?;
    each_memory_group(cgroups, |g| {
        let limit = g.limit()?;
        Some(
            limit
                .saturating_sub((limit / 8).max(MIN_MARGIN))
                .max(MIN_BUDGET),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_line_of_either_hierarchy_is_found() {
        let v1 = b"9:name=systemd:/\n4:memory:/a/b\n0::/\n";
        let mut seen = Vec::new();
        each_memory_group(v1, |g| {
            seen.push((g.mount, g.path.to_vec(), g.limit_file));
            None
        });
        // v1's memory line first; the v2 line names no controller of its own
        // here, and is tried too (a hybrid host).
        assert_eq!(
            seen[0],
            (
                &b"/sys/fs/cgroup/memory"[..],
                b"/a/b".to_vec(),
                &b"memory.limit_in_bytes"[..]
            )
        );
        assert_eq!(seen[1].0, b"/sys/fs/cgroup");
        let v2 = b"0::/user.slice/x\n";
        let mut seen = Vec::new();
        each_memory_group(v2, |g| {
            seen.push(g.path.to_vec());
            None
        });
        assert_eq!(seen, [b"/user.slice/x".to_vec(), b"/user.slice/x".to_vec()]);
    }

    #[test]
    fn numbers_and_max_are_read_as_the_kernel_writes_them() {
        let dir = std::env::temp_dir().join(format!("hakmem-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, want) in [("67108864\n", Some(67108864)), ("max\n", None), ("", None)] {
            let f = dir.join("n");
            std::fs::write(&f, text).unwrap();
            let mut path = Buf::new();
            path.push(f.to_str().unwrap().as_bytes()).unwrap();
            assert_eq!(read_number(&path), want, "{text:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
