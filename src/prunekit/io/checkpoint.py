"""Model checkpoints: ``model.safetensors`` (the state dict) + ``model.json`` (what to rebuild).

``model.json`` holds the format version, ``arch`` = ``{"name", "config"}`` (from
``prunekit.models.arch_of`` / ``model.prunekit_arch``) so the model can be rebuilt with
``prunekit.models.create``, free-form ``metadata`` (training info, accuracy, ...), and optional
extra top-level records such as ``prune_record``. Extras are consumed on load by hooks
registered with :func:`register_load_hook`: a pruned model has a different shape from the zoo
model, and the pruning engine's hook reshapes the freshly built model before weights load.

:func:`load_model` also reads legacy torch pickles (safely, see :mod:`prunekit.io.legacy`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import CheckpointError, ConfigError
from .legacy import LEGACY_SUFFIXES, import_state_dict, read_legacy
from .state import (
    FORMAT_VERSION,
    decode_json_value,
    encode_json_value,
    nonfinite_error,
    nonfinite_tensors,
    read_pair,
    split_stem,
    write_pair,
)

MODEL_FORMAT = "prunekit-model"
MODEL_STEM = "model"
_RESERVED = {"format", "format_version", "prunekit_version", "arch", "metadata", "state_keys", "safetensors"}
_LOAD_HOOKS: dict[str, Callable[[nn.Module, Any], nn.Module]] = {}

__all__ = ["MODEL_FORMAT", "apply_state_dict", "load_model", "register_load_hook", "save_model"]


def register_load_hook(key: str, fn: Callable[[nn.Module, Any], nn.Module]) -> None:
    """On :func:`load_model`, when ``model.json`` has a top-level ``key``, do
    ``model = fn(model, value)`` after building the model and before loading the weights."""
    if key in _RESERVED:
        raise ConfigError(f"'{key}' is a reserved model.json field; pick another hook key")
    _LOAD_HOOKS[key] = fn


def _arch_of(model: nn.Module) -> dict | None:
    arch = getattr(model, "prunekit_arch", None)
    if arch is None:
        try:
            from ..models import arch_of
        except ImportError:
            return None
        try:
            arch = arch_of(model)
        except ConfigError:  # not a zoo model
            return None
    if arch is None:
        return None
    if not isinstance(arch, dict) or "name" not in arch:
        raise ConfigError(f"model architecture record must be {{'name': ..., 'config': {{...}}}}, got {arch!r}")
    return {"name": arch["name"], "config": dict(arch.get("config") or {})}


def _build_model(name: str, config: dict) -> nn.Module:
    """Build a zoo model (indirection so tests can substitute their own factory)."""
    from ..models import create

    return create(name, **config)


def _model_stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        return p / MODEL_STEM
    return split_stem(p)


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    metadata: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Save ``model`` to ``<dir>/model.{safetensors,json}`` (``path`` a directory, existing or
    ending in ``/``) or to ``<stem>.{safetensors,json}``. Returns the stem written.

    ``metadata`` and ``extra`` values must be plain data (no tensors); ``extra`` keys become
    top-level JSON records (e.g. ``{"prune_record": {...}}``) handed to load hooks. A pruned model
    (one carrying ``prunekit_record``) has its record saved as ``prune_record`` automatically, so it
    reloads without the code that pruned it.
    """
    arch = _arch_of(model)
    extra = dict(extra or {})
    record = getattr(model, "prunekit_record", None)
    if record is not None and "prune_record" not in extra:
        extra["prune_record"] = record.to_dict()
    if clash := sorted(set(extra) & _RESERVED):
        raise ConfigError(f"extra keys {clash} are reserved model.json fields")
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in sd.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        tensors[k] = t
    doc = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "prunekit_version": __version__,
        "arch": arch,
        "metadata": encode_json_value(metadata or {}, "metadata"),
        "state_keys": list(sd),
    }
    for k, v in extra.items():
        doc[k] = encode_json_value(v, k)
    return write_pair(_model_stem(path), tensors, doc)


