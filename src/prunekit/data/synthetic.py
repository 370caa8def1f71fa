"""A deterministic, learnable synthetic classification dataset (no files, instant).

Each class has a smooth random prototype image (random low-resolution pattern, bilinearly
upsampled); a sample is its class prototype plus Gaussian pixel noise, stored as uint8. Train and
test share the prototypes (seeded by ``seed``) but draw different noise, so a model that learns
the prototypes generalises: tests use it to check that training really reduces loss/raises
accuracy, and pruning pipelines can run end to end in seconds.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .transforms import seeded_generator

__all__ = ["DEFAULT_SHAPE", "DEFAULT_TEST_SIZE", "DEFAULT_TRAIN_SIZE", "make_synthetic"]

DEFAULT_SHAPE = (1, 28, 28)
DEFAULT_TRAIN_SIZE = 2048
DEFAULT_TEST_SIZE = 512
_SPLIT_ID = {"train": 1, "test": 2}


def make_synthetic(
    split: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = DEFAULT_SHAPE,
    size: int | None = None,
    seed: int = 0,
    noise: float = 0.15,
    contrast: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images uint8 (size, C, H, W) and labels int64 (size,) for ``split``.

    Labels are balanced (``i % num_classes``, shuffled). ``contrast`` scales the prototypes (pixel
    range 0.5 ± contrast/2) and ``noise`` is the per-pixel std in [0, 1] units: lower contrast or
    higher noise makes the task harder. Same arguments → bit-identical output.
    """
    c, h, w = (int(v) for v in input_shape)
    if size is None:
        size = DEFAULT_TRAIN_SIZE if split == "train" else DEFAULT_TEST_SIZE
    g = seeded_generator(seed, 0x5052_4F54)  # prototypes: shared by both splits
    low = torch.rand(num_classes, c, max(2, (h + 3) // 4), max(2, (w + 3) // 4), generator=g)
    protos = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    lo, hi = protos.amin(dim=(1, 2, 3), keepdim=True), protos.amax(dim=(1, 2, 3), keepdim=True)
    protos = 0.5 + contrast * ((protos - lo) / (hi - lo).clamp_min(1e-6) - 0.5)
    g = seeded_generator(seed, _SPLIT_ID[split])
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=g)]
    x = protos[labels] + noise * torch.randn(size, c, h, w, generator=g)
    images = (x.clamp_(0, 1) * 255).round_().to(torch.uint8)
    return images, labels.to(torch.int64)
