"""Survivors chosen from the data: forward selection of whole channels against the consumers' outputs.

Given, for every consumer of a group, the normal equations of its output on *all* N input channels of
the group (``gram = [U|1]ᵀ[U|1]``, ``cross = [U|1]ᵀY``; a conv channel owns its k = k_h·k_w patch
columns), pick P channels greedily: at each step add the channel whose columns most reduce the summed
least-squares error ``Σ_consumers ‖Y − [U_S|1] W‖²`` of the refit on the selected set S, i.e. the largest

    gain(b) = Σ_consumers tr( T_bᵀ (G_bb)⁻¹ T_b ),

where ``G_bb`` (k × k) and ``T_b`` (k × O) are channel b's block of the Gram and cross matrices after
projecting out the columns already selected (sequential rank-one deflation, as in OMP). The constant
column (intercept) and protected channels are selected first. Cost per step: one batched k × k solve
per candidate; the statistics are gathered once.
"""
from __future__ import annotations

import math

import torch


class _Deflated:
    """Gram / cross matrices of one consumer, deflated by the columns selected so far."""

    def __init__(self, gram: torch.Tensor, cross: torch.Tensor):
        self.g = gram.clone()
        self.t = cross.clone()
        d = gram.shape[0] - 1
        self.tiny = 1e-12 * max(float(torch.diagonal(gram)[:d].max()) if d else 1.0, 1e-300)

    def take(self, j: int) -> None:
        d = self.g[j, j]
        if d > self.tiny:
            col = self.g[:, j].clone()
            self.t = self.t - torch.outer(col, self.t[j]) / d
            self.g = self.g - torch.outer(col, col) / d

    def gains(self, blocks: torch.Tensor) -> torch.Tensor:
        """(N,) error reduction of adding each channel's columns ``blocks`` (N, k)."""
        gb = self.g[blocks[:, :, None], blocks[:, None, :]]  # (N, k, k)
        tb = self.t[blocks]  # (N, k, O)
        eye = torch.eye(blocks.shape[1], dtype=gb.dtype)
        scale = torch.diagonal(gb, dim1=1, dim2=2).amax(1).clamp_min(self.tiny)[:, None, None]
        inv, _ = torch.linalg.inv_ex(gb + 1e-9 * scale * eye)  # k × k blocks: an explicit inverse is cheapest
        return ((inv @ tb) * tb).sum((1, 2))


def _removal_costs(stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], chosen: list[int],
                   intercept: bool) -> torch.Tensor:
    """(len(chosen),) error increase of dropping each chosen channel from the least-squares fit on all of them:
    ``tr(W_bᵀ (G⁻¹)_bb⁻¹ W_b)`` with ``W = G⁻¹C`` on the chosen columns (the block form of OBS)."""
    cost = torch.zeros(len(chosen), dtype=torch.float64)
    for g, t, blocks in stats:
        cols = torch.cat([blocks[c] for c in chosen] + ([torch.tensor([g.shape[0] - 1])] if intercept else []))
        gs = g[cols][:, cols]
        scale = float(torch.diagonal(gs).max().clamp_min(1e-300))
        inv, _ = torch.linalg.inv_ex(gs + 1e-9 * scale * torch.eye(len(cols), dtype=gs.dtype))
        w = inv @ t[cols]
        k = blocks.shape[1]
        for i in range(len(chosen)):
            idx = torch.arange(i * k, (i + 1) * k)
            a, _ = torch.linalg.inv_ex(inv[idx][:, idx])
            cost[i] += float(((a @ w[idx]) * w[idx]).sum())
    return cost


def select_channels(stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_keep: int,
                    forced: list[int] = (), intercept: bool = True, extra: float = 0.0) -> list[int]:
    """Greedy channel selection (module docstring).

    Args:
        stats: per consumer ``(gram (D+1, D+1), cross (D+1, O), blocks (N, k))`` where ``blocks[c]`` are the
            columns of group channel ``c`` and the constant column is last.
        n_keep: P, the number of channels to keep (forced ones included).
        forced: channels that must stay (protected).
        intercept: select the constant column first.
        extra: select ``ceil(extra · n_keep)`` more channels forward, then drop that many again, each time the
            one whose removal raises the error least (forward–backward selection).

    Returns:
        the kept channels, sorted.
    """
    states = [_Deflated(g, t) for g, t, _ in stats]
    n = stats[0][2].shape[0]
    chosen: list[int] = []

    def take(c: int) -> None:
        for state, (_, _, blocks) in zip(states, stats):
            for j in blocks[c].tolist():
                state.take(j)
        chosen.append(c)

    if intercept:
        for state, (g, _, _) in zip(states, stats):
            state.take(g.shape[0] - 1)
    for c in forced:
        take(int(c))
    available = torch.ones(n, dtype=torch.bool)
    available[chosen] = False
    target = min(n, n_keep + math.ceil(extra * n_keep))
    while len(chosen) < target:
        gain = sum(state.gains(blocks) for state, (_, _, blocks) in zip(states, stats))
        gain = torch.where(available, gain, torch.full_like(gain, -float("inf")))
        c = int(gain.argmax())
        available[c] = False
        take(c)
    fixed = {int(c) for c in forced}
    while len(chosen) > max(n_keep, len(fixed)):
        cost = _removal_costs(stats, chosen, intercept)
        cost[[i for i, c in enumerate(chosen) if c in fixed]] = float("inf")
        chosen.pop(int(cost.argmin()))
    return sorted(chosen)
