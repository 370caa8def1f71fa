"""Reading legacy ``.pth``/``.pth.tar``/``.pt`` checkpoints safely, and mapping official key names.

Legacy files are torch pickles. They are opened ONLY with
``torch.load(path, map_location="cpu", weights_only=True)``, which rebuilds tensors and plain
containers and refuses anything else (classes, functions, ``os.system`` ...). Files it refuses are
reported and never loaded.

Key mappings (official name → prunekit name), chosen by model family from the model name:

* Neuron Merging LeNet-300-100: ``ip1/ip2/ip3`` → ``fc1/fc2/fc3``.
* Neuron Merging CIFAR ResNet (option-B shortcut): ``layerK.i.downsample.{0,1}`` →
  ``layerK.i.shortcut.{0,1}``; everything else (conv1, bn1, layerK.i.conv1/bn1/conv2/bn2, fc) equal.
* Neuron Merging VGG-16: ``feature.N`` → ``features.N`` (when the model is given, the k-th conv /
  BN of theirs goes to the k-th conv / BN of ours, whatever the indices); ``classifier`` equal.
* Neuron Merging WRN (xternalz layout): ``blockK.layer.i.*`` → ``blockK.i.*``,
  ``convShortcut`` → ``shortcut``, final ``bn1`` → ``bn``.
* torchvision ResNet-50 / MobileNetV2: identity (the zoo uses torchvision's names).

Every mapping is idempotent, so a state dict already in prunekit names passes through unchanged;
the result is validated against the model by the caller.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["LEGACY_SUFFIXES", "import_state_dict", "read_legacy", "strip_module_prefix"]

LEGACY_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")


def read_legacy(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a legacy torch checkpoint with ``weights_only=True``.

    Accepts ``{'state_dict': sd, 'acc': ..., 'epoch': ...}`` (also ``model_state_dict``/``model``/
    ``net``) or a bare state dict. Returns (state_dict, other top-level entries).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch's notice about non-default pickle protocols
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        raise CheckpointError(
            f"{path}: refused: the safe loader (torch.load weights_only=True) rejected it, so it may "
            f"contain arbitrary code and was NOT loaded ({reason}). Only plain state dicts are accepted; "
            "re-save it as {'state_dict': model.state_dict()} in an environment you trust"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, ...: torch raises many types; nothing ran
        raise CheckpointError(f"{path}: corrupt, truncated or not a torch checkpoint: {e}") from None

    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            sd = obj.get(key)
            if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
                extras = {k: v for k, v in obj.items() if k != key}
                return dict(sd), extras
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj), {}
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys})")
    raise CheckpointError(f"{path}: no state dict found (the file holds a {type(obj).__name__})")


def strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefixes that (Distributed)DataParallel adds to every key."""
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Per-family key mappings
# --------------------------------------------------------------------------------------------


def _rename(sd: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def _lenet(sd, model):
    return _rename(sd, [(r"^ip(\d+)\.", r"fc\1.")])


def _cifar_resnet(sd, model):
    return _rename(sd, [(r"^(layer\d+\.\d+)\.downsample\.", r"\1.shortcut.")])


def _wrn(sd, model):
    return _rename(
        sd,
        [
            (r"^(block\d+)\.layer\.(\d+)\.", r"\1.\2."),
            (r"\.convShortcut\.", r".shortcut."),
            (r"^bn1\.", "bn."),
        ],
    )


def _vgg(sd, model):
    sd = _rename(sd, [(r"^feature\.", "features.")])
    features = getattr(model, "features", None) if model is not None else None
    if not isinstance(features, nn.Sequential):
        return sd
    # Re-index by position: their k-th conv/BN → our k-th conv/BN (robust to layout differences).
    theirs: dict[int, str] = {}
    for k in sd:
        m = re.match(r"^features\.(\d+)\.(\w+)$", k)
        if m:
            i = int(m.group(1))
            if m.group(2) in ("running_mean", "running_var", "num_batches_tracked"):
                theirs[i] = "bn"
            else:
                theirs.setdefault(i, "conv" if sd[k].dim() == 4 and m.group(2) == "weight" else "?")
    ours = {"conv": [], "bn": []}
    for name, mod in features.named_children():
        if isinstance(mod, nn.Conv2d):
            ours["conv"].append(int(name))
        elif isinstance(mod, nn.BatchNorm2d):
            ours["bn"].append(int(name))
    their = {"conv": [i for i in sorted(theirs) if theirs[i] == "conv"],
             "bn": [i for i in sorted(theirs) if theirs[i] == "bn"]}
    if any(len(their[t]) != len(ours[t]) for t in ours) or "?" in theirs.values():
        return sd  # layouts differ in count: leave names; validation reports the mismatch
    index = {a: b for t in ours for a, b in zip(their[t], ours[t])}
    out = {}
    for k, v in sd.items():
        m = re.match(r"^features\.(\d+)\.(.+)$", k)
        out[f"features.{index[int(m.group(1))]}.{m.group(2)}" if m else k] = v
    return out


def _identity(sd, model):
    return dict(sd)


# (predicate on the lower-cased model name, mapper); first match wins.
_IMPORTERS: list[tuple[Callable[[str], bool], Callable]] = [
    (lambda n: n.startswith("lenet"), _lenet),
    (lambda n: n.replace("-", "").replace("_", "") in ("resnet50", "mobilenetv2"), _identity),
    (lambda n: n.startswith("resnet"), _cifar_resnet),
    (lambda n: n.startswith("vgg"), _vgg),
    (lambda n: n.startswith(("wrn", "wide")), _wrn),
]


def import_state_dict(
    model_name: str, state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Map an official/legacy state dict of ``model_name`` to prunekit's parameter names.

    Strips ``module.`` prefixes first. ``model`` (optional) lets position-based mappings (VGG)
    follow the actual layout. Unknown families are returned unchanged (after prefix stripping).
    """
    sd = strip_module_prefix(state_dict)
    name = model_name.lower()
    for pred, fn in _IMPORTERS:
        if pred(name):
            return fn(sd, model)
    return sd
