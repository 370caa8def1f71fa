"""torch.export capture: a folded leaf call has one output per tensor the module returns."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.engine import ChannelGraph, ChannelWiseRule, apply, make_plan, register_layer
from prunekit.engine.capture import _trace_export
from prunekit.runtime import eval_mode

pytestmark = pytest.mark.usefixtures("one_thread")


class CastNorm(nn.Module):
    """RMSNorm as in Llama: the input cast is a no-op for float32 inputs, so ``.to`` returns the input object
    and torch.export hands its node to the residual path too (a second cluster output)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.eps = 1e-6

    def forward(self, x):
        x = x.to(torch.float32)
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.eps))


class _NormRule(ChannelWiseRule):
    def __init__(self):
        super().__init__(params=("weight",), dim=-1)


register_layer(CastNorm, _NormRule())


class Block(nn.Module):
    def __init__(self, c: int, h: int):
        super().__init__()
        self.norm, self.up, self.down = CastNorm(c), nn.Linear(c, h), nn.Linear(h, c)

    def forward(self, x):
        return x + self.down(F.relu(self.up(self.norm(x))))


class PreNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.b1, self.b2, self.head = nn.Linear(6, 8), Block(8, 12), Block(8, 12), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.inp(x))))


def signature(g: ChannelGraph) -> list:
    return [(gr.name, gr.size, sorted((m.module, m.role) for m in gr.members), gr.protected, gr.mergeable,
             gr.merge_reason) for gr in g.groups]


def test_export_folds_a_norm_whose_input_cast_the_residual_reuses():
    m, x = PreNorm().eval(), torch.randn(2, 5, 6)
    with eval_mode(m):
        graph, shapes, _o = _trace_export(m, (x,), {}, set())
    calls = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    norm = calls["b1.norm"]
    assert shapes[norm] == torch.Size([2, 5, 8])  # one output, not a tuple
    assert not any(u.target is operator.getitem for u in norm.users)
    cast = norm.args[0]
    assert cast.op == "call_function" and cast.args[0] is calls["inp"]  # the cast, pulled out of the cluster
    assert cast.meta["module"] == "b1.norm" and norm.meta["module"] == "b1"
    residual = next(u for u in calls["b1.down"].users)
    assert cast in residual.args  # the residual add reads the pulled-out cast, not a getitem of the norm
    fx_graph = ChannelGraph.build(m, x, capture="fx")
    export_graph = ChannelGraph.build(m, x, capture="export")
    assert export_graph.mode == "export" and signature(export_graph) == signature(fx_graph)
    assert {mm.module for mm in export_graph.group("inp").members} == {
        "inp", "b1.norm", "b1.up", "b1.down", "b2.norm", "b2.up", "b2.down", "head"}


def test_plan_on_the_export_graph_prunes_like_the_fx_one():
    """Pruning the norm's channels changes its statistics (no mask equivalence): compare with fx instead."""
    torch.manual_seed(0)
    m, x = PreNorm().eval(), torch.randn(2, 5, 6)
    outs, keeps = [], []
    for capture in ("export", "fx"):
        g = ChannelGraph.build(m, x, capture=capture)
        plan = make_plan(m, g, ratio=0.5)
        pruned = apply(m, g, plan)
        assert pruned.inp.out_features == 4 and pruned.b1.norm.weight.shape == (4,) and pruned.b1.up.out_features == 6
        keeps.append(sorted((g.groups[p.group_id].name, tuple(p.keep)) for p in plan.groups))
        with torch.no_grad():
            outs.append(pruned(x))
    assert keeps[0] == keeps[1] and outs[0].shape == (2, 5, 3) and torch.equal(outs[0], outs[1])


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.proj = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 4)

    def forward(self, x):
        out, weights = self.attn(x, x, x)
        return self.proj(out), weights


def test_a_module_returning_two_tensors_stays_a_tuple():
    m, x = Attn().eval(), torch.randn(2, 5, 8)
    with eval_mode(m):
        graph, shapes, _o = _trace_export(m, (x,), {}, {"attn"})
    attn = next(n for n in graph.nodes if n.op == "call_module" and n.target == "attn")
    assert sorted(shapes[attn]) == [torch.Size([2, 5, 5]), torch.Size([2, 5, 8])]
    assert sorted(u.args[1] for u in attn.users if u.target is operator.getitem) == [0, 1]
    assert attn.args[0].op == "placeholder"
