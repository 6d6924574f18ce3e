#!/usr/bin/env python3
"""Side-by-side CPU inference: this crate (`resnet bench`), candle-transformers' ResNet-50,
PyTorch eager and ONNX Runtime (each where available), same machine, same thread count,
in one run; prints the ratios.

    cargo build --release -p resnet-cli
    cargo build --release -p resnet-benches --features peers   # candle-transformers column
    python benches/compare.py --threads 2 --iters 10 --rounds 3
    python benches/compare.py --train --threads 2 --iters 5 --rounds 3   # training steps
    python benches/compare.py --json docs/src/performance/inference-zen3.json   # + results as JSON

--json FILE also writes the results (the CPU's model name and instruction sets, threads,
each case's medians and every round) for `scripts/perf_charts.py`, which draws the
performance chapter's charts from them.

With --train, one full training step per measurement instead (train-mode forward,
cross-entropy, backward, SGD with momentum 0.9 and weight decay 1e-4): `resnet bench
--train` against PyTorch eager's `F.cross_entropy(model(x), y).backward(); opt.step()`,
on CIFAR ResNet-20 at batch 128 and ResNet-50 at batch 16.

Each case is measured in rounds, every engine once per round in turn (median of --iters
runs after 2 warm-up runs), and each engine's result is the median over the rounds: a
slow spell of this shared machine then hits all engines alike rather than one. Each
measurement starts after --pause seconds idle, since thread pools that spin after a
run (ONNX Runtime's, OpenMP's) would otherwise slow down the next engine.

Needs torch and torchvision for the PyTorch column and for the ONNX export; onnxruntime
and onnx for the ONNX Runtime column. candle-transformers has no CIFAR ResNet: its column
is empty for resnet20. Weights are random (speed does not depend on them).
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
CASES = [("resnet50", 1, 224), ("resnet50", 8, 224), ("resnet20", 128, 32),
         ("resnext50_32x4d", 1, 224), ("resnext50_32x4d", 8, 224),
         # timm's ResNet-D and SE-ResNeXt (PyTorch and ONNX Runtime run timm's models).
         ("resnet50d", 1, 224), ("resnet50d", 8, 224),
         ("seresnext50_32x4d", 1, 224), ("seresnext50_32x4d", 8, 224),
         # timm's pre-activation ResNet.
         ("resnetv2_50", 1, 224), ("resnetv2_50", 8, 224)]
TRAIN_CASES = [("resnet20", 128, 32), ("resnet50", 16, 224)]


# Multiply-adds per image of each (arch, size), as `resnet bench --json` counts them.
MULTIPLY_ADDS = {}


def run_json(command, env=None, key=None):
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout)
    if key is not None and "multiply_adds_per_image" in result:
        MULTIPLY_ADDS[key] = result["multiply_adds_per_image"]
    return result["median_ms"]


def ours(arch, batch, size, args):
    binary = os.path.join(ROOT, "target", "release", "resnet")
    command = [binary, "bench", "--arch", arch, "--batch", str(batch), "--iters", str(args.iters),
               "--threads", str(args.threads), "--device", "cpu", "--json"]
    if args.train:
        command += ["--train", "--warmup", "1"]
    env = dict(os.environ)
    if args.isa:
        # Our blocked kernels on this instruction set (RESNET_CPU_ISA); the peers run
        # whatever they pick (AVX-512 here).
        env["RESNET_CPU_ISA"] = args.isa
        return lambda: run_json(command, env, key=(arch, size))
    return lambda: run_json(command, key=(arch, size))


def candle_transformers(arch, batch, size, args):
    if arch != "resnet50":
        raise ValueError("candle-transformers has no CIFAR ResNet")
    binary = os.path.join(ROOT, "target", "release", "candle-transformers-resnet")
    if not os.path.exists(binary):
        raise FileNotFoundError(f"{binary}: cargo build --release -p resnet-benches --features peers")
    return lambda: run_json([binary, str(batch), str(args.iters), str(args.threads)])


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
    import torchvision

    if arch == "resnet20":
        sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
        from generate_parity import CifarResNet

        return CifarResNet([3, 3, 3]).eval()
    if hasattr(torchvision.models, arch):
        return getattr(torchvision.models, arch)().eval()
    import timm

    return timm.create_model(arch, pretrained=False).eval()


def pytorch(arch, batch, size, args):
    import torch

    torch.set_num_threads(args.threads)
    model = torch_model(arch)
    x = torch.randn(batch, 3, size, size)

    if args.train:
        model.train()
        labels = torch.randint(0, 10 if arch == "resnet20" else 1000, (batch,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), labels).backward()
            opt.step()

        return lambda: median_ms(step, args.iters, warmup=1)

    def measure():
        with torch.inference_mode():
            return median_ms(lambda: model(x), args.iters)

    return measure


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
    return lambda: median_ms(lambda: session.run(None, feed), args.iters)


def cpu_name():
    """The CPU's model name and microarchitecture family, from /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU"
    flags = fields.get("flags", "").split()
    if fields.get("cpu family") == "25":  # AMD family 19h: Zen 4 added AVX-512 to Zen 3
        family = "Zen 4" if "avx512f" in flags else "Zen 3"
    else:
        family = {"26": "Zen 5", "23": "Zen/Zen 2"}.get(fields.get("cpu family", ""))
    name = fields.get("model name", "unknown CPU")
    return f"{name} ({family})" if family and "AMD" in name else name


