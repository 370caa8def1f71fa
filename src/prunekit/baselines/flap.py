"""FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024;
code: CASIA-IVA-Lab/FLAP, ``lib/prune.py: prune_flap``, ``lib/layerwrapper.py: BiasGPT``).

**Fluctuation metric** (``WIFV``, the default) per input column ``j`` of a consumer (output projection,
down projection) with weight ``W`` (O, I, K):

    m_j = var_j(X) · ‖W_{:, j}‖²            var_j: unbiased variance of column j over all calibration tokens
    (``IFV``: m_j = var_j(X);  ``WIFN``: m_j = Σ_{i,k} |W_{i,j,k}| · ‖X_j‖₂, Wanda's)

FLAP's code squares the metric of the attention output projection's columns (``W_metric = metric ** 2``
for ``o_proj`` only); so does this module, for groups whose channels are heads.

**Adaptive structure** (``AL-AM``, the default): per consumer, the column metrics of the group are
standardised, ``z_j = (m_j − mean(m)) / std(m)`` (std unbiased, over all of the group's columns of that
consumer: a layer's H·D output-projection columns, or its intermediate columns), a channel's score is the
mean of its columns' z (a head: over its D columns — g·D for a kv head with g query heads), and all
channels of all scored groups are ranked together. Walking down the ranking, channels are kept until
their parameter cost (:func:`~prunekit.baselines.groups.channel_costs`; FLAP hard-codes a head as 512/3
neurons of LLaMA-7B) is closest to ``(1 − ratio)`` of the total: ``ratio`` is the fraction of the scored
groups' **parameters** removed. ``UL-UM`` (``structure="local"``): every group keeps
``round(N·(1−ratio))`` channels by its summed metric.

**Bias compensation**: a removed channel's input is replaced by its calibration mean, so every consumer's
output gets the constant

    δ = Σ_{j removed} W_{:, j} · mean_j(X)          added to the consumer's bias (a Refit ``offset``)

which is exact when the removed inputs are constant on the data, and minimises the squared output error
over the calibration tokens among constant corrections otherwise.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .activations import InputStats
from .groups import Columns, weight_columns
from .wanda import column_wanda

__all__ = ["METRICS", "STRUCTURES", "adaptive_keep", "column_metric", "compensation_offsets", "flap_scores",
           "flap_standardized"]

METRICS = ("WIFV", "IFV", "WIFN")
#: FLAP's names and prunekit's: AL-AM = adaptive across layers and modules, UL-UM = uniform
STRUCTURES = {"AL-AM": "global", "global": "global", "UL-UM": "local", "local": "local"}


def column_metric(c: Columns, stats: InputStats, metric: str = "WIFV", heads: bool = False) -> torch.Tensor:
    """``m_j`` per column of ``c`` (float64); squared for head groups, as FLAP's code does."""
    idx = torch.from_numpy(c.cols)
    if metric == "WIFV":
        m = stats.var[idx] * c.sq_sum
    elif metric == "IFV":
        m = stats.var[idx]
    elif metric == "WIFN":
        m = column_wanda(c, stats)
    else:
        raise ValueError(f"unknown FLAP metric {metric!r}; known: {list(METRICS)}")
    return m * m if heads else m


def flap_scores(size: int, columns: list[Columns], stats: dict[str, InputStats], metric: str = "WIFV",
                heads: bool = False) -> torch.Tensor:
    """Raw scores for the uniform structure: ``Σ_{j ∈ cols(c)} m_j`` over every consumer (float64, (size,))."""
    out = torch.zeros(size, dtype=torch.float64)
    for c in columns:
        out.index_add_(0, torch.from_numpy(c.channel), column_metric(c, stats[c.module], metric, heads))
    return out


def _standardize(m: torch.Tensor) -> torch.Tensor:
    if len(m) < 2:
        return torch.zeros_like(m)
    std = m.std()
    return (m - m.mean()) / std if std > 0 else torch.zeros_like(m)


def flap_standardized(size: int, columns: list[Columns], stats: dict[str, InputStats], metric: str = "WIFV",
                      heads: bool = False) -> torch.Tensor:
    """Scores for the adaptive structure: per consumer, the mean of each channel's standardised column
    metrics; with several consumers (the hidden size), the mean over the consumers reading the channel."""
    acc = torch.zeros(size, dtype=torch.float64)
    seen = torch.zeros(size, dtype=torch.float64)
    for c in columns:
        z = _standardize(column_metric(c, stats[c.module], metric, heads))
        ch = torch.from_numpy(c.channel)
        total = torch.zeros(size, dtype=torch.float64).index_add_(0, ch, z)
        count = torch.zeros(size, dtype=torch.float64).index_add_(0, ch, torch.ones_like(z))
        read = count > 0
        acc[read] += total[read] / count[read]
        seen[read] += 1
    return torch.where(seen > 0, acc / seen.clamp(min=1), torch.zeros_like(acc))


def adaptive_keep(pool: dict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor]], ratio: float
                  ) -> dict[int, list[int]]:
    """FLAP's global selection over ``pool[g] = (candidate channels, scores (N,), costs (N,))``: channels
    ranked by score (descending; ties: group, then channel), kept while the kept cost approaches
    ``(1 − ratio)`` of the total (the prefix whose cost is closest), at least one channel per group.
    Returns the kept candidates per group."""
    gid, ch, score, cost = [], [], [], []
    for g, (cand, s, c) in pool.items():
        gid.append(np.full(len(cand), g))
        ch.append(cand)
        score.append(s.double().numpy()[cand])
        cost.append(c.double().numpy()[cand])
    gid, ch, score, cost = (np.concatenate(v) for v in (gid, ch, score, cost))
    order = np.lexsort((ch, gid, -score))
    cum = np.cumsum(cost[order])
    k = int(np.argmin(np.abs(cum - (1.0 - ratio) * cum[-1]))) if len(cum) else -1
    keep: dict[int, list[int]] = {g: [] for g in pool}
    for i in order[:k + 1].tolist():
        keep[int(gid[i])].append(int(ch[i]))
    for g, (cand, s, _) in pool.items():
        if not keep[g] and len(cand):  # never a group's last channel
            sc = s.double().numpy()[cand]
            keep[g].append(int(cand[np.lexsort((cand, -sc))[0]]))
    return {g: sorted(v) for g, v in keep.items()}


def compensation_offsets(model: nn.Module, columns: list[Columns], kept: list[int],
                         stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
    """``{consumer: δ (O,)}`` (float64, CPU), ``δ = Σ_{j removed} W_{:, j} · mean_j`` over the columns of the
    removed channels (not in ``kept``); consumers that lose nothing are left out. Linear-like consumers only
    (``taps == 1``): a constant input of a conv is not constant where it is padded."""
    out: dict[str, torch.Tensor] = {}
    for c in columns:
        removed = ~np.isin(c.channel, np.asarray(kept, dtype=np.int64))
        if not removed.any() or c.taps != 1:
            continue
        w = weight_columns(model, c, removed)[:, :, 0]  # (O, removed)
        mean = stats[c.module].mean[torch.from_numpy(c.cols[removed])].to(w.device)
        delta = (w @ mean).cpu()
        out[c.module] = out[c.module] + delta if c.module in out else delta
    return out
