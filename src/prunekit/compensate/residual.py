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
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..runtime import StopForward, as_inputs

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


class _Recorder(fx.Interpreter):
    """Runs a traced graph and keeps the values of ``wanted`` nodes; stops once it has them all."""

    def __init__(self, module: fx.GraphModule, wanted: set[str]):
        super().__init__(module)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = value.detach() if isinstance(value, torch.Tensor) else value
            if len(self.values) == len(self.wanted):
                raise StopForward
        return value


_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (graph, its GraphModule)


def _graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``GraphModule(model, graph)``, built once per (model, graph) — building one compiles Python code."""
    cached = _MODULES.get(model)
    if cached is None or cached[0] is not graph:
        cached = (graph, fx.GraphModule(model, graph))
        _MODULES[model] = cached
    return cached[1]


def node_values(model: nn.Module, graph: fx.Graph, names: set[str], inputs: Any) -> dict[str, torch.Tensor]:
    """Values of the fx nodes ``names`` of ``graph`` (traced from a model with ``model``'s module names)."""
    rec = _Recorder(_graph_module(model, graph), names)
    args, kwargs = as_inputs(inputs)
    holders = [n for n in graph.nodes if n.op == "placeholder"][len(args):]
    args = [*args, *(kwargs[p.target] if p.target in kwargs else (p.args[0] if p.args else None) for p in holders)]
    try:
        rec.run(*args)
    except StopForward:
        pass
    return rec.values


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
