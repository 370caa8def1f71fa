"""ChannelGraph: coupling rules per layer/op, protection, mergeability, capture fallbacks, errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import models
from prunekit.engine import (
    ChannelGraph,
    ChannelWiseRule,
    GroupPlan,
    Plan,
    UnsupportedLayerError,
    UntraceableModelError,
    apply,
    make_plan,
    mask,
    prune,
    register_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def roles(group) -> set[str]:
    return {f"{m.module}:{m.role}" for m in group.members}


def check_prune_matches_mask(model: nn.Module, x: torch.Tensor, ratio: float = 0.5, **kw) -> nn.Module:
    """Prune at ``ratio`` and assert pruned output == dense output with removed channels zeroed."""
    model.eval()
    graph = ChannelGraph.build(model, x, **kw)
    plan = make_plan(model, graph, ratio=ratio)
    pruned = apply(model, graph, plan)
    with torch.no_grad():
        y, yp, ym = model(x), pruned(x), mask(model, graph, plan)(x)
    assert yp.shape == y.shape
    assert (yp - ym).abs().max().item() <= 1e-5 * (1 + ym.abs().max().item())
    return pruned


class Seq(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


# ----------------------------------------------------------------------------------------------
# coupling


def test_chain_groups_members_and_protected_head():
    m = models.create("lenet-5")
    g = ChannelGraph.build(m, (1, 1, 28, 28))
    assert [gr.name for gr in g.groups] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert roles(g.group("conv2")) == {"conv2:out", "fc1:in"}
    assert g.group("conv2").size == 16 and g.group("conv2").mergeable
    assert g.member("conv2", "out").channel.tolist() == list(range(16))  # channels = producer rows
    head = g.group("fc3")
    assert head.protected and set(head.blocked.values()) == {"feeds the model output"}
    fc1 = g.member("fc1", "in")
    assert len(fc1) == 16 * 25 and fc1.channel.tolist()[:26] == [0] * 25 + [1]  # H·W blocks
    pruned = check_prune_matches_mask(m, torch.randn(2, 1, 28, 28))
    assert pruned.fc1.in_features == 8 * 25


def test_residual_add_couples_every_operand():
    m = models.create("resnet20", shortcut="B")
    g = ChannelGraph.build(m, (1, 3, 32, 32))
    stage2 = g.group("layer2.0.conv2")
    assert {"layer2.0.shortcut.0:out", "layer2.1.conv2:out", "layer2.2.conv2:out", "layer3.0.conv1:in",
            "layer3.0.shortcut.0:in"} <= roles(stage2)
    assert not stage2.mergeable and "4 producers" in stage2.merge_reason
    assert g.group("layer2.1.conv1").mergeable
    check_prune_matches_mask(m, torch.randn(2, 3, 32, 32))


def test_zero_pad_shortcut_protects_padded_channels_only():
    m = models.create("resnet20")  # option A: x[:, :, ::2, ::2] zero-padded on the channel dim
    g = ChannelGraph.build(m, (1, 3, 32, 32))
    stream = g.group("conv1")
    assert stream.size == 64 and len(stream.prunable) == 16
    assert all("padded" in r for r in stream.blocked.values())
    pruned = check_prune_matches_mask(m, torch.randn(2, 3, 32, 32))
    assert pruned.conv1.out_channels == 8
    assert pruned.layer2[0].conv2.out_channels == 32 - 8  # the 16 padded channels stay


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3)

    def forward(self, x):
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


def test_concat_keeps_sources_in_separate_groups_with_offsets():
    m = Concat()
    g = ChannelGraph.build(m, (1, 3, 8, 8))
    ga, gb = g.group("a"), g.group("b")
    assert ga.id != gb.id and ga.size == 4 and gb.size == 6
    bn = g.member("bn", "norm")
    assert bn.group.tolist() == [ga.id] * 4 + [gb.id] * 6 and bn.channel.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    pruned = check_prune_matches_mask(m, torch.randn(2, 3, 8, 8))
    assert pruned.c.in_channels == pruned.bn.num_features == 2 + 3


def test_depthwise_and_grouped_convs():
    dw = Seq(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8),
             nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 6, 1, groups=2), nn.ReLU(), nn.Conv2d(6, 4, 1))
    g = ChannelGraph.build(dw, (1, 3, 8, 8))
    first = g.group("layers.0")
    assert {"layers.3:in", "layers.3:out", "layers.4:norm", "layers.6:in"} <= roles(first)
    assert not first.mergeable and "depthwise" in first.merge_reason
    assert g.member("layers.3", "out").channel.tolist()[:4] == [0, 0, 1, 1]  # multiplier 2
    grouped = g.group("layers.6")
    assert grouped.size == 3  # offsets coupled across the 2 groups
    pruned = check_prune_matches_mask(dw, torch.randn(2, 3, 8, 8))
    d = pruned.layers[3]
    assert d.in_channels == d.groups == 4 and d.out_channels == 8
    assert pruned.layers[6].groups == 2 and pruned.layers[6].in_channels == 8
    assert pruned.layers[6].out_channels == 4  # 2 offsets kept in each of the 2 groups


def test_group_norm_prunes_whole_groups_and_protects_single_group():
    m = Seq(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 6, 1), nn.GroupNorm(1, 6),
            nn.ReLU(), nn.Conv2d(6, 2, 1))
    g = ChannelGraph.build(m, (1, 3, 4, 4))
    assert g.group("layers.0").size == 4
    assert g.group("layers.3").protected and "1 group" in next(iter(g.group("layers.3").blocked.values()))
    pruned = check_prune_matches_mask(m, torch.randn(2, 3, 4, 4))
    assert pruned.layers[1].num_groups == 2 and pruned.layers[1].num_channels == 4


class MLP(nn.Module):
    """Conv stem → channels-last tokens → Linear → LayerNorm(C) → GELU → Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.fc1, self.ln, self.fc2 = nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        return self.fc2(F.gelu(self.ln(self.fc1(t))))


