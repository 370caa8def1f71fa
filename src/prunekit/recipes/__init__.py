"""Training recipes: one frozen, validated dataclass per paper experiment, looked up by name.

    >>> r = get_recipe("lenet").replace(epochs=5)
    >>> opt = r.build_optimizer(model.parameters()); sched = r.build_schedule(opt)

``optimizer_kwargs`` carries what only some optimizers take (gRDA's ``c`` and ``mu``, Adam's
``betas``). The shared fields ``momentum``, ``nesterov`` and ``weight_decay`` are passed to the
optimizer when it accepts them; an optimizer that does not (gRDA, Adam for momentum) must see them at
their neutral value (0 / False), so a recipe never silently drops a setting.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..optim import SCHEDULES, create_optimizer, create_schedule, optimizer_arguments
from ..registry import Registry

__all__ = ["RECIPES", "TrainRecipe", "default_recipe_for", "get_recipe", "list_recipes", "register_recipe"]

# Fields the optimizer receives from the recipe itself (never through optimizer_kwargs), with the
# value that means "off" for optimizers that do not accept them.
_SHARED = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainRecipe:
    """Everything about *how* to train, nothing about *what* (model, data, seed).

    ``batch_size`` is the global batch: under DDP each of W ranks gets ``batch_size // W``.
    Epochs are 0-based for the schedule: lr at epoch ``e`` is ``lr * factor(e)`` (see
    :func:`prunekit.optim.create_schedule`).

    Step-level options (all off by default, so older recipes and checkpoints mean the same):

    * ``warmup_steps``: the lr is multiplied by ``min(1, (s + 1) / warmup_steps)`` at optimizer step ``s``
      (0-based, counted over the whole run).
    * ``schedule_per_step``: the schedule's factor is evaluated at the fractional epoch ``e + i / n`` at
      step ``i`` of the ``n`` steps of epoch ``e`` (a cosine decays smoothly within epochs).
    * ``grad_clip``: clip the global L2 norm of the gradients to this value before each step (0 = off).
    * ``label_smoothing``: of the default cross-entropy training loss (classification; evaluation uses the
      plain cross-entropy).
    * ``steps_per_epoch``: stop an epoch after this many optimizer steps (0 = the whole loader): a step
      budget on large token datasets; each epoch still draws its batches from a fresh seeded shuffle.
    """

    epochs: int = 10
    batch_size: int = 128
    test_batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_size: int = 30
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"
    warmup_steps: int = 0
    schedule_per_step: bool = False
    grad_clip: float = 0.0
    label_smoothing: float = 0.0
    steps_per_epoch: int = 0

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(self.milestones) if isinstance(self.milestones, (list, tuple))
                           else self.milestones)
        object.__setattr__(self, "optimizer_kwargs", dict(self.optimizer_kwargs)
                           if isinstance(self.optimizer_kwargs, dict) else self.optimizer_kwargs)
        for f in ("epochs", "batch_size", "test_batch_size", "step_size"):
            v = getattr(self, f)
            if not _is_int(v) or v <= 0:
                self._bad(f, "must be a positive integer")
        for f in ("warmup_steps", "steps_per_epoch"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 0:
                self._bad(f, "must be a non-negative integer (0 = off)")
        if not isinstance(self.schedule_per_step, bool):
            self._bad("schedule_per_step", "must be True or False")
        if not _is_num(self.grad_clip) or self.grad_clip < 0:
            self._bad("grad_clip", "must be a non-negative number (0 = off)")
        if not _is_num(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            self._bad("label_smoothing", "must be in [0, 1)")
        if not _is_num(self.lr) or self.lr <= 0:
            self._bad("lr", "must be a positive number")
        if not _is_num(self.momentum) or not 0 <= self.momentum < 1:
            self._bad("momentum", "must be in [0, 1)")
        if not isinstance(self.nesterov, bool):
            self._bad("nesterov", "must be True or False")
        if self.nesterov and self.momentum == 0:
            self._bad("nesterov", "needs momentum > 0")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            self._bad("weight_decay", "must be a non-negative number")
        if not _is_num(self.gamma) or self.gamma <= 0:
            self._bad("gamma", "must be a positive number")
        ms = self.milestones
        if not isinstance(ms, tuple) or not all(_is_int(m) and m > 0 for m in ms) or list(ms) != sorted(set(ms)):
            self._bad("milestones", "must be strictly increasing positive integers")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            self._bad("schedule", f"is not one of: {', '.join(SCHEDULES.names())}")
        if not isinstance(self.name, str):
            self._bad("name", "must be a string")
        self._check_optimizer()

    def _bad(self, name: str, why: str):
        raise ConfigError(f"recipe '{self.name}': {name}={getattr(self, name)!r} {why}")

    def _check_optimizer(self) -> None:
        from ..optim import OPTIMIZERS

        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            self._bad("optimizer", f"is not one of: {', '.join(OPTIMIZERS.names())}")
        if not isinstance(self.optimizer_kwargs, dict):
            self._bad("optimizer_kwargs", "must be a dict")
        accepted, var_kw = optimizer_arguments(self.optimizer)
        for k, v in self.optimizer_kwargs.items():
            if k == "lr" or k in _SHARED:
                raise ConfigError(f"recipe '{self.name}': optimizer_kwargs[{k!r}]={v!r}: set '{k}' as a recipe "
                                  f"field, not in optimizer_kwargs")
            if k not in accepted and not var_kw:
                raise ConfigError(f"recipe '{self.name}': optimizer_kwargs[{k!r}]={v!r} is not accepted by "
                                  f"optimizer '{self.optimizer}' (it accepts: {', '.join(sorted(accepted))})")
        for k, neutral in _SHARED.items():
            v = getattr(self, k)
            if k not in accepted and not var_kw and v != neutral:
                raise ConfigError(f"recipe '{self.name}': {k}={v!r} but optimizer '{self.optimizer}' has no "
                                  f"'{k}'; set {k}={neutral!r}")

    # ------------------------------------------------------------------ API

    def replace(self, **overrides: Any) -> TrainRecipe:
        """A copy with ``overrides`` applied and every field validated again.

        Raises:
            ConfigError: an unknown field, or an invalid value (names the field and the value).
        """
        known = {f.name for f in dataclasses.fields(self)}
        for k, v in overrides.items():
            if k not in known:
                raise ConfigError(f"recipe '{self.name}': unknown field {k}={v!r}; known fields: "
                                  f"{', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (milestones as a list)."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainRecipe:
        """Inverse of :meth:`to_dict`; unknown keys are a ConfigError."""
        return cls().replace(**d)

    def optimizer_config(self) -> dict[str, Any]:
        """Keyword arguments for :func:`prunekit.optim.create_optimizer` (``lr`` included)."""
        accepted, var_kw = optimizer_arguments(self.optimizer)
        kw: dict[str, Any] = {"lr": self.lr}
        kw.update({k: getattr(self, k) for k in _SHARED if k in accepted or var_kw})
        kw.update(self.optimizer_kwargs)
        return kw

    def build_optimizer(self, params: Iterable):
        """The recipe's optimizer over ``params``."""
        return create_optimizer(self.optimizer, params, **self.optimizer_config())

    def build_schedule(self, optimizer):
        """The recipe's per-epoch lr schedule (an :class:`prunekit.optim.EpochLR`) on ``optimizer``."""
        return create_schedule(self.schedule, optimizer, epochs=self.epochs, step_size=self.step_size,
                               milestones=self.milestones, gamma=self.gamma)

    def lr_at(self, epoch: int) -> float:
        """Learning rate the schedule gives at 0-based ``epoch`` (no optimizer needed; warm-up not applied)."""
        factor = SCHEDULES.get(self.schedule)(epochs=self.epochs, step_size=self.step_size,
                                             milestones=self.milestones, gamma=self.gamma)
        return self.lr * factor(epoch)

    @property
    def steps_lr_shaped(self) -> bool:
        """Whether the Trainer sets the lr at every step (warm-up or a per-step schedule)."""
        return self.warmup_steps > 0 or self.schedule_per_step


