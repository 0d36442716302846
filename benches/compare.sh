#!/usr/bin/env bash
# bench_random_mixed OPS SLOTS under each allocator, interleaved, REPS times;
# prints each run, then the median ops/s and the ratio to glibc.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
OPS=${1:-10000000}; SLOTS=${2:-8192}; REPS=${3:-5}
BENCH=target/release/bench_random_mixed
declare -A LIBS=([glibc]="" [hakmem]="$PWD/target/release/libhakmem.so")
for peer in jemalloc:libjemalloc.so.2 tcmalloc:libtcmalloc_minimal.so.4 mimalloc:libmimalloc.so.2; do
    name=${peer%%:*}; so=/usr/lib/x86_64-linux-gnu/${peer#*:}
    [ -e "$so" ] && LIBS[$name]=$so
done
ORDER=(glibc hakmem jemalloc tcmalloc mimalloc)
declare -A RESULTS
for rep in $(seq 1 "$REPS"); do
    for name in "${ORDER[@]}"; do
        [ -v "LIBS[$name]" ] || continue
        out=$(LD_PRELOAD="${LIBS[$name]}" "$BENCH" "$OPS" "$SLOTS")
        ops=$(sed -E 's/.*ops\/s=([0-9]+).*/\1/' <<<"$out")
        RESULTS[$name]+="$ops "
        echo "rep $rep $name $ops"
    done
done
base=$(median "${RESULTS[glibc]}")
echo
echo "bench_random_mixed $OPS $SLOTS, median of $REPS interleaved runs"
printf '%-10s %14s %10s\n' allocator ops/s vs_glibc
for name in "${ORDER[@]}"; do
    [ -v "RESULTS[$name]" ] || continue
    m=$(median "${RESULTS[$name]}")
    printf '%-10s %14s %10s\n' "$name" "$m" "$(ratio "$m" "$base")"
done
