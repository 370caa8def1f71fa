"""LeNet-300-100 (fully connected) and LeNet-5 (conv) for MNIST-like inputs, default 1×28×28."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .registry import check_common, check_widths, register_model


class LeNet300100(nn.Module):
    """Flatten → fc1 → ReLU → fc2 → ReLU → fc3 (all with bias), as used by Neuron Merging.

    Input (N, C, S, S) with C·S² = ``fc1.in_features``; output (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                 widths: Sequence[int] = (300, 100)):
        super().__init__()
        w1, w2 = widths
        self.input_shape = (in_channels, input_size, input_size)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, w1)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(w1, w2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


def _lenet5_spatial(input_size: int) -> int:
    """Side of conv2's pooled map: conv1 keeps S (pad 2), pool halves, conv2 (5×5, no pad) −4, pool halves."""
    return (input_size // 2 - 4) // 2


class LeNet5(nn.Module):
    """conv1 (5×5, pad 2) → ReLU → maxpool2 → conv2 (5×5) → ReLU → maxpool2 → fc1 → fc2 → fc3.

    widths = (conv1 out, conv2 out, fc1 out, fc2 out), default (6, 16, 120, 84); 16·5·5 features at 28×28.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                 widths: Sequence[int] = (6, 16, 120, 84)):
        super().__init__()
        c1, c2, f1, f2 = widths
        side = _lenet5_spatial(input_size)
        self.input_shape = (in_channels, input_size, input_size)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("lenet-300-100")
def lenet_300_100(*, num_classes=10, in_channels=1, input_size=28, widths=(300, 100)):
    """LeNet-300-100: 266,610 params at the defaults."""
    nc, ic, size = check_common(num_classes, in_channels, input_size)
    widths = check_widths("widths", widths, 2)
    model = LeNet300100(nc, ic, size, widths)
    return model, {"widths": widths}


@register_model("lenet-5")
def lenet_5(*, num_classes=10, in_channels=1, input_size=28, widths=(6, 16, 120, 84)):
    """LeNet-5: 61,706 params at the defaults; needs input_size >= 12."""
    nc, ic, size = check_common(num_classes, in_channels, input_size, min_size=12)
    widths = check_widths("widths", widths, 4)
    return LeNet5(nc, ic, size, widths), {"widths": widths}
