//! The README's knob table is the allocator's: made from `config::KNOBS`
//! (the `knobs!` table that also makes `Config`, its defaults and its
//! parsing). `UPDATE_README=1 cargo test -p hakmem --test docs` rewrites it.

use std::path::Path;

const HEAD: &str = "| variable | default | effect |\n| --- | --- | --- |\n";

fn table() -> String {
    let mut t = String::from(HEAD);
    for k in hakmem::config::KNOBS {
        t += &format!("| `{}` | {} | {} |\n", k.name, k.default, k.meaning);
    }
    t
}

#[test]
fn the_readme_lists_every_knob_as_the_allocator_reads_it() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start = readme.find(HEAD).expect("the README's knob table");
    let len = readme[start..]
        .split_inclusive('\n')
        .take_while(|l| l.starts_with('|'))
        .map(str::len)
        .sum::<usize>();
    let (now, want) = (&readme[start..start + len], table());
    if now == want {
        return;
    }
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}{want}{}", &readme[..start], &readme[start + len..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    panic!("README's knob table differs from config::KNOBS; UPDATE_README=1 rewrites it.\nREADME:\n{now}\nKNOBS:\n{want}");
}

#[test]
fn every_knob_has_a_name_a_default_and_a_meaning() {
    let mut names: Vec<&str> = hakmem::config::KNOBS.iter().map(|k| k.name).collect();
    assert!(names.len() >= 15);
    for k in hakmem::config::KNOBS {
        assert!(k.name.starts_with("HAKMEM_"), "{k:?}");
        assert!(!k.default.is_empty() && k.meaning.len() > 20, "{k:?}");
        assert!(
            !k.meaning.contains("  "),
            "a line break left two spaces: {k:?}"
        );
    }
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        hakmem::config::KNOBS.len(),
        "a knob listed twice"
    );
}
