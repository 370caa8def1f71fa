"""The dataset catalogue: names → (static info, builder), and ``get_dataset``."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from ..registry import Registry
from .base import ArrayDataset
from .roots import fetch, resolve_root
from .transforms import RandomCropFlip

__all__ = ["DATASETS", "DatasetInfo", "DatasetSpec", "dataset_info", "get_dataset", "list_datasets"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset. ``input_shape`` is (C, H, W) as the model sees it; ``mean``
    and ``std`` (length C, in [0, 1] pixel units) are the normalisation ``get_dataset`` applies.

    Text (``task="causal-lm"``): ``input_shape`` is ``(block_size,)``, ``num_classes`` = ``vocab_size``
    (next-token targets), no mean/std, sizes count blocks, and ``val_size`` is the separate val split's."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    task: str = "classification"
    vocab_size: int | None = None
    block_size: int | None = None
    val_size: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Registry entry: info plus ``build(split, root, download, augment, normalize, **kw)``."""

    info: DatasetInfo
    build: Callable[..., Any]
    info_fn: Callable[..., DatasetInfo] | None = None  # for datasets whose info depends on kwargs
    splits: tuple[str, ...] | None = None  # its own split names (no 'val' → 'test' alias)

    def __call__(self, *args, **kw):
        return self.build(*args, **kw)


DATASETS: Registry = Registry("dataset")

_FMNIST = DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.5,), (0.5,), 60000, 10000)
_MNIST = DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), 60000, 10000)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
_CIFAR10 = DatasetInfo("cifar10", 10, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD, 50000, 10000)
_CIFAR100 = DatasetInfo("cifar100", 100, (3, 32, 32), _CIFAR_MEAN, _CIFAR_STD, 50000, 10000)
_IMAGENET = DatasetInfo("imagenet", 1000, (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                        1281167, 50000)


def _check_kwargs(name: str, kw: dict, allowed: set[str]) -> None:
    extra = sorted(set(kw) - allowed)
    if extra:
        raise ConfigError(
            f"dataset '{name}' does not take option(s) {', '.join(extra)}; "
            f"it takes: {', '.join(sorted(allowed)) or 'none'}"
        )


def _locate(name: str, root, download: bool) -> Path:
    try:
        return resolve_root(name, root)
    except DatasetError:
        if not download:
            raise
    return fetch(name, root)


def _array_augment(augment, standard, split: str):
    """None → the standard train augmentation on train, none on test; False → none; True →
    standard on any split; anything callable → used as is."""
    if augment is None:
        return standard() if (split == "train" and standard is not None) else None
    if augment is False:
        return None
    if augment is True:
        return standard() if standard is not None else None
    if callable(augment):
        return augment
    raise ConfigError(f"augment must be None, True, False or a batch augmentation, got {augment!r}")


def _cifar_standard():
    return RandomCropFlip(padding=4)


def _idx_builder(info: DatasetInfo):
    def build(split, *, root=None, download=True, augment=None, normalize=True, **kw):
        from .idx import load_idx_split

        _check_kwargs(info.name, kw, {"seed"})
        folder = _locate(info.name, root, download)
        images, labels = load_idx_split(folder, split, info.num_classes)
        return ArrayDataset(images, labels, mean=info.mean, std=info.std, normalize=normalize,
                            augment=_array_augment(augment, None, split), seed=kw.get("seed", 0),
                            num_classes=info.num_classes, name=info.name, split=split, info=info)

    return build


def _cifar_builder(info: DatasetInfo):
    def build(split, *, root=None, download=True, augment=None, normalize=True, **kw):
        from .cifar import load_cifar_split

        _check_kwargs(info.name, kw, {"seed"})
        folder = _locate(info.name, root, download)
        images, labels, classes = load_cifar_split(folder, info.name, split)
        return ArrayDataset(images, labels, mean=info.mean, std=info.std, normalize=normalize,
                            augment=_array_augment(augment, _cifar_standard, split), seed=kw.get("seed", 0),
                            num_classes=info.num_classes, name=info.name, split=split, classes=classes,
                            info=info)

    return build


def _imagenet_build(split, *, root=None, download=True, augment=None, normalize=True, **kw):
    from .folder import ImageFolderDataset, require_pil

    _check_kwargs("imagenet", kw, {"seed", "image_size", "resize_size"})
    require_pil()
    folder = _locate("imagenet", root, download)
    sub = folder / ("train" if split == "train" else "val")
    if not sub.is_dir():
        raise DatasetError(f"{sub}: missing the imagenet {split} split folder (expected {sub}/<wnid>/*.JPEG)")
    classes = None
    if split != "train" and (folder / "train").is_dir():
        from .folder import _class_dirs

        classes = _class_dirs(folder / "train") or None
    if augment is None:
        train = split == "train"
    elif isinstance(augment, bool):
        train = augment
    else:
        raise ConfigError("imagenet takes augment=None/True/False (per-sample PIL pipeline), not a batch augmentation")
    image_size = int(kw.get("image_size", 224))
    info = _IMAGENET if image_size == 224 else replace(_IMAGENET, input_shape=(3, image_size, image_size))
    return ImageFolderDataset(sub, mean=_IMAGENET.mean, std=_IMAGENET.std, normalize=normalize, train=train,
                              image_size=image_size, resize_size=int(kw.get("resize_size", 256)),
                              seed=kw.get("seed", 0), classes=classes, name="imagenet", split=split, info=info)


_SYNTH_KW = {"num_classes", "input_shape", "size", "train_size", "test_size", "seed", "noise", "contrast"}


def _synthetic_info(**kw) -> DatasetInfo:
    from .synthetic import DEFAULT_SHAPE, DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE

    _check_kwargs("synthetic", kw, _SYNTH_KW)
    shape = tuple(int(v) for v in kw.get("input_shape", DEFAULT_SHAPE))
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"synthetic input_shape must be (C, H, W) with positive sizes, got {shape}")
    num_classes = int(kw.get("num_classes", 10))
    if num_classes < 2:
        raise ConfigError(f"synthetic num_classes must be >= 2, got {num_classes}")
    size = kw.get("size")
    train = int(kw.get("train_size", size if size is not None else DEFAULT_TRAIN_SIZE))
    test = int(kw.get("test_size", size if size is not None else DEFAULT_TEST_SIZE))
    if train < 1 or test < 1:
        raise ConfigError(f"synthetic sizes must be >= 1, got train={train}, test={test}")
    c = shape[0]
    return DatasetInfo("synthetic", num_classes, shape, (0.5,) * c, (0.5,) * c, train, test)  # type: ignore[arg-type]


