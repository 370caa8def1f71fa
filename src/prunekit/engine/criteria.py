"""Channel importance criteria: ``get_criterion(name)(ctx, group) -> scores`` (N,), higher = keep.

A group's score is the **sum of per-producer scores** on the producers' output rows, using the same
group channel across members (a residual group sums the scores of every conv writing to the stream).
For a single-producer group this is exactly the per-layer definition, e.g. Neuron Merging's:

* ``l1-norm``: ``s_n = Σ |w_n|`` (Li et al. 2017).
* ``l2-norm``: ``s_n = ||w_n||_2``.
* ``l2-GM`` (FPGM, He et al. 2019): ``s_n = Σ_j ||w_n − w_j||_2`` over the producer's filters; the
  filters closest to the geometric median get the lowest scores and go first.
* ``bn-scale``: ``s_n = |γ_n|`` of the norm layers (BatchNorm/GroupNorm/LayerNorm) in the group
  (network slimming).
* ``random``: uniform scores from the seeded generator.

``w_n`` is producer row ``n`` flattened (conv: C_in·k·k); with ``include_bias`` the bias is appended,
``[w_n | b_n]``, as Neuron Merging does for fully connected layers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .graph import ChannelGraph, Group
from .rules import find_rule

CRITERIA: Registry = Registry("criterion", builtins=("prunekit.baselines.magnitude",))  # + magnitude, magnitude-l2


@dataclass
class ScoreContext:
    """What a criterion may read: the (unmodified) model, its graph and options."""

    model: nn.Module
    graph: ChannelGraph
    include_bias: bool = False
    seed: int = 0
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(int(self.seed))

    def producer_rows(self, group: Group) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(module, rows, channel)`` per producer: rows (R, F) float32 and their group channel (R,)."""
        for m in group.members:
            if m.role != "out" or not m.fresh:
                continue
            module = self.model.get_submodule(m.module)
            rows = find_rule(type(module)).rows(module, self.include_bias).float().cpu()
            sel = torch.from_numpy(m.indices(group.id))
            yield m.module, rows[sel], torch.from_numpy(m.channel[sel.numpy()])

    def norm_scales(self, group: Group) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(module, |γ| (R,), channel (R,))`` per norm member that has a scale."""
        for m in group.members:
            if m.role != "norm":
                continue
            module = self.model.get_submodule(m.module)
            s = find_rule(type(module)).scale(module)
            if s is not None:
                sel = torch.from_numpy(m.indices(group.id))
                yield m.module, s.float().cpu()[sel], torch.from_numpy(m.channel[sel.numpy()])


Criterion = Callable[[ScoreContext, Group], torch.Tensor]


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator: register ``fn(ctx, group) -> scores (N,)`` under ``name``."""
    return lambda fn: CRITERIA.register(name, fn)


def get_criterion(name: str) -> Criterion:
    return CRITERIA.get(name)


def list_criteria() -> list[str]:
    return CRITERIA.names()


def _row_criterion(per_row: Callable[[torch.Tensor], torch.Tensor]) -> Criterion:
    def score(ctx: ScoreContext, group: Group) -> torch.Tensor:
        out = torch.zeros(group.size, dtype=torch.float64)
        for _, rows, ch in ctx.producer_rows(group):
            out.index_add_(0, ch, per_row(rows).double())
        return out

    return score


def _gm(rows: torch.Tensor) -> torch.Tensor:
    r = rows.double()
    return torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist").sum(1)


CRITERIA.register("l1-norm", _row_criterion(lambda r: r.abs().sum(1)))
CRITERIA.register("l2-norm", _row_criterion(lambda r: r.norm(p=2, dim=1)))
CRITERIA.register("l2-GM", _row_criterion(_gm))


@register_criterion("bn-scale")
def bn_scale(ctx: ScoreContext, group: Group) -> torch.Tensor:
    out = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for _, s, ch in ctx.norm_scales(group):
        out.index_add_(0, ch, s.double())
        found = True
    if not found:
        raise ConfigError(f"criterion 'bn-scale' needs a BatchNorm (or other affine norm) on group "
                          f"'{group.name}'; it has none: ignore its producer or use another criterion")
    return out


@register_criterion("random")
def random_scores(ctx: ScoreContext, group: Group) -> torch.Tensor:
    return torch.rand(group.size, generator=ctx.generator, dtype=torch.float64)
