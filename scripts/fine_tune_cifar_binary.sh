#!/usr/bin/env bash
# Fine-tuning the pretrained CIFAR-10 ResNet-20 of ../shared on a new two-class task,
# "animal" against "vehicle" (the CIFAR-10 classes regrouped: airplane, automobile, ship,
# truck are vehicles), with a small training set: the first PER_CLASS training JPEGs of
# each CIFAR-10 class (default 250: 2,500 images), validated on all 10,000 test JPEGs.
# Three runs of EPOCHS epochs (default 3), the default recipe otherwise (SGD, momentum
# 0.9, weight decay 1e-4, cosine, CIFAR augmentation, batch 128):
#   1. frozen backbone, new 2-class head only (lr 0.1);
#   2. the whole network fine-tuned (lr 0.01);
#   3. the same network from scratch (lr 0.1), for comparison.
# Usage: scripts/fine_tune_cifar_binary.sh WORKDIR [PER_CLASS] [EPOCHS]
set -euo pipefail
work=${1:?usage: $0 WORKDIR [PER_CLASS] [EPOCHS]}
per_class=${2:-250}
epochs=${3:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
shared=$root/../shared
resnet=$root/target/release/resnet
[ -x "$resnet" ] || (cd "$root" && cargo build --release -p resnet-cli)

group() { case $1 in airplane|automobile|ship|truck) echo vehicle ;; *) echo animal ;; esac; }
rm -rf "$work/train" "$work/test"
for class in $(ls "$shared/data/cifar10-train"); do
  to=$(group "$class")
  mkdir -p "$work/train/$to" "$work/test/$to"
  for f in $(ls "$shared/data/cifar10-train/$class" | head -n "$per_class"); do
    cp "$shared/data/cifar10-train/$class/$f" "$work/train/$to/$class-$f"
  done
  for f in $(ls "$shared/data/cifar10-test/$class"); do
    cp "$shared/data/cifar10-test/$class/$f" "$work/test/$to/$class-$f"
  done
done

pretrained=$shared/weights/cifar10/resnet20.safetensors
common=(--data "$work/train" --val "$work/test" --epochs "$epochs" --json)
set -x
"$resnet" train --model "$pretrained" --freeze-backbone --lr 0.1 "${common[@]}" --output "$work/frozen"
"$resnet" train --model "$pretrained" --lr 0.01 "${common[@]}" --output "$work/full"
"$resnet" train --arch resnet20 --num-classes 2 --lr 0.1 "${common[@]}" --output "$work/scratch"