def test_permute_and_layer_norm_over_channels():
    m = MLP()
    g = ChannelGraph.build(m, (1, 3, 8, 8))
    assert roles(g.group("stem")) == {"stem:out", "fc1:in"}
    assert roles(g.group("fc1")) == {"fc1:out", "ln:norm", "fc2:in"}
    pruned = prune(m, (2, 3, 8, 8), ratio=0.5)
    assert pruned.ln.normalized_shape == (6,) and pruned.fc1.in_features == 4
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 16, 4)


class ChunkSplit(nn.Module):
    def __init__(self, fixed_split: bool):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)
        self.fixed_split = fixed_split

    def forward(self, x):
        y = self.conv(x)
        a, b = torch.split(y, [4, 4], dim=1) if self.fixed_split else y.chunk(2, dim=1)
        return self.out(a * torch.sigmoid(b))


def test_chunk_couples_halves_and_fixed_split_is_protected():
    g = ChannelGraph.build(ChunkSplit(False), (1, 3, 4, 4))
    assert g.group("conv").size == 4
    pruned = check_prune_matches_mask(ChunkSplit(False), torch.randn(2, 3, 4, 4))
    assert pruned.conv.out_channels == 4 and pruned.out.in_channels == 2
    g = ChannelGraph.build(ChunkSplit(True), (1, 3, 4, 4))
    assert g.group("conv").protected and "fixed sizes" in next(iter(g.group("conv").blocked.values()))


