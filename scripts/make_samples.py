#!/usr/bin/env python3
"""Regenerates weights/samples/ and weights/samples.json from ../shared (stdlib only).

weights/samples/ holds the first PER_CLASS images of each class of the CIFAR-10 test set
(../shared/data/cifar10-test, JPEG copies of Krizhevsky's CIFAR-10), so that the README's
first command runs on a clone with nothing beside it. weights/samples.json holds what
PyTorch predicts for them with the pretrained ResNet-20 embedded in the `resnet` binary
(weights/resnet20.safetensors), taken from ../shared/reference/cifar10-test-predictions.json
(PyTorch 2.15, eval mode, float32, Pillow's JPEG decoder).

    python scripts/make_samples.py
"""
import json
import shutil
from pathlib import Path

PER_CLASS = 10
ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def main():
    test_set = SHARED / "data" / "cifar10-test"
    reference = json.loads((SHARED / "reference" / "cifar10-test-predictions.json").read_text())
    classes = reference["classes"]
    all_predictions = reference["models"]["resnet20"]["predictions"]
    out = ROOT / "weights" / "samples"
    if out.exists():
        shutil.rmtree(out)
    predictions = {}
    for name in classes:
        (out / name).mkdir(parents=True)
        for image in sorted((test_set / name).iterdir())[:PER_CLASS]:
            shutil.copyfile(image, out / name / image.name)
            key = f"{name}/{image.name}"
            predictions[key] = all_predictions[key]
    hits = sum(classes[predictions[k]] == k.split("/")[0] for k in predictions)
    summary = {
        "source": "../shared/reference/cifar10-test-predictions.json (PyTorch 2.15, eval mode, float32, Pillow)",
        "model": "resnet20 (weights/resnet20.safetensors)",
        "classes": classes,
        "top1": hits / len(predictions),
        "predictions": predictions,
    }
    (ROOT / "weights" / "samples.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(predictions)} images, PyTorch top-1 {hits}/{len(predictions)}")


if __name__ == "__main__":
    main()
