"""The ``magnitude``, ``wanda-sp`` and ``flap`` methods of ``prunekit prune --method NAME``.

Shared options come from :class:`~prunekit.methods.PruneOptions` (``ratio``, ``scope``, ``rounding``,
``round_to``, ``overrides``, ``ignored``); method options (``options.method_options``, CLI
``--method-option KEY=VALUE``):

* ``magnitude``: ``p`` (1, default, or 2); ``include_bias`` adds producer/norm biases (TP's ``bias=True``).
* ``wanda-sp`` and ``flap``: ``calibration`` (number of calibration inputs, default 128 or all there are),
  ``batch_size`` (8), ``calibration_seed`` (0), ``hidden`` — what happens to groups read by several
  consumers (the hidden size): ``keep`` (default: the papers prune heads and MLP neurons only), ``sum``
  (the same formula summed over the consumers; FLAP: standardised per consumer, averaged) or
  ``magnitude`` (the ``magnitude`` criterion; no compensation).
* ``flap`` only: ``structure`` (``AL-AM``/``global``, default, or ``UL-UM``/``local``; ``scope`` is not
  read), ``metric`` (``WIFV``, default, ``IFV``, ``WIFN``), ``compensate`` (bias compensation, default on).

Calibration inputs come from ``options.calibration_data`` (a tensor of token ids or images, a dict of
tensors, a dataset, or a zero-argument callable returning one); labels are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compensate.calibration import calibration_inputs, n_inputs
from ..engine import ChannelGraph, GroupPlan, Plan, Refit, ScoreContext, apply, prune
from ..engine.select import check_choice, check_round_to, resolve_overrides, round_width, select
from ..errors import ConfigError
from ..methods import MethodResult, PruneOptions, register_method
from .activations import InputStats, column_dim, input_statistics
from .flap import METRICS, STRUCTURES, adaptive_keep, compensation_offsets, flap_scores, flap_standardized
from .groups import Columns, channel_costs, classify
from .magnitude import group_magnitude
from .wanda import wanda_sp_scores

__all__ = ["baseline_plan", "flap_method", "magnitude_method", "wanda_sp_method"]

HIDDEN = ("keep", "sum", "magnitude")
_DATA_KEYS = {"calibration", "batch_size", "calibration_seed", "hidden"}
_FLAP_KEYS = _DATA_KEYS | {"structure", "metric", "compensate"}
DEFAULT_CALIBRATION = 128


def _method_options(options: PruneOptions, method: str, allowed: set[str]) -> dict[str, Any]:
    extra = {k: v for k, v in dict(options.method_options or {}).items() if v is not None}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ConfigError(f"method option(s) {unknown} not understood by '{method}'; known: {sorted(allowed)}")
    return extra


def _int(value: Any, what: str, low: int = 1) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v is None or isinstance(value, bool) or v < low or (isinstance(value, float) and v != value):
        raise ConfigError(f"{what} must be an integer ≥ {low}, got {value!r}")
    return v


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false, got {value!r}")


def _calibration(options: PruneOptions, method: str, extra: dict[str, Any]) -> tuple[Any, int]:
    data = options.calibration_data
    if callable(data):
        data = data()
    if data is None:
        raise ConfigError(f"method '{method}' needs calibration inputs: pass PruneOptions(calibration_data=...) "
                          "(token ids, images, a dict of tensors or a dataset; the CLI uses the training split)")
    total = n_inputs(data)
    n = _int(extra["calibration"], "calibration") if "calibration" in extra else min(DEFAULT_CALIBRATION, total)
    seed = _int(extra.get("calibration_seed", 0), "calibration_seed", low=0)
    return calibration_inputs(data, n, seed), n


def _finish(group: Any, scores: torch.Tensor, keep: list[int], round_to: int | None) -> list[int]:
    """Every member keeps ≥ 1 channel (its best), then the width is raised to a multiple of ``round_to``
    with the best removed channels (as :func:`prunekit.engine.select.select` does for its scopes)."""
    s = scores.double().numpy()
    kept = set(keep)
    for m in group.members:
        chans = set(m.channel[m.group == group.id].tolist())
        if chans and not chans & kept:
            kept.add(max(chans, key=lambda c: (s[c], -c)))
    extra = round_width(len(kept), group.size, round_to) - len(kept)
    if extra > 0:
        removed = sorted(set(range(group.size)) - kept, key=lambda c: (-s[c], c))
        kept |= set(removed[:extra])
    return sorted(kept)


@dataclass
class _Scored:
    """What :func:`baseline_plan` decided about the graph's groups before selection."""

    kinds: dict[int, tuple[str, list[Columns], str | None]]
    by_act: list[int]  # scored from the calibration statistics (and compensated by flap)
    by_mag: list[int]  # scored by the magnitude criterion (hidden="magnitude")
    whole: dict[int, str]  # left whole, and why
    stats: dict[str, InputStats]
    scores: dict[int, torch.Tensor]