class Odd(nn.Module):
    """Ops that must protect channels: fixed channel slice, softmax over channels, matmul."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.d, self.e = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        c = self.c(x).flatten(2)
        y = self.a(x)[:, :4].sum() + self.b(x).softmax(1).sum() + (c.transpose(1, 2) @ c).sum()
        return self.e(F.interpolate(self.d(x), scale_factor=2.0)) + y


def test_shape_fixing_ops_protect_with_reasons():
    g = ChannelGraph.build(Odd(), (1, 3, 4, 4))
    why = {n: next(iter(g.group(n).blocked.values()), "") for n in "abc"}
    assert "fixed slice" in why["a"] and "normalises over the channel dim" in why["b"]
    assert "matmul" in why["c"] and "contracts the channel dim" in why["c"]
    assert not g.group("d").protected  # interpolate is channel-wise


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.head(y * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1))))))


def test_squeeze_excitation_gate_is_coupled_with_its_input():
    g = ChannelGraph.build(SE(), (1, 3, 8, 8))
    assert {"conv:out", "fc2:out", "fc1:in", "head:in"} <= roles(g.group("conv"))
    check_prune_matches_mask(SE(), torch.randn(2, 3, 8, 8))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.mid(F.relu(self.mid(self.stem(x))))))


def test_module_called_twice_couples_its_calls():
    g = ChannelGraph.build(Shared(), (1, 3, 5, 5))
    assert g.group("stem").id == g.group("mid").id  # mid reads stem and its own output
    check_prune_matches_mask(Shared(), torch.randn(2, 3, 5, 5))


class Outputs(nn.Module):
    """Dict and dataclass outputs: every tensor in them keeps its shape."""

    def __init__(self, as_dataclass: bool):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 6)
        self.up, self.head = nn.ConvTranspose1d(6, 4, 2, stride=2), nn.Conv1d(4, 3, 1)
        self.as_dataclass = as_dataclass

    def forward(self, ids):
        h = F.relu(self.fc(self.emb(ids)))  # (N, L, 6)
        y = self.head(F.relu(self.up(h.transpose(1, 2))))  # (N, 3, 2L)
        return Result(y, h) if self.as_dataclass else {"y": y, "hidden": h}


@dataclasses.dataclass
class Result:
    y: torch.Tensor
    hidden: torch.Tensor


@pytest.mark.parametrize("as_dataclass", [False, True])
def test_embedding_transposed_conv_and_structured_outputs(as_dataclass):
    ids = torch.randint(0, 10, (2, 5))
    g = ChannelGraph.build(Outputs(as_dataclass), ids)
    assert roles(g.group("emb")) == {"emb:out", "fc:in"} and roles(g.group("up")) == {"up:out", "head:in"}
    assert g.group("fc").protected and g.group("head").protected  # model outputs
    pruned = prune(Outputs(as_dataclass), ids, ratio=0.5)
    assert pruned.emb.embedding_dim == 4 and pruned.up.out_channels == 2 and pruned.up.in_channels == 6
    out = pruned(ids)
    y = out.y if as_dataclass else out["y"]
    assert y.shape == (2, 3, 10)


# ----------------------------------------------------------------------------------------------
# mergeability


class Chain(nn.Module):
    def __init__(self, act: nn.Module, bn_after_act: bool = False):
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), act
        self.bn_after_act = bn_after_act
        self.conv2 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.conv1(x)
        y = self.bn(self.act(y)) if self.bn_after_act else self.act(self.bn(y))
        return self.conv2(F.max_pool2d(F.dropout(y, 0.1, self.training), 2))


@pytest.mark.parametrize("act,bn_after,reason", [
    (nn.ReLU(), False, None), (nn.LeakyReLU(0.2), False, None), (nn.Identity(), False, None),
    (nn.SiLU(), False, "SiLU 'act' is not positively homogeneous"),
    (nn.ReLU6(), False, "ReLU6 'act' is not positively homogeneous"),
    (nn.ReLU(), True, "BatchNorm2d 'bn' follows a nonlinearity"),
])
def test_mergeable_only_through_positively_homogeneous_ops(act, bn_after, reason):
    g = ChannelGraph.build(Chain(act, bn_after), (1, 3, 8, 8)).group("conv1")
    assert g.mergeable == (reason is None)
    assert g.merge_reason == reason


# ----------------------------------------------------------------------------------------------
# custom layers, attention, ignoring


class Scale(nn.Module):
    """A custom per-channel scale: a leaf with parameters and no built-in rule."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        return x * self.gamma[:, None, None]


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.blocks = nn.Sequential(Scale(6))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.blocks(self.conv(x))))


def test_unknown_custom_layer_is_refused_by_name_until_registered():
    msg = (r"module 'blocks.0' \(Scale\) has no channel rule; register one with "
           r"prunekit.register_layer\(\.\.\.\) or ignore it")
    with pytest.raises(UnsupportedLayerError, match=msg):
        ChannelGraph.build(WithScale(), (1, 3, 4, 4))
    g = ChannelGraph.build(WithScale(), (1, 3, 4, 4), ignored=["blocks.0"])
    assert g.group("conv").protected and "opaque" in next(iter(g.group("conv").blocked.values()))
    register_layer(Scale, ChannelWiseRule(params=("gamma",), scale_param="gamma"), overwrite=True)
    try:
        pruned = check_prune_matches_mask(WithScale(), torch.randn(2, 3, 4, 4))
        assert pruned.blocks[0].gamma.shape == (3,)
    finally:
        from prunekit.engine.rule_base import _BY_TYPE

        _BY_TYPE.pop(Scale)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.attn = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.proj(x)
        return self.attn(h, h, h)[0].sum(-1, keepdim=True) + self.out(F.relu(self.mlp(x)))


def test_multihead_attention_is_refused_unless_ignored():
    with pytest.raises(UnsupportedLayerError, match="module 'attn' \\(MultiheadAttention\\).*ignore"):
        ChannelGraph.build(Attn(), (2, 5, 4))
    pruned = prune(Attn(), torch.randn(2, 5, 4), ratio=0.5, ignored=["attn"])
    assert pruned.proj.out_features == 8 and pruned.mlp.out_features == 3


