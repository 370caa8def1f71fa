"""Weight initialisation shared by the zoo's convolutional networks."""
from __future__ import annotations

from torch import nn


def kaiming_bn_init(model: nn.Module) -> None:
    """He-normal (fan_out, ReLU gain √2) for every ``Conv2d`` weight; BatchNorm γ = 1, β = 0.

    torchvision's ResNet / MobileNetV2 initialisation and the CIFAR ResNets'. Linear layers are left to
    the caller (they differ per family); modules are visited in ``model.modules()`` order, so the random
    stream matches a loop that initialises Linear layers after the convolutions.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def linear_init(model: nn.Module, std: float | None = None) -> None:
    """Every ``Linear``: weight ~ N(0, std²) when ``std`` is given (else left as PyTorch made it), bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if std is not None:
                nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