#: built-in recipes: this module's (LeNet, CIFAR, ImageNet, fast, gRDA) and Polarization's
RECIPES: Registry = Registry("recipe", builtins=("prunekit.polarization.recipes",))


def register_recipe(name: str, recipe: TrainRecipe | None = None, *, overwrite: bool = False):
    """Register a recipe under ``name`` (its ``name`` field is set to match)."""
    def add(r: TrainRecipe) -> TrainRecipe:
        return RECIPES.register(name, r.replace(name=name), overwrite=overwrite)

    return add(recipe) if recipe is not None else add


def get_recipe(name: str) -> TrainRecipe:
    """The registered recipe ``name`` (immutable; derive variants with ``.replace``)."""
    return RECIPES.get(name)


def list_recipes() -> list[str]:
    return RECIPES.names()


def default_recipe_for(model_name: str) -> TrainRecipe:
    """The paper recipe for a zoo model: LeNets → ``lenet``, CIFAR VGG/ResNet/WRN → ``cifar``,
    ResNet-50 / MobileNetV2 → ``imagenet``, the transformers ``vit-fmnist`` / ``llama-shakespeare`` → their
    namesakes, anything else → ``fast`` (the model registry reports unknown names)."""
    if model_name in ("vit-fmnist", "llama-shakespeare"):
        return get_recipe(model_name)
    if model_name.startswith("lenet"):
        return get_recipe("lenet")
    if model_name in ("resnet50", "mobilenetv2"):
        return get_recipe("imagenet")
    if model_name.startswith(("vgg", "resnet", "wrn")):
        return get_recipe("cifar")
    return get_recipe("fast")


