# hakmem task runner. `./run RECIPE` installs prerequisites first; `just RECIPE` assumes them.
set shell := ["bash", "-euo", "pipefail", "-c"]

release := "target/release"

default: test

# Install the toolchain pieces and Debian packages the project needs (idempotent).
setup:
    bash scripts/setup.sh

# Release build: libhakmem.so, hakctl (with its eBPF programs), the benchmarks.
build:
    cargo build --release

# Format and lint gates.
lint:
    cargo fmt --all --check
    cargo clippy --all-targets -- -D warnings
    # The build with the probes compiled out (benches/instructions.sh, the probe-cost A/B).
    cargo clippy -p hakmem --no-default-features --features c-abi,safe-linking --target-dir target/noprobes -- -D warnings
    # The invariant checkers (feature `invariants`: ci-extra's scenarios, soak, fuzz).
    cargo clippy -p hakmem --all-targets --no-default-features --features c-abi,safe-linking,invariants --target-dir target/noprobes -- -D warnings
    # The build a dlopen-ed Rust library uses (examples/plugin).
    cargo clippy -p hakmem --no-default-features --features dynamic-tls,probes,safe-linking --target-dir target/plugin -- -D warnings
    cd examples/plugin && cargo fmt --check && cargo clippy --target-dir ../../target/plugin -- -D warnings

# The test suite (CI sets HAKMEM_REQUIRE_BPF=1 so BPF tests fail instead of skipping).
test: build lint
    cargo test

# What CI runs beyond `test`, so that nothing it does not run can rot (about
# 8 minutes on 2 cores): the tests of the build with the probes compiled
# out and the invariant checkers on, Miri, each fuzz target for a short run
# (invariant checkers on), the long real-program tests.
ci-extra:
    cargo test -p hakmem --no-default-features --features c-abi,safe-linking,invariants --target-dir target/noprobes --lib --test scenarios
    just miri
    just fuzz 20
    cargo test -p hakmem --test preload -- --ignored

# hakbench's `phases` under libhakmem.so, watched live by hakctl from its first allocation:
# each phase fills and frees 100k blocks of one size range, the next phase takes the slabs it
# left EMPTY for another class (Stage 1 climbs, the funnel fills). About 30 seconds.
demo scale="60": build
    {{release}}/hakctl run -- {{release}}/hakbench phases {{scale}}

# bench_random_mixed watched live (steady state: few slab requests after the start).
demo-random ops="300000000" slots="8192": build
    {{release}}/hakctl run -- {{release}}/bench_random_mixed {{ops}} {{slots}}

# Attach to an already running process.
watch pid:
    {{release}}/hakctl watch {{pid}}

# bench_random_mixed under glibc, hakmem and the peers installed, interleaved; medians and ratios.
bench ops="10000000" slots="8192" reps="5": build
    bash benches/compare.sh {{ops}} {{slots}} {{reps}}

# Probe cost: probes compiled out vs nobody attached vs hakctl attached, interleaved.
bench-overhead ops="10000000" slots="8192" reps="5": build
    bash benches/overhead.sh {{ops}} {{slots}} {{reps}}

# mimalloc-bench's programs, fetched and built outside the repository, under every allocator.
bench-collection reps="5":
    bash benches/collection.sh {{reps}}

# The regression guard CI runs: callgrind instruction counts against benches/instructions.baseline.
instructions-guard: build
    bash benches/instructions-guard.sh

# Instructions per run (callgrind): allocators side by side, probes compiled out, SuperSlab off.
bench-instructions ops="2000000" slots="8192": build
    bash benches/instructions.sh {{ops}} {{slots}}

# Real programs under LD_PRELOAD, the long selection too (CPython's regression suite, sqlite3, git, gcc, sort).
real-programs: build
    cargo test -p hakmem --test preload -- --include-ignored

# Many threads handing blocks of every size class to each other, contents checked, for SECONDS.
# With the invariant checkers on (feature `invariants`, its own target directory).
soak seconds="300" threads="8":
    cargo build --release -p hakmem --features invariants --bin hakmem-scenario --target-dir target/invariants
    HAKMEM_STATS=1 STRESS_THREADS={{threads}} STRESS_SECONDS={{seconds}} target/invariants/release/hakmem-scenario stress

# Fuzz sequences of malloc/free/realloc/calloc/aligned allocation with content checks (bounded time).
fuzz seconds="120":
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    cd fuzz && cargo +nightly fuzz run alloc_ops -- -max_total_time={{seconds}} -rss_limit_mb=4096
    cd fuzz && cargo +nightly fuzz run stapsdt_notes -- -max_total_time={{seconds}}

# The pure logic (tally, histogram buckets, JSON writer) under Miri.
miri:
    rustup component add miri --toolchain nightly
    cargo +nightly miri test -p hakmem-common

# The benchmark suite: every workload under glibc, hakmem, jemalloc, tcmalloc, mimalloc (tables, CSV, SVG).
bench-suite reps="5" scale="1": build
    {{release}}/bench-suite --reps {{reps}} --scale {{scale}} --out target/bench-suite

# Real programs (CPython, Perl, Node.js, SQLite, jq, sort, gcc: those installed) under each allocator.
bench-real reps="5" scale="1": build
    {{release}}/bench-suite --real --reps {{reps}} --scale {{scale}} --out target/bench-suite

# ThreadSanitizer build of the scenario driver (hakmem as the Rust allocator), then the threaded scenarios.
tsan:
    RUSTFLAGS="-Zsanitizer=thread" cargo +nightly build -Zbuild-std --target x86_64-unknown-linux-gnu --target-dir target/tsan -p hakmem --no-default-features --features probes,safe-linking --bin hakmem-scenario
    for s in stress recycle mixed abandon ace-free-threads grown; do HAKMEM_STATS=1 TSAN_OPTIONS=halt_on_error=1 target/tsan/x86_64-unknown-linux-gnu/debug/hakmem-scenario $s > /dev/null; echo "tsan $s: clean"; done
    for s in idle-burst threads-burst; do HAKMEM_STATS=1 HAKMEM_PURGE_THREAD=1 TSAN_OPTIONS=halt_on_error=1 target/tsan/x86_64-unknown-linux-gnu/debug/hakmem-scenario $s > /dev/null; echo "tsan $s with the purge thread: clean"; done
