#!/usr/bin/env python3
"""The main job's throughput side by side: `resnet eval` (JPEG decoding, preprocessing and
the forward pass, as a user runs it) against PyTorch's ImageFolder + DataLoader + model in
eval mode on the same images, the same threads. Two cases:

- the pretrained CIFAR-10 ResNet-20 on the 10,000 CIFAR-10 test JPEGs (32x32; ImageNet
  mean/std, no resize), batch 100;
- ResNet-50 (torchvision's, random weights saved as safetensors for both) on 224x224
  JPEGs made by `scripts/make_eval_jpegs.py` (resize 256, centre crop 224).

Both sides take `--batch` images per forward pass (100, `resnet eval`'s default).

PyTorch runs twice per case: decoding in the main process (`num_workers=0`) and in
`--threads` worker processes (DataLoader's usual setting); its compute threads are
`--threads` either way. Images per second; the best of `--rounds`.

    cargo build --release -p resnet-cli
    python scripts/make_eval_jpegs.py ../shared/data/cifar10-test /tmp/jpegs224 --count 500
    python benches/eval_throughput.py --jpegs224 /tmp/jpegs224 --threads 2
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from generate_parity import CifarResNet  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ours(model, data, threads, batch):
    out = subprocess.run([str(ROOT / "target" / "release" / "resnet"), "--threads", str(threads),
                          "eval", "--model", str(model), "--data", str(data), "--device", "cpu",
                          "--batch-size", str(batch), "--json"],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    return result["images"] / result["seconds"], result["top1"]


def pytorch(model, data, transform, threads, workers, batch):
    torch.set_num_threads(threads)
    loader = DataLoader(ImageFolder(str(data), transform), batch_size=batch, num_workers=workers)
    start, images, correct = time.perf_counter(), 0, 0
    with torch.inference_mode():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            images += len(y)
    return images / (time.perf_counter() - start), correct / images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-test")
    parser.add_argument("--weights", type=Path,
                        default=ROOT.parent / "shared" / "weights" / "cifar10" / "resnet20.safetensors")
    parser.add_argument("--jpegs224", type=Path, help="scripts/make_eval_jpegs.py's output (case skipped without)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100, help="images per forward pass, both sides")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    cifar = CifarResNet([3, 3, 3]).eval()
    cifar.load_state_dict({k.replace("fc.", "linear."): v for k, v in load_file(args.weights).items()})
    cases = [("resnet20, CIFAR-10 test (10,000 32x32 JPEGs)", args.weights, cifar, args.cifar,
              T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))] if not args.skip_cifar else []
    temp = tempfile.TemporaryDirectory()
    if args.jpegs224:
        torch.manual_seed(0)
        resnet50 = torchvision.models.resnet50(weights=None).eval()
        path = Path(temp.name) / "resnet50.safetensors"
        save_file({k: v.contiguous() for k, v in resnet50.state_dict().items()}, str(path))
        count = sum(1 for _ in args.jpegs224.rglob("*.jpg"))
        cases.append((f"resnet50, {count} 224x224 JPEGs", path, resnet50, args.jpegs224,
                      T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])))

    print(f"images/s, {args.threads} threads, batch {args.batch}, best of {args.rounds} "
          f"(torch {torch.__version__}, {platform.processor() or platform.machine()})")
    print(f"{'case':<48}{'ours':>9}{'torch w0':>10}{'torch w' + str(args.threads):>10}{'ratios':>16}")
    results = []
    for name, weights, model, data, transform in cases:
        best = {"ours": 0.0, "workers0": 0.0, f"workers{args.threads}": 0.0}
        top1 = {}
        for _ in range(args.rounds):
            speed, top1["ours"] = ours(weights, data, args.threads, args.batch)
            best["ours"] = max(best["ours"], speed)
            for workers in (0, args.threads):
                speed, top1[f"workers{workers}"] = pytorch(model, data, transform, args.threads, workers,
                                                           args.batch)
                best[f"workers{workers}"] = max(best[f"workers{workers}"], speed)
        w0, wn = best["workers0"], best[f"workers{args.threads}"]
        print(f"{name:<48}{best['ours']:>9.1f}{w0:>10.1f}{wn:>10.1f}"
              f"{best['ours'] / w0:>7.2f}x/{best['ours'] / wn:.2f}x  (top-1 {top1})", flush=True)
        results.append({"case": name, "images_per_sec": best, "top1": top1})
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "batch": args.batch, "cases": results}, indent=1))


if __name__ == "__main__":
    main()
