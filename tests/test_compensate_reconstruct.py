"""Whole-layer reconstruction (``prunekit.compensate.reconstruct``): exact recovery where the pruned
channels are redundant, intercepts into a bias or the following BatchNorm, grouped convs, token and
dict inputs, bad input, save → reload, and the ``reconstruct`` method / CLI (synthetic data only)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from prunekit.compensate import ReconstructOptions, reconstruct_plan
from prunekit.engine import ChannelGraph, GroupPlan, Plan, apply, make_plan
from prunekit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def redundant_mlp() -> nn.Module:
    """Hidden neuron 3 = 2 × neuron 0 and neuron 4 = neuron 1 + 0 (ReLU is positively homogeneous)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        net[0].weight[3] = 2 * net[0].weight[0]
        net[0].bias[3] = 2 * net[0].bias[0]
        net[0].weight[4] = net[0].weight[1]
        net[0].bias[4] = net[0].bias[1]
    return net


def test_redundant_neurons_are_recovered_exactly_by_the_refit():
    net = redundant_mlp()
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=[0, 1, 2], size=5)])
    fitted, reports = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=300, ridge=0.0))
    with torch.no_grad():
        assert rel_error(apply(net, graph, plan)(x), net(x)) > 0.05  # pruning alone loses them
        assert rel_error(apply(net, graph, fitted)(x), net(x)) < 1e-6
    (rep,) = reports
    assert rep["module"] == "2" and rep["action"] == "refit" and rep["rel_error"] < 1e-10 < rep["rel_error_pruned"]
    w = fitted.refit("2").weight  # the closed form: the copies' columns added onto their originals
    want = net[2].weight.detach().double()[:, :3].clone()
    want[:, 0] += 2 * net[2].weight.detach().double()[:, 3]
    want[:, 1] += net[2].weight.detach().double()[:, 4]
    assert torch.allclose(w, want, atol=1e-6)


def conv_net(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, bias=bias),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[0].weight[4] = 0.5 * net[0].weight[1]  # channel 4 = 0.5 · channel 1
        net[0].bias[4] = 0.5 * net[0].bias[1]
        net[0].weight[5] = 0.0  # channel 5 is the constant relu(0.7) = 0.7
        net[0].bias[5] = 0.7
        net[3].running_mean.uniform_(-0.5, 0.5)
        net[3].running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("bias", [True, False])
def test_conv_refit_is_exact_for_a_scaled_copy_and_a_constant_channel(bias):
    """3×3 padded consumer: the copy is exact at every tap; the constant channel is exact away from the
    zero-padded border, so the refit error is small but not zero — far below plain pruning. Without a bias
    the constant goes into the BatchNorm that follows (running_mean −= c)."""
    net = conv_net(bias)
    x = torch.randn(200, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=[0, 1, 2, 3], size=6)])
    fitted, (rep, *_) = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=200, ridge=1e-8))
    refit = fitted.refit("2")
    assert (refit.bias is not None) == bias and (refit.norm == "3") == (not bias)
    assert rep["intercept"] and rep["rel_error"] < 0.1 * rep["rel_error_pruned"]
    with torch.no_grad():
        new = apply(net, graph, fitted)
        assert rel_error(new(x), net(x)) < 0.1 * rel_error(apply(net, graph, plan)(x), net(x))
        if not bias:
            assert not torch.equal(new[3].running_mean, net[3].running_mean)


def test_unpadded_conv_with_constant_channel_is_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Conv2d(5, 3, 3)).eval()
    with torch.no_grad():
        net[0].weight[4] = 0.0
        net[0].bias[4] = 0.3
        net[0].weight[3] = 3 * net[0].weight[0]
        net[0].bias[3] = 3 * net[0].bias[0]
    x = torch.randn(100, 2, 7, 7, generator=torch.Generator().manual_seed(3))
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=[0, 1, 2], size=5)])
    fitted, _ = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=100, ridge=0.0))
    with torch.no_grad():
        assert rel_error(apply(net, graph, fitted)(x), net(x)) < 1e-6


