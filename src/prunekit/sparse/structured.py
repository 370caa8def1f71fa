"""Structured half of ``sparsify``: physically remove the channels that exact zeros made dead.

A channel ``c`` of an engine group is **dead** when it cannot change the model's output:

* **constant** (a): every producer row of ``c`` is exactly zero (``rows(W)[c] = 0``, bias free), or
  the group has one producer followed directly by a BatchNorm with ``γ_c = 0``. The channel then
  carries an input-independent value ``k_c`` (``act(BN(b_c))`` ...). Each consumer's input on ``c`` is
  measured on a random probe batch and must be constant over the batch and spatial positions; a
  nonzero ``k_c`` is folded into the consumer (``b += W[:, c]·k_c``, or the following BN's running
  mean) by :mod:`prunekit.compensate.constants` (applied by surgery), which is exact for Linear consumers and for
  Conv2d consumers without padding. Anything else keeps the channel.
* **unused** (b): every consumer's input columns of ``c`` are exactly zero (``W[:, c] = 0``), so the
  channel contributes nothing whatever it carries.

Groups with a LayerNorm/GroupNorm member are skipped: removing a channel there changes the other
channels' statistics. Removal repeats until nothing more is dead (folding a constant into a bias can
turn a consumer row into a constant channel of the next layer).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compensate import constant_refits, followers
from ..engine import ChannelGraph, GroupPlan, Plan, apply
from ..engine.errors import SurgeryError
from ..engine.graph import Group, Member
from ..engine.rules import GroupNormRule, LayerNormRule, find_rule
from ..runtime import call, capture, eval_mode

__all__ = ["DeadChannels", "capture_inputs", "dead_channel_plan", "remove_dead_channels"]


@dataclass
class DeadChannels:
    """Dead channels of one group (indices in the group's channel numbering)."""

    name: str
    size: int
    constant: list[int] = field(default_factory=list)
    unused: list[int] = field(default_factory=list)
    kept_reason: dict[int, str] = field(default_factory=dict)

    @property
    def dead(self) -> list[int]:
        return sorted(set(self.constant) | set(self.unused))


def _consumer_columns(module: nn.Module) -> Callable[[list[int]], torch.Tensor] | None:
    """``idx ↦`` the consumer's weight entries reading input indices ``idx`` (None: unsupported)."""
    w = module.weight.detach()
    if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
                                         and module.groups == 1):
        return lambda idx: w[:, idx]
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed and module.groups == 1:
        return lambda idx: w[idx]
    return None


def capture_inputs(model: nn.Module, names: set[str], probe: Any) -> dict[str, torch.Tensor]:
    """The first input tensor of each module in ``names`` during one eval forward on ``probe``."""
    with eval_mode(model), capture(model, sorted(names)) as seen:
        call(model, probe)
    return dict(seen.values)


