"""Pre-activation Wide ResNets (Zagoruyko & Komodakis 2016), as used by Neuron Merging (WRN-40-4).

conv1 3×3 (in→16); ``block1..3`` of (depth−4)/6 blocks with widths 16k/32k/64k and strides 1/2/2;
final ``bn``-ReLU-adaptive avgpool-``fc``. No conv has a bias. ``internal_widths`` sets each block's
conv1 output width (the channels pruning removes; their BN is the block's ``bn2``).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from .init import kaiming_bn_init, linear_init
from .registry import check_common, check_float, check_int, check_widths, register_model


class WideBlock(nn.Module):
    """bn1-relu-conv1(3×3, stride)-bn2-relu-dropout-conv2(3×3) + shortcut.

    Identity shortcut when in == out and stride == 1; otherwise a 1×1 conv ``shortcut`` applied to the
    pre-activated input relu(bn1(x)) (the standard WRN projection). (N, in, H, W) → (N, out, H/s, W/s).
    """

    def __init__(self, in_planes: int, out_planes: int, width: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(width, out_planes, 3, padding=1, bias=False)
        self.projection = in_planes != out_planes or stride != 1
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if self.projection else None

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        if self.shortcut is not None:  # structural (fixed at construction), not data-dependent
            return out + self.shortcut(pre)
        return out + x


class WideResNet(nn.Module):
    """Input (N, C, S, S) → (N, num_classes); at S=32 the last map is 8×8 (AvgPool(8) equivalent)."""

    def __init__(self, depth: int = 40, widen_factor: int = 4, num_classes: int = 10, in_channels: int = 3,
                 input_size: int = 32, dropout: float = 0.0, internal_widths: list[int] | None = None):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        internal = internal_widths if internal_widths is not None else [w for w in widths for _ in range(n)]
        self.input_shape = (in_channels, input_size, input_size)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        for g, (planes, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = [WideBlock(in_planes if i == 0 else planes, planes, internal[g * n + i],
                                stride if i == 0 else 1, dropout) for i in range(n)]
            in_planes = planes
            self.add_module(f"block{g + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_bn_init(self)
        linear_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


def _build(depth, widen_factor, num_classes, in_channels, input_size, dropout, internal_widths):
    depth = check_int("depth", depth, 10)
    if (depth - 4) % 6:
        raise ConfigError(f"model cfg 'depth' must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth!r}")
    k = check_int("widen_factor", widen_factor)
    n = (depth - 4) // 6
    nc, ic, size = check_common(num_classes, in_channels, input_size)
    dropout = check_float("dropout", dropout, 0.0, 1.0, high_inclusive=False)
    internal = check_widths("internal_widths", internal_widths, 3 * n,
                            [w * k for w in (16, 32, 64) for _ in range(n)])
    model = WideResNet(depth, k, nc, ic, size, dropout, internal)
    return model, {"depth": depth, "widen_factor": k, "dropout": dropout, "internal_widths": internal}


@register_model("wrn")
def wrn(*, depth=40, widen_factor=4, num_classes=10, in_channels=3, input_size=32, dropout=0.0,
        internal_widths=None):
    """Generic WRN-depth-k (depth = 6n+4)."""
    return _build(depth, widen_factor, num_classes, in_channels, input_size, dropout, internal_widths)


@register_model("wrn-40-4")
def wrn_40_4(*, num_classes=10, in_channels=3, input_size=32, dropout=0.0, internal_widths=None):
    """WRN-40-4: 8,949,210 params at 10 classes."""
    return _build(40, 4, num_classes, in_channels, input_size, dropout, internal_widths)


@register_model("wrn-28-10")
def wrn_28_10(*, num_classes=10, in_channels=3, input_size=32, dropout=0.0, internal_widths=None):
    """WRN-28-10: 36,479,194 params at 10 classes."""
    return _build(28, 10, num_classes, in_channels, input_size, dropout, internal_widths)
