"""gRDA (Chao, Wang, Xing & Cheng, NeurIPS 2020) as one family: train sparse, watch it, export it.

>>> from prunekit.optim.grda import GRDA, SparsityLogger, sparsify
>>> opt = GRDA(model.parameters(), lr=0.1, c=0.005, mu=0.55)        # or create_optimizer("grda", ...)
>>> train(model, train_set, test_set, get_recipe("grda-lenet"), callbacks=[SparsityLogger()])
>>> small = sparsify(model, (1, 1, 28, 28))                       # exact zeros → smaller model

* :mod:`.optimizer` — :class:`GRDA` (registered as the optimizer ``grda``), :func:`soft_threshold`,
  :func:`threshold_increment`, and the ``linear-hold`` schedule of the paper's CIFAR runs;
* :mod:`.callbacks` — :class:`SparsityLogger` (exact-zero sparsity per epoch) and :class:`NormRatioLogger`
  (‖w‖₂/‖w‖₁ per epoch);
* ``sparsify`` — the export of :mod:`prunekit.sparse` (dead channels removed, sparse storage), re-exported
  here on first access so that importing the optimizer does not load the engine.

The recipes (``grda``, ``grda-lenet``, ``grda-resnet50-imagenet`` ...) are in :mod:`prunekit.recipes`; the
paper studies behind ``prunekit reproduce grda-*`` in :mod:`prunekit.studies.grda`. See ``docs/grda.md``.
"""
from __future__ import annotations

from typing import Any

from .callbacks import NormRatioLogger, SparsityLogger, norm_ratio
from .optimizer import GRDA, soft_threshold, threshold_increment

__all__ = ["GRDA", "NormRatioLogger", "SparsityLogger", "norm_ratio", "soft_threshold", "sparsify",
           "threshold_increment"]


def __getattr__(name: str) -> Any:
    if name == "sparsify":
        from ...sparse import sparsify

        return sparsify
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