def _score(model: nn.Module, graph: ChannelGraph, user: dict[int, float], method: str, data: Any, hidden: str,
           batch_size: int, adaptive: bool, metric: str) -> _Scored:
    kinds = classify(model, graph)
    by_act = [g for g, k in kinds.items() if k[0] in ("heads", "neurons") or (k[0] == "multi" and hidden == "sum")]
    by_mag = [g for g, k in kinds.items() if k[0] == "multi" and hidden == "magnitude"]
    whole = {g: k[2] or "read by several consumers (the hidden size; method option hidden=sum or magnitude "
                        "prunes it)" for g, k in kinds.items() if g not in by_act and g not in by_mag}
    for g, r in user.items():
        if g in whole and r > 0:
            raise ConfigError(f"an override asks '{method}' to prune group '{graph.groups[g].name}', which it "
                              f"leaves whole: {whole[g]}")
    names = sorted({c.module for g in by_act for c in kinds[g][1]})
    stats = input_statistics(model, names, data, batch_size=batch_size) if names else {}
    scores = {}
    for g in graph.prunable_groups:
        pooled = adaptive and g.id not in user
        if g.id in by_act:
            kind, cols, _ = kinds[g.id]
            if method == "wanda-sp":
                scores[g.id] = wanda_sp_scores(g.size, cols, stats)
            else:
                fn = flap_standardized if pooled else flap_scores
                scores[g.id] = fn(g.size, cols, stats, metric, heads=kind == "heads")
        elif g.id in by_mag:
            s = group_magnitude(ScoreContext(model, graph), g, p=1.0)
            scores[g.id] = (s - s.mean()) / s.std() if pooled and s.std() > 0 else s
        else:
            scores[g.id] = torch.zeros(g.size, dtype=torch.float64)
    return _Scored(kinds, by_act, by_mag, whole, stats, scores)


def _keep(model: nn.Module, graph: ChannelGraph, options: PruneOptions, sc: _Scored, fixed: dict[int, float],
          adaptive: bool, round_to: int | None) -> dict[int, list[int]]:
    """Kept channels per prunable group: the engine's ``select`` (local, or its global ranking), or FLAP's
    adaptive ranking over the groups no override or ``whole`` fixes."""
    if not adaptive:
        return select(graph, sc.scores, ratio=options.ratio, scope=options.scope, rounding=options.rounding,
                      overrides=fixed, round_to=round_to)
    keep = select(graph, sc.scores, ratio=0.0, scope="local", rounding=options.rounding, overrides=fixed,
                  round_to=round_to)
    pool = {g.id: (np.asarray(g.prunable, dtype=np.int64), sc.scores[g.id], channel_costs(model, g))
            for g in graph.prunable_groups if g.id not in fixed}
    if pool:
        for gid, chosen in adaptive_keep(pool, options.ratio).items():
            group = graph.groups[gid]
            keep[gid] = _finish(group, sc.scores[gid], sorted(set(group.blocked) | set(chosen)), round_to)
    return keep


def _refits(model: nn.Module, sc: _Scored, keep: dict[int, list[int]], method: str) -> tuple[list[Refit], list[str]]:
    """FLAP's bias compensation as one :class:`Refit` offset per consumer; and the consumers left without."""
    offsets: dict[str, torch.Tensor] = {}
    skipped: set[str] = set()
    for gid in sc.by_act:
        cols = [c for c in sc.kinds[gid][1] if column_dim(model.get_submodule(c.module)) == -1]
        skipped |= {c.module for c in sc.kinds[gid][1]} - {c.module for c in cols}
        for name, delta in compensation_offsets(model, cols, keep[gid], sc.stats).items():
            offsets[name] = offsets[name] + delta if name in offsets else delta
    why = "bias compensation: the removed inputs replaced by their calibration mean"
    refits = [Refit(module=name, offset=delta.to(model.get_submodule(name).weight.dtype),
                    provenance={"method": method, "what": why}) for name, delta in sorted(offsets.items())]
    return refits, sorted(skipped)


