"""Neuron Merging on the engine: choose survivors, build each group's merge matrix, apply.

``merge(model, example, MergeOptions(...))`` is the whole method:

1. **select** — the kept channels of every prunable group, by a criterion (``l1-norm``, ``l2-norm``,
   ``l2-GM``; Neuron Merging scores a fully connected neuron as ``[w | b]``), either in general mode
   (the engine's ``make_plan``: ratio, scope, rounding, overrides) or with an official preset
   (:mod:`prunekit.merging.presets`: fixed survivors per layer);
2. **decompose** — for every group the engine marks mergeable, Algorithm 1 with MostSim (no BN) or
   MostSim+BN (producer → BatchNorm) on the group's *original* weights (all decisions read the
   unmodified model, spec §6 "decision order");
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

from ..engine import ChannelGraph, GroupPlan, Plan, ScoreContext, apply, find_rule, get_criterion, make_plan
from ..engine.graph import Group
from ..errors import ConfigError
from .decompose import BN_SCALES, NEGATIVE, BNStats, Decomposition, most_sim, most_sim_bn
from .presets import get_preset

MODEL_TYPES = ("original", "prune", "merge")
#: per-layer threshold defaults of the official scripts (spec §8.4) when none is given
DEFAULT_FC_THRESHOLD = 0.45
DEFAULT_BN_THRESHOLD = 0.1
DEFAULT_LAM = 0.85


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
        bn_scale: ``exact`` (default) | ``paper`` (the official formulas, spec §4.1).
        negative: ``skip`` (default) | ``allow`` merges whose scale is not positive (always counted).
        scope, rounding, overrides, ignored, seed: general-mode selection (see :func:`prunekit.engine.prune`).
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
    overrides: Mapping[str, float] | None = None
    ignored: tuple[str, ...] | None = None
    include_bias: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}")
        if self.bn_scale not in BN_SCALES:
            raise ConfigError(f"bn_scale must be one of {list(BN_SCALES)}, got {self.bn_scale!r}")
        if self.negative not in NEGATIVE:
            raise ConfigError(f"negative must be one of {list(NEGATIVE)}, got {self.negative!r}")
        if self.lam is not None and not 0.0 <= float(self.lam) <= 1.0:
            raise ConfigError(f"lam must be in [0, 1], got {self.lam!r}")
        if self.threshold is not None and not -1.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"threshold must be a cosine in [-1, 1] (0: no threshold), got {self.threshold!r}")
        if self.preset is not None:
            get_preset(self.preset)  # unknown names fail early, with suggestions

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
# reading a group's layer (producer rows, bias, the BatchNorm right after it)


@dataclass
class LayerView:
    """The producer side of one single-producer group, in group-channel order.

    ``rows`` (N, F) float64 producer rows without bias; ``bias`` (N,) or None; ``bn`` the BatchNorm right
    after the producer (or None); ``why_not`` a reason when MostSim cannot run on this group.
    """

    producer: str
    rows: torch.Tensor
    bias: torch.Tensor | None
    bn: BNStats | None
    norm: str | None
    why_not: str | None = None

    def vectors(self) -> torch.Tensor:
        """MostSim vectors: ``[w | b]`` without BN (Alg. 2), the filters only with BN (Alg. 3)."""
        if self.bn is None and self.bias is not None:
            return torch.cat([self.rows.double(), self.bias[:, None]], 1)
        return self.rows


def _by_channel(values: torch.Tensor, channels: np.ndarray, n: int) -> torch.Tensor:
    if len(channels) == n and bool((channels == np.arange(n)).all()):
        return values
    out = torch.zeros((n, *values.shape[1:]), dtype=values.dtype)
    out[torch.from_numpy(channels)] = values
    return out


def layer_view(model: nn.Module, graph: ChannelGraph, group: Group | int) -> LayerView:
    """Read the producer and BatchNorm of a (mergeable) group from the unmodified ``model``."""
    g = graph.groups[group] if isinstance(group, int) else group
    prods = [m for m in g.members if m.role == "out" and m.fresh]
    if len(prods) != 1:
        raise ConfigError(f"group '{g.name}' has {len(prods)} producers; MostSim needs exactly one")
    pm = prods[0]
    module = model.get_submodule(pm.module)
    rule = find_rule(type(module))
    sel = pm.indices(g.id)
    rows = rule.rows(module, False).detach()
    rows = (rows if len(sel) == rows.shape[0] else rows[torch.from_numpy(sel)]).cpu()
    rows = _by_channel(rows, pm.channel[sel], g.size)
    bias = getattr(module, "bias", None)
    bias = None if not isinstance(bias, torch.Tensor) else _by_channel(
        bias.detach().double().cpu()[torch.from_numpy(sel)], pm.channel[sel], g.size)
    norms = [m for m in g.members if m.role == "norm"]
    if not norms:
        return LayerView(pm.module, rows, bias, None, None)
    if len(norms) > 1:
        return LayerView(pm.module, rows, bias, None, None,
                         why_not=f"{len(norms)} norm layers after '{pm.module}' (MostSim+BN needs one)")
    nm = norms[0]
    bn_module = model.get_submodule(nm.module)
    if not isinstance(bn_module, nn.modules.batchnorm._BatchNorm):
        return LayerView(pm.module, rows, bias, None, nm.module,
                         why_not=f"'{nm.module}' ({type(bn_module).__name__}) is not a BatchNorm")
    try:
        stats = BNStats.from_module(bn_module)
    except ConfigError as e:
        return LayerView(pm.module, rows, bias, None, nm.module, why_not=f"'{nm.module}': {e}")
    nsel = nm.indices(g.id)
    idx = torch.from_numpy(nsel)
    ch = nm.channel[nsel]
    stats = BNStats(*(_by_channel(t[idx], ch, g.size) for t in (stats.gamma, stats.beta, stats.mean, stats.var)),
                    eps=stats.eps)
    return LayerView(pm.module, rows, bias, stats.fold_bias(bias), nm.module)


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
        groups.append(GroupPlan(group_id=g.id, keep=keep, size=g.size, criterion=criterion,
                                ratio=1 - len(keep) / g.size,
                                members=[{"module": m.module, "role": m.role, "size": len(m.indices(g.id))}
                                         for m in g.members],
                                provenance={"name": g.name, "width": int(p), "mergeable": g.mergeable}))
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
                     rounding=options.rounding, overrides=options.overrides, seed=options.seed,
                     include_bias=options.include_bias)
    plan.groups = [gp for gp in plan.groups if len(gp.keep) < (gp.size or 0)]
    return plan


# ----------------------------------------------------------------------------------------------
# decomposition of every group


def decompose_group(model: nn.Module, graph: ChannelGraph, gp: GroupPlan,
                    options: MergeOptions) -> tuple[Decomposition | None, dict[str, Any]]:
    """Algorithm 1 for one planned group; ``(None, report)`` when the group can only be pruned."""
    g = graph.groups[gp.group_id]
    report: dict[str, Any] = {"group": g.id, "name": g.name, "size": g.size, "kept": len(gp.keep),
                              "removed": g.size - len(gp.keep), "mergeable": g.mergeable}
    removed = report["removed"]
    if removed == 0:
        return None, {**report, "action": "kept", "merged": 0, "pruned": 0}
    if options.model_type == "prune":
        return None, {**report, "action": "pruned", "reason": "model_type=prune", "merged": 0, "pruned": removed}
    if not g.mergeable:
        return None, {**report, "action": "pruned", "reason": f"not mergeable: {g.merge_reason}", "merged": 0,
                      "pruned": removed}
    view = layer_view(model, graph, g)
    if view.why_not is not None:
        return None, {**report, "action": "pruned", "reason": view.why_not, "merged": 0, "pruned": removed}
    t_fc, t_bn = options.thresholds()
    if view.bn is None:
        dec = most_sim(view.vectors(), gp.keep, threshold=t_fc, negative=options.negative)
        algo = {"algorithm": "mostsim", "threshold": t_fc}
    else:
        dec = most_sim_bn(view.vectors(), gp.keep, view.bn, lam=options.lam_value(), threshold=t_bn,
                          bn_scale=options.bn_scale, negative=options.negative)
        algo = {"algorithm": "mostsim-bn", "threshold": t_bn, "lam": options.lam_value(),
                "bn_scale": options.bn_scale, "norm": view.norm}
    stats = dec.stats()
    action = "merged" if stats["merged"] else "pruned"
    out = {**report, "action": action, **algo, **stats, "pruned": removed - stats["merged"]}
    if not stats["merged"]:
        out["reason"] = "no pruned channel passed the threshold/sign tests"
    return dec, out


def merge_plan(model: nn.Module, graph: ChannelGraph, plan: Plan,
               options: MergeOptions) -> tuple[Plan, list[dict[str, Any]]]:
    """Add Neuron Merging matrices to ``plan`` (a plan of survivors); returns the new plan and one
    report per planned group. The model is only read."""
    groups, reports = [], []
    for gp in plan.groups:
        dec, rep = decompose_group(model, graph, gp, options)
        reports.append(rep)
        merge = dec.merge if dec is not None and bool(dec.merged.any()) else None
        prov = {**gp.provenance, "nm": {k: v for k, v in rep.items() if k not in ("group", "name", "size")}}
        groups.append(GroupPlan(group_id=gp.group_id, keep=list(gp.keep), members=gp.members, merge=merge,
                                size=gp.size, criterion=gp.criterion, ratio=gp.ratio, provenance=prov))
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
