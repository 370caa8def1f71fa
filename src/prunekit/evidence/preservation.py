"""Feature-map preservation: how closely a pruned / merged model reproduces the original, input by input.

Neuron Merging's claim (abstract; docs/neuron-merging.md) is that "compared to the pruned model with the same topology,
our merged model better preserves the output feature map of the original model". This module measures
that for any pair of models (pruned by any method) on the same inputs:

* **per-layer relative L2** ``‖A_pruned − A_orig‖_F / ‖A_orig‖_F`` at every module output that keeps its
  shape (matched by module name, call order and shape; A stacks the outputs of all M inputs);
* **output relative L2** of the logits, the same quantity for the model output (M, C);
* **WARE** of the logits (see :func:`ware_terms`);
* **agreement**: % of inputs whose top-1 class is the same for both models;
* **KL**: mean over inputs of ``KL(softmax(z_orig) ‖ softmax(z_pruned))`` in nats.

All in eval mode, under ``no_grad``, batched; nothing is kept but running sums (the original's
activations of one batch are cloned until the pruned model has produced its own).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..metrics import _model_device_dtype
from ..runtime import capture, eval_mode
from ..tasks import model_logits

__all__ = ["feature_preservation", "ware_terms"]


def ware_terms(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Per-entry terms of the Weighted Average Reconstruction Error, (M, N) float64.

    Neuron Merging (Kim et al., NeurIPS 2020) measures how well the pruned / merged network preserves the
    original output with WARE, which it takes from NISP (Yu et al., CVPR 2018, "NISP: Pruning Networks
    using Neuron Importance Score Propagation", its evaluation metric):

        WARE = (1 / (M·N)) · Σ_{m=1..M} Σ_{i=1..N} s_i · |ŷ_{i,m} − y_{i,m}| / |y_{i,m}|

    M inputs, N neurons of the compared response, y / ŷ the original / pruned response of neuron i on
    input m, s_i the importance of neuron i. Neuron Merging applies it to the network output: the official
    repository's ``ResNet.ware(x)`` returns the logits; we therefore take the logits (N = classes) with
    uniform importance s_i = 1 (every class counts the same). Caveat: the section of the Neuron Merging
    paper that uses WARE could not be retrieved (its WARE values are unconfirmed), so the section number
    is not cited and s_i = 1 is our reading, not a quotation.
    Terms with ŷ = y are 0 (also where y = 0); y = 0 ≠ ŷ gives an infinite term, as the formula does.

    original, pruned: (M, N) logits. Returns |ŷ − y| / |y| with those conventions; WARE is its mean.
    """
    y, yh = original.to(torch.float64), pruned.to(torch.float64)
    diff = (yh - y).abs()
    return torch.where(diff == 0, torch.zeros_like(diff), diff / y.abs())


@dataclass
class _Sums:
    """Running sums of one comparison (float64 scalars as Python floats)."""

    samples: int = 0
    out_sq_diff: float = 0.0
    out_sq_ref: float = 0.0
    ware: float = 0.0
    ware_count: int = 0
    agree: int = 0
    kl: float = 0.0
    layers: dict[str, list[float]] = field(default_factory=dict)  # key -> [Σ diff², Σ ref²]


def _relative(sq_diff: float, sq_ref: float) -> float:
    if sq_diff == 0.0:
        return 0.0
    return (sq_diff / sq_ref) ** 0.5 if sq_ref > 0 else float("inf")


@contextmanager
def _hooks(model: nn.Module, fn: Callable[[str, torch.Tensor], Any]) -> Iterator[None]:
    """For one forward pass: call ``fn(key, output)`` for every tensor output of every named submodule
    (not the root), at the moment the module returns (before a later in-place op can change it).

    ``key`` is the module name, with ``#k`` appended for its k-th extra call (a module reused twice,
    e.g. one ReLU object). Built on :func:`prunekit.runtime.capture`, one module each.
    """
    def at_call(name: str) -> Callable[[torch.Tensor], None]:
        calls = 0

        def seen(out: torch.Tensor) -> None:
            nonlocal calls
            fn(name if calls == 0 else f"{name}#{calls}", out)
            calls += 1
        return seen

    with ExitStack() as stack:
        for name, _m in model.named_modules():
            if name:
                stack.enter_context(capture(model, [name], what="output", every_call=True, transform=at_call(name)))
        yield


def _shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every hooked point, in call order."""
    shapes: dict[str, tuple[int, ...]] = {}
    with _hooks(model, lambda key, out: shapes.setdefault(key, tuple(out.shape[1:]))):
        model(x)
    return shapes


def _batches(data: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Input tensors from a tensor (N, ...), a dataset (``get_batch`` or a torch Dataset) or an iterable of
    batches (a tensor, or a tuple/list whose first item is the inputs)."""
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i: i + batch_size]
        return
    if hasattr(data, "get_batch") or isinstance(data, torch.utils.data.Dataset):
        from ..data import make_loader

        data = make_loader(data, batch_size, shuffle=False, rank=0, world_size=1)
    if not isinstance(data, Iterable):
        raise ConfigError(f"feature_preservation needs inputs as a tensor, a dataset or an iterable of batches, "
                          f"got {type(data).__name__}")
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"feature_preservation: a batch's inputs must be a tensor, got {type(x).__name__}")
        yield x


