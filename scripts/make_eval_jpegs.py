#!/usr/bin/env python3
"""Larger JPEGs for timing `resnet eval` at ImageNet sizes: CIFAR-10 test images upscaled
(Pillow bicubic) to SIZE x SIZE and saved as JPEG (quality 90) in the same ImageFolder
layout, the classes taken in turn so that they stay balanced. Deterministic: the same
files in, the same files out.

    python scripts/make_eval_jpegs.py ../shared/data/cifar10-test /tmp/jpegs224 --count 500
"""
import argparse
from pathlib import Path

from PIL import Image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an ImageFolder tree of JPEGs (CIFAR-10's test set)")
    parser.add_argument("out", type=Path, help="where to write the tree (created)")
    parser.add_argument("--count", type=int, default=500, help="images in all")
    parser.add_argument("--size", type=int, default=224, help="side of the square images")
    args = parser.parse_args()
    classes = sorted(p for p in args.source.iterdir() if p.is_dir())
    if not classes:
        parser.error(f"{args.source}: no class folders")
    files = {c.name: sorted(c.glob("*.jpg")) + sorted(c.glob("*.png")) for c in classes}
    written = 0
    for index in range(args.count):
        name = classes[index % len(classes)].name
        taken = index // len(classes)
        if taken >= len(files[name]):
            break
        source = files[name][taken]
        target = args.out / name / (source.stem + ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            image.convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(target, quality=90)
        written += 1
    print(f"{written} images of {args.size}x{args.size} in {args.out}")


if __name__ == "__main__":
    main()
