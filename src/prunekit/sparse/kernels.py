"""Sparse CPU kernels for Linear layers, used only where they measurably beat the dense kernel.

:class:`SparseLinear` holds ``W`` (O, I) as a CSR tensor and computes ``y = (b 1ᵀ + W xᵀ)ᵀ`` with one
``torch.addmm`` (x: (N, I) → y: (N, O); leading dims are flattened). Convolutions stay dense.
:func:`choose_kernels` times every Linear layer dense vs sparse on its real input at each batch size
(:func:`prunekit.metrics.measure_latency`: median of ``runs`` forward passes, in the caller's thread
setting) and picks the sparse kernel where it is faster by ``min_speedup``.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..metrics import measure_latency
from .structured import capture_inputs

__all__ = ["SparseLinear", "choose_kernels", "with_sparse_kernels"]


def _csr(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return w.detach().to_sparse_csr()


class SparseLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` whose weight is mostly exact zeros (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", _csr(linear.weight), persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", bias.to(linear.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.addmm(self.bias[:, None], self.weight, flat.t()).t()
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def with_sparse_kernels(model: nn.Module, layers: Iterable[str]) -> nn.Module:
    """A deep copy of ``model`` with each named ``nn.Linear`` replaced by a :class:`SparseLinear`."""
    new = copy.deepcopy(model)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, SparseLinear(new.get_submodule(name)))
    return new


def choose_kernels(model: nn.Module, inputs_by_batch: dict[int, Any], *, runs: int = 20, warmup: int = 5,
                   min_speedup: float = 1.05) -> dict[int, dict[str, dict[str, Any]]]:
    """Per batch size, per Linear layer: ``{"dense_ms", "sparse_ms", "sparse": bool}``.

    ``inputs_by_batch[B]`` is a model input of batch B; each layer is timed alone on the input it
    receives in that forward. ``sparse`` is True when ``dense_ms / sparse_ms >= min_speedup``.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for batch, inputs in inputs_by_batch.items():
        seen = capture_inputs(model, set(linears), inputs)
        rows = {}
        for name, layer in linears.items():
            x = seen.get(name)
            if x is None:
                continue
            dense = measure_latency(layer, x, runs=runs, warmup=warmup).median_ms
            sparse = measure_latency(SparseLinear(layer), x, runs=runs, warmup=warmup).median_ms
            rows[name] = {"dense_ms": dense, "sparse_ms": sparse, "sparse": dense / sparse >= min_speedup}
        out[batch] = rows
    return out
