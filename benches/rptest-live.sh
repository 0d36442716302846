#!/usr/bin/env bash
# mimalloc-bench's rptest (2 threads, as the collection runs it) under glibc,
# hakmem and the Debian peers, interleaved, RUNS times, with `live-peak.c`
# preloaded in front of each: per run and as medians, the most bytes the
# program held at once (its live peak), the peak RSS, RSS per live byte and
# rptest's operations a CPU second. The collection compares peak RSS alone;
# rptest's live peak moves with its threads' relative progress (a thread
# that runs ahead piles up blocks for the other to free), so RSS per live
# byte is what the allocator's layout decides. The preload adds a little to
# each call, so the operations read lower than without it.
#
#   bash benches/rptest-live.sh [RUNS] [HAKMEM.so]
#
# Needs the collection built (`benches/collection.sh` does it) in
# $HAKMEM_COLLECTION_DIR (default ~/.cache/hakmem/mimalloc-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
runs=${1:-6}
hakmem=$(realpath "${2:-target/release/libhakmem.so}")
# A preload that does not exist is skipped by ld.so: the row would be glibc's.
[ -f "$hakmem" ] || { echo "rptest-live: $hakmem is missing (cargo build --release)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gcc -O2 -shared -fPIC -o "$tmp/live-peak.so" benches/live-peak.c -ldl
declare -A LIBS=([glibc]="" [hakmem]=$hakmem)
for peer in jemalloc:libjemalloc.so.2 tcmalloc:libtcmalloc_minimal.so.4 mimalloc:libmimalloc.so.2; do
    so=/usr/lib/x86_64-linux-gnu/${peer#*:}
    [ -e "$so" ] && LIBS[${peer%%:*}]=$so
done
ORDER=(glibc hakmem jemalloc tcmalloc mimalloc)
cd "${HAKMEM_COLLECTION_DIR:-$HOME/.cache/hakmem/mimalloc-bench}/build"
declare -A LIVE RSS OPS PER
for run in $(seq "$runs"); do
    for name in "${ORDER[@]}"; do
        [ -v "LIBS[$name]" ] || continue
        out=$({ /usr/bin/time -f "time: %M" env LD_PRELOAD="$tmp/live-peak.so ${LIBS[$name]}" \
            ./rptest 2 0 1 2 500 1000 100 8 16000; } 2>&1) || {
            echo "rptest under $name failed: $out" >&2
            exit 1
        }
        live=$(grep -o 'live-peak: [0-9]*' <<<"$out" | cut -d' ' -f2 || true)
        rss=$(grep '^time:' <<<"$out" | cut -d' ' -f2 || true)
        ops=$(grep -o '[0-9]* memory ops/CPU second' <<<"$out" | cut -d' ' -f1 || true)
        if [ -z "$live" ] || [ "$live" = 0 ] || [ -z "$rss" ] || [ -z "$ops" ]; then
            echo "rptest-live: no live peak, RSS or operations from rptest under $name: $out" >&2
            exit 1
        fi
        per=$(ratio "$rss" "$live")
        echo "run $run $name: live peak $((live / 1024)) MiB  peak RSS $((rss / 1024)) MiB  RSS/live $per  ops/s $ops"
        LIVE[$name]+="$live " RSS[$name]+="$rss " OPS[$name]+="$ops "
        PER[$name]+="$(ratio "$rss" "$live" 3 | tr -d .) "
    done
done
echo "medians over $runs runs:"
for name in "${ORDER[@]}"; do
    [ -v "LIVE[$name]" ] || continue
    printf '%-9s live peak %3d MiB  peak RSS %3d MiB  RSS/live %s  ops/s %s\n' "$name" \
        $(($(median "${LIVE[$name]}") / 1024)) $(($(median "${RSS[$name]}") / 1024)) \
        "$(ratio "$(median "${PER[$name]}")" 1000)" "$(median "${OPS[$name]}")"
done