def _synthetic_build(split, *, root=None, download=True, augment=None, normalize=True, **kw):
    from .synthetic import make_synthetic

    info = _synthetic_info(**kw)
    size = info.train_size if split == "train" else info.test_size
    images, labels = make_synthetic(
        split, num_classes=info.num_classes, input_shape=info.input_shape, size=size,
        seed=int(kw.get("seed", 0)), noise=float(kw.get("noise", 0.15)), contrast=float(kw.get("contrast", 0.7)),
    )
    pad = max(1, info.input_shape[1] // 8)
    # No standard augmentation (None → none); True gives a crop+flip scaled to the image size.
    aug = RandomCropFlip(padding=pad) if augment is True else _array_augment(augment, None, split)
    return ArrayDataset(images, labels, mean=info.mean, std=info.std, normalize=normalize, augment=aug,
                        seed=int(kw.get("seed", 0)), num_classes=info.num_classes, name="synthetic",
                        split=split, info=info)


_TEXT_KW = {"block_size", "stride", "milton"}


def _shakespeare_info(**kw) -> DatasetInfo:
    from .text import DEFAULT_BLOCK_SIZE, MILTON_BYTES, SPLIT_BYTES, VOCAB_SIZE, num_blocks

    _check_kwargs("shakespeare", kw, _TEXT_KW)
    t = int(kw.get("block_size", DEFAULT_BLOCK_SIZE))
    stride = t if kw.get("stride") is None else int(kw["stride"])
    if t < 1 or stride < 1:
        raise ConfigError(f"shakespeare block_size and stride must be >= 1, got {t} and {stride}")
    train = SPLIT_BYTES["train"] + (MILTON_BYTES if kw.get("milton") else 0)
    return DatasetInfo("shakespeare", VOCAB_SIZE, (t,), (), (), num_blocks(train, t, stride),
                       num_blocks(SPLIT_BYTES["test"], t, t), task="causal-lm", vocab_size=VOCAB_SIZE,
                       block_size=t, val_size=num_blocks(SPLIT_BYTES["val"], t, t))


def _shakespeare_build(split, *, root=None, download=True, augment=None, normalize=True, **kw):
    from .text import load_split

    info = _shakespeare_info(**kw)
    if augment not in (None, False):
        raise ConfigError("shakespeare (byte tokens) has no augmentation; leave augment as None or False")
    folder = _locate("shakespeare", root, download)
    return load_split(folder, split, block_size=info.block_size, stride=kw.get("stride"),
                      milton=bool(kw.get("milton", False)), info=info)


DATASETS.register("fashion-mnist", DatasetSpec(_FMNIST, _idx_builder(_FMNIST)))
DATASETS.register("mnist", DatasetSpec(_MNIST, _idx_builder(_MNIST)))
DATASETS.register("cifar10", DatasetSpec(_CIFAR10, _cifar_builder(_CIFAR10)))
DATASETS.register("cifar100", DatasetSpec(_CIFAR100, _cifar_builder(_CIFAR100)))
DATASETS.register("imagenet", DatasetSpec(_IMAGENET, _imagenet_build))
DATASETS.register("synthetic", DatasetSpec(_synthetic_info(), _synthetic_build, _synthetic_info))
DATASETS.register("shakespeare", DatasetSpec(_shakespeare_info(), _shakespeare_build, _shakespeare_info,
                                             splits=("train", "val", "test")))


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def dataset_info(name: str, **kw) -> DatasetInfo:
    """Static :class:`DatasetInfo` for ``name`` (``synthetic`` also accepts its generation kwargs)."""
    spec: DatasetSpec = DATASETS.get(name)
    if kw:
        if spec.info_fn is None:
            raise ConfigError(f"dataset_info('{name}') takes no options, got {', '.join(sorted(kw))}")
        return spec.info_fn(**kw)
    return spec.info


_SPLITS = {"train": "train", "test": "test", "val": "test"}


def get_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    download: bool = True,
    augment=None,
    normalize: bool = True,
    **kw,
):
    """Load split ``train`` or ``test`` (``val`` is an alias, except for datasets with their own val split) of
    dataset ``name``.

    Returns an ArrayDataset (fashion-mnist, mnist, cifar10, cifar100, synthetic: in memory, with
    vectorised ``get_batch``), an ImageFolderDataset (imagenet) or a TokenBlocks (shakespeare: splits
    train/val/test by work, byte tokens, ``(x, y)`` int64 blocks; kwargs ``block_size`` (128), ``stride``
    (train only; default block_size), ``milton`` (add Milton to train); see :mod:`prunekit.data.text`).
    Image samples are float32 (C, H, W),
    normalised with the dataset's standard mean/std unless ``normalize=False`` (then in [0, 1]);
    labels int64. ``augment=None`` means the standard train augmentation on the train split
    (CIFAR: random crop 32 pad 4 + flip; ImageNet: random-resized-crop + flip; MNISTs: none) and
    none on test; ``False`` disables it; ``True`` forces it. Missing files are fetched when
    ``download`` (see :func:`prunekit.data.fetch`). ``seed`` (kwarg) seeds the augmentation.
    """
    spec: DatasetSpec = DATASETS.get(name)
    if spec.splits is not None:
        if split not in spec.splits:
            raise ConfigError(f"dataset '{name}' has splits {', '.join(spec.splits)}; got {split!r}")
    elif split not in _SPLITS:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    else:
        split = _SPLITS[split]
    return spec.build(split, root=root, download=download, augment=augment, normalize=normalize, **kw)
