"""Model checkpoints: ``model.safetensors`` (the state dict) + ``model.json`` (what to rebuild).

``model.json`` holds the format version, ``arch`` = ``{"name", "config"}`` (from
``prunekit.models.arch_of`` / ``model.prunekit_arch``) so the model can be rebuilt with
``prunekit.models.create``; ``null`` for a model outside the zoo, which then reloads into a dense
instance given with ``load_model(path, model=...)``), free-form ``metadata`` (training info,
accuracy, ...), ``tied`` (groups of state-dict keys that were one tensor, e.g. a language model's
head sharing its embedding weight; they are re-tied on load), and optional
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
from .legacy import LEGACY_SUFFIXES, import_state_dict, read_legacy, strip_module_prefix
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
_RESERVED = {
    "format", "format_version", "prunekit_version", "arch", "metadata", "state_keys", "safetensors", "tied",
}
_LOAD_HOOKS: dict[str, Callable[[nn.Module, Any], nn.Module]] = {}

__all__ = [
    "MODEL_FORMAT", "apply_state_dict", "find_tied", "load_model", "register_load_hook", "save_model",
    "tie_parameters",
]


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


# --------------------------------------------------------------------------------------------
# Tied (shared) parameters
# --------------------------------------------------------------------------------------------


def find_tied(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one ``nn.Parameter`` object (each group ≥ 2 names, in
    ``named_parameters`` order), e.g. ``[["transformer.wte.weight", "lm_head.weight"]]`` for GPT-2."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _resolve(model: nn.Module, key: str) -> tuple[nn.Module, str, dict]:
    """``"a.b.weight"`` → (module ``a.b``, ``"weight"``, the module's ``_parameters`` or ``_buffers``)."""
    mod_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} has no module '{mod_name}' (for '{key}')") from None
    for store in (module._parameters, module._buffers):
        if store.get(attr) is not None:
            return module, attr, store
    raise ConfigError(f"'{key}' is not a parameter or buffer of {type(model).__name__}")


def tie_parameters(model: nn.Module, groups: list[list[str]]) -> nn.Module:
    """Make each group of names one tensor: every module attribute named by a group's keys
    (parameter / state-dict names such as ``"lm_head.weight"``) is set to the SAME object as the
    group's first key (its ``nn.Parameter``; a buffer when the first names a buffer). The others'
    values are dropped, so compare them first where that matters. Raises ConfigError for an
    unknown name, a parameter grouped with a buffer, or differing shapes/dtypes.
    Returns ``model``, modified in place."""
    for group in groups:
        group = list(group)
        if len(group) < 2:
            continue
        mod0, attr0, store0 = _resolve(model, group[0])
        first = store0[attr0]
        for key in group[1:]:
            module, attr, store = _resolve(model, key)
            t = store[attr]
            if t is first:
                continue
            if (store is module._parameters) != (store0 is mod0._parameters):
                raise ConfigError(f"cannot tie '{key}' to '{group[0]}': one is a parameter, the other a buffer")
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ConfigError(f"cannot tie '{key}' ({tuple(t.shape)}, {t.dtype}) to '{group[0]}' "
                                  f"({tuple(first.shape)}, {first.dtype})")
            if store is module._parameters:
                setattr(module, attr, first)
            else:
                store[attr] = first  # keeps the buffer's persistence
    return model


