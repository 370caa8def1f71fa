"""Property tests of the engine over randomly generated architectures (hypothesis).

A random network is a conv stem followed by random blocks — conv/BN/activation, residual blocks
(identity or 1×1 projection shortcut), two-branch concat, depthwise (multiplier 1 or 2), grouped
conv, GroupNorm, max/avg pooling, transposed-conv upsampling, chunk-and-add, squeeze-excitation
gating — and a head (global
average pool or flatten of an H×W map) into Linear layers. Activations are drawn from those with
f(0) = 0, so that a channel zeroed at its producer stays zero downstream.

For random ratios, scopes and criteria we check, in float64:
* the pruned model runs and its output shape is unchanged;
* ratio 0 leaves the model bit-identical;
* pruned output == output of the dense model with the removed channels zeroed (``mask``);
* parameters and MACs never increase; the plan and record survive a JSON round trip.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.engine import ChannelGraph, Plan, PruneRecord, apply, make_plan, mask, replay
from prunekit.metrics import count_macs, count_params

pytestmark = pytest.mark.usefixtures("one_thread")


ACTS = {
    "relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh,
    "hardswish": nn.Hardswish, "relu6": nn.ReLU6, "elu": nn.ELU,
}


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, act, k=3, norm="bn"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=norm == "none")
        self.norm = bn(cout) if norm == "bn" else nn.GroupNorm(2, cout) if norm == "gn" else nn.Identity()
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, width, act):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(cin, width, 3, padding=1, bias=False), bn(width), ACTS[act]()
        self.conv2, self.bn2 = nn.Conv2d(width, cout, 3, padding=1, bias=False), bn(cout)
        self.short = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), bn(cout))
        self.act2 = ACTS[act]()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.short(x))


class CatBlock(nn.Module):
    def __init__(self, cin, a, b, act):
        super().__init__()
        self.left, self.right = ConvBlock(cin, a, act, k=1), ConvBlock(cin, b, act, k=3)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=1)


class DepthwiseBlock(nn.Module):
    def __init__(self, c, mult, act):
        super().__init__()
        self.dw = nn.Conv2d(c, c * mult, 3, padding=1, groups=c, bias=False)
        self.bn, self.act = bn(c * mult), ACTS[act]()

    def forward(self, x):
        return self.act(self.bn(self.dw(x)))


class GroupedBlock(nn.Module):
    def __init__(self, cin, cout, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, groups=2)
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.conv(x))


class ChunkBlock(nn.Module):
    def __init__(self, cin, half, act):
        super().__init__()
        self.conv, self.act = nn.Conv2d(cin, 2 * half, 1), ACTS[act]()

    def forward(self, x):
        a, b = self.act(self.conv(x)).chunk(2, dim=1)
        return a + b


class SEBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(1, c // 2), 1), nn.Conv2d(max(1, c // 2), c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, act):
        super().__init__()
        self.up, self.act = nn.ConvTranspose2d(cin, cout, 2, stride=2), ACTS[act]()

    def forward(self, x):
        return self.act(self.up(x))


class RandNet(nn.Module):
    """Stem → blocks → head, from a list of block specs (see ``arch`` strategy)."""

    def __init__(self, stem: int, blocks: list[tuple], head: str, act: str, size: int = 8):
        super().__init__()
        self.stem = ConvBlock(3, stem, act)
        c, layers = stem, []
        for kind, *p in blocks:
            if kind == "conv":
                layers.append(ConvBlock(c, p[0], p[1], norm=p[2]))
                c = p[0]
            elif kind == "res":
                layers.append(ResBlock(c, p[0], p[1], p[2]))
                c = p[0]
            elif kind == "cat":
                layers.append(CatBlock(c, p[0], p[1], p[2]))
                c = p[0] + p[1]
            elif kind == "dw":
                layers.append(DepthwiseBlock(c, p[0], p[1]))
                c *= p[0]
            elif kind == "grouped" and c % 2 == 0:
                layers.append(GroupedBlock(c, 2 * p[0], p[1]))
                c = 2 * p[0]
            elif kind == "chunk":
                layers.append(ChunkBlock(c, p[0], p[1]))
                c = p[0]
            elif kind == "se":
                layers.append(SEBlock(c))
            elif kind == "up" and size <= 4:
                layers.append(UpBlock(c, p[0], p[1]))
                c, size = p[0], size * 2
            elif kind == "pool" and size >= 4:
                layers.append(nn.MaxPool2d(2) if p[0] == "max" else nn.AvgPool2d(2))
                size //= 2
        self.blocks = nn.Sequential(*layers)
        if head == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))
        else:
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, 6), ACTS[act](), nn.Linear(6, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


width = st.integers(2, 6)
act = st.sampled_from(sorted(ACTS))
block = st.one_of(
    st.tuples(st.just("conv"), width, act, st.sampled_from(["bn", "bn", "none"])),
    st.tuples(st.just("conv"), st.sampled_from([4, 6]), act, st.just("gn")),
    st.tuples(st.just("res"), width, width, act),
    st.tuples(st.just("cat"), width, width, act),
    st.tuples(st.just("dw"), st.sampled_from([1, 1, 2]), act),
    st.tuples(st.just("grouped"), width, act),
    st.tuples(st.just("chunk"), width, act),
    st.tuples(st.just("se")),
    st.tuples(st.just("pool"), st.sampled_from(["max", "avg"])),
    st.tuples(st.just("up"), width, act),
)
arch = st.fixed_dictionaries({
    "stem": width, "blocks": st.lists(block, min_size=1, max_size=5),
    "head": st.sampled_from(["gap", "flatten"]), "act": act,
})


def build(spec: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = RandNet(**spec).double().eval()
    with torch.no_grad():  # non-trivial BN statistics, so BN is not the identity
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spec=arch, ratio=st.floats(0.05, 0.9), scope=st.sampled_from(["local", "global"]),
       criterion=st.sampled_from(["l1-norm", "l2-norm", "l2-GM", "random"]),
       rounding=st.sampled_from(["round", "floor"]), seed=st.integers(0, 3))
def test_pruned_equals_masked_dense(spec, ratio, scope, criterion, rounding, seed):
    model, x = build(spec, seed), inputs()
    graph = ChannelGraph.build(model, x)
    plan = make_plan(model, graph, ratio=ratio, scope=scope, criterion=criterion, rounding=rounding, seed=seed)
    pruned = apply(model, graph, plan)
    with torch.no_grad():
        y, yp, ym = model(x), pruned(x), mask(model, graph, plan)(x)
    assert yp.shape == y.shape
    tol = 1e-9 * (1 + ym.abs().max().item())
    assert (yp - ym).abs().max().item() <= tol, graph.describe()
    assert count_params(pruned) <= count_params(model)
    assert count_macs(pruned, x) <= count_macs(model, x)
    # the plan and record survive JSON, and the record replays onto a fresh dense copy
    assert Plan.from_json(plan.to_json()) == plan
    record = PruneRecord.from_json(json.loads(pruned.prunekit_record.to_json()))
    fresh = replay(build(spec, seed + 100), record)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), yp)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=arch, scope=st.sampled_from(["local", "global"]), seed=st.integers(0, 3))
def test_ratio_zero_is_identity(spec, scope, seed):
    model, x = build(spec, seed), inputs()
    graph = ChannelGraph.build(model, x)
    pruned = apply(model, graph, make_plan(model, graph, ratio=0.0, scope=scope))
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in model.parameters()]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=arch, ratio=st.floats(0.1, 0.8), seed=st.integers(0, 3))
def test_fx_and_export_capture_agree(spec, ratio, seed):
    model, x = build(spec, seed), inputs()
    a = ChannelGraph.build(model, x, capture="fx")
    b = ChannelGraph.build(model, x, capture="export")
    assert [(g.size, sorted(g.blocked), g.mergeable, g.producers) for g in a.groups] == \
        [(g.size, sorted(g.blocked), g.mergeable, g.producers) for g in b.groups]
    pa = make_plan(model, a, ratio=ratio)
    assert pa == make_plan(model, b, ratio=ratio)
