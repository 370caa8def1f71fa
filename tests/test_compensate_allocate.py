"""Survivors chosen across groups (``select="global"``, :mod:`prunekit.compensate.allocate`) and greedy
selection of multi-column channels (heads): the OBS block costs against brute-force refits, the budget kept,
free channels taken first, heads chosen from the data."""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.compensate import ReconstructOptions, reconstruct_plan
from prunekit.compensate.allocate import Pool, _Elimination, allocate
from prunekit.engine import ChannelGraph, GroupPlan, Plan, apply

pytestmark = pytest.mark.usefixtures("one_thread")


def _lstsq_error(u: torch.Tensor, y: torch.Tensor, cols: list[int]) -> float:
    a = u[:, cols]
    w = torch.linalg.lstsq(a, y).solution
    return float((y - a @ w).pow(2).sum())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 5), k=st.integers(1, 3), o=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_obs_block_costs_and_downdates_equal_brute_force_refits(n, k, o, seed):
    """cost(b) = error of the least-squares refit without b's columns − error with all; after dropping b the
    state's refit W equals the refit on the rest, so the next costs are again exact."""
    g = torch.Generator().manual_seed(seed)
    rows = 40 + n * k
    u = torch.cat([torch.randn(rows, n * k, generator=g, dtype=torch.float64),
                   torch.ones(rows, 1, dtype=torch.float64)], 1)
    y = torch.randn(rows, o, generator=g, dtype=torch.float64)
    blocks = torch.arange(n * k).reshape(n, k)
    state = _Elimination(u.t() @ u, u.t() @ y, blocks, ridge=1e-12)
    kept = list(range(n))
    for _ in range(n - 1):
        cols = [int(j) for c in kept for j in blocks[c]] + [n * k]
        base = _lstsq_error(u, y, cols)
        costs = state.costs(torch.tensor(kept))
        for i, c in enumerate(kept):
            rest = [j for j in cols if j not in blocks[c].tolist()]
            assert float(costs[i]) == pytest.approx(_lstsq_error(u, y, rest) - base, rel=1e-5, abs=1e-8)
        drop = kept[int(torch.argmin(costs))]
        state.drop(drop)
        kept.remove(drop)
        cols = [int(j) for c in kept for j in blocks[c]] + [n * k]
        w = torch.linalg.lstsq(u[:, cols], y).solution
        torch.testing.assert_close(state.w[cols], w, rtol=1e-6, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 6), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_dropping_a_set_at_once_equals_the_brute_force_refit_without_it(n, k, seed):
    """A move of several channels: its joint cost and the one rank-|S| downdate are the refit without S."""
    g = torch.Generator().manual_seed(seed)
    rows = 40 + n * k
    u = torch.cat([torch.randn(rows, n * k, generator=g, dtype=torch.float64),
                   torch.ones(rows, 1, dtype=torch.float64)], 1)
    y = torch.randn(rows, 2, generator=g, dtype=torch.float64)
    blocks = torch.arange(n * k).reshape(n, k)
    state = _Elimination(u.t() @ u, u.t() @ y, blocks, ridge=1e-12)
    gone = sorted(torch.randperm(n, generator=g)[:2].tolist())
    every = list(range(n * k + 1))
    rest = [j for j in every if j // k not in gone or j == n * k]
    assert state.set_cost(gone) == pytest.approx(_lstsq_error(u, y, rest) - _lstsq_error(u, y, every),
                                                 rel=1e-5, abs=1e-8)
    state.drop(gone)
    torch.testing.assert_close(state.w[rest], torch.linalg.lstsq(u[:, rest], y).solution, rtol=1e-6, atol=1e-8)


def _two_group_net() -> nn.Module:
    """Hidden layer A (6 neurons; 4 = 3·n0 and 5 = n1 are copies) and hidden layer B (4 distinct neurons)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[0].weight[4], net[0].bias[4] = 3 * net[0].weight[0], 3 * net[0].bias[0]
        net[0].weight[5], net[0].bias[5] = net[0].weight[1], net[0].bias[1]
    return net


def test_global_selection_spends_the_budget_on_the_free_channels_and_is_then_exact():
    """Uniform plan: one neuron from A and one from B (10 weights and MACs each, sharing one fc2 weight:
    19 in all). Re-spent globally, they go to A's two copies (20, zero error): B keeps all four and the
    refit is exact."""
    net = _two_group_net()
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(1))
    graph = ChannelGraph.build(net, x[:1])
    a, b = graph.group("0").id, graph.group("2").id
    plan = Plan([GroupPlan(group_id=a, keep=[0, 1, 2, 3, 4], size=6), GroupPlan(group_id=b, keep=[0, 1, 2], size=4)])
    opts = ReconstructOptions(calibration=400, ridge=0.0, select="global", residual=False)
    fitted, _ = reconstruct_plan(net, graph, plan, x, opts)
    keep_a = set(fitted.group(a).keep)
    assert len(keep_a) == 4 and len(keep_a & {0, 4}) == 1 and len(keep_a & {1, 5}) == 1 and {2, 3} <= keep_a
    assert fitted.group(b).keep == [0, 1, 2, 3] and fitted.group(a).criterion == "global"
    assert fitted.meta["allocation"]["budget_removed"] == 19.0  # MACs per sample = parameters (flat layers)
    with torch.no_grad():
        assert float((apply(net, graph, fitted)(x) - net(x)).norm() / net(x).norm()) < 1e-6
        uniform, _ = reconstruct_plan(net, graph, plan, x, opts.replace(select="criterion"))
        assert float((apply(net, graph, uniform)(x) - net(x)).norm() / net(x).norm()) > 1e-3


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(2, 7), min_size=1, max_size=4), frac=st.floats(0.0, 0.9),
       seed=st.integers(0, 1000))
def test_allocation_stays_within_half_a_channel_of_the_budget_and_keeps_forced_channels(sizes, frac, seed):
    g = torch.Generator().manual_seed(seed)
    pools, total = {}, 0.0
    for gid, n in enumerate(sizes):
        u = torch.randn(30, n, generator=g, dtype=torch.float64)
        u = torch.cat([u, torch.ones(30, 1, dtype=torch.float64)], 1)
        y = torch.randn(30, 2, generator=g, dtype=torch.float64)
        params = torch.randint(1, 5, (n,), generator=g).double()
        pools[gid] = Pool([(u.t() @ u, u.t() @ y, torch.arange(n)[:, None])], params, forced=[0] if gid == 0 else [])
        total += float(params.sum())
    budget = frac * total
    keep = allocate(pools, budget)
    removed = sum(float(p.price.sum()) - float(p.price[keep[gid]].sum()) for gid, p in pools.items())
    assert 0 in keep[0] and all(len(k) >= 1 for k in keep.values())
    top = max(float(p.price.max()) for p in pools.values())
    assert removed <= budget + top / 2 + 1e-9
    removable = sum(float(p.price.sum()) - float(p.price.max()) for p in pools.values()) - float(pools[0].price[0])
    if budget <= removable - 2 * top:  # not limited by the channels that must stay: no budget left unspent
        assert removed >= budget - top / 2 - 1e-9
    assert all(keep[gid] == sorted(keep[gid]) and len(set(keep[gid])) == len(keep[gid]) for gid in keep)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(2, 12), min_size=1, max_size=4), multiple=st.integers(1, 5),
       block=st.integers(1, 4), frac=st.floats(0.0, 0.9), seed=st.integers(0, 1000))
def test_allocation_in_multiples_keeps_multiples_and_stays_within_half_a_move(sizes, multiple, block, frac, seed):
    """``multiple`` r (and moves of at least ``block`` channels): every group keeps a multiple of r channels
    or all N (never 0), forced channels stay, the total removed is within half the largest move of the
    budget unless the groups run out of moves; r = block = 1 is the channel-by-channel allocation."""
    g = torch.Generator().manual_seed(seed)
    pools = {}
    for gid, n in enumerate(sizes):
        u = torch.randn(40, n, generator=g, dtype=torch.float64)
        u = torch.cat([u, torch.ones(40, 1, dtype=torch.float64)], 1)
        y = torch.randn(40, 2, generator=g, dtype=torch.float64)
        pools[gid] = Pool([(u.t() @ u, u.t() @ y, torch.arange(n)[:, None])], torch.ones(n, dtype=torch.float64),
                          forced=[1] if gid == 0 else [], multiple=multiple, block=block)
    total = float(sum(sizes))
    move = multiple * -(-block // multiple) + multiple  # the largest move: block rounded up, plus N mod r
    keep = allocate(pools, frac * total)
    for gid, n in enumerate(sizes):
        k = len(keep[gid])
        assert k == n or (k % multiple == 0 and k >= multiple)
    assert 1 in keep[0]
    removed = total - sum(len(k) for k in keep.values())
    assert removed <= frac * total + move / 2 + 1e-9
    # the fewest channels each group can keep in multiples (≥ 1 when the forced one stays)
    floor = sum(min(n, multiple) for n in sizes)
    if frac * total <= total - floor - 2 * move:
        assert removed >= frac * total - move / 2 - 1e-9
    if multiple == block == 1:
        assert keep == allocate({gid: Pool(p.stats, p.price, p.forced) for gid, p in pools.items()}, frac * total)


def test_greedy_chooses_whole_heads_from_the_data():
    """Llama layer 0: kv group 0's heads write nothing (zero o_proj columns) yet have the largest weights —
    the l1-norm keeps them; greedy selection over the heads' o_proj columns keeps the other group."""
    pytest.importorskip("transformers")
    from hf_models import build

    model, x = build("llama")
    attn = model.model.layers[0].self_attn
    d = attn.head_dim
    per_group = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad():
        attn.o_proj.weight[:, :per_group * d] = 0.0
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[:d * (per_group if proj is attn.q_proj else 1)] *= 50.0
    graph = ChannelGraph.build(model, x)
    gid = int(np.unique(graph.member("model.layers.0.self_attn.o_proj", "in").group)[0])
    plan = Plan([GroupPlan.from_group(graph.groups[gid], [0], criterion="l1-norm")])
    calib = torch.randint(0, 1000, (48, 12), generator=torch.Generator().manual_seed(3))
    opts = ReconstructOptions(calibration=48, select="greedy", residual=False, layers="consumers")
    fitted, reports = reconstruct_plan(model, graph, plan, calib, opts)
    assert fitted.group(gid).keep == [1] and reports[0]["selected"] == "greedy"
    rel = {r["module"]: r["rel_error"] for r in reports}
    assert rel["model.layers.0.self_attn.o_proj"] < 1e-6  # the kept heads carry all of o_proj's output


def test_reconstruct_method_in_global_scope_reallocates_and_reports_it():
    from prunekit.methods import PruneOptions, get_method

    net = _two_group_net()
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(4))
    opts = PruneOptions(ratio=0.3, scope="global", calibration_data=x, method_options={"calibration": 400})
    res = get_method("reconstruct")(net, x[:1], opts)
    assert res.details["select"] == "global" and res.details["allocation"]["groups"] == 2
    # 3 of the 10 neurons (30 MACs): A's two free copies, then B's cheapest
    assert res.model[0].out_features == 4 and res.model[2].out_features == 3
    assert res.details["allocation"]["budget_removed"] == 30.0
    local = get_method("reconstruct")(net, x[:1], PruneOptions(ratio=0.3, calibration_data=x,
                                                                method_options={"calibration": 400}))
    assert local.details["select"] == "greedy" and local.details["allocation"] is None
    rounded = get_method("reconstruct")(net, x[:1], PruneOptions(ratio=0.5, scope="global", round_to=2,
                                                                  calibration_data=x,
                                                                  method_options={"calibration": 400}))
    assert rounded.details["select"] == "global" and rounded.details["allocation"]["groups"] == 2
    assert {rounded.model[0].out_features % 2, rounded.model[2].out_features % 2} == {0}  # multiples of 2
    from prunekit.errors import ConfigError

    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="allocation_block"):
            ReconstructOptions(allocation_block=bad)
    half = {"ratio": 0.5, "scope": "global", "calibration_data": x}
    exact = get_method("reconstruct")(net, x[:1], PruneOptions(**half, method_options={"calibration": 400}))
    blocked = get_method("reconstruct")(net, x[:1], PruneOptions(
        **half, method_options={"calibration": 400, "allocation_block": 2}))
    assert blocked.details["allocation"]["budget_removed"] == exact.details["allocation"]["budget_removed"] == 50.0
    from prunekit.metrics import count_params

    dense = count_params(net)  # flat layers: a channel's MACs per sample = its parameters
    assert abs(dense - count_params(exact.model) - 50) <= 5  # within half a channel (10 parameters)
    assert abs(dense - count_params(blocked.model) - 50) <= 10  # within half a move of two


