"""Polarization pruning through the engine: thresholds → Plan, coupled residual groups, min_keep, the
registered method, the CLI (train --regularizer, prune --method polarization --finetune-epochs)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunekit import models
from prunekit.engine import ChannelGraph, mask
from prunekit.errors import ConfigError
from prunekit.methods import PruneOptions, get_method, list_methods
from prunekit.metrics import count_macs
from prunekit.polarization import (
    PolarizationOptions,
    group_factors,
    macs_reduction,
    polarization_plan,
    polarization_prune,
)

X = torch.zeros(1, 1, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def polarized_resnet(seed: int = 0) -> nn.Module:
    """resnet20 (16×16 input) whose block-internal bn1 factors are polarized by hand: half exactly 0
    (β ≤ 0, so their channels output 0 after ReLU), half in [0.5, 1]; stream factors ~0.7."""
    torch.manual_seed(seed)
    m = models.create("resnet20", in_channels=1, input_size=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.2, 0.2, generator=g)
                if name.endswith("bn1") and name != "bn1":
                    w = 0.5 + 0.5 * torch.rand(n, generator=g)
                    w[torch.randperm(n, generator=g)[: n // 2]] = 0.0
                    mod.bias[w == 0] = -torch.rand(int((w == 0).sum()), generator=g)
                    mod.weight.copy_(w)
                else:
                    mod.weight.fill_(0.7)
    return m.eval()


def test_valley_removes_exactly_the_zeroed_channels_and_matches_the_masked_model():
    m = polarized_resnet()
    graph = ChannelGraph.build(m, X)
    plan, details = polarization_plan(m, graph)
    removed = {gp.provenance["name"]: gp.size - len(gp.keep) for gp in plan.groups}
    for name, mod in m.named_modules():
        if name.endswith("bn1") and name != "bn1":
            assert removed[name.replace("bn1", "conv1")] == int((mod.weight == 0).sum())
    assert removed["conv1"] == 0  # the residual stream group: every factor 0.7
    assert details["channels_removed"] == sum(removed.values()) and not details["fallback_groups"]
    from prunekit.engine import apply

    small = apply(m, graph, plan)
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(small(x), mask(m, graph, plan)(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(small(x), m(x), rtol=1e-4, atol=1e-5)  # zeroed γ and β ≤ 0: exact
    assert count_macs(small, input_shape=(1, 16, 16)) < 0.6 * count_macs(m, input_shape=(1, 16, 16))


def test_residual_group_combines_every_member_and_is_removed_physically():
    m = polarized_resnet()
    stream = [n for n in ("bn1", *(f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(3)))]
    ch = 3  # stream channel 3 of stage 1 (offset 8 in stage 2, 24 in stage 3 with option-A padding)
    offset = {"bn1": 0, "layer1": 0, "layer2": 8, "layer3": 24}
    with torch.no_grad():
        for n in stream:
            m.get_submodule(n).weight[ch + offset[n.split(".")[0]]] = 0.0
    graph = ChannelGraph.build(m, X)
    gid = graph.group("conv1").id
    f = {x.group_id: x for x in group_factors(m, graph, "max")}[gid]
    assert f.values[list(f.channels).index(ch)] == 0.0 and len(f.members) == 10
    small = polarization_prune(m, X)
    assert small.conv1.out_channels == 15 and small.layer3[2].conv2.out_channels == 63
    assert small.fc.in_features == 63  # removed from every member at once: no zero-scatter
    # one member still uses the channel: "max" keeps it, "mean" (0.7/10 = 0.07 > 0.01) too, "min" drops it
    with torch.no_grad():
        m.layer2[1].bn2.weight[ch + 8] = 0.7
    graph = ChannelGraph.build(m, X)
    assert polarization_prune(m, X).conv1.out_channels == 16
    assert polarization_prune(m, X, PolarizationOptions(combine="min")).conv1.out_channels == 15
    mean = {x.group_id: x for x in group_factors(m, graph, "mean")}[gid]
    assert mean.values[list(mean.channels).index(ch)] == pytest.approx(0.07)


def test_every_group_keeps_min_keep_channels():
    m = polarized_resnet()
    with torch.no_grad():
        m.layer1[0].bn1.weight.zero_()
    small = polarization_prune(m, X, PolarizationOptions(min_keep=2))
    assert small.layer1[0].conv1.out_channels == 2
    assert "layer1.0.conv1" in small.polarization_details["min_keep_groups"]


def test_threshold_modes():
    m = polarized_resnet()
    base = count_macs(m, input_shape=(1, 16, 16))
    auto = polarization_prune(m, X)
    glob = polarization_prune(m, X, PolarizationOptions(threshold="global"))
    assert count_macs(glob, input_shape=(1, 16, 16)) == count_macs(auto, input_shape=(1, 16, 16))
    fixed = polarization_prune(m, X, PolarizationOptions(threshold=0.75))
    assert fixed.polarization_details["threshold_mode"] == "value"
    assert count_macs(fixed, input_shape=(1, 16, 16)) < count_macs(auto, input_shape=(1, 16, 16))
    pct = polarization_prune(m, X, PolarizationOptions(threshold="percent", ratio=0.25))
    assert pct.polarization_details["channels_removed"] == round(0.25 * pct.polarization_details["channels_prunable"])
    assert 0 < macs_reduction(m, pct, X) < 1 and count_macs(pct, input_shape=(1, 16, 16)) < base
    with pytest.raises(ConfigError, match="ratio"):
        PolarizationOptions(threshold="percent")
    with pytest.raises(ConfigError, match="threshold"):
        PolarizationOptions(threshold="valley")
    assert PolarizationOptions(threshold="0.05").threshold == 0.05


def test_registered_method_and_its_options():
    assert "polarization" in list_methods()
    m = polarized_resnet()
    res = get_method("polarization")(m, X, PruneOptions(threshold="auto", method_options={"combine": "mean"}))
    assert res.details["combine"] == "mean" and res.details["pruned"] == res.details["channels_removed"] > 0
    with pytest.raises(ConfigError, match="does not take"):
        get_method("polarization")(m, X, PruneOptions(method_options={"colour": 1}))
    lenet = models.create("lenet-300-100")
    with pytest.raises(ConfigError, match="BatchNorm"):
        get_method("polarization")(lenet, torch.zeros(1, 1, 28, 28), PruneOptions())


def test_cli_train_with_regularizer_then_prune_and_finetune(tmp_path, capsys):
    from prunekit.cli import main

    common = ["--dataset", "synthetic", "--json"]
    run = tmp_path / "pol"
    assert main(["train", "--model", "resnet20", "--model-config", "widths=[2,4,4]", *common, "--epochs", "1",
                 "--lr", "0.5", "--batch-size", "256", "--regularizer", "polarization", "--reg-lambda", "0.02", "--reg-t", "1.2",
                 "--reg-bn-init", "0.5", "--out", str(run)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["regularizer"]["name"] == "polarization" and rep["regularizer"]["lam"] == 0.02
    assert 0 <= rep["macs_reduction_at_threshold"] < 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "macs_reduction" in log[0] and "train_penalty" in log[0]
    assert main(["prune", "--checkpoint", str(run), "--method", "polarization", "--threshold", "auto", *common,
                 "--finetune-epochs", "1", "--latency-runs", "2", "--out", str(tmp_path / "pruned")]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("accuracy_before", "accuracy", "accuracy_finetuned", "macs_reduction", "params", "macs"):
        assert key in rep, key
    assert rep["macs"] <= rep["macs_before"] and rep["finetune_epochs"] == 1
    assert main(["prune", "--checkpoint", str(run), *common]) == 2  # method 'prune' still needs --ratio


class Net(nn.Module):
    """conv-BN-ReLU → 1×1 conv-BN-ReLU → pool → linear: both consumers see constant removed channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(self.pool(x).flatten(1))


