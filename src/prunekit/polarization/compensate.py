"""Data-free compensation of removed BN-mode channels (spec/polarization.md §2.2 step 6, §7.6).

A channel whose factor polarization drove to γ ≈ 0 still emits the constant ``β`` after its BN, i.e.
``act(β)`` after the activation, so removing it shifts every consumer's pre-activation by that
constant times the consumer's weights; the official code only prints the difference. Here the
constant is **measured** (the consumer's input on the removed channels during one eval forward of
the unpruned model on the example input: exact for γ = 0, whatever the activation) and its effect
``Δ_o`` on each consumer output (conv: mean over the output map, so zero-padded borders are averaged
in; linear: exact) is folded into the pruned model:

* into the BatchNorm that directly follows the consumer: ``running_mean −= Δ`` (exact in eval mode);
* otherwise into the consumer's bias: ``bias += Δ``;
* otherwise it is reported as not compensated.

This edits the *pruned copy* after :func:`prunekit.engine.apply`. The engine's own ``GroupPlan.shift``
folds ``W·shift`` only into a consumer's bias, and the paper's convolutions have none, so the fold into
the following BN lives here (a candidate for the engine: ``shift_in`` of a bias-free conv that feeds a BN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine import ChannelGraph, Plan
from ..engine.graph import as_inputs

__all__ = ["Offset", "fold_offsets", "followers", "removed_offsets"]


@dataclass
class Offset:
    """``delta`` (O,): what the removed input channels added to each output of ``consumer``."""

    consumer: str
    delta: torch.Tensor
    removed_inputs: int


def _masks(graph: ChannelGraph, plan: Plan) -> list[np.ndarray]:
    masks = [np.ones(g.size, dtype=bool) for g in graph.groups]
    for gp in plan.groups:
        m = np.zeros(graph.groups[gp.group_id].size, dtype=bool)
        m[list(gp.keep)] = True
        masks[gp.group_id] = m
    return masks


def _kept(member, masks: list[np.ndarray]) -> np.ndarray:
    keep = np.ones(len(member), dtype=bool)
    inside = member.group >= 0
    keep[inside] = [masks[g][c] for g, c in zip(member.group[inside].tolist(), member.channel[inside].tolist())]
    return keep


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


@torch.no_grad()
def removed_offsets(model: nn.Module, graph: ChannelGraph, plan: Plan, example_inputs: Any = None) -> list[Offset]:
    """The output offsets of every consumer that loses input channels under ``plan`` (module docstring)."""
    masks = _masks(graph, plan)
    todo = {}
    for m in graph.members:
        if m.role != "in":
            continue
        module = model.get_submodule(m.module)
        if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            continue
        removed = ~_kept(m, masks)
        if removed.any():
            todo[m.module] = (module, np.nonzero(removed)[0])
    if not todo:
        return []
    seen: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(mod, args, out) -> None:  # must return None: a returned value would replace the output
            seen.setdefault(name, args[0].detach())

        return hook

    hooks = [mod.register_forward_hook(capture(name)) for name, (mod, _) in todo.items()]
    args, kwargs = as_inputs(example_inputs if example_inputs is not None else graph.example_inputs[0])
    was = model.training
    model.eval()
    try:
        model(*args, **kwargs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    out = []
    for name, (module, idx) in todo.items():
        x = seen.get(name)
        if x is None:
            continue
        idx_t = torch.from_numpy(idx).to(x.device)
        dims = [0, *range(2, x.dim())] if isinstance(module, nn.Conv2d) else list(range(x.dim() - 1))
        const = x.index_select(1 if isinstance(module, nn.Conv2d) else x.dim() - 1, idx_t).mean(dim=dims)
        if isinstance(module, nn.Conv2d):
            inp = torch.zeros_like(x[:1])
            inp[0, idx_t] = const.view(-1, 1, 1)
            y = F.conv2d(inp, module.weight, None, module.stride, module.padding, module.dilation, module.groups)
            delta = y.mean(dim=(0, 2, 3))
        else:
            delta = module.weight[:, idx_t] @ const
        out.append(Offset(name, delta.detach().cpu().double(), len(idx)))
    return out


@torch.no_grad()
def fold_offsets(pruned: nn.Module, graph: ChannelGraph, plan: Plan, offsets: list[Offset],
                 follower: dict[str, str]) -> dict[str, Any]:
    """Fold ``offsets`` into ``pruned`` (a result of ``apply(model, graph, plan)``); returns a summary."""
    masks = _masks(graph, plan)
    done, skipped = [], []
    for off in offsets:
        out_member = graph.member(off.consumer, "out")
        keep = _kept(out_member, masks) if out_member is not None else np.ones(len(off.delta), dtype=bool)
        delta = off.delta[torch.from_numpy(np.nonzero(keep)[0])]
        bn_name = follower.get(off.consumer)
        consumer = pruned.get_submodule(off.consumer)
        if bn_name is not None:
            bn = pruned.get_submodule(bn_name)
            if bn.running_mean is not None and bn.running_mean.numel() == delta.numel():
                bn.running_mean.sub_(delta.to(bn.running_mean))
                done.append(off.consumer)
                continue
        if getattr(consumer, "bias", None) is not None and consumer.bias.numel() == delta.numel():
            consumer.bias.add_(delta.to(consumer.bias))
            done.append(off.consumer)
        else:
            skipped.append(off.consumer)
    return {"compensated": done, "not_compensated": skipped}
