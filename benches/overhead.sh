#!/usr/bin/env bash
# Probe cost: bench_random_mixed OPS SLOTS under libhakmem.so, REPS interleaved runs of
#   noprobes  - a build with the probes compiled out (--no-default-features --features c-abi,safe-linking)
#   idle      - the normal build, nobody attached (semaphores 0)
#   watched   - the normal build under `hakctl run` (every probe but the drain probes)
#   drains    - the same with `hakctl run --drains` (a trap per thread-cache drain too)
#   all       - the normal build started while `hakctl watch --all` is attached to the
#               library file (every process that maps it counted, per process)
# prints medians and ratios to `idle`.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
OPS=${1:-10000000}; SLOTS=${2:-8192}; REPS=${3:-5}
REL=target/release
cargo build --release -q -p hakmem --no-default-features --features c-abi,safe-linking --target-dir target/noprobes
NOPROBES=target/noprobes/release/libhakmem.so
ops_of() { sed -nE 's/^bench_random_mixed .*ops\/s=([0-9]+).*/\1/p'; }
declare -A R
# One run while `hakctl watch --all` is attached (started first, stopped after).
all_attached() {
    local log pid
    log=$(mktemp)
    $REL/hakctl watch --all --lib "$PWD/$REL/libhakmem.so" -j 1 >/dev/null 2>"$log" &
    pid=$!
    wait_attached "$pid" "$log"
    LD_PRELOAD=$PWD/$REL/libhakmem.so $REL/bench_random_mixed "$OPS" "$SLOTS" | ops_of
    kill -TERM "$pid"; wait "$pid" || true  # not INT: a background job of a script ignores SIGINT
    rm -f "$log"
}
for rep in $(seq 1 "$REPS"); do
    n=$(LD_PRELOAD=$PWD/$NOPROBES $REL/bench_random_mixed "$OPS" "$SLOTS" | ops_of)
    i=$(LD_PRELOAD=$PWD/$REL/libhakmem.so $REL/bench_random_mixed "$OPS" "$SLOTS" | ops_of)
    # run sends the command's stdout to its stderr (hakctl's stdout is its JSON).
    watch() { HAKMEM_LIB=$PWD/$REL/libhakmem.so $REL/hakctl run --json --interval 0.5 "$@" -- $REL/bench_random_mixed "$OPS" "$SLOTS" 2>&1 >/dev/null | ops_of; }
    w=$(watch)
    d=$(watch --drains)
    a=$(all_attached)
    R[noprobes]+="$n "; R[idle]+="$i "; R[watched]+="$w "; R[drains]+="$d "; R[all]+="$a "
    echo "rep $rep: noprobes $n idle $i watched $w drains $d all $a"
done
idle=$(median "${R[idle]}")
echo
echo "probe cost, bench_random_mixed $OPS $SLOTS, median of $REPS interleaved runs"
printf '%-9s %14s %9s\n' build ops/s vs_idle
for k in noprobes idle watched drains all; do
    m=$(median "${R[$k]}")
    printf '%-9s %14s %9s\n' "$k" "$m" "$(ratio "$m" "$idle" 3)"
done
