//! The names of hakbench's workloads, in the order the suite reports them
//! (shared by `hakbench` and `bench-suite`).

pub const WORKLOADS: &[&str] = &[
    "tiny",
    "mixed",
    "mid",
    "big",
    "large",
    "mixed-2t",
    "prodcons",
    "larson",
    "realloc",
    "realloc-kept",
    "kept",
    "stress",
];