def baseline_plan(model: nn.Module, graph: ChannelGraph, options: PruneOptions, *, method: str, data: Any,
                  hidden: str = "keep", batch_size: int = 8, structure: str = "local", metric: str = "WIFV",
                  compensate: bool = False) -> tuple[Plan, dict[str, Any]]:
    """The :class:`Plan` of ``wanda-sp`` (``method="wanda-sp"``) or ``flap`` (``structure`` ``"global"`` =
    AL-AM or ``"local"`` = UL-UM) on ``graph`` from calibration inputs ``data`` (already sampled: a tensor or a
    dict of tensors), and a report. See the module docstrings for the formulas."""
    check_choice(method, ("wanda-sp", "flap"), "method")
    check_choice(hidden, HIDDEN, "hidden")
    check_choice(metric, METRICS, "metric")
    check_choice(structure, ("global", "local"), "structure")
    round_to = check_round_to(options.round_to)
    adaptive = method == "flap" and structure == "global"
    user = resolve_overrides(graph, options.overrides)
    sc = _score(model, graph, user, method, data, hidden, batch_size, adaptive, metric)
    fixed = {**{g: 0.0 for g in sc.whole}, **user}
    keep = _keep(model, graph, options, sc, fixed, adaptive, round_to)
    scope = "adaptive" if adaptive else options.scope
    groups = [GroupPlan.from_group(g, keep[g.id], criterion=method, kind=sc.kinds[g.id][0],
                                   scope="local" if g.id in fixed else scope) for g in graph.prunable_groups]
    refits, skipped = _refits(model, sc, keep, method) if compensate else ([], [])
    meta = {"method": method, "ratio": options.ratio, "scope": scope, "rounding": options.rounding, "hidden": hidden}
    if method == "flap":
        meta.update(metric=metric, structure="AL-AM" if adaptive else "UL-UM", compensate=compensate)
    if round_to is not None:
        meta["round_to"] = round_to
    report = {"scored": {k: sum(1 for g in [*sc.by_act, *sc.by_mag] if sc.kinds[g][0] == k)
                         for k in ("heads", "neurons", "multi")},
              "left_whole": {graph.groups[g].name: why for g, why in sc.whole.items()},
              "consumers": sorted(sc.stats), "compensated": [r.module for r in refits],
              "created_biases": [r.module for r in refits if model.get_submodule(r.module).bias is None],
              "uncompensated": skipped}
    return Plan(groups=groups, meta=meta, refits=refits), report


def _apply(model: nn.Module, graph: ChannelGraph, plan: Plan, details: dict[str, Any]) -> MethodResult:
    new = apply(model, graph, plan)
    new.prunekit_plan = plan
    removed = sum(g.size - len(g.keep) for g in plan.groups)
    return MethodResult(new, {**details, "groups": len(plan.groups), "channels_removed": removed,
                              "pruned": removed, "merged": 0})


def _data_method(model: nn.Module, example_inputs: Any, options: PruneOptions, method: str) -> MethodResult:
    extra = _method_options(options, method, _FLAP_KEYS if method == "flap" else _DATA_KEYS)
    hidden = extra.get("hidden", "keep")
    check_choice(hidden, HIDDEN, "method option 'hidden'")
    kw: dict[str, Any] = {"hidden": hidden, "batch_size": _int(extra.get("batch_size", 8), "batch_size")}
    if method == "flap":
        structure = str(extra.get("structure", "AL-AM"))
        if structure not in STRUCTURES:
            raise ConfigError(f"flap structure must be one of {list(STRUCTURES)}, got {structure!r}")
        kw.update(structure=STRUCTURES[structure], metric=str(extra.get("metric", "WIFV")).upper(),
                  compensate=_bool(extra.get("compensate", True), "compensate"))
    data, n = _calibration(options, method, extra)
    graph = ChannelGraph.build(model, example_inputs, ignored=list(options.ignored) or None)
    plan, report = baseline_plan(model, graph, options, method=method, data=data, **kw)
    return _apply(model, graph, plan, {"calibration": n, **{k: v for k, v in plan.meta.items() if k != "ratio"},
                                       **report})


@register_method("wanda-sp")
def wanda_sp_method(model: nn.Module, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """Structured Wanda (FLAP's Wanda-sp): heads and MLP neurons scored by ``Σ |W_ij|·‖X_j‖₂`` over their
    consumer's columns, uniform ratio per group (``scope="global"``: the engine's normalised ranking)."""
    return _data_method(model, example_inputs, options, "wanda-sp")


@register_method("flap")
def flap_method(model: nn.Module, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """FLAP: fluctuation metric, adaptive global structure, bias compensation of the removed inputs."""
    return _data_method(model, example_inputs, options, "flap")


@register_method("magnitude")
def magnitude_method(model: nn.Module, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """Plain structured pruning with Torch-Pruning's group magnitude (criterion ``magnitude``, or
    ``magnitude-l2`` with ``p=2``): every parameter slice of a channel, mean-normalised per group."""
    extra = _method_options(options, "magnitude", {"p"})
    p = str(extra.get("p", 1)).strip()
    criterion = {"1": "magnitude", "1.0": "magnitude", "2": "magnitude-l2", "2.0": "magnitude-l2"}.get(p)
    if criterion is None:
        raise ConfigError(f"magnitude p must be 1 or 2, got {extra['p']!r}")
    kwargs = {**options.engine_kwargs(), "criterion": criterion}
    pruned = prune(model, example_inputs, **kwargs)
    plan = pruned.prunekit_plan
    removed = sum(g.size - len(g.keep) for g in plan.groups)
    return MethodResult(pruned, {"criterion_used": criterion, "p": int(float(p)),
                                 "include_bias": bool(options.include_bias), "groups": len(plan.groups),
                                 "channels_removed": removed, "pruned": removed, "merged": 0})
