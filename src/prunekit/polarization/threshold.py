"""Threshold selection on polarized scaling factors (paper §3.3; docs/polarization.md, "Threshold").

The paper's rule, as the official code applies it **per layer**: histogram the layer's factors in
``bins`` = 100 equal bins on ``[0, 1]`` (values outside are ignored, exactly 1.0 falls in the last
bin), scan ``j = 1 .. bins−2`` and stop at the first bin with ``counts[j] ≤ counts[j−1]`` and
``counts[j+1] ≥ counts[j]``; the threshold is that bin's **left edge** ``j / bins`` and channels with
``γ > threshold`` are kept. Consequences: the threshold is at least 0.01; a layer without mass near 0
starts ``0, 0, …`` so the rule fires at ``j = 1`` and prunes (almost) nothing; plateaus count.

**No valley.** When no bin satisfies the test (e.g. counts strictly increasing, or strictly rising then
strictly falling) the official function returns nothing and pruning crashes. Here a ``fallback``
decides, and the result says it was used (``Valley.found = False``):

* ``"fixed"`` (default): threshold ``fallback_value`` = 0.01, the official ``fixed`` strategy: only
  factors that polarization drove to (almost) zero go. Safe: it never cuts into a unimodal mass.
* ``"keep"``: prune nothing in that layer.
* ``"global"``: use the global threshold (:func:`global_threshold` over every layer's factors).

The **global variant** applies the same rule once to the histogram of all factors concatenated.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["FALLBACKS", "Valley", "first_valley", "global_threshold", "histogram", "layer_thresholds",
           "valley_threshold"]

FALLBACKS = ("fixed", "keep", "global")


@dataclass(frozen=True)
class Valley:
    """A threshold and where it came from.

    Attributes:
        threshold: keep factors ``> threshold``.
        found: a valley was found (False: the fallback gave the threshold).
        bin: the valley bin index (None when not found).
        source: ``"valley"``, ``"fixed"``, ``"keep"``, ``"global"`` or ``"value"`` (a given number).
    """

    threshold: float
    found: bool
    bin: int | None = None
    source: str = "valley"

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "found": self.found, "bin": self.bin, "source": self.source}


def _values(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def histogram(values, bins: int = 100, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Counts of ``values`` in ``bins`` equal bins on ``[lo, hi]`` (outside ignored, ``hi`` in the last)."""
    v = _values(values)
    v = v[np.isfinite(v)]
    counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
    return counts


def first_valley(counts) -> int | None:
    """First ``j`` in ``1 .. len−2`` with ``c[j] ≤ c[j−1]`` and ``c[j+1] ≥ c[j]``, else None."""
    c = np.asarray(counts)
    for j in range(1, len(c) - 1):
        if c[j] <= c[j - 1] and c[j + 1] >= c[j]:
            return j
    return None


def _check(bins: int, fallback: str, lo: float, hi: float) -> None:
    if not isinstance(bins, int) or bins < 3:
        raise ConfigError(f"bins must be an integer >= 3, got {bins!r}")
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    if not hi > lo:
        raise ConfigError(f"histogram range must have hi > lo, got ({lo}, {hi})")


def valley_threshold(values, *, bins: int = 100, lo: float = 0.0, hi: float = 1.0, fallback: str = "fixed",
                     fallback_value: float = 0.01, global_value: float | None = None) -> Valley:
    """The paper's first-valley threshold of one set of factors (module docstring)."""
    _check(bins, fallback, lo, hi)
    j = first_valley(histogram(values, bins, lo, hi))
    if j is not None:
        return Valley(lo + (hi - lo) * j / bins, True, j, "valley")
    if fallback == "fixed":
        return Valley(float(fallback_value), False, None, "fixed")
    if fallback == "keep":
        return Valley(-np.inf, False, None, "keep")
    if global_value is None:
        raise ConfigError("fallback 'global' needs the global threshold (use layer_thresholds)")
    return Valley(float(global_value), False, None, "global")


def global_threshold(per_layer: Mapping[str, object] | list, *, bins: int = 100, lo: float = 0.0, hi: float = 1.0,
                     fallback: str = "fixed", fallback_value: float = 0.01) -> Valley:
    """One threshold from the histogram of every layer's factors together."""
    items = per_layer.values() if isinstance(per_layer, Mapping) else per_layer
    allv = np.concatenate([_values(v) for v in items]) if items else np.zeros(0)
    if fallback == "global":
        fallback = "fixed"
    return valley_threshold(allv, bins=bins, lo=lo, hi=hi, fallback=fallback, fallback_value=fallback_value)


def layer_thresholds(per_layer: Mapping[str, object], *, bins: int = 100, lo: float = 0.0, hi: float = 1.0,
                     fallback: str = "fixed", fallback_value: float = 0.01) -> dict[str, Valley]:
    """The per-layer threshold of every entry of ``per_layer`` (name → factors)."""
    _check(bins, fallback, lo, hi)
    glob = None
    if fallback == "global":
        glob = global_threshold(per_layer, bins=bins, lo=lo, hi=hi, fallback_value=fallback_value).threshold
    return {k: valley_threshold(v, bins=bins, lo=lo, hi=hi, fallback=fallback, fallback_value=fallback_value,
                                global_value=glob) for k, v in per_layer.items()}
