"""Polarization regularizer: value and subgradient on hand-computed vectors, global mean, clamp, presets,
network slimming, gates, Trainer integration, DDP."""
from __future__ import annotations

import pytest
import torch
from ddp_util import ddp_and_single
from torch import nn

from prunekit import models
from prunekit.errors import ConfigError
from prunekit.polarization import (
    PRESETS,
    FactorRef,
    FactorSet,
    GatedBatchNorm2d,
    NetworkSlimming,
    PolarizationRegularizer,
    add_gates,
    fold_gates,
    polarization_penalty,
    select_factors,
)
from prunekit.regularizers import create_regularizer, list_regularizers

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoBN(nn.Module):
    """Two BN layers of 2 and 3 channels (factors set by hand)."""

    def __init__(self, a, b):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn_a = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 3, 1)
        self.bn_b = nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn_a.weight.copy_(torch.tensor(a))
            self.bn_b.weight.copy_(torch.tensor(b))

    def forward(self, x):
        return self.bn_b(self.conv2(torch.relu(self.bn_a(self.conv(x)))))


def _factors():
    return FactorSet([FactorRef("bn_a"), FactorRef("bn_b")], preset="custom")


def _grad(reg, model):
    model.zero_grad()
    reg.penalty(model).backward()
    return torch.cat([model.bn_a.weight.grad, model.bn_b.weight.grad])


def test_value_and_gradient_hand_computed_with_zero_and_mean_entries():
    # γ = [0, 0.5 | 1.0, 0.5, 0.5]: γ̄ = 2.5/5 = 0.5 exactly; three entries sit exactly at the mean, one at 0.
    model = TwoBN([0.0, 0.5], [1.0, 0.5, 0.5])
    reg = PolarizationRegularizer(lam=0.1, t=1.2, factors=_factors())
    # R = 1.2·2.5 − (0.5 + 0 + 0.5 + 0 + 0) = 2.0
    assert reg.penalty(model).item() == pytest.approx(0.1 * 2.0)
    # s(γ − γ̄) = [−1, 0, +1, 0, 0] ⇒ c = 0; ∂R/∂γ_k = t·s(γ_k) − s(γ_k − γ̄) + c
    #   γ=0: 0 + 1 = 1;  at the mean: 1.2;  above: 1.2 − 1 = 0.2
    torch.testing.assert_close(_grad(reg, model), 0.1 * torch.tensor([1.0, 1.2, 0.2, 1.2, 1.2]))


def test_gradient_includes_the_mean_term():
    # γ = [0, 0.25 | 0.5, 1.25]: γ̄ = 0.5; s(γ − γ̄) = [−1, −1, 0, +1] ⇒ c = Σs/n = −0.25
    g = torch.tensor([0.0, 0.25, 0.5, 1.25], requires_grad=True)
    r = polarization_penalty(g, t=1.5)
    assert r.item() == pytest.approx(1.5 * 2.0 - (0.5 + 0.25 + 0 + 0.75))  # R can be anything, here 1.5
    r.backward()
    torch.testing.assert_close(g.grad, torch.tensor([0.75, 2.25, 1.25, 0.25]))


def test_mean_is_global_over_all_layers_not_per_layer():
    model = TwoBN([0.1, 0.2], [0.7, 0.8, 0.9])
    reg = PolarizationRegularizer(lam=1.0, t=1.0, factors=_factors())
    g = torch.tensor([0.1, 0.2, 0.7, 0.8, 0.9])
    expected = g.abs().sum() - (g - g.mean()).abs().sum()
    per_layer = sum(x.abs().sum() - (x - x.mean()).abs().sum() for x in (g[:2], g[2:]))
    assert reg.penalty(model).item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(expected.item() - per_layer.item()) > 0.5
    # layer a's factors are all below the global mean (0.54): pushed down by t + 1 + c, c = (3 − 2)/5
    torch.testing.assert_close(_grad(reg, model)[:2], torch.full((2,), 1 + 1 + 0.2))