def _untie(model: nn.Module, keys: list[str]) -> None:
    """Give each of ``keys`` its own copy of the tensor it currently shares."""
    for key in keys:
        module, attr, store = _resolve(model, key)
        t = store[attr]
        if store is module._parameters:
            setattr(module, attr, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
        else:
            store[attr] = t.detach().clone()


def _shared_state_keys(model: nn.Module, sd: dict[str, Any]) -> list[list[str]]:
    """Groups of ``sd`` keys (``state_dict(keep_vars=True)``) holding one tensor: the same object or
    the same memory (data pointer, shape, stride, dtype); only keys naming a parameter or buffer."""
    groups: dict[tuple, list[str]] = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.numel() and t.layout == torch.strided and t.device.type != "meta":
            sig: tuple = ("mem", str(t.device), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        else:
            sig = ("id", id(t))
        groups.setdefault(sig, []).append(k)
    out = []
    for g in groups.values():
        named = []
        for k in g:
            try:
                _resolve(model, k)
            except ConfigError:
                continue
            named.append(k)
        if len(named) > 1:
            out.append(named)
    return out


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals itself) of two tensors of one shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.numel():
        return True
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


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

    Any ``nn.Module`` can be saved: one outside prunekit's zoo gets ``"arch": null`` and reloads
    with ``load_model(path, model=<dense instance>)``. Tied tensors (one tensor under several
    state-dict keys, e.g. GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``) are written under
    every key and listed in ``model.json`` as ``"tied"`` groups, which :func:`load_model` re-ties.
    """
    arch = _arch_of(model)
    extra = dict(extra or {})
    record = getattr(model, "prunekit_record", None)
    if record is not None and "prune_record" not in extra:
        extra["prune_record"] = record.to_dict()
    if clash := sorted(set(extra) & _RESERVED):
        raise ConfigError(f"extra keys {clash} are reserved model.json fields")
    sd = model.state_dict(keep_vars=True)
    tied = _shared_state_keys(model, sd)
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
        "tied": tied,
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
    model: nn.Module | None = None,
    model_name: str | None = None,
    model_config: dict | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
) -> tuple[nn.Module, dict]:
    """Load a model saved by :func:`save_model`, or a legacy ``.pth``/``.pth.tar``/``.pt`` file.

    ``path``: a directory holding model.{safetensors,json}, either file of a pair, a stem, or a
    legacy file. For our format the model is rebuilt from the recorded ``arch``
    (``model_name``/``model_config`` override it), load hooks run (e.g. ``prune_record`` replay,
    which resizes modules), then weights load and the recorded ``tied`` groups are re-tied (one
    ``nn.Parameter`` per group; their saved values must agree). Legacy files need ``model_name``;
    official key names are mapped by :func:`import_state_dict`.

    ``model``: instead of building one, use this instance of the model's dense (unpruned)
    architecture, e.g. a Hugging Face model or any ``nn.Module`` outside prunekit's zoo (its
    weights, pretrained or not, are overwritten). It is MODIFIED IN PLACE (resized by the load
    hooks, loaded, re-tied, moved to ``map_location``) and returned; it wins over a recorded
    ``arch`` and cannot be combined with ``model_name``/``model_config``. For a legacy file its keys
    only lose ``module.`` prefixes.

    Returns ``(model, info)``: ``info`` has ``format``, ``path``, ``arch`` and ``metadata`` plus the
    JSON extras (ours) or the checkpoint's other top-level entries such as ``acc`` (legacy).
    """
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model= must be an nn.Module instance, got {type(model).__name__}")
        if model_name is not None or model_config is not None:
            raise ConfigError("pass either model= (a dense instance) or model_name=/model_config=, not both")
    p = Path(path)
    legacy = p.is_file() and p.suffix not in (".json", ".safetensors")
    if not legacy and not p.exists() and p.suffix in LEGACY_SUFFIXES:
        raise CheckpointError(f"{p}: no such file")
    if legacy:
        model, info = _load_legacy(p, model, model_name, model_config, strict, allow_nonfinite)
    else:
        model, info = _load_ours(_model_stem(p), model, model_name, model_config, strict, allow_nonfinite)
    return model.to(map_location), info


def _tied_record(doc: dict, keys: list[str], json_path) -> list[list[str]] | None:
    tied = doc.get("tied")
    if tied is None:
        return None
    known = set(keys)
    if not isinstance(tied, list) or not all(
        isinstance(g, list) and all(isinstance(k, str) and k in known for k in g) for g in tied
    ):
        raise CheckpointError(f"{json_path}: corrupt 'tied' record (expected lists of state keys): {tied!r:.200}")
    return tied


def _plan_ties(model: nn.Module, sd: dict[str, torch.Tensor], recorded: list[list[str]] | None,
               json_path) -> list[list[str]]:
    """Before the weights load: the groups to tie after loading (checked: equal saved values), with
    every tie of ``model`` between checkpoint keys that the checkpoint does not have broken (so no
    key's values overwrite another's). Ties to keys the checkpoint lacks are left alone."""
    own = model.state_dict(keep_vars=True)
    current = [[k for k in g if k in sd] for g in _shared_state_keys(model, own)]
    if recorded is None:  # written before ties were recorded: keep the model's ties the values allow
        recorded = [g for g in current if all(_same_values(sd[g[0]], sd[k]) for k in g)]
    want = []
    for g in recorded:
        g = [k for k in g if k in own and k in sd]
        if len(g) < 2:
            continue
        for k in g[1:]:
            if not _same_values(sd[g[0]], sd[k]):
                raise CheckpointError(f"{json_path}: '{k}' is recorded as tied to '{g[0]}' but their saved "
                                      "values differ")
        want.append(g)
    target = {k: i for i, g in enumerate(want) for k in g}
    for g in current:
        anchor = target.get(g[0], g[0]) if g else None
        _untie(model, [k for k in g[1:] if target.get(k, k) != anchor])
    return want


def _load_ours(stem, model, model_name, model_config, strict, allow_nonfinite):
    doc, tensors, json_path = read_pair(stem, expect_format=MODEL_FORMAT)
    keys = doc.get("state_keys")
    if not isinstance(keys, list) or set(keys) != set(tensors):
        extra = sorted(set(tensors) - set(keys or []))
        lacking = sorted(set(keys or []) - set(tensors))
        raise CheckpointError(
            f"{json_path}: does not match its safetensors file (keys only in the tensors: {extra[:5]}, "
            f"only in the JSON: {lacking[:5]})"
        )
    recorded_ties = _tied_record(doc, keys, json_path)
    arch = doc.get("arch") or {}
    if model is not None:
        name, config = None, {}
    else:
        name = model_name or arch.get("name")
        if not name:
            raise CheckpointError(
                f"{json_path}: no architecture recorded; pass the model name (--model / model_name=) or, "
                "for a model outside prunekit's zoo, a dense instance of it: load_model(path, model=MyModel())"
            )
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
    try:
        ties = _plan_ties(model, sd, recorded_ties, json_path)
    except ConfigError as e:
        raise CheckpointError(f"{json_path}: cannot restore tied weights: {e}") from e
    missing, unexpected = apply_state_dict(
        model, sd, source=str(json_path), strict=strict, allow_nonfinite=allow_nonfinite, hint=hint
    )
    try:
        tie_parameters(model, ties)
    except ConfigError as e:
        raise CheckpointError(f"{json_path}: cannot restore tied weights: {e}") from e
    info = {
        **extras,
        "format": "prunekit",
        "path": str(json_path),
        "arch": _arch_of(model) or ({"name": name, "config": config} if name else None),
        "metadata": decode_json_value(doc.get("metadata") or {}, "metadata"),
        "tied": ties,
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


def _load_legacy(path: Path, model, model_name, model_config, strict, allow_nonfinite):
    sd, extras = read_legacy(path)
    config = dict(model_config or {})
    if model is not None:
        sd = strip_module_prefix(sd)
    elif not model_name:
        raise CheckpointError(
            f"{path}: legacy checkpoint without architecture information; pass the model name "
            "(--model NAME / model_name=...) or a dense instance (model=...)"
        )
    else:
        model = _make(model_name, config, path)
        sd = import_state_dict(model_name, sd, model)
    missing, unexpected = apply_state_dict(
        model, sd, source=str(path), strict=strict, allow_nonfinite=allow_nonfinite
    )
    info = {
        **extras,
        "format": "legacy",
        "path": str(path),
        "arch": _arch_of(model) or ({"name": model_name, "config": config} if model_name else None),
        "metadata": {},
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    }
    return model, info
