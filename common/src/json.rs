//! The tally as JSON, written through `core::fmt` so the allocator can print it
//! at exit from a stack buffer without allocating. hakctl writes its counts with
//! the same function, so the two documents share one schema (docs/json-schema.md).

use crate::codes::*;
use crate::probe::PROBES;
use crate::tally::Tally;
use core::fmt::{self, Write};

/// Writes `{"probes":{...},"classes":[...],"ace_fail":{...},"ss_bytes":{...},"large_cache":{...}}`.
pub fn write_tally(w: &mut impl Write, t: &Tally) -> fmt::Result {
    w.write_str("{\"probes\":{")?;
    for (i, p) in PROBES.iter().enumerate() {
        sep(w, i)?;
        write!(w, "\"{}\":{}", p.name, t.probe(p.id))?;
    }
    w.write_str("},\"classes\":[")?;
    for (c, size) in TINY_CLASS_SIZES.iter().enumerate() {
        sep(w, c)?;
        write!(w, "{{\"class\":{c},\"size\":{size}")?;
        for s in 1..=STAGES {
            write!(w, ",\"{}\":{}", STAGE_NAMES[s - 1], t.acquire(c, s))?;
        }
        w.write_str(",\"recycle\":{")?;
        for (o, name) in OUTCOME_NAMES.iter().enumerate() {
            sep(w, o)?;
            let v = t.slots[crate::tally::SLOT_RECYCLE + c * OUTCOMES + o];
            write!(w, "\"{name}\":{v}")?;
        }
        w.write_str("},\"shared_fail\":{")?;
        for (r, name) in REASON_NAMES.iter().enumerate() {
            sep(w, r)?;
            write!(w, "\"{name}\":{}", t.shared_fail(c, r))?;
        }
        write!(
            w,
            "}},\"tls_drain_blocks\":{},\"remote_drain_blocks\":{},\"legacy_blocks\":{}}}",
            t.tls_drain_blocks(c),
            t.remote_drain_blocks(c),
            t.legacy_blocks(c)
        )?;
    }
    w.write_str("],\"ace_fail\":{")?;
    for (k, name) in ACE_KIND_NAMES.iter().enumerate() {
        sep(w, k)?;
        write!(w, "\"{name}\":{}", t.slots[crate::tally::SLOT_ACE_FAIL + k])?;
    }
    let (mapped, unmapped) = t.ss_bytes();
    write!(
        w,
        "}},\"ss_bytes\":{{\"mapped\":{mapped},\"unmapped\":{unmapped}}},\"large_cache\":{{"
    )?;
    for (s, name) in SOURCE_NAMES.iter().enumerate() {
        let (n, bytes) = t.takes_at(s);
        write!(w, "\"{name}\":{n},\"{name}_bytes\":{bytes},")?;
    }
    w.write_str("\"by_user\":{")?;
    for (u, user) in CACHE_USER_NAMES.iter().enumerate() {
        sep(w, u)?;
        write!(w, "\"{user}\":{{")?;
        for (s, source) in SOURCE_NAMES.iter().enumerate() {
            sep(w, s)?;
            let n = t.user_takes_at(u, s);
            write!(w, "\"{source}\":{n}")?;
        }
        w.write_char('}')?;
    }
    w.write_str("},")?;
    write!(w, "\"put_bytes\":{},\"returned_bytes\":{{", t.put_bytes())?;
    for (r, name) in RETURN_WHY_NAMES.iter().enumerate() {
        sep(w, r)?;
        write!(
            w,
            "\"{name}\":{}",
            t.slots[crate::tally::SLOT_RETURNED_BYTES + r]
        )?;
    }
    w.write_str("}}}")
}

fn sep(w: &mut impl Write, i: usize) -> fmt::Result {
    if i > 0 {
        w.write_char(',')?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buf {
        b: [u8; 8192],
        n: usize,
    }
    impl Write for Buf {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let end = self.n + s.len();
            if end > self.b.len() {
                return Err(fmt::Error);
            }
            self.b[self.n..end].copy_from_slice(s.as_bytes());
            self.n = end;
            Ok(())
        }
    }

    #[test]
    fn the_document_has_every_field_and_fits_the_allocators_buffer() {
        let mut t = Tally::default();
        for s in t.slots.iter_mut() {
            *s = u64::MAX;
        }
        let mut buf = Buf { b: [0; 8192], n: 0 };
        write_tally(&mut buf, &t).expect("fits in 8 KiB even with the largest counters");
        let s = core::str::from_utf8(&buf.b[..buf.n]).unwrap();
        assert!(s.starts_with("{\"probes\":{\"slab_recycle\":"));
        assert!(s.ends_with("}}"));
        for key in [
            "\"classes\":[",
            "\"stage1\":",
            "\"recycle\":{",
            "\"shared_fail\":{",
            "\"ace_fail\":{",
            "\"ss_bytes\":{",
            "\"legacy_blocks\":",
            "\"large_cache\":{\"fresh\":",
            "\"cached_bytes\":",
            "\"put_bytes\":",
            "\"returned_bytes\":{\"idle\":",
        ] {
            assert!(s.contains(key), "{key} missing");
        }
        assert_eq!(s.matches("{\"class\":").count(), TINY_CLASSES);
    }
}
