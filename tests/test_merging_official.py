"""The presets with ``bn_scale="paper"`` give the official algorithm's logits (docs/neuron-merging.md).

The reference below is an independent, deliberately literal re-statement of the official pipeline (one
pruned neuron at a time, candidates in numpy, the scaling matrix with columns in the criterion's index
order, decisions on each layer's original weights, ``Z`` absorbed into the next layer, weights loaded into
a narrow model). The library's vectorised presets must give the same logits.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.merging import MergeOptions, merge
from prunekit.models import create

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- reference


def ref_index(w: np.ndarray, p: int, criterion: str) -> np.ndarray:
    """Official get_output_channel_index: l1/l2 sorted top-p, l2-GM argpartition (unsorted)."""
    v = w.reshape(w.shape[0], -1).astype(np.float64)
    if criterion == "l1-norm":
        return np.sort(np.argsort(np.abs(v).sum(1))[::-1][:p])
    if criterion == "l2-norm":
        return np.sort(np.argsort(np.linalg.norm(v, axis=1))[::-1][:p])
    sq = (v * v).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * v @ v.T, 0)).sum(0)
    return np.argpartition(d, -p)[-p:]


def ref_scaling_fc(v: np.ndarray, ind: np.ndarray, t: float) -> np.ndarray:
    v = v.astype(np.float64)
    z = np.zeros((v.shape[0], len(ind)))
    for i in range(v.shape[0]):
        hit = np.nonzero(ind == i)[0]
        if len(hit):
            z[i, hit[0]] = 1.0
            continue
        cos = v[ind] @ v[i] / (np.linalg.norm(v[ind], axis=1) * np.linalg.norm(v[i]))
        j = int(np.argmax(cos))
        if t and cos[j] < t:
            continue
        z[i, j] = np.linalg.norm(v[i]) / np.linalg.norm(v[ind[j]])
    return z


def ref_scaling_bn(w: np.ndarray, ind: np.ndarray, t: float, g, b, mu, var, lam: float) -> np.ndarray:
    v = w.reshape(w.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(v, axis=1)
    cosine_dist = 1 - (v @ v.T) / np.outer(norms, norms)  # as pairwise_distances(metric="cosine")
    z = np.zeros((v.shape[0], len(ind)))
    for i in range(v.shape[0]):
        hit = np.nonzero(ind == i)[0]
        if len(hit):
            z[i, hit[0]] = 1.0
            continue
        dist = cosine_dist[i, ind]
        s = norms[i] / norms[ind]
        g2, b2, mu2, var2 = g[ind], b[ind], mu[ind], var[ind]
        scale = s * (g2 / g[i]) * (var[i] / var2)
        bias = np.abs((g2 / var2) * (s * (-(var[i] * b[i] / g[i]) + mu[i]) - mu2) + b2) / scale
        bias = (bias - bias.min()) / (bias.max() - bias.min())
        j = int(np.argmin(lam * dist + (1 - lam) * bias))
        if t and 1 - dist[j] < t:
            continue
        z[i, j] = scale[j]
    return z


def absorb(w_next: np.ndarray, z: np.ndarray) -> np.ndarray:
    """W_next (O, N, ...) → (O, P, ...) with the scaling matrix z (N, P)."""
    return np.einsum("on...,np->op...", w_next, z)


def bn_params(sd: dict, prefix: str):
    return tuple(sd[f"{prefix}.{k}"].double().numpy() for k in ("weight", "bias", "running_mean", "running_var"))


def slice_bn(sd: dict, prefix: str, ind: np.ndarray) -> None:
    for k in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{prefix}.{k}"] = sd[f"{prefix}.{k}"][torch.as_tensor(ind)]


def randomize_bn(model: nn.Module, seed: int, negative: int = 0) -> nn.Module:
    """Random BN statistics (and a few negative γ) so that MostSim+BN has something to decide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.9 + 0.1)
                if negative:
                    m.weight[torch.randperm(n, generator=g)[:negative]] *= -1
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def load_narrow(name: str, cfg: dict, sd: dict) -> nn.Module:
    model = create(name, **cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


# ---------------------------------------------------------------------------------------------- pipelines


def _official_blocks(model: nn.Module, cfg: dict, arch: str, bn: str, extra_attr: str, keep_of, criterion: str,
                     t: float, lam: float) -> nn.Module:
    """The official per-block merge: prune each block's conv1 to ``keep_of(out_channels)`` filters, merge
    the pruned ones into conv2 with MostSim+BN (``bn`` follows conv1), rebuild the narrow model."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    widths = []
    for name, block in model.named_modules():
        if not hasattr(block, "conv2") or not hasattr(block, bn) or not hasattr(block, extra_attr):
            continue
        w = sd[f"{name}.conv1.weight"].double().numpy()
        p = keep_of(w.shape[0])
        ind = ref_index(w, p, criterion)
        z = ref_scaling_bn(w, ind, t, *bn_params(sd, f"{name}.{bn}"), lam)
        sd[f"{name}.conv1.weight"] = tensor(w[ind])
        slice_bn(sd, f"{name}.{bn}", ind)
        sd[f"{name}.conv2.weight"] = tensor(absorb(sd[f"{name}.conv2.weight"].double().numpy(), z))
        widths.append(p)
    return load_narrow(arch, {**cfg, "internal_widths": widths}, sd)


def official_resnet(model: nn.Module, cfg: dict, criterion: str, r: float, t: float, lam: float) -> nn.Module:
    return _official_blocks(model, cfg, "resnet-cifar", "bn1", "bn1", lambda n: math.floor(n * (1 - r)),
                            criterion, t, lam)


def official_wrn(model: nn.Module, cfg: dict, criterion: str, r: float, t: float, lam: float) -> nn.Module:
    k = cfg["widen_factor"]
    return _official_blocks(model, cfg, "wrn", "bn2", "projection", lambda n: math.floor(n / k * (1 - r)) * k,
                            criterion, t, lam)


def official_vgg(model: nn.Module, cfg: dict, criterion: str, halved: tuple, t: float, lam: float) -> nn.Module:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    z = None
    widths = []
    for layer, i in enumerate(convs, start=1):
        orig = sd[f"features.{i}.weight"].double().numpy()  # decisions on the original weights
        p = orig.shape[0] // 2 if layer in halved else orig.shape[0]
        ind = ref_index(orig, p, criterion)
        z_new = ref_scaling_bn(orig, ind, t, *bn_params(sd, f"features.{i + 1}"), lam)
        written = absorb(orig, z) if z is not None else orig
        sd[f"features.{i}.weight"] = tensor(written[ind])
        slice_bn(sd, f"features.{i + 1}", ind)
        z = z_new
        widths.append(p)
    sd["classifier.0.weight"] = tensor(sd["classifier.0.weight"].double().numpy() @ z)
    return load_narrow("vgg16", {**cfg, "widths": widths}, sd)


def official_lenet(model: nn.Module, criterion: str, r: float, t: float) -> nn.Module:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    z = None
    widths = []
    for layer in ("fc1", "fc2"):
        w, b = sd[f"{layer}.weight"].double().numpy(), sd[f"{layer}.bias"].double().numpy()
        v = np.concatenate([w, b[:, None]], 1)
        p = round(w.shape[0] * (1 - r))
        ind = ref_index(v, p, criterion)
        z_new = ref_scaling_fc(v, ind, t)
        written = w @ z if z is not None else w
        sd[f"{layer}.weight"], sd[f"{layer}.bias"] = tensor(written[ind]), tensor(b[ind])
        z = z_new
        widths.append(p)
    sd["fc3.weight"] = tensor(sd["fc3.weight"].double().numpy() @ z)
    return load_narrow("lenet-300-100", {"widths": widths}, sd)


def same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max())


CRITERIA = ["l1-norm", "l2-norm", "l2-GM"]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_resnet_preset_matches_official(criterion):
    cfg = {"depth": 20, "shortcut": "B", "input_size": 16}
    torch.manual_seed(1)
    model = randomize_bn(create("resnet-cifar", **cfg), seed=2, negative=2)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for r in (0.3, 0.6):
        ours = merge(model, x[:1], MergeOptions(ratio=r, criterion=criterion, preset="resnet56", bn_scale="paper",
                                                negative="allow"))
        ref = official_resnet(model, cfg, criterion, r, t=0.1, lam=0.85)
        assert ours.report["merged"] > 0 and ours.report["skipped_threshold"] > 0
        assert same_function(ref, ours.model, x) < 1e-5
        assert sum(p.numel() for p in ours.model.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_wrn_preset_matches_official(criterion):
    cfg = {"depth": 10, "widen_factor": 2, "input_size": 16}
    torch.manual_seed(4)
    model = randomize_bn(create("wrn", **cfg), seed=5)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    ours = merge(model, x[:1], MergeOptions(ratio=0.3, criterion=criterion, preset="wrn-40-4", bn_scale="paper"))
    ref = official_wrn(model, cfg, criterion, 0.3, t=0.1, lam=0.8)
    widths = [m.out_channels for n, m in ours.model.named_modules() if n.endswith(".conv1")]
    assert widths == [22, 44, 88]  # floor(16·0.7)·2, floor(32·0.7)·2, floor(64·0.7)·2
    assert same_function(ref, ours.model, x) < 1e-5


VGG_EIGHTH = [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]  # same layer pattern, 1/8 of the widths


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("preset, halved, lam", [("vgg16-cifar10", (1, 8, 9, 10, 11, 12, 13), 0.85),
                                                 ("vgg16-cifar100", (1, 10, 11, 12, 13), 0.7)])
def test_vgg16_preset_matches_official(criterion, preset, halved, lam):
    cfg = {"widths": VGG_EIGHTH, "fc_width": 64, "num_classes": 10 if preset.endswith("10") else 100}
    torch.manual_seed(7)
    model = randomize_bn(create("vgg16", **cfg), seed=8, negative=2)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    ours = merge(model, x[:1], MergeOptions(criterion=criterion, preset=preset, bn_scale="paper", negative="allow"))
    ref = official_vgg(model, {k: v for k, v in cfg.items() if k != "widths"}, criterion, halved, t=0.1, lam=lam)
    assert ours.report["merged"] > 0
    assert same_function(ref, ours.model, x) < 1e-5


@pytest.mark.parametrize("classes, widths, params", [
    (10, [32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256], 5_397_034),  # −63.99 %
    (100, [32, 64, 128, 128, 256, 256, 256, 512, 512, 256, 256, 256, 256], 8_393_348),  # −44.17 %
])
def test_vgg16_fixed_widths_and_params(classes, widths, params):
    model = create("vgg16", num_classes=classes).eval()
    res = merge(model, (1, 3, 32, 32), MergeOptions(preset=f"vgg16-cifar{classes}", bn_scale="paper"))
    convs = [m.out_channels for m in res.model.features if isinstance(m, nn.Conv2d)]
    assert convs == widths
    assert sum(p.numel() for p in res.model.parameters()) == params  # docs/neuron-merging.md, Presets


@pytest.mark.parametrize("criterion", CRITERIA)
def test_lenet_preset_matches_official(criterion):
    torch.manual_seed(10)
    model = create("lenet-300-100").eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    for r in (0.5, 0.8):
        ours = merge(model, x[:1], MergeOptions(ratio=r, criterion=criterion, preset="lenet-300-100"))
        ref = official_lenet(model, criterion, r, t=0.45)
        assert same_function(ref, ours.model, x) < 1e-5


def test_preset_widths_follow_the_official_rounding():
    from prunekit.merging.presets import resnet_widths, wrn_widths

    r56 = create("resnet56", shortcut="B")
    for r, want in [(0.1, (14, 28, 57)), (0.2, (12, 25, 51)), (0.7, (4, 9, 19))]:  # floor(c(1−r))
        w = resnet_widths(r56, r)
        assert (w["layer1.0.conv1"], w["layer2.0.conv1"], w["layer3.8.conv1"]) == want
    wrn = create("wrn-40-4")
    w = wrn_widths(wrn, 0.2)
    assert (w["block1.0.conv1"], w["block2.3.conv1"], w["block3.5.conv1"]) == (48, 100, 204)  # not 51/102/204


def test_preset_study_table_runs_on_any_loader():
    from prunekit.studies.merging import preset_markdown, preset_table

    torch.manual_seed(12)
    model = randomize_bn(create("resnet-cifar", depth=8, shortcut="B", input_size=16), seed=13)
    g = torch.Generator().manual_seed(14)
    loader = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    rows = preset_table(model, loader, preset="resnet56", criteria=["l1-norm", "l2-GM"], ratios=[0.5])
    assert [r["criterion"] for r in rows] == ["l1-norm", "l2-GM"]
    assert all(0 <= r["merge"] <= 100 and r["removed"] == 8 + 16 + 32 for r in rows)  # floor(c/2) of 16/32/64
    assert "| l2-GM | 0.5 |" in preset_markdown(rows, 10.0)
