"""Neuron Merging (Kim et al., NeurIPS 2020) on the channel engine, and data-light least-squares compensation.

>>> from prunekit.merging import merge, MergeOptions
>>> small = merge(model, (1, 1, 28, 28), MergeOptions(ratio=0.7, preset="lenet-300-100")).model
>>> from prunekit.merging import compensate, LstsqOptions
>>> small = compensate(model, (1, 1, 28, 28), train_set, LstsqOptions(calibration=1000),
...                    MergeOptions(ratio=0.7)).model

* :mod:`.decompose` — Algorithms 1–3 (MostSim, MostSim+BN; exact or the official BN formulas), vectorised;
* :mod:`.core` — :func:`merge`: survivors (general mode or preset), merge matrices per group, surgery;
* :mod:`.presets` — the official per-architecture pipelines (LeNet-300-100, VGG-16 C10/C100, ResNet, WRN);
* :mod:`.compensation` — :func:`compensate`: ridge least-squares merge matrices from unlabeled inputs;
* :mod:`.method` — the ``merge`` / ``lstsq`` methods of ``prunekit prune``;
* :mod:`.studies` — ``prunekit reproduce nm-*``.
"""
from .compensation import LstsqOptions, compensate, lstsq_plan
from .core import (
    MergeOptions,
    MergeResult,
    decompose_group,
    layer_view,
    merge,
    merge_plan,
    plan_for_widths,
    select,
)
from .decompose import BNStats, Decomposition, most_sim, most_sim_bn, prune_only
from .presets import Preset, get_preset, list_presets, register_preset

__all__ = ["BNStats", "Decomposition", "LstsqOptions", "MergeOptions", "MergeResult", "Preset", "compensate",
           "decompose_group", "get_preset", "layer_view", "list_presets", "lstsq_plan", "merge", "merge_plan",
           "most_sim", "most_sim_bn", "plan_for_widths", "prune_only", "register_preset", "select"]
