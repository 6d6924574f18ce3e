#!/usr/bin/env python3
"""Converts a PyTorch checkpoint (.pth / .pt / .th: a state_dict, or a dict holding one
under "state_dict" or "model") to safetensors, unchanged: same names, same dtypes, the
DataParallel "module." prefix removed. Needs torch and safetensors (pip install torch
safetensors); the result loads with `resnet ... --model OUT.safetensors`.

    python scripts/convert_pth.py resnet50-0676ba61.pth resnet50.safetensors
"""
import sys

import torch
from safetensors.torch import save_file


def main(src: str, dst: str):
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    tensors = {
        name.removeprefix("module."): tensor.contiguous()
        for name, tensor in checkpoint.items()
        if isinstance(tensor, torch.Tensor)
    }
    save_file(tensors, dst, metadata={"format": "pt", "converted_from": src.rsplit("/", 1)[-1]})
    print(f"{dst}: {len(tensors)} tensors")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
