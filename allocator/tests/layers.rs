//! The allocator's layers, checked from its source text (docs/layers.md).
//!
//! Each folder of `src/` is a layer; a module may use modules of its own
//! layer and of the layers below it, never one above. Every `crate::` path
//! counts: `use` lines, groups (`use crate::{a, b::{c}}`), inline paths and
//! those inside macro bodies (`$crate::` too); so does `super::name` naming a
//! sibling. A callback is a way to reach upward without a path, so
//! registering one counts: a function-pointer type, a closure parameter of a
//! `pub` function, or a C library registration (`pthread_atfork`, ...) is
//! refused outside the few places listed in `CALLBACKS_ALLOWED`, each with
//! why it reaches no higher layer. The module graph must have no cycle, even
//! within one layer.
//!
//! `LAYERS_GRAPH=path cargo test -p hakmem --test layers` writes the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The folders of `src/`, top layer first.
const LAYERS: &[&str] = &[
    "front",
    "lifecycle",
    "thread",
    "tiny",
    "pool",
    "tiers",
    "chunks",
    "base",
    "leaf",
];

/// Names `crate::` may start with that are no module: items of `lib.rs`,
/// with the layer they belong to.
const ROOT_ITEMS: &[(&str, &str)] = &[
    // The probe catalogue's USDT provider (`lib.rs`), fired through `probes`.
    ("usdt_probes", "leaf"),
    ("HakMem", "front"),
];

/// Where a callback may be registered or a closure taken, and why it reaches
/// no layer above the module: (module, the text, why).
const CALLBACKS_ALLOWED: &[(&str, &str, &str)] = &[
    (
        "errno",
        "impl Fn",
        "`keep` runs the caller's closure at once, keeps nothing",
    ),
    (
        "thread",
        "impl Fn",
        "`with_cache` runs the caller's closure at once on the cache, keeps nothing",
    ),
    (
        "test_hooks",
        "fn(",
        "the hook is set by tests, outside the crate; the allocator only calls it",
    ),
    (
        "stats",
        "fn(",
        "the exit tally's .fini_array entry points at stats' own function",
    ),
    (
        "threads",
        "pthread_key_create",
        "the exit hook calls down (thread state)",
    ),
    (
        "fork",
        "pthread_atfork",
        "the fork handlers call down (every tier's lock)",
    ),
    (
        "upkeep",
        "pthread_create",
        "the purge thread calls down (large cache, pool)",
    ),
];

struct Module {
    layer: String,
    file: PathBuf,
    uses: BTreeSet<String>,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module file under `src/` but `lib.rs` and the binaries: name ->
/// (layer folder, path). A file `x/mod.rs` is module `x`.
fn module_files() -> BTreeMap<String, (String, PathBuf)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path.strip_prefix(src()).unwrap().to_path_buf();
            if path.is_dir() {
                if rel != Path::new("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") || rel == Path::new("lib.rs") {
                continue;
            }
            let layer = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .into_owned();
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            let name = if stem == "mod" {
                path.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            } else {
                stem
            };
            let layer = if rel.components().count() == 1 {
                String::from("(none)")
            } else {
                layer
            };
            assert!(
                out.insert(name.clone(), (layer, path)).is_none(),
                "two modules named {name}"
            );
        }
    }
    out
}

/// The text without comments (so that prose naming `crate::x` does not count).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// What a path can name: the layer folders and the modules.
struct Names {
    folders: BTreeSet<String>,
    modules: BTreeSet<String>,
}

