"""End-to-end pruning: the zoo, criteria, selection, plans, merge matrices, records and errors."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit import models
from prunekit.engine import (
    ChannelGraph,
    GroupPlan,
    Plan,
    PlanError,
    PruneRecord,
    ScoreContext,
    apply,
    get_criterion,
    list_criteria,
    make_plan,
    mask,
    n_keep,
    prune,
    replay,
)
from prunekit.errors import CheckpointError, ConfigError, UnknownNameError
from prunekit.io import load_model, save_model
from prunekit.metrics import count_macs, count_params
from prunekit.models.hf import TRANSFORMERS_MODELS

IMAGENET = {"resnet50", "mobilenetv2"}


pytestmark = pytest.mark.usefixtures("one_thread")


def zoo(name: str) -> nn.Module:
    cfg = {"input_size": 64} if name in IMAGENET else {}
    torch.manual_seed(0)
    model = models.create(name, **cfg).eval()
    with torch.no_grad():  # non-trivial BN so that masking mistakes show
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rel * (1 + b.abs().max().item())


# ----------------------------------------------------------------------------------------------
# the zoo


@pytest.mark.parametrize("name", [n for n in models.list_models() if n not in TRANSFORMERS_MODELS])
def test_zoo_prunes_in_both_scopes_and_reloads(name, tmp_path):
    model = zoo(name)
    x = torch.randn(1, *model.input_shape, generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    graph = ChannelGraph.build(model, x)
    with torch.no_grad():
        y = model(x)
    for scope in ("local", "global"):
        plan = make_plan(model, graph, ratio=0.5, scope=scope)
        pruned = apply(model, graph, plan)
        with torch.no_grad():
            yp = pruned(x)
            ym = mask(model, graph, plan)(x)
        assert yp.shape == y.shape
        assert close(yp, ym), f"{name}/{scope}: pruned ≠ masked dense"
        assert count_params(pruned) < 0.6 * count_params(model)
        assert count_macs(pruned, x) < count_macs(model, x)
        save_model(tmp_path / scope / "", pruned, extra={"prune_record": pruned.prunekit_record.to_dict()})
        loaded, info = load_model(tmp_path / scope)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), yp)
        assert "prune_record" in info
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched


def test_prune_api_returns_new_smaller_model_with_right_repr():
    model = zoo("vgg16")
    pruned = prune(model, (1, 3, 32, 32), ratio=0.5, criterion="l2-norm")
    assert pruned is not model and model.features[0].out_channels == 64
    conv = pruned.features[0]
    assert conv.out_channels == 32 == conv.weight.shape[0]
    assert "Conv2d(3, 32" in repr(pruned) and "BatchNorm2d(32" in repr(pruned)
    assert pruned.classifier[0].in_features == pruned.features[-3].out_channels == 256
    assert pruned.classifier[3].out_features == 10  # the head's outputs are protected
    assert isinstance(pruned.prunekit_record, PruneRecord) and isinstance(pruned.prunekit_plan, Plan)


def test_pruning_twice_chains_records(tmp_path):
    model = zoo("resnet20")
    x = torch.randn(2, *model.input_shape)
    once = prune(model, x, ratio=0.3)
    twice = prune(once, x, ratio=0.3, scope="global")
    assert len(twice.prunekit_record.steps) == 2
    dense = models.create("resnet20")
    replay(dense, twice.prunekit_record).load_state_dict(twice.state_dict())
    with torch.no_grad():
        assert torch.equal(dense.eval()(x), twice(x))
    save_model(tmp_path / "m" / "", twice, extra={"prune_record": twice.prunekit_record.to_dict()})
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), twice(x))


def test_replay_rejects_a_record_that_does_not_fit():
    model = zoo("lenet-300-100")
    pruned = prune(model, (1, 1, 28, 28), ratio=0.5)
    rec = pruned.prunekit_record.to_dict()
    with pytest.raises(CheckpointError, match="fc1"):
        replay(models.create("lenet-300-100", widths=[20, 10]), rec)
    bad = json.loads(json.dumps(rec))
    bad["steps"][0]["fc1"]["type"] = "Conv2d"
    with pytest.raises(CheckpointError, match="'fc1' is Linear"):
        replay(models.create("lenet-300-100"), bad)


# ----------------------------------------------------------------------------------------------
# criteria


class TwoLayer(nn.Module):
    def __init__(self, bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))))


def scores(model, name, **kw):
    graph = ChannelGraph.build(model, torch.randn(1, 3, 6, 6))
    return get_criterion(name)(ScoreContext(model, graph, **kw), graph.groups[0])


def test_criteria_match_their_definitions():
    torch.manual_seed(0)
    m = TwoLayer()
    nn.init.uniform_(m.bn.weight, -2, 2)
    w = m.conv.weight.detach().flatten(1).double()
    wb = torch.cat([w, m.conv.bias.detach().double()[:, None]], 1)
    assert torch.allclose(scores(m, "l1-norm"), w.abs().sum(1))
    assert torch.allclose(scores(m, "l1-norm", include_bias=True), wb.abs().sum(1))
    assert torch.allclose(scores(m, "l2-norm"), w.norm(dim=1))
    gm = torch.stack([sum((w[i] - w[j]).norm() for j in range(6)) for i in range(6)])
    assert torch.allclose(scores(m, "l2-GM"), gm)
    assert torch.allclose(scores(m, "bn-scale"), m.bn.weight.detach().abs().double())
    assert torch.equal(scores(m, "random", seed=3), scores(m, "random", seed=3))
    assert not torch.equal(scores(m, "random", seed=3), scores(m, "random", seed=4))
    assert set(list_criteria()) >= {"l1-norm", "l2-norm", "l2-GM", "bn-scale", "random"}
    with pytest.raises(ConfigError, match="bn-scale.*'conv'"):
        scores(TwoLayer(bn=False), "bn-scale")


def test_lenet_keep_sets_follow_neuron_merging_definitions():
    """FC rows are [w | b]; keep the P largest (l1, l2) or most distant (GM); P = round(N(1 − r))."""
    torch.manual_seed(1)
    model = models.create("lenet-300-100")
    graph = ChannelGraph.build(model, (1, 1, 28, 28))
    for crit in ("l1-norm", "l2-norm", "l2-GM"):
        plan = make_plan(model, graph, ratio=0.7, criterion=crit, include_bias=True)
        for layer, n in (("fc1", 300), ("fc2", 100)):
            mod = getattr(model, layer)
            v = torch.cat([mod.weight, mod.bias[:, None]], 1).detach().double()
            s = {"l1-norm": v.abs().sum(1), "l2-norm": v.norm(dim=1),
                 "l2-GM": torch.cdist(v, v).sum(1)}[crit]
            want = sorted(torch.argsort(s, descending=True)[:round(n * 0.3)].tolist())
            assert plan.group(graph.group(layer).id).keep == want


# ----------------------------------------------------------------------------------------------
# selection


def test_rounding_reproduces_the_papers_widths():
    assert [n_keep(c, 0.3, "floor") for c in (16, 32, 64)] == [11, 22, 44]  # NM ResNet-56, r = 0.3
    assert [n_keep(c, 0.1, "floor") for c in (16, 32, 64)] == [14, 28, 57]
    assert [n_keep(c, 0.7, "round") for c in (300, 100)] == [90, 30]  # NM LeNet-300-100
    assert n_keep(30, 0.9, "floor") == 3 and n_keep(5, 0.99) == 1


def test_local_scope_keeps_the_same_fraction_of_every_group():
    model = zoo("resnet56")
    graph = ChannelGraph.build(model, (1, 3, 32, 32))
    plan = make_plan(model, graph, ratio=0.3, rounding="floor", overrides={"layer3.*.conv1": 0.5})
    for g in graph.prunable_groups:
        want = n_keep(len(g.prunable), 0.5 if g.name.startswith("layer3") else 0.3, "floor")
        assert len(plan.group(g.id).keep) == want + len(g.blocked)
        assert set(g.blocked) <= set(plan.group(g.id).keep)


def test_global_scope_is_invariant_to_layer_scale_and_keeps_one_per_group():
    model = zoo("lenet-5")
    graph = ChannelGraph.build(model, (1, 1, 28, 28))
    plan = make_plan(model, graph, ratio=0.6, scope="global")
    total = sum(len(g.prunable) for g in graph.prunable_groups)
    assert sum(len(p.keep) for p in plan.groups) == n_keep(total, 0.6)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.conv2.weight.mul_(100.0)  # l1 scores of conv2 ×100; normalised scores unchanged
        scaled.fc1.weight.mul_(0.01)
    assert make_plan(scaled, ChannelGraph.build(scaled, (1, 1, 28, 28)), ratio=0.6, scope="global") == plan
    tiny = make_plan(model, graph, ratio=0.99, scope="global")
    assert all(len(p.keep) >= 1 for p in tiny.groups)


@pytest.mark.parametrize("ratio", [1.0, -0.1, float("nan"), "0.5", True, 1.5])
def test_ratio_outside_unit_interval_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match=f"got {ratio!r}".replace("(", r"\(").replace(")", r"\)")):
        prune(TwoLayer(), (1, 3, 6, 6), ratio=ratio)


def test_option_errors_name_the_value():
    m = TwoLayer()
    with pytest.raises(ConfigError, match="scope.*'wide'"):
        prune(m, (1, 3, 6, 6), ratio=0.5, scope="wide")
    with pytest.raises(ConfigError, match="rounding.*'ceil'"):
        prune(m, (1, 3, 6, 6), ratio=0.5, rounding="ceil")
    with pytest.raises(UnknownNameError, match="unknown criterion 'l3-norm'.*'l2-norm'"):
        prune(m, (1, 3, 6, 6), ratio=0.5, criterion="l3-norm")
    with pytest.raises(ConfigError, match="'nope' matches no module"):
        prune(m, (1, 3, 6, 6), ratio=0.5, overrides={"nope": 0.2})
    with pytest.raises(ConfigError, match="override ratio for 'conv'.*1.2"):
        prune(m, (1, 3, 6, 6), ratio=0.5, overrides={"conv": 1.2})
    with pytest.raises(ConfigError, match="ignored entry 'convv'.*Did you mean 'conv'"):
        prune(m, (1, 3, 6, 6), ratio=0.5, ignored=["convv"])


def test_ignoring_every_layer_is_a_clear_error():
    model = zoo("lenet-5")
    with pytest.raises(ConfigError, match="nothing left to prune.*ignored modules"):
        prune(model, (1, 1, 28, 28), ratio=0.5, ignored=[nn.Conv2d, nn.Linear])
    pruned = prune(model, (1, 1, 28, 28), ratio=0.5, ignored=["conv*", "fc1"])
    assert pruned.conv1.out_channels == 6 and pruned.fc1.out_features == 120
    assert pruned.fc2.out_features == 42


# ----------------------------------------------------------------------------------------------
# plans


def test_plan_json_round_trip_and_merge_column_order():
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.37]])
    gp = GroupPlan(group_id=0, keep=[2, 0], merge=m.clone(), size=4, criterion="l1-norm", ratio=0.5)
    assert gp.keep == [0, 2] and torch.equal(gp.merge, m[:, [1, 0]])
    plan = Plan(groups=[gp, GroupPlan(group_id=3, keep=[1])], meta={"note": "x"})
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.groups[0].merge.dtype == torch.float32
    assert Plan.from_json(json.loads(plan.to_json(indent=2))) == plan
    with pytest.raises(PlanError, match="duplicate"):
        GroupPlan(group_id=0, keep=[1, 1])
    with pytest.raises(PlanError, match="N×2"):
        GroupPlan(group_id=0, keep=[0, 1], merge=torch.ones(4, 3))


def test_surgery_validates_plans():
    model = TwoLayer()
    graph = ChannelGraph.build(model, (1, 3, 6, 6))
    with pytest.raises(PlanError, match="group 7"):
        apply(model, graph, Plan([GroupPlan(group_id=7, keep=[0])]))
    with pytest.raises(PlanError, match="keep is empty"):
        apply(model, graph, Plan([GroupPlan(group_id=0, keep=[])]))
    head = graph.group("head").id
    with pytest.raises(PlanError, match="protected channel 1.*model output"):
        apply(model, graph, Plan([GroupPlan(group_id=head, keep=[0])]))
    with pytest.raises(PlanError, match="6 channels"):
        apply(model, graph, Plan([GroupPlan(group_id=0, keep=[0], size=5)]))
    other = apply(model, graph, Plan([GroupPlan(group_id=0, keep=[0, 1])]))
    with pytest.raises(PlanError, match="graph was built from another model"):
        apply(other, graph, Plan([GroupPlan(group_id=0, keep=[0])]))


# ----------------------------------------------------------------------------------------------
# merge matrices


class ConvReluConv(nn.Module):
    def __init__(self, flatten: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = flatten
        self.conv2 = nn.Linear(4 * 3 * 3, 5) if flatten else nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        y = self.pool(self.relu(self.conv1(x)))
        return self.conv2(y.flatten(1) if self.flatten else y)


@pytest.mark.parametrize("flatten", [False, True])
def test_merging_an_exact_positive_multiple_is_lossless(flatten):
    """Filter 3 = 2.5 · filter 1 (weights and bias): M[3, col(1)] = 2.5 gives the same outputs."""
    torch.manual_seed(0)
    model = ConvReluConv(flatten).eval()
    with torch.no_grad():
        model.conv1.weight[3] = 2.5 * model.conv1.weight[1]
        model.conv1.bias[3] = 2.5 * model.conv1.bias[1]
    x = torch.randn(4, 3, 6, 6)
    graph = ChannelGraph.build(model, x)
    g = graph.group("conv1")
    assert g.mergeable, g.merge_reason
    merge = torch.zeros(4, 3)
    merge[0, 0] = merge[1, 1] = merge[2, 2] = 1.0
    merge[3, 1] = 2.5
    merged = apply(model, graph, Plan([GroupPlan(group_id=g.id, keep=[0, 1, 2], merge=merge)]))
    pruned = apply(model, graph, Plan([GroupPlan(group_id=g.id, keep=[0, 1, 2])]))
    with torch.no_grad():
        y, ym, yp = model(x), merged(x), pruned(x)
    assert (ym - y).abs().max().item() < 1e-5
    assert (yp - y).abs().max().item() > 1e-3  # plain pruning loses the channel
    assert merged.conv1.out_channels == 3
    assert (merged.conv2.in_features if flatten else merged.conv2.in_channels) == (27 if flatten else 3)


def test_merge_matrix_is_refused_on_non_mergeable_groups():
    class Silu(ConvReluConv):
        def __init__(self):
            super().__init__()
            self.relu = nn.SiLU()

    model = Silu()
    graph = ChannelGraph.build(model, (1, 3, 6, 6))
    g = graph.group("conv1")
    assert not g.mergeable and "SiLU 'relu'" in g.merge_reason
    with pytest.raises(PlanError, match="not mergeable.*SiLU"):
        apply(model, graph, Plan([GroupPlan(group_id=g.id, keep=[0, 1], merge=torch.ones(4, 2))]))


def test_merged_lenet_fc_absorbs_bias_appended_duplicates():
    torch.manual_seed(0)
    model = models.create("lenet-300-100", widths=[8, 6])
    with torch.no_grad():
        model.fc1.weight[5] = 0.5 * model.fc1.weight[2]
        model.fc1.bias[5] = 0.5 * model.fc1.bias[2]
    x = torch.randn(3, 1, 28, 28)
    graph = ChannelGraph.build(model, x)
    g = graph.group("fc1")
    keep = [k for k in range(8) if k != 5]
    merge = torch.zeros(8, 7)
    for p, k in enumerate(keep):
        merge[k, p] = 1.0
    merge[5, keep.index(2)] = 0.5
    merged = apply(model, graph, Plan([GroupPlan(group_id=g.id, keep=keep, merge=merge)]))
    with torch.no_grad():
        assert (merged(x) - model(x)).abs().max().item() < 1e-5
    assert merged.fc2.in_features == 7 and merged.fc1.out_features == 7


def test_ratio_zero_and_global_criteria_run_on_every_criterion():
    model = zoo("resnet20")
    x = torch.randn(2, 3, 32, 32)
    same = prune(model, x, ratio=0.0)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    for crit in ("l1-norm", "l2-norm", "l2-GM", "bn-scale", "random"):
        p = prune(model, x, ratio=0.4, criterion=crit, scope="global")
        assert count_params(p) < count_params(model)
        assert math.isfinite(p(x).sum().item())


def test_pruned_model_saves_its_record_without_being_told(tmp_path):
    torch.manual_seed(0)
    pruned = prune(models.create("resnet20", in_channels=1, input_size=28), (1, 1, 28, 28), ratio=0.5)
    save_model(tmp_path / "m" / "", pruned)
    reloaded, info = load_model(tmp_path / "m")
    x = torch.randn(2, 1, 28, 28)
    assert info["prune_record"] == pruned.prunekit_record.to_dict()
    assert torch.equal(reloaded.eval()(x), pruned.eval()(x))


# ----------------------------------------------------------------------------------------------
# round_to: hardware-friendly widths


class OddNet(nn.Module):
    """Convs of awkward widths, a residual add (conv2 and conv3 form one group), flatten into two Linears."""

    def __init__(self, widths=(13, 22, 22, 9), hidden=11, classes=10):
        super().__init__()
        a, b, c, d = widths
        self.conv1, self.bn1 = nn.Conv2d(3, a, 3, padding=1), nn.BatchNorm2d(a)
        self.conv2, self.bn2 = nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b)
        self.conv3, self.bn3 = nn.Conv2d(b, c, 3, padding=1), nn.BatchNorm2d(c)  # added to conv2's output
        self.conv4 = nn.Conv2d(c, d, 1)
        self.fc1, self.fc2 = nn.Linear(d * 16, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        y = torch.relu(self.bn3(self.conv3(y)) + y)
        y = torch.relu(self.conv4(nn.functional.max_pool2d(y, 2)))
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _check_round_to(graph, plan, base, r):
    """Every group's width is a positive multiple of ``r`` or the full group; protected channels kept;
    never fewer channels than without ``round_to``."""
    for g in graph.prunable_groups:
        keep = plan.group(g.id).keep
        assert len(keep) == g.size or (len(keep) > 0 and len(keep) % r == 0), (g.name, len(keep), g.size, r)
        assert set(g.blocked) <= set(keep)
        assert set(base.group(g.id).keep) <= set(keep)
        assert len(keep) - len(base.group(g.id).keep) < r  # the smallest multiple above


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("rounding", ["round", "floor"])
def test_round_to_keeps_multiples_and_pruning_still_equals_masking(scope, rounding):
    torch.manual_seed(0)
    model = _random_bn(OddNet()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    graph = ChannelGraph.build(model, x)
    base = make_plan(model, graph, ratio=0.6, scope=scope, rounding=rounding)
    plan = make_plan(model, graph, ratio=0.6, scope=scope, rounding=rounding, round_to=4)
    _check_round_to(graph, plan, base, 4)
    assert plan.meta["round_to"] == 4 and "round_to" not in base.meta
    pruned = apply(model, graph, plan)
    assert pruned.conv1.out_channels % 4 == 0 and pruned.conv2.out_channels == pruned.conv3.out_channels
    assert pruned.conv2.out_channels % 4 == 0 and pruned.fc1.out_features % 4 == 0
    assert pruned.fc2.out_features == 10  # the head's classes are protected
    with torch.no_grad():
        assert close(pruned(x), mask(model, graph, plan)(x), rel=1e-9)


def test_round_to_never_exceeds_a_group_and_is_a_no_op_at_one():
    model = _random_bn(OddNet(widths=(5, 6, 6, 3), hidden=7))
    graph = ChannelGraph.build(model, (1, 3, 8, 8))
    big = make_plan(model, graph, ratio=0.5, round_to=64)  # bigger than every group: all kept
    assert all(len(p.keep) == graph.groups[p.group_id].size for p in big.groups)
    pruned = prune(model, (1, 3, 8, 8), ratio=0.5, round_to=64)
    assert count_params(pruned) == count_params(model)
    plain = make_plan(model, graph, ratio=0.5)
    assert [p.keep for p in make_plan(model, graph, ratio=0.5, round_to=1).groups] == [p.keep for p in plain.groups]
    same = prune(model, (1, 3, 8, 8), ratio=0.0, round_to=4)  # ratio 0 keeps everything, whatever round_to
    assert count_params(same) == count_params(model)


def test_round_to_through_prune_and_the_method_options():
    from prunekit.methods import PruneOptions

    model = zoo("vgg16")
    pruned = prune(model, (1, 3, 32, 32), ratio=0.7, round_to=16)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 16 == 0 for c in convs)
    assert pruned.prunekit_plan.meta["round_to"] == 16
    assert PruneOptions(round_to=8).engine_kwargs()["round_to"] == 8
    assert PruneOptions().engine_kwargs()["round_to"] is None


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True, float("nan")])
def test_round_to_must_be_a_positive_integer(bad):
    model = TwoLayer()
    with pytest.raises(ConfigError, match=r"round_to must be a positive integer.*got " + repr(bad).replace("'", ".")):
        prune(model, (1, 3, 6, 6), ratio=0.5, round_to=bad)
    graph = ChannelGraph.build(model, (1, 3, 6, 6))
    with pytest.raises(ConfigError, match="round_to"):
        make_plan(model, graph, ratio=0.5, round_to=bad)


class Stack(nn.Module):
    """A random conv stack (optionally with a residual pair) into a random Linear stack."""

    def __init__(self, convs, residual, linears, classes=5):
        super().__init__()
        layers, cin = [], 3
        for w in convs:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.features = nn.Sequential(*layers)
        self.res = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.BatchNorm2d(cin)) if residual else None
        fcs, fin = [], cin * 4
        for w in linears:
            fcs += [nn.Linear(fin, w), nn.ReLU()]
            fin = w
        self.head = nn.Sequential(*fcs, nn.Linear(fin, classes))

    def forward(self, x):
        x = self.features(x)
        if self.res is not None:
            x = torch.relu(self.res(x) + x)
        return self.head(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(convs=st.lists(st.integers(1, 24), min_size=1, max_size=3), residual=st.booleans(),
       linears=st.lists(st.integers(1, 24), max_size=2), ratio=st.floats(0.0, 0.95),
       round_to=st.integers(1, 16), scope=st.sampled_from(["local", "global"]),
       rounding=st.sampled_from(["round", "floor"]))
def test_round_to_property_on_random_stacks(convs, residual, linears, ratio, round_to, scope, rounding):
    torch.manual_seed(0)
    model = _random_bn(Stack(convs, residual, linears)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    graph = ChannelGraph.build(model, x)
    if not graph.prunable_groups:
        return
    base = make_plan(model, graph, ratio=ratio, scope=scope, rounding=rounding)
    plan = make_plan(model, graph, ratio=ratio, scope=scope, rounding=rounding, round_to=round_to)
    _check_round_to(graph, plan, base, round_to)
    pruned = apply(model, graph, plan)
    for g in graph.prunable_groups:  # the physical widths are the plan's
        for name in g.producers:
            assert pruned.get_submodule(name).weight.shape[0] == len(plan.group(g.id).keep)
    with torch.no_grad():
        assert close(pruned(x), mask(model, graph, plan)(x), rel=1e-9)
