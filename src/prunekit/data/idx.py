"""IDX files (MNIST, Fashion-MNIST), gzipped or not, strictly validated.

Format: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), the number of dims, then each dim as a big-endian uint32, then the data row-major
and big-endian. The file length must match the header exactly.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError

__all__ = ["idx_path", "load_idx_split", "read_idx", "write_idx"]

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(v).newbyteorder("=") if v.itemsize > 1 else v: k for k, v in IDX_TYPES.items()}


def _read_maybe_gzip(path: Path) -> tuple[bytearray, bool]:
    """File contents, transparently gunzipped (detected by magic bytes, not by the name)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    if data[:2] != b"\x1f\x8b":
        return bytearray(data), False
    try:
        return bytearray(gzip.decompress(data)), True
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile (CRC/length) is an OSError
        raise DatasetError(f"{path}: corrupted or truncated gzip data ({e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into a native-endian numpy array of the header's shape.

    Raises DatasetError naming the file on a bad magic number, a truncated header, or a data
    length that does not match the header dims (truncated or trailing bytes).
    """
    path = Path(path)
    raw, gz = _read_maybe_gzip(path)
    what = "decompressed data" if gz else "file"
    if len(raw) < 4:
        raise DatasetError(f"{path}: {what} is {len(raw)} bytes, too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{bytes(raw[:4]).hex()} (expected 0x0000 + a type code "
            "08/09/0b/0c/0d/0e + number of dims); not an IDX file"
        )
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: {what} ends inside the IDX header ({len(raw)} < {header} bytes)")
    dims = struct.unpack(f">{ndim}I", bytes(raw[4:header]))
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: IDX header dims {tuple(dims)} need {expected} bytes but the {what} has "
            f"{len(raw)} ({problem})"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def write_idx(path: str | os.PathLike, arr: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``arr`` as IDX (gzipped when ``compress`` or the name ends in .gz). Used by tests/tools."""
    path = Path(path)
    arr = np.asarray(arr)
    key = arr.dtype.newbyteorder("=") if arr.dtype.itemsize > 1 else arr.dtype
    if key not in _CODES:
        raise ValueError(f"dtype {arr.dtype} has no IDX type code")
    code = _CODES[key]
    body = struct.pack(f">BBBB{arr.ndim}I", 0, 0, code, arr.ndim, *arr.shape)
    body += np.ascontiguousarray(arr, dtype=IDX_TYPES[code]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


def idx_path(root: Path, base: str) -> Path:
    """``root/base`` if present (uncompressed is faster), else ``root/base.gz``."""
    for cand in (root / base, root / (base + ".gz")):
        if cand.is_file():
            return cand
    raise DatasetError(f"{root}: missing IDX file {base} (or {base}.gz)")


_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_CACHE_SIZE = 4


def _file_key(p: Path) -> tuple:
    st = p.stat()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def load_idx_split(root: str | os.PathLike, split: str, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``train`` (train-*) or ``test`` (t10k-*) from an MNIST-style folder.

    Returns images uint8 (N, 1, H, W) and labels int64 (N,), after checking image/label counts
    agree and labels are in [0, num_classes). Results are cached per (file, mtime, size), read-only
    shared: callers must not modify them in place.
    """
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    img_p = idx_path(root, f"{prefix}-images-idx3-ubyte")
    lab_p = idx_path(root, f"{prefix}-labels-idx1-ubyte")
    key = (_file_key(img_p), _file_key(lab_p), num_classes)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    images = read_idx(img_p)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{img_p}: expected uint8 images of shape (N, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    labels = read_idx(lab_p)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{lab_p}: expected integer labels of shape (N,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{lab_p}: has {labels.shape[0]} labels but {img_p.name} has {images.shape[0]} images"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DatasetError(f"{lab_p}: label {bad} out of range [0, {num_classes})")
    out = (torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out
