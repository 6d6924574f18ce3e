#!/usr/bin/env python3
"""Writes imagenet1k_labels.txt: the 1000 ImageNet-1k class names in index order, as
torchvision ships them (ResNet50_Weights.IMAGENET1K_V2.meta["categories"]).

Run from the repository root: python crates/resnet-io/data/generate_imagenet_labels.py
"""
import os

from torchvision.models import ResNet50_Weights

names = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
assert len(names) == 1000
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet1k_labels.txt")
with open(path, "w") as f:
    f.write("\n".join(names) + "\n")
print(path)
