"""``sparsify``: turn a model with exact zeros (gRDA) into a smaller model, a compact file and a
measured choice of kernels.

1. :func:`sparsify` removes dead channels through the engine (:mod:`.structured`) and checks that the
   outputs did not change (eval mode, random inputs).
2. :func:`export` also writes ``DIR/model.{safetensors,json}`` (dense, reloads with
   ``prunekit.io.load_model``) and ``DIR/sparse.{safetensors,json}`` (:mod:`.storage`), reloads the
   sparse file and checks it is bit-exact, times dense vs sparse Linear kernels per batch size
   (:mod:`.kernels`) and reports sizes, MACs, bytes, latencies and, given a loader, accuracies.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..engine.errors import SurgeryError
from ..io import save_model
from ..metrics import count_macs, count_params, evaluate, layer_macs, measure_latency, sparsity
from .kernels import choose_kernels, with_sparse_kernels
from .storage import load_sparse, save_sparse
from .structured import remove_dead_channels

__all__ = ["SparsifyResult", "export", "sparsify"]


@dataclass
class SparsifyResult:
    """``model``: the dense, structurally pruned model (``prunekit_record`` when anything was removed);
    ``removed``: per group name ``{"size", "removed", "constant", "unused"}``; ``max_abs_diff``:
    largest output difference to the original on a random batch."""

    model: nn.Module
    removed: dict[str, dict[str, Any]]
    max_abs_diff: float

    @property
    def removed_total(self) -> int:
        return sum(g["removed"] for g in self.removed.values())


def _random(batch: int, input_shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max |a(x) − b(x)|, max |a(x)|), both in eval mode."""
    modes = [(m, m.training) for m in (a, b)]
    try:
        with torch.no_grad():
            ya, yb = a.eval()(x), b.eval()(x)
    finally:
        for m, flag in modes:
            m.train(flag)
    return float((ya - yb).abs().max()), float(ya.abs().max())


def sparsify(model: nn.Module, input_shape: Sequence[int], *, probe_batch: int = 16, seed: int = 0,
             rtol: float = 1e-5) -> SparsifyResult:
    """Remove the dead channels of ``model`` (left untouched) for inputs of shape (N, *input_shape).

    Raises :class:`~prunekit.engine.SurgeryError` when the outputs on a fresh random batch differ by
    more than ``rtol · max(1, max|y|)``.
    """
    example = torch.zeros(1, *input_shape)
    pruned, removed = remove_dead_channels(model, example, _random(probe_batch, input_shape, seed))
    diff, scale = _max_diff(model, pruned, _random(probe_batch, input_shape, seed + 1))
    if diff > rtol * max(1.0, scale):
        raise SurgeryError(f"removing dead channels changed the outputs by {diff:.3g} (max |y| = {scale:.3g})")
    return SparsifyResult(pruned, removed, diff)


def _stats(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    every, weights = sparsity(model, kinds=None, modules=None), sparsity(model)
    macs = layer_macs(model, input_shape=tuple(input_shape))
    density = {t.name.removesuffix(".weight"): 1 - t.fraction for t in weights.tensors}
    return {"params": count_params(model), "macs": count_macs(model, input_shape=tuple(input_shape)),
            "macs_nonzero": round(sum(v * density.get(k, 1.0) for k, v in macs.items())),
            "nonzeros": every.all_numel - every.all_zeros, "sparsity": every.all_fraction,
            "weight_sparsity": weights.fraction}


def _dense_bytes(model: nn.Module) -> int:
    return len(safetensors.torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}))


def export(model: nn.Module, out_dir: str | Path, *, input_shape: Sequence[int],
           batch_sizes: Iterable[int] = (1, 32, 256), runs: int = 20, loader: Iterable | None = None,
           metadata: dict | None = None, seed: int = 0) -> dict[str, Any]:
    """Sparsify ``model`` and write ``out_dir`` (module docstring); returns the JSON-able report."""
    out_dir = Path(out_dir)
    model.eval()
    batch_sizes = sorted(set(batch_sizes))
    result = sparsify(model, input_shape, seed=seed)
    pruned = result.model
    before, after = _stats(model, input_shape), _stats(pruned, input_shape)
    inputs = {b: _random(b, input_shape, seed + 2) for b in batch_sizes}
    layers = choose_kernels(pruned, inputs, runs=runs)
    chosen = {b: [n for n, r in rows.items() if r["sparse"]] for b, rows in layers.items()}
    meta = dict(metadata or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    dense_stem = save_model(out_dir, pruned, metadata={**meta, "sparsified": True})
    _, stored = save_sparse(out_dir, pruned, metadata=meta,
                            extra={"kernels": {str(b): names for b, names in chosen.items()}})
    arch = getattr(pruned, "prunekit_arch", None)
    reloaded, _ = load_sparse(out_dir, model=None if arch else copy.deepcopy(model))
    probe = _random(16, input_shape, seed + 3)
    reload_diff, _ = _max_diff(pruned, reloaded, probe)
    exact = reload_diff == 0.0 and all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(),
                                                                          reloaded.state_dict().values()))
    if not exact:
        raise SurgeryError(f"the sparse file does not reload bit-exactly (output difference {reload_diff:.3g})")
    kernel_models = {b: with_sparse_kernels(reloaded, names) if names else reloaded for b, names in chosen.items()}
    report: dict[str, Any] = {
        **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
        "removed_channels": result.removed, "removed_total": result.removed_total,
        "max_abs_diff": result.max_abs_diff, "reload_bit_exact": exact,
        "bytes_dense_before": _dense_bytes(model), "bytes_dense": Path(f"{dense_stem}.safetensors").stat().st_size,
        "bytes_sparse": stored["bytes"], "sparse_layouts": stored["layouts"],
        "latency_original_ms": {}, "latency_dense_ms": {}, "latency_sparse_ms": {},
        "sparse_layers": {str(b): names for b, names in chosen.items()},
        "layer_latency_ms": {str(b): rows for b, rows in layers.items()},
        "sparse_kernel_max_abs_diff": max(_max_diff(pruned, m, probe)[0] for m in kernel_models.values()),
        "out": str(out_dir),
    }
    for b in batch_sizes:
        for key, m in (("latency_original_ms", model), ("latency_dense_ms", pruned),
                       ("latency_sparse_ms", kernel_models[b])):
            report[key][str(b)] = measure_latency(m, inputs[b], runs=runs).median_ms
    if before["nonzeros"] == before["params"]:
        report["note"] = "the model has no exactly-zero parameter: nothing was removed and every tensor is stored dense"
    elif not result.removed_total:
        report["note"] = "no channel is entirely zero: nothing was removed structurally"
    if loader is not None:
        big = kernel_models[batch_sizes[-1]]
        for key, m in (("accuracy_before", model), ("accuracy_after", pruned), ("accuracy_sparse_reload", reloaded),
                       ("accuracy_sparse_kernels", big)):
            report[key] = evaluate(m, loader)["accuracy"]
    return report
