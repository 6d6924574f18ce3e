#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the parity and gradient tests on CUDA, `resnet bench`
# for resnet50 at batch 1, 8 and 64 in f32, f16 and bf16, the CIFAR-10 evaluation, a
# training step's time and a short training run on the device; one summary.
#
#   scripts/build-cuda.sh            # first, here or on any machine of the same arch
#   LD_LIBRARY_PATH=<CUDA 13 libs> scripts/gpu-check.sh [SHARED_DIR]
#
# Uses the binaries built by build-cuda.sh (target/cuda/release/resnet and the test
# binaries under target/cuda/release/deps), so the GPU machine needs no Rust toolchain.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${1:-$ROOT/../shared}
BUILD=${CUDA_BUILD_DIR:-$ROOT/target/cuda/release}
RESNET=$BUILD/resnet
SUMMARY=$(mktemp)
cd "$ROOT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' | tee -a "$SUMMARY"

# 1. Parity and gradient tests, every device variant (the *_cuda tests exist in CUDA
#    builds only).
for test in parity model io gradients; do
    bin=$(ls -t "$BUILD"/deps/$test-* 2>/dev/null | grep -v '\.d$' | head -n 1)
    if [ -z "$bin" ]; then
        echo "parity: no test binary '$test' (run scripts/build-cuda.sh)" | tee -a "$SUMMARY"
        continue
    fi
    result=$("$bin" 2>&1 | grep -E '^test result')
    echo "tests $test: $result" | tee -a "$SUMMARY"
done

# 2. Speed: resnet50, batch 1 / 8 / 64, f32 / f16 / bf16.
for dtype in f32 f16 bf16; do
    for batch in 1 8 64; do
        line=$("$RESNET" bench --device cuda --arch resnet50 --batch "$batch" --dtype "$dtype" --iters 20 --warmup 3 --json 2>&1 \
            | tr -d '\n ' | sed -E 's/.*"images_per_sec":([0-9.]+).*"median_ms":([0-9.]+).*/\2 ms, \1 images\/s/')
        echo "bench resnet50 $dtype batch $batch: $line" | tee -a "$SUMMARY"
    done
done

# 3. The CIFAR-10 evaluation on the GPU.
if [ -d "$SHARED/data/cifar10-test" ]; then
    for model in resnet20 resnet32; do
        line=$("$RESNET" eval --device cuda --model "$SHARED/weights/cifar10/$model.safetensors" \
            --data "$SHARED/data/cifar10-test" --batch-size 500 --json 2>&1 | tr -d '\n ' \
            | sed -E 's/.*"images_per_sec":([0-9.]+).*"top1":([0-9.]+).*/top-1 \2, \1 images\/s/')
        echo "eval $model: $line" | tee -a "$SUMMARY"
    done
else
    echo "eval: skipped, $SHARED/data/cifar10-test not found" | tee -a "$SUMMARY"
fi

# 4. Training on the device: one step's time, then two epochs of fine-tuning the
#    pretrained ResNet-20 on the 100 sample images (validated on them).
for case in "resnet20 128" "resnet50 16"; do
    set -- $case
    line=$("$RESNET" bench --device cuda --arch "$1" --batch "$2" --train --iters 10 --warmup 2 --json 2>&1 \
        | tr -d '\n ' | sed -E 's/.*"images_per_sec":([0-9.]+).*"median_ms":([0-9.]+).*/\2 ms, \1 images\/s/')
    echo "bench --train $1 batch $2: $line" | tee -a "$SUMMARY"
done
train_out=$(mktemp -d)
"$RESNET" train --device cuda --model "$ROOT/weights/resnet20.safetensors" --data "$ROOT/weights/samples" \
    --val "$ROOT/weights/samples" --epochs 2 --batch-size 50 --lr 0.01 --output "$train_out/model" --json 2>&1 \
    | tail -n 2 | sed 's/^/train: /' | tee -a "$SUMMARY"
rm -rf "$train_out"

echo
echo "== summary"
cat "$SUMMARY"
