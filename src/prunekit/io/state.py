"""Pickle-free checkpoints of nested training state: ``<stem>.safetensors`` + ``<stem>.json``.

A "state" is a nested structure of dicts, lists and tuples whose leaves are tensors, numpy arrays
or JSON scalars: an optimizer / LR-scheduler ``state_dict()``, RNG states, epoch counters, ...
Tensors go to one safetensors file under flattened dotted keys (``optimizer.state.0.exp_avg``);
the JSON file holds the structure with every tensor replaced by a reference to its key. What
JSON cannot say natively is tagged with a ``"__pk__"`` marker so it comes back with the same type:
int (or other non-str) dict keys, tuples, Counter/OrderedDict, non-finite floats, numpy scalars
and arrays, bytes.

Crash safety: both files are written to temporary names in the target directory and moved in
place with ``os.replace``; the safetensors first, the JSON last. The JSON is the commit marker:
it records a random save id and the sha256 of the safetensors file, so a pair from two different
saves, a missing JSON, or a truncated/altered tensor file is detected and raises
:class:`~prunekit.errors.CheckpointError` instead of returning garbage. With fixed file names
two files cannot be replaced atomically together: an overwrite first removes the old JSON, so a
crash between the renames leaves *that* stem reading as "incomplete" (never silently wrong, but
its previous contents are gone); other stems are never touched. Keep e.g. ``last`` and
``epoch_N`` stems if the previous checkpoint must survive a crash.

Nothing here unpickles anything.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError

TAG = "__pk__"
STATE_FORMAT = "prunekit-state"
FORMAT_VERSION = 1
_ID_KEY = "prunekit_save_id"

__all__ = ["load_state", "nonfinite_tensors", "save_state", "split_stem"]


# --------------------------------------------------------------------------------------------
# Encoding a nested structure
# --------------------------------------------------------------------------------------------


class _Encoder:
    """Turns a nested structure into JSON-able data; tensors are collected into ``self.tensors``."""

    def __init__(self, *, allow_tensors: bool = True):
        self.allow_tensors = allow_tensors
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[str, int]] = set()

    # Tensors ---------------------------------------------------------------------------------
    def add_tensor(self, name: str, t: torch.Tensor, where: str) -> str:
        """Store ``t`` (detached, CPU, contiguous, unshared) under a unique key derived from ``name``."""
        if not self.allow_tensors:
            raise ConfigError(f"{where}: tensors are not allowed here (use .tolist() or .item())")
        if t.layout != torch.strided:
            raise ConfigError(f"{where}: {t.layout} tensors cannot be saved; call .to_dense() first")
        t = t.detach().cpu().contiguous()
        if t.numel() > 0:
            # safetensors refuses tensors sharing storage (tied weights, views): clone the later ones.
            sid = (str(t.device), t.untyped_storage().data_ptr())
            if sid in self._storages:
                t = t.clone()
                sid = (str(t.device), t.untyped_storage().data_ptr())
            self._storages.add(sid)
        key, n = name or "tensor", 1
        while key in self.tensors:
            n += 1
            key = f"{name or 'tensor'}#{n}"
        self.tensors[key] = t
        return key

    # Tree ------------------------------------------------------------------------------------
    def encode(self, obj: Any, path: str = "") -> Any:
        where = path or "<root>"
        if isinstance(obj, np.generic):  # before float: np.float64 subclasses float
            return {TAG: "npscalar", "dtype": obj.dtype.str, "v": self.encode(obj.item(), path)}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)
            return {TAG: "float", "v": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if isinstance(obj, torch.Tensor):
            return {TAG: "tensor", "key": self.add_tensor(path, obj, where)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise ConfigError(f"{where}: numpy arrays of Python objects cannot be saved")
            arr = np.ascontiguousarray(obj)
            try:
                t = torch.from_numpy(arr)
            except TypeError:  # dtype torch lacks: keep the raw bytes under a same-size int type
                t = torch.from_numpy(arr.view(f"i{arr.dtype.itemsize}"))
            return {TAG: "ndarray", "key": self.add_tensor(path, t, where), "dtype": arr.dtype.str}
        if isinstance(obj, (bytes, bytearray)):
            return {TAG: "bytes", "b64": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, torch.Size):
            return {TAG: "size", "items": list(obj)}
        if isinstance(obj, tuple):
            return {TAG: "tuple", "items": [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            cls = _DICT_CLASSES.get(type(obj))  # Counter (MultiStepLR milestones), OrderedDict
            plain = all(isinstance(k, str) for k in obj) and TAG not in obj
            if plain:
                mapping = {k: self.encode(v, _join(path, k)) for k, v in obj.items()}
                return mapping if cls is None else {TAG: "dict", "cls": cls, "map": mapping}
            keys = _Encoder(allow_tensors=False)
            node = {
                TAG: "dict",
                "items": [[keys.encode(k, where), self.encode(v, _join(path, k))] for k, v in obj.items()],
            }
            if cls is not None:
                node["cls"] = cls
            return node
        raise ConfigError(
            f"{where}: cannot save a value of type {type(obj).__module__}.{type(obj).__qualname__}; "
            "only dict/list/tuple containers and tensor, ndarray, str, int, float, bool, None, bytes leaves"
        )


_DICT_CLASSES = {collections.Counter: "Counter", collections.OrderedDict: "OrderedDict"}
_DICT_BY_NAME = {v: k for k, v in _DICT_CLASSES.items()}


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor], used: set[str], where: str) -> Any:
    """:func:`_decode`, with malformed JSON nodes reported as CheckpointError."""
    try:
        return _decode(obj, tensors, used, where)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: corrupt JSON structure ({type(e).__name__}: {e})") from e


def _decode(obj: Any, tensors: dict[str, torch.Tensor], used: set[str], where: str) -> Any:
    """Inverse of :meth:`_Encoder.encode`; ``used`` collects the tensor keys referenced."""
    if isinstance(obj, list):
        return [_decode(v, tensors, used, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors, used, where) for k, v in obj.items()}
    if tag in ("tensor", "ndarray"):
        key = obj.get("key")
        if key not in tensors:
            raise CheckpointError(f"{where}: the JSON refers to tensor '{key}' which its safetensors file lacks")
        used.add(key)
        t = tensors[key]
        if tag == "tensor":
            return t
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject:
            raise CheckpointError(f"{where}: refusing numpy object dtype for tensor '{key}'")
        arr = t.numpy()
        return arr.view(dtype).copy() if arr.dtype != dtype else arr.copy()
    if tag == "float":
        return float(obj["v"])
    if tag == "npscalar":
        return np.dtype(obj["dtype"]).type(_decode(obj["v"], tensors, used, where))
    if tag == "bytes":
        return base64.b64decode(obj["b64"])
    if tag == "size":
        return torch.Size(obj["items"])
    if tag == "tuple":
        return tuple(_decode(v, tensors, used, where) for v in obj["items"])
    if tag == "dict":
        if "map" in obj:
            d = {k: _decode(v, tensors, used, where) for k, v in obj["map"].items()}
        else:
            d = {_freeze(_decode(k, tensors, used, where)): _decode(v, tensors, used, where) for k, v in obj["items"]}
        cls = obj.get("cls")
        if cls is None:
            return d
        if cls not in _DICT_BY_NAME:
            raise CheckpointError(f"{where}: unknown dict class '{cls}' in the JSON")
        return _DICT_BY_NAME[cls](d)
    raise CheckpointError(f"{where}: unknown tag '{tag}' in the JSON (written by a newer prunekit?)")


def _freeze(key: Any) -> Any:
    return tuple(_freeze(k) for k in key) if isinstance(key, (list, tuple)) else key


def encode_json_value(obj: Any, where: str) -> Any:
    """Encode plain data (no tensors) for a JSON field, preserving tuples, int keys and inf/nan."""
    return _Encoder(allow_tensors=False).encode(obj, where)


def decode_json_value(obj: Any, where: str) -> Any:
    return decode_tree(obj, {}, set(), where)


# --------------------------------------------------------------------------------------------
# The file pair
# --------------------------------------------------------------------------------------------


def split_stem(path: str | os.PathLike) -> Path:
    """``x.json`` / ``x.safetensors`` / ``x`` → ``x`` (other suffixes such as ``.epoch3`` are kept)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix("")
    return p


