#!/usr/bin/env python3
"""PyTorch's run of `resnet train`'s default recipe, for the side-by-side numbers of the
training issue: a CIFAR ResNet-20 (Idelbayev's definition, option A) from scratch on an
ImageFolder tree of CIFAR-10 JPEGs, SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch
128, cosine to zero stepped per iteration, augmentation pad 4 + random 32x32 crop +
horizontal flip, ImageNet mean/std, He-normal initialisation; test top-1 after every epoch. One JSON line per
epoch, as `resnet train --json`.

    ../venv/bin/python scripts/train_cifar_reference.py ../shared/data/cifar10-train \\
        ../shared/data/cifar10-test --epochs 3 --threads 2
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from generate_parity import CifarResNet  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("train")
    parser.add_argument("test")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = ImageFolder(args.train, T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]))
    test = ImageFolder(args.test, T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, num_workers=0)
    test_loader = torch.utils.data.DataLoader(test, batch_size=500, num_workers=0)
    model = CifarResNet([3, 3, 3])
    # The initialisation of Idelbayev's resnet_cifar.py and of `resnet train`'s
    # `seeded_init`: He-normal (fan in) for every convolution and the classifier's weight;
    # PyTorch's default elsewhere. (PyTorch's own default for the layers trains slower.)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    total = args.epochs * len(loader)
    step = 0
    for epoch in range(args.epochs):
        started = time.time()
        model.train()
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            step += 1
        model.eval()
        top1 = top5 = count = 0
        with torch.no_grad():
            for x, y in test_loader:
                best = model(x).topk(5, dim=1).indices
                top1 += (best[:, 0] == y).sum().item()
                top5 += (best == y[:, None]).any(dim=1).sum().item()
                count += len(y)
        print(json.dumps({"epoch": epoch + 1, "train_loss": loss_sum / seen, "val_top1": top1 / count,
                          "val_top5": top5 / count, "seconds": time.time() - started}), flush=True)


if __name__ == "__main__":
    main()
