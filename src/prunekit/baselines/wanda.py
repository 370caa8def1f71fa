"""Wanda-sp: Wanda's weight × activation score summed over a structure (as defined and run in FLAP's
code, An et al. AAAI 2024, ``lib/prune.py: prune_wanda_sp``).

Wanda (Sun et al. 2024) scores a weight by ``|W_ij| · ‖X_j‖₂``, ``X_j`` the consumer's input column ``j``
over all calibration tokens. Wanda-sp scores a structure by the weights it owns **in its consumer**
(the output projection for a head, the down projection for an MLP neuron; q/k/v and gate/up are not
read), per channel ``c`` of a group:

    S_c = Σ_{j ∈ cols(c)} Σ_{i, k} |W_{i, j, k}| · ‖X_j‖₂          W: the consumer's weight (O, I, K)

FLAP's code computes ``mean_i(|W_ij| · sqrt(Σ_t x_tj² / N_samples))`` summed over a head's 128 columns:
the same ranking within a layer (it differs by the constant ``1 / (O·√N)`` per layer), and the engine's
selection (uniform per layer, or global after dividing by each group's mean) is blind to that constant.
"""
from __future__ import annotations

import torch

from .activations import InputStats
from .groups import Columns

__all__ = ["column_wanda", "wanda_sp_scores"]


def column_wanda(c: Columns, stats: InputStats) -> torch.Tensor:
    """``Σ_{i,k} |W_{i,j,k}| · ‖X_j‖₂`` per column of ``c`` (float64)."""
    return c.abs_sum * stats.norm[torch.from_numpy(c.cols)]


def wanda_sp_scores(size: int, columns: list[Columns], stats: dict[str, InputStats]) -> torch.Tensor:
    """``S_c`` (float64, (size,)) of one group: per-column scores summed over each channel's columns of
    every consumer."""
    out = torch.zeros(size, dtype=torch.float64)
    for c in columns:
        out.index_add_(0, torch.from_numpy(c.channel), column_wanda(c, stats[c.module]))
    return out