def test_clamp_to_0_a_after_step_touches_only_the_factors():
    model = TwoBN([-0.3, 0.4], [1.7, 0.2, -0.1])
    with torch.no_grad():
        model.bn_a.bias.fill_(-2.0)
    reg = PolarizationRegularizer(lam=0.1, t=1.2, a=1.0, factors=FactorSet([FactorRef("bn_a"), FactorRef("bn_b", index=(0,))]))
    with torch.no_grad():
        reg.after_step(model)
    torch.testing.assert_close(model.bn_a.weight, torch.tensor([0.0, 0.4]))
    torch.testing.assert_close(model.bn_b.weight, torch.tensor([1.0, 0.2, -0.1]))  # index 1, 2 not factors
    torch.testing.assert_close(model.bn_a.bias, torch.full((2,), -2.0))  # β untouched
    reg_all = PolarizationRegularizer(lam=0.1, t=1.2, a=0.5, factors=FactorSet([FactorRef("bn_a")]), clamp="all-bn")
    with torch.no_grad():
        reg_all.after_step(model)
    torch.testing.assert_close(model.bn_b.weight, torch.tensor([0.5, 0.2, 0.0]))


def test_network_slimming_is_l1_without_clamp():
    model = TwoBN([-0.3, 0.4], [1.7, 0.0, -0.1])
    reg = NetworkSlimming(lam=0.01, factors=_factors())
    assert reg.penalty(model).item() == pytest.approx(0.01 * 2.5)
    torch.testing.assert_close(_grad(reg, model), 0.01 * torch.tensor([-1.0, 1.0, 1.0, 0.0, -1.0]))
    with torch.no_grad():
        reg.after_step(model)
    assert model.bn_b.weight[0].item() == pytest.approx(1.7)


def test_engine_preset_regularizes_prunable_channels_only():
    model = models.create("resnet20", in_channels=1, input_size=28)
    fs = select_factors(model)
    refs = {r.module: r for r in fs.refs}
    assert refs["layer1.0.bn1"].index is None and refs["bn1"].index is None
    # option A: stage 2's bn2 has 32 channels; the 16 zero-padded ones are protected, not factors
    assert refs["layer2.0.bn2"].index == tuple(range(8, 24))
    assert refs["layer3.2.bn2"].index == tuple(range(24, 40))
    assert fs.numel(model) == 16 + (16 + 32 + 64) * 3 + 16 * 9
    assert "fc" not in refs


def test_paper_presets():
    r56 = models.create("resnet56")
    assert select_factors(r56, "resnet-cifar").numel(r56) == 2016  # docs/polarization.md, "Which factors"
    vgg = models.create("vgg16")
    assert select_factors(vgg, "vgg16").numel(vgg) == 4736
    r50 = models.create("resnet50")
    names = select_factors(r50, "resnet50").modules
    assert select_factors(r50, "resnet50").numel(r50) == 7552
    assert not any(n.endswith(("bn3", "downsample.1")) or n == "bn1" for n in names)
    mb = models.create("mobilenetv2")
    with pytest.raises(ConfigError, match="add_gates"):
        select_factors(mb, "mobilenetv2-gates")
    add_gates(mb)
    assert select_factors(mb, "mobilenetv2-gates").numel(mb) == 7104 + 1504  # 8,608 (docs/polarization.md)
    assert PRESETS["mobilenetv2-gates"].bn_init == 1.0 and PRESETS["resnet-cifar"].bn_init == 0.5
    with pytest.raises(ConfigError, match="unknown factor preset"):
        select_factors(r56, "resnet-56")


