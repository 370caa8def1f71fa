"""Per-input-column statistics of consumer layers on calibration inputs, in one streamed pass.

Wanda-sp and FLAP score a structure (a head, an MLP neuron) by the input columns it owns in its
consumer (the attention output projection, the MLP down projection). Both need, per input column ``j``
of each consumer, statistics of ``X_j`` — the consumer's input over every calibration position (token,
pixel):

* ``norm``  ``‖X_j‖₂ = sqrt(Σ_t x_tj²)``                      (Wanda: ``|W_ij| · ‖X_j‖₂``)
* ``mean``  ``x̄_j = Σ_t x_tj / n``                           (FLAP's baseline for bias compensation)
* ``var``   ``Σ_t (x_tj − x̄_j)² / (n − 1)``, unbiased         (FLAP's fluctuation)

They are accumulated per batch in float64 (batch mean and centred sum of squares, merged with Chan et
al.'s pairwise update, so a large mean does not cancel the variance), so memory is one batch of
activations plus three vectors per consumer. The inputs come from
:func:`prunekit.compensate.calibration.calibration_inputs` / :func:`~prunekit.compensate.calibration.batches`
and the hooks from :func:`prunekit.runtime.capture` (one capture per consumer, every call counted).

A consumer is a ``Linear``-like layer (``nn.Linear``, ``transformers``' ``Conv1D``: columns on the
input's last dim) or a convolution with ``groups == 1`` (columns = input channels, positions = batch ×
space). When a batch is a dict with an ``attention_mask`` (B, T) and a consumer's input is (B, T, I),
padded positions are left out.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..compensate.calibration import batches
from ..engine.rules import ConvRule, LinearRule, find_rule
from ..errors import ConfigError
from ..runtime import as_inputs, capture, eval_mode, without_kv_cache

__all__ = ["InputStats", "column_dim", "input_statistics"]


def column_dim(module: nn.Module) -> int | None:
    """The dim of ``module``'s input that holds its input columns (-1: Linear-like, 1: conv with
    ``groups == 1``), or None when the baselines cannot read it as a consumer."""
    rule = find_rule(type(module))
    if isinstance(rule, LinearRule):
        return -1
    if isinstance(rule, ConvRule) and getattr(module, "groups", 1) == 1:
        return 1
    return None


@dataclass
class InputStats:
    """Statistics of one consumer's input columns over ``n`` positions (float64, on the CPU after
    :func:`input_statistics`)."""

    n: int
    mean: torch.Tensor  # (I,)
    m2: torch.Tensor  # (I,) Σ (x − mean)²
    sumsq: torch.Tensor  # (I,) Σ x²

    @property
    def norm(self) -> torch.Tensor:
        """``‖X_j‖₂`` over all positions."""
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance per column (0 with fewer than 2 positions)."""
        return self.m2 / (self.n - 1) if self.n > 1 else torch.zeros_like(self.m2)

    @classmethod
    def of(cls, rows: torch.Tensor) -> InputStats:
        """Statistics of ``rows`` (positions × columns)."""
        x = rows.double()
        mean = x.mean(0) if len(x) else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        return cls(len(x), mean, ((x - mean) ** 2).sum(0), (x * x).sum(0))

    def merge(self, other: InputStats) -> InputStats:
        """The statistics of both position sets together (Chan et al. 1979)."""
        n = self.n + other.n
        if not other.n:
            return self
        if not self.n:
            return other
        delta = other.mean - self.mean
        return InputStats(n, self.mean + delta * (other.n / n),
                          self.m2 + other.m2 + delta * delta * (self.n * other.n / n), self.sumsq + other.sumsq)

    def cpu(self) -> InputStats:
        return InputStats(self.n, self.mean.cpu(), self.m2.cpu(), self.sumsq.cpu())


def _rows(x: torch.Tensor, dim: int, mask: torch.Tensor | None) -> torch.Tensor:
    """(positions, columns) of one captured input; padded tokens dropped when ``mask`` fits."""
    if dim == -1:
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(x.device).bool()]
        return x.reshape(-1, x.shape[-1])
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, dict):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def input_statistics(model: nn.Module, names: Iterable[str], inputs: Any, *, batch_size: int = 8
                     ) -> dict[str, InputStats]:
    """:class:`InputStats` of every consumer in ``names`` over all ``inputs`` (a tensor or a dict of
    tensors, batched along dim 0 — e.g. from :func:`~prunekit.compensate.calibration.calibration_inputs`),
    in one forward pass per batch. Raises :class:`ConfigError` naming consumers that are not
    Linear-like / ungrouped convs, or that the inputs never reach."""
    names = list(dict.fromkeys(names))
    dims = {}
    for name in names:
        dim = column_dim(model.get_submodule(name))
        if dim is None:
            raise ConfigError(f"'{name}' ({type(model.get_submodule(name)).__name__}) is not a Linear-like layer or "
                              "an ungrouped convolution: its input columns cannot be measured")
        dims[name] = dim
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next((p.device for p in model.parameters()), None)
    stats: dict[str, InputStats] = {}
    state: dict[str, Any] = {"mask": None}

    def accumulate(name: str):
        def add(x: torch.Tensor) -> None:
            s = InputStats.of(_rows(x.detach(), dims[name], state["mask"]))
            stats[name] = stats[name].merge(s) if name in stats else s
        return add

    with eval_mode(model):
        for xb in batches(inputs, batch_size):
            xb = _to(xb, device)
            state["mask"] = xb.get("attention_mask") if isinstance(xb, dict) else None
            args, kwargs = as_inputs(xb)
            with contextlib.ExitStack() as stack:
                for name in names:  # one capture per consumer: each streams into its own statistics
                    stack.enter_context(capture(model, [name], every_call=True, transform=accumulate(name)))
                model(*args, **without_kv_cache(model, args, kwargs))
    missing = [n for n in names if n not in stats]
    if missing:
        raise ConfigError(f"the calibration inputs never reach {missing}: their input statistics are undefined")
    return {n: s.cpu() for n, s in stats.items()}
