#!/usr/bin/env bash
# Idempotent set-up for a fresh machine of this kind: the Debian packages the
# tests and benchmarks use, the nightly rust-src, bpf-linker (linked against the
# nightly's own LLVM, see shared/TOOLCHAIN.md) and `just`.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_PKGS=(g++ bpftrace libjemalloc2 libtcmalloc-minimal4 libmimalloc2.0 sqlite3 binutils valgrind tmux prometheus)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    log "rustup component add rust-src --toolchain nightly"
    rustup component add rust-src --toolchain nightly
fi

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v just >/dev/null 2>&1 && [ ! -x "$CARGO_BIN/just" ]; then
    log "cargo install just"
    cargo install just --locked --quiet
fi

# bpf-linker must use the same LLVM as the nightly rustc. Point an LLVM prefix at
# the nightly's own libLLVM; keep it somewhere stable (the binary's RUNPATH).
NIGHTLY_LIB="$(rustc +nightly --print sysroot)/lib"
LLVM_SO="$(ls "$NIGHTLY_LIB"/libLLVM.so.*-rust-* 2>/dev/null | head -n1 || true)"
if [ -z "$LLVM_SO" ]; then
    echo "setup: no libLLVM in $NIGHTLY_LIB; is the nightly toolchain installed?" >&2
    exit 1
fi
LLVM_MAJOR="$(basename "$LLVM_SO" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')"
PREFIX="${HAKMEM_LLVM_PREFIX:-$HOME/.local/share/hakmem/llvm-$LLVM_MAJOR}"
mkdir -p "$PREFIX/lib"
ln -sf "$LLVM_SO" "$PREFIX/lib/$(basename "$LLVM_SO")"
ln -sf "$LLVM_SO" "$PREFIX/lib/libLLVM.so"
if ! "$CARGO_BIN/bpf-linker" --version >/dev/null 2>&1; then
    log "cargo install bpf-linker (LLVM $LLVM_MAJOR, about 3 minutes)"
    LLVM_PREFIX="$PREFIX" cargo install bpf-linker --version 0.13.0 --locked --quiet \
        --no-default-features --features "llvm-$LLVM_MAJOR" --force
fi
log "ok"
