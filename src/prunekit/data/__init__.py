"""Datasets, deterministic augmentation and DDP-consistent loaders.

Entry points:
    list_datasets(), dataset_info(name)          static facts (classes, input shape, mean/std, sizes)
    get_dataset(name, split, root=..., ...)      a torch Dataset of normalised float32 (C, H, W) samples
                                                 (shakespeare: TokenBlocks of byte-token (x, y) blocks)
    make_loader(dataset, batch_size, shuffle=...) batches whose order/augmentation depend only on
                                                 (seed, epoch), identical across resumes and ranks
    resolve_root(name, root), fetch(name, root)  find the files / obtain them (verified download; apt on request)
"""
from .base import ArrayDataset
from .cifar import RestrictedUnpickler, load_cifar_split, load_pickle
from .folder import IMG_EXTENSIONS, ImageFolderDataset
from .idx import load_idx_split, read_idx, write_idx
from .loader import Loader, epoch_permutation, make_loader, shard_indices
from .registry import DATASETS, DatasetInfo, DatasetSpec, dataset_info, get_dataset, list_datasets
from .roots import LAYOUTS, cache_dir, download, fetch, resolve_root, safe_extract_tar, search_locations
from .synthetic import make_synthetic
from .text import TokenBlocks
from .transforms import BatchAugment, RandomCropFlip, mix_seed, seeded_generator

__all__ = [
    "DATASETS",
    "IMG_EXTENSIONS",
    "LAYOUTS",
    "ArrayDataset",
    "BatchAugment",
    "DatasetInfo",
    "DatasetSpec",
    "ImageFolderDataset",
    "Loader",
    "RandomCropFlip",
    "RestrictedUnpickler",
    "TokenBlocks",
    "cache_dir",
    "dataset_info",
    "download",
    "epoch_permutation",
    "fetch",
    "get_dataset",
    "list_datasets",
    "load_cifar_split",
    "load_idx_split",
    "load_pickle",
    "make_loader",
    "make_synthetic",
    "mix_seed",
    "read_idx",
    "resolve_root",
    "safe_extract_tar",
    "search_locations",
    "seeded_generator",
    "shard_indices",
    "write_idx",
]
