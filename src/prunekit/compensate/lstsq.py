"""Data-light compensation (beyond the paper): ridge least-squares refit of the consumers of pruned groups.

Neuron Merging writes ``W ×_in M`` into every consumer of a pruned group with a merge matrix M
derived from weights only. With a few unlabeled calibration inputs, M can instead be *fitted*: the
compressed network's kept activations ``X_p`` (rows: samples × positions, P columns) should reproduce
the original network's activations ``X_o`` of all N channels, so that the consumers' pre-activations
``X_o W^T`` are matched by ``X_p (W M)^T``:

    [M^T; c^T] = argmin ||X_o − X_p M^T − 1 c^T||² + λ ||M − M_0||²

with ``λ = ridge · tr(X_pᵀX_p) / P`` and ``M_0`` the pruning matrix (identity on the kept channels; or the
Neuron Merging matrix with ``init="merge"``), so a large ridge falls back to plain pruning / merging.
The intercept ``c`` (N,) is used when every consumer's bias can absorb it exactly (Linear; conv
without padding): each consumer gets a :class:`~prunekit.engine.Refit` output offset ``W·c`` (taps
summed), which surgery adds to its bias. For a Linear consumer the fit is exactly the ridge refit of its pre-activations (least squares
is linear in the targets, so the optimum for targets ``X_o W^T`` is ``W M``); for a conv consumer it is
the refit restricted to channel mixing (a 1×1 M shared by every kernel tap).

Groups are fitted **layer by layer in execution order**. For group g, the network in which every
earlier group is already compensated (and g itself still whole) is run on the calibration inputs
next to the original; only Gram matrices are accumulated, batch by batch, over all positions
(``[X_c|1]ᵀ[X_c|1]`` (N+1)², ``[X_c|1]ᵀX_o`` and ``||X_o||²``), and both passes stop right after g's
last consumer. From them, for any kept set, the fit is one small solve. ``select="greedy"`` also picks
the kept set from the same statistics: forward selection of the channels that best reconstruct the
consumers' original pre-activation contributions ``X_o W_rᵀ`` (W_r: the consumer weights on the
group's channels, one row per output and kernel tap). No labels, no gradients.

The result is an ordinary :class:`~prunekit.engine.Plan` (dense merge matrices, refit offsets), applied
by the engine's surgery like any merge.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import ChannelGraph, GroupPlan, Plan, Refit, apply, find_rule
from ..engine.masks import member_keep
from ..engine.rules import LinearRule
from ..errors import ConfigError
from ..runtime import eval_mode
from .calibration import batches, calibration_inputs, call_order, module_inputs, take
from .neuron_merging import MatrixOptions, decompose_group, group_report, pruned_only

INITS = ("prune", "merge")
SELECTS = ("criterion", "greedy")


@dataclass(frozen=True)
class LstsqOptions:
    """Options of the least-squares compensation.

    Attributes:
        calibration: number of unlabeled calibration inputs (a seeded random subset of the data given).
        ridge: relative ridge: λ = ridge · mean eigenvalue of X_pᵀX_p.
        select: ``criterion`` (default: the survivors of the pruning criterion, as ``prune``/``merge``) or
            ``greedy`` (data-driven: forward selection of the channels whose calibration activations best
            reconstruct the consumers' original pre-activations; the number kept is unchanged).
        init: ``prune`` (default) or ``merge``: the matrix a large ridge falls back to.
        intercept: fit a per-channel offset where every consumer's bias can absorb it.
        batch_size: calibration batch size.
        seed: picks the calibration subset.
    """

    calibration: int = 1000
    ridge: float = 1e-2
    select: str = "criterion"
    init: str = "prune"
    intercept: bool = True
    batch_size: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, int) or isinstance(self.calibration, bool) or self.calibration < 1:
            raise ConfigError(f"calibration must be a positive number of inputs, got {self.calibration!r}")
        if not isinstance(self.ridge, (int, float)) or not self.ridge >= 0:
            raise ConfigError(f"ridge must be a non-negative number, got {self.ridge!r}")
        if self.select not in SELECTS:
            raise ConfigError(f"select must be one of {list(SELECTS)}, got {self.select!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def replace(self, **kw: Any) -> LstsqOptions:
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# where a group's channels sit in its consumers' inputs


@dataclass
class _Tap:
    """One consumer input of one group: which input indices hold which (pos, channel)."""

    module: str
    dim: int  # channel dim of the consumer's input (1 for conv, -1 for linear)
    orig: torch.Tensor  # (npos, N) input indices in the original model
    comp: torch.Tensor  # (npos, N) input indices in the compressed model (the group itself unpruned)


def _taps(model: nn.Module, graph: ChannelGraph, group_id: int, masks: dict[int, np.ndarray]) -> list[_Tap]:
    """The consumer inputs of group ``group_id`` in the original model and in the compressed model
    whose kept channels are ``masks`` (the group itself must be fully kept there)."""
    g = graph.groups[group_id]
    taps = []
    for m in g.members:
        if m.role != "in":
            continue
        sel = np.nonzero(m.group == g.id)[0]
        positions = np.unique(m.pos[sel])
        new_index = np.cumsum(member_keep(m, masks)) - 1
        orig = np.full((len(positions), g.size), -1, dtype=np.int64)
        for r, s in enumerate(positions.tolist()):
            here = sel[m.pos[sel] == s]
            orig[r, m.channel[here]] = here
        if (orig < 0).any():
            raise ConfigError(f"consumer '{m.module}' does not read every channel of group '{g.name}' at every "
                              "position; least-squares compensation cannot use it")
        module = model.get_submodule(m.module)
        dim = -1 if isinstance(find_rule(type(module)), LinearRule) else 1
        taps.append(_Tap(m.module, dim, torch.from_numpy(orig), torch.from_numpy(new_index[orig])))
    return taps


def _tap_weights(model: nn.Module, tap: _Tap) -> torch.Tensor:
    """(R, N): the consumer's weights on the group's channels, one row per (output, position or tap);
    ``X_o @ W_r^T`` are the per-row contributions to its pre-activations (identity when unknown)."""
    module = model.get_submodule(tap.module)
    w = getattr(module, "weight", None)
    n = tap.orig.shape[1]
    if isinstance(module, nn.Linear):
        return w.detach().double()[:, tap.orig].reshape(-1, n)  # (out·npos, N)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        wc = w.detach().double()[:, tap.orig[0]]  # (out, N, *k)
        return wc.movedim(1, -1).reshape(-1, n)
    return torch.eye(n, dtype=torch.float64)


def _rows(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Gather ``x[..., idx]`` along the channel dim → (samples·positions, idx.shape[1]) float64."""
    x = x.movedim(dim, -1) if dim != -1 else x
    return x[..., idx].reshape(-1, idx.shape[1]).double()


# ----------------------------------------------------------------------------------------------
# statistics, selection and the fit


@dataclass
class GroupStats:
    """Calibration statistics of one group: ``X_c`` (compressed network, all N channels, plus a constant
    column last) against ``X_o`` (original network): ``gram = [X_c|1]ᵀ[X_c|1]`` (N+1, N+1),
    ``cross = [X_c|1]ᵀX_o`` (N+1, N), ``energy = ||X_o||²``, ``rows`` = samples × positions."""

    gram: torch.Tensor
    cross: torch.Tensor
    energy: float
    rows: int


def group_stats(original: nn.Module, compressed: nn.Module, taps: list[_Tap], inputs: Any,
                batch_size: int) -> GroupStats:
    """Accumulate :class:`GroupStats` batch by batch (both forward passes stop after the last consumer)."""
    n = taps[0].orig.shape[1]
    gram = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    cross = torch.zeros(n + 1, n, dtype=torch.float64)
    energy, rows = 0.0, 0
    names = [t.module for t in taps]
    for xb in batches(inputs, batch_size):
        a = module_inputs(original, names, xb)
        b = module_inputs(compressed, names, xb)
        for t in taps:
            xo = _rows(a[t.module], t.dim, t.orig)
            xc = _rows(b[t.module], t.dim, t.comp)
            xc = torch.cat([xc, torch.ones(xc.shape[0], 1, dtype=xc.dtype)], 1)
            gram += xc.t() @ xc
            cross += xc.t() @ xo
            energy += float((xo * xo).sum())
            rows += xo.shape[0]
    return GroupStats(gram, cross, energy, rows)


def greedy_select(stats: GroupStats, weights: torch.Tensor, k: int, fixed: list[int] = (),
                  intercept: bool = True) -> list[int]:
    """Forward selection of ``k`` channels whose compressed-network activations best reconstruct the
    consumers' original pre-activation contributions ``X_o W_rᵀ`` (least squares, with the constant
    column pre-selected when ``intercept``), computed from the Gram matrices only. ``fixed`` channels
    (protected) are selected first. Returns the selected channels, sorted."""
    n = stats.cross.shape[1]
    g = stats.gram.clone()
    t = stats.cross @ weights.t()  # (N+1, R): [X_c|1]ᵀ X_o W_rᵀ
    scale = float(torch.diagonal(g)[:n].max()) if n else 1.0
    tiny = 1e-12 * max(scale, 1e-300)
    chosen: list[int] = []

    def take(j: int) -> None:
        nonlocal g, t
        d = g[j, j]
        if d > tiny:
            col = g[:, j].clone()
            t = t - torch.outer(col, t[j]) / d
            g = g - torch.outer(col, col) / d
        chosen.append(j)

    if intercept:
        take(n)
    for j in fixed:
        take(int(j))
    avail = torch.ones(n, dtype=torch.bool)
    avail[[c for c in chosen if c < n]] = False
    while len([c for c in chosen if c < n]) < k:
        diag = torch.diagonal(g)[:n]
        gain = (t[:n] ** 2).sum(1) / torch.where(diag > tiny, diag, torch.full_like(diag, float("inf")))
        gain = torch.where(avail, gain, torch.full_like(gain, -1.0))
        j = int(gain.argmax())
        avail[j] = False
        take(j)
    return sorted(c for c in chosen if c < n)


def fit_from_stats(stats: GroupStats, keep: list[int], m0: torch.Tensor, ridge: float,
                   intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Ridge solution for kept channels ``keep`` (M's column order): ``(M (N, P), shift (N,) or None,
    {"rel_error_init", "rel_error", "ridge_lambda"})``; errors are ``||X_o − X_p Mᵀ − 1cᵀ||² / ||X_o||²``
    on the calibration data for ``M_0`` and for the fit."""
    n = stats.cross.shape[1]
    p = len(keep)
    q = torch.as_tensor(list(keep) + ([n] if intercept else []), dtype=torch.long)
    gram, cross = stats.gram[q][:, q], stats.cross[q]
    lam = ridge * float(torch.trace(gram[:p, :p])) / max(p, 1)
    lam = lam if lam > 0 else ridge
    prior = torch.zeros(len(q), n, dtype=torch.float64)
    prior[:p] = m0.t()
    penalty = torch.full((len(q),), lam, dtype=torch.float64)
    if intercept:
        penalty[p] = 0.0  # the intercept is not shrunk
    a_mat = gram + torch.diag(penalty)
    rhs = cross + penalty[:, None] * prior
    try:
        sol = torch.linalg.solve(a_mat, rhs)
    except RuntimeError:  # singular (ridge 0 and rank-deficient activations)
        sol = torch.linalg.lstsq(a_mat, rhs).solution

    def err(coef: torch.Tensor) -> float:  # ||X_o − X_p coef||² from the Gram matrices
        e = stats.energy - 2 * float(torch.sum(coef * cross)) + float(torch.sum(coef * (gram @ coef)))
        return e / stats.energy if stats.energy > 0 else 0.0

    m = sol[:p].t().contiguous()
    shift = sol[p].contiguous() if intercept else None
    return m, shift, {"rel_error_init": err(prior), "rel_error": err(sol), "ridge_lambda": lam}


def _can_absorb(module: nn.Module) -> bool:
    """Whether a constant input offset folds exactly into the consumer's bias (Linear; conv without padding)."""
    if getattr(module, "bias", None) is None:
        return False
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        pad = module.padding
        return pad != "same" and (pad == "valid" or all(int(v) == 0 for v in pad))
    return False


def _intercept_offsets(model: nn.Module, taps: list[_Tap], shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per consumer: the output offset ``Σ_j W[:, j, taps] · shift(ch(j))`` of an input offset ``shift`` (N,)
    on the group's channels (exact for the consumers :func:`_can_absorb` accepts)."""
    out = {}
    for t in taps:
        w = model.get_submodule(t.module).weight.detach().double()
        cols = w[:, t.orig.reshape(-1)]  # (O, npos·N, *k)
        per_col = cols.reshape(cols.shape[0], cols.shape[1], -1).sum(2)  # taps summed
        out[t.module] = per_col @ shift.repeat(t.orig.shape[0])
    return out


def _prune_matrix(n: int, keep: list[int]) -> torch.Tensor:
    m = torch.zeros(n, len(keep), dtype=torch.float64)
    m[torch.as_tensor(keep, dtype=torch.long), torch.arange(len(keep))] = 1.0
    return m


def lstsq_plan(model: nn.Module, graph: ChannelGraph, plan: Plan, data: Any, options: LstsqOptions | None = None,
               *, matrix_options: MatrixOptions | None = None, progress: bool = False
               ) -> tuple[Plan, list[dict[str, Any]]]:
    """Fit merge matrices (and intercepts) for the planned groups of ``plan`` from calibration ``data``.

    Args:
        model: the original model (only read).
        graph: its :class:`ChannelGraph`.
        plan: survivors per group (with ``options.select="greedy"`` only their number is used);
            merge matrices, if any, are replaced.
        data: calibration inputs: a tensor (B, ...), a dict of tensors or a dataset (labels are never read).
        options: :class:`LstsqOptions`.
        matrix_options: Neuron Merging's matrix options for ``init="merge"`` (its M as the ridge prior).

    Returns:
        ``(plan, one report per planned group)``: the plan carries the fitted merge matrices, and the
        intercepts as :class:`~prunekit.engine.Refit` output offsets of the consumers. Groups the engine
        does not mark mergeable (a residual stream, a concat, ...) are pruned and reported with the reason.
    """
    options = options or LstsqOptions()
    inputs = calibration_inputs(data, options.calibration, options.seed)
    base = {gp.group_id: gp for gp in plan.groups}
    reports: dict[int, dict[str, Any]] = {}
    todo = []
    for gp in plan.groups:
        g = graph.groups[gp.group_id]
        rep = group_report(graph, gp)
        if rep["removed"] == 0:
            reports[g.id] = {**rep, "action": "kept", "merged": 0, "pruned": 0}
        elif not g.mergeable:
            reports[g.id] = pruned_only(rep, f"not mergeable: {g.merge_reason}")
        else:
            reports[g.id] = rep
            todo.append(gp)
    with eval_mode(model):
        order = call_order(model, take(inputs, slice(0, 1)))
    consumers = {gp.group_id: graph.groups[gp.group_id].consumers for gp in todo}
    todo.sort(key=lambda gp: min(order.get(c, 1 << 30) for c in consumers[gp.group_id]))
    done: dict[int, GroupPlan] = {}
    offsets: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(todo), desc="lstsq groups", leave=False, disable=not progress, file=sys.stderr)
    for gp in todo:
        g = graph.groups[gp.group_id]
        others = [done.get(gid, base[gid]) for gid in base if gid != g.id]
        masks = {o.group_id: np.isin(np.arange(graph.groups[o.group_id].size), o.keep) for o in others}
        compressed = apply(model, graph, _with_offsets(Plan(groups=others), offsets), verify=False)
        taps = _taps(model, graph, g.id, masks)
        intercept = options.intercept and all(_can_absorb(model.get_submodule(t.module)) for t in taps)
        with eval_mode(model, compressed):
            stats = group_stats(model, compressed, taps, inputs, options.batch_size)
        keep = list(gp.keep)
        if options.select == "greedy":
            weights = torch.cat([_tap_weights(model, t) for t in taps])
            keep = greedy_select(stats, weights, len(keep), fixed=sorted(g.blocked), intercept=intercept)
        if options.init == "merge":
            dec, _ = decompose_group(model, graph, gp.replace(keep=keep, merge=None), matrix_options)
            m0 = dec.merge if dec is not None else _prune_matrix(g.size, keep)
        else:
            m0 = _prune_matrix(g.size, keep)
        m, shift, errs = fit_from_stats(stats, keep, m0, options.ridge, intercept)
        done[g.id] = gp.replace(keep=keep, merge=m)
        if shift is not None:
            for name, v in _intercept_offsets(model, taps, shift).items():
                offsets[name] = offsets[name] + v if name in offsets else v
        reports[g.id].update(action="merged", merged=reports[g.id]["removed"], pruned=0, algorithm="lstsq",
                             select=options.select, intercept=intercept, consumers=[t.module for t in taps],
                             calibration_rows=stats.rows, **errs)
        bar.update(1)
    bar.close()
    groups = []
    for gid, planned in base.items():
        extra = {"lstsq": {k: v for k, v in reports[gid].items() if k not in ("group", "name", "size")}}
        gp = done.get(gid, planned)
        groups.append(gp.replace(provenance={**gp.provenance, **extra}))
    meta = {**plan.meta, "method": "lstsq", "lstsq": options.to_dict()}
    return _with_offsets(Plan(groups=groups, meta=meta, refits=list(plan.refits)), offsets), \
        [reports[gp.group_id] for gp in plan.groups]


def _with_offsets(plan: Plan, offsets: dict[str, torch.Tensor]) -> Plan:
    """``plan`` with the consumers' accumulated intercept offsets as refits."""
    return plan.with_refits([Refit(module=name, offset=v, provenance={"source": "lstsq intercept"})
                             for name, v in offsets.items()]) if offsets else plan
