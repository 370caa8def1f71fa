"""Polarization pruning (Zhuang et al., NeurIPS 2020): regularizer, threshold, engine method, search.

>>> from prunekit.polarization import PolarizationRegularizer, polarization_prune
>>> reg = PolarizationRegularizer(lam=1e-4, t=1.2)                 # λ·(t‖γ‖₁ − ‖γ − γ̄‖₁), clamp [0, 1]
>>> train(model, train_set, test_set, "polarization-fmnist", regularizers=[reg])
>>> small = polarization_prune(model, torch.zeros(1, 1, 28, 28))   # per-layer histogram valley

Importing the package registers the ``polarization`` / ``slimming`` regularizers, the
``polarization`` pruning method, and the paper recipes (``polarization-*``). The whole pipeline
(train with λ·R(γ) → prune at the threshold → fine-tune) is public API in :mod:`.pipeline`
(:class:`PipelineSpec`, :class:`PipelineRun`, :func:`make_regularizer`, :func:`prune_polarized`);
Algorithm 1 is in :mod:`prunekit.polarization.search`; the paper studies behind ``prunekit reproduce
polarization-*`` are in :mod:`prunekit.studies.polarization`. See ``docs/polarization.md``.
"""
from . import recipes  # noqa: F401  (registers schedules and recipes)
from .method import (
    FlopsMonitor,
    GroupFactors,
    PolarizationOptions,
    group_factors,
    macs_reduction,
    polarization_plan,
    polarization_prune,
    ratio_for_macs,
)
from .pipeline import PipelineRun, PipelineSpec, make_regularizer, param_groups_for, prune_polarized
from .regularizer import (
    PRESETS,
    FactorRef,
    FactorSet,
    GatedBatchNorm2d,
    NetworkSlimming,
    PolarizationRegularizer,
    add_gates,
    fold_gates,
    gate_param_groups,
    init_bn_weights,
    polarization_penalty,
    select_factors,
)
from .threshold import Valley, first_valley, global_threshold, histogram, layer_thresholds, valley_threshold

__all__ = [
    "PRESETS", "FactorRef", "FactorSet", "FlopsMonitor", "GatedBatchNorm2d", "GroupFactors", "NetworkSlimming",
    "PipelineRun", "PipelineSpec", "PolarizationOptions", "PolarizationRegularizer", "Valley", "add_gates",
    "first_valley", "fold_gates", "gate_param_groups", "global_threshold", "group_factors", "histogram",
    "init_bn_weights", "layer_thresholds", "macs_reduction", "make_regularizer", "param_groups_for",
    "polarization_penalty", "polarization_plan", "polarization_prune", "prune_polarized", "ratio_for_macs",
    "select_factors", "valley_threshold",
]
