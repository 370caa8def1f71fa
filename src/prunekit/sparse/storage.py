"""Compact storage of unstructured sparsity: ``sparse.safetensors`` + ``sparse.json``.

Every tensor of the state dict is stored in the smallest of three layouts (bytes of data plus
~64 bytes of safetensors header per extra key):

* ``dense``:   the tensor itself;
* ``bitmask``: ``mask`` (uint8, ⌈numel/8⌉ bytes, bit ``i`` of the row-major flat index, little-endian
  bit order) + ``values`` (the nonzeros in row-major order);
* ``csr``:     the tensor viewed as (shape[0], numel/shape[0]) (1-D: (1, numel)); ``crow`` (rows+1),
  ``col`` (nnz) with the smallest index dtype that fits (uint8, int16, int32, int64) + ``values``.

"Zero" means ``== 0`` (like :func:`prunekit.metrics.sparsity`; masking by multiplication leaves many
``-0.0``), so a round trip is bit-exact except that ``-0.0`` comes back as ``+0.0`` (equal under ``==``;
outputs can differ at most in the sign of an exact-zero output). The JSON
holds the architecture and ``prune_record`` (so the model is rebuilt like ``load_model`` does), and
per tensor its layout, shape, dtype and nonzero count; the pair is written and cross-checked by
:mod:`prunekit.io.state` (save id, size, sha256). Malformed content raises CheckpointError naming
the tensor.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..engine import replay
from ..engine.surgery import record_of
from ..errors import CheckpointError, ConfigError
from ..io import apply_state_dict
from ..io.state import FORMAT_VERSION, read_pair, split_stem, write_pair

__all__ = ["SPARSE_FORMAT", "SPARSE_STEM", "decode_state", "encode_state", "encode_tensor", "load_sparse",
           "save_sparse"]

SPARSE_FORMAT = "prunekit-sparse-model"
SPARSE_STEM = "sparse"
KEY_OVERHEAD = 64  # approximate safetensors header bytes per stored key
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_FIELDS = {"dense": ("",), "bitmask": ("mask", "values"), "csr": ("crow", "col", "values")}


def index_dtype(max_value: int) -> torch.dtype:
    """Smallest signed-or-uint8 integer dtype holding ``0 … max_value``."""
    for dt in _INDEX_DTYPES:
        if max_value <= torch.iinfo(dt).max:
            return dt
    raise ConfigError(f"index {max_value} does not fit in int64")


def _nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """True where the element is not ``== 0`` (NaN and ±Inf are values; ``-0.0`` is a zero)."""
    return t != 0


def _matrix(shape: torch.Size) -> tuple[int, int]:
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def _bitmask_bytes(numel: int, nnz: int, itemsize: int) -> int:
    return (numel + 7) // 8 + nnz * itemsize + KEY_OVERHEAD


def _csr_bytes(shape: torch.Size, nnz: int, itemsize: int) -> int:
    rows, cols = _matrix(shape)
    return ((rows + 1) * index_dtype(nnz).itemsize + nnz * (index_dtype(max(cols - 1, 0)).itemsize + itemsize)
            + 2 * KEY_OVERHEAD)


def encode_tensor(name: str, t: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(entry, tensors)`` for one state-dict tensor in its smallest layout (module docstring)."""
    t = t.detach().cpu().contiguous()
    entry = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.numel() == 0 or t.dtype == torch.bool:
        return {**entry, "layout": "dense", "nnz": int(t.count_nonzero())}, {name: t}
    mask = _nonzero_mask(t)
    nnz, item = int(mask.sum()), t.element_size()
    entry["nnz"] = nnz
    sizes = {"dense": t.numel() * item, "bitmask": _bitmask_bytes(t.numel(), nnz, item),
             "csr": _csr_bytes(t.shape, nnz, item)}
    layout = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    entry["layout"] = layout
    if layout == "dense":
        return entry, {name: t}
    flat, fmask = t.reshape(-1), mask.reshape(-1)
    values = flat[fmask].contiguous()
    if layout == "bitmask":
        bits = np.packbits(fmask.numpy(), bitorder="little")
        return entry, {f"{name}::mask": torch.from_numpy(bits), f"{name}::values": values}
    rows, cols = _matrix(t.shape)
    m = fmask.view(rows, cols)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = m.sum(1).cumsum(0)
    col = m.nonzero()[:, 1]
    return entry, {f"{name}::crow": crow.to(index_dtype(nnz)), f"{name}::col": col.to(index_dtype(max(cols - 1, 0))),
                   f"{name}::values": values}