# Neuron Merging, LeNet-300-100 on Fashion-MNIST: SGD 0.9, lr 0.1 ×0.1 every 15 epochs, 60 epochs.
register_recipe("lenet", TrainRecipe(
    epochs=60, batch_size=128, test_batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9,
    weight_decay=1e-4, schedule="step", step_size=15, gamma=0.1))

# CIFAR VGG/ResNet baselines: SGD 0.9, lr 0.1 ×0.1 at epochs 100 and 150, 200 epochs, wd 5e-4.
register_recipe("cifar", TrainRecipe(
    epochs=200, batch_size=128, test_batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9,
    weight_decay=5e-4, schedule="multistep", milestones=(100, 150), gamma=0.1))

# The standard ImageNet ResNet recipe: SGD 0.9, lr 0.1 ×0.1 every 30 epochs, 90 epochs, wd 1e-4, batch 256.
register_recipe("imagenet", TrainRecipe(
    epochs=90, batch_size=256, test_batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9,
    weight_decay=1e-4, schedule="step", step_size=30, gamma=0.1))

# A few CPU epochs for tests and demos.
register_recipe("fast", TrainRecipe(
    epochs=3, batch_size=64, test_batch_size=256, optimizer="sgd", lr=0.05, momentum=0.9,
    weight_decay=0.0, schedule="cosine"))

# gRDA (docs/grda.md, "Recipes"): plain SGD on the accumulator + soft-threshold; no momentum, no weight decay,
# hyper-parameters (c, mu) in optimizer_kwargs. "linear-hold" is the paper's CIFAR schedule: constant for
# the first half, linear to gamma·lr at 90 % of the epochs, then held (registered by prunekit.optim.grda).
# LeNet-300-100 / Fashion-MNIST on CPU (not in the paper; bench/grda_lenet.py): lr 0.2 is plain SGD's best
# of {0.2, 0.3 (3 seeds each), 0.5 (1 seed)}; c/mu: the best ≥ 90 %-sparse setting of that benchmark. `grda` = same.
register_recipe("grda-lenet", TrainRecipe(
    epochs=30, batch_size=128, test_batch_size=256, optimizer="grda", lr=0.2, schedule="linear-hold",
    gamma=0.01, optimizer_kwargs={"c": 0.005, "mu": 0.55}))
