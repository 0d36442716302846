//! hakctl's `.note.stapsdt` parser on arbitrary bytes, both as a bare note
//! section and wrapped as a whole ELF file: errors are fine, panics are not.
#![no_main]

#[path = "../../hakctl/src/stapsdt.rs"]
#[allow(dead_code)]
mod stapsdt;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stapsdt::parse_notes(data);
    let _ = stapsdt::probe_sites(data);
});
