"""What a channel owns: the parameter slices of every member of its group, and their price in parameters or
multiply-accumulates (FLAP's compression weights, the budget of ``reconstruct``'s global allocation)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .channels import Group, Member
from .rules import ConvRule, find_rule

__all__ = ["channel_costs", "member_slices"]


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