def encode_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Encode a whole state dict: ``(entries by name, tensors to write)``."""
    entries, tensors = {}, {}
    for name, t in state.items():
        if "::" in name:
            raise ConfigError(f"state key '{name}' contains '::', which the sparse layout reserves")
        entries[name], out = encode_tensor(name, t)
        tensors.update(out)
    return entries, tensors


def _get(tensors: dict[str, torch.Tensor], key: str, where: str, what: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{where}: tensor '{what}' lacks its part '{key}' in the safetensors file")
    return tensors[key]


def _decode_one(name: str, entry: Any, tensors: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, list[str]]:
    bad = f"{where}: tensor '{name}'"
    if not isinstance(entry, dict) or entry.get("layout") not in _FIELDS:
        raise CheckpointError(f"{bad}: unknown layout {entry.get('layout') if isinstance(entry, dict) else entry!r}")
    try:
        shape = torch.Size(int(s) for s in entry["shape"])
        dtype = getattr(torch, str(entry["dtype"]))
        nnz = int(entry["nnz"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{bad}: corrupt entry {entry!r} ({e})") from e
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{bad}: unknown dtype {entry['dtype']!r}")
    layout = entry["layout"]
    keys = [name] if layout == "dense" else [f"{name}::{f}" for f in _FIELDS[layout]]
    parts = [_get(tensors, k, where, name) for k in keys]
    if layout == "dense":
        t = parts[0]
        if t.shape != shape or t.dtype != dtype:
            raise CheckpointError(f"{bad}: stored {tuple(t.shape)} {t.dtype}, the JSON says {tuple(shape)} {dtype}")
        return t, keys
    values = parts[-1]
    if values.dtype != dtype or values.dim() != 1 or values.numel() != nnz:
        raise CheckpointError(f"{bad}: {values.numel()} stored {values.dtype} values, the JSON says {nnz} {dtype}")
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=dtype)
    if layout == "bitmask":
        packed = parts[0]
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
            raise CheckpointError(f"{bad}: bitmask has {packed.numel()} bytes, {tuple(shape)} needs {(numel + 7) // 8}")
        bits = np.unpackbits(packed.numpy(), bitorder="little")
        if bits[numel:].any() or int(bits[:numel].sum()) != nnz:
            raise CheckpointError(f"{bad}: bitmask marks {int(bits.sum())} entries, {nnz} values are stored")
        flat[torch.from_numpy(bits[:numel].astype(bool))] = values
        return flat.view(shape), keys
    crow, col = parts[0].long(), parts[1].long()
    rows, cols = _matrix(shape)
    counts = crow.diff() if crow.numel() else crow
    if (crow.numel() != rows + 1 or int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any())
            or col.numel() != nnz):
        raise CheckpointError(f"{bad}: CSR row pointers do not describe {nnz} entries in {rows} rows")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise CheckpointError(f"{bad}: CSR column index outside [0, {cols})")
    row = torch.repeat_interleave(torch.arange(rows), counts)
    flat_idx = row * cols + col
    if nnz > 1 and not bool((flat_idx.diff() > 0).all()):
        raise CheckpointError(f"{bad}: CSR columns are not strictly increasing within a row")
    flat[flat_idx] = values
    return flat.view(shape), keys


def decode_state(entries: Any, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`; every stored tensor must be referenced exactly once."""
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: corrupt JSON: 'tensors' must map state keys to layouts")
    state, used = {}, set()
    for name, entry in entries.items():
        state[name], keys = _decode_one(name, entry, tensors, where)
        used.update(keys)
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(f"{where}: does not match its safetensors file: unreferenced tensors {unused[:5]}")
    return state


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / SPARSE_STEM if p.is_dir() or str(path).endswith(("/", os.sep)) else split_stem(p)


def save_sparse(path: str | os.PathLike, model: nn.Module, *, metadata: dict | None = None,
                extra: dict | None = None) -> tuple[Path, dict[str, int]]:
    """Write ``model``'s state dict compactly to ``<dir>/sparse.{safetensors,json}`` (or ``<stem>.*``).

    The JSON records ``arch`` (``model.prunekit_arch``, may be None for non-zoo models),
    ``prune_record`` and ``metadata``; ``extra`` keys become top-level JSON fields (plain data).
    Returns ``(stem, {"bytes": safetensors file size, "layouts": {layout: tensor count}})``.
    """
    entries, tensors = encode_state(model.state_dict())
    record = record_of(model)
    arch = getattr(model, "prunekit_arch", None)
    doc = {"format": SPARSE_FORMAT, "format_version": FORMAT_VERSION, "prunekit_version": __version__,
           "arch": arch, "prune_record": record.to_dict() if record else None, "metadata": metadata or {},
           **(extra or {}), "tensors": entries}
    stem = write_pair(_stem(path), tensors, doc)
    layouts: dict[str, int] = {}
    for e in entries.values():
        layouts[e["layout"]] = layouts.get(e["layout"], 0) + 1
    return stem, {"bytes": Path(f"{stem}.safetensors").stat().st_size, "layouts": layouts}


def load_sparse(path: str | os.PathLike, *, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load what :func:`save_sparse` wrote: rebuild the recorded architecture (or take ``model``, a
    freshly built dense instance of it), replay ``prune_record``, load the decoded weights.

    Returns ``(model, doc)`` where ``doc`` is the JSON (arch, metadata, per-tensor layouts, extras).
    """
    doc, tensors, json_path = read_pair(_stem(path), expect_format=SPARSE_FORMAT)
    state = decode_state(doc.get("tensors"), tensors, str(json_path))
    if model is None:
        arch = doc.get("arch")
        if not isinstance(arch, dict) or "name" not in arch:
            raise CheckpointError(f"{json_path}: no architecture recorded; pass model= (a dense instance)")
        from ..models import create

        try:
            model = create(arch["name"], **dict(arch.get("config") or {}))
        except Exception as e:
            raise CheckpointError(f"{json_path}: cannot build model '{arch['name']}': {e}") from e
    if doc.get("prune_record"):
        replay(model, doc["prune_record"])
    apply_state_dict(model, state, source=str(json_path))
    return model, doc
