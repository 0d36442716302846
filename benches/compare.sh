#!/usr/bin/env bash
# bench_random_mixed OPS SLOTS under each allocator, interleaved, REPS times;
# prints each run, then the median ops/s and the ratio to glibc, and hakmem
# against each peer run by run: the median of the per-repetition ratios
# hakmem/peer with their quartiles (a pair runs back to back, so it shares the
# machine's state; the spread says how far noise alone moves the answer).
# PIN="taskset -c 1" runs every process on one core.
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
        # shellcheck disable=SC2086 # PIN is a command prefix, split on purpose
        out=$(LD_PRELOAD="${LIBS[$name]}" ${PIN:-} "$BENCH" "$OPS" "$SLOTS")
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
echo
echo "hakmem / peer, per repetition: median [first quartile, third quartile]"
for name in "${ORDER[@]}"; do
    [ "$name" != hakmem ] && [ -v "RESULTS[$name]" ] || continue
    read -ra mine <<<"${RESULTS[hakmem]}"
    read -ra theirs <<<"${RESULTS[$name]}"
    for i in "${!mine[@]}"; do ratio "${mine[$i]}" "${theirs[$i]}" 4; echo; done |
        sort -g | awk -v peer="$name" '{r[NR] = $1}
            END {printf "%-10s %7.3f [%.3f, %.3f]\n", peer, r[int((NR + 1) / 2)], r[int((NR + 3) / 4)], r[int((3 * NR + 3) / 4)]}'
done
