"""Resumed forward passes (``prunekit.compensate.passes``): every value equals a fresh pass's, bit for bit,
whatever changed upstream; resuming turns the reconstruction's O(L²) layer evaluations into O(L); in-place
ops cannot alter a saved cut; and a reconstruction gives the same refits with and without it."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import prunekit.compensate.reconstruct as reconstruct_module
from prunekit.compensate import ReconstructOptions, reconstruct_plan
from prunekit.compensate.passes import ResumablePasses
from prunekit.compensate.residual import node_values
from prunekit.engine import ChannelGraph, apply, make_plan

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """conv → BN → ReLU(inplace) → conv → BN, added in place onto the input, then ReLU(inplace)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x
        return self.relu(out)


def residual_net(blocks: int, c: int = 4) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), *[Block(c) for _ in range(blocks)],
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def layer_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def fresh(net: nn.Module, graph: fx.Graph, names: set[str], xb: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return node_values(net, graph, names, xb)


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 3), seed=st.integers(0, 10_000), steps=st.integers(1, 8), cap=st.sampled_from([0, 10**9]))
def test_resumed_values_equal_a_fresh_pass_bit_for_bit(blocks, seed, steps, cap):
    """Random networks edited step by step (one random layer re-drawn per step, as refits do), random nodes
    read on every batch: each value is the fresh pass's exactly, resumed or not."""
    torch.manual_seed(seed)
    net = residual_net(blocks)
    graph = fx.Tracer().trace(net)
    nodes = [n.name for n in graph.nodes if n.op not in ("placeholder", "output")]
    data = [torch.randn(3, 1, 6, 6) for _ in range(2)]
    passes = ResumablePasses(graph, cap)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        net = copy.deepcopy(net)
        layer = layer_names(net)[int(torch.randint(len(layer_names(net)), (1,), generator=gen))]
        with torch.no_grad():
            net.get_submodule(layer).weight.mul_(1.5)
        wanted = {nodes[int(i)] for i in torch.randint(len(nodes), (2,), generator=gen)}
        for b, xb in enumerate(data):
            got = passes.values(net, wanted, b, xb)
            want = fresh(net, graph, wanted, xb)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_layer_by_layer_reads_cost_linear_not_quadratic_work():
    """Reading every conv's input in order, the network changing at the layer just read (as a sequential
    refit does), evaluates each node about once instead of once per later layer."""
    net = residual_net(6)
    graph = fx.Tracer().trace(net)
    passes, plain = ResumablePasses(graph, 10**9), ResumablePasses(graph, 0)
    xb = torch.randn(2, 1, 6, 6)
    n_nodes = len(graph.nodes)
    for name in layer_names(net):
        source = passes.first_call[name].args[0].name
        got = passes.values(net, {source}, 0, xb)
        assert torch.equal(got[source], plain.values(net, {source}, 0, xb)[source])
        net = copy.deepcopy(net)
        with torch.no_grad():
            net.get_submodule(name).weight.add_(0.01)
    assert passes.nodes_run <= n_nodes  # each node once
    assert plain.nodes_run > 5 * n_nodes  # from the input every time: quadratic


class InPlace(nn.Module):
    """``h = lin1(x); h.mul_(2); lin2(h)``: the trace reads lin1's node after an in-place op changed it."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        h.mul_(2.0)
        return self.lin2(h)


def test_in_place_ops_do_not_alter_a_saved_cut():
    """The cut right after lin1 is resumed twice (lin2 edited each time, as a refit does); the in-place
    ``mul_`` after the cut must not reach the saved values."""
    net = InPlace().eval()
    graph = fx.Tracer().trace(net)
    passes = ResumablePasses(graph, 10**9)
    xb = torch.randn(3, 4)
    passes.values(net, {passes.first_call["lin1"].name}, 0, xb)
    end = next(n.name for n in graph.nodes if n.op == "output")
    for _ in range(2):
        net = copy.deepcopy(net)
        with torch.no_grad():
            net.lin2.weight.add_(0.1)
        assert torch.equal(passes.values(net, {end}, 0, xb)[end], fresh(net, graph, {end}, xb)[end])
    assert passes.nodes_run == 2 + 2 * 3  # x, lin1 once; then mul_, lin2, output twice


def _refits(net, graph, plan, x, options):
    fitted, _ = reconstruct_plan(net, graph, plan, x, options)
    with torch.no_grad():
        return fitted, apply(net, graph, fitted)(x)


@pytest.mark.parametrize("residual", [True, False])
def test_reconstruction_refits_are_the_same_with_and_without_resumed_passes(monkeypatch, residual):
    """Resumed (the default) vs every pass from the input on the trace (no cuts kept) and, without residual
    targets, vs hooks: the same survivors and bit-identical refits."""
    net = residual_net(3, c=6)
    x = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    graph = ChannelGraph.build(net, x[:1])
    plan = make_plan(net, graph, ratio=0.5)
    options = ReconstructOptions(calibration=64, batch_size=16, select="greedy", positions=None, residual=residual)
    resumed, out = _refits(net, graph, plan, x, options)
    alternatives = [lambda graph, max_bytes: ResumablePasses(graph, 0)]
    if not residual:
        alternatives.append(lambda graph, max_bytes: None)  # hooks: residual targets need the trace
    for make in alternatives:
        monkeypatch.setattr(reconstruct_module, "ResumablePasses", make)
        plain, plain_out = _refits(net, graph, plan, x, options)
        assert [gp.keep for gp in resumed.groups] == [gp.keep for gp in plain.groups]
        assert len(resumed.refits) == len(plain.refits) >= 4
        for a, b in zip(resumed.refits, plain.refits):
            assert a.module == b.module and torch.equal(a.weight, b.weight)
        assert torch.equal(out, plain_out)


def test_targets_are_cached_when_all_inputs_fit_even_if_whole_batches_would_not():
    """110 inputs in batches of 100: 110 rows of 4 float32 outputs (1,760 bytes) fit in 2,000 bytes, two full
    batches (3,200) would not — the rows are gathered once and kept."""
    from prunekit.compensate.targets import Targets

    net = nn.Sequential(nn.Linear(3, 4)).eval()
    x = torch.randn(110, 3)
    kept = Targets(net, ["0"], x, 100, None, 0, {}, None, max_bytes=2000)
    assert kept.cached and sum(len(r) for r in kept.rows["0"]) == 110
    assert not Targets(net, ["0"], x, 100, None, 0, {}, None, max_bytes=1500).cached
    y, _ = kept.batch("0", 1, x[100:])
    with torch.no_grad():
        assert torch.equal(y, net(x[100:]))
