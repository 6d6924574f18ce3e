#!/usr/bin/env bash
# Builds the `resnet` CLI and the workspace tests with --features cuda on a machine with
# no GPU and no CUDA toolkit (see ../shared/design/CUDA-BUILD.md for why each step).
#
#   scripts/build-cuda.sh            # CUDA 13.0, compute capability 90 (Hopper)
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh
#
# Needs python3 with venv and pip (PyPI reachable), a C compiler, cargo. Produces
# target/cuda/release/resnet and the test binaries under target/cuda/release/deps (a
# target directory of their own, so CPU builds are untouched), and prints
# the time it took and the binary's size. At run time, point LD_LIBRARY_PATH at CUDA 13
# libraries (a PyTorch install's site-packages/nvidia/... has them, or CUDA_LIB below).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CUDA_VENV:-$ROOT/target/cuda-venv}
CAP=${CUDA_COMPUTE_CAP:-90}
started=$(date +%s)

# 1. CUDA 13.0 compiler, headers and libraries from PyPI, every piece pinned to 13.0
#    (an unpinned nvvm/crt 13.5 emits PTX the 13.0 ptxas rejects).
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" \
    "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand"
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$CU/bin/nvcc" ] || { echo "error: nvcc not found under $CU" >&2; exit 1; }

# 2. The linker wants unversioned names; pip ships libcublas.so.13 and friends.
LINK_DIR=$ROOT/target/cuda-link
mkdir -p "$LINK_DIR"
for lib in cublas cublasLt cudart nvrtc curand; do
    so=$(ls "$CU"/lib/lib$lib.so.* 2>/dev/null | sort | head -n 1)
    [ -n "$so" ] || { echo "error: lib$lib.so.* not found under $CU/lib" >&2; exit 1; }
    ln -sf "$so" "$LINK_DIR/lib$lib.so"
done

# 3. libcuda is the driver, which no package ships: link against a stub that defines
#    every driver entry point cudarc declares. The real libcuda.so.1 is loaded at run time.
cargo fetch --manifest-path "$ROOT/Cargo.toml" >/dev/null
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -n 1)
grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" \
    | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; /* CUDA_ERROR_UNKNOWN */ }"}' > "$LINK_DIR/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK_DIR/libcuda.so" "$LINK_DIR/cuda_stub.c"
echo "libcuda stub: $(wc -l < "$LINK_DIR/cuda_stub.c") driver symbols"

# 4. Build: candle's PTX kernels for compute capability $CAP, then the CLI and the tests.
export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP="$CAP"
export RUSTFLAGS="${RUSTFLAGS:-} -L $LINK_DIR"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}
cd "$ROOT"
cargo build --release -p resnet-cli --features cuda
cargo test --release --workspace --features resnet-cli/cuda,resnet-tests/cuda,resnet-benches/cuda --no-run

elapsed=$(( $(date +%s) - started ))
size=$(du -h "$CARGO_TARGET_DIR/release/resnet" | cut -f1)
echo "built $CARGO_TARGET_DIR/release/resnet with CUDA (compute capability $CAP) in ${elapsed}s; binary $size"
echo "CUDA_LIB=$CU/lib (set LD_LIBRARY_PATH to it, or to a PyTorch install's CUDA 13 libraries)"
