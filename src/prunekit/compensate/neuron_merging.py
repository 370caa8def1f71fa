"""Neuron Merging's compensation matrices for one planned group, read from the unmodified weights.

For a group with one producer, :func:`layer_view` reads the producer rows (N, F), its bias and the
BatchNorm right after it; :func:`decompose_group` then runs Algorithm 1 of Kim et al. (NeurIPS 2020)
with MostSim (no BN: vectors ``[w | b]``) or MostSim+BN (filters only; BN statistics folded) and returns
the :class:`~prunekit.compensate.decompose.Decomposition` whose ``merge`` (N × P) is the group's merge
matrix ``M = Zᵀ``. Data-free; the model is only read. See ``docs/neuron-merging.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine import ChannelGraph, GroupPlan, find_rule
from ..engine.graph import Group
from ..errors import ConfigError
from .decompose import BN_SCALES, NEGATIVE, BNStats, Decomposition, most_sim, most_sim_bn

#: per-layer threshold defaults of the official scripts when none is given
DEFAULT_FC_THRESHOLD = 0.45
DEFAULT_BN_THRESHOLD = 0.1
DEFAULT_LAM = 0.85


@dataclass(frozen=True)
class MatrixOptions:
    """How the merge matrix of one group is computed.

    Attributes:
        threshold_fc: minimum cosine to merge in a layer without BatchNorm (Alg. 2); 0 disables it.
        threshold_bn: minimum cosine for a producer → BatchNorm layer (Alg. 3).
        lam: λ of MostSim+BN (weight of the bias-term distance).
        bn_scale: ``exact`` | ``paper`` (the official code's formulas).
        negative: ``skip`` | ``allow`` merges whose scale is not positive.
    """

    threshold_fc: float = DEFAULT_FC_THRESHOLD
    threshold_bn: float = DEFAULT_BN_THRESHOLD
    lam: float = DEFAULT_LAM
    bn_scale: str = "exact"
    negative: str = "skip"

    def __post_init__(self) -> None:
        if self.bn_scale not in BN_SCALES:
            raise ConfigError(f"bn_scale must be one of {list(BN_SCALES)}, got {self.bn_scale!r}")
        if self.negative not in NEGATIVE:
            raise ConfigError(f"negative must be one of {list(NEGATIVE)}, got {self.negative!r}")
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ConfigError(f"lam must be in [0, 1], got {self.lam!r}")




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


def group_report(graph: ChannelGraph, gp: GroupPlan) -> dict[str, Any]:
    """The common head of a group's compensation report (group, name, size, kept, removed, mergeable)."""
    g = graph.groups[gp.group_id]
    return {"group": g.id, "name": g.name, "size": g.size, "kept": len(gp.keep), "removed": g.size - len(gp.keep),
            "mergeable": g.mergeable}


def pruned_only(report: dict[str, Any], reason: str) -> dict[str, Any]:
    """A report for a group whose removed channels are pruned without compensation."""
    return {**report, "action": "pruned", "reason": reason, "merged": 0, "pruned": report["removed"]}


def decompose_group(model: nn.Module, graph: ChannelGraph, gp: GroupPlan,
                    options: MatrixOptions | None = None) -> tuple[Decomposition | None, dict[str, Any]]:
    """Algorithm 1 for one planned group; ``(None, report)`` when the group can only be pruned."""
    options = options or MatrixOptions()
    g = graph.groups[gp.group_id]
    report = group_report(graph, gp)
    removed = report["removed"]
    if removed == 0:
        return None, {**report, "action": "kept", "merged": 0, "pruned": 0}
    if not g.mergeable:
        return None, pruned_only(report, f"not mergeable: {g.merge_reason}")
    view = layer_view(model, graph, g)
    if view.why_not is not None:
        return None, pruned_only(report, view.why_not)
    if view.bn is None:
        dec = most_sim(view.vectors(), gp.keep, threshold=options.threshold_fc, negative=options.negative)
        algo = {"algorithm": "mostsim", "threshold": options.threshold_fc}
    else:
        dec = most_sim_bn(view.vectors(), gp.keep, view.bn, lam=options.lam, threshold=options.threshold_bn,
                          bn_scale=options.bn_scale, negative=options.negative)
        algo = {"algorithm": "mostsim-bn", "threshold": options.threshold_bn, "lam": options.lam,
                "bn_scale": options.bn_scale, "norm": view.norm}
    stats = dec.stats()
    action = "merged" if stats["merged"] else "pruned"
    out = {**report, "action": action, **algo, **stats, "pruned": removed - stats["merged"]}
    if not stats["merged"]:
        out["reason"] = "no pruned channel passed the threshold/sign tests"
    return dec, out
