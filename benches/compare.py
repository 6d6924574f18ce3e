#!/usr/bin/env python3
"""Side-by-side CPU inference: this crate (`resnet bench`), PyTorch eager and ONNX Runtime
(each where installed), same machine, same thread count, in one run; prints the ratios.

    cargo build --release -p resnet-cli
    python benches/compare.py --threads 2 --iters 10

Needs torch and torchvision for the PyTorch column and for the ONNX export; onnxruntime
and onnx for the ONNX Runtime column. Weights are random (speed does not depend on them).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("resnet50", 1, 224), ("resnet50", 8, 224), ("resnet20", 128, 32)]


def ours(arch, batch, args):
    binary = os.path.join(ROOT, "target", "release", "resnet")
    out = subprocess.run(
        [binary, "bench", "--arch", arch, "--batch", str(batch), "--iters", str(args.iters),
         "--threads", str(args.threads), "--device", "cpu", "--json"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)["median_ms"]


def median_ms(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_model(arch):
    import torch
    import torchvision

    if arch == "resnet20":
        sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
        from generate_parity import CifarResNet

        return CifarResNet([3, 3, 3]).eval()
    return getattr(torchvision.models, arch)().eval()


def pytorch(arch, batch, size, args):
    import torch

    torch.set_num_threads(args.threads)
    model = torch_model(arch)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        return median_ms(lambda: model(x), args.iters)


def onnxruntime(arch, batch, size, args):
    import numpy as np
    import onnxruntime as ort
    import torch

    model = torch_model(arch)
    x = torch.randn(batch, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (x,), path, input_names=["x"], dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy().astype(np.float32)}
        return median_ms(lambda: session.run(None, feed), args.iters)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cases", default="all",
                        help="comma-separated subset, e.g. resnet50b1,resnet20b128 (default: all)")
    args = parser.parse_args()
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    print(f"median ms per batch, f32, {args.threads} threads")
    print(f"{'case':<22}{'ours':>9}{'pytorch':>10}{'ort':>9}{'pytorch/ours':>14}{'ort/ours':>10}")
    for arch, batch, size in CASES:
        if wanted is not None and f"{arch}b{batch}" not in wanted:
            continue
        row = {"ours": ours(arch, batch, args)}
        for name, fn in [("pytorch", pytorch), ("ort", onnxruntime)]:
            try:
                row[name] = fn(arch, batch, size, args)
            except Exception as error:  # not installed, or export failed: leave the column empty
                print(f"  ({name} skipped: {error.__class__.__name__}: {error})", file=sys.stderr)
                row[name] = None
        cell = lambda v: f"{v:9.1f}" if v else f"{'-':>9}"
        ratio = lambda v: f"{v / row['ours']:.2f}x" if v else "-"
        print(f"{arch + ' b' + str(batch):<22}{cell(row['ours'])}{cell(row['pytorch']):>10}{cell(row['ort'])}"
              f"{ratio(row['pytorch']):>14}{ratio(row['ort']):>10}")
    print("ratio > 1: this crate is faster (the other takes that many times longer)")


if __name__ == "__main__":
    main()
