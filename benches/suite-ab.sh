#!/usr/bin/env bash
# hakbench's workloads under two builds of libhakmem.so: per repetition
# A B B A, each pair's ops/s ratio B/A (the order bias of a pair cancels over
# the two), then the median per workload and the geometric mean of those
# (above 1: B is faster). For the cost of a change across the suite, e.g.
#   git worktree add /tmp/base HEAD~1
#   (cd /tmp/base && CARGO_TARGET_DIR=$PWD/target/base cargo build --release -p hakmem)
#   PIN="taskset -c 1" SCALE=3 bash benches/suite-ab.sh target/base/release/libhakmem.so target/release/libhakmem.so 3
# Workloads: all of hakbench's, or those named after REPS.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1; B=$2; REPS=${3:-3}; shift 3 || true
WORKLOADS=${*:-tiny mixed mid big large mixed-2t prodcons larson realloc realloc-kept kept stress}
# shellcheck disable=SC2086 # PIN is a command prefix, split on purpose
ops() { LD_PRELOAD=$1 ${PIN:-} target/release/hakbench "$2" "${SCALE:-1}" | sed -E 's/.*ops\/s=([0-9]+).*/\1/'; }
medians=""
for w in $WORKLOADS; do
    ratios=""
    for _ in $(seq 1 "$REPS"); do
        a1=$(ops "$A" "$w"); b1=$(ops "$B" "$w"); b2=$(ops "$B" "$w"); a2=$(ops "$A" "$w")
        ratios+="$(awk -v a="$a1" -v b="$b1" 'BEGIN {print b/a}') $(awk -v a="$a2" -v b="$b2" 'BEGIN {print b/a}') "
    done
    m=$(tr ' ' '\n' <<<"$ratios" | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
    medians+="$m "
    printf '%-13s B/A %.3f\n' "$w" "$m"
done
tr ' ' '\n' <<<"$medians" | grep . | awk '{s+=log($1); n++} END {printf "geomean B/A %.3f over %d workloads\n", exp(s/n), n}'
