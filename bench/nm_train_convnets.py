"""Train the two conv nets of the Neuron Merging conv benchmark on Fashion-MNIST (CPU-sized).

The models are the 1-channel, 28×28 variants of the zoo's CIFAR nets:

* ``resnet20``: ``create("resnet20", in_channels=1, input_size=28, shortcut="B")`` (full width 16/32/64;
  option-B 1×1 conv shortcuts as in Neuron Merging's ResNet-56),
* ``vgg16``: ``create("vgg16", in_channels=1, input_size=28, widths=<VGG-16 widths / 4>, fc_width=128)``
  (a quarter-width VGG-16: the full one costs ~12 min per epoch on this CPU).

Recipe ``nm-fmnist-cpu`` (both models): SGD momentum 0.9, lr 0.05, cosine schedule, weight decay 5e-4,
batch 128, no augmentation; resnet20 4 epochs, vgg16 5 epochs. One torch thread (faster than two on
a shared 2-core machine). Checkpoints go to ``runs/nm-fmnist/<model>/`` (git-ignored) and are reused
by ``bench/nm_convnets.py``; an existing checkpoint is not retrained unless ``--force``.

    .venv/bin/python bench/nm_train_convnets.py [--models resnet20 vgg16] [--force]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import ROOT

from prunekit.data import get_dataset
from prunekit.models import create
from prunekit.recipes import TrainRecipe
from prunekit.train import seed_everything, train

RUNS = ROOT / "runs" / "nm-fmnist"
VGG16_QUARTER = [w // 4 for w in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)]

#: name -> (zoo name, model cfg, epochs)
MODELS = {
    "resnet20": ("resnet20", {"in_channels": 1, "input_size": 28, "shortcut": "B"}, 4),
    "vgg16": ("vgg16", {"in_channels": 1, "input_size": 28, "widths": VGG16_QUARTER, "fc_width": 128}, 5),
}


def recipe(epochs: int) -> TrainRecipe:
    return TrainRecipe(epochs=epochs, batch_size=128, test_batch_size=256, optimizer="sgd", lr=0.05,
                       momentum=0.9, weight_decay=5e-4, schedule="cosine", name="nm-fmnist-cpu")


def checkpoint_dir(name: str) -> Path:
    return RUNS / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set = get_dataset("fashion-mnist", "train")
    test_set = get_dataset("fashion-mnist", "test")
    for name in args.models:
        zoo, cfg, epochs = MODELS[name]
        out = checkpoint_dir(name)
        if (out / "model.safetensors").exists() and not args.force:
            print(f"{name}: {out} exists, skipped (use --force)")
            continue
        seed_everything(args.seed)
        start = time.perf_counter()
        result = train(create(zoo, **cfg), train_set, test_set, recipe(epochs), out_dir=out, seed=args.seed,
                       progress=False, metadata={"dataset": "fashion-mnist"})
        minutes = (time.perf_counter() - start) / 60
        summary = {"model": name, "zoo": zoo, "config": cfg, "epochs": epochs, "recipe": recipe(epochs).to_dict(),
                   "accuracy": result.accuracy, "params": result.params, "minutes": round(minutes, 2)}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        print(f"{name}: {result.accuracy:.2f} % after {epochs} epochs in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
