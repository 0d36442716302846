//! The allocator's layers, checked from its source text (docs/layers.md).
//!
//! Each folder of `src/` is a layer; a module may use modules of its own
//! layer and of the layers below it, never one above. Every `crate::` path
//! counts: `use` lines, groups (`use crate::{a, b::{c}}`), inline paths and
//! those inside macro bodies (`$crate::` too); so do `super::` paths (to a
//! sibling, or to the parent module's items) and a `mod.rs`'s paths to its
//! own child modules. A path that names no module (an alias, a glob, an
//! item of `lib.rs` not listed in `ROOT_ITEMS`) fails: it could hide a
//! reach upward. A callback is a way to reach upward without a path, so
//! registering one counts: a function-pointer type, a closure type outside a
//! private function's signature, or a C library registration
//! (`pthread_atfork`, `atexit`, `sigaction`, ...) is refused beyond what
//! `CALLBACKS_ALLOWED` lists, each with why it reaches no higher layer. The
//! module graph must have no cycle, even within one layer.
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

/// Where a callback may be registered or a closure type appear, how many
/// times, and why it reaches no layer above the module: (module, the text,
/// count, why).
const CALLBACKS_ALLOWED: &[(&str, &str, usize, &str)] = &[
    (
        "errno",
        "FnOnce(",
        1,
        "`keep` runs the caller's closure at once, keeps nothing",
    ),
    (
        "thread",
        "FnOnce(",
        1,
        "`with_cache` runs the caller's closure at once on the cache, keeps nothing",
    ),
    (
        "sync",
        "FnOnce(",
        1,
        "`OwnerLock::try_take` runs the caller's closure at once if the owner refuses it (a test hook's window), keeps nothing",
    ),
    (
        "test_hooks",
        "fn(",
        1,
        "test-only: production code never sets the hook; a test's hook may do \
         anything (the race tests call `api::trim` from inside the pool's window)",
    ),
    (
        "registry",
        "fn(",
        1,
        "the .init_array entry points at registry's own `protect_at_load`",
    ),
    (
        "stats",
        "fn(",
        1,
        "the exit tally's .fini_array entry points at stats' own function",
    ),
    (
        "cxx",
        "fn(",
        2,
        "`cxx_delete_slow` calls the C++ runtime's operator delete, found by \
         dlsym: code outside hakmem that calls back only through the C API; \
         the .init_array entry points at cxx's own `decide_at_load`",
    ),
    (
        "threads",
        "pthread_key_create",
        1,
        "the exit hook calls down (thread state)",
    ),
    (
        "fork",
        "pthread_atfork",
        1,
        "the fork handlers call down (every tier's lock)",
    ),
    (
        "upkeep",
        "pthread_create",
        1,
        "the purge thread calls down (chunk cache, pool, ace)",
    ),
];

struct Module {
    layer: String,
    file: PathBuf,
    uses: BTreeSet<String>,
    /// What its paths name that is no module (see the module doc).
    unknown: BTreeSet<String>,
}

