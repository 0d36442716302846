#!/usr/bin/env bash
# Two builds of libhakmem.so against each other on bench_random_mixed,
# interleaved (A, B, A, B, ...), each pair back to back: prints each run and
# the median of the per-pair ratios B/A with its quartiles (above 1: B is
# faster). For the cost of a change: build the tree before it into another
# target directory, e.g.
#   git worktree add /tmp/base HEAD~1
#   (cd /tmp/base && CARGO_TARGET_DIR=$PWD/target/base cargo build --release -p hakmem)
#   PIN="taskset -c 1" bash benches/ab.sh target/base/release/libhakmem.so target/release/libhakmem.so 10000000 8192 11
# Extra environment for B only: B_ENV="HAKMEM_X=1".
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
A=$1; B=$2; OPS=${3:-10000000}; SLOTS=${4:-8192}; REPS=${5:-7}
BENCH=target/release/bench_random_mixed
ops_of() { sed -E 's/.*ops\/s=([0-9]+).*/\1/' <<<"$1"; }
RATIOS=""
for rep in $(seq 1 "$REPS"); do
    # shellcheck disable=SC2086 # PIN is a command prefix, split on purpose
    a=$(ops_of "$(LD_PRELOAD="$A" ${PIN:-} "$BENCH" "$OPS" "$SLOTS")")
    # shellcheck disable=SC2086 # as above; B_ENV is a list of assignments
    b=$(ops_of "$(env ${B_ENV:-} LD_PRELOAD="$B" ${PIN:-} "$BENCH" "$OPS" "$SLOTS")")
    r=$(ratio "$b" "$a" 4)
    RATIOS+="$r "
    echo "rep $rep A $a B $b B/A $r"
done
sorted=$(tr ' ' '\n' <<<"$RATIOS" | grep . | sort -n)
n=$(wc -l <<<"$sorted")
q() { sed -n "$(( ($1 * (n - 1) + 2) / 4 + 1 ))p" <<<"$sorted"; }
echo "B/A over $REPS pairs: median $(q 2) [$(q 1), $(q 3)]"
