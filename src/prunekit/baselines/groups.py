"""What the baselines read of a :class:`~prunekit.engine.ChannelGraph` group: consumer columns, parameter
slices per channel, and which groups are paper structures.

* :func:`consumer_columns` — per consumer (an ``in`` member) of a group: the input columns it reads from
  the group, their group channel, and the consumer's weight on them as (O, columns, K) (K: kernel taps;
  1 for a Linear). Heads: the output projection's H·D columns (channel = kv head); MLP neurons: the down
  projection's columns.
* :func:`member_slices` — per member, every parameter the member slices, indexed by the member's
  indices (producer rows + bias, consumer columns, norm γ/β, functionally used parameters): what
  Torch-Pruning's group magnitude sums over, and what a channel costs.
* :func:`classify` — a group is a **structure** (head group, MLP neurons, a CNN layer's filters) when
  exactly one module consumes it, a **multi-consumer** group (the hidden size / residual stream) when
  several do, and **unscored** when a consumer's columns cannot be read (grouped/depthwise conv, a
  layer without a rule) or none exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..engine.channels import Group
from ..engine.costs import channel_costs, member_slices
from ..engine.graph import ChannelGraph
from ..engine.rules import find_rule
from .activations import column_dim

__all__ = ["Columns", "channel_costs", "classify", "consumer_columns", "head_groups", "member_slices", "weight_columns",
           "weight_oik"]


@dataclass
class Columns:
    """The input columns ``cols`` of consumer ``module`` that belong to one group and their group
    ``channel``, with the per-column weight sums the scores need (float64, (len(cols),)):
    ``abs_sum[j] = Σ_{o,k} |W[o, j, k]|`` and ``sq_sum[j] = Σ_{o,k} W[o, j, k]²`` (W: (O, I, K), K the kernel
    taps, 1 for a Linear). The weight itself is read again only where needed (:func:`weight_columns`)."""

    module: str
    cols: np.ndarray
    channel: np.ndarray
    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    taps: int


def weight_oik(module: nn.Module) -> torch.Tensor:
    """The consumer's weight as an (O, I, K) view, whatever its own layout (Linear (O, I), Conv1D (I, O), conv
    (O, I, *k)); not copied, same dtype and device."""
    rule = find_rule(type(module))
    o, i = rule.param_dims(module, "out")["weight"], rule.param_dims(module, "in")["weight"]
    w = module.weight.detach()
    return w.movedim((o, i), (0, 1)).reshape(w.shape[o], w.shape[i], -1)


def weight_columns(model: nn.Module, c: Columns, which: np.ndarray | None = None) -> torch.Tensor:
    """``W[:, cols[which], :]`` of ``c``'s consumer (float64, on the weight's device)."""
    cols = c.cols if which is None else c.cols[which]
    w = weight_oik(model.get_submodule(c.module))
    return w[:, torch.from_numpy(cols).to(w.device)].double()


def consumer_columns(model: nn.Module, group: Group) -> tuple[list[Columns], list[str]]:
    """``(columns per readable consumer, names of consumers that cannot be read)`` of ``group``."""
    out, unreadable = [], []
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in group.members:
        if m.role != "in":
            continue
        module = model.get_submodule(m.module)
        if column_dim(module) is None:
            unreadable.append(m.module)
            continue
        w = weight_oik(module)
        if w.shape[1] != len(m):  # pragma: no cover - the graph was built from another model
            unreadable.append(m.module)
            continue
        if m.module not in sums:  # one consumer at a time in float64: (I,) sums kept, not the weight
            wd = w.double()
            sums[m.module] = (wd.abs().sum((0, 2)).cpu(), wd.pow(2).sum((0, 2)).cpu())
            del wd
        cols = m.indices(group.id)
        sel = torch.from_numpy(cols)
        a, q = sums[m.module]
        out.append(Columns(m.module, cols, m.channel[cols], a[sel], q[sel], w.shape[2]))
    return out, unreadable


def head_groups(graph: ChannelGraph) -> set[int]:
    """Ids of the groups whose channels are attention heads (a kv head with its query heads)."""
    return {int(g) for s in graph.head_splits if s.kind == "heads" for g in s.group.tolist() if g >= 0}


def classify(model: nn.Module, graph: ChannelGraph) -> dict[int, tuple[str, list[Columns], str | None]]:
    """``{group id: (kind, columns, why)}`` for every prunable group; kind is ``"heads"``, ``"neurons"``
    (one consumer), ``"multi"`` (several consumers: the hidden size) or ``"unscored"`` (``why`` says why)."""
    heads = head_groups(graph)
    out = {}
    for g in graph.prunable_groups:
        cols, bad = consumer_columns(model, g)
        if bad:
            out[g.id] = ("unscored", cols, f"consumer(s) {bad} are neither Linear-like nor ungrouped convs")
        elif not cols:
            out[g.id] = ("unscored", cols, "no module consumes its channels")
        elif len({c.module for c in cols}) > 1:
            out[g.id] = ("multi", cols, None)
        else:
            out[g.id] = ("heads" if g.id in heads else "neurons", cols, None)
    return out
