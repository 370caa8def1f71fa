"""Torch-Pruning's group magnitude (``GroupMagnitudeImportance``) as engine criteria ``magnitude`` (p = 1)
and ``magnitude-l2`` (p = 2).

For channel ``c`` of a group, over every member of the group (Torch-Pruning 1.6.1, ``importance.py``):

    S_c = Σ_producers Σ_{o ∈ rows(c)} ‖W_o‖_p^p            producer rows (Linear/conv ``weight[o]``,
                                                             embedding columns)
        + Σ_consumers Σ_{j ∈ cols(c)} ‖W_{:, j}‖_p^p        consumer columns (``weight[:, j]``, all taps)
        + Σ_norms    Σ_{k ∈ c} |γ_k|^p                      norm scales (BatchNorm/LayerNorm/RMSNorm γ)
        [+ Σ |b_o|^p over producer biases and norm β, when ``include_bias``; TP's ``bias=False`` default]

    score_c = S_c / mean_c' S_c'                             TP's default ``normalizer="mean"``

A head (one kv head with its query heads) owns ``D`` rows of each of q/k/v and ``D`` (or ``g·D``) columns
of the output projection; an MLP neuron its gate/up rows and its down-projection column; a hidden channel
its column of every projection reading the stream, its row of every projection writing it, its γ of
every norm and its embedding column. TP's ``group_reduction="mean"`` divides the sum by the number of
entries; the mean normaliser then cancels that constant, so it is not computed.
"""
from __future__ import annotations

import torch

from ..engine.criteria import ScoreContext, register_criterion
from ..engine.graph import Group
from ..engine.rules import find_rule
from .groups import member_slices

__all__ = ["group_magnitude"]


def group_magnitude(ctx: ScoreContext, group: Group, p: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """``score_c`` (float64, (N,)) of every channel of ``group`` (see the module docstring)."""
    out = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        if m.role == "param":  # CLS tokens, position embeddings: not in TP's target types
            continue
        module = ctx.model.get_submodule(m.module)
        keep = {"weight"} if m.role != "norm" else {getattr(find_rule(type(module)), "scale_param", "weight")}
        if ctx.include_bias:
            keep.add("bias")
        sel = m.indices(group.id)
        ch = torch.from_numpy(m.channel[sel])
        for name, t in member_slices(ctx.model, m):
            if name in keep:
                part = t[torch.from_numpy(sel).to(t.device)].double()
                out.index_add_(0, ch, part.abs().pow(p).reshape(len(sel), -1).sum(1).cpu())
    if normalize:
        mean = out.mean()
        if mean > 0:
            out = out / mean
    return out


@register_criterion("magnitude")
def magnitude(ctx: ScoreContext, group: Group) -> torch.Tensor:
    """Group L1 magnitude over every parameter slice of a channel, mean-normalised (TP ``p=1``)."""
    return group_magnitude(ctx, group, p=1.0)


@register_criterion("magnitude-l2")
def magnitude_l2(ctx: ScoreContext, group: Group) -> torch.Tensor:
    """As ``magnitude`` with ``|w|²`` (TP's default ``p=2``, used by its LLM example; no square root)."""
    return group_magnitude(ctx, group, p=2.0)
