//! Files of `/proc` and `/sys` read without allocating (stack buffers,
//! raw open/read/close): the cgroup's memory limit and the kernel's
//! overcommit mode, read where hakmem decides how to map.

use crate::errno;

/// A path or file's bytes, on the stack.
pub struct Buf {
    bytes: [u8; 512],
    len: usize,
}

impl Buf {
    pub const fn new() -> Buf {
        Buf {
            bytes: [0; 512],
            len: 0,
        }
    }

    pub fn push(&mut self, s: &[u8]) -> Option<()> {
        let end = self
            .len
            .checked_add(s.len())
            .filter(|&e| e < self.bytes.len())?;
        self.bytes[self.len..end].copy_from_slice(s);
        self.len = end;
        Some(())
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Reads the file at `path` into `out`, up to its capacity; the bytes read.
pub fn read_file<'a>(path: &Buf, out: &'a mut [u8]) -> Option<&'a [u8]> {
    let mut z = [0u8; 513];
    z[..path.len].copy_from_slice(path.as_slice());
    // Raw syscalls, not libc's wrappers: a preloaded library that wraps
    // `open` (fakechroot, libeatmydata) may call calloc on its first use,
    // which would come back here while the configuration is being read.
    // SAFETY: `z` is NUL-terminated (zeroed past the path); openat, read and
    // close touch only `out`, within its length.
    let (n, _) = errno::keep(|| unsafe {
        let fd = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            z.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return -1;
        }
        let mut total = 0usize;
        while total < out.len() {
            let r = libc::syscall(
                libc::SYS_read,
                fd,
                out[total..].as_mut_ptr(),
                out.len() - total,
            );
            if r <= 0 {
                break;
            }
            total += r as usize;
        }
        libc::syscall(libc::SYS_close, fd);
        total as isize
    });
    (n >= 0).then(|| &out[..n as usize])
}

/// The decimal number a file holds ("max" and empty are None).
pub fn read_number(path: &Buf) -> Option<usize> {
    let mut buf = [0u8; 64];
    let text = read_file(path, &mut buf)?;
    let digits = text.split(|&b| b == b'\n').next()?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0usize, |v, &d| {
        v.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// `vm.overcommit_memory`: 0 (heuristic), 1 (always) or 2 (strict: every
/// private writable mapping is charged in full, `MAP_NORESERVE` or not);
/// None if the file cannot be read (no `/proc` in a sandbox).
pub fn overcommit_mode() -> Option<usize> {
    let mut path = Buf::new();
    path.push(b"/proc/sys/vm/overcommit_memory")?;
    read_number(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overcommit_mode_is_the_one_the_kernel_reports() {
        let text = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap();
        assert_eq!(overcommit_mode(), Some(text.trim().parse().unwrap()));
    }

    #[test]
    fn a_missing_file_or_one_that_is_no_number_reads_as_none() {
        let mut path = Buf::new();
        path.push(b"/proc/self/no-such-file").unwrap();
        assert_eq!(read_number(&path), None);
        let mut path = Buf::new();
        path.push(b"/proc/self/comm").unwrap();
        assert_eq!(read_number(&path), None);
    }
}
