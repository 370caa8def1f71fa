"""ImageNet MobileNetV2 (Sandler et al. 2018) with a state_dict identical to torchvision's ``mobilenet_v2``.

``features.0`` = conv3×3/2-BN-ReLU6 stem; ``features.1..17`` = InvertedResidual blocks (``.conv``);
``features.18`` = 1×1 conv-BN-ReLU6 to 1280; adaptive avgpool; ``classifier`` = (Dropout, Linear).
``internal_widths`` gives each block's expanded (hidden) width; the first block (t=1) has no expansion
conv, so its entry must equal its input width.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from .init import kaiming_bn_init, linear_init
from .registry import check_common, check_float, check_widths, register_model

SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))  # (expansion t, out channels c, blocks n, first stride s)
STEM, LAST = 32, 1280


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (≥ divisor), never more than 10 % below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU6(nn.Sequential):
    """0 Conv2d (no bias, 'same' padding) - 1 BatchNorm2d - 2 ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6())


class InvertedResidual(nn.Module):
    """[1×1 expand-BN-ReLU6] → 3×3 depthwise (stride)-BN-ReLU6 → 1×1 project → BN, + x when shapes match.

    (N, c_in, H, W) → (N, c_out, H/stride, W/stride); ``hidden`` = expanded width (= c_in when t = 1).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, hidden: int, expand: bool):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(c_in, hidden, 1)] if expand else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out
        self.out_channels = c_out

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:  # structural (fixed at construction), not data-dependent
            return x + self.conv(x)
        return self.conv(x)


def block_plan(width_mult: float = 1.0) -> list[tuple[int, int, int, int]]:
    """Per block (c_in, c_out, stride, t) for the 17 inverted residual blocks."""
    plan, c_in = [], make_divisible(STEM * width_mult)
    for t, c, n, s in SETTING:
        c_out = make_divisible(c * width_mult)
        for i in range(n):
            plan.append((c_in, c_out, s if i == 0 else 1, t))
            c_in = c_out
    return plan


class MobileNetV2(nn.Module):
    """Input (N, C, S, S) → (N, num_classes); total stride 32 (7×7 map at 224)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224,
                 width_mult: float = 1.0, dropout: float = 0.2, internal_widths: Sequence[int] | None = None):
        super().__init__()
        plan = block_plan(width_mult)
        if internal_widths is None:
            internal_widths = [c_in * t for c_in, _, _, t in plan]
        self.input_shape = (in_channels, input_size, input_size)
        last = make_divisible(LAST * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, plan[0][0], 3, 2)]
        layers += [InvertedResidual(c_in, c_out, s, h, t != 1) for (c_in, c_out, s, t), h in zip(plan, internal_widths)]
        layers.append(ConvBNReLU6(plan[-1][1], last, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        kaiming_bn_init(self)  # torchvision's init
        linear_init(self, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register_model("mobilenetv2")
def mobilenetv2(*, num_classes=1000, in_channels=3, input_size=224, width_mult=1.0, dropout=0.2,
                internal_widths=None):
    """MobileNetV2 1.0×: 3,504,872 params, 300,774,272 conv+linear MACs at 3×224×224."""
    nc, ic, size = check_common(num_classes, in_channels, input_size)
    width_mult = check_float("width_mult", width_mult, 0.01)
    dropout = check_float("dropout", dropout, 0.0, 1.0, high_inclusive=False)
    plan = block_plan(width_mult)
    internal = check_widths("internal_widths", internal_widths, len(plan), [c * t for c, _, _, t in plan])
    for b, ((c_in, _, _, t), h) in enumerate(zip(plan, internal)):
        if t == 1 and h != c_in:
            raise ConfigError(f"model cfg 'internal_widths'[{b}] must equal the block's input width {c_in} "
                              f"(no expansion conv), got {h!r}")
    model = MobileNetV2(nc, ic, size, width_mult, dropout, internal)
    return model, {"width_mult": width_mult, "dropout": dropout, "internal_widths": internal}