def _accumulate(sums: _Sums, z_orig: torch.Tensor, z_pruned: torch.Tensor) -> None:
    if z_orig.shape != z_pruned.shape or z_orig.dim() != 2:
        raise ConfigError(f"the two models' outputs must both be (batch, classes) logits of one shape, got "
                          f"{tuple(z_orig.shape)} and {tuple(z_pruned.shape)}")
    y, yh = z_orig.to(torch.float64), z_pruned.to(torch.float64)
    sums.samples += y.shape[0]
    sums.out_sq_diff += float((yh - y).pow(2).sum())
    sums.out_sq_ref += float(y.pow(2).sum())
    terms = ware_terms(y, yh)
    sums.ware += float(terms.sum())
    sums.ware_count += terms.numel()
    sums.agree += int((y.argmax(1) == yh.argmax(1)).sum())
    logp, logq = F.log_softmax(y, dim=1), F.log_softmax(yh, dim=1)
    sums.kl += float((logp.exp() * (logp - logq)).sum())


def feature_preservation(original: nn.Module, pruned: nn.Module, data: Any, *, max_samples: int | None = None,
                         batch_size: int = 256, device: str | torch.device | None = None) -> dict[str, Any]:
    """Compare ``pruned`` with ``original`` on the first ``max_samples`` inputs of ``data`` (None: all).

    ``data``: inputs (N, ...) tensor, a dataset (labels are never read) or an iterable of batches. Both
    models must map a batch to (batch, classes) logits. Per-layer points are the named submodules whose
    per-sample output shape is the same in both models (checked on the first input); the others (pruned
    widths, modules missing in one model) are skipped and counted. Models are moved to ``device`` (default:
    the original's) and back; their train/eval flags are restored.

    Returns (JSON-ready) ``{"samples": M, "output_relative_l2": ‖Z_p − Z_o‖_F/‖Z_o‖_F, "ware": WARE of the
    logits (:func:`ware_terms`), "agreement": top-1 match %, "kl": mean KL(softmax(z_o) ‖ softmax(z_p))
    in nats, "layers": [{"name", "relative_l2"}] in the original's call order, "layers_skipped": count}``.
    """
    if max_samples is not None and int(max_samples) < 1:
        raise ConfigError(f"max_samples must be >= 1 (or None for all inputs), got {max_samples}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dev_o, _ = _model_device_dtype(original)
    dev_p, _ = _model_device_dtype(pruned)
    dev = torch.device(device) if device is not None else dev_o
    original.to(dev)
    pruned.to(dev)
    sums = _Sums()
    skipped = 0
    try:
        with eval_mode(original, pruned):
            points: list[str] | None = None
            for x in _batches(data, int(batch_size)):
                if max_samples is not None:
                    x = x[: int(max_samples) - sums.samples]
                if x.shape[0] == 0:
                    break
                x = x.to(dev)
                if points is None:
                    ref, other = _shapes(original, x[:1]), _shapes(pruned, x[:1])
                    points = [k for k, s in ref.items() if other.get(k) == s]
                    sums.layers = {k: [0.0, 0.0] for k in points}
                    skipped = len(ref) - len(points)
                _compare_batch(original, pruned, x, sums)
                if max_samples is not None and sums.samples >= int(max_samples):
                    break
    finally:
        original.to(dev_o)
        pruned.to(dev_p)
    if sums.samples == 0:
        raise ConfigError("feature_preservation: the data yielded no inputs")
    return {
        "samples": sums.samples,
        "output_relative_l2": _relative(sums.out_sq_diff, sums.out_sq_ref),
        "ware": sums.ware / sums.ware_count,
        "agreement": 100.0 * sums.agree / sums.samples,
        "kl": sums.kl / sums.samples,
        "layers": [{"name": k, "relative_l2": _relative(*v)} for k, v in sums.layers.items()],
        "layers_skipped": skipped,
    }


def _compare_batch(original: nn.Module, pruned: nn.Module, x: torch.Tensor, sums: _Sums) -> None:
    """One batch: run the original (cloning its outputs at the matched points), then the pruned model
    (accumulating Σ(a_p − a_o)² and Σ a_o² at once, before any in-place op can change the output)."""
    stored: dict[str, torch.Tensor] = {}

    def keep(key: str, out: torch.Tensor) -> None:
        if key in sums.layers:
            stored[key] = out.detach().clone()

    def compare(key: str, out: torch.Tensor) -> None:
        ref = stored.pop(key, None)
        if ref is not None:
            acc = sums.layers[key]
            acc[0] += float((out.to(torch.float64) - ref.to(torch.float64)).pow(2).sum())
            acc[1] += float(ref.to(torch.float64).pow(2).sum())

    with _hooks(original, keep):
        z_orig = model_logits(original(x))
    with _hooks(pruned, compare):
        z_pruned = model_logits(pruned(x))
    if not isinstance(z_orig, torch.Tensor) or not isinstance(z_pruned, torch.Tensor):
        raise ConfigError("feature_preservation needs models whose output is a logits tensor (or has .logits)")
    if z_orig.dim() > 2:  # token models: every position is a prediction
        z_orig, z_pruned = z_orig.flatten(0, -2), z_pruned.flatten(0, -2)
    _accumulate(sums, z_orig, z_pruned)
