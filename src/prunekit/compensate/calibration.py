"""Unlabeled calibration inputs, and the module activations compensation methods read from them.

Inputs keep their type: float images, int64 token ids, or dicts of tensors (``input_ids``,
``attention_mask``) pass through unchanged; a batch of them is sliced along dim 0.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..runtime import call, capture


def n_inputs(data: Any) -> int:
    """How many inputs ``data`` holds (a tensor's or a dict's batch size, or ``len``)."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, dict):
        sizes = {k: v.shape[0] for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"calibration dict: tensors disagree on the batch size ({sizes})")
        return next(iter(sizes.values()))
    try:
        return len(data)
    except TypeError:
        raise ConfigError(f"calibration data must be a tensor, a dict of tensors or a dataset with len(), got "
                          f"{type(data).__name__}") from None


def take(batch: Any, idx: torch.Tensor | slice) -> Any:
    """Rows ``idx`` of a tensor or of every tensor of a dict (other dict values are passed through)."""
    if isinstance(batch, dict):
        return {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch[idx]


def calibration_inputs(data: Any, n: int, seed: int = 0) -> Any:
    """``n`` inputs (labels dropped) from a tensor, a dict of tensors, an ``ArrayDataset`` (vectorised
    ``get_batch``) or any map-style dataset of ``(x, y)`` / ``x`` samples: a seeded random subset without
    replacement, in index order. Dtypes are kept."""
    total = n_inputs(data)
    if total < 1:
        raise ConfigError("the calibration data is empty")
    if n > total:
        raise ConfigError(f"asked for {n} calibration inputs, the data has {total}")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
    if isinstance(data, (torch.Tensor, dict)):
        return take(data, idx)
    if hasattr(data, "get_batch"):
        x, _ = data.get_batch(idx, epoch=0)
        return x
    samples = [data[int(i)] for i in idx]
    xs = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
    if isinstance(xs[0], dict):
        return {k: torch.stack([torch.as_tensor(x[k]) for x in xs]) for k in xs[0]}
    return torch.stack([torch.as_tensor(x) for x in xs])


def batches(inputs: Any, batch_size: int) -> Iterator[Any]:
    """Consecutive batches of at most ``batch_size`` inputs."""
    total = n_inputs(inputs)
    for start in range(0, total, batch_size):
        yield take(inputs, slice(start, start + batch_size))


def call_order(model: nn.Module, inputs: Any) -> dict[str, int]:
    """``{module name: rank of its first call}`` in one forward pass on ``inputs``."""
    names = [n for n, _ in model.named_modules() if n]
    with capture(model, names, transform=lambda t: None) as seen:
        call(model, inputs)
    return {name: i for i, name in enumerate(seen.values)}


def output_positions(model: nn.Module, names: list[str], inputs: Any) -> dict[str, int]:
    """``{module: output positions per sample}`` on one input: H_out·W_out for a convolution or BatchNorm
    (channels on dim 1), the token positions for a Linear-like layer (channels last); 1 for a flat output."""
    with capture(model, names, what="output") as seen, torch.no_grad():
        call(model, take(inputs, slice(0, 1)))
    out = {}
    for name, y in seen.values.items():
        module = model.get_submodule(name)
        dim = 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase)) else -1
        out[name] = max(1, y.numel() // (y.shape[0] * y.shape[dim])) if y.dim() > 1 else 1
    return out


def module_inputs(model: nn.Module, names: list[str], inputs: Any) -> dict[str, torch.Tensor]:
    """The first input tensor of each module in ``names`` on ``inputs``; the pass stops after the last
    of them. Raises ConfigError naming modules that were never called."""
    with capture(model, names, stop=True) as seen:
        call(model, inputs)
    if missing := seen.missing(names):
        raise ConfigError(f"modules {missing} were not called in the forward pass")
    return dict(seen.values)
