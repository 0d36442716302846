#!/usr/bin/env bash
# mimalloc-bench's rptest (as the collection runs it with 2 threads) under two
# allocator libraries, interleaved in both orders: operations a CPU second (what rptest
# prints), page faults and peak RSS (`/usr/bin/time`), per run and medians.
# rptest's figures move a lot from run to run (thread scheduling decides how
# many cross-thread batches pile up), so take 6 runs or more.
#
#   bash benches/rptest-ab.sh A.so B.so [RUNS]
#
# Needs the collection built (`benches/collection.sh` does it) in
# $HAKMEM_COLLECTION_DIR (default ~/.cache/hakmem/mimalloc-bench).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
a=$(realpath "$1") b=$(realpath "$2") runs=${3:-6}
cd "${HAKMEM_COLLECTION_DIR:-$HOME/.cache/hakmem/mimalloc-bench}/build"
declare -A lib=([A]=$a [B]=$b) ops faults rss
for run in $(seq "$runs"); do
    # Both orders in turn: a run right after another's exit may pay for the
    # memory that exit gave back (see bench-suite's `run_order`).
    order="A B"
    [ $((run % 2)) -eq 0 ] && order="B A"
    for x in $order; do
        out=$({ /usr/bin/time -f "time: %M %R" env LD_PRELOAD="${lib[$x]}" \
            ./rptest 2 0 1 2 500 1000 100 8 16000; } 2>&1) || {
            echo "rptest under ${lib[$x]} failed: $out" >&2
            exit 1
        }
        o=$(grep -o '[0-9]* memory ops/CPU second' <<<"$out" | cut -d' ' -f1)
        read -r k f < <(grep '^time:' <<<"$out" | cut -d' ' -f2-)
        echo "$x ops/s $o  faults $f  peak $((k / 1024)) MiB"
        ops[$x]+="$o " faults[$x]+="$f " rss[$x]+="$k "
    done
done
for x in A B; do
    echo "median $x: ops/s $(median "${ops[$x]}")  faults $(median "${faults[$x]}")  peak $(($(median "${rss[$x]}") / 1024)) MiB"
done
echo "B/A ops/s $(ratio "$(median "${ops[B]}")" "$(median "${ops[A]}")" 3)"