/// The modules a `use` tree names: `a::b`, `{a, b::{c}}`, `tiers::{ace, x}`.
/// `parent`: the folder the tree hangs from; an item of it that is no
/// module is an item of the folder's own module (`crate::tiny::alloc`).
fn tree_heads(s: &str, names: &Names, parent: Option<&str>, out: &mut Vec<String>) {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix('{') {
        // Split the group at its top-level commas.
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    tree_heads(&rest[start..i], names, parent, out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    tree_heads(&rest[start..i], names, parent, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let head = ident_at(s);
    if head.is_empty() {
        return;
    }
    if parent.is_none() && names.folders.contains(head) {
        if let Some(rest) = s[head.len()..].trim_start().strip_prefix("::") {
            return tree_heads(rest, names, Some(head), out);
        }
    }
    match parent {
        Some(folder) if !names.modules.contains(head) => out.push(folder.to_string()),
        _ => out.push(head.to_string()),
    }
}

/// The modules (or root items) a file's code names through `crate::`,
/// `$crate::` or `super::`.
fn names_used(code: &str, names: &Names) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["crate::", "super::"] {
        for start in occurrences(code, prefix) {
            // `super::super::x` names x as surely as `super::x`.
            let mut rest = &code[start + prefix.len()..];
            while let Some(r) = rest.strip_prefix("super::") {
                rest = r;
            }
            tree_heads(rest, names, None, &mut out);
        }
    }
    out
}

fn modules() -> BTreeMap<String, Module> {
    let files = module_files();
    let names = Names {
        folders: LAYERS.iter().map(|s| s.to_string()).collect(),
        modules: files.keys().cloned().collect(),
    };
    let mut out = BTreeMap::new();
    for (name, (layer, file)) in &files {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let uses = names_used(&code, &names)
            .into_iter()
            .filter(|n| n != name && (files.contains_key(n) || root_layer(n).is_some()))
            .collect();
        out.insert(
            name.clone(),
            Module {
                layer: layer.clone(),
                file: file.clone(),
                uses,
            },
        );
    }
    out
}

fn root_layer(name: &str) -> Option<&'static str> {
    ROOT_ITEMS.iter().find(|r| r.0 == name).map(|r| r.1)
}

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

/// A cycle in the graph, as its path, if there is one.
fn find_cycle(mods: &BTreeMap<String, Module>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        mods: &BTreeMap<String, Module>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let from = path.iter().position(|p| p == n).unwrap();
                let mut cycle = path[from..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        if let Some(m) = mods.get(n) {
            for u in &m.uses {
                if let Some(c) = visit(u, mods, state, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in mods.keys() {
        if let Some(c) = visit(n, mods, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_reaches_a_layer_above_its_own() {
    let mods = modules();
    if let Some(path) = std::env::var_os("LAYERS_GRAPH") {
        let mut text = String::new();
        for (name, m) in &mods {
            let uses: Vec<&str> = m.uses.iter().map(|s| s.as_str()).collect();
            text += &format!("{:<10} {:<14} -> {}\n", m.layer, name, uses.join(" "));
        }
        std::fs::write(path, text).unwrap();
    }
    let mut wrong = Vec::new();
    for (name, m) in &mods {
        let Some(own) = rank(&m.layer) else {
            wrong.push(format!(
                "{name} ({}) is in no layer folder",
                m.file.display()
            ));
            continue;
        };
        for u in &m.uses {
            let layer = mods
                .get(u)
                .map(|t| t.layer.as_str())
                .or_else(|| root_layer(u))
                .unwrap();
            if rank(layer).is_none_or(|r| r < own) {
                wrong.push(format!(
                    "{name} ({}) uses {u} ({layer}), a layer above",
                    m.layer
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    if let Some(c) = find_cycle(&modules()) {
        panic!("cycle: {}", c.join(" -> "));
    }
}

#[test]
fn callbacks_are_registered_only_where_they_reach_down() {
    let mut wrong = Vec::new();
    for (name, m) in modules() {
        let text = std::fs::read_to_string(&m.file).unwrap();
        // Unit tests may do as they like: they are not the allocator.
        let code = code_of(text.split("#[cfg(test)]\nmod ").next().unwrap());
        for (line, p) in callbacks(&name, &code) {
            wrong.push(format!("{}:{line}: `{p}`", m.file.display()));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// The callbacks module `name`'s code registers or takes that
/// `CALLBACKS_ALLOWED` does not list: (line, what).
fn callbacks(name: &str, code: &str) -> Vec<(usize, &'static str)> {
    const PATTERNS: [&str; 7] = [
        "fn(",
        "impl Fn",
        "dyn Fn",
        "pthread_atfork",
        "pthread_key_create",
        "pthread_create",
        "atexit",
    ];
    let mut out = Vec::new();
    for p in PATTERNS {
        // (`fn name(` is a definition: only `fn(` with no name is a type.)
        for start in occurrences(code, p) {
            // A closure parameter of a private function stays in its module.
            if p.contains("Fn") && !in_pub_signature(code, start) {
                continue;
            }
            if !CALLBACKS_ALLOWED.iter().any(|a| a.0 == name && a.1 == p) {
                out.push((code[..start].lines().count(), p));
            }
        }
    }
    out
}

/// Where `pat` occurs in `code` not right after an identifier's character
/// (`x_crate::` is no `crate::`, `fn name(` no `fn(`).
fn occurrences<'a>(code: &'a str, pat: &'a str) -> impl Iterator<Item = usize> + 'a {
    code.match_indices(pat).map(|(i, _)| i).filter(|&i| {
        !code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// Whether the text at `at` lies in the signature of a `pub` function.
fn in_pub_signature(code: &str, at: usize) -> bool {
    let line_start = code[..at].rfind("fn ").unwrap_or(0);
    let head_start = code[..line_start].rfind('\n').map_or(0, |i| i + 1);
    let head = &code[head_start..line_start];
    head.contains("pub") && !code[line_start..at].contains('{')
}

#[test]
fn the_checker_sees_every_kind_of_path() {
    let names = Names {
        folders: ["tiers", "tiny"].map(String::from).into(),
        modules: ["ace", "tiny", "owned_index"].map(String::from).into(),
    };
    let code = "use crate::{a, b::{c, d}, tiers::ace};\n\
                fn f() { crate::g::h(); $crate::i!(); super::j::k; super::super::m::z(); x_crate::no(); }\n\
                macro_rules! m { () => { crate::l::n() } }\n\
                use crate::tiny::{self, owned_index::X}; crate::tiny::alloc();";
    let mut got = names_used(code, &names);
    got.sort();
    got.dedup();
    assert_eq!(
        got,
        [
            "a",
            "ace",
            "b",
            "g",
            "i",
            "j",
            "l",
            "m",
            "owned_index",
            "tiny"
        ]
    );
    assert_eq!(code_of("x(); // crate::hidden"), "x(); ");
    let hooks = "static H: AtomicPtr<()>;\nfn private(f: impl FnOnce()) {}\n\
                 pub fn register(f: fn(usize)) {}\npub fn with(f: impl FnMut(u8)) {}\n\
                 fn init() { pthread_atfork(None, None, Some(after)); }";
    let found: Vec<&str> = callbacks("pool", hooks).into_iter().map(|c| c.1).collect();
    assert_eq!(found, ["fn(", "impl Fn", "pthread_atfork"]);
    assert!(callbacks("errno", "pub fn keep<R>(f: impl FnOnce() -> R) {}").is_empty());
}