register_recipe("grda", get_recipe("grda-lenet"))

# ResNet-50 / ImageNet (paper headline: 91.6 % sparsity, 73.24 % top-1): lr 0.1 for 140 epochs, then 0.01.
register_recipe("grda-resnet50-imagenet", TrainRecipe(
    epochs=150, batch_size=256, test_batch_size=256, optimizer="grda", lr=0.1, schedule="multistep",
    milestones=(140,), gamma=0.1, optimizer_kwargs={"c": 0.005, "mu": 0.55}))

# VGG16 / CIFAR-10, 600 epochs (paper: 90.86 % at 90.5 % sparsity, 10 seeds).
register_recipe("grda-vgg16-cifar10", TrainRecipe(
    epochs=600, batch_size=128, test_batch_size=256, optimizer="grda", lr=0.1, schedule="linear-hold",
    gamma=0.01, optimizer_kwargs={"c": 0.0005, "mu": 0.6}))

# WRN28x10 / CIFAR-100, 200 epochs (paper: 77.00 % at 90.2 % sparsity, SGD 76.53 %).
register_recipe("grda-wrn28x10-cifar100", TrainRecipe(
    epochs=200, batch_size=128, test_batch_size=256, optimizer="grda", lr=0.1, schedule="linear-hold",
    gamma=0.01, optimizer_kwargs={"c": 0.001, "mu": 0.55}))

# ResNet-20 / Fashion-MNIST on one CPU core (ours; the grda-resnet20-fmnist study): 10 epochs over the first
# 6,000 training images (470 steps), plain SGD lr 0.1 without momentum, the paper's CIFAR schedule (10 epochs:
# the last one at 1 % of the lr, so BN statistics settle). So few steps need a far larger c than the paper's
# 150-epoch runs for the threshold c·γ^{μ+½}·k^μ to reach the weights' scale.
register_recipe("grda-resnet20-fmnist", TrainRecipe(
    epochs=10, batch_size=128, test_batch_size=256, optimizer="grda", lr=0.1, schedule="linear-hold",
    gamma=0.01, optimizer_kwargs={"c": 0.03, "mu": 0.6}))

# Hugging Face transformers zoo models on CPU (prunekit.models.hf): AdamW, linear warm-up, then a cosine to 0
# evaluated at every step (schedule_per_step); weight decay on every parameter. Timings: one CPU thread of the
# 2-core dev VM (AMD EPYC) with the other core busy; two free cores are faster, but two threads on a busy
# machine are ~10× slower: run with OMP_NUM_THREADS=1 when anything else is running.
# vit-fmnist (ViT patch 7, hidden 128, 6 layers, 1.2 M parameters) on Fashion-MNIST: 12 epochs × 469 steps of
# 128 images; 0.24 s/step + 7 s of evaluation per epoch ≈ 24 min. A 5-epoch run of this recipe reached 87.95 %
# (2 epochs: 85.65 %); 12 epochs should end near 89-90 %.
register_recipe("vit-fmnist", TrainRecipe(
    epochs=12, batch_size=128, test_batch_size=512, optimizer="adamw", lr=1e-3, weight_decay=0.05,
    schedule="cosine", schedule_per_step=True, warmup_steps=250))

# llama-shakespeare (byte-level Llama, 3.0 M parameters) on shakespeare: 6 epochs × 250 steps (of its 1,114 per
# full pass) of 32 blocks of 128 bytes = 1,500 steps, 6.1 M tokens (1.35 passes over train); AdamW β2 0.95,
# wd 0.1, gradient clipping at 1.0; 1.07 s/step + 24 s per test evaluation (241 k tokens) ≈ 29 min.
register_recipe("llama-shakespeare", TrainRecipe(
    epochs=6, batch_size=32, test_batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=0.1,
    optimizer_kwargs={"betas": (0.9, 0.95)}, schedule="cosine", schedule_per_step=True, warmup_steps=100,
    grad_clip=1.0, steps_per_epoch=250))