def _channel_slice(module: nn.Module, x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x``'s entries at input indices ``idx`` of ``module``: (idx, everything else) — Linear reads the
    last dim, convolutions dim 1."""
    dim = x.dim() - 1 if isinstance(module, nn.Linear) else 1
    return x.index_select(dim, torch.tensor(idx, device=x.device)).movedim(dim, 0).flatten(1)


def _foldable(module: nn.Module, name: str, follow: dict[str, str]) -> str | None:
    """None when a nonzero constant input of ``module`` folds exactly into it; else why not."""
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        pad = module.padding
        if pad == "same" or (isinstance(pad, tuple) and any(pad)):
            return f"'{name}' is a padded conv (a constant input is not constant at its borders)"
    elif not isinstance(module, nn.Linear):
        return f"'{name}' ({type(module).__name__}) cannot absorb a constant input"
    if module.bias is None and name not in follow:
        return f"'{name}' has no bias and no BatchNorm right after it"
    return None


class _Finder:
    """Finds the dead channels of one graph (see the module docstring)."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, probe: Any):
        self.model, self.graph = model, graph
        self.follow = followers(model)
        consumers = {m.module for m in graph.members if m.role == "in"}
        self.inputs = capture_inputs(model, consumers, probe)

    def _readers(self, group: Group, c: int) -> list[tuple[Member, list[int]]]:
        out = []
        for m in group.members:
            if m.role == "in":
                idx = ((m.group == group.id) & (m.channel == c)).nonzero()[0].tolist()
                if idx:
                    out.append((m, idx))
        return out

    def _rows_zero(self, group: Group, c: int) -> bool:
        producers = [m for m in group.members if m.role == "out" and m.fresh]
        for m in producers:
            module = self.model.get_submodule(m.module)
            idx = ((m.group == group.id) & (m.channel == c)).nonzero()[0].tolist()
            if bool(find_rule(type(module)).rows(module)[idx].any()):
                return False
        return bool(producers)

    def _gamma_zero(self, group: Group, c: int) -> bool:
        producers = [m for m in group.members if m.role == "out" and m.fresh]
        if len(producers) != 1 or producers[0].module not in self.follow:
            return False
        bn_name = self.follow[producers[0].module]
        bn = self.graph.member(bn_name, "norm")
        weight = getattr(self.model.get_submodule(bn_name), "weight", None)
        if bn is None or weight is None:
            return False
        idx = ((bn.group == group.id) & (bn.channel == c)).nonzero()[0].tolist()
        return bool(idx) and not bool(weight.detach()[idx].any())

    def _constant_ok(self, readers: list[tuple[Member, list[int]]]) -> str | None:
        """None when every consumer sees a constant it can absorb exactly; else why not."""
        for m, idx in readers:
            module = self.model.get_submodule(m.module)
            cols = _consumer_columns(module)
            if cols is not None and not bool(cols(idx).any()):
                continue  # W[:, c] = 0: whatever arrives contributes nothing
            x = self.inputs.get(m.module)
            if x is None:
                return f"'{m.module}' was not called on the probe input"
            v = _channel_slice(module, x, idx)
            if not bool((v == v[:, :1]).all()):
                return f"the input of '{m.module}' on this channel varies (not a constant channel)"
            if bool(v.any()) and (why := _foldable(module, m.module, self.follow)):
                return why
        return None

    def group(self, group: Group) -> DeadChannels | None:
        found = DeadChannels(group.name, group.size)
        for m in group.members:
            rule = find_rule(type(self.model.get_submodule(m.module)))
            if isinstance(rule, (LayerNormRule, GroupNormRule)):
                return None  # statistics over channels: removal is not exact
        for c in group.prunable:
            readers = self._readers(group, c)
            unused = bool(readers)
            for m, idx in readers:
                cols = _consumer_columns(self.model.get_submodule(m.module))
                unused = unused and cols is not None and not bool(cols(idx).any())
            if unused:
                found.unused.append(c)
            if self._rows_zero(group, c) or self._gamma_zero(group, c):
                why = self._constant_ok(readers)
                if why is None:
                    found.constant.append(c)
                elif not unused:
                    found.kept_reason[c] = why
        return found


def dead_channel_plan(model: nn.Module, graph: ChannelGraph, probe: Any) -> tuple[Plan, list[DeadChannels]]:
    """A :class:`Plan` dropping every dead channel of ``graph`` (a group keeps ≥ 1 channel), and the
    per-group findings. ``probe``: random model inputs (a batch) used to check constancy."""
    finder = _Finder(model, graph, probe)
    groups, found = [], []
    for g in graph.prunable_groups:
        dead = finder.group(g)
        if dead is None:
            continue
        found.append(dead)
        keep = [c for c in range(g.size) if c not in set(dead.dead)] or dead.dead[:1]
        if len(keep) == g.size:
            continue
        gone = sorted(set(range(g.size)) - set(keep))
        constant = [c for c in gone if c in set(dead.constant)]
        groups.append(GroupPlan.from_group(g, keep, criterion="dead", constant=constant,
                                           unused=[c for c in gone if c not in set(constant)]))
    return Plan(groups=groups, meta={"criterion": "dead"}), found


@torch.no_grad()
def remove_dead_channels(model: nn.Module, example_inputs: Any, probe: Any, *,
                         max_rounds: int = 8) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """Remove dead channels until none is left (at most ``max_rounds`` engine passes).

    Returns ``(pruned, removed)``: ``pruned`` is a new model carrying ``prunekit_record`` (``model``
    itself when nothing is dead); ``removed[group name]`` = ``{"size", "removed", "constant",
    "unused"}`` summed over the rounds (``size``: channels before the first round).
    """
    current, removed = model, {}
    for _ in range(max_rounds):
        graph = ChannelGraph.build(current, example_inputs)
        plan, found = dead_channel_plan(current, graph, probe)
        for d in found:
            entry = removed.setdefault(d.name, {"size": d.size, "removed": 0, "constant": 0, "unused": 0})
            gp = next((p for p in plan.groups if p.provenance["name"] == d.name), None)
            if gp is not None:
                entry["removed"] += gp.pruned
                entry["constant"] += len(gp.provenance["constant"])
                entry["unused"] += len(gp.provenance["unused"])
            if d.kept_reason:
                entry.setdefault("kept", {}).update({str(k): v for k, v in d.kept_reason.items()})
        if not plan.groups:
            break
        fold = constant_refits(current, graph, plan, probe, skip_zero=True)
        if fold.not_compensated:  # pragma: no cover - _constant_ok refuses these channels
            raise SurgeryError(f"constant of removed channels could not be folded into {fold.not_compensated}")
        current = apply(current, graph, plan.with_refits(fold.refits))
    return current, removed