@pytest.mark.parametrize("one_d", [False, True])
def test_transposed_conv_consumer_is_refit_exactly_and_reloads(tmp_path, one_d):
    """A strided, padded ConvTranspose reading two scaled copies: the refit (its equivalent stride-1 conv,
    flipped kernel) absorbs them exactly, and the compensated model reloads bit-exactly."""
    from prunekit.io import load_model, save_model

    torch.manual_seed(0)
    conv, convt = (nn.Conv1d, nn.ConvTranspose1d) if one_d else (nn.Conv2d, nn.ConvTranspose2d)
    net = nn.Sequential(conv(2, 6, 3, padding=1), nn.ReLU(),
                        convt(6, 3, 3, stride=2, padding=1, output_padding=1)).eval()
    with torch.no_grad():
        net[0].weight[4], net[0].bias[4] = 0.5 * net[0].weight[1], 0.5 * net[0].bias[1]
        net[0].weight[5], net[0].bias[5] = 3 * net[0].weight[0], 3 * net[0].bias[0]
    x = torch.randn(60, 2, *((9,) if one_d else (5, 6)), generator=torch.Generator().manual_seed(5))
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=[0, 1, 2, 3], size=6)])
    fitted, (rep,) = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=60, ridge=0.0,
                                                                              positions=None))
    assert rep["module"] == "2" and rep["action"] == "refit" and rep["rel_error"] < 1e-10
    with torch.no_grad():
        small = apply(net, graph, fitted)
        assert small[2].weight.shape[0] == 4 and rel_error(small(x), net(x)) < 1e-6
        assert rel_error(apply(net, graph, plan)(x), net(x)) > 0.05
    save_model(tmp_path / "m", small)
    again, _ = load_model(tmp_path / "m", model=copy.deepcopy(net))
    assert torch.equal(again(x), small(x))


def test_depthwise_and_grouped_consumers_are_refit_per_conv_group():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(120, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    graph = ChannelGraph.build(net, x[:1])
    plan = make_plan(net, graph, ratio=0.5)
    fitted, reports = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=120))
    by_module = {r["module"]: r for r in reports}
    assert by_module["4"]["conv_groups"] == 2 and by_module["4"]["action"] == "refit"
    assert all(r["rel_error"] <= r["rel_error_pruned"] + 1e-9 for r in reports)
    with torch.no_grad():
        pruned, refit = apply(net, graph, plan), apply(net, graph, fitted)
        assert refit[4].groups == pruned[4].groups and refit[4].weight.shape == pruned[4].weight.shape
        assert rel_error(refit(x), net(x)) < rel_error(pruned(x), net(x))


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + self.down(torch.relu(self.up(h)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.head(h)


@pytest.mark.parametrize("as_dict", [False, True])
def test_token_ids_and_dict_inputs_pass_through_untouched(as_dict):
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = torch.randint(0, 50, (64, 10), generator=torch.Generator().manual_seed(5))
    data = {"input_ids": ids, "attention_mask": torch.ones(64, 10)} if as_dict else ids
    example = {"input_ids": ids[:1], "attention_mask": torch.ones(1, 10)} if as_dict else ids[:1]
    graph = ChannelGraph.build(model, example)
    plan = make_plan(model, graph, ratio=0.0, overrides={"up": 0.5})  # MLP neurons only
    assert len(plan.group(graph.group("up").id).keep) == 8
    fitted, reports = reconstruct_plan(model, graph, plan, data, ReconstructOptions(calibration=64))
    assert [r["module"] for r in reports] == ["down", "head"] and reports[0]["rows"] == 64 * 10
    call = (lambda m: m(**data)) if as_dict else (lambda m: m(ids))
    with torch.no_grad():
        assert rel_error(call(apply(model, graph, fitted)), call(model)) < rel_error(
            call(apply(model, graph, plan)), call(model))


def test_fewer_samples_than_unknowns_is_solved_by_the_ridge_and_reported():
    net = conv_net(True)
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(6))  # 3·4 rows < 4·9+1 unknowns
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=[0, 1, 2, 3], size=6)])
    _, (rep, *_) = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=3))
    assert rep["underdetermined"] and rep["rows"] == 12 and rep["unknowns"] == 37


