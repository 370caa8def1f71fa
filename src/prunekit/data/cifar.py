"""CIFAR-10 / CIFAR-100 "python version" batches, read with a restricted unpickler.

The official files are Python 2 pickles (protocol 2) of dicts with byte-string keys:
``b'data'`` uint8 (N, 3072), each row the R, G, B planes of a 32×32 image in row-major order, and
``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100) lists of ints. Pickles can run arbitrary
code, so :class:`RestrictedUnpickler` resolves only the few globals numpy array reconstruction needs
and refuses everything else with a DatasetError naming the file and the global.
"""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError

__all__ = ["CIFAR_FILES", "RestrictedUnpickler", "load_cifar_split", "load_pickle"]


def _reconstruct():
    core = getattr(np, "_core", None)  # numpy >= 2
    if core is None:  # pragma: no cover - numpy 1.x
        core = np.core
    return core.multiarray._reconstruct


def _latin1_encode(obj, encoding="latin1"):
    """Stand-in for ``_codecs.encode`` restricted to what protocol-2 pickles use it for.

    Python 3 writes ``bytes`` at protocol 2 as ``_codecs.encode(text, 'latin1')``; nothing else is
    accepted, so the global cannot be used for anything but re-creating a byte string.
    """
    if not isinstance(obj, str) or str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return obj.encode("latin-1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy array reconstruction globals (and latin-1 byte strings).

    Loads with ``encoding="bytes"`` because the files were written by Python 2: their ``str`` keys
    come back as ``bytes``.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    })

    def __init__(self, file, *, source: str | os.PathLike = "<pickle>"):
        super().__init__(file, encoding="bytes")
        self.source = str(source)

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DatasetError(
                f"{self.source}: refusing to unpickle forbidden global '{module}.{name}'; a CIFAR batch only "
                "needs numpy array reconstruction, so this file is not a CIFAR batch or was tampered with"
            )
        if name == "_reconstruct":
            return _reconstruct()
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid):
        raise DatasetError(f"{self.source}: refusing pickle persistent id {pid!r}")


def load_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Load one CIFAR pickle safely; returns its dict with keys decoded to ``str``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, source=path).load()
    except DatasetError:
        raise
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # truncated/garbled pickles raise many different exception types
        raise DatasetError(
            f"{path}: not a readable CIFAR pickle, probably truncated or corrupted ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _arrays(path: Path, d: dict[str, Any], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    for key in ("data", label_key):
        if key not in d:
            raise DatasetError(f"{path}: CIFAR batch is missing key '{key}' (has: {', '.join(sorted(d)) or 'none'})")
    data = d["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise DatasetError(f"{path}: 'data' should be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(d[label_key])
    except Exception as e:
        raise DatasetError(f"{path}: '{label_key}' is not a list of ints ({e})") from e
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(f"{path}: '{label_key}' should be a list of ints, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {labels.shape[0]} labels in '{label_key}' but {data.shape[0]} images in 'data'")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DatasetError(f"{path}: label {bad} in '{label_key}' out of range [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# variant -> (train files, test files, label key, meta file, class-name key, num classes)
CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "batches.meta", "label_names", 10),
    "cifar100": (["train"], ["test"], "fine_labels", "meta", "fine_label_names", 100),
}

_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, list[str] | None]] = OrderedDict()
_CACHE_SIZE = 4


def load_cifar_split(root: str | os.PathLike, variant: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """Load a split from a ``cifar-10-batches-py`` / ``cifar-100-python`` folder.

    Returns images uint8 (N, 3, 32, 32), labels int64 (N,) and the class names from the meta file
    (None when it is absent). Cached per (files, mtimes, sizes); do not modify the tensors in place.
    """
    root = Path(root)
    train_files, test_files, label_key, meta_name, names_key, num_classes = CIFAR_FILES[variant]
    paths = [root / f for f in (train_files if split == "train" else test_files)]
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{root}: missing CIFAR file {p.name}")
    meta = root / meta_name
    key = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size)
                for p in paths + ([meta] if meta.is_file() else []))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    datas, labels = [], []
    for p in paths:
        x, y = _arrays(p, load_pickle(p), label_key, num_classes)
        datas.append(x)
        labels.append(y)
    classes = None
    if meta.is_file():
        m = load_pickle(meta)
        names = m.get(names_key)
        if not isinstance(names, (list, tuple)) or len(names) != num_classes:
            raise DatasetError(f"{meta}: '{names_key}' should list {num_classes} class names")
        classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(datas)))
    out = (images, torch.from_numpy(np.concatenate(labels)), classes)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out