def test_channel_prices_in_macs_count_each_weight_once_per_output_position():
    """conv0 (2→4, 3×3, pad 1) feeds conv1 (4→3) on 6×6 maps: a conv0 channel owns 2·9 weights + 1 bias and
    3·9 weights of conv1, each used at 36 output positions; a Linear on a 5-token sequence: 5 positions."""
    from prunekit.compensate.calibration import output_positions
    from prunekit.engine.costs import channel_costs

    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    x = torch.randn(2, 2, 6, 6)
    graph = ChannelGraph.build(net, x[:1])
    pos = output_positions(net, ["0", "2"], x)
    assert pos == {"0": 36, "2": 36}
    group = graph.groups[graph.group("0").id]
    assert channel_costs(net, group).tolist() == [2 * 9 + 1 + 3 * 9] * 4
    assert channel_costs(net, group, pos).tolist() == [(2 * 9 + 1 + 3 * 9) * 36.0] * 4
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    assert output_positions(seq, ["0", "2"], torch.randn(2, 5, 3)) == {"0": 5, "2": 5}


def test_global_allocation_on_a_llama_keeps_the_macs_and_reloads(tmp_path):
    """Heads (kv groups) and MLP neurons of both layers share one budget: the MACs the uniform plan removes
    (each within one channel's price), the per-layer widths differ, and the model reloads bit-exactly."""
    pytest.importorskip("transformers")
    from hf_models import build, logits

    from prunekit.engine import make_plan
    from prunekit.io import load_model, save_model
    from prunekit.metrics import count_macs

    model, x = build("llama", intermediate=96)
    graph = ChannelGraph.build(model, x)
    plan = make_plan(model, graph, ratio=0.0, overrides={"*.self_attn.q_proj": 0.5, "*.mlp.gate_proj": 0.5})
    calib = torch.randint(0, 1000, (64, 12), generator=torch.Generator().manual_seed(5))
    opts = ReconstructOptions(calibration=64, select="global", residual=False)
    fitted, _ = reconstruct_plan(model, graph, plan, calib, opts)
    alloc = fitted.meta["allocation"]
    assert alloc["groups"] == 4 and alloc["budget"] == "macs"
    uniform, small = apply(model, graph, plan), apply(model, graph, fitted)
    macs = {m: count_macs(m, x) for m in (uniform, small)}
    head_group_price = (2 * 16 * 64 + 2 * 16 * 64 + 64 * 2 * 16) * 12  # 2 q heads + 1 kv head, 12 tokens
    assert abs(macs[small] - macs[uniform]) <= head_group_price  # the closest prefix: within one channel
    assert sorted(alloc["kept"].values()) != sorted(alloc["planned"].values())  # the widths moved
    save_model(tmp_path / "m", small)
    again, _ = load_model(tmp_path / "m", model=build("llama", intermediate=96, seed=7)[0])
    torch.testing.assert_close(logits(again, x), logits(small, x), atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(2, 6), min_size=2, max_size=3), conv=st.booleans(), data=st.data())