def test_nan_activations_and_oversized_grams_are_errors_naming_the_layer():
    net = redundant_mlp()
    x = torch.randn(20, 6)
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=[0, 1, 2], size=5)])
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ConfigError, match="'2' contain NaN"):
        reconstruct_plan(net, graph, plan, bad, ReconstructOptions(calibration=20))
    with pytest.raises(ConfigError, match="reconstructing '2' needs Gram matrices"):
        reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=20, max_gram_bytes=100))
    with pytest.raises(ConfigError, match="holdout"):
        ReconstructOptions(holdout=1.0)


def test_held_out_ridge_choice_is_one_of_the_grid_and_not_worse_than_pruning():
    net = conv_net(True)
    x = torch.randn(60, 2, 6, 6, generator=torch.Generator().manual_seed(7))
    graph = ChannelGraph.build(net, x[:1])
    plan = make_plan(net, graph, ratio=0.5)
    opts = ReconstructOptions(calibration=60, ridge_grid=(1e-3, 1e-1, 10.0))
    _, reports = reconstruct_plan(net, graph, plan, x, opts)
    assert all(r["ridge_chosen"] and r["ridge"] in opts.ridge_grid for r in reports)


def test_reconstructed_zoo_model_reloads_bit_exactly_without_the_method_modules(tmp_path):
    from prunekit.io import save_model
    from prunekit.methods import PruneOptions, get_method
    from prunekit.models import create

    torch.manual_seed(0)
    model = create("lenet-300-100").eval()
    data = torch.randn(200, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    result = get_method("reconstruct")(model, data[:1], PruneOptions(
        ratio=0.7, calibration_data=data, method_options={"calibration": 200}))
    assert result.details["consumers_refit"] == 2 and result.details["channels_removed"] == 280
    save_model(tmp_path / "small", result.model)
    with torch.no_grad():
        want = result.model(data[:8])
    torch.save(data[:8].clone(), tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from prunekit.io import load_model\n"
        f"m, _ = load_model({str(tmp_path / 'small')!r})\n"
        "assert not any(k.startswith(('prunekit.compensate', 'prunekit.merging')) for k in sys.modules), sorted(sys.modules)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(m.eval()(x), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), want)


def test_cli_prune_reconstruct_reports_method_seconds(capsys, tmp_path):
    from prunekit.cli import main

    assert main(["train", "--model", "lenet-300-100", "--dataset", "synthetic", "--recipe", "fast",
                 "--epochs", "1", "--out", str(tmp_path / "dense"), "--json"]) == 0
    capsys.readouterr()
    assert main(["prune", "--checkpoint", str(tmp_path / "dense"), "--dataset", "synthetic", "--method",
                 "reconstruct", "--ratio", "0.5", "--calibration", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "reconstruct" and report["consumers_refit"] == 2
    assert report["method_seconds"] > 0 and report["params"] < report["params_before"]
    assert report["accuracy"] >= report["accuracy_before"] - 15.0


def test_greedy_selection_keeps_one_of_each_redundant_pair_and_is_then_exact():
    """Neurons 3 = 2·n0 and 4 = n1: keeping 3 of 5 is lossless only with one of {0, 3}, one of {1, 4} and
    neuron 2. The criterion (l1-norm) keeps 3 and 0 — both copies of one signal; greedy does not."""
    net = redundant_mlp()
    with torch.no_grad():
        net[0].weight[2] *= 0.1  # the unique neuron has the smallest norm
        net[0].bias[2] *= 0.1
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(9))
    graph = ChannelGraph.build(net, x[:1])
    plan = make_plan(net, graph, ratio=0.4)  # l1-norm: keeps 3 of 5
    gid = graph.group("0").id
    assert 2 not in plan.group(gid).keep
    opts = ReconstructOptions(calibration=300, ridge=0.0, select="greedy")
    fitted, (rep,) = reconstruct_plan(net, graph, plan, x, opts)
    keep = set(fitted.group(gid).keep)
    assert len(keep) == 3 and 2 in keep and len(keep & {0, 3}) == 1 and len(keep & {1, 4}) == 1
    assert rep["selected"] == "greedy" and fitted.group(gid).criterion == "greedy"
    with torch.no_grad():
        assert rel_error(apply(net, graph, fitted)(x), net(x)) < 1e-6
        crit, _ = reconstruct_plan(net, graph, plan, x, opts.replace(select="criterion"))
        assert rel_error(apply(net, graph, crit)(x), net(x)) > 1e-3


def test_layers_all_also_refits_the_layers_after_the_first_pruned_consumer():
    net = conv_net(True)
    x = torch.randn(80, 2, 6, 6, generator=torch.Generator().manual_seed(10))
    graph = ChannelGraph.build(net, x[:1])
    plan = Plan([GroupPlan(group_id=graph.group("0").id, keep=[0, 1, 2], size=6)])
    _, reports = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=80, layers="all"))
    assert [r["module"] for r in reports] == ["2", "7"]  # the consumer, then the classifier
    _, reports = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=80, layers="consumers"))
    assert [r["module"] for r in reports] == ["2"]


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), Block(8), Block(8), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return net


