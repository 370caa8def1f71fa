"""Compensation: what replaces the removed channels' contribution. Everything here only *decides*.

Each function reads the unmodified model (weights, and for the data-light ones a few unlabeled
calibration inputs) and returns plan data — merge matrices on :class:`~prunekit.engine.GroupPlan`,
per-consumer :class:`~prunekit.engine.Refit` records (new weights, output offsets folded into a bias or
the following BatchNorm) — which :func:`prunekit.engine.apply`, the only writer, applies.

* :mod:`.decompose` — Neuron Merging's Algorithms 1–3 (MostSim, MostSim+BN) on weight vectors;
* :mod:`.neuron_merging` — the merge matrix of one planned group of a graph (:func:`decompose_group`);
* :mod:`.lstsq` — ridge least-squares merge matrices (+ intercepts) from calibration inputs (:func:`lstsq_plan`);
* :mod:`.reconstruct` — whole-layer ridge refits of every consumer's output (:func:`reconstruct_plan`), with
  :mod:`.greedy` (survivors chosen against the consumers' outputs, whole channels — unlike
  :func:`~prunekit.compensate.lstsq.greedy_select`, which reconstructs the group's own activations),
  :mod:`.residual` (skip-branch drift in the targets) and :mod:`.targets` (the targets in few passes);
* :mod:`.batchnorm` — BatchNorm statistics re-estimated on calibration inputs, as refits;
* :mod:`.constants` — constant channels folded into their consumers (:func:`constant_refits`);
* :mod:`.calibration` — calibration inputs of any type (images, token ids, dicts) and activation capture.
"""
from .calibration import calibration_inputs
from .constants import ConstantFold, constant_refits, followers, output_offset
from .decompose import BNStats, Decomposition, most_sim, most_sim_bn, prune_only
from .lstsq import GroupStats, LstsqOptions, fit_from_stats, greedy_select, group_stats, lstsq_plan
from .neuron_merging import LayerView, MatrixOptions, decompose_group, layer_view
from .reconstruct import ReconstructOptions, reconstruct_plan

__all__ = [
           "BNStats",
           "ConstantFold",
           "Decomposition",
           "GroupStats",
           "LayerView",
           "LstsqOptions",
           "MatrixOptions",
           "ReconstructOptions",
           "calibration_inputs",
           "constant_refits",
           "decompose_group",
           "fit_from_stats",
           "followers",
           "greedy_select",
           "group_stats",
           "layer_view",
           "lstsq_plan",
           "most_sim",
           "most_sim_bn",
           "output_offset",
           "prune_only",
           "reconstruct_plan",
]