def test_ignored_container_protects_every_layer_inside():
    m = models.create("vgg16")
    g = ChannelGraph.build(m, (1, 3, 32, 32), ignored=["classifier"])
    assert g.group("classifier.0").protected and not g.group("features.0").protected
    assert g.group("classifier.0").blocked[0] == "module 'classifier.0' is ignored"


# ----------------------------------------------------------------------------------------------
# capture


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither fx nor export can capture it
            return self.conv(x)
        return x


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.gate, self.head = nn.Conv2d(3, 4, 1), Gate(), nn.Conv2d(4, 2, 1)
        self.mid = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        return self.head(self.gate(F.relu(self.stem(x)))) + self.mid(x)[:, :2]


def test_untraceable_model_error_names_module_and_line():
    with pytest.raises(UntraceableModelError) as e:
        ChannelGraph.build(DataDependent(), (1, 3, 4, 4), capture="fx")
    text = str(e.value)
    assert "module 'gate' (Gate.forward line" in text and "if x.sum() > 0:" in text
    g = ChannelGraph.build(DataDependent(), (1, 3, 4, 4), ignored=["gate"])
    assert g.mode == "fx" and g.group("stem").protected


def test_data_dependent_python_is_recorded_for_the_branch_the_inputs_take():
    x = torch.ones(1, 3, 4, 4)
    model = DataDependent().eval()
    with torch.no_grad():
        model.stem.bias.fill_(1.0)  # relu(stem(x)) > 0: the gate takes its conv
    g = ChannelGraph.build(model, x)
    assert g.mode == "record" and not g.group("gate.conv").protected
    # the condition x.sum() > 0 reads every channel of stem: pruning them could flip the branch
    assert "reduces over the channel dim" in next(iter(g.group("stem").blocked.values()))


class ShapeBranch(nn.Module):
    """``int(x.shape[-1])`` breaks torch.fx; torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        y = F.relu(self.a(x))
        if int(y.shape[-1]) > 4:
            y = F.relu(self.b(y))
        return self.c(y.mean((2, 3)))


@pytest.mark.parametrize("capture", ["auto", "export"])
def test_fallbacks_when_fx_fails(capture):
    g = ChannelGraph.build(ShapeBranch(), (1, 3, 8, 8), capture=capture)
    assert g.mode == {"auto": "record", "export": "export"}[capture]
    assert roles(g.group("a")) == {"a:out", "b:in"} and roles(g.group("b")) == {"b:out", "c:in"}
    with pytest.raises(UntraceableModelError, match="torch.fx"):
        ChannelGraph.build(ShapeBranch(), (1, 3, 8, 8), capture="fx")
    pruned = check_prune_matches_mask(ShapeBranch(), torch.randn(2, 3, 8, 8))
    assert pruned.b.out_channels == 4


def test_build_leaves_the_model_untouched():
    m = models.create("resnet20").train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ChannelGraph.build(m, (4, 3, 32, 32))
    assert m.training and all(mod.training for mod in m.modules())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_describe_lists_every_group():
    g = ChannelGraph.build(models.create("resnet20", shortcut="B"), (1, 3, 32, 32))
    text = g.describe()
    assert text.count("\n  #") == len(g.groups) and "mergeable" in text and "prune-only" in text


def test_plan_on_export_graph_applies_to_the_real_model():
    m = models.create("mobilenetv2", input_size=32)
    x = torch.randn(1, 3, 32, 32)
    g = ChannelGraph.build(m, x, capture="export")
    plan = Plan([GroupPlan(group_id=g.group("features.2.conv.0.0").id, keep=list(range(0, 96, 2)))])
    pruned = apply(m.eval(), g, plan)
    assert pruned.features[2].conv[1][0].groups == 48


class Branchy(nn.Module):
    """A shape-dependent branch: the example inputs reach only one of the two layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.short, self.long, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = self.long(h) if x.shape[1] > 5 else self.short(h)
        return self.out(torch.relu(h))


def test_modules_the_example_inputs_never_reach_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"never reach 1 module.*\(long\)"):
        g = ChannelGraph.build(Branchy(), torch.randn(2, 3, 4), capture="record")
    assert g.unreached == ["long"]
    with pytest.warns(UserWarning):
        assert ChannelGraph.build(Branchy(), torch.randn(2, 7, 4)).unreached == ["short"]