def cpu_ghz():
    """The nominal clock in GHz from /proc/cpuinfo's "cpu MHz", or None."""
    try:
        with open("/proc/cpuinfo") as info:
            mhz = next((line.split(":", 1)[1] for line in info if line.startswith("cpu MHz")), None)
        return float(mhz) / 1000 if mhz else None
    except (OSError, ValueError):
        return None


def cpu_simd():
    """The vector instruction sets the CPU reports that our kernels care about."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]


ENGINES = [("ours", ours), ("candle-tf", candle_transformers), ("pytorch", pytorch),
           ("ort", onnxruntime)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds of idle machine before each measurement")
    parser.add_argument("--isa", default=None,
                        help="force our kernels' instruction set: scalar, avx2, avx512 or neon")
    parser.add_argument("--train", action="store_true",
                        help="time training steps (ours and PyTorch) instead of inference")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the results as JSON (for scripts/perf_charts.py)")
    parser.add_argument("--cases", default="all",
                        help="comma-separated subset, e.g. resnet50b1,resnet20b128 (default: all)")
    args = parser.parse_args()
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    engines = [(name, setup) for name, setup in ENGINES if name in ("ours", "pytorch")] \
        if args.train else ENGINES
    peers = [name for name, _ in engines[1:]]
    what = "training step" if args.train else "batch"
    isa = f", ours on {args.isa}" if args.isa else ""
    print(f"median ms per {what}, f32, {args.threads} threads, median of {args.rounds} rounds{isa}")
    print(f"{'case':<16}{'ours':>9}" + "".join(f"{name:>11}" for name in peers)
          + "".join(f"{name + '/ours':>16}" for name in peers))
    cases = []
    # Zen 3 and Zen 4 both do two 8-wide FMAs a cycle per core (Zen 4's AVX-512 in
    # halves): 32 FLOP/cycle; the clock is /proc/cpuinfo's nominal one (boost runs above).
    peak = args.threads * 32 * cpu_ghz() if cpu_ghz() else None
    for arch, batch, size in TRAIN_CASES if args.train else CASES:
        if wanted is not None and f"{arch}b{batch}" not in wanted:
            continue
        measures = {}
        for name, setup in engines:
            try:
                measures[name] = setup(arch, batch, size, args)
            except Exception as error:  # not installed, or export failed: leave the column empty
                print(f"  ({name} skipped: {error.__class__.__name__}: {error})", file=sys.stderr)
        results = {name: [] for name in measures}
        for _ in range(args.rounds):
            for name, measure in measures.items():
                # ONNX Runtime's and PyTorch's thread pools spin for a while after a
                # run: let them go idle so that they do not slow whichever runs next.
                time.sleep(args.pause)
                results[name].append(measure())
        row = {name: statistics.median(times) for name, times in results.items()}
        macs = MULTIPLY_ADDS.get((arch, size))
        # FLOP rate of each engine on the same work (2 per multiply-add; a training step
        # counted as 3 forward passes), and its fraction of the cores' FMA peak.
        passes = 3 if args.train else 1
        gflops = {name: 2 * passes * macs * batch / (ms / 1e3) / 1e9
                  for name, ms in row.items()} if macs else {}
        cases.append({"arch": arch, "batch": batch, "size": size, "median_ms": row,
                      "rounds_ms": results, "multiply_adds_per_image": macs,
                      "gflops_per_sec": gflops,
                      "fraction_of_peak": {name: g / peak for name, g in gflops.items()}
                      if peak else {}})
        cell = lambda v: f"{v:.1f}" if v else "-"
        ratio = lambda v: f"{v / row['ours']:.2f}x" if v else "-"
        print(f"{arch + ' b' + str(batch):<16}{cell(row['ours']):>9}"
              + "".join(f"{cell(row.get(name)):>11}" for name in peers)
              + "".join(f"{ratio(row.get(name)):>16}" for name in peers), flush=True)
    print("ratio > 1: this crate is faster (the other takes that many times longer)")
    if peak:
        print(f"fraction of the FMA peak ({peak:.0f} GFLOP/s: {args.threads} threads x 32 FLOP/cycle"
              f" x {cpu_ghz():.2f} GHz nominal):")
        for case in cases:
            fractions = "  ".join(f"{name} {f:.0%}" for name, f in case["fraction_of_peak"].items())
            print(f"  {case['arch']} b{case['batch']}: {fractions}")
    if args.json:
        report = {"mode": "train" if args.train else "inference", "cpu": cpu_name(),
                  "peak_gflops": peak,
                  "cpu_flags": cpu_simd(), "ours_isa": args.isa or "auto",
                  "threads": args.threads, "iters": args.iters, "rounds": args.rounds,
                  "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                  "cases": cases}
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
            out.write("\n")


if __name__ == "__main__":
    main()
