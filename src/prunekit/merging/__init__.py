"""Neuron Merging (Kim et al., NeurIPS 2020) on the channel engine, and data-light least-squares compensation.

>>> from prunekit.merging import merge, MergeOptions
>>> small = merge(model, (1, 1, 28, 28), MergeOptions(ratio=0.7, preset="lenet-300-100")).model
>>> from prunekit.merging import compensate, LstsqOptions
>>> small = compensate(model, (1, 1, 28, 28), train_set, LstsqOptions(calibration=1000),
...                    MergeOptions(ratio=0.7)).model

* :mod:`.core` — :func:`merge`: survivors (general mode or preset), merge matrices per group, surgery;
  :func:`compensate`: the same survivors with least-squares matrices;
* :mod:`.presets` — the official per-architecture pipelines (LeNet-300-100, VGG-16 C10/C100, ResNet, WRN);
* :mod:`.method` — the ``merge`` / ``lstsq`` methods of ``prunekit prune``.

The matrices themselves (MostSim, MostSim+BN, least squares) live in :mod:`prunekit.compensate`.
"""
from ..compensate import (
    BNStats,
    Decomposition,
    LstsqOptions,
    decompose_group,
    layer_view,
    lstsq_plan,
    most_sim,
    most_sim_bn,
    prune_only,
)
from .core import (
    MergeOptions,
    MergeResult,
    compensate,
    merge,
    merge_plan,
    plan_for_widths,
    select,
)
from .presets import Preset, get_preset, list_presets, register_preset

__all__ = ["BNStats", "Decomposition", "LstsqOptions", "MergeOptions", "MergeResult", "Preset", "compensate",
           "decompose_group", "get_preset", "layer_view", "list_presets", "lstsq_plan", "merge", "merge_plan",
           "most_sim", "most_sim_bn", "plan_for_widths", "prune_only", "register_preset", "select"]
