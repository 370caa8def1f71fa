"""What a channel owns: the parameter slices of every member of its group, and their price in parameters or
multiply-accumulates (FLAP's compression weights, the budget of ``reconstruct``'s global allocation)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .channels import Group, Member
from .rules import ConvRule, find_rule

__all__ = ["ChannelPrices", "channel_costs", "member_slices"]


def member_slices(model: nn.Module, member: Member) -> Iterator[tuple[str, torch.Tensor]]:
    """``(parameter name, T)`` for every parameter ``member`` slices, with ``T[i]`` the slice of the member's
    index ``i`` (a view of the parameter: its dtype and device). A grouped conv's input index ``i`` reads offset ``i mod (I/g)`` (as in
    Torch-Pruning); a depthwise conv's input is skipped (its ``out`` member holds the same weights);
    buffers (BatchNorm running statistics) are not parameters and are skipped."""
    module = model.get_submodule(member.module)
    if member.role == "param":
        p = getattr(module, member.param)
        yield member.param, p.detach().movedim(member.axis, 0)
        return
    rule = find_rule(type(module))
    if rule is None:
        return
    own = dict(module.named_parameters(recurse=False))
    for name, dim in rule.param_dims(module, member.role).items():
        p = own.get(name)
        if p is None:
            continue
        t = p.detach().movedim(dim, 0)
        if t.shape[0] != len(member):
            if member.role == "in" and isinstance(rule, ConvRule) and t.shape[0] > 1 \
                    and len(member) % t.shape[0] == 0:
                t = t[torch.arange(len(member), device=t.device) % t.shape[0]]  # grouped conv: offset in block
            else:
                continue  # depthwise input: counted by its output member
        yield name, t


def channel_costs(model: nn.Module, group: Group, positions: dict[str, int] | None = None) -> torch.Tensor:
    """Parameters each channel of ``group`` owns (float64, (N,)): the elements of every slice of every
    member (a head: its q/k/v rows + biases and its output-projection columns). FLAP's compression
    weight (head = 4·128·d, neuron = 3·d parameters for LLaMA-7B) generalised to any group. With
    ``positions`` (``{module: output positions per sample}``, e.g. H_out·W_out of a conv) each element
    counts that many times: the multiply-accumulates the channel costs."""
    cost = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        sel = m.indices(group.id)
        ch = torch.from_numpy(m.channel[sel])
        times = float(positions.get(m.module, 1)) if positions is not None else 1.0
        for _, t in member_slices(model, m):
            per = float(t[0].numel()) * times if t.shape[0] else 0.0
            cost.index_add_(0, ch, torch.full((len(sel),), per, dtype=torch.float64))
    return cost


class ChannelPrices:
    """Prices of the channels of several groups (``group_ids``) that pay every weight element once.

    A weight element of a layer whose input and output channels are both in play (a chain: fc1's neurons
    feed fc2, whose neurons are pruned too) belongs to whichever of its two channels is removed first. So a
    channel's price is, per member slice, its elements (× ``positions`` of the layer: MACs) times the
    fraction of the layer's opposite dimension still alive; slices with no opposite dimension (biases,
    norms, functional parameters) count whole. With nothing removed, the prices are :func:`channel_costs`.
    """

    def __init__(self, model: nn.Module, graph: Any, group_ids: list[int], positions: dict[str, int] | None = None):
        pool = set(group_ids)
        self.terms: dict[int, list[tuple[torch.Tensor, float, int, list[tuple[int, np.ndarray]]]]] = {}
        for gid in group_ids:
            group = graph.groups[gid]
            terms = []
            for m in group.members:
                sel = m.indices(gid)
                counts = torch.bincount(torch.from_numpy(m.channel[sel]), minlength=group.size).double()
                times = float(positions.get(m.module, 1)) if positions is not None else 1.0
                other = graph.member(m.module, "out" if m.role == "in" else "in") if m.role in ("in", "out") else None
                for _, t in member_slices(model, m):
                    if not t.shape[0]:
                        continue
                    opposite: list[tuple[int, np.ndarray]] = []
                    fixed = 1
                    if other is not None and t.dim() >= 2 and t.shape[1] == len(other):
                        in_pool = np.isin(other.group, list(pool))
                        opposite = [(int(g), other.channel[other.group == g]) for g in np.unique(other.group[in_pool])]
                        fixed = int((~in_pool).sum())
                    terms.append((counts, float(t[0].numel()) * times, fixed, opposite))
            self.terms[gid] = terms

    def dependents(self, gid: int) -> set[int]:
        """The groups whose prices change when ``gid`` loses a channel (they share weights with it)."""
        return {g for g, terms in self.terms.items() if any(h == gid for *_, opp in terms for h, _ in opp)}

    def of(self, gid: int, alive: dict[int, torch.Tensor]) -> torch.Tensor:
        """(N,) prices of group ``gid``'s channels given the channels still ``alive`` (bool (N_g,) per group)."""
        price = None
        for counts, elements, fixed, opposite in self.terms[gid]:
            share = 1.0
            if opposite:
                total = fixed + sum(len(ch) for _, ch in opposite)
                share = (fixed + sum(float(alive[g][torch.from_numpy(ch)].sum()) for g, ch in opposite)) / total
            term = counts * (elements * share)
            price = term if price is None else price + term
        return price if price is not None else torch.zeros(0, dtype=torch.float64)

    def removed(self, keep: dict[int, list[int]], sizes: dict[int, int]) -> float:
        """What removing every channel not in ``keep`` costs in all, each shared element once: group by group,
        a group paying for what the groups before it left (channels of one group share no weight)."""
        alive = {g: torch.ones(sizes[g], dtype=torch.bool) for g in self.terms}
        total = 0.0
        for g in self.terms:
            gone = torch.ones(sizes[g], dtype=torch.bool)
            gone[list(keep[g])] = False
            total += float(self.of(g, alive)[gone].sum())
            alive[g] &= ~gone
        return total