def _paths(stem: Path) -> tuple[Path, Path]:
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json")


def _commit(tmp: Path, final: Path) -> None:
    """Atomically move ``tmp`` onto ``final`` (separate function so tests can simulate a crash)."""
    os.replace(tmp, final)


def _write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_pair(stem: str | os.PathLike, tensors: dict[str, torch.Tensor], doc: dict) -> Path:
    """Write ``tensors`` and ``doc`` as ``<stem>.safetensors`` then ``<stem>.json``, atomically each.

    ``doc`` gets a ``"safetensors"`` entry (file name, save id, size, sha256) binding the two files.
    """
    import safetensors.torch

    stem = split_stem(stem)
    sft_path, json_path = _paths(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    try:
        data = safetensors.torch.save(tensors, metadata={_ID_KEY: save_id})
    except Exception as e:  # dtype safetensors lacks, ...
        raise CheckpointError(f"{sft_path}: cannot serialise tensors: {e}") from e
    doc = dict(doc)
    doc["safetensors"] = {
        "file": sft_path.name,
        "save_id": save_id,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{json_path}: metadata is not JSON-serialisable: {e}") from e

    tmp_sft = stem.parent / f".{sft_path.name}.tmp-{save_id}"
    tmp_json = stem.parent / f".{json_path.name}.tmp-{save_id}"
    try:
        _write_bytes_synced(tmp_sft, data)
        _write_bytes_synced(tmp_json, text.encode("utf-8"))
        # Remove the old commit marker first: during the window below the stem reads as
        # "incomplete" rather than as an old JSON paired with new tensors.
        if json_path.exists():
            json_path.unlink()
        _commit(tmp_sft, sft_path)
        _commit(tmp_json, json_path)
    finally:
        for tmp in (tmp_sft, tmp_json):
            if tmp.exists():
                tmp.unlink()
    _fsync_dir(stem.parent)
    return stem


def _safetensors_header(data: bytes, where: Path) -> dict:
    if len(data) < 8:
        raise CheckpointError(f"{where}: truncated safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CheckpointError(f"{where}: corrupt or truncated safetensors header (claims {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header")
    return header


def read_pair(stem: str | os.PathLike, *, expect_format: str) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """Read and cross-check a pair written by :func:`write_pair`. Returns (doc, tensors, json_path)."""
    import safetensors.torch

    stem = split_stem(stem)
    sft_path, json_path = _paths(stem)
    if not json_path.is_file():
        if sft_path.is_file():
            raise CheckpointError(
                f"{json_path}: missing, but {sft_path.name} exists: the checkpoint is incomplete "
                "(the JSON is written last, so the save was probably interrupted)"
            )
        raise CheckpointError(
            f"{stem}: no such checkpoint (neither {json_path.name} nor {sft_path.name} exists)"
        )
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{json_path}: corrupt JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != expect_format:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{json_path}: not a {expect_format} checkpoint (format: {got!r})")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: format version {doc.get('format_version')} is newer than this prunekit "
            f"reads ({FORMAT_VERSION}); upgrade prunekit"
        )
    info = doc.get("safetensors")
    if not isinstance(info, dict) or not {"save_id", "bytes", "sha256"} <= set(info):
        raise CheckpointError(f"{json_path}: corrupt JSON: no 'safetensors' record")
    if not sft_path.is_file():
        raise CheckpointError(f"{sft_path}: missing (its JSON {json_path.name} exists)")

    data = sft_path.read_bytes()
    header = _safetensors_header(data, sft_path)
    file_id = (header.get("__metadata__") or {}).get(_ID_KEY)
    if file_id != info["save_id"]:
        raise CheckpointError(
            f"{json_path}: does not match {sft_path.name}: they come from different saves "
            f"(save id {info['save_id']} vs {file_id}); an interrupted save or files copied separately"
        )
    if len(data) != info["bytes"]:
        raise CheckpointError(
            f"{sft_path}: truncated or altered: {len(data)} bytes, its JSON says {info['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CheckpointError(f"{sft_path}: corrupt: sha256 does not match the one recorded in {json_path.name}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:
        raise CheckpointError(f"{sft_path}: corrupt safetensors file: {e}") from e
    return doc, tensors, json_path


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating/complex tensors holding NaN or ±Inf."""
    bad = []
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def nonfinite_error(where: Path | str, bad: list[str]) -> CheckpointError:
    shown = ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
    return CheckpointError(
        f"{where}: NaN/Inf values in {len(bad)} tensor(s): {shown}. "
        "The run probably diverged; pass allow_nonfinite=True to load it anyway"
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def save_state(stem: str | os.PathLike, state: Any) -> Path:
    """Save a nested training state to ``<stem>.safetensors`` + ``<stem>.json``; returns the stem.

    Round-trips ``Optimizer.state_dict()`` (int keys, param-id lists, betas tuples, 0-d ``step``
    tensors), LR-scheduler state dicts (``inf`` floats included), ``random.getstate()``,
    ``torch.get_rng_state()`` and ``numpy.random.get_state()``. Tensors are saved detached, on
    CPU, contiguous; tensors sharing storage are cloned (safetensors refuses shared storage), so
    aliasing between leaves is not restored.
    """
    enc = _Encoder()
    tree = enc.encode(state)
    doc = {"format": STATE_FORMAT, "format_version": FORMAT_VERSION, "tree": tree}
    return write_pair(stem, enc.tensors, doc)


def load_state(
    stem: str | os.PathLike, *, map_location: str | torch.device = "cpu", allow_nonfinite: bool = False
) -> Any:
    """Load what :func:`save_state` wrote (the ``.json``/``.safetensors`` suffix may be given).

    Raises CheckpointError for a missing, half-written, mismatched or corrupt pair, and for NaN/Inf
    in a floating tensor unless ``allow_nonfinite``.
    """
    doc, tensors, json_path = read_pair(stem, expect_format=STATE_FORMAT)
    if not allow_nonfinite and (bad := nonfinite_tensors(tensors)):
        raise nonfinite_error(json_path, bad)
    if torch.device(map_location).type != "cpu":
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    used: set[str] = set()
    state = decode_tree(doc.get("tree"), tensors, used, str(json_path))
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(
            f"{json_path}: does not match its safetensors file: unreferenced tensors {unused[:5]}"
        )
    return state