def test_prices_pay_every_shared_weight_once_and_add_up_to_what_surgery_removes(widths, conv, data):
    """A chain whose hidden groups are all in play: the summed prices of any removal equal the parameters
    (and, with positions, the MACs of the weights) that the physically pruned network lost."""
    from prunekit.engine.costs import ChannelPrices
    from prunekit.metrics import count_params

    torch.manual_seed(0)
    dims, layers = [3, *widths, 2], []
    for i, (a, b) in enumerate(pairwise(dims)):
        layers.append(nn.Conv2d(a, b, 3, padding=1) if conv else nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm2d(b) if conv else nn.Identity(), nn.ReLU()]
    net = nn.Sequential(*layers).eval()
    x = torch.randn(1, 3, 5, 5) if conv else torch.randn(1, 3)
    graph = ChannelGraph.build(net, x)
    groups = [g for g in graph.prunable_groups]
    keep = {g.id: sorted(data.draw(st.sets(st.integers(0, g.size - 1), min_size=1, max_size=g.size)))
            for g in groups}
    prices = ChannelPrices(net, graph, [g.id for g in groups])
    paid = prices.removed(keep, {g.id: g.size for g in groups})
    small = apply(net, graph, Plan([GroupPlan(group_id=g.id, keep=keep[g.id], size=g.size) for g in groups]))
    assert paid == pytest.approx(count_params(net) - count_params(small))


def test_errors_share_units_only_where_several_layers_write_the_same_channels():
    """A transformer's output/down projections write the residual stream (stream units); a chain's hidden
    layer and a classifier do not (each consumer's error becomes a fraction of its own output)."""
    from prunekit.compensate.reconstruct import _writes_into_stream

    net = _two_group_net()
    graph = ChannelGraph.build(net, torch.zeros(1, 5))
    assert not _writes_into_stream(graph, "2") and not _writes_into_stream(graph, "4")
    pytest.importorskip("transformers")
    from hf_models import build

    model, x = build("llama")
    graph = ChannelGraph.build(model, x)
    assert _writes_into_stream(graph, "model.layers.0.self_attn.o_proj")
    assert _writes_into_stream(graph, "model.layers.1.mlp.down_proj")
    assert not _writes_into_stream(graph, "model.layers.0.self_attn.q_proj")
