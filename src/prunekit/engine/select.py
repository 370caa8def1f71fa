"""Ratio → kept channels.

``ratio`` r is the fraction of a group's **prunable** channels removed (protected channels are always
kept and are not counted).

* ``local``: every group keeps ``n_keep = round(N·(1−r))`` (or ``floor``) of its N prunable channels,
  at least 1, the highest-scoring ones.
* ``global``: scores are normalised per group, ``ŝ_n = s_n / mean_{prunable}(s)`` (so every group has
  mean 1 and groups of different layer scales compete fairly), then the ``T − n_keep(T)`` lowest ŝ over
  all T prunable channels are removed, never a group's last channel.

``overrides`` map a module name or fnmatch pattern to a per-group ratio (used locally, even in global
scope, and those groups leave the global pool). ``round`` is Python's ``round`` (half to even, as in the
Neuron Merging code); ``floor`` has a 1e-9 tolerance so that ``floor(30·(1−0.9)) = 3``.

``round_to`` (Torch-Pruning's name; hardware-friendly widths) applies last, after ``rounding``, the
scope and the ≥ 1-channel-per-member rule: a group's kept width W (protected channels included) is
raised to the next multiple of ``round_to``, ``⌈W / round_to⌉ · round_to``, by keeping the best-scoring
removed channels back; when that exceeds the group's N channels, the group keeps all N. So a width is
never 0, never more than N, protected channels stay kept, and ``round_to`` never removes more than the
ratio asked for (ratio 0 still keeps everything; in global scope the overall ratio is then a lower
bound). ``rounding`` only decides W before that; ``round_to=None`` or ``1`` changes nothing.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .graph import ChannelGraph

SCOPES = ("local", "global")
ROUNDINGS = ("round", "floor")


def check_ratio(ratio: Any, what: str = "ratio") -> float:
    """A float in [0, 1); anything else is a :class:`ConfigError` naming the value."""
    ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) \
        and 0 <= ratio < 1
    if not ok:
        raise ConfigError(f"{what} must be a number in [0, 1) (fraction of channels removed), got {ratio!r}")
    return float(ratio)


def check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def check_round_to(round_to: Any) -> int | None:
    """None or a positive int; anything else is a :class:`ConfigError` naming ``round_to``."""
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ConfigError(f"round_to must be a positive integer (each group keeps a multiple of it) or None, "
                          f"got {round_to!r}")
    return int(round_to)


def round_width(kept: int, size: int, round_to: int | None) -> int:
    """``kept`` raised to the next multiple of ``round_to``, at most ``size`` (see the module docstring)."""
    if not round_to or round_to == 1:
        return kept
    return min(size, -(-kept // round_to) * round_to)


def n_keep(n: int, ratio: float, rounding: str = "round") -> int:
    """Channels kept out of ``n`` at ``ratio``: ``round``/``floor`` of ``n·(1−ratio)``, clamped to [1, n]."""
    x = n * (1.0 - ratio)
    k = round(x) if rounding == "round" else math.floor(x + 1e-9)
    return max(1, min(n, int(k)))


def resolve_overrides(graph: ChannelGraph, overrides: Mapping[str, float] | None) -> dict[int, float]:
    """``{module name or pattern: ratio}`` → ``{group id: ratio}`` (the groups the modules produce or
    normalise). Unknown names and conflicting ratios for one group are :class:`ConfigError` s."""
    out: dict[int, float] = {}
    if not overrides:
        return out
    owners: dict[str, int] = {}
    for m in graph.members:
        if m.role == "norm" or (m.role == "out" and m.fresh):
            gids = np.unique(m.group[m.group >= 0]).tolist()
            if gids:
                owners.setdefault(m.module, gids[0])
    for key, r in overrides.items():
        r = check_ratio(r, f"override ratio for '{key}'")
        hits = [n for n in owners if n == key] or [n for n in owners if fnmatch.fnmatchcase(n, key)]
        if not hits:
            known = [n for n in graph.module_kinds if n == key or fnmatch.fnmatchcase(n, key)]
            why = "produces no channel group (only consumes)" if known else "matches no module"
            raise ConfigError(f"override '{key}' {why}; overrides name producers or norms, e.g. "
                              f"'{next(iter(owners), 'conv1')}'")
        for n in hits:
            gid = owners[n]
            group = graph.groups[gid]
            if group.protected and r > 0:
                raise ConfigError(f"override '{key}' asks to prune '{n}', but its channel group "
                                  f"'{group.name}' is protected: {next(iter(group.blocked.values()))}")
            if gid in out and out[gid] != r:
                raise ConfigError(f"overrides give group '{graph.groups[gid].name}' two ratios "
                                  f"({out[gid]} and {r}, via '{n}')")
            out[gid] = r
    return out


def _top(scores: torch.Tensor, cand: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scoring channels of ``cand`` (ties: lower index first)."""
    s = scores.double().numpy()[cand]
    order = np.lexsort((cand, -s))
    return cand[order[:k]]


