"""Residual-aware targets: a consumer whose output is added to a skip branch also answers for that branch.

In ``out = BN(conv(h)) + s`` the pruned network's skip input ``s_c`` has drifted from the original
``s_o`` (earlier layers were pruned). Refitting ``conv`` to its original output leaves that drift in
``out``; refitting it to

    Y* = Y_o + (s_o − s_c) · σ/γ        (per channel; without the BN: Y* = Y_o + (s_o − s_c))

makes ``BN(conv'(h)) + s_c`` reproduce the original sum instead (σ = √(running_var + ε), γ the BN scale;
channels with γ ≈ 0 keep Y_o). The pattern conv/linear → [BatchNorm] → add is found on a torch.fx trace;
the skip value is read from the same trace, run by an interpreter that stops once it has what it needs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .passes import placeholders, run_until

_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class Skip:
    """``consumer`` → (``norm``) → add node whose other operand is the fx node ``partner``."""

    consumer: str
    norm: str | None
    partner: str


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method"
                                                                       and node.target in ("add", "add_"))


def find_skips(model: nn.Module, probe: Any = None) -> tuple[dict[str, Skip], fx.Graph | None]:
    """``{consumer: Skip}`` for every Linear/conv whose output (through at most one BatchNorm) is one operand
    of a two-tensor add, and the fx graph they refer to. ``({}, None)`` when the model does not trace, or
    when the trace does not run on ``probe`` (a data-dependent branch traced one way)."""
    try:
        graph = fx.Tracer().trace(model)
        if probe is not None:
            node_values(model, graph, {n.name for n in graph.nodes if n.op == "output"}, probe)
    except Exception:  # noqa: BLE001 - untraceable models simply get plain targets
        return {}, None
    mods = dict(model.named_modules())
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        cur, norm = node, None
        users = list(cur.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(mods.get(str(users[0].target)), _BatchNorm):
            cur, norm = users[0], str(users[0].target)
            users = list(cur.users)
        if len(users) != 1 or not _is_add(users[0]):
            continue
        operands = [a for a in users[0].args if isinstance(a, fx.Node)]
        others = [a for a in operands if a is not cur]
        if len(operands) == 2 and len(others) == 1:
            out[str(node.target)] = Skip(str(node.target), norm, others[0].name)
    return out, graph


def node_values(model: nn.Module, graph: fx.Graph, names: set[str], inputs: Any) -> dict[str, torch.Tensor]:
    """Values of the fx nodes ``names`` of ``graph`` (traced from a model with ``model``'s module names); the
    pass stops once it has them."""
    nodes = list(graph.nodes)
    wanted = {n for n in nodes if n.name in names}
    env: dict[fx.Node, Any] = {}
    run_until(fx.Interpreter(model, graph=graph), nodes, 0, env, wanted, placeholders(graph, inputs))
    return {w.name: env[w].detach() if isinstance(env[w], torch.Tensor) else env[w] for w in wanted}


def output_scale(skip: Skip, model: nn.Module) -> torch.Tensor | None:
    """Per channel, what a change of the add's input is worth in the consumer's output space: σ/γ of the
    BatchNorm between them (0 where γ ≈ 0), or None without a BatchNorm (scale 1)."""
    if skip.norm is None:
        return None
    bn = model.get_submodule(skip.norm)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    scale = torch.sqrt(bn.running_var + bn.eps) / gamma
    return torch.where(gamma.abs() > 1e-8, scale, torch.zeros_like(scale))


def module_nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    """``{module name: its first call_module node}``."""
    out: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            out.setdefault(str(node.target), node)
    return out
