"""Survivors of several groups chosen together: one budget (MACs or parameters), spent where a refit loses least.

Each group ``g`` has consumers whose outputs ``Y`` are refit by least squares on the kept input columns
(:mod:`.reconstruct`). For one consumer with Gram ``G = [U|1]ᵀ[U|1]`` and cross ``C = [U|1]ᵀY`` over the
kept columns S, ``A = (G_SS + λI)⁻¹`` and the refit ``W = A C_S``, dropping channel b (its columns, a
block) raises the error by the block form of OBS

    cost(b) = tr( W_bᵀ (A_bb)⁻¹ W_b ),

after which ``A ← A − A_{:b} (A_bb)⁻¹ A_{b:}`` and ``W ← W − A_{:b} (A_bb)⁻¹ W_b`` (the refit on S \\ b).
Channels are removed one at a time, across all groups, always the one with the least
``Σ_consumers cost(b) / price(b)`` — error per MAC (or parameter) saved — while a removal brings the total
closer to the budget (a group whose next channel would overshoot more than it helps is closed, the others
go on: a large head group does not stop the small MLP neurons from filling the rest). Costs are in the consumers' output units: comparable when the consumers write into one
stream (every output and down projection of a pre-norm transformer adds into the residual stream; the
second conv of every residual block into its stage). The statistics come from the unpruned network, so
this decides *how many and which* channels each group keeps; the sequential refits come after.

A group with a ``multiple`` r > 1 keeps a multiple of r channels (or all N; hardware-friendly widths): it
loses channels in moves of r (the first one N mod r). A group with ``block`` b > 1 loses at least b per move
(fewer, larger downdates: the elimination is memory-bound one channel at a time, so a wide group — an LLM's
MLP — goes far faster). A move of k channels takes the k individually cheapest, is priced by their joint
block-OBS cost ``tr(W_Sᵀ (A_SS)⁻¹ W_S)`` per MAC and removed with one rank-|S| downdate; k = 1 is exact greedy
elimination.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gram (D+1, D+1), cross (D+1, O), blocks (N, k)


class _Elimination:
    """One consumer's inverse Gram ``A`` and refit ``W`` over the columns still kept (removed ones are 0)."""

    def __init__(self, gram: torch.Tensor, cross: torch.Tensor, blocks: torch.Tensor, ridge: float):
        d = gram.shape[0] - 1
        lam = ridge * float(torch.diagonal(gram)[:d].mean()) if d else 0.0
        pen = torch.full((d + 1,), max(lam, 1e-12), dtype=torch.float64)
        pen[-1] = 1e-12 * max(float(gram[-1, -1]), 1.0)  # the intercept is not shrunk
        self.a = torch.linalg.inv(gram.double() + torch.diag(pen))
        self.w = self.a @ cross.double()
        self.blocks = blocks

    def costs(self, channels: torch.Tensor) -> torch.Tensor:
        """(len(channels),) error increase of dropping each of ``channels`` now."""
        b = self.blocks[channels]
        abb = self.a[b[:, :, None], b[:, None, :]]  # (n, k, k)
        wb = self.w[b]  # (n, k, O)
        return (torch.linalg.solve(abb, wb) * wb).sum((1, 2))

    def set_cost(self, channels: list[int]) -> float:
        """Error increase of dropping all of ``channels`` together (the block formula on their columns)."""
        b = self.blocks[channels].reshape(-1)
        wb = self.w[b]
        return float((torch.linalg.solve(self.a[b][:, b], wb) * wb).sum())

    def drop(self, channels: list[int]) -> None:
        """Remove ``channels`` (one rank-|columns| downdate of A and W)."""
        b = self.blocks[channels].reshape(-1)
        abb = self.a[b][:, b]
        left = torch.linalg.solve(abb, self.a[b])  # (k, D+1) = A_bb⁻¹ A_b:
        self.w = self.w - self.a[:, b] @ torch.linalg.solve(abb, self.w[b])
        self.a = self.a - self.a[:, b] @ left
        self.a[b] = 0.0
        self.a[:, b] = 0.0
        self.w[b] = 0.0


@dataclass
class Pool:
    """One group in the allocation: its consumers' statistics, each channel's price (the MACs or parameters
    removing it saves), the channels that must stay (``forced``), and the fewest channels it may keep."""

    stats: list[Stats]
    price: torch.Tensor  # (N,) float64
    forced: list[int] = field(default_factory=list)
    min_keep: int = 1
    multiple: int = 1  # the kept width is a multiple of it (or the whole group)
    block: int = 1  # at least this many channels per move (fewer, larger downdates: for wide groups)


