"""CIFAR VGG-16, the "network slimming" variant (Liu et al. 2017) that Neuron Merging and Polarization use.

13 conv3×3 (pad 1, no bias) + BN + ReLU, MaxPool2d(2) after conv 2, 4, 7 and 10 (32→2), adaptive
average pool to 1×1, then classifier Linear(C_last, fc_width) + BN1d + ReLU + Linear(fc_width, classes).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from .registry import check_common, check_float, check_int, check_widths, register_model

VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOL_AFTER = (2, 4, 7, 10)  # 1-based conv indices followed by MaxPool2d(2)


class VGG(nn.Module):
    """``features`` (Sequential of conv, bn, relu, …, pool), ``avgpool``, ``flatten``, ``classifier``
    (0 Linear, 1 BatchNorm1d, 2 ReLU, 3 Linear). Input (N, C, S, S) → (N, num_classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 widths: Sequence[int] = VGG16_WIDTHS, fc_width: int = 512, bn_init: float = 0.5):
        super().__init__()
        self.input_shape = (in_channels, input_size, input_size)
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, w in enumerate(widths, start=1):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(2))
            c_in = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(c_in, fc_width), nn.BatchNorm1d(fc_width), nn.ReLU(), nn.Linear(fc_width, num_classes)
        )
        self._init(bn_init)

    def _init(self, bn_init: float) -> None:
        """Conv N(0, sqrt(2/(k²·out))), BN γ=bn_init β=0, Linear N(0, 0.01) bias 0 (NM main.py)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, bn_init)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register_model("vgg16")
def vgg16(*, num_classes=10, in_channels=3, input_size=32, widths=VGG16_WIDTHS, fc_width=512, bn_init=0.5):
    """VGG-16 (CIFAR): 14,987,722 params at 10 classes; needs input_size >= 16 (four 2×2 max-pools)."""
    nc, ic, size = check_common(num_classes, in_channels, input_size, min_size=16)
    widths = check_widths("widths", widths, len(VGG16_WIDTHS))
    fc_width = check_int("fc_width", fc_width)
    bn_init = check_float("bn_init", bn_init)
    model = VGG(nc, ic, size, widths, fc_width, bn_init)
    return model, {"widths": widths, "fc_width": fc_width, "bn_init": bn_init}
