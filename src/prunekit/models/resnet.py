"""ImageNet ResNet-50 with a state_dict identical (keys and shapes) to torchvision's ``resnet50``.

conv1 7×7/2 + bn1 + ReLU + maxpool 3×3/2, ``layer1..4`` of [3, 4, 6, 3] Bottlenecks (stride on conv2,
``downsample`` = 1×1 conv + BN on the first block of each stage), adaptive avgpool, ``fc``.
``internal_widths`` gives each block's (conv1 out, conv2 out) widths, by default (planes, planes).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from .init import kaiming_bn_init
from .registry import check_common, register_model

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (planes, blocks, stride)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1×1 conv1 → 3×3 conv2 (stride) → 1×1 conv3 (×4), each + BN; out = relu(bn3(...) + shortcut(x)).

    (N, in_planes, H, W) → (N, 4·planes, H/stride, W/stride); ``widths`` = (conv1 out, conv2 out).
    """

    def __init__(self, in_planes: int, planes: int, widths: Sequence[int], stride: int = 1):
        super().__init__()
        w1, w2 = widths
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_planes, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w1, w2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(w2, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x  # structural branch
        return self.relu3(out + identity)


class ResNet50(nn.Module):
    """Input (N, C, S, S) → (N, num_classes); total stride 32 (7×7 map at 224)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224,
                 internal_widths: Sequence[Sequence[int]] | None = None):
        super().__init__()
        if internal_widths is None:
            internal_widths = [(p, p) for p, n, _ in STAGES for _ in range(n)]
        self.input_shape = (in_channels, input_size, input_size)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes, b = 64, 0
        for s, (planes, n, stride) in enumerate(STAGES):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(in_planes, planes, internal_widths[b], stride if i == 0 else 1))
                in_planes, b = planes * EXPANSION, b + 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_bn_init(self)  # torchvision's init

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _check_pairs(key: str, value, default: list[list[int]]) -> list[list[int]]:
    if value is None:
        return default
    if not isinstance(value, (list, tuple)) or len(value) != len(default):
        raise ConfigError(f"model cfg '{key}' must be a list of {len(default)} (w1, w2) pairs, got {value!r}")
    for pair in value:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in pair)):
            raise ConfigError(f"model cfg '{key}' entries must be pairs of positive ints, got {pair!r}")
    return [[int(a), int(b)] for a, b in value]


@register_model("resnet50")
def resnet50(*, num_classes=1000, in_channels=3, input_size=224, internal_widths=None):
    """ResNet-50: 25,557,032 params, 4,089,184,256 conv+linear MACs at 3×224×224."""
    nc, ic, size = check_common(num_classes, in_channels, input_size)
    internal = _check_pairs("internal_widths", internal_widths, [[p, p] for p, n, _ in STAGES for _ in range(n)])
    return ResNet50(nc, ic, size, internal), {"internal_widths": internal}
