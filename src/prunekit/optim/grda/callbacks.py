"""gRDA's Trainer callbacks (objects with ``on_epoch_end(trainer, epoch, record)``; see :mod:`prunekit.train`).

:class:`SparsityLogger` adds exact-zero sparsity to every epoch's log record, per tensor and in total,
which is how gRDA's progress is followed (its sparsity has no target; it is whatever the threshold
produces, ``docs/grda.md``). :class:`NormRatioLogger` follows ‖w‖₂/‖w‖₁, the paper's picture of
sparsification. Both work with any optimizer.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...metrics import sparsity

__all__ = ["NormRatioLogger", "SparsityLogger", "norm_ratio"]


class SparsityLogger:
    """Log the fraction of exactly-zero parameters after every epoch.

    Keys added to the epoch record (fractions in [0, 1]):

    - ``sparsity``: zeros / all parameters (BN γ/β and biases included, buffers never): the number
      the gRDA paper reports (ResNet-50 denominator 25,557,032).
    - ``weight_sparsity``: zeros / the weights of ``modules`` (default conv + linear): the layer-wise
      pruning convention (ResNet-50: 25,502,912).
    - ``nonzero_params``: number of non-zero parameters (all of them).
    - ``layer_sparsity``: ``{tensor name: fraction}`` for every parameter tensor (``per_layer=True``).
    - ``grda_threshold``: the largest current threshold τ, when the optimizer is a :class:`~prunekit.optim.GRDA`.

    Under DDP every rank holds the same weights, so every rank computes the same numbers.

    Args:
        per_layer: also log ``layer_sparsity``.
        modules: module types whose ``weight`` counts for ``weight_sparsity``.
        verbose: print a one-line summary through the Trainer's log (rank 0, when it prints).
    """

    def __init__(self, *, per_layer: bool = True,
                 modules: Iterable[type[nn.Module]] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
                 verbose: bool = True):
        self.per_layer = per_layer
        self.modules = tuple(modules)
        self.verbose = verbose

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """The keys described above (without ``grda_threshold``) for ``model``."""
        every = sparsity(model, kinds=None, modules=None)
        weights = sparsity(model, kinds=("weight",), modules=self.modules)
        out: dict[str, Any] = {"sparsity": every.fraction, "weight_sparsity": weights.fraction,
                               "nonzero_params": every.numel - every.zeros}
        if self.per_layer:
            out["layer_sparsity"] = {t.name: t.fraction for t in every.tensors}
        return out

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        record.update(self.measure(trainer.module))
        thresholds = getattr(trainer.optimizer, "thresholds", None)
        if callable(thresholds) and (taus := thresholds()):
            record["grda_threshold"] = max(taus)
        say = getattr(trainer, "_say", None)
        if self.verbose and callable(say):
            tau = f"  τ {record['grda_threshold']:.4g}" if "grda_threshold" in record else ""
            say(f"epoch {epoch + 1}  sparsity {100 * record['sparsity']:.2f}% (all params), "
                f"{100 * record['weight_sparsity']:.2f}% (conv/linear weights){tau}")


def norm_ratio(model: nn.Module) -> float:
    """‖w‖₂ / ‖w‖₁ over every parameter of ``model`` flattened into one vector w (buffers excluded).

    Between d^{-1/2} (all |w_j| equal) and 1 (one non-zero entry); it rises when the mass of w
    concentrates on fewer coordinates, which is how the gRDA paper shows sparsification (Fig. 2;
    ``docs/grda.md``, "Directional pruning diagnostics"). Computed in float64.
    """
    l1 = torch.zeros((), dtype=torch.float64)
    l2sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        w = p.detach().to(device="cpu", dtype=torch.float64)
        l1 += w.abs().sum()
        l2sq += w.square().sum()
    return float(l2sq.sqrt() / l1) if l1 > 0 else 0.0


class NormRatioLogger:
    """Add ``norm_ratio`` = ‖w‖₂/‖w‖₁ over all parameters (see :func:`norm_ratio`) to every epoch record.

    ``initial``: a model (the untrained one) whose ratio is stored as :attr:`initial_ratio` and logged
    once as ``norm_ratio_initial`` in the first epoch's record, so the curve starts before training.
    """

    def __init__(self, initial: nn.Module | None = None):
        self.initial_ratio = norm_ratio(initial) if initial is not None else None

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        record["norm_ratio"] = norm_ratio(trainer.module)
        if epoch == 0 and self.initial_ratio is not None:
            record["norm_ratio_initial"] = self.initial_ratio
