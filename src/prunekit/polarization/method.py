"""Polarization pruning as an engine method: scaling factors → per-group threshold → :class:`Plan`.

Decisions are made per channel **group** of the :class:`~prunekit.engine.ChannelGraph`, the engine's
unit of physical removal. A single-producer group (conv → BN) is the paper's "layer" and its factors
are that BN's γ. A residual-coupled group (every conv writing to one residual stream, plus the stem)
has one factor per member norm for each channel; ``combine`` merges them into the channel's
importance:

* ``"max"`` (default): a stream channel goes only when *every* BN writing to it is below the
  threshold, i.e. removing it silences nothing the network still uses;
* ``"mean"`` / ``"min"``: more aggressive alternatives.

The group is then removed **physically, as a group** (every producer row, norm entry and consumer
column of the channel) by :func:`prunekit.engine.apply`, instead of the official code's zero-scatter
into a full-width tensor, which is what made its pruned models slower (its issue #21).

Threshold modes (``threshold``): ``"auto"``/``"layer"`` the paper's per-layer first-valley rule (per
group here), ``"global"`` the same rule on all factors at once, ``"percent"`` network slimming's global
percentile (removes the fraction ``ratio`` of all prunable channels with the smallest factors), or a
number (fixed threshold everywhere). See :mod:`prunekit.polarization.threshold` for the no-valley
fallback. Every group keeps at least ``min_keep`` channels (the engine never deletes a whole layer).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compensate import constant_refits
from ..engine import ChannelGraph, GroupPlan, Plan, apply
from ..engine.rules import find_rule
from ..errors import ConfigError
from ..methods import MethodResult, PruneOptions, register_method
from .threshold import FALLBACKS, Valley, global_threshold, layer_thresholds

__all__ = [
    "COMBINES",
    "FlopsMonitor",
    "GroupFactors",
    "PolarizationOptions",
    "apply_plan",
    "group_factors",
    "macs_reduction",
    "polarization_plan",
    "polarization_prune",
    "ratio_for_macs",
]

COMBINES = ("max", "mean", "min")
MODES = ("auto", "layer", "global", "percent")


@dataclass(frozen=True)
class PolarizationOptions:
    """How factors become a plan (module docstring).

    Attributes:
        threshold: ``"auto"`` (= ``"layer"``), ``"global"``, ``"percent"`` or a number.
        ratio: for ``"percent"``: fraction of all prunable channels removed, in [0, 1).
        combine: how a coupled group's member factors make one channel importance.
        fallback: per-layer no-valley fallback (``"fixed"``, ``"keep"``, ``"global"``).
        fallback_value: the ``"fixed"`` fallback threshold (0.01, the official ``fixed`` strategy).
        bins: histogram bins on [0, 1] (100 = the paper's bin width 0.01).
        min_keep: channels every group keeps at least (the largest factors).
        compensate: fold the constant output of removed channels (``act(β)`` when γ = 0) into the
            consumers' following BN / bias (:mod:`prunekit.compensate.constants`).
    """

    threshold: str | float = "auto"
    ratio: float | None = None
    combine: str = "max"
    fallback: str = "fixed"
    fallback_value: float = 0.01
    bins: int = 100
    min_keep: int = 1
    compensate: bool = True

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, str):
            try:
                object.__setattr__(self, "threshold", float(t))
            except ValueError:
                if t not in MODES:
                    raise ConfigError(f"threshold must be one of {list(MODES)} or a number, got {t!r}") from None
        elif not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise ConfigError(f"threshold must be one of {list(MODES)} or a number, got {t!r}")
        if self.threshold == "percent":
            r = self.ratio
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1:
                raise ConfigError(f"threshold 'percent' needs ratio in [0, 1) (fraction of channels removed), "
                                  f"got {r!r}")
        if self.combine not in COMBINES:
            raise ConfigError(f"combine must be one of {list(COMBINES)}, got {self.combine!r}")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"fallback must be one of {list(FALLBACKS)}, got {self.fallback!r}")
        if not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ConfigError(f"min_keep must be a positive integer, got {self.min_keep!r}")

    @classmethod
    def from_prune_options(cls, options: PruneOptions) -> PolarizationOptions:
        """From the CLI's :class:`PruneOptions`: ``threshold`` (default auto), ``method_options``."""
        extra = dict(getattr(options, "method_options", None) or {})
        if getattr(options, "round_to", None) is not None:
            raise ConfigError("method 'polarization' does not take round_to: the factor threshold decides each "
                              "layer's width")
        threshold = getattr(options, "threshold", None)
        if threshold is None:
            threshold = extra.pop("threshold", "auto")
        if threshold == "percent" and "ratio" not in extra:
            extra["ratio"] = options.ratio
        known = {f for f in cls.__dataclass_fields__} - {"threshold"}
        bad = sorted(set(extra) - known)
        if bad:
            raise ConfigError(f"method 'polarization' does not take option(s) {bad}; it takes {sorted(known)}")
        return cls(threshold=threshold, **extra)


@dataclass
class GroupFactors:
    """Combined factor per prunable channel of one group: ``values[i]`` for group channel ``channels[i]``."""

    group_id: int
    name: str
    size: int
    channels: np.ndarray
    values: np.ndarray
    members: list[str] = field(default_factory=list)


def group_factors(model: nn.Module, graph: ChannelGraph, combine: str = "max") -> list[GroupFactors]:
    """The factors of every prunable group that has at least one norm scale (BN γ or gate).

    A channel no norm member covers gets ``+inf`` (always kept)."""
    if combine not in COMBINES:
        raise ConfigError(f"combine must be one of {list(COMBINES)}, got {combine!r}")
    out = []
    for g in graph.prunable_groups:
        rows, names = [], []
        for m in g.members:
            if m.role != "norm":
                continue
            module = model.get_submodule(m.module)
            s = find_rule(type(module)).scale(module)
            if s is None:
                continue
            s = s.detach().float().cpu().numpy()
            idx = m.indices(g.id)
            row = np.full(g.size, np.nan)
            row[m.channel[idx]] = s[idx]
            rows.append(row)
            names.append(m.module)
        if not rows:
            continue
        stack = np.stack(rows)
        valid = ~np.isnan(stack)
        covered = valid.any(axis=0)
        if combine == "max":
            comb = np.where(valid, stack, -np.inf).max(axis=0)
        elif combine == "min":
            comb = np.where(valid, stack, np.inf).min(axis=0)
        else:
            comb = np.where(valid, stack, 0.0).sum(axis=0) / np.maximum(valid.sum(axis=0), 1)
        comb = np.where(covered, comb, np.inf)
        ch = np.asarray(g.prunable, dtype=np.int64)
        out.append(GroupFactors(g.id, g.name, g.size, ch, comb[ch].astype(np.float64), names))
    return out


def _percent_removed(factors: list[GroupFactors], ratio: float) -> tuple[float, dict[int, np.ndarray]]:
    """Network slimming's global percentile by rank: the ``round(ratio·T)`` smallest of all T finite
    factors go (ties broken by order, so exactly that many). Returns the cut value and removed masks."""
    allv = np.concatenate([f.values for f in factors])
    owner = np.concatenate([np.full(len(f.values), i) for i, f in enumerate(factors)])
    pos = np.concatenate([np.arange(len(f.values)) for f in factors])
    finite = np.isfinite(allv)
    k = round(ratio * int(finite.sum()))
    order = np.argsort(np.where(finite, allv, np.inf), kind="stable")[:k]
    removed = {f.group_id: np.zeros(len(f.values), dtype=bool) for f in factors}
    for i in order.tolist():
        removed[factors[owner[i]].group_id][pos[i]] = True
    return (float(allv[order[-1]]) if k else -math.inf), removed


def polarization_plan(model: nn.Module, graph: ChannelGraph,
                      options: PolarizationOptions | None = None) -> tuple[Plan, dict[str, Any]]:
    """The :class:`Plan` of ``options`` for ``model`` and a JSON-ready summary (thresholds per group,
    which groups fell back, channels removed)."""
    opt = options or PolarizationOptions()
    factors = group_factors(model, graph, opt.combine)
    if not factors:
        raise ConfigError("polarization pruning needs scaling factors: no prunable channel group of this model "
                          "has a BatchNorm (or gate) scale")
    mode = "layer" if opt.threshold == "auto" else opt.threshold
    by_id: dict[int, Valley]
    removed_by_id: dict[int, np.ndarray] = {}
    if mode == "layer":
        by_id = {int(k): v for k, v in layer_thresholds({str(f.group_id): f.values for f in factors},
                                                         bins=opt.bins, fallback=opt.fallback,
                                                         fallback_value=opt.fallback_value).items()}
    elif mode == "global":
        v = global_threshold([f.values for f in factors], bins=opt.bins, fallback=opt.fallback,
                             fallback_value=opt.fallback_value)
        by_id = {f.group_id: v for f in factors}
    elif mode == "percent":
        cut, removed_by_id = _percent_removed(factors, float(opt.ratio))
        v = Valley(cut, True, None, "percent")
        by_id = {f.group_id: v for f in factors}
    else:
        v = Valley(float(mode), True, None, "value")
        by_id = {f.group_id: v for f in factors}

    groups, forced, removed, prunable = [], [], 0, 0
    thresholds: dict[str, float] = {}
    for f in factors:
        g = graph.groups[f.group_id]
        thr = by_id[f.group_id]
        kept = ~removed_by_id[f.group_id] if mode == "percent" else f.values > thr.threshold
        if kept.sum() < min(opt.min_keep, len(f.values)):
            order = np.argsort(-f.values, kind="stable")[: opt.min_keep]
            kept[order] = True
            forced.append(f.name)
        keep = sorted(set(g.blocked) | set(f.channels[kept].tolist()))
        n_removed = int((~kept).sum())
        removed += n_removed
        prunable += len(f.values)
        thresholds[f.name] = thr.threshold
        groups.append(GroupPlan.from_group(
            g, keep, criterion="polarization", ratio=n_removed / max(len(f.values), 1), threshold=thr.threshold,
            source=thr.source, found=thr.found, combine=opt.combine, factors=f.members))
    thr_mode = mode if isinstance(mode, str) else "value"
    meta = {"method": "polarization", "threshold": thr_mode, "combine": opt.combine, "fallback": opt.fallback,
            "bins": opt.bins}
    if mode == "percent":
        meta["ratio"] = opt.ratio
    details = {
        "threshold_mode": thr_mode,
        "thresholds": {k: (None if math.isinf(v) else round(v, 6)) for k, v in thresholds.items()},
        "fallback_groups": [f.name for f in factors if not by_id[f.group_id].found],
        "min_keep_groups": forced,
        "channels_prunable": prunable,
        "channels_removed": removed,
        "groups": len(factors),
        "combine": opt.combine,
    }
    return Plan(groups=groups, meta=meta), details


def apply_plan(model: nn.Module, graph: ChannelGraph, plan: Plan, example_inputs: Any = None, *,
               compensate: bool = True, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """``engine.apply`` of ``plan`` plus, with ``compensate``, the data-free fold of the removed channels'
    constant output (:func:`prunekit.compensate.constant_refits`, applied by surgery). Returns the pruned
    copy and a summary ``{"compensated": n consumers, "not_compensated": [names]}``."""
    if not compensate:
        return apply(model, graph, plan, verify=verify), {"compensated": 0, "not_compensated": []}
    fold = constant_refits(model, graph, plan, example_inputs)
    return apply(model, graph, plan.with_refits(fold.refits), verify=verify), fold.summary()


def polarization_prune(model: nn.Module, example_inputs: Any, options: PolarizationOptions | None = None, *,
                       ignored: Any = None) -> nn.Module:
    """Prune ``model`` (left untouched) by its scaling factors; returns the smaller copy with
    ``.prunekit_plan`` and ``.polarization_details`` (see :func:`polarization_plan`)."""
    opt = options or PolarizationOptions()
    graph = ChannelGraph.build(model, example_inputs, ignored=ignored)
    plan, details = polarization_plan(model, graph, opt)
    pruned, comp = apply_plan(model, graph, plan, example_inputs, compensate=opt.compensate)
    pruned.prunekit_plan = plan
    pruned.polarization_details = {**details, "compensation": comp}
    return pruned


@register_method("polarization")
def polarization_method(model: nn.Module, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """``prunekit prune --method polarization [--threshold auto|global|percent|FLOAT]``."""
    popt = PolarizationOptions.from_prune_options(options)
    pruned = polarization_prune(model, example_inputs, popt, ignored=list(options.ignored) or None)
    d = pruned.polarization_details
    return MethodResult(pruned, {**d, "pruned": d["channels_removed"], "merged": 0})


polarization_method.needs_ratio = False  # the threshold decides; --ratio only for threshold 'percent'


# ----------------------------------------------------------------------------------------------
# MACs helpers


def _input_shape(example_inputs: Any) -> tuple[int, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return tuple(example_inputs.shape[1:])
    return tuple(example_inputs)


def macs_reduction(model: nn.Module, pruned: nn.Module, example_inputs: Any) -> float:
    """``1 − MACs(pruned) / MACs(model)`` (docs/polarization.md, "How FLOPs are counted")."""
    from ..metrics import count_macs

    x = example_inputs if isinstance(example_inputs, torch.Tensor) else None
    shape = None if x is not None else _input_shape(example_inputs)
    base = count_macs(model, x, input_shape=shape)
    return 1.0 - count_macs(pruned, x, input_shape=shape) / base


def ratio_for_macs(prune_at: Callable[[float], nn.Module], model: nn.Module, example_inputs: Any,
                   target: float, *, lo: float = 0.0, hi: float = 0.98, iters: int = 16) -> tuple[float, nn.Module, float]:
    """Bisect ``r`` so that ``prune_at(r)`` removes ``target`` of the MACs (monotone in ``r``).

    Returns ``(r, pruned model, achieved reduction)``, the closest of the probes to ``target``."""
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = prune_at(mid)
        red = macs_reduction(model, m, example_inputs)
        if best is None or abs(red - target) < abs(best[2] - target):
            best = (mid, m, red)
        if abs(red - target) < 1e-3:
            break
        lo, hi = (mid, hi) if red < target else (lo, mid)
    assert best is not None
    return best


class FlopsMonitor:
    """Trainer callback: after every epoch, prune a copy with ``options`` and log what it would give
    (the official per-epoch FLOPs monitor, "train until F is stable"; docs/polarization.md, "Algorithm 1").

    Adds ``macs_reduction`` and ``channels_removed`` to the epoch record."""

    def __init__(self, options: PolarizationOptions | None = None, example_inputs: Any = None, *,
                 verbose: bool = True):
        self.options = options or PolarizationOptions()
        self.example_inputs = example_inputs
        self.verbose = verbose

    def measure(self, model: nn.Module) -> dict[str, Any]:
        x = self.example_inputs
        if x is None:
            dev = next(model.parameters()).device
            x = torch.zeros((1, *model.input_shape), device=dev)
        pruned = polarization_prune(model, x, replace(self.options, compensate=False))
        d = pruned.polarization_details
        return {"macs_reduction": macs_reduction(model, pruned, x), "channels_removed": d["channels_removed"],
                "channels_prunable": d["channels_prunable"]}

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        record.update(self.measure(trainer.module))
        say = getattr(trainer, "_say", None)
        if self.verbose and callable(say):
            say(f"epoch {epoch + 1}  polarization prune: {100 * record['macs_reduction']:.1f}% MACs, "
                f"{record['channels_removed']}/{record['channels_prunable']} channels")