def test_gates_fold_exactly_and_the_engine_scores_them():
    torch.manual_seed(0)
    model = models.create("mobilenetv2", num_classes=10, input_size=32, width_mult=0.35)
    sites = add_gates(model)
    with torch.no_grad():
        for n in sites:
            model.get_submodule(n).gate.uniform_(0.0, 1.0)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    folded = fold_gates(model)
    assert not any(isinstance(m, GatedBatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    from prunekit.engine import ChannelGraph, ScoreContext

    graph = ChannelGraph.build(model, x[:1])
    site = next(n for n in sites if n.endswith("conv.0.1"))  # the BN after an expansion conv
    scores = {n: s for n, s, _ in ScoreContext(model, graph).norm_scales(graph.group(site))}
    torch.testing.assert_close(scores[site], model.get_submodule(site).gate.detach())


def test_registry_and_bn_init():
    assert {"polarization", "slimming", "none"} <= set(list_regularizers())
    model = models.create("resnet20", in_channels=1, input_size=28)
    with torch.no_grad():
        model.bn1.bias.fill_(0.3)
    reg = create_regularizer("polarization", model, lam=1e-4, t=1.2, bn_init=0.5)
    assert isinstance(reg, PolarizationRegularizer) and reg.t == 1.2
    assert all(torch.all(m.weight == 0.5) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.all(model.bn1.bias == 0.3)
    assert isinstance(create_regularizer("slimming", model, lam=1e-4), NetworkSlimming)
    with pytest.raises(ConfigError, match="lam"):
        PolarizationRegularizer(lam=-1, t=1.0)
    with pytest.raises(ConfigError):
        create_regularizer("slimming", model, lam=1e-4, t=1.0)


def test_trainer_hook_clamps_logs_and_checks_resume(tmp_path):
    from prunekit.data import get_dataset
    from prunekit.recipes import TrainRecipe
    from prunekit.train import train

    kw = {"size": 128, "input_shape": (1, 12, 12), "num_classes": 4}
    tr, te = get_dataset("synthetic", "train", **kw), get_dataset("synthetic", "test", **kw)
    recipe = TrainRecipe(epochs=1, batch_size=32, lr=0.5, momentum=0.9, schedule="constant")
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=4, in_channels=1, input_size=12, widths=[4, 4, 8])
    reg = create_regularizer("polarization", model, lam=0.05, t=1.2, bn_init=0.5)
    res = train(model, tr, te, recipe, out_dir=tmp_path, regularizers=[reg], progress=False)
    g = reg.values(res.model)
    assert g.min() >= 0 and g.max() <= 1 and (g == 0).any()  # clamped; strong λ already zeroes some
    assert "train_penalty" in res.history[0]
    m2 = models.create("resnet20", num_classes=4, in_channels=1, input_size=12, widths=[4, 4, 8])
    other = create_regularizer("polarization", m2, lam=0.01, t=1.2)  # another λ: not the same run
    with pytest.raises(ConfigError, match="different polarization"):
        train(m2, tr, te, recipe.replace(epochs=2), out_dir=tmp_path, regularizers=[other], progress=False,
              resume=True)


DDP_SCRIPT = r'''
import sys, torch
from torch import nn
from prunekit import distributed
from prunekit.data import get_dataset
from prunekit.polarization import FactorRef, FactorSet, PolarizationRegularizer
from prunekit.recipes import TrainRecipe
from prunekit.train import train


def run(out_dir):
    kw = dict(num_classes=4, input_shape=(1, 8, 8), seed=0)
    tr, te = get_dataset("synthetic", "train", size=256, **kw), get_dataset("synthetic", "test", size=64, **kw)
    recipe = TrainRecipe(epochs=2, batch_size=32, lr=0.2, momentum=0.9, schedule="constant")
    torch.manual_seed(0)
    # LayerNorm's γ as the factors: no batch statistics, so ranks must agree exactly with one process
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.fill_(0.5)
    reg = PolarizationRegularizer(0.02, 1.2, factors=FactorSet([FactorRef("2")]))
    return train(model, tr, te, recipe, out_dir=out_dir, seed=1, device="cpu", progress=False, regularizers=[reg])


if __name__ == "__main__":
    distributed.init_from_env()
    run(sys.argv[1])
    distributed.cleanup()
'''


def test_ddp_two_ranks_apply_the_same_update(tmp_path):
    ddp, log, single = ddp_and_single(DDP_SCRIPT, tmp_path, "ddp_pol.py")
    assert ddp["2.weight"].min() >= 0 and ddp["2.weight"].max() <= 1
    assert log[-1]["train_penalty"] == pytest.approx(single.history[-1]["train_penalty"], rel=1e-5)