def select(graph: ChannelGraph, scores: Mapping[int, torch.Tensor], *, ratio: float, scope: str = "local",
           rounding: str = "round", overrides: Mapping[int, float] | None = None,
           round_to: int | None = None) -> dict[int, list[int]]:
    """Kept channels (sorted) per prunable group; ``scores[g]`` has one entry per group channel."""
    ratio = check_ratio(ratio)
    check_choice(scope, SCOPES, "scope")
    check_choice(rounding, ROUNDINGS, "rounding")
    round_to = check_round_to(round_to)
    overrides = dict(overrides or {})
    keep: dict[int, list[int]] = {}
    pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for g in graph.prunable_groups:
        s = scores[g.id]
        if s.shape != (g.size,):
            raise ConfigError(f"criterion returned {tuple(s.shape)} scores for group '{g.name}' of {g.size}")
        cand = np.asarray(g.prunable, dtype=np.int64)
        fixed = np.asarray(sorted(g.blocked), dtype=np.int64)
        if scope == "local" or g.id in overrides:
            k = n_keep(len(cand), overrides.get(g.id, ratio), rounding)
            keep[g.id] = sorted(np.concatenate([fixed, _top(s, cand, k)]).tolist())
        else:
            sc = s.double().numpy()[cand]
            mean = sc.mean()
            norm = sc / mean if mean > 0 else np.zeros_like(sc)
            pool.append((np.full(len(cand), g.id), cand, norm))
            keep[g.id] = sorted(np.concatenate([fixed, cand]).tolist())
    if pool:
        _global_drop(pool, keep, ratio, rounding)
    for g in graph.prunable_groups:
        keep[g.id] = _cover_members(g, scores[g.id], keep[g.id],
                                    None if scope == "global" and g.id not in overrides else len(keep[g.id]))
        if round_to:
            keep[g.id] = _round_up(g, scores[g.id], keep[g.id], round_to)
    return keep


def _round_up(group: Any, scores: torch.Tensor, keep: list[int], round_to: int) -> list[int]:
    """Keep back the best-scoring removed channels until the width is a multiple of ``round_to`` (or all)."""
    extra = round_width(len(keep), group.size, round_to) - len(keep)
    if extra <= 0:
        return keep
    removed = np.setdiff1d(np.arange(group.size, dtype=np.int64), np.asarray(keep, dtype=np.int64))
    return sorted(keep + _top(scores, removed, extra).tolist())


def _cover_members(group: Any, scores: torch.Tensor, keep: list[int], budget: int | None) -> list[int]:
    """Every member keeps ≥ 1 channel of the group (a concat branch or a conv coupled into a larger group
    could otherwise lose all its channels): add each uncovered member's best channel, then, within a
    ``budget``, drop the lowest-scoring channels no member depends on."""
    s = scores.double().numpy()
    kept = set(keep)
    sets = [set(m.channel[m.group == group.id].tolist()) for m in group.members]
    for chans in sets:
        if chans and not chans & kept:
            kept.add(max(chans, key=lambda c: (s[c], -c)))
    if budget is not None and len(kept) > budget:
        for c in sorted(kept - set(group.blocked), key=lambda c: (s[c], -c)):
            if len(kept) <= budget:
                break
            if all(len(ch & kept) > 1 for ch in sets if c in ch):
                kept.discard(c)
    return sorted(kept)


def _global_drop(pool: list, keep: dict[int, list[int]], ratio: float, rounding: str) -> None:
    """Remove the lowest normalised scores of the pooled groups, never a group's last channel."""
    gid = np.concatenate([p[0] for p in pool])
    ch = np.concatenate([p[1] for p in pool])
    ns = np.concatenate([p[2] for p in pool])
    remove = len(ch) - n_keep(len(ch), ratio, rounding)
    left = {int(g): int((gid == g).sum()) for g in np.unique(gid)}
    drop: dict[int, set[int]] = {g: set() for g in left}
    for i in np.lexsort((ch, gid, ns)).tolist():
        if remove <= 0:
            break
        g = int(gid[i])
        if left[g] > 1:
            left[g] -= 1
            drop[g].add(int(ch[i]))
            remove -= 1
    for g, d in drop.items():
        keep[g] = [c for c in keep[g] if c not in d]
