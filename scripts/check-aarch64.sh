#!/usr/bin/env bash
# Builds resnet-core's unit tests for aarch64 Linux on this x86-64 machine and runs them
# under qemu-user: the NEON kernels against the scalar oracle and candle's convolution
# (`cpu::blocked::tests`), the rest of the unit tests beside them. No aarch64 standard
# library can be downloaded here, so the nightly toolchain rebuilds it (-Zbuild-std,
# rust-src component). Needs: rustup toolchain nightly with rust-src,
# `apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross`.
#
#   scripts/check-aarch64.sh [TEST FILTER]
#
# Output in target/aarch64 (a target directory of its own). qemu emulates NEON in
# software: the tests' results are exact, their times say nothing about a real core.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/aarch64}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cd "$ROOT"
cargo +nightly test -Zbuild-std=std,panic_abort --target aarch64-unknown-linux-gnu \
    --release -p resnet-core --lib -- "${1:-}"
