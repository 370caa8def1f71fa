"""The paper's training settings as registered recipes and schedules (spec/polarization.md §5.4).

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
(+ ``-finetune``) used by the Fashion-MNIST study. The GPU studies built from them are registered at
the bottom (``prunekit reproduce polarization-resnet56-cifar10`` ...).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ..optim import SCHEDULES, register_schedule
from ..recipes import RECIPES, TrainRecipe, register_recipe
from ..reproduce import STUDIES, StudyOptions, register_study

__all__ = ["PAPER_STUDIES"]


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


# ----------------------------------------------------------------------------------------------
# GPU studies: the paper's Tables 1-2 rows, same pipeline as the Fashion-MNIST study


def _paper_studies():
    from dataclasses import replace

    from .studies import StudySpec

    cifar = {"baseline_recipe": "cifar", "sparse_recipe": "polarization-cifar", "bn_init": 0.5}
    resnet56 = StudySpec(model="resnet56", dataset="cifar10", lam=5e-5, t=1.4, preset="resnet-cifar",
                         finetune_recipe="polarization-cifar-finetune-resnet",
                         paper={"accuracy": 93.83, "macs_reduction": 0.47, "baseline": 93.80}, **cifar)
    vgg16 = StudySpec(model="vgg16", dataset="cifar10", lam=3e-5, t=1.5, preset="vgg16",
                      finetune_recipe="polarization-cifar-finetune-vgg",
                      paper={"accuracy": 93.92, "macs_reduction": 0.54, "baseline": 93.88}, **cifar)

    def on_cifar100(spec: StudySpec, accuracy: float, macs_reduction: float, baseline: float) -> StudySpec:
        return replace(spec, dataset="cifar100", paper={
            "accuracy": accuracy, "macs_reduction": macs_reduction, "baseline": baseline,
            "note": "CIFAR-100 (λ, t) are not documented; the CIFAR-10 values are used"})

    return {
        "polarization-resnet56-cifar10": resnet56,
        "polarization-resnet56-cifar100": on_cifar100(resnet56, 72.46, 0.25, 72.49),
        "polarization-vgg16-cifar10": vgg16,
        "polarization-vgg16-cifar100": on_cifar100(vgg16, 74.25, 0.43, 73.83),
        "polarization-resnet50-imagenet": StudySpec(
            model="resnet50", dataset="imagenet", lam=8e-5, t=1.2, preset="resnet50", bn_init=0.5,
            baseline_recipe="imagenet", sparse_recipe="polarization-imagenet-resnet50",
            finetune_recipe="polarization-imagenet-resnet50-finetune",
            paper={"accuracy": 75.63, "macs_reduction": 0.54, "baseline": 76.15}),
        "polarization-mobilenetv2-imagenet": StudySpec(
            model="mobilenetv2", dataset="imagenet", lam=2.5e-5, t=1.0, preset="mobilenetv2-gates", bn_init=1.0,
            gates=True, bn_weight_decay=False, baseline_recipe="imagenet",
            sparse_recipe="polarization-imagenet-mobilenetv2",
            finetune_recipe="polarization-imagenet-mobilenetv2-finetune",
            paper={"accuracy": 71.8, "macs_reduction": 0.28, "baseline": 72.0}),
    }


PAPER_STUDIES = ("polarization-resnet56-cifar10", "polarization-resnet56-cifar100", "polarization-vgg16-cifar10",
                 "polarization-vgg16-cifar100", "polarization-resnet50-imagenet", "polarization-mobilenetv2-imagenet")


def _make_study(name: str):
    def study(options: StudyOptions):
        from .studies import run_study

        return run_study(_paper_studies()[name], options, title=name)

    study.__name__ = name.replace("-", "_")
    study.__doc__ = f"Polarization paper study '{name}' (GPU-sized; --epochs/--finetune-epochs shorten it)."
    return study


for _study in PAPER_STUDIES:
    if _study not in STUDIES:
        register_study(_study)(_make_study(_study))
