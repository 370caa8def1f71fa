"""The official Neuron Merging pipelines as presets: which layers, how many survivors.

A preset maps ``(model, ratio)`` to ``{producer module name: survivors}`` and carries the official
script's threshold and λ (``docs/neuron-merging.md``, "Presets"). Everything else (criterion, M,
surgery) is shared with the general mode.

==================  ==========================================================  =====  ====
preset              layers pruned (survivors)                                   t      λ
==================  ==========================================================  =====  ====
``lenet-300-100``   both hidden layers, ``round(N·(1−r))``                      0.45   –
``vgg16-cifar10``   conv 1 and 8–13 halved (fixed widths; the ratio is ignored)  0.1    0.85
``vgg16-cifar100``  conv 1 and 10–13 halved (fixed widths)                      0.1    0.7
``resnet56``        every BasicBlock's conv1, ``floor(c·(1−r))``                0.1    0.85
``wrn-40-4``        every WideBlock's conv1, ``floor(c/k·(1−r))·k``             0.1    0.8
==================  ==========================================================  =====  ====

The ResNet and WRN presets work for any depth of the zoo's CIFAR ResNets / WRNs (block-internal
channels only, never the residual stream); the VGG presets halve the same layers of any-width VGG-16.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..registry import Registry

PRESETS: Registry = Registry("merge preset")


@dataclass(frozen=True)
class Preset:
    """An official pipeline: ``widths(model, ratio) -> {module: survivors}``, its t and λ."""

    name: str
    widths: Callable[[nn.Module, float], dict[str, int]]
    threshold: float
    lam: float
    description: str
    uses_ratio: bool = True


def register_preset(preset: Preset) -> Preset:
    return PRESETS.register(preset.name, preset)


def get_preset(name: str) -> Preset:
    return PRESETS.get(name)


def list_presets() -> list[str]:
    return PRESETS.names()


def _of_type(model: nn.Module, cls: type, preset: str) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]
    if not found:
        raise ConfigError(f"preset '{preset}' needs a {cls.__name__} model (from prunekit.models); "
                          f"{type(model).__name__} has none")
    return found


def _ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"ratio must be in [0, 1), got {ratio!r}")
    return float(ratio)


def lenet_widths(model: nn.Module, ratio: float) -> dict[str, int]:
    """Both hidden layers: ``round(N·(1−r))`` (150/50, 120/40, 90/30, 60/20 at r = 0.5 … 0.8)."""
    from ..models.lenet import LeNet300100

    r = _ratio(ratio)
    (prefix, net), = _of_type(model, LeNet300100, "lenet-300-100")[:1]
    p = f"{prefix}." if prefix else ""
    return {f"{p}{name}": max(1, round(getattr(net, name).out_features * (1 - r))) for name in ("fc1", "fc2")}


def _vgg_widths(halved: tuple[int, ...], preset: str) -> Callable[[nn.Module, float], dict[str, int]]:
    def widths(model: nn.Module, ratio: float) -> dict[str, int]:
        from ..models.vgg import VGG

        (prefix, net), = _of_type(model, VGG, preset)[:1]
        convs = [(n, m) for n, m in net.features.named_children() if isinstance(m, nn.Conv2d)]
        if len(convs) != 13:
            raise ConfigError(f"preset '{preset}' needs VGG-16 (13 convs), the model has {len(convs)}")
        p = f"{prefix}." if prefix else ""
        return {f"{p}features.{n}": (m.out_channels // 2 if i in halved else m.out_channels)
                for i, (n, m) in enumerate(convs, start=1)}

    widths.__doc__ = f"VGG-16 fixed widths: convs {halved} halved, the others kept (the ratio is ignored)."
    return widths


def resnet_widths(model: nn.Module, ratio: float) -> dict[str, int]:
    """Every BasicBlock's conv1: ``floor(c·(1−r))`` (ResNet-56 at r = 0.2: 12/25/51)."""
    from ..models.resnet_cifar import BasicBlock

    r = _ratio(ratio)
    return {f"{n}.conv1": max(1, math.floor(b.conv1.out_channels * (1 - r)))
            for n, b in _of_type(model, BasicBlock, "resnet56")}


def wrn_widths(model: nn.Module, ratio: float) -> dict[str, int]:
    """Every WideBlock's conv1: ``floor(c/k·(1−r))·k`` with k the widen factor (the base width is floored
    before multiplying: WRN-40-4 at r = 0.2 gives 48/100/204, not 51/102/204)."""
    from ..models.wide_resnet import WideBlock

    r = _ratio(ratio)
    blocks = _of_type(model, WideBlock, "wrn-40-4")
    k = (getattr(model, "prunekit_arch", None) or {}).get("config", {}).get("widen_factor")
    out = {}
    for name, b in blocks:
        kk = int(k) if k else max(1, b.conv2.out_channels // (16 * 2 ** _stage(name)))
        base = b.conv1.out_channels / kk
        out[f"{name}.conv1"] = max(1, math.floor(base * (1 - r))) * kk
    return out


def _stage(name: str) -> int:
    """0, 1, 2 for blocks of ``block1``, ``block2``, ``block3``."""
    for part in name.split("."):
        if part.startswith("block") and part[5:].isdigit():
            return int(part[5:]) - 1
    return 0


register_preset(Preset("lenet-300-100", lenet_widths, 0.45, 0.85,
                       "LeNet-300-100: both hidden layers, round(N(1-r)), MostSim on [w | b], t = 0.45"))
register_preset(Preset("vgg16-cifar10", _vgg_widths((1, 8, 9, 10, 11, 12, 13), "vgg16-cifar10"), 0.1, 0.85,
                       "VGG-16 CIFAR-10: conv 1 and 8-13 halved (64 % fewer params), t = 0.1, lambda = 0.85",
                       uses_ratio=False))
register_preset(Preset("vgg16-cifar100", _vgg_widths((1, 10, 11, 12, 13), "vgg16-cifar100"), 0.1, 0.7,
                       "VGG-16 CIFAR-100: conv 1 and 10-13 halved (44 % fewer params), t = 0.1, lambda = 0.7",
                       uses_ratio=False))
register_preset(Preset("resnet56", resnet_widths, 0.1, 0.85,
                       "CIFAR ResNet: every block's conv1, floor(c(1-r)), t = 0.1, lambda = 0.85"))
register_preset(Preset("resnet", resnet_widths, 0.1, 0.85,
                       "alias of resnet56 (any CIFAR ResNet depth): every block's conv1, floor(c(1-r))"))
register_preset(Preset("wrn-40-4", wrn_widths, 0.1, 0.8,
                       "WRN: every block's conv1, floor(c/k (1-r)) k, t = 0.1, lambda = 0.8"))
