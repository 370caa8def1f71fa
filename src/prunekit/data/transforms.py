"""Deterministic augmentation and normalisation.

Every random choice is a function of (dataset seed, epoch, sample index) only, never of global RNG
state or of which batch/process/worker a sample lands in. That is what lets a resumed run, a DDP run
and a single uninterrupted run see bit-identical augmented samples.

Array datasets use :class:`RandomCropFlip`, which works on a whole uint8 batch (B, C, H, W) at once
(one gather, no per-sample Python loop). Image-folder datasets (ImageNet) use the per-sample PIL
helpers at the bottom, with a generator seeded from (seed, epoch, index).
"""
from __future__ import annotations

import hashlib
import math
from typing import Protocol

import torch

__all__ = [
    "BatchAugment",
    "RandomCropFlip",
    "mix_seed",
    "normalize_",
    "pil_to_tensor",
    "random_resized_crop",
    "resize_center_crop",
    "seeded_generator",
]


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed, so (seed=0, epoch=1) and (seed=1, epoch=0) differ."""
    h = hashlib.blake2b(digest_size=8, person=b"prunekit-data")
    for v in values:
        h.update(int(v).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def seeded_generator(*values: int) -> torch.Generator:
    """A CPU torch.Generator seeded with ``mix_seed(*values)``."""
    g = torch.Generator()
    g.manual_seed(mix_seed(*values))
    return g


class BatchAugment(Protocol):
    """What an array dataset calls on each raw batch before normalisation.

    ``x`` is the raw (B, C, H, W) batch (uint8 or float in [0, 1]); ``indices`` (B,) are the dataset
    indices of its rows. The result must depend only on (seed, epoch, indices), not on B.
    """

    def __call__(
        self, x: torch.Tensor, indices: torch.Tensor, *, seed: int, epoch: int, num_samples: int
    ) -> torch.Tensor: ...


class RandomCropFlip:
    """Zero-pad by ``padding``, take a random (H, W) crop, and flip horizontally with p=0.5.

    The standard CIFAR train augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``),
    vectorised: offsets and flips for all ``num_samples`` samples of an epoch are drawn at once from
    a generator seeded with (seed, epoch) and then indexed by sample index, so a sample's
    augmentation does not depend on the batch it is in. Padding is applied in raw pixel space
    (black), before normalisation, like torchvision.
    """

    def __init__(self, padding: int = 4, *, crop: bool = True, flip: bool = True):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding) if crop else 0
        self.crop = crop
        self.flip = flip
        self._cache: tuple[tuple[int, int, int], tuple[torch.Tensor, ...]] | None = None

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, crop={self.crop}, flip={self.flip})"

    def params(self, num_samples: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (row offset, column offset, flip) for one epoch, each of shape (num_samples,).

        Offsets are in [0, 2 * padding] into the padded image.
        """
        key = (int(num_samples), int(seed), int(epoch))
        if self._cache is None or self._cache[0] != key:
            g = seeded_generator(seed, epoch, 0x43524F50)  # "CROP": keeps this stream apart from others
            hi = 2 * self.padding + 1
            oy = torch.randint(0, hi, (num_samples,), generator=g)
            ox = torch.randint(0, hi, (num_samples,), generator=g)
            fl = torch.rand(num_samples, generator=g) < 0.5
            if not self.flip:
                fl = torch.zeros_like(fl)
            self._cache = (key, (oy, ox, fl))
        return self._cache[1]  # type: ignore[return-value]

    def __call__(
        self, x: torch.Tensor, indices: torch.Tensor, *, seed: int, epoch: int, num_samples: int
    ) -> torch.Tensor:
        # Parameters are drawn on the CPU (same numbers on every device), then moved to x's device.
        cpu_idx = indices.cpu()
        oy, ox, fl = (t.index_select(0, cpu_idx).to(x.device) for t in self.params(num_samples, seed, epoch))
        b, c, h, w = x.shape
        p = self.padding
        xp = x
        if p:
            xp = x.new_zeros((b, c, h + 2 * p, w + 2 * p))
            xp[:, :, p: p + h, p: p + w] = x
        rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
        cols = torch.where(fl[:, None], cols.flip(1), cols)  # a flip is the crop read right-to-left
        # Two gathers (rows, then columns) pick each sample's window: no per-sample Python loop.
        x = torch.gather(xp, 2, rows[:, None, :, None].expand(b, c, h, xp.shape[3]))
        return torch.gather(x, 3, cols[:, None, None, :].expand(b, c, h, w))


def normalize_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place ``(x - mean) / std`` with mean/std broadcastable to x (e.g. (C, 1, 1))."""
    return x.sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------------
# Per-sample PIL transforms (image folders). ``img`` is a PIL.Image in RGB mode.


def random_resized_crop(
    img,
    size: int,
    g: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to size×size.

    Inception-style crop: up to 10 tries, then a centred crop with the aspect ratio clamped into
    ``ratio``. Bilinear resampling.
    """
    from PIL import Image

    width, height = img.size
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    box = None
    for _ in range(10):
        u = torch.rand(2, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            box = (left, top, left + w, top + h)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    return img.resize((size, size), Image.BILINEAR, box=box)


def resize_center_crop(img, resize: int, size: int):
    """Resize the shorter side to ``resize`` (keeping aspect), then centre-crop size×size."""
    from PIL import Image

    width, height = img.size
    if width <= height:
        new_w, new_h = resize, max(1, int(resize * height / width))
    else:
        new_w, new_h = max(1, int(resize * width / height)), resize
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img) -> torch.Tensor:
    """RGB PIL image → uint8 tensor (3, H, W)."""
    import numpy as np

    arr = np.array(img, dtype=np.uint8, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
