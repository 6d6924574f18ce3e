#!/usr/bin/env bash
# Checks that every GPU/BLAS feature of every workspace crate reaches candle-core and
# candle-nn (candle's own examples once shipped a `metal` feature that did not).
# Resolution only, nothing is compiled: runs anywhere, Metal included.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for crate in resnet-core resnet-io resnet-train resnet-cli resnet-tests resnet-benches; do
    for feature in cuda cudnn metal mkl accelerate; do
        for dep in candle-core candle-nn; do
            if cargo tree -q -e features -i "$dep" -p "$crate" --features "$feature" --target all 2>/dev/null \
                | grep -q "$dep feature \"$feature\""; then
                continue
            fi
            echo "MISSING: $crate --features $feature does not enable $dep/$feature"
            status=1
        done
    done
done
[ $status -eq 0 ] && echo "ok: cuda, cudnn, metal, mkl and accelerate reach candle-core and candle-nn from every crate"
exit $status