/// A module file: its layer folder, its path, and its parent module (the
/// `mod.rs` of its folder, if it is not that file itself and it exists).
struct File {
    layer: String,
    path: PathBuf,
    parent: Option<String>,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Every module file under `src/` but `lib.rs` and the binaries, by
/// module name. A file `x/mod.rs` is module `x`.
fn module_files() -> BTreeMap<String, File> {
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
            let folder = path.parent().unwrap();
            let is_mod_rs = name_of(&path) == "mod.rs";
            let name = if is_mod_rs {
                name_of(folder)
            } else {
                path.file_stem().unwrap().to_string_lossy().into_owned()
            };
            let parent = (!is_mod_rs && folder.join("mod.rs").exists()).then(|| name_of(folder));
            let layer = match rel.components().count() {
                1 => String::from("(none)"),
                _ => name_of(&src().join(rel.components().next().unwrap())),
            };
            let file = File {
                layer,
                path,
                parent,
            };
            assert!(
                out.insert(name.clone(), file).is_none(),
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

/// A file's code, and its unit tests (`#[cfg(test)] mod ...` to the end).
fn split_tests(code: &str) -> (&str, &str) {
    code.split_once("#[cfg(test)]\nmod ").unwrap_or((code, ""))
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

/// Where a path is read from: what an item that is no module belongs to.
#[derive(Clone, Copy)]
enum Base<'a> {
    /// The crate root: only modules, folders and `ROOT_ITEMS`.
    Root,
    /// A folder declared in `lib.rs` (`crate::tiers::x`): only its modules.
    Folder(&'a str),
    /// A module: an item of it that is no module counts as the module.
    Module(&'a str),
}

/// What one path names: a module (or root item), or text that is none.
#[derive(Debug, PartialEq)]
enum Named {
    Module(String),
    Unknown(String),
}

/// The modules a `use` tree names: `a::b`, `{a, b::{c}}`, `tiers::{ace, x}`,
/// read from `base`.
fn tree_heads(s: &str, names: &Names, base: Base, out: &mut Vec<Named>) {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix('{') {
        // Split the group at its top-level commas.
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    tree_heads(&rest[start..i], names, base, out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    tree_heads(&rest[start..i], names, base, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let head = ident_at(s);
    let rest = s[head.len()..].trim_start();
    if head == "self" && rest.starts_with("as") {
        return out.push(Named::Unknown(format!("self {rest:.12}")));
    }
    if head == "self" {
        if let Base::Module(m) = base {
            out.push(Named::Module(m.to_string()));
        }
        return;
    }
    if head.is_empty() {
        // A glob (`*`), or something stranger.
        let what = match s.starts_with('*') {
            true => String::from("*"),
            false => format!("{s:.12}"),
        };
        return out.push(Named::Unknown(what));
    }
    if matches!(base, Base::Root) && names.folders.contains(head) {
        if let Some(after) = rest.strip_prefix("::") {
            // A folder, whose own module (`tiny/mod.rs`) may share its name.
            let folder = match names.modules.contains(head) {
                true => Base::Module(head),
                false => Base::Folder(head),
            };
            return tree_heads(after, names, folder, out);
        }
    }
    if names.modules.contains(head) {
        return out.push(Named::Module(head.to_string()));
    }
    match base {
        Base::Module(m) => out.push(Named::Module(m.to_string())),
        Base::Root if root_layer(head).is_some() => out.push(Named::Module(head.to_string())),
        Base::Root => out.push(Named::Unknown(head.to_string())),
        Base::Folder(f) => out.push(Named::Unknown(format!("{f}::{head}"))),
    }
}

/// What code of module `own` (whose parent module is `parent`) names
/// through `crate::`, `$crate::`, `super::` and paths to `children`.
fn names_used(
    code: &str,
    names: &Names,
    own: &str,
    parent: Option<&str>,
    children: &[String],
) -> Vec<Named> {
    let mut out = Vec::new();
    for start in occurrences(code, "crate::") {
        tree_heads(
            &code[start + "crate::".len()..],
            names,
            Base::Root,
            &mut out,
        );
    }
    for start in occurrences(code, "crate") {
        let rest = code[start + "crate".len()..].trim_start();
        if rest.starts_with("as ") {
            out.push(Named::Unknown(String::from("crate as")));
        }
    }
    let nested = inline_modules(code);
    // (Not the second `super::` of `super::super::`.)
    for start in occurrences(code, "super::").filter(|&i| !code[..i].ends_with(':')) {
        let mut rest = &code[start..];
        let mut levels = 0usize;
        while let Some(r) = rest.strip_prefix("super::") {
            rest = r;
            levels += 1;
        }
        // Each inline module around the path (`mod tests { .. }`) is a
        // level below the file's.
        let depth = nested.iter().filter(|r| r.contains(&start)).count();
        let base = match levels.checked_sub(depth) {
            Some(0) => Base::Module(own),
            Some(1) => parent.map_or(Base::Root, Base::Module),
            Some(_) => Base::Root,
            // Within the file: its own inline modules.
            None => continue,
        };
        if rest.starts_with('*') && matches!(base, Base::Module(m) if m == own) {
            continue;
        }
        tree_heads(rest, names, base, &mut out);
    }
    for child in children {
        let path = format!("{child}::");
        for _ in occurrences(code, &path).filter(|&i| !code[..i].ends_with(':')) {
            out.push(Named::Module(child.clone()));
        }
    }
    out
}

/// The spans of the inline modules (`mod name { ... }`) in `code`. Braces
/// in string literals and `'{'` / `'}'` do not count.
fn inline_modules(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    for start in occurrences(code, "mod ") {
        let after = &code[start + 4..];
        let name = ident_at(after);
        if name.is_empty() || !after[name.len()..].trim_start().starts_with('{') {
            continue;
        }
        let open = start + 4 + after.find('{').unwrap();
        let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
        let bytes = code.as_bytes();
        for (i, &c) in bytes.iter().enumerate().skip(open) {
            if in_str {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_str = false,
                    _ => {}
                }
                continue;
            }
            let quoted = i > 0 && bytes[i - 1] == b'\'' && bytes.get(i + 1) == Some(&b'\'');
            match c {
                b'"' => in_str = true,
                b'{' if !quoted => depth += 1,
                b'}' if !quoted => {
                    depth -= 1;
                    if depth == 0 {
                        out.push(open..i);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The child modules a `mod.rs` declares (`mod x;`, `pub mod x;`).
fn children_of(code: &str) -> Vec<String> {
    occurrences(code, "mod ")
        .map(|i| ident_at(&code[i + 4..]).to_string())
        .filter(|m| code.contains(&format!("mod {m};")))
        .collect()
}

fn modules() -> BTreeMap<String, Module> {
    let files = module_files();
    let names = Names {
        folders: LAYERS.iter().map(|s| s.to_string()).collect(),
        modules: files.keys().cloned().collect(),
    };
    let mut out = BTreeMap::new();
    for (name, f) in &files {
        let code = code_of(&std::fs::read_to_string(&f.path).unwrap());
        let children = children_of(split_tests(&code).0);
        let named = names_used(&code, &names, name, f.parent.as_deref(), &children);
        let mut uses = BTreeSet::new();
        let mut unknown = BTreeSet::new();
        for n in named {
            match n {
                Named::Module(m) if m != *name => {
                    uses.insert(m);
                }
                Named::Module(_) => {}
                Named::Unknown(u) => {
                    unknown.insert(u);
                }
            }
        }
        out.insert(
            name.clone(),
            Module {
                layer: f.layer.clone(),
                file: f.path.clone(),
                uses,
                unknown,
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
fn every_path_names_a_module() {
    let wrong: Vec<String> = modules()
        .iter()
        .filter(|(_, m)| !m.unknown.is_empty())
        .map(|(name, m)| format!("{name}: {:?}", m.unknown))
        .collect();
    assert!(
        wrong.is_empty(),
        "paths that name no module (an alias, a glob, an unlisted root item):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn callbacks_are_registered_only_where_they_reach_down() {
    let mut wrong = Vec::new();
    for (name, m) in modules() {
        let text = std::fs::read_to_string(&m.file).unwrap();
        // Unit tests may do as they like: they are not the allocator.
        let code = code_of(&text);
        for (line, p) in callbacks(&name, split_tests(&code).0) {
            wrong.push(format!("{}:{line}: `{p}`", m.file.display()));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// The callbacks module `name`'s code registers, stores or takes beyond
/// what `CALLBACKS_ALLOWED` lists: (line, what).
fn callbacks(name: &str, code: &str) -> Vec<(usize, &'static str)> {
    const PATTERNS: [&str; 13] = [
        "fn(",
        "Fn(",
        "FnMut(",
        "FnOnce(",
        "pthread_atfork",
        "pthread_key_create",
        "pthread_create",
        "atexit",
        "__cxa_atexit",
        "__cxa_thread_atexit_impl",
        "on_exit",
        "sigaction",
        "signal(",
    ];
    let mut out = Vec::new();
    for p in PATTERNS {
        // (`fn name(` is a definition: only `fn(` with no name is a type.)
        let mut found: Vec<usize> = occurrences(code, p)
            // A closure or fn-pointer parameter of a private function stays
            // in its module; anywhere else (a pub signature, a field, a
            // static, an alias, a body) it may carry code upward.
            .filter(|&i| !in_private_signature(code, i))
            .collect();
        let allowed = CALLBACKS_ALLOWED
            .iter()
            .find(|a| a.0 == name && a.1 == p)
            .map_or(0, |a| a.2);
        if found.len() > allowed {
            found.drain(..allowed);
            out.extend(found.into_iter().map(|i| (code[..i].lines().count(), p)));
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

/// Whether the text at `at` lies in the signature (generics, parameters,
/// return type, where clause) of a function that is not `pub`.
fn in_private_signature(code: &str, at: usize) -> bool {
    let Some(fn_at) = occurrences(&code[..at], "fn ").last() else {
        return false;
    };
    let line_start = code[..fn_at].rfind('\n').map_or(0, |i| i + 1);
    let in_signature = !code[fn_at..at].contains(['{', ';']);
    in_signature && !code[line_start..fn_at].contains("pub")
}

#[test]
fn the_checker_sees_every_kind_of_path() {
    let names = Names {
        folders: ["tiers", "tiny"].map(String::from).into(),
        modules: [
            "ace",
            "tiny",
            "owned_index",
            "a",
            "b",
            "g",
            "i",
            "l",
            "m",
            "j",
            "kid",
        ]
        .map(String::from)
        .into(),
    };
    let code = "use crate::{a, b::{c, d}, tiers::ace};\n\
                fn f() { crate::g::h(); $crate::i!(); super::j::k; super::super::m::z(); x_crate::no(); }\n\
                macro_rules! m { () => { crate::l::n() } }\n\
                use crate::tiny::{self, owned_index::X}; crate::tiny::alloc(); kid::f();";
    let got = |code, parent, children: &[String]| {
        let mut v: Vec<String> = names_used(code, &names, "own", parent, children)
            .into_iter()
            .map(|n| match n {
                Named::Module(m) => m,
                Named::Unknown(u) => format!("?{u}"),
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let kid = [String::from("kid")];
    assert_eq!(
        got(code, None, &kid),
        [
            "a",
            "ace",
            "b",
            "g",
            "i",
            "j",
            "kid",
            "l",
            "m",
            "owned_index",
            "tiny"
        ]
    );
    // A parent's item counts as the parent; in an inline module (tests),
    // `super` is the file; braces in literals do not end the module.
    assert_eq!(got("super::helper();", Some("tiny"), &[]), ["tiny"]);
    let tests = "mod tests { use super::*; fn t() { super::super::x(); f(\"}\", '{'); } }";
    assert_eq!(got(tests, Some("tiny"), &[]), ["tiny"]);
    assert_eq!(
        got("mod imp { use super::Own; }", Some("tiny"), &[]),
        ["own"]
    );
    // What names no module fails: an unknown root item, a glob, an alias.
    let odd = "crate::helper(); use crate::tiers::*; use crate as c;";
    assert_eq!(got(odd, None, &[]), ["?*", "?crate as", "?helper"]);
    assert_eq!(code_of("x(); // crate::hidden"), "x(); ");
    let hooks = "static H: Option<fn(usize)>;\nfn private(f: impl FnOnce()) {}\n\
                 pub fn register(f: fn(usize)) {}\npub fn with<F: FnMut(u8)>(f: F) {}\n\
                 fn init() { pthread_atfork(None, None, Some(after)); __cxa_atexit(f); }\n\
                 struct S { f: Box<dyn Fn()> }";
    let found: Vec<&str> = callbacks("pool", hooks).into_iter().map(|c| c.1).collect();
    assert_eq!(
        found,
        [
            "fn(",
            "fn(",
            "Fn(",
            "FnMut(",
            "pthread_atfork",
            "__cxa_atexit"
        ]
    );
    assert!(callbacks("errno", "pub fn keep<R>(f: impl FnOnce() -> R) {}").is_empty());
    assert_eq!(
        callbacks(
            "errno",
            "pub fn a(f: impl FnOnce()) {}\npub fn b(f: impl FnOnce()) {}"
        )
        .len(),
        1
    );
}
