"""The ``merge``, ``lstsq`` and ``reconstruct`` methods of ``prunekit prune --method NAME`` (see :mod:`prunekit.methods`).

``PruneOptions`` carries the shared selection options (ratio, criterion, scope, rounding, overrides,
ignored, include_bias, seed) and ``threshold`` (the minimum cosine to merge); method-specific ones
come in ``options.method_options`` (CLI: ``--lam``, ``--bn-scale``, ``--preset``, ``--calibration`` or
``--method-option KEY=VALUE``):

* ``merge``: ``preset``, ``lam``, ``bn_scale`` (``exact``|``paper``), ``negative`` (``skip``|``allow``),
  ``model_type`` (``merge``|``prune``).
* ``reconstruct``: ``calibration``, ``ridge`` (default: chosen on held-out data), ``intercept``, ``holdout``,
  ``select`` (``greedy``, default, or ``criterion``), ``residual`` (residual-aware targets), ``layers``
  (``consumers`` or ``all``), ``bn_recalibrate``, ``calibration_seed``, ``batch_size``.
* ``lstsq``: the same selection options plus ``calibration`` (N inputs), ``ridge``, ``init``
  (``prune``|``merge``), ``intercept``, ``calibration_seed``; ``criterion="greedy"`` picks the survivors
  from the calibration data (forward selection) instead of a weight criterion. The calibration inputs
  come from ``options.calibration_data`` (a dataset, a tensor, or a zero-argument callable returning
  one; the CLI passes the training split without augmentation). Labels are never read.

``include_bias=None`` means the Neuron Merging default: fully connected neurons are scored as ``[w | b]``.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..compensate import LstsqOptions, ReconstructOptions, reconstruct_plan
from ..engine import ChannelGraph, GroupPlan, Plan, apply
from ..engine.select import resolve_overrides
from ..errors import ConfigError
from ..methods import MethodResult, PruneOptions, register_method
from .core import MergeOptions, compensate, merge, select

_MERGE_KEYS = {"preset", "lam", "bn_scale", "negative", "model_type"}
_LSTSQ_KEYS = {"calibration", "ridge", "init", "intercept", "calibration_seed", "batch_size"}
#: every ReconstructOptions field is a method option (``seed`` is ``calibration_seed``)
_RECONSTRUCT_FIELDS = tuple(f.name for f in fields(ReconstructOptions) if f.name not in ("seed", "round_to"))
_RECONSTRUCT_KEYS = {*_RECONSTRUCT_FIELDS, "calibration_seed"}


def merge_options(options: PruneOptions, *, method: str = "merge") -> MergeOptions:
    """:class:`MergeOptions` from the CLI/registry options (unknown ``extra`` keys are errors)."""
    extra = dict(getattr(options, "method_options", None) or {})
    allowed = _MERGE_KEYS | _LSTSQ_KEYS | _RECONSTRUCT_KEYS  # merge ignores the data-light keys
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ConfigError(f"method option(s) {unknown} not understood by '{method}'; "
                          f"known: {sorted(allowed)}")
    include_bias = True if options.include_bias is None else bool(options.include_bias)
    criterion = options.criterion
    if criterion == "greedy":
        if method == "merge":
            raise ConfigError("criterion 'greedy' selects survivors from calibration data: use --method lstsq or "
                          "reconstruct")
        criterion = "l1-norm"  # only the number of survivors per group is used
    kw: dict[str, Any] = {k: extra[k] for k in _MERGE_KEYS if k in extra and extra[k] is not None}
    threshold = getattr(options, "threshold", None)
    if threshold is not None:
        try:
            kw["threshold"] = float(threshold)
        except (TypeError, ValueError):
            raise ConfigError(f"merge threshold must be a number (a cosine; 0 = no threshold), got {threshold!r}"
                              ) from None
    return MergeOptions(ratio=options.ratio, criterion=criterion, scope=options.scope, rounding=options.rounding,
                        round_to=getattr(options, "round_to", None),
                        overrides=dict(options.overrides) or None, ignored=tuple(options.ignored) or None,
                        include_bias=include_bias, seed=options.seed, **kw)


def _calibration_data(options: PruneOptions, method: str) -> Any:
    data = getattr(options, "calibration_data", None)
    if callable(data):
        data = data()
    if data is None:
        raise ConfigError(f"method '{method}' needs calibration inputs: pass PruneOptions(calibration_data=dataset) "
                          "(the CLI uses the training split of --dataset)")
    return data


def _details(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("channels_removed", "merged", "pruned", "skipped_threshold", "skipped_sign", "skipped_invalid",
            "negative_merged", "groups_planned", "groups_merged", "groups_pruned_only")
    out = {k: report[k] for k in keys if k in report}
    out["groups"] = report.get("groups", [])
    return out


@register_method("merge")
def neuron_merging(model, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """Neuron Merging: prune by the criterion, then merge each pruned neuron into its most similar kept
    neuron wherever the engine allows a merge (the rest is pruned); see :mod:`prunekit.merging`."""
    mo = merge_options(options)
    result = merge(model, example_inputs, mo)
    details = {"model_type": mo.model_type, "preset": mo.preset, "bn_scale": mo.bn_scale,
               "threshold": mo.threshold, "lam": mo.lam, "include_bias": mo.include_bias,
               **_details(result.report)}
    return MethodResult(result.model, details)


@register_method("lstsq")
def least_squares(model, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """Data-light compensation: survivors as ``merge``/``prune`` (or ``criterion='greedy'``), consumers
    refitted by ridge least squares on unlabeled calibration inputs, layer by layer."""
    extra = dict(getattr(options, "method_options", None) or {})
    mo = merge_options(options, method="lstsq")
    data = _calibration_data(options, "lstsq")
    lo = LstsqOptions(**{k: extra[k] for k in ("calibration", "ridge", "init", "intercept", "batch_size")
                         if extra.get(k) is not None},
                      select="greedy" if options.criterion == "greedy" else "criterion",
                      seed=int(extra.get("calibration_seed") or 0))
    result = compensate(model, example_inputs, data, lo, mo)
    details = {"criterion_used": options.criterion, "preset": mo.preset, "include_bias": mo.include_bias,
               "calibration": lo.calibration, "ridge": lo.ridge, "select": lo.select, "init": lo.init,
               **_details(result.report)}
    return MethodResult(result.model, details)


def _with_whole_groups(graph: ChannelGraph, plan: Plan, options: PruneOptions) -> Plan:
    """``plan`` plus every prunable group the global ranking left whole (overridden groups excepted), at the
    global ratio: all of them share the budget of ``select="global"``."""
    fixed = set(resolve_overrides(graph, options.overrides))
    have = {gp.group_id for gp in plan.groups}
    extra = [GroupPlan.from_group(g, list(range(g.size)), criterion=options.criterion, ratio=options.ratio)
             for g in graph.prunable_groups if g.id not in have and g.id not in fixed]
    return Plan(groups=[*plan.groups, *extra], meta=dict(plan.meta), refits=list(plan.refits))


def _reconstruct_selection(options: PruneOptions, asked: str | None) -> str:
    """``criterion="greedy"`` → greedy; else the ``select`` method option; else ``global`` in global scope
    (the budget spent across groups where the refit loses least) and ``greedy`` (uniform widths) otherwise."""
    if options.criterion == "greedy":
        return "greedy"
    return asked or ("global" if options.scope == "global" else "greedy")


@register_method("reconstruct")
def reconstruct(model, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """Whole-layer reconstruction: as many survivors per group as the criterion (or a preset, e.g. ``resnet``)
    keeps, chosen greedily from the calibration data against the consumers' outputs (``select=criterion``:
    the criterion's own survivors; ``scope="global"`` or ``select=global``: the same MACs spent across
    groups where the refit loses least, :mod:`prunekit.compensate.allocate`), then every
    consumer's whole weight refit by ridge least squares of its original output on unlabeled calibration
    inputs, in execution order (:mod:`prunekit.compensate.reconstruct`)."""
    extra = dict(getattr(options, "method_options", None) or {})
    mo = merge_options(options, method="reconstruct").replace(model_type="prune")
    data = _calibration_data(options, "reconstruct")
    ro = ReconstructOptions(**{k: extra[k] for k in _RECONSTRUCT_FIELDS if k != "select"
                               and extra.get(k) is not None},
                            select=_reconstruct_selection(options, extra.get("select")), round_to=options.round_to,
                            seed=int(extra.get("calibration_seed") or 0))
    graph = ChannelGraph.build(model, example_inputs, ignored=list(mo.ignored or ()) or None)
    planned = select(model, graph, mo)
    if ro.select == "global" and options.scope == "global" and mo.preset is None:  # a preset names its groups
        planned = _with_whole_groups(graph, planned, options)
    plan, reports = reconstruct_plan(model, graph, planned, data, ro)
    new = apply(model, graph, plan)
    new.prunekit_plan = plan
    refit = [r for r in reports if r["action"] == "refit"]
    removed = sum(g.size - len(g.keep) for g in plan.groups)
    return MethodResult(new, {"criterion_used": options.criterion, "preset": mo.preset, "calibration": ro.calibration,
                              "ridge": ro.ridge, "select": ro.select, "allocation": plan.meta.get("allocation"),
                              "channels_removed": removed, "pruned": removed, "merged": 0,
                              "consumers_refit": len(refit),
                              "underdetermined": [r["module"] for r in refit if r["underdetermined"]],
                              "groups": reports})
