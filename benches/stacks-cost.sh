#!/usr/bin/env bash
# What watching costs on a program whose slow paths are busy: a gcc -O2 churn
# program (30 rounds of 200,000 blocks of 512 bytes allocated, then freed; it
# prints its own elapsed time) run REPS times each, interleaved and pinned to
# one core: unwatched, under `hakctl stage-stats` and under `hakctl stacks`.
#   bash benches/stacks-cost.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
REPS=${1:-3}
REL=$PWD/target/release
LIB=$REL/libhakmem.so
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
c_program "$TMP/churn" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int main(void) {
    static void *p[200000];
    getchar();
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int r = 0; r < 30; r++) {
        for (int i = 0; i < 200000; i++) { p[i] = malloc(512); memset(p[i], 1, 8); }
        for (int i = 0; i < 200000; i++) free(p[i]);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.0f\n", ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9) * 1e6);
    return 0;
}
C
# once HAKCTL_ARGS...: the program's microseconds, hakctl (if any) attached before it starts
once() {
    local fifo=$TMP/go out=$TMP/out
    rm -f "$fifo"; mkfifo "$fifo"
    LD_PRELOAD=$LIB taskset -c 1 "$TMP/churn" <"$fifo" >"$out" &
    local pid=$!
    exec 3>"$fifo"   # the program now runs, waiting for a line
    if [ $# -gt 0 ]; then
        "$REL/hakctl" "$@" "$pid" >/dev/null 2>"$TMP/err" &
        local ctl=$!
        wait_attached "$ctl" "$TMP/err"
    fi
    echo >&3; exec 3>&-
    wait "$pid"
    [ $# -gt 0 ] && wait "$ctl"
    cat "$out"
}
declare -A R
for rep in $(seq 1 "$REPS"); do
    i=$(once); w=$(once stage-stats); s=$(once stacks -t 1)
    R[idle]+="$i "; R[stage-stats]+="$w "; R[stacks]+="$s "
    echo "rep $rep: idle $i us, stage-stats $w us, stacks $s us"
done
idle=$(median "${R[idle]}")
for k in idle stage-stats stacks; do
    m=$(median "${R[$k]}")
    printf '%-12s %9s us %6s x idle\n' "$k" "$m" "$(ratio "$m" "$idle")"
done
