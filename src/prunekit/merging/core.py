"""Neuron Merging on the engine: choose survivors, build each group's merge matrix, apply.

``merge(model, example, MergeOptions(...))`` is the whole method:

1. **select** — the kept channels of every prunable group, by a criterion (``l1-norm``, ``l2-norm``,
   ``l2-GM``; Neuron Merging scores a fully connected neuron as ``[w | b]``), either in general mode
   (the engine's ``make_plan``: ratio, scope, rounding, overrides) or with an official preset
   (:mod:`prunekit.merging.presets`: fixed survivors per layer);
2. **decompose** — for every group the engine marks mergeable, Algorithm 1 with MostSim (no BN) or
   MostSim+BN (producer → BatchNorm) on the group's *original* weights (all decisions read the
   unmodified model);
3. **apply** — :func:`prunekit.engine.apply` slices producers/norms and writes ``W ×_in M`` into the
   consumers. Groups that are not mergeable (residual streams, concat, non-homogeneous ops) are
   pruned and the report says why.

``model_type="prune"`` is the paper's baseline (same survivors, no compensation); ``"original"``
returns an untouched copy.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compensate.lstsq import LstsqOptions, lstsq_plan
from ..compensate.neuron_merging import (
    DEFAULT_BN_THRESHOLD,
    DEFAULT_FC_THRESHOLD,
    DEFAULT_LAM,
    MatrixOptions,
    decompose_group,
    group_report,
    pruned_only,
)
from ..engine import ChannelGraph, GroupPlan, Plan, ScoreContext, apply, get_criterion, make_plan
from ..errors import ConfigError
from .presets import get_preset

MODEL_TYPES = ("original", "prune", "merge")


@dataclass(frozen=True)
class MergeOptions:
    """Options of :func:`merge` (and of the ``merge`` CLI method).

    Attributes:
        ratio: fraction of each group's channels removed (presets: of each pruned layer; VGG ignores it).
        criterion: ``l1-norm`` | ``l2-norm`` | ``l2-GM`` (or any engine criterion).
        model_type: ``merge`` (default) | ``prune`` (same survivors, no merge) | ``original``.
        preset: an official pipeline (``lenet-300-100``, ``vgg16-cifar10``, ``vgg16-cifar100``,
            ``resnet56``, ``wrn-40-4``) or None for general mode.
        threshold: minimum cosine to merge; 0 disables it; None: the preset's, else 0.45 for layers
            without BatchNorm (Alg. 2) and 0.1 for conv/linear → BN (Alg. 3).
        lam: λ of MostSim+BN (None: the preset's, else 0.85).
        bn_scale: ``exact`` (default) | ``paper`` (the official formulas, docs/neuron-merging.md).
        negative: ``skip`` (default) | ``allow`` merges whose scale is not positive (always counted).
        scope, rounding, round_to, overrides, ignored, seed: general-mode selection (see
            :func:`prunekit.engine.prune`; presets fix the widths and refuse ``round_to``).
        include_bias: score fully connected neurons as ``[w | b]`` (Neuron Merging does).
    """

    ratio: float = 0.5
    criterion: str = "l1-norm"
    model_type: str = "merge"
    preset: str | None = None
    threshold: float | None = None
    lam: float | None = None
    bn_scale: str = "exact"
    negative: str = "skip"
    scope: str = "local"
    rounding: str = "round"
    round_to: int | None = None
    overrides: Mapping[str, float] | None = None
    ignored: tuple[str, ...] | None = None
    include_bias: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}")
        MatrixOptions(bn_scale=self.bn_scale, negative=self.negative,
                      lam=DEFAULT_LAM if self.lam is None else float(self.lam))  # validates them
        if self.threshold is not None and not -1.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"threshold must be a cosine in [-1, 1] (0: no threshold), got {self.threshold!r}")
        if self.preset is not None:
            get_preset(self.preset)  # unknown names fail early, with suggestions
            if self.round_to is not None:
                raise ConfigError(f"round_to is not supported with preset '{self.preset}' (the preset fixes the "
                                  "widths); drop one of them")

    def replace(self, **kw: Any) -> MergeOptions:
        return replace(self, **kw)

    def thresholds(self) -> tuple[float, float]:
        """(threshold for Alg. 2 layers, threshold for Alg. 3 layers)."""
        if self.threshold is not None:
            return float(self.threshold), float(self.threshold)
        if self.preset is not None:
            t = get_preset(self.preset).threshold
            return t, t
        return DEFAULT_FC_THRESHOLD, DEFAULT_BN_THRESHOLD

    def lam_value(self) -> float:
        if self.lam is not None:
            return float(self.lam)
        return get_preset(self.preset).lam if self.preset is not None else DEFAULT_LAM

    def matrix_options(self) -> MatrixOptions:
        """The per-group merge-matrix options these settings imply (thresholds, λ from the preset)."""
        t_fc, t_bn = self.thresholds()
        return MatrixOptions(threshold_fc=t_fc, threshold_bn=t_bn, lam=self.lam_value(), bn_scale=self.bn_scale,
                             negative=self.negative)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = dict(self.overrides) if self.overrides else None
        d["ignored"] = list(self.ignored) if self.ignored else None
        return d


@dataclass
class MergeResult:
    """What :func:`merge` returns: the new model, the applied plan, the graph and a JSON-ready report."""

    model: nn.Module
    plan: Plan | None
    graph: ChannelGraph | None
    report: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# selection


def _top(scores: torch.Tensor, cand: list[int], k: int) -> list[int]:
    """The ``k`` best of ``cand`` (ties: lower index first), sorted."""
    s = scores.double().numpy()[cand]
    c = np.asarray(cand, dtype=np.int64)
    return sorted(c[np.lexsort((c, -s))[:k]].tolist())


def plan_for_widths(model: nn.Module, graph: ChannelGraph, widths: Mapping[str, int], *, criterion: str = "l1-norm",
                    include_bias: bool = True, seed: int = 0) -> Plan:
    """A pruning plan keeping exactly ``widths[module]`` channels of the group each producer module
    creates (top scores of ``criterion``); groups not named keep everything (and are not listed)."""
    fn = get_criterion(criterion)
    ctx = ScoreContext(model, graph, include_bias=include_bias, seed=seed)
    groups: list[GroupPlan] = []
    seen: dict[int, str] = {}
    for name, p in widths.items():
        try:
            g = graph.group(name)
        except KeyError:
            raise ConfigError(f"no channel group is produced by module '{name}'") from None
        if name not in g.producers:
            raise ConfigError(f"module '{name}' does not produce group '{g.name}' (it is a {g.name} member)")
        if g.id in seen:
            raise ConfigError(f"modules '{seen[g.id]}' and '{name}' share one channel group; give one width")
        seen[g.id] = name
        cand = g.prunable
        if not 1 <= int(p) <= len(cand):
            raise ConfigError(f"width {p} for '{name}' is outside [1, {len(cand)}] (its prunable channels)")
        keep = sorted(set(_top(fn(ctx, g), cand, int(p))) | set(g.blocked))
        groups.append(GroupPlan.from_group(g, keep, criterion=criterion, width=int(p)))
    return Plan(groups=sorted(groups, key=lambda gp: gp.group_id),
                meta={"criterion": criterion, "widths": dict(widths), "include_bias": include_bias, "seed": seed})


def select(model: nn.Module, graph: ChannelGraph, options: MergeOptions) -> Plan:
    """The pruning plan (survivors only) of ``options``: preset widths or the engine's general mode."""
    if options.preset is not None:
        widths = get_preset(options.preset).widths(model, options.ratio)
        plan = plan_for_widths(model, graph, widths, criterion=options.criterion,
                               include_bias=options.include_bias, seed=options.seed)
        plan.meta["preset"] = options.preset
        return plan
    plan = make_plan(model, graph, ratio=options.ratio, criterion=options.criterion, scope=options.scope,
                     rounding=options.rounding, round_to=options.round_to, overrides=options.overrides,
                     seed=options.seed,
                     include_bias=options.include_bias)
    plan.groups = [gp for gp in plan.groups if len(gp.keep) < (gp.size or 0)]
    return plan


def merge_plan(model: nn.Module, graph: ChannelGraph, plan: Plan,
               options: MergeOptions) -> tuple[Plan, list[dict[str, Any]]]:
    """Add Neuron Merging matrices to ``plan`` (a plan of survivors); returns the new plan and one
    report per planned group. The model is only read."""
    groups, reports = [], []
    matrix_options = options.matrix_options()
    for gp in plan.groups:
        if options.model_type == "prune":
            dec, rep = None, group_report(graph, gp)
            rep = pruned_only(rep, "model_type=prune") if rep["removed"] else {
                **rep, "action": "kept", "merged": 0, "pruned": 0}
        else:
            dec, rep = decompose_group(model, graph, gp, matrix_options)
        reports.append(rep)
        merge = dec.merge if dec is not None and bool(dec.merged.any()) else None
        prov = {**gp.provenance, "nm": {k: v for k, v in rep.items() if k not in ("group", "name", "size")}}
        groups.append(gp.replace(merge=merge, provenance=prov))
    meta = {**plan.meta, "method": "neuron-merging", "model_type": options.model_type,
            "bn_scale": options.bn_scale, "threshold": options.threshold, "lam": options.lam}
    return Plan(groups=groups, meta=meta), reports


def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over group reports: channels removed / merged / pruned, skips, groups by action."""
    def total(key: str) -> int:
        return int(sum(r.get(key) or 0 for r in reports))

    return {"channels_removed": total("removed"), "merged": total("merged"), "pruned": total("pruned"),
            "skipped_threshold": total("skipped_threshold"), "skipped_sign": total("skipped_sign"),
            "skipped_invalid": total("skipped_invalid"), "negative_merged": total("negative_merged"),
            "groups_planned": len(reports), "groups_merged": sum(r["action"] == "merged" for r in reports),
            "groups_pruned_only": sum(r["action"] == "pruned" for r in reports)}


def merge(model: nn.Module, example_inputs: Any, options: MergeOptions | None = None, *,
          graph: ChannelGraph | None = None, **kw: Any) -> MergeResult:
    """Neuron Merging in one call; ``model`` is left untouched.

    Args:
        model: a trained model (eval semantics: BatchNorm running statistics are used).
        example_inputs: a tensor / tuple / shape for tracing, e.g. ``(1, 1, 28, 28)``.
        options: :class:`MergeOptions`; keyword arguments override its fields.
        graph: a prebuilt :class:`ChannelGraph` of ``model`` (rebuilt otherwise).

    Returns:
        :class:`MergeResult`: the smaller model, the applied plan (with merge matrices), the graph and
        ``report = {"options", "groups": [per group: action, merged, pruned, skips, similarity], totals}``.
    """
    options = (options or MergeOptions()).replace(**kw) if kw else (options or MergeOptions())
    if options.model_type == "original":
        return MergeResult(copy.deepcopy(model), None, None, {"options": options.to_dict(), "groups": [],
                                                            **summarize([])})
    if graph is None:
        graph = ChannelGraph.build(model, example_inputs, ignored=list(options.ignored or ()) or None)
    plan = select(model, graph, options)
    plan, reports = merge_plan(model, graph, plan, options)
    new = apply(model, graph, plan)
    new.prunekit_plan = plan
    return MergeResult(new, plan, graph, {"options": options.to_dict(), "groups": reports, **summarize(reports)})


def compensate(model: nn.Module, example_inputs: Any, data: Any, options: LstsqOptions | None = None,
               merge_options: MergeOptions | None = None, *, graph: ChannelGraph | None = None,
               progress: bool = False, **kw: Any) -> MergeResult:
    """The ``lstsq`` method in one call: survivors as :func:`merge` would choose them (``merge_options``:
    ratio, criterion, preset, ...), then least-squares merge matrices fitted on ``options.calibration``
    inputs drawn from ``data`` (:func:`prunekit.compensate.lstsq_plan`). Keyword arguments override
    ``options``. Returns a :class:`MergeResult` (model, plan, graph, report)."""
    options = (options or LstsqOptions()).replace(**kw) if kw else (options or LstsqOptions())
    merge_options = merge_options or MergeOptions()
    if graph is None:
        graph = ChannelGraph.build(model, example_inputs, ignored=list(merge_options.ignored or ()) or None)
    plan = select(model, graph, merge_options)
    plan, reports = lstsq_plan(model, graph, plan, data, options, matrix_options=merge_options.matrix_options(),
                               progress=progress)
    new = apply(model, graph, plan)
    new.prunekit_plan = plan
    report = {"options": {**merge_options.to_dict(), "model_type": "lstsq"}, "lstsq": options.to_dict(),
              "groups": reports, **summarize(reports)}
    return MergeResult(new, plan, graph, report)