def move_size(alive: int, multiple: int = 1, block: int = 1, floor: int = 1) -> int:
    """Channels the next move of a group with ``alive`` channels removes: down to the next lower multiple of
    ``multiple``, then further multiples until at least ``block`` go, never below ``floor`` kept channels
    (0: no move left)."""
    m = max(multiple, 1)
    lowest = max(floor, min(alive, m))  # the fewest channels the group may keep
    if alive <= lowest:
        return 0
    k = alive - m * ((alive - 1) // m)
    if block > k:
        k += m * ((block - k + m - 1) // m)
    cap = alive - -(-lowest // m) * m  # keep the smallest multiple of m that is at least `lowest`
    return max(min(k, cap), 0)


class FixedPrices:
    """Each pool's own ``price``: nothing shared (the default of :func:`allocate`)."""

    def __init__(self, pools: dict[int, Pool]):
        self.pools = pools

    def of(self, gid: int, alive: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.pools[gid].price

    def dependents(self, gid: int) -> set[int]:
        return set()


def allocate(pools: dict[int, Pool], budget: float, ridge: float = 1e-4, prices: Any = None
             ) -> dict[int, list[int]]:
    """Kept channels per group (sorted) after removing channels whose prices sum to about ``budget``, the
    least error per unit of price first (module docstring). ``ridge`` is relative to the mean diagonal of
    each Gram. ``prices`` (``of(g, alive) → (N,)``, ``dependents(g)``: the groups whose prices change when g
    loses a channel), e.g. :class:`~prunekit.engine.costs.ChannelPrices` (a weight shared by two pooled groups
    is paid once); by default each pool's fixed ``price``. Per step only the group that lost a channel (its
    costs) and its dependents (their prices) are recomputed."""
    prices = prices or FixedPrices(pools)
    states = {g: [_Elimination(gram, cross, blocks, ridge) for gram, cross, blocks in p.stats]
              for g, p in pools.items()}
    alive = {g: torch.ones(len(p.price), dtype=torch.bool) for g, p in pools.items()}
    candidate = {g: alive[g].clone() for g in pools}
    for g, p in pools.items():
        candidate[g][list(p.forced)] = False
    error: dict[int, torch.Tensor] = {}  # (N,) error increase of dropping each channel now (inf: not allowed)
    best: dict[int, tuple[float, int, float]] = {}  # per open group: (error per price, channel, price)
    full: set[int] = set()  # groups whose next channel would overshoot the budget

    def refresh_error(g: int) -> None:
        p = pools[g]
        e = torch.full((len(p.price),), float("inf"), dtype=torch.float64)
        cand = torch.nonzero(alive[g] & candidate[g]).flatten()
        if len(cand) and int(alive[g].sum()) > max(p.min_keep, 1):
            e[cand] = sum(s.costs(cand) for s in states[g])
        error[g] = e

    def refresh_best(g: int) -> None:
        best.pop(g, None)
        p = pools[g]
        finite = torch.isfinite(error[g])
        k = move_size(int(alive[g].sum()), p.multiple, p.block, max(p.min_keep, 1))
        if g in full or k == 0 or int(finite.sum()) < k:
            return
        price = prices.of(g, alive)
        ratio = torch.where(finite, error[g] / price.clamp_min(1e-12), torch.inf)
        move = torch.argsort(ratio, stable=True)[:k].tolist()
        cost = float(error[g][move[0]]) if k == 1 else sum(s.set_cost(move) for s in states[g])
        paid = float(price[move].sum())
        best[g] = (cost / max(paid, 1e-12), move, paid)

    for g in pools:
        refresh_error(g)
        refresh_best(g)
    removed = 0.0
    while best:
        g = min(best, key=lambda k: (best[k][0], k))
        _, move, step = best[g]
        if removed + step - budget > budget - removed:  # it overshoots more than it helps: the group is done
            full.add(g)
            best.pop(g)
            continue
        for s in states[g]:
            s.drop(move)
        alive[g][move] = False
        removed += step
        refresh_error(g)
        for h in {g} | (prices.dependents(g) & set(pools)):
            refresh_best(h)
    return {g: torch.nonzero(alive[g]).flatten().tolist() for g in pools}
