#!/usr/bin/env bash
# Instructions executed by bench_random_mixed OPS SLOTS (callgrind), for each
# allocator and for hakmem's A/B builds. Wall-clock ratios on these shared
# 2-core machines move by 10-25% between runs; instruction counts repeat to the
# last digits, so they settle "is this path cheaper" where timing cannot
# (they say nothing of cache misses or contention: compare.sh measures time).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
OPS=${1:-2000000}; SLOTS=${2:-8192}
REL=target/release
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is not installed" >&2; exit 1; }
cargo build --release -q -p hakmem --no-default-features --features c-abi,safe-linking --target-dir target/noprobes
LIBDIR=/usr/lib/x86_64-linux-gnu
count() { # count ENV... : total instructions of one run
    valgrind --tool=callgrind --trace-children=yes --callgrind-out-file=/dev/null \
        env "$@" "$PWD/$REL/bench_random_mixed" "$OPS" "$SLOTS" 2>&1 |
        sed -nE 's/.*Collected : ([0-9]+).*/\1/p; s/.*I +refs: +([0-9,]+).*/\1/p' | tr -d , | tail -1
}
declare -A N
N[glibc]=$(count LD_PRELOAD=)
N[hakmem]=$(count LD_PRELOAD="$PWD/$REL/libhakmem.so")
N[hakmem-noprobes]=$(count LD_PRELOAD="$PWD/target/noprobes/release/libhakmem.so")
N[hakmem-ss-off]=$(count HAKMEM_TINY_USE_SUPERSLAB=0 LD_PRELOAD="$PWD/$REL/libhakmem.so")
for peer in jemalloc:libjemalloc.so.2 tcmalloc:libtcmalloc_minimal.so.4 mimalloc:libmimalloc.so.2; do
    [ -e "$LIBDIR/${peer#*:}" ] && N[${peer%%:*}]=$(count LD_PRELOAD="$LIBDIR/${peer#*:}")
done
echo "instructions, bench_random_mixed $OPS $SLOTS (callgrind; the bench's own loop included)"
printf '%-16s %14s %9s\n' run instructions vs_hakmem
for k in glibc hakmem hakmem-noprobes hakmem-ss-off jemalloc tcmalloc mimalloc; do
    [ -v "N[$k]" ] || continue
    printf '%-16s %14s %9s\n' "$k" "${N[$k]}" "$(ratio "${N[$k]}" "${N[hakmem]}" 3)"
done