def test_residual_target_finds_the_skip_and_corrects_its_drift():
    from prunekit.compensate.residual import find_skips

    net = residual_net()
    skips, _ = find_skips(net)
    assert {k: v.norm for k, v in skips.items()} == {"2.conv2": "2.bn2", "3.conv2": "3.bn2"}
    x = torch.randn(300, 2, 6, 6, generator=torch.Generator().manual_seed(11))
    graph = ChannelGraph.build(net, x[:1])
    plan = make_plan(net, graph, ratio=0.0, overrides={"*.conv1": 0.75})
    plain, _ = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=300, residual=False,
                                                                        layers="consumers"))
    aware, reports = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=300, layers="consumers"))
    by_module = {r["module"]: r for r in reports}
    assert by_module["3.conv2"]["residual_target"] and by_module["2.conv2"]["residual_target"]
    xt = torch.randn(200, 2, 6, 6, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():  # the first block sees no drift (same targets); the second one corrects block 1's
        ref = net[:4](xt)
        e_plain = rel_error(apply(net, graph, plain)[:4](xt), ref)
        e_aware = rel_error(apply(net, graph, aware)[:4](xt), ref)
    assert e_aware < e_plain - 1e-3  # identical computations without the correction


def test_batchnorm_re_estimation_matches_the_pruned_networks_statistics():
    from prunekit.compensate.batchnorm import batchnorm_refits
    from prunekit.runtime import capture

    net = residual_net()
    x = torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(13))
    graph = ChannelGraph.build(net, x[:1])
    plan = make_plan(net, graph, ratio=0.0, overrides={"*.conv1": 0.5})
    refits = batchnorm_refits(net, graph, plan, x, batch_size=64)
    assert {r.module for r in refits} == {"2.bn1", "2.bn2", "3.bn1", "3.bn2"}
    pruned = apply(net, graph, plan)
    with torch.no_grad(), capture(pruned, ["2.bn1"]) as seen:  # the first BN: no re-estimated BN upstream
        pruned(x)
    h = seen["2.bn1"]  # (64, 4, 6, 6): the kept channels only
    new = apply(net, graph, plan.with_refits(refits))
    assert new[2].bn1.running_mean.shape == (4,)
    assert torch.allclose(new[2].bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(new[2].bn1.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-5)
    assert not torch.allclose(new[3].bn1.running_mean, pruned[3].bn1.running_mean)
    _, reports = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=64, bn_recalibrate=True))
    assert all(r["action"] == "refit" for r in reports)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0),
                                                                           dilation=(1, 2)),
                                  nn.Conv1d(3, 4, 5, stride=2, padding=2),
                                  nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
                                  nn.ConvTranspose2d(3, 4, (4, 3), stride=(3, 2), padding=(2, 0), dilation=(1, 2),
                                                     output_padding=(2, 1)),
                                  nn.ConvTranspose2d(3, 4, 2, padding=3),  # padding beyond the kernel: a crop
                                  nn.ConvTranspose1d(3, 4, 5, stride=2, padding=1, output_padding=1)])
