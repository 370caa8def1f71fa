"""Neuron Merging Algorithms 1–3 on hand-computed cases, exact duplicates through the engine, signs,
thresholds, the general mode's per-group report, and the ``merge`` method entry point."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.compensate.decompose import bn_scale_and_bias
from prunekit.engine import ChannelGraph, GroupPlan, Plan, apply
from prunekit.errors import ConfigError
from prunekit.merging import BNStats, MergeOptions, merge, merge_plan, most_sim, most_sim_bn, prune_only

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- Alg. 2


def test_most_sim_hand_case_and_additive_merges():
    v = torch.tensor([[1.0, 0.0, 0.0],    # kept (column 0)
                      [0.0, 1.0, 0.0],    # kept (column 1)
                      [2.0, 0.0, 0.0],    # 2 × neuron 0 → column 0, scale 2
                      [0.0, 3.0, 4.0],    # cos 0.6 with neuron 1 → column 1, scale 5
                      [3.0, 0.1, 0.0]])   # ~3 × neuron 0 → column 0, scale ||(3, .1)||
    dec = most_sim(v, [0, 1], threshold=0.45)
    want = torch.zeros(5, 2, dtype=torch.float64)
    want[0, 0] = want[1, 1] = 1.0
    want[2, 0], want[3, 1], want[4, 0] = 2.0, 5.0, (9.01 ** 0.5)
    assert torch.allclose(dec.merge, want)
    assert dec.reason == ["merged"] * 3
    assert torch.allclose(dec.sim, torch.tensor([1.0, 0.6, 3 / 9.01 ** 0.5], dtype=torch.float64))
    # rows 2 and 4 both map to column 0: the next layer receives W[:, 0] + 2 W[:, 2] + 3.0017 W[:, 4]
    w_next = torch.arange(10.0).reshape(2, 5).double()
    assert torch.allclose((w_next @ dec.merge)[:, 0], w_next[:, 0] + 2 * w_next[:, 2] + 9.01 ** 0.5 * w_next[:, 4])


def test_threshold_semantics_zero_means_none():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.9]])  # cos(2, 0) = 0.743
    assert most_sim(v, [0, 1], threshold=0.8).reason == ["threshold"]
    assert most_sim(v, [0, 1], threshold=0).reason == ["merged"]      # t = 0: no threshold (official)
    assert most_sim(v, [0, 1], threshold=None).reason == ["merged"]
    assert most_sim(v, [0, 1], threshold=1).merged.sum() == 0          # main.py default: almost never merges
    pr = prune_only(3, [0, 1])
    assert pr.reason == ["prune"] and torch.equal(pr.merge[2], torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- Alg. 3


def _bn(gamma, beta, mean, var, eps=0.0):
    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    return BNStats(t(gamma), t(beta), t(mean), t(var), eps)


def test_bn_scale_paper_and_exact_hand_computed():
    # pruned n: γ=1, β=0.5, μ=0.2, var=4; kept m: γ=2, β=0.1, μ=0.3, var=1; ||F_n|| / ||F_m|| = s = 2
    bn_n, bn_m = _bn([1.0], [0.5], [0.2], [4.0]), _bn([2.0], [0.1], [0.3], [1.0])
    s = torch.tensor([[2.0]], dtype=torch.float64)
    scale, bias = bn_scale_and_bias(s, bn_n, bn_m, "paper")
    # S = s·(γm/γn)·(vn/vm) = 2·2·4 = 16;  B = |(γm/vm)(s(μn − vn·βn/γn) − μm) + βm| / S = |2(2(0.2−2)−0.3)+0.1|/16
    assert scale.item() == pytest.approx(16.0) and bias.item() == pytest.approx(7.7 / 16)
    scale, bias = bn_scale_and_bias(s, bn_n, bn_m, "exact")
    # k = γ/σ: kn = 0.5, km = 2 → S = s·kn/km = 0.5;  B = βn − S·βm + kn(s·μm − μn) = 0.5 − 0.05 + 0.5·0.4
    assert scale.item() == pytest.approx(0.5) and bias.item() == pytest.approx(0.65)


def test_most_sim_bn_choice_lambda_and_threshold():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # pruned 2: cos 0.707 with both kept filters
    bn = _bn([1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    dec = most_sim_bn(f, [0, 1], bn, lam=0.5, threshold=0.1, bn_scale="exact")
    assert dec.target.tolist() == [0] and dec.reason == ["merged"]  # equal cosines: the bias term decides
    # exact: s = √2 (vs filter 0), k = 1 → S = √2, B = 0 − √2·0 + 0 = 0
    assert dec.merge[2, 0].item() == pytest.approx(2 ** 0.5)
    assert most_sim_bn(f, [0, 1], bn, lam=0.5, threshold=0.8).reason == ["threshold"]  # cos 0.707 < 0.8
    f2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])  # pruned 2 ≈ filter 0
    bn2 = _bn([1.0, 1.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert most_sim_bn(f2, [0, 1], bn2, lam=1.0, threshold=0).target.tolist() == [0]  # λ=1: cosine only
    assert most_sim_bn(f2, [0, 1], bn2, lam=0.0, threshold=0).target.tolist() == [1]  # λ=0: bias only


def test_most_sim_bn_single_candidate_has_no_nan():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.5]])
    dec = most_sim_bn(f, [0], _bn([1.0, 1.0], [0.0, 0.2], [0.0, 0.1], [1.0, 2.0]), bn_scale="paper")
    assert dec.reason == ["merged"] and torch.isfinite(dec.merge).all()


def test_negative_scale_is_skipped_and_counted_or_explicitly_allowed():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    bn = _bn([1.0, 1.0, -1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # γ of the pruned < 0
    for mode in ("exact", "paper"):
        dec = most_sim_bn(f, [0, 1], bn, lam=1.0, threshold=0.1, bn_scale=mode)
        assert dec.reason == ["sign"] and dec.merge[2].abs().sum() == 0
        assert dec.stats()["skipped_sign"] == 1
        allowed = most_sim_bn(f, [0, 1], bn, lam=1.0, threshold=0.1, bn_scale=mode, negative="allow")
        assert allowed.reason == ["merged"] and allowed.merge[2, 0] < 0 and allowed.stats()["negative_merged"] == 1
    zero = _bn([1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # γ = 0: no valid scale
    assert most_sim_bn(f, [0, 1], zero, bn_scale="paper").reason == ["invalid"]
    assert most_sim_bn(f, [0, 1], zero, bn_scale="exact").reason == ["invalid"]


# ---------------------------------------------------------------------------------------------- through the engine


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.bn(self.conv1(x)))))


def _duplicate_filter(s: float, gamma3: float) -> ConvBN:
    """Filter 3 = s × filter 1 with BN 3 chosen so that B_exact = 0 (the merge is exact iff S > 0)."""
    torch.manual_seed(0)
    m = ConvBN().eval()
    with torch.no_grad():
        m.conv1.weight[3] = s * m.conv1.weight[1]
        m.conv1.weight[0] *= 3  # make filter 0 clearly the most important (keep 0, 1, 2)
        m.bn.weight.copy_(torch.tensor([0.7, 1.3, 0.9, gamma3]))
        m.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        m.bn.running_mean.copy_(torch.tensor([0.05, -0.1, 0.2, 0.3]))
        m.bn.running_var.copy_(torch.tensor([0.8, 1.5, 1.1, 2.0]))
        eps = m.bn.eps
        k = m.bn.weight / torch.sqrt(m.bn.running_var + eps)
        scale = s * k[3] / k[1]
        m.bn.bias[3] = scale * m.bn.bias[1] - k[3] * (s * m.bn.running_mean[1] - m.bn.running_mean[3])
    return m


def _plan(graph, name, keep):
    g = graph.group(name)
    return Plan([GroupPlan(group_id=g.id, keep=keep, size=g.size)])


def test_exact_positive_duplicate_filter_reproduces_the_output():
    model = _duplicate_filter(s=0.6, gamma3=0.8)
    x = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = ChannelGraph.build(model, x[:1])
    plan, reports = merge_plan(model, graph, _plan(graph, "conv1", [0, 1, 2]), MergeOptions(threshold=0.99))
    assert reports[0]["merged"] == 1 and reports[0]["algorithm"] == "mostsim-bn"
    merged = apply(model, graph, plan)
    with torch.no_grad():
        y, ym = model(x), merged(x)
    assert merged.conv2.in_channels == 3
    assert (ym - y).abs().max() / y.abs().max() < 1e-5
    # the official formula (variance, inverted BN ratio) is not exact on the same network
    paper, _ = merge_plan(model, graph, _plan(graph, "conv1", [0, 1, 2]), MergeOptions(bn_scale="paper"))
    with torch.no_grad():
        yp = apply(model, graph, paper)(x)
    assert (yp - y).abs().max() / y.abs().max() > 1e-3


def test_negative_duplicate_is_not_merged_silently():
    model = _duplicate_filter(s=0.6, gamma3=-0.8)  # S < 0: ReLU does not commute
    graph = ChannelGraph.build(model, (1, 2, 8, 8))
    plan, reports = merge_plan(model, graph, _plan(graph, "conv1", [0, 1, 2]), MergeOptions(threshold=0.5))
    assert reports[0]["skipped_sign"] == 1 and reports[0]["merged"] == 0 and plan.groups[0].merge is None


def test_exact_duplicate_fc_neurons_add_up_in_the_next_layer():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        model[0].weight[3] = 2.0 * model[0].weight[0]
        model[0].bias[3] = 2.0 * model[0].bias[0]
        model[0].weight[4] = 0.5 * model[0].weight[0]
        model[0].bias[4] = 0.5 * model[0].bias[0]
    x = torch.randn(7, 6)
    graph = ChannelGraph.build(model, x[:1])
    plan, reports = merge_plan(model, graph, _plan(graph, "0", [0, 1, 2]), MergeOptions())
    m = plan.groups[0].merge
    assert reports[0]["merged"] == 2 and m[3, 0].item() == pytest.approx(2.0) and m[4, 0].item() == pytest.approx(0.5)
    with torch.no_grad():
        assert torch.allclose(apply(model, graph, plan)(x), model(x), atol=1e-5)


def test_general_mode_reports_every_group():
    from prunekit.models import create

    torch.manual_seed(3)
    model = create("resnet20", shortcut="B", input_size=16).eval()
    res = merge(model, (1, 3, 16, 16), MergeOptions(ratio=0.5))
    groups = {g["name"]: g for g in res.report["groups"]}
    assert groups["layer1.0.conv1"]["action"] == "merged" and groups["layer1.0.conv1"]["algorithm"] == "mostsim-bn"
    assert groups["conv1"]["action"] == "pruned" and "producers coupled" in groups["conv1"]["reason"]
    assert res.report["merged"] + res.report["pruned"] == res.report["channels_removed"] > 0
    for g in res.report["groups"]:
        if g["action"] == "merged":
            assert -1 <= g["sim_min"] <= g["sim_median"] <= g["sim_max"] <= 1 and g["skipped_threshold"] >= 0
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # model types
    assert merge(model, (1, 3, 16, 16), model_type="original").model is not model
    pruned = merge(model, (1, 3, 16, 16), MergeOptions(ratio=0.5, model_type="prune"))
    assert pruned.report["merged"] == 0 and all(gp.merge is None for gp in pruned.plan.groups)


def test_general_mode_equals_the_lenet_preset():
    from prunekit.models import create

    torch.manual_seed(4)
    model = create("lenet-300-100").eval()
    a = merge(model, (1, 1, 28, 28), MergeOptions(ratio=0.7, threshold=0))  # random weights: low cosines
    b = merge(model, (1, 1, 28, 28), MergeOptions(ratio=0.7, threshold=0, preset="lenet-300-100"))
    assert [g.keep for g in a.plan.groups] == [g.keep for g in b.plan.groups]
    assert all(torch.equal(x.merge, y.merge) for x, y in zip(a.plan.groups, b.plan.groups))


def test_options_are_validated():
    with pytest.raises(ConfigError, match="bn_scale"):
        MergeOptions(bn_scale="approx")
    with pytest.raises(ConfigError, match="model_type"):
        MergeOptions(model_type="slim")
    with pytest.raises(Exception, match="preset"):
        MergeOptions(preset="resnet-57")


def test_merge_method_registered_for_the_cli():
    from prunekit.methods import PruneOptions, get_method, list_methods

    assert {"merge", "lstsq"} <= set(list_methods())
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    res = get_method("merge")(model, (1, 16), PruneOptions(ratio=0.5, threshold="0", method_options={"lam": 0.5}))
    assert res.details["merged"] == 4 and res.details["pruned"] == 0 and res.details["include_bias"] is True
    assert res.model[1].out_features == 4
    with pytest.raises(ConfigError, match="not understood"):
        get_method("merge")(model, (1, 16), PruneOptions(ratio=0.5, method_options={"lamda": 0.5}))
