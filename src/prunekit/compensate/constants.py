"""Constant folding: removed channels that carry a constant become output offsets of their consumers.

A channel whose producer is zero (gRDA) or whose BN scale γ polarization drove to 0 still emits a
constant ``k`` (``act(β)`` after its BN and activation), so removing it shifts every consumer's output
by the response to ``k``. This module **measures** that constant (the consumer's input on the removed
channels during one eval forward of the unpruned model on example inputs: exact for a constant channel,
whatever the activation), computes its effect ``Δ_o`` on each consumer output (Linear: ``W[:, idx] k``,
exact; conv: the mean over the output map of the conv of the constant map, so zero-padded borders are
averaged in) and returns it as :class:`~prunekit.engine.Refit` offsets for surgery to fold:

* into the BatchNorm that alone reads the consumer's output: ``running_mean −= Δ`` (exact in eval mode);
* otherwise into the consumer's bias: ``bias += Δ``;
* otherwise the consumer is reported as not compensated.

Nothing here writes a module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine import ChannelGraph, Plan, Refit
from ..engine.masks import keep_masks, member_keep
from ..runtime import call, capture, eval_mode

__all__ = ["ConstantFold", "constant_refits", "followers", "output_offset"]


def followers(model: nn.Module) -> dict[str, str]:
    """``{conv or linear name: name of the BatchNorm that alone consumes its output}`` (torch.fx)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable: no follower known, bias-only compensation
        return {}
    mods = dict(model.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), (nn.Conv2d, nn.Linear)):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(mods.get(str(users[0].target)), _BatchNorm):
            out[str(node.target)] = str(users[0].target)
    return out


def output_offset(module: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Δ (O,): what the constant carried by input channels ``idx`` adds to ``module``'s output.

    ``x`` is the module's input on a probe batch; the constant is its mean over the batch and positions.
    Linear: ``W[:, idx] k``; Conv2d: the output-map mean of ``conv(k on idx, 0 elsewhere)``."""
    conv = isinstance(module, nn.Conv2d)
    dim = 1 if conv else x.dim() - 1
    dims = [d for d in range(x.dim()) if d != dim]
    const = x.index_select(dim, idx.to(x.device)).mean(dim=dims)
    if conv:
        inp = torch.zeros_like(x[:1])
        inp[0, idx.to(x.device)] = const.view(-1, 1, 1)
        y = F.conv2d(inp, module.weight, None, module.stride, module.padding, module.dilation, module.groups)
        return y.mean(dim=(0, 2, 3)).detach().cpu().double()
    return (module.weight[:, idx.to(x.device)] @ const).detach().cpu().double()


@dataclass
class ConstantFold:
    """What :func:`constant_refits` found: the refits, and the consumers it could not compensate."""

    refits: list[Refit] = field(default_factory=list)
    not_compensated: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"compensated": len(self.refits), "not_compensated": list(self.not_compensated)}


@torch.no_grad()
def constant_refits(model: nn.Module, graph: ChannelGraph, plan: Plan, example_inputs: Any = None, *,
                    follower: dict[str, str] | None = None, skip_zero: bool = False) -> ConstantFold:
    """Refit offsets folding the removed channels' constant output into every consumer that loses input
    channels under ``plan`` (see the module docstring). ``example_inputs``: the probe batch (default: the
    graph's example inputs); ``skip_zero``: no refit for consumers whose offset is exactly 0."""
    masks = keep_masks(graph, plan).masks
    todo: dict[str, torch.Tensor] = {}
    for m in graph.members:
        module = model.get_submodule(m.module)
        if m.role != "in" or not (isinstance(module, nn.Linear)
                                  or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            continue
        removed = ~member_keep(m, masks)
        if removed.any():
            todo[m.module] = torch.from_numpy(np.nonzero(removed)[0])
    if not todo:
        return ConstantFold()
    probe = example_inputs if example_inputs is not None else graph.example_inputs[0]
    with eval_mode(model), capture(model, list(todo)) as seen:
        call(model, probe)
    follow = followers(model) if follower is None else follower
    fold = ConstantFold()
    for name, idx in todo.items():
        x = seen.get(name)
        if x is None:
            continue
        module = model.get_submodule(name)
        delta = output_offset(module, x, idx)
        if skip_zero and not bool(delta.any()):
            continue
        bn = follow.get(name)
        if bn is not None and getattr(model.get_submodule(bn), "running_mean", None) is not None:
            fold.refits.append(Refit(module=name, offset=delta, norm=bn, provenance={"source": "constant"}))
        elif getattr(module, "bias", None) is not None:
            fold.refits.append(Refit(module=name, offset=delta, provenance={"source": "constant"}))
        else:
            fold.not_compensated.append(name)
    return fold
