"""CIFAR ResNets (He et al. 2016, §4.2): depth 6n+2, three stages of n BasicBlocks, widths 16/32/64.

Shortcut option 'A' (default, as Polarization): parameter-free stride-2 subsample + zero channel padding.
Option 'B' (as Neuron Merging): 1×1 conv (no bias) + BN, only where the shape changes.
``internal_widths`` (one per block) sets each block's conv1 output width (the channels pruning removes).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .init import kaiming_bn_init
from .registry import check_choice, check_common, check_int, check_widths, register_model

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` then zero-pad channels (``before``, ``after``).

    Parameter-free and fx-traceable (all amounts are fixed at construction).
    """

    def __init__(self, stride: int, before: int, after: int):
        super().__init__()
        self.stride, self.before, self.after = stride, before, after

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.before}, {self.after})"


class BasicBlock(nn.Module):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); conv1 carries the stride.

    (N, in_planes, H, W) → (N, planes, H/stride, W/stride); ``width`` = conv1 output channels.
    """

    def __init__(self, in_planes: int, planes: int, width: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            extra = planes - in_planes
            self.shortcut = PadShortcut(stride, extra // 2, extra - extra // 2)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv1-bn1-relu stem, ``layer1..3`` (Sequential of BasicBlocks), adaptive ``avgpool``, ``fc``.

    Input (N, C, S, S) → (N, num_classes); at S=32 the last map is 8×8 (AvgPool(8) equivalent).
    """

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 shortcut: str = "A", widths: Sequence[int] = STAGE_WIDTHS,
                 internal_widths: Sequence[int] | None = None):
        super().__init__()
        n = (depth - 2) // 6
        internal = list(internal_widths) if internal_widths is not None else [w for w in widths for _ in range(n)]
        self.input_shape = (in_channels, input_size, input_size)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for s, planes in enumerate(widths):
            blocks = []
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, internal[s * n + i], stride, shortcut))
                in_planes = planes
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_bn_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _build(depth, num_classes, in_channels, input_size, shortcut, widths, internal_widths):
    depth = check_int("depth", depth, 8)
    if (depth - 2) % 6:
        raise ConfigError(f"model cfg 'depth' must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth!r}")
    n = (depth - 2) // 6
    nc, ic, size = check_common(num_classes, in_channels, input_size)
    shortcut = check_choice("shortcut", shortcut, ("A", "B"))
    widths = check_widths("widths", widths, 3)
    if shortcut == "A" and any(b < a for a, b in itertools.pairwise(widths)):
        raise ConfigError(f"model cfg 'widths' must be non-decreasing with shortcut 'A' (zero padding), got {widths}")
    internal = check_widths("internal_widths", internal_widths, 3 * n, [w for w in widths for _ in range(n)])
    model = CifarResNet(depth, nc, ic, size, shortcut, widths, internal)
    return model, {"depth": depth, "widths": widths, "internal_widths": internal}


def _named(depth: int):
    def factory(*, num_classes=10, in_channels=3, input_size=32, shortcut="A", widths=STAGE_WIDTHS,
                internal_widths=None):
        return _build(depth, num_classes, in_channels, input_size, shortcut, widths, internal_widths)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} blocks per stage)."
    return register_model(f"resnet{depth}")(factory)


resnet20 = _named(20)
resnet32 = _named(32)
resnet56 = _named(56)  # option B: 855,770 params; option A: 125,485,696 MACs at 3×32×32
resnet110 = _named(110)


@register_model("resnet-cifar")
def resnet_cifar(*, depth=56, num_classes=10, in_channels=3, input_size=32, shortcut="A", widths=STAGE_WIDTHS,
                 internal_widths=None):
    """CIFAR ResNet of any depth 6n+2."""
    return _build(depth, num_classes, in_channels, input_size, shortcut, widths, internal_widths)
