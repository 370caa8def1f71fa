"""The paper's training settings as registered recipes and schedules (``docs/polarization.md``).

Schedules (per epoch; the paper's ImageNet cosine is per iteration, approximated per epoch here):

* ``warmup-multistep``: ×0.1 during epoch 0, then ``gamma ** #{m ≤ e}``: the CIFAR sparsity schedule
  0.01 → 0.1 @1 → ×0.2 @60, 120, 160.
* ``polarization-ft-resnet`` / ``polarization-ft-vgg``: the README fine-tune steps, factors
  (1, ½, ¼, 1/10) and (1, ½, 1/5) at the recipe's milestones.
* ``cosine-warmup``: linear warm-up over ``step_size`` epochs, then cosine to 0 (MobileNetV2).

Recipes (``prunekit train --recipe NAME``): ``polarization-cifar`` (ResNet-56 / VGG-16 sparsity
training, README: batch 64, wd 5e-4 incl. BN), ``polarization-cifar-finetune-resnet``,
``polarization-cifar-finetune-vgg``, ``polarization-imagenet-resnet50`` (+ ``-finetune``),
``polarization-imagenet-mobilenetv2`` (+ ``-finetune``), and the CPU-sized ``polarization-fmnist``
(+ ``-finetune``) used by the Fashion-MNIST study. The studies built from them
(``prunekit reproduce polarization-resnet56-cifar10`` ...) live in :mod:`prunekit.studies.polarization`.

The recipe and schedule registries import this module on their first lookup, so
``get_recipe("polarization-cifar")`` works without importing :mod:`prunekit.polarization` first.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ..optim import SCHEDULES, register_schedule
from ..recipes import RECIPES, TrainRecipe, register_recipe

__all__ = ["RECIPE_DEFS"]


@dataclass
class _WarmupMultiStep:
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, epoch: int) -> float:
        if epoch < 1:
            return 0.1
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)


@dataclass
class _Piecewise:
    milestones: tuple[int, ...]
    factors: tuple[float, ...]

    def __call__(self, epoch: int) -> float:
        return self.factors[min(bisect.bisect_right(self.milestones, epoch), len(self.factors) - 1)]


@dataclass
class _CosineWarmup:
    epochs: int
    warmup: int

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return (epoch + 1) / self.warmup
        span = max(self.epochs - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch - self.warmup, span) / span))


def _register_schedules() -> None:
    if "warmup-multistep" in SCHEDULES:
        return
    register_schedule("warmup-multistep",
                      lambda *, epochs, step_size, milestones, gamma: _WarmupMultiStep(tuple(milestones), gamma))
    register_schedule("polarization-ft-resnet",
                      lambda *, epochs, step_size, milestones, gamma: _Piecewise(tuple(milestones), (1, .5, .25, .1)))
    register_schedule("polarization-ft-vgg",
                      lambda *, epochs, step_size, milestones, gamma: _Piecewise(tuple(milestones), (1, .5, .2)))
    register_schedule("cosine-warmup",
                      lambda *, epochs, step_size, milestones, gamma: _CosineWarmup(epochs, step_size))


_register_schedules()

_SGD = {"optimizer": "sgd", "momentum": 0.9}
RECIPE_DEFS: dict[str, TrainRecipe] = {
    # CIFAR sparsity training (README; the paper says batch 128, the run commands give the code default 64).
    "polarization-cifar": TrainRecipe(epochs=200, batch_size=64, lr=0.1, weight_decay=5e-4,
                                      schedule="warmup-multistep", milestones=(60, 120, 160), gamma=0.2, **_SGD),
    "polarization-cifar-finetune-resnet": TrainRecipe(epochs=200, batch_size=64, lr=1e-3, weight_decay=5e-4,
                                                      schedule="polarization-ft-resnet", milestones=(30, 80, 150),
                                                      **_SGD),
    "polarization-cifar-finetune-vgg": TrainRecipe(epochs=200, batch_size=64, lr=5e-4, weight_decay=5e-4,
                                                   schedule="polarization-ft-vgg", milestones=(60, 150), **_SGD),
    "polarization-imagenet-resnet50": TrainRecipe(epochs=120, batch_size=512, lr=0.1, weight_decay=1e-4,
                                                  schedule="multistep", milestones=(40, 80), gamma=0.1, **_SGD),
    "polarization-imagenet-resnet50-finetune": TrainRecipe(epochs=128, batch_size=512, lr=0.05, weight_decay=1e-4,
                                                           schedule="cosine", **_SGD),
    "polarization-imagenet-mobilenetv2": TrainRecipe(epochs=256, batch_size=1024, lr=0.4, weight_decay=4e-5,
                                                     schedule="cosine-warmup", step_size=5, **_SGD),
    "polarization-imagenet-mobilenetv2-finetune": TrainRecipe(epochs=256, batch_size=1024, lr=0.05,
                                                              weight_decay=4e-5, schedule="cosine", **_SGD),
    # CPU-sized Fashion-MNIST study (ours): short cosine runs, wd on every parameter as the CIFAR runs.
    "polarization-fmnist": TrainRecipe(epochs=5, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine",
                                       **_SGD),
    "polarization-fmnist-finetune": TrainRecipe(epochs=3, batch_size=128, lr=0.01, weight_decay=5e-4,
                                                schedule="cosine", **_SGD),
}
for _name, _recipe in RECIPE_DEFS.items():
    if _name not in RECIPES:
        register_recipe(_name, _recipe)

