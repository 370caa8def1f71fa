"""The one-call Python API: ``prune(model, example_inputs, ratio=...)`` and ``make_plan``."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError
from .criteria import ScoreContext, get_criterion
from .graph import ChannelGraph
from .plan import GroupPlan, Plan
from .select import ROUNDINGS, SCOPES, check_choice, check_ratio, check_round_to, resolve_overrides, select
from .surgery import apply


def _require_prunable(graph: ChannelGraph) -> None:
    if graph.prunable_groups:
        return
    if graph.ignored:
        shown = ", ".join(graph.ignored[:8]) + (" ..." if len(graph.ignored) > 8 else "")
        raise ConfigError(f"nothing left to prune: the ignored modules ({shown}) together with the "
                          "model's fixed channels (inputs, outputs) protect every channel group")
    reasons = sorted({next(iter(g.blocked.values())) for g in graph.groups if g.blocked})
    raise ConfigError("the model has no prunable channel group (" + "; ".join(reasons[:3] or ["no producers"])
                      + ")")


def make_plan(model: nn.Module, graph: ChannelGraph, *, ratio: float, criterion: str = "l1-norm",
              scope: str = "local", rounding: str = "round", overrides: Mapping[str, float] | None = None,
              seed: int = 0, include_bias: bool = False, round_to: int | None = None) -> Plan:
    """Score every prunable group with ``criterion`` and keep the best channels (see
    :mod:`prunekit.engine.select`; ``round_to`` raises each group's kept width to a multiple of it, at
    most the group's size). Returns a :class:`Plan` without merge matrices."""
    ratio = check_ratio(ratio)
    check_choice(scope, SCOPES, "scope")
    check_choice(rounding, ROUNDINGS, "rounding")
    round_to = check_round_to(round_to)
    fn = get_criterion(criterion)
    _require_prunable(graph)
    per_group = resolve_overrides(graph, overrides)
    ctx = ScoreContext(model, graph, include_bias=include_bias, seed=seed)
    scores = {g.id: fn(ctx, g) for g in graph.prunable_groups}
    keep = select(graph, scores, ratio=ratio, scope=scope, rounding=rounding, overrides=per_group,
                  round_to=round_to)
    groups = []
    for g in graph.prunable_groups:
        groups.append(GroupPlan.from_group(g, keep[g.id], criterion=criterion, ratio=per_group.get(g.id, ratio),
                                           scope="local" if g.id in per_group else scope))
    meta = {"criterion": criterion, "ratio": ratio, "scope": scope, "rounding": rounding, "seed": seed,
            "include_bias": include_bias}
    if round_to is not None:
        meta["round_to"] = round_to
    return Plan(groups=groups, meta=meta)


def prune(model: nn.Module, example_inputs: Any, *, ratio: float, criterion: str = "l1-norm",
          scope: str = "local", ignored: Iterable[Any] | None = None, rounding: str = "round",
          overrides: Mapping[str, float] | None = None, seed: int = 0, include_bias: bool = False,
          leaf_modules: Iterable[Any] | None = None, round_to: int | None = None) -> nn.Module:
    """Structured channel pruning in one call; returns a NEW, physically smaller model.

    Args:
        model: any fx-traceable (or torch.export-able) module; left untouched.
        example_inputs: a tensor, tuple of tensors, kwargs dict, or a shape such as ``(1, 3, 32, 32)``.
        ratio: fraction of each group's prunable channels removed, in [0, 1).
        criterion: a name from :func:`~prunekit.engine.criteria.list_criteria`.
        scope: ``"local"`` (same ratio per group) or ``"global"`` (normalised scores ranked across groups).
        ignored: modules (names, fnmatch patterns, instances or types) whose channels are protected.
        rounding: ``"round"`` or ``"floor"`` for ``N·(1−ratio)``.
        overrides: per-module ratios, e.g. ``{"layer1.*.conv1": 0.3}``.
        seed: for the ``random`` criterion.
        include_bias: score Linear/Conv rows as ``[w | b]`` (Neuron Merging's FC definition).
        leaf_modules: modules not traced into (opaque; their inputs and outputs are protected).
        round_to: each group keeps a multiple of ``round_to`` channels (its kept width rounded *up*
            after ``rounding``, never above the group's size — then it keeps all; protected channels
            count and stay kept); None keeps the widths the ratio gives. Torch-Pruning's ``round_to``.

    Returns:
        The pruned copy; ``.prunekit_record`` holds its :class:`PruneRecord` (save it with
        ``prunekit.io.save_model(..., extra={"prune_record": record.to_dict()})``) and
        ``.prunekit_plan`` the applied :class:`Plan`.
    """
    ratio = check_ratio(ratio)
    round_to = check_round_to(round_to)
    graph = ChannelGraph.build(model, example_inputs, ignored=ignored, leaf_modules=leaf_modules)
    plan = make_plan(model, graph, ratio=ratio, criterion=criterion, scope=scope, rounding=rounding,
                     overrides=overrides, seed=seed, include_bias=include_bias, round_to=round_to)
    pruned = apply(model, graph, plan)
    pruned.prunekit_plan = plan
    return pruned
