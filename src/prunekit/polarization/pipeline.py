"""The Polarization pipeline as library API: train with λ·R(γ), prune at the threshold, measure.

What a study, the FLOPs-target search (:mod:`.search`) or a user script needs to run the paper's
pipeline, in reusable pieces::

    spec = PipelineSpec(model="resnet20", dataset="fashion-mnist", lam=1e-3, t=1.2,
                        baseline_recipe="polarization-fmnist", sparse_recipe="polarization-fmnist",
                        finetune_recipe="polarization-fmnist-finetune")
    run = PipelineRun(spec, out="runs/mine")                  # data, device, seeded models, stage dirs
    model = run.fresh_model()
    reg = make_regularizer("polarization", spec, model, run.example)   # bound, BN γ initialised
    recipe = run.recipe(spec.sparse_recipe)
    res = run.fit("polarization", model, recipe, regularizers=[reg],
                  param_groups=param_groups_for(spec, model, recipe.weight_decay))
    pruned, details = prune_polarized(res.model, run.example, spec.options())

Every stage :meth:`PipelineRun.fit` trains lives in ``out/<stage>`` and is resumed when it exists (a
finished stage is reused; a stage trained with another recipe or seed is refused by the Trainer).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .method import PolarizationOptions, apply_plan, polarization_plan
from .regularizer import (
    GatedBatchNorm2d,
    NetworkSlimming,
    PolarizationRegularizer,
    _init_for,
    fold_gates,
    gate_param_groups,
)

__all__ = ["PipelineRun", "PipelineSpec", "make_regularizer", "param_groups_for", "prune_polarized"]


@dataclass(frozen=True)
class PipelineSpec:
    """What the pipeline trains and how: model and data, λ and t, which factors, the recipes' names.

    Attributes:
        model, model_config: zoo name and cfg overrides (``num_classes``/``in_channels``/``input_size``
            come from the dataset).
        dataset, dataset_options: registered dataset and its options (e.g. ``synthetic``'s ``size``).
        lam, t: the polarization regularizer's λ and t; ``slimming_lam``: network slimming's λ (only
            for ``make_regularizer("slimming", ...)``).
        baseline_recipe, sparse_recipe, finetune_recipe: registered recipe names of the three trainings.
        preset: which scaling factors (``engine`` for any model, or a paper preset such as ``resnet-cifar``).
        bn_init: initial BN γ (the paper's 0.5; None: the model's own init).
        gates, bn_weight_decay: MobileNetV2's gated BN, and whether BN/gates get weight decay.
        threshold, combine: the pruning threshold rule and how a group's factors combine
            (:class:`~prunekit.polarization.PolarizationOptions`).
        batch_size: overrides every recipe's batch size when set.
    """

    model: str
    dataset: str
    lam: float
    t: float
    baseline_recipe: str
    sparse_recipe: str
    finetune_recipe: str
    preset: str = "engine"
    bn_init: float | None = 0.5
    gates: bool = False
    bn_weight_decay: bool = True
    model_config: dict = field(default_factory=dict)
    dataset_options: dict = field(default_factory=dict)
    threshold: str | float = "auto"
    combine: str = "max"
    slimming_lam: float | None = None
    batch_size: int | None = None

    def options(self) -> PolarizationOptions:
        """The pruning options of this spec (threshold rule and combine)."""
        return PolarizationOptions(threshold=self.threshold, combine=self.combine)


class PipelineRun:
    """The shared state of one pipeline run: data, device, seed, output directory and timings.

    Args:
        spec: what to train.
        out: directory of the run; each stage trains in ``out/<stage>``.
        data_root: dataset root (None: the library's search, see :func:`prunekit.data.resolve_root`).
        device: ``cuda``/``cpu``/...; None: CUDA when available.
        seed: seeds every fresh model's initialisation and every training.
        progress: progress bars and per-epoch lines.
        name: recorded in every stage's metadata (``"study"``).

    Attributes:
        input_shape: (C, H, W) of the dataset; ``example``: a zero batch of one, (1, C, H, W).
        train_set, test_set: the loaded splits.
        seconds: ``{stage: wall seconds}`` of the stages trained (or reused) by :meth:`fit`.
    """

    def __init__(self, spec: PipelineSpec, *, out: str | Path, data_root: str | None = None,
                 device: str | None = None, seed: int = 0, progress: bool = True, name: str = "polarization"):
        from ..data import dataset_info, get_dataset

        self.spec, self.name, self.out = spec, name, Path(out)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.seed, self.progress = seed, progress
        info = dataset_info(spec.dataset, **spec.dataset_options)
        self.input_shape = tuple(info.input_shape)
        self.model_config = {"num_classes": info.num_classes, "in_channels": info.input_shape[0],
                             "input_size": info.input_shape[1], **spec.model_config}
        self.train_set = get_dataset(spec.dataset, "train", root=data_root, **spec.dataset_options)
        self.test_set = get_dataset(spec.dataset, "test", root=data_root, **spec.dataset_options)
        self.example = torch.zeros(1, *self.input_shape)
        self.seconds: dict[str, float] = {}
        self._loader = None

    def recipe(self, name: str, epochs: int | None = None):
        """The registered recipe ``name``, with ``epochs`` and the spec's ``batch_size`` applied when set."""
        from ..recipes import get_recipe

        r = get_recipe(name)
        over: dict[str, Any] = {}
        if epochs is not None:
            over["epochs"] = epochs
        if self.spec.batch_size is not None:
            over["batch_size"] = self.spec.batch_size
        return r.replace(**over) if over else r

    def fresh_model(self) -> nn.Module:
        """A new ``spec.model`` initialised from ``seed`` (the same weights every call)."""
        from ..models import create
        from ..train import seed_everything

        seed_everything(self.seed)
        return create(self.spec.model, **self.model_config)

    def fit(self, stage: str, model: nn.Module, recipe, **kw: Any):
        """Train ``model`` with ``recipe`` in ``out/<stage>`` (resumed/reused); returns the TrainResult.

        ``kw`` goes to :func:`prunekit.train.train` (``regularizers``, ``callbacks``, ``param_groups``).
        The returned model is in eval mode.
        """
        from ..train import train

        start = time.perf_counter()
        res = train(model, self.train_set, self.test_set, recipe, out_dir=self.out / stage, seed=self.seed,
                    resume=True, device=self.device, progress=self.progress,
                    metadata={"dataset": self.spec.dataset, "study": self.name, "stage": stage}, **kw)
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        res.model.eval()
        return res

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 test accuracy in percent, rounded to 4 decimals."""
        from ..data import make_loader
        from ..metrics import evaluate

        if self._loader is None:
            self._loader = make_loader(self.test_set, 256, shuffle=False)
        return round(evaluate(model, self._loader, device=self.device)["accuracy"], 4)

    def sizes(self, model: nn.Module) -> dict[str, int]:
        """``{"params", "macs"}`` of ``model`` (moved to the CPU) at the dataset's input shape."""
        from ..metrics import count_macs, count_params

        m = model.cpu()
        return {"params": count_params(m), "macs": count_macs(m, input_shape=self.input_shape)}


def make_regularizer(kind: str, spec: PipelineSpec, model: nn.Module, example: torch.Tensor):
    """The spec's regularizer, bound to ``model``, with the factors initialised to ``spec.bn_init``.

    Args:
        kind: ``"polarization"`` (λ·(t‖γ‖₁ − ‖γ − γ̄‖₁), clamp [0, 1]: every BN with a paper preset, the
            selected factors with ``engine``) or ``"slimming"`` (λ‖γ‖₁ with ``spec.slimming_lam``).
        example: an input batch, for the engine to find the factors.

    Returns:
        A :class:`~prunekit.polarization.PolarizationRegularizer` or
        :class:`~prunekit.polarization.NetworkSlimming`.
    """
    if kind == "polarization":
        reg = PolarizationRegularizer(spec.lam, spec.t, preset=spec.preset, example_inputs=example,
                                      clamp="all-bn" if spec.preset != "engine" else "factors")
    elif kind == "slimming":
        if spec.slimming_lam is None:
            raise ConfigError("make_regularizer('slimming', ...) needs spec.slimming_lam (network slimming's λ)")
        reg = NetworkSlimming(spec.slimming_lam, preset=spec.preset, example_inputs=example)
    else:
        raise ConfigError(f"regularizer kind must be 'polarization' or 'slimming', got {kind!r}")
    reg.bind(model)
    if spec.bn_init is not None:
        _init_for(model, reg, spec.bn_init)
    return reg


def param_groups_for(spec: PipelineSpec, model: nn.Module, weight_decay: float) -> list[dict] | None:
    """Optimizer parameter groups when gates or BN need their own weight decay; None: one group."""
    if spec.gates or not spec.bn_weight_decay:
        return gate_param_groups(model, weight_decay, bn_weight_decay=spec.bn_weight_decay)
    return None


def prune_polarized(model: nn.Module, example: torch.Tensor, options: PolarizationOptions,
                    compensate: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a polarized model at its threshold; returns the smaller copy and the plan's details.

    The plan is made on ``model`` (possibly with gated BN) and applied to its gate-folded twin (same
    groups). ``compensate`` (None: ``options.compensate``) folds the removed channels' constant output
    into their consumers. The copy carries ``prunekit_plan``; ``details`` adds ``"compensation"`` to
    :func:`~prunekit.polarization.polarization_plan`'s details. ``model`` is moved to the CPU and set to
    eval mode.
    """
    from ..engine import ChannelGraph

    model = model.cpu().eval()
    graph = ChannelGraph.build(model, example)
    plan, details = polarization_plan(model, graph, options)
    target, tgraph = model, graph
    if any(isinstance(m, GatedBatchNorm2d) for m in model.modules()):
        target = fold_gates(model)
        tgraph = ChannelGraph.build(target, example)
    pruned, comp = apply_plan(target, tgraph, plan, example,
                              compensate=options.compensate if compensate is None else compensate)
    pruned.prunekit_plan = plan
    return pruned, {**details, "compensation": comp}
