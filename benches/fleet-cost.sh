#!/usr/bin/env bash
# What `hakctl watch --all` and `hakctl serve --all` cost with many hakmem
# processes alive: N (default 100) copies of a small C worker (built here with
# gcc -O2) under the preload, each allocating and freeing a few hundred blocks
# every 10 ms; hakctl attached for SECONDS (default 30) refreshing every second.
# Prints hakctl's CPU time (user + system, from /proc/PID/stat) per second of
# wall time, its peak RSS, and the time of one /metrics scrape.
#   bash benches/fleet-cost.sh [N] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
N=${1:-100}; SECS=${2:-30}
REL=$PWD/target/release
LIB=$REL/libhakmem.so
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"' EXIT
c_program "$TMP/worker" <<'C'
#include <stdlib.h>
#include <string.h>
#include <time.h>
int main(void) {
    void *p[300];
    unsigned r = 12345;
    struct timespec ten_ms = {0, 10 * 1000 * 1000};
    for (;;) {
        for (int i = 0; i < 300; i++) { r = r * 1103515245 + 12345; p[i] = malloc(16 + (r >> 16) % 4096); memset(p[i], 1, 16); }
        for (int i = 0; i < 300; i++) free(p[i]);
        nanosleep(&ten_ms, 0);
    }
}
C
for _ in $(seq 1 "$N"); do LD_PRELOAD=$LIB "$TMP/worker" & done
sleep 1
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
measure() { # measure NAME CMD...: hakctl's CPU per wall second and peak RSS over SECS
    local name=$1; shift
    "$@" >/dev/null 2>"$TMP/err" &
    local pid=$!
    wait_attached "$pid" "$TMP/err"
    local t0 c0; t0=$(date +%s.%N); c0=$(ticks "$pid")
    sleep "$SECS"
    local c1 t1; c1=$(ticks "$pid"); t1=$(date +%s.%N)
    local hwm; hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    if [ "$name" = serve ]; then
        scrape=$(curl -s -o "$TMP/metrics" -w '%{time_total}' http://127.0.0.1:19464/metrics)
        series=$(grep -c '^hakmem_' "$TMP/metrics")
    fi
    kill -TERM "$pid"; wait "$pid" || true
    awk -v n="$name" -v c=$((c1 - c0)) -v hz="$hz" -v t0="$t0" -v t1="$t1" -v hwm="$hwm" \
        'BEGIN {printf "%-6s %6.2f%% of a core  peak RSS %6.1f MiB\n", n, 100 * c / hz / (t1 - t0), hwm / 1024}'
    if [ "$name" = serve ]; then echo "       one scrape of $N processes: ${scrape}s, $series series"; fi
}
echo "hakctl with $N hakmem processes alive, $SECS s each"
measure watch "$REL/hakctl" watch --all --lib "$LIB" -j 1
# serve: Prometheus-like scrapes every second.
( sleep 2; while sleep 1; do curl -s -o /dev/null http://127.0.0.1:19464/metrics || true; done ) &
measure serve "$REL/hakctl" serve --all --lib "$LIB" --listen 19464
