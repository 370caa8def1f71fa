"""Least-squares compensation: exact recovery cases, the ridge algebra, greedy selection, the engine's
refit records (output offsets into a bias or the following BN, whole-weight refits, save/load), conv nets,
and the ``lstsq`` method entry point (synthetic data only)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.compensate import (
    GroupStats,
    LstsqOptions,
    calibration_inputs,
    fit_from_stats,
    greedy_select,
    lstsq_plan,
)
from prunekit.engine import ChannelGraph, GroupPlan, Plan, PlanError, Refit, apply
from prunekit.errors import ConfigError
from prunekit.merging import MergeOptions, compensate, merge

torch.set_num_threads(1)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).eval()


def test_refit_offsets_go_into_the_bias_or_the_following_batchnorm():
    model = mlp()
    graph = ChannelGraph.build(model, (1, 6))
    g = graph.group("0")
    offset = torch.tensor([0.5, -1.0, 2.0, 0.25])
    plan = Plan([GroupPlan(group_id=g.id, keep=[0, 1, 2], size=5)], refits=[Refit(module="2", offset=offset)])
    new = apply(model, graph, plan)
    assert torch.equal(new[2].bias, model[2].bias.detach() + offset)  # 4 outputs, none pruned
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        conv[1].running_mean.copy_(torch.tensor([0.1, 0.2, 0.3]))
    cg = ChannelGraph.build(conv, (1, 1, 4, 4))
    delta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    new = apply(conv, cg, Plan(refits=[Refit(module="0", offset=delta, norm="1")]))
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():  # BN(conv(x) + δ) with the old statistics == BN'(conv(x)) with μ' = μ − δ
        want = conv[3](conv[2](conv[1](conv[0](x) + delta.float().view(1, 3, 1, 1))))
        assert torch.allclose(new(x), want, atol=1e-6)
    assert torch.allclose(new[1].running_mean, torch.tensor([0.1, 0.2, 0.3]) - delta.float())
    with pytest.raises(PlanError, match="needs a bias"):  # a bias-free conv without its BN cannot take it
        apply(conv, cg, Plan(refits=[Refit(module="0", offset=delta)]))


def test_refit_weights_are_written_on_the_kept_rows_and_saved_with_the_plan(tmp_path):
    model = mlp()
    graph = ChannelGraph.build(model, (1, 6))
    g0, g2 = graph.group("0"), graph.group("2")
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    b = torch.randn(4, generator=torch.Generator().manual_seed(2))
    plan = Plan([GroupPlan(group_id=g0.id, keep=[1, 2, 4], size=5), GroupPlan(group_id=g2.id, keep=[0, 3], size=4)],
                refits=[Refit(module="2", weight=w, bias=b, provenance={"ridge": 0.01})])
    new = apply(model, graph, plan)
    assert torch.equal(new[2].weight, w[[0, 3]]) and torch.equal(new[2].bias, b[[0, 3]])
    assert new[4].weight.shape == (3, 2)
    plan.save(tmp_path / "plan")
    back = Plan.load(tmp_path / "plan")
    assert back == plan and back.refits[0].provenance == {"ridge": 0.01}
    assert Plan.from_json(plan.to_json()) == plan
    bad = Plan(refits=[Refit(module="2", weight=torch.zeros(4, 5, 1))])
    with pytest.raises(PlanError, match="shape"):
        apply(model, graph, bad)


def test_fit_from_stats_is_the_ridge_solution():
    g = torch.Generator().manual_seed(0)
    xc = torch.randn(50, 4, generator=g, dtype=torch.float64)
    xo = torch.randn(50, 4, generator=g, dtype=torch.float64)
    aug = torch.cat([xc, torch.ones(50, 1, dtype=torch.float64)], 1)
    stats = GroupStats(aug.t() @ aug, aug.t() @ xo, float((xo * xo).sum()), 50)
    keep = [0, 2]
    m0 = torch.zeros(4, 2, dtype=torch.float64)
    m0[0, 0] = m0[2, 1] = 1
    m, shift, info = fit_from_stats(stats, keep, m0, ridge=0.1, intercept=True)
    x = torch.cat([xc[:, keep], torch.ones(50, 1, dtype=torch.float64)], 1)
    lam = 0.1 * float((xc[:, keep] ** 2).sum()) / 2
    pen = torch.diag(torch.tensor([lam, lam, 0.0], dtype=torch.float64))
    prior = torch.cat([m0.t(), torch.zeros(1, 4, dtype=torch.float64)])
    sol = torch.linalg.solve(x.t() @ x + pen, x.t() @ xo + pen @ prior)
    assert torch.allclose(m, sol[:2].t()) and torch.allclose(shift, sol[2])
    resid = xo - x @ sol
    assert info["rel_error"] == pytest.approx(float((resid ** 2).sum() / (xo ** 2).sum()))
    assert info["rel_error"] < info["rel_error_init"]


def test_lstsq_recovers_linear_dependencies_and_constants_exactly():
    model = mlp(1)
    with torch.no_grad():  # neuron 3 = 0.7·neuron 0 + 1.3·neuron 1 on inputs where all are active; 4 is constant
        model[0].weight[3] = 0.7 * model[0].weight[0] + 1.3 * model[0].weight[1]
        model[0].bias[3] = 0.7 * model[0].bias[0] + 1.3 * model[0].bias[1]
        model[0].weight[4] = 0.0
        model[0].bias[4] = 0.8
        model[0].bias[:3] += 20.0  # every kept neuron is active: ReLU is the identity on them
        model[0].bias[3] += 0.7 * 20 + 1.3 * 20
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(2))
    graph = ChannelGraph.build(model, x[:1])
    g = graph.group("0")
    plan = Plan([GroupPlan(group_id=g.id, keep=[0, 1, 2], size=5)])
    fitted, reports = lstsq_plan(model, graph, plan, x, LstsqOptions(calibration=400, ridge=0.0))
    assert reports[0]["intercept"] and reports[0]["rel_error"] < 1e-10 < reports[0]["rel_error_init"]
    m = fitted.groups[0].merge
    assert torch.allclose(m[3], torch.tensor([0.7, 1.3, 0.0], dtype=torch.float64), atol=1e-6)
    offset = fitted.refit("2").offset  # the intercept 0.8 on channel 4, seen through the consumer's weights
    assert torch.allclose(offset, 0.8 * model[2].weight.detach().double()[:, 4], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(apply(model, graph, fitted)(x), model(x), atol=1e-4)


def test_greedy_selection_skips_redundant_channels():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 3, generator=g, dtype=torch.float64)
    xc = torch.cat([base, 2 * base[:, :1], base[:, 1:2] - base[:, 2:3]], 1)  # channels 3, 4 are redundant
    aug = torch.cat([xc, torch.ones(200, 1, dtype=torch.float64)], 1)
    stats = GroupStats(aug.t() @ aug, aug.t() @ xc, float((xc * xc).sum()), 200)
    chosen = greedy_select(stats, torch.eye(5, dtype=torch.float64), 3)
    assert len(chosen) == 3 and len({0, 3} & set(chosen)) == 1  # never both copies of one signal
    _, _, info = fit_from_stats(stats, chosen, torch.zeros(5, 3, dtype=torch.float64), ridge=0.0, intercept=True)
    assert info["rel_error"] < 1e-10  # three independent channels explain all five
    assert 4 in greedy_select(stats, torch.eye(5, dtype=torch.float64), 2, fixed=[4])  # protected: kept first


def test_lstsq_on_a_conv_net_beats_pruning_and_merging_on_held_out_inputs():
    from prunekit.models import create

    torch.manual_seed(4)
    model = create("resnet20", shortcut="B", input_size=16).eval()
    # make the block-internal activations informative: calibrate BN running stats on random data
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 3, 16, 16))
    model.eval()
    calib = torch.randn(160, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    held = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    opts = MergeOptions(ratio=0.5, preset="resnet56")
    res = compensate(model, (1, 3, 16, 16), calib, LstsqOptions(calibration=160), opts)
    rep = {g["name"]: g for g in res.report["groups"]}
    assert len(rep) == 9 and all(g["algorithm"] == "lstsq" and g["rel_error"] < g["rel_error_init"]
                                 for g in rep.values())
    assert not rep["layer1.0.conv1"]["intercept"]  # bias-free, padded convs: no intercept
    with torch.no_grad():
        y = model(held)

        def err(m):
            return float(((m(held) - y) ** 2).mean() / (y ** 2).mean())

        e_lstsq = err(res.model)
        e_prune = err(merge(model, held[:1], opts.replace(model_type="prune")).model)
        e_merge = err(merge(model, held[:1], opts).model)
    assert e_lstsq < 0.7 * min(e_prune, e_merge)
    greedy = compensate(model, (1, 3, 16, 16), calib, LstsqOptions(calibration=160, select="greedy"), opts)
    assert sum(p.numel() for p in greedy.model.parameters()) == sum(p.numel() for p in res.model.parameters())


def test_calibration_inputs_never_need_labels():
    ds = [(torch.full((2,), float(i)), i % 3) for i in range(10)]
    x = calibration_inputs(ds, 4, seed=1)
    assert x.shape == (4, 2) and len(set(x[:, 0].tolist())) == 4
    assert torch.equal(calibration_inputs(ds, 4, seed=1), x)
    with pytest.raises(ConfigError, match="asked for 11"):
        calibration_inputs(ds, 11)
    with pytest.raises(ConfigError, match="calibration"):
        LstsqOptions(calibration=0)


def test_lstsq_method_entry_point():
    from prunekit.methods import PruneOptions, get_method

    torch.manual_seed(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    data = torch.randn(300, 1, 4, 4)
    opts = PruneOptions(ratio=0.5, method_options={"calibration": 200}, calibration_data=lambda: data)
    res = get_method("lstsq")(model, (1, 1, 4, 4), opts)
    assert res.details["merged"] == 5 and res.details["calibration"] == 200 and res.model[1].out_features == 5
    greedy = get_method("lstsq")(model, (1, 1, 4, 4), PruneOptions(ratio=0.5, criterion="greedy",
                                                                  method_options={"calibration": 200},
                                                                  calibration_data=data))
    assert greedy.details["select"] == "greedy"
    with pytest.raises(ConfigError, match="calibration inputs"):
        get_method("lstsq")(model, (1, 1, 4, 4), PruneOptions(ratio=0.5))
    with pytest.raises(ConfigError, match="greedy"):
        get_method("merge")(model, (1, 1, 4, 4), PruneOptions(ratio=0.5, criterion="greedy"))
