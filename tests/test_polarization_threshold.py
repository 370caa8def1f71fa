"""Threshold selection: the paper's first-valley rule on synthetic histograms, the global variant, and the
documented no-valley fallback (the official code crashes there)."""
from __future__ import annotations

import numpy as np
import pytest

from prunekit.errors import ConfigError
from prunekit.polarization import (
    first_valley,
    global_threshold,
    histogram,
    layer_thresholds,
    valley_threshold,
)


def test_first_valley_rule_on_hand_counts():
    assert first_valley([9, 4, 1, 3, 7]) == 2          # c[2] ≤ c[1] and c[3] ≥ c[2]
    assert first_valley([0, 0, 0, 5, 9]) == 1          # no mass near 0: fires at j = 1 (non-strict)
    assert first_valley([5, 3, 2, 2, 8]) == 2          # plateaus count (c[3] = c[2])
    assert first_valley([1, 2, 3, 4, 5]) is None       # strictly increasing
    assert first_valley([1, 3, 6, 4, 2]) is None       # strictly up then strictly down


def test_histogram_semantics():
    c = histogram([0.0, 0.005, 0.01, 0.999, 1.0, 1.5, -0.2, float("nan")])
    assert len(c) == 100 and c.sum() == 5              # outside [0, 1] and NaN are ignored
    assert c[0] == 2 and c[1] == 1 and c[99] == 2       # exactly 1.0 falls in the last bin


def test_bimodal_layer_threshold_is_the_valley_left_edge():
    rng = np.random.default_rng(0)
    zeros = np.abs(rng.normal(0, 0.004, 300))           # polarized to ~0: bins 0-1
    ones = np.clip(rng.normal(0.6, 0.05, 500), 0, 1)    # the kept cluster
    v = valley_threshold(np.concatenate([zeros, ones]))
    assert v.found and v.source == "valley"
    counts = histogram(np.concatenate([zeros, ones]))
    assert v.bin == first_valley(counts) and v.threshold == pytest.approx(v.bin / 100)
    assert zeros.max() < 0.05 and np.all(zeros <= v.threshold + 0.01)  # the zero peak is left of it
    assert v.threshold < ones.min()                    # and every kept-cluster value above it
    kept = np.concatenate([zeros, ones]) > v.threshold
    assert kept.sum() == pytest.approx(500, abs=15)


def test_unimodal_without_zero_mass_prunes_nothing():
    rng = np.random.default_rng(1)
    g = np.clip(rng.normal(0.5, 0.08, 400), 0.05, 1)
    v = valley_threshold(g)
    assert v.found and v.threshold == pytest.approx(0.01)  # fires at bin 1 (docs/polarization.md)
    assert (g > v.threshold).all()


def test_no_valley_fallbacks():
    # 0.005 ×1, 0.015 ×2, 0.025 ×3, ...: counts strictly increase over 99 bins, then one bin more
    vals = np.concatenate([np.full(k + 1, (k + 0.5) / 100) for k in range(100)])
    assert first_valley(histogram(vals)) is None
    fixed = valley_threshold(vals)
    assert not fixed.found and fixed.source == "fixed" and fixed.threshold == 0.01
    keep = valley_threshold(vals, fallback="keep")
    assert keep.source == "keep" and (vals > keep.threshold).all()
    assert valley_threshold(vals, fallback="fixed", fallback_value=0.03).threshold == 0.03
    layers = {"no-valley": vals, "bimodal": np.r_[np.zeros(50), np.full(50, 0.8), [0.3]]}
    out = layer_thresholds(layers, fallback="global")
    assert out["bimodal"].found and out["bimodal"].threshold == pytest.approx(0.01)
    glob = global_threshold(layers)
    assert out["no-valley"].source == "global" and out["no-valley"].threshold == glob.threshold
    with pytest.raises(ConfigError, match="fallback"):
        valley_threshold(vals, fallback="crash")


def test_global_variant_pools_every_layer():
    a = np.r_[np.zeros(20), np.full(20, 0.7)]
    b = np.r_[np.full(5, 0.02), np.full(30, 0.5)]
    g = global_threshold({"a": a, "b": b})
    c = histogram(np.r_[a, b])
    assert g.found and g.bin == first_valley(c)
    per_layer = layer_thresholds({"a": a, "b": b})
    assert per_layer["a"].threshold == pytest.approx(0.01)
    assert per_layer["b"].threshold == pytest.approx(0.01)  # b starts 0, ... at bin 1 (non-strict)
