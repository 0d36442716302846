#!/usr/bin/env bash
# The outside check: mimalloc-bench's programs, fetched and built from their
# sources OUTSIDE this repository (nothing of it is copied in), run under
# glibc, hakmem and the Debian peers, interleaved, by `bench-suite --collection`.
#
#   bash benches/collection.sh [REPS] [extra bench-suite flags, e.g. --pin 1]
#
# Where it builds: $HAKMEM_COLLECTION_DIR (default ~/.cache/hakmem/mimalloc-bench).
# With $HAKMEM_COLLECTION_SRC set to a checkout (or a bare repository) of
# mimalloc-bench, it is taken from there instead of github.com.
# Writes target/bench-suite/collection.{md,csv,svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
shift || true
dir=${HAKMEM_COLLECTION_DIR:-$HOME/.cache/hakmem/mimalloc-bench}
# The commit measured (mimalloc-bench's main on 2026-07-15).
commit=ce5784f1cef3d48ddc931479e4899ffad5ab3943

if [ ! -x "$dir/build/glibc-thread" ]; then
    command -v cmake >/dev/null || {
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq cmake g++ >/dev/null
    }
    # Only what this script makes there is replaced.
    rm -rf "$dir/bench" "$dir/build" && mkdir -p "$dir"
    src=${HAKMEM_COLLECTION_SRC:-}
    if [ -z "$src" ]; then
        src="$dir/git"
        [ -d "$src" ] || git clone --quiet --filter=blob:none https://github.com/daanx/mimalloc-bench "$src"
    fi
    git --git-dir="$( [ -d "$src/.git" ] && echo "$src/.git" || echo "$src")" archive "$commit" bench |
        tar -x -C "$dir"
    # sh6bench/sh8bench and the security tests need sources bench.sh downloads
    # separately: left out.
    sed -i '/add_executable(sh6bench/,/^endif()/d; /^if(NOT APPLE)$/d; /add_subdirectory(security)/d' \
        "$dir/bench/CMakeLists.txt"
    cmake -S "$dir/bench" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release >"$dir/cmake.log"
    make -C "$dir/build" -j"$(nproc)" >"$dir/make.log" 2>&1 || {
        tail -20 "$dir/make.log"
        exit 1
    }
fi
cargo build --release --quiet
exec target/release/bench-suite --collection "$dir" --reps "$reps" --out target/bench-suite "$@"
