"""Class-per-folder image datasets (ImageNet layout: ``split/<class>/<image>``), decoded with Pillow.

Pillow is an optional dependency (``pip install 'prunekit[imagenet]'``); it is imported only when a
folder dataset is built, and its absence gives a DatasetError saying how to install it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DatasetError
from .transforms import normalize_, pil_to_tensor, random_resized_crop, resize_center_crop, seeded_generator

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "require_pil"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


def require_pil():
    """Return ``PIL.Image`` or raise DatasetError explaining how to install Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(
            "reading image-folder datasets (imagenet) needs Pillow, which is not installed: "
            "pip install 'prunekit[imagenet]'  (or: pip install pillow)"
        ) from None
    return Image


def _class_dirs(root: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DatasetError(f"{root}: cannot list image folder ({e.strerror or e})") from e


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/*`` → (x float32 (3, S, S), y int).

    Classes are sorted folder names (``classes`` may impose a list, e.g. the train split's, so that
    val labels use the same indices). ``train=True`` applies the ImageNet train augmentation
    (random-resized-crop to ``image_size`` + horizontal flip) with randomness drawn from a generator
    seeded by (seed, epoch, index), so DataLoader workers, ranks and resumed runs agree; otherwise
    resize the shorter side to ``resize_size`` and centre-crop ``image_size``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool = True,
        train: bool = False,
        image_size: int = 224,
        resize_size: int = 256,
        seed: int = 0,
        classes: Sequence[str] | None = None,
        name: str = "image-folder",
        split: str = "",
        info=None,
    ):
        require_pil()  # fail early, with install instructions
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: image folder does not exist")
        found = _class_dirs(self.root)
        if not found:
            raise DatasetError(f"{self.root}: empty image folder (expected one sub-folder of images per class)")
        self.classes = list(classes) if classes is not None else found
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in found if c not in self.class_to_idx]
        if unknown:
            raise DatasetError(
                f"{self.root}: class folders {unknown[:5]} are not among the {len(self.classes)} training classes"
            )
        self.samples: list[tuple[Path, int]] = []
        for c in found:
            d = self.root / c
            files = sorted(
                p for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
            )
            if not files:
                raise DatasetError(f"{d}: empty image folder (no {', '.join(IMG_EXTENSIONS)} files)")
            self.samples.extend((p, self.class_to_idx[c]) for p in files)
        self.targets = [y for _, y in self.samples]
        self.num_classes = len(self.classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_t = torch.tensor(self.mean).view(3, 1, 1)
        self._std_t = torch.tensor(self.std).view(3, 1, 1)
        self.normalize = normalize
        self.train = train
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.seed = int(seed)
        self.epoch = 0
        self.name = name
        self.split = split
        self.info = info

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
                f"train={self.train}, image_size={self.image_size})")

    def set_epoch(self, epoch: int) -> None:
        """Epoch that (with seed and index) determines the train augmentation."""
        self.epoch = int(epoch)

    def load_image(self, i: int):
        """Decode sample ``i`` as an RGB PIL image; DatasetError naming the file if unreadable."""
        path = self.samples[i][0]
        Image = require_pil()
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{path}: unreadable image ({e})") from e

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        img = self.load_image(i)
        if self.train:
            g = seeded_generator(self.seed, self.epoch, i)
            img = random_resized_crop(img, self.image_size, g)
            if bool(torch.rand(1, generator=g) < 0.5):
                img = img.transpose(require_pil().FLIP_LEFT_RIGHT)
        else:
            img = resize_center_crop(img, self.resize_size, self.image_size)
        x = pil_to_tensor(img).to(torch.float32).div_(255.0)
        if self.normalize:
            normalize_(x, self._mean_t, self._std_t)
        return x, self.samples[i][1]