def _preview(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def apply_state_dict(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    source: str,
    strict: bool = True,
    allow_nonfinite: bool = False,
    hint: str = "",
) -> tuple[list[str], list[str]]:
    """Validate ``sd`` against ``model`` and load it. Returns (missing, unexpected) keys.

    ``num_batches_tracked`` buffers missing from the checkpoint are filled from the model (old
    torch versions did not save them) and ones the model lacks are dropped. Missing/unexpected
    keys raise when ``strict``; shape mismatches and NaN/Inf (unless ``allow_nonfinite``) always.
    """
    own = model.state_dict()
    sd = dict(sd)
    for k in list(sd):
        if k.endswith("num_batches_tracked") and k not in own:
            del sd[k]
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v.detach().clone()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        raise CheckpointError(f"{source}: does not fit the model: {'; '.join(parts)}{hint}")
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if shapes:
        raise CheckpointError(f"{source}: shape mismatch in {len(shapes)} tensor(s): {_preview(shapes)}{hint}")
    if not allow_nonfinite and (bad := nonfinite_tensors(sd)):
        raise nonfinite_error(source, bad)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return missing, unexpected


def load_model(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_config: dict | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
) -> tuple[nn.Module, dict]:
    """Load a model saved by :func:`save_model`, or a legacy ``.pth``/``.pth.tar``/``.pt`` file.

    ``path``: a directory holding model.{safetensors,json}, either file of a pair, a stem, or a
    legacy file. For our format the model is rebuilt from the recorded ``arch``
    (``model_name``/``model_config`` override it), load hooks run, then weights load. Legacy files
    need ``model_name``; official key names are mapped by :func:`import_state_dict`.
    Returns ``(model, info)``: ``info`` has ``format``, ``path``, ``arch`` and ``metadata`` plus the
    JSON extras (ours) or the checkpoint's other top-level entries such as ``acc`` (legacy).
    """
    p = Path(path)
    legacy = p.is_file() and p.suffix not in (".json", ".safetensors")
    if not legacy and not p.exists() and p.suffix in LEGACY_SUFFIXES:
        raise CheckpointError(f"{p}: no such file")
    if legacy:
        model, info = _load_legacy(p, model_name, model_config, strict, allow_nonfinite)
    else:
        model, info = _load_ours(_model_stem(p), model_name, model_config, strict, allow_nonfinite)
    return model.to(map_location), info


def _load_ours(stem, model_name, model_config, strict, allow_nonfinite):
    doc, tensors, json_path = read_pair(stem, expect_format=MODEL_FORMAT)
    keys = doc.get("state_keys")
    if not isinstance(keys, list) or set(keys) != set(tensors):
        extra = sorted(set(tensors) - set(keys or []))
        lacking = sorted(set(keys or []) - set(tensors))
        raise CheckpointError(
            f"{json_path}: does not match its safetensors file (keys only in the tensors: {extra[:5]}, "
            f"only in the JSON: {lacking[:5]})"
        )
    arch = doc.get("arch") or {}
    name = model_name or arch.get("name")
    if not name:
        raise CheckpointError(f"{json_path}: no architecture recorded; pass the model name (--model / model_name=)")
    config = dict(arch.get("config") or {}) if name == arch.get("name") else {}
    config.update(model_config or {})
    model = _make(name, config, json_path)

    extras = {k: decode_json_value(v, k) for k, v in doc.items() if k not in _RESERVED}
    for key, fn in _LOAD_HOOKS.items():
        if key in extras:
            model = fn(model, extras[key])
    unhooked = [k for k in extras if k not in _LOAD_HOOKS]
    hint = (
        f" (the checkpoint also carries {unhooked}, for which no load hook is registered: "
        "import the module that handles it)"
        if unhooked
        else ""
    )
    sd = {k: tensors[k] for k in keys}
    missing, unexpected = apply_state_dict(
        model, sd, source=str(json_path), strict=strict, allow_nonfinite=allow_nonfinite, hint=hint
    )
    info = {
        **extras,
        "format": "prunekit",
        "path": str(json_path),
        "arch": _arch_of(model) or {"name": name, "config": config},
        "metadata": decode_json_value(doc.get("metadata") or {}, "metadata"),
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }
    return model, info


def _make(name: str, config: dict, source) -> nn.Module:
    try:
        return _build_model(name, config)
    except ImportError as e:
        raise CheckpointError(f"{source}: cannot build model '{name}': the model zoo is unavailable ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{source}: cannot build model '{name}' with config {config}: {e}") from e


def _load_legacy(path: Path, model_name, model_config, strict, allow_nonfinite):
    sd, extras = read_legacy(path)
    if not model_name:
        raise CheckpointError(
            f"{path}: legacy checkpoint without architecture information; pass the model name "
            "(--model NAME / model_name=...)"
        )
    config = dict(model_config or {})
    model = _make(model_name, config, path)
    sd = import_state_dict(model_name, sd, model)
    missing, unexpected = apply_state_dict(
        model, sd, source=str(path), strict=strict, allow_nonfinite=allow_nonfinite
    )
    info = {
        **extras,
        "format": "legacy",
        "path": str(path),
        "arch": _arch_of(model) or {"name": model_name, "config": config},
        "metadata": {},
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }
    return model, info