def test_sampled_patches_are_the_unfolded_rows_at_those_positions(conv):
    """Patches at sampled positions are rows of the full patches, and patches × weight_oi are the layer's own
    output — for transposed convolutions too (the stride-1 conv they equal)."""
    from prunekit.compensate.layers import to_module_layout, weight_oi
    from prunekit.compensate.normal_equations import patches as _patches
    from prunekit.compensate.targets import output_rows as _outputs

    x = torch.randn(2, 3, 9, 8) if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) else torch.randn(2, 3, 11)
    y = conv(x).detach()
    n_pos = y[0, 0].numel()
    pos = torch.tensor([0, 3, n_pos - 1])
    full_u, full_y = _patches(conv, x), _outputs(conv, y)
    rows = (torch.arange(2)[:, None] * n_pos + pos[None, :]).reshape(-1)
    assert torch.equal(_patches(conv, x, pos), full_u[rows]) and torch.equal(_outputs(conv, y, pos), full_y[rows])
    w = weight_oi(conv).reshape(4, -1)
    assert torch.allclose(full_u @ w.t() + conv.bias.detach(), full_y, atol=1e-5)  # rows really are the conv
    assert torch.equal(to_module_layout(conv, weight_oi(conv)), conv.weight.detach())


def test_downstream_weights_are_the_next_layers_squared_column_norms():
    from prunekit.compensate.reconstruct import _downstream_weights

    net = redundant_mlp()
    graph = ChannelGraph.build(net, (1, 6))
    w = _downstream_weights(net, graph, "0")
    cols = (net[2].weight.detach().double() ** 2).sum(0)
    assert torch.allclose(w, cols / cols.mean())
    assert _downstream_weights(net, graph, "2") is None  # the logits: nothing reads them
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(14))
    plan = make_plan(net, graph, ratio=0.4)
    _, reports = reconstruct_plan(net, graph, plan, x, ReconstructOptions(calibration=100, select="greedy",
                                                                          weighted=True))
    assert reports[0]["selected"] == "greedy"


def test_plain_prune_refuses_a_preset_it_would_ignore():
    from prunekit.methods import PruneOptions, get_method
    from prunekit.models import create

    with pytest.raises(ConfigError, match="does not take a preset"):
        get_method("prune")(create("lenet-300-100"), (1, 1, 28, 28), PruneOptions(method_options={"preset": "x"}))


def test_forward_backward_selection_undoes_a_greedy_first_pick():
    """y = x1 + x2 and x3 = x1 + x2 + small noise: forward selection of 2 takes x3 first and cannot be
    exact; going one past and dropping the cheapest channel (OBS cost) ends at {x1, x2}, which is exact."""
    from prunekit.compensate.greedy import select_channels

    g = torch.Generator().manual_seed(15)
    x1, x2 = torch.randn(500, 1, generator=g, dtype=torch.float64), torch.randn(500, 1, generator=g, dtype=torch.float64)
    x3 = x1 + x2 + 0.05 * torch.randn(500, 1, generator=g, dtype=torch.float64)
    u = torch.cat([x1, x2, x3, torch.ones(500, 1, dtype=torch.float64)], 1)
    y = x1 + x2
    stats = [(u.t() @ u, u.t() @ y, torch.arange(3)[:, None])]
    assert 2 in select_channels(stats, 2)
    assert select_channels(stats, 2, extra=0.5) == [0, 1]
