"""In-memory array dataset with vectorised batch access (IDX, CIFAR, synthetic)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .transforms import BatchAugment

__all__ = ["ArrayDataset"]


class ArrayDataset(Dataset):
    """All images of one split held in memory as a (N, C, H, W) tensor.

    Args:
        images: (N, C, H, W) uint8 (pixel values 0..255) or float (already in [0, 1]).
        labels: (N,) integer class indices; stored as int64.
        mean, std: per-channel normalisation constants (length C) in [0, 1] pixel units.
        normalize: apply ``(x - mean) / std``; otherwise batches are float in [0, 1].
        augment: a :class:`~prunekit.data.transforms.BatchAugment` or None.
        seed: augmentation seed; with the epoch it fully determines every augmented sample.

    :meth:`get_batch` is the fast path the loader uses: one gather + vectorised augmentation and
    normalisation for the whole batch. ``__getitem__`` is the same thing for a single index (at
    ``self.epoch``), for code that wants a plain torch Dataset.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool = True,
        augment: BatchAugment | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        name: str = "",
        split: str = "",
        classes: Sequence[str] | None = None,
        info=None,
    ):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} channel values, got {len(mean)}/{len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # (x / 255 - mean) / std == x * scale + shift; constants computed in float64, then rounded.
        self._scale_u8 = torch.tensor([1.0 / (255.0 * v) for v in self.std]).view(1, c, 1, 1)
        self._scale_f = torch.tensor([1.0 / v for v in self.std]).view(1, c, 1, 1)
        self._shift = torch.tensor([-m / v for m, v in zip(self.mean, self.std)]).view(1, c, 1, 1)
        self.normalize = normalize
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes = int(num_classes if num_classes is not None else int(self.labels.max()) + 1)
        self.name = name
        self.split = split
        self.classes = list(classes) if classes is not None else None
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, augment={self.augment!r}, normalize={self.normalize})"
        )

    @property
    def targets(self) -> torch.Tensor:
        """All labels, (N,) int64."""
        return self.labels

    def to(self, device) -> ArrayDataset:
        """Move the stored images/labels (e.g. all of CIFAR, 150 MB, to the GPU) so that batches
        are gathered, augmented and normalised there. Returns self."""
        self.images = self.images.to(device)
        self.labels = self.labels.to(device)
        for k in ("_scale_u8", "_scale_f", "_shift"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``__getitem__`` (``get_batch`` takes it explicitly)."""
        self.epoch = int(epoch)

    def get_batch(self, indices, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x float32 (B, C, H, W), y int64 (B,))`` for dataset ``indices`` (B,).

        Augmentation (if any) is applied to the raw pixels, then normalisation, all vectorised.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"index out of range for dataset of size {n}")
        idx = (idx % n if idx.numel() else idx).to(self.images.device)
        x = self.images.index_select(0, idx)
        if self.augment is not None:
            ep = self.epoch if epoch is None else int(epoch)
            x = self.augment(x, idx, seed=self.seed, epoch=ep, num_samples=n)
        # One fused affine map per batch: uint8 → [0, 1] → (x - mean) / std.
        is_u8 = x.dtype == torch.uint8
        x = x.to(torch.float32)
        if self.normalize:
            x.mul_(self._scale_u8 if is_u8 else self._scale_f).add_(self._shift)
        elif is_u8:
            x.div_(255.0)
        return x, self.labels.index_select(0, idx)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: x (C, H, W) float32, y 0-dim int64."""
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0]