def test_removed_channels_constant_output_is_folded_into_the_next_bn_and_bias():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        for bn in (m.b1, m.b2):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.4, 1.0)
            bn.bias.uniform_(0.1, 0.5)  # β > 0: a removed channel still outputs relu(β) = β
        m.b1.weight[[1, 4]] = 0.0
        m.b2.weight[2] = 0.0
    x = torch.randn(8, 1, 6, 6)
    plain = polarization_prune(m, x[:1], PolarizationOptions(compensate=False))
    fixed = polarization_prune(m, x[:1])
    assert fixed.c1.out_channels == 4 and fixed.c2.out_channels == 4
    assert (plain(x) - m(x)).abs().max() > 1e-2  # removal alone shifts the outputs
    torch.testing.assert_close(fixed(x), m(x), rtol=1e-5, atol=1e-5)  # 1×1 conv → BN, pool → linear: exact
    assert fixed.polarization_details["compensation"] == {"compensated": 2, "not_compensated": []}


def test_compensation_reduces_the_error_with_padded_3x3_consumers():
    m = polarized_resnet()
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.endswith("bn1") and name != "bn1":
                mod.bias[mod.weight == 0] = 0.3
    x = torch.randn(4, 1, 16, 16)
    err = {c: (polarization_prune(m, X, PolarizationOptions(compensate=c))(x) - m(x)).abs().mean().item()
           for c in (False, True)}
    assert err[True] < 0.5 * err[False]
