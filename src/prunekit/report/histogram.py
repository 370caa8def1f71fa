"""Compact histograms of scaling factors, stored in result JSON instead of the raw values."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["magnitude_histogram"]


def magnitude_histogram(values: Sequence[float], bins: int = 100) -> dict[str, Any]:
    """Histogram of ``|values|`` on ``[0, max(1, max|v|)]`` with ``bins`` equal bins.

    Returns ``{"edges": [bins + 1 floats], "counts": [bins ints]}`` — the binning of the
    Polarization figures (γ ∈ [0, 1] after the clamp), so histograms of different runs line up.
    """
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    hi = max(1.0, float(v.max())) if v.size else 1.0
    counts, edges = np.histogram(v, bins=bins, range=(0.0, hi))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}
