"""Whole-layer reconstruction: refit every consumer of a pruned group from a few unlabeled inputs.

Neuron Merging and :mod:`.lstsq` compensate with one channel-mixing matrix M (N × P) shared by all of a
group's consumers and all kernel taps. Here each consumer's *whole* weight over its kept inputs is refit
so that its output on the pruned network's inputs matches the original network's output:

    [W'; b'] = argmin_W,b  ‖Y_o − U(X_c) Wᵀ − 1 bᵀ‖² + λ ‖W − W_0‖²

* ``Y_o`` (rows × O): the consumer's output in the original network (rows = samples × output positions);
* ``U(X_c)`` (rows × D): its input in the compressed network (every earlier consumer already refit),
  kept channels only, unfolded into patches for a convolution (D = I'·k_h·k_w; Linear: D = I');
* ``W_0``: the original weight on the kept inputs (plain pruning), so a large λ falls back to pruning;
* ``λ = r · tr(UᵀU)/D``, with ``r`` chosen from a grid on a held-out part of the calibration inputs
  (plain least squares overfits small calibration sets), then refit on all of them;
* the intercept ``b'`` (not shrunk) becomes the consumer's bias, or, for a bias-free layer read only by a
  BatchNorm, a constant folded into that BN's running mean (exact in eval mode).

Consumers are refit **in execution order**; only Gram matrices ``[U|1]ᵀ[U|1]`` ((D+1)²) and
``[U|1]ᵀY_o`` ((D+1) × O) are accumulated, batch by batch, and both forward passes stop right after the
consumer. A Gram larger than ``max_gram_bytes`` is refused with a message naming the layer and its size.
Fewer rows than unknowns is fine (the ridge makes the system well-posed) and is flagged in the report.
Supported consumers: ``nn.Linear`` (any leading dims: token sequences too) and ``nn.Conv1d/2d`` including
grouped and depthwise convolutions (one solve per conv group); others are reported and left pruned.

The result is a :class:`~prunekit.engine.Plan` whose :class:`~prunekit.engine.Refit` records surgery
writes. No labels, no gradients.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import ChannelGraph, Plan, Refit, apply
from ..engine.costs import ChannelPrices
from ..engine.masks import keep_masks, member_keep
from ..engine.select import check_round_to
from ..errors import ConfigError
from ..runtime import eval_mode
from .allocate import Pool, allocate
from .batchnorm import batchnorm_refits
from .block_passes import BlockPasses, find_chains
from .calibration import calibration_inputs, call_order, n_inputs, output_positions, take
from .constants import followers
from .greedy import select_channels
from .layers import to_module_layout, weight_oi
from .normal_equations import Consumer, Normal, check_gram_size, conv_groups, solve, statistics, supported
from .passes import ResumablePasses
from .residual import Skip, find_skips
from .softmax_fit import logits_layer, logits_rows, max_rows, row_kl, softmax_refit
from .stream_skips import find_stream_skips
from .targets import Passes, Targets

RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SELECTIONS = ("criterion", "greedy", "global")


@dataclass(frozen=True)
class ReconstructOptions:
    """Options of :func:`reconstruct_plan`.

    Attributes:
        calibration: number of unlabeled calibration inputs (a seeded random subset of the data).
        ridge: relative ridge ``r`` (λ = r · mean eigenvalue of UᵀU), or None to choose it from
            ``ridge_grid`` on a held-out ``holdout`` fraction of the calibration inputs.
        intercept: fit a constant per output (into the bias, or the following BatchNorm's running mean).
        add_bias: give a bias-free ``nn.Linear`` (Llama's ``o_proj`` / ``down_proj``) a bias to hold the
            intercept, as FLAP's bias compensation does. The pruned model then has parameters its dense
            architecture lacks: a Hugging Face config cannot describe them (``save_pretrained`` is refused),
            ``prunekit.io`` reloads them.
        batch_size: calibration batch size.
        max_gram_bytes: refuse a consumer whose Gram matrices would exceed this (bytes, float64).
        select: ``criterion`` (the plan's survivors), ``greedy``: for every group read only by plain
            Linear/conv consumers, the same number of survivors chosen by forward selection of whole channels
            (a head: its D columns) against the consumers' outputs (:mod:`.greedy`); or ``global``: the
            MACs (``budget``) the plan removes from those groups are re-spent across them, channel by channel where
            the refit loses least per MAC (:mod:`.allocate`; the groups' sizes change, the total does not;
            the pool: the plan's groups that prune something or have a planned ratio above 0).
        budget: what ``select="global"`` keeps constant: ``macs`` (multiply-accumulates per sample: a channel's
            weights times its layers' output positions) or ``params``.
        round_to: with ``select="global"``, every re-allocated group keeps a multiple of this many channels (or
            all of them); the other selections keep the plan's widths (which ``make_plan`` rounds already).
        allocation_block: with ``select="global"``, at least this many channels leave a group per move (one
            joint block-OBS cost, one downdate); None: 1 below 1,024 channels (exact greedy elimination), N/128
            from there (measured on a 1,024- and a 2,048-wide group: the same refit error within 0.1 %, 9× and
            12× faster — one channel at a time the elimination is memory-bound).
        backward: greedy selection goes ``backward · P`` channels past P, then drops as many again, each time
            the one whose removal costs least (forward–backward, OBS-style costs; 0: forward only). Measured at
            0.25: LeNet-300-100 +0.25 pt at 0.7 (mean of 3 seeds), ResNet-20 ±0 at 0.5 and −0.3 at 0.7.
        weighted: in the greedy selection, weight each consumer output by how much the next layers read it
            (:func:`_downstream_weights`); measured: +0.25 pt on LeNet-300-100 at 0.8 (mean of 3 calibration
            seeds), −0.2 pt on ResNet-20, hence off by default.
        residual: for a consumer whose output (through at most one BatchNorm) is added to a skip branch,
            also correct the skip branch's drift (:mod:`.residual`).
        positions: at most this many output positions per input of a convolution enter the statistics (a
            seeded random subset, the same for every batch; None: all) — the rows are many more than the
            unknowns anyway, and the statistics cost is linear in them.
        max_cache_bytes: the original network's target rows of every layer are gathered in one pass and kept
            when they fit in this many bytes; otherwise recomputed per layer (one original pass each). The
            values the compressed network's passes keep to resume from (:mod:`.passes`, :mod:`.block_passes`)
            stay below it too (0: every pass from the input).
        bn_recalibrate: after the refits, re-estimate every BatchNorm's statistics on the calibration inputs
            (:mod:`.batchnorm`).
        layers: ``consumers`` (the layers that lose inputs) or ``all`` (also every later Linear/conv, whose
            inputs drift: the kept producers, the following blocks, the classifier).
        output_loss: how the layer that produces the model's logits is refit: ``kl`` — for the softmax it
            feeds, the second-order KL of :mod:`.softmax_fit` (from the least-squares refit, kept when the
            held-out inputs show it better: :func:`_refit_for_softmax`), ``mse`` — the logits by least squares
            like every other layer, or ``auto``: ``kl`` for a classifier (one logit vector per input), ``mse``
            for a token model. Measured (calibration seeds 0–4): LeNet-300-100 +0.3 / +0.5 points at 0.7 / 0.8
            on average; ResNet-20 and ViT within ±0.05 (least squares mostly kept); the byte-level Llama
            study's head: held-out KL to the original −6 %, perplexity 4.534 → 4.535, twice the method's time
            (hence ``auto``).
        temperature: τ of the softmax whose KL ``output_loss="kl"`` approximates (p = softmax(z/τ)).
        kl_mix: the plain squared error mixed into that objective (ε of :mod:`.softmax_fit`).
        seed: picks the calibration subset.
    """

    calibration: int = 1000
    ridge: float | None = None
    ridge_grid: tuple[float, ...] = RIDGE_GRID
    holdout: float = 0.2
    intercept: bool = True
    add_bias: bool = False
    batch_size: int = 100
    max_gram_bytes: int = 2 << 30
    layers: str = "all"
    select: str = "criterion"
    budget: str = "macs"
    round_to: int | None = None
    allocation_block: int | None = None
    residual: bool = True
    weighted: bool = False
    backward: float = 0.0
    bn_recalibrate: bool = False
    positions: int | None = 128
    max_cache_bytes: int = 1 << 30
    output_loss: str = "auto"
    temperature: float = 2.0
    kl_mix: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ConfigError(f"select must be one of {list(SELECTIONS)}, got {self.select!r}")
        check_round_to(self.round_to)
        if self.allocation_block is not None and (not isinstance(self.allocation_block, int)
                                                  or isinstance(self.allocation_block, bool)
                                                  or self.allocation_block < 1):
            raise ConfigError(f"allocation_block must be a positive integer or None, got {self.allocation_block!r}")
        if self.budget not in ("macs", "params"):
            raise ConfigError(f"budget must be 'macs' or 'params', got {self.budget!r}")
        if self.output_loss not in ("auto", "kl", "mse"):
            raise ConfigError(f"output_loss must be 'auto', 'kl' or 'mse', got {self.output_loss!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        if not (isinstance(self.kl_mix, (int, float)) and self.kl_mix > 0):
            raise ConfigError(f"kl_mix must be a positive number, got {self.kl_mix!r}")
        if self.layers not in ("consumers", "all"):
            raise ConfigError(f"layers must be 'consumers' or 'all', got {self.layers!r}")
        if not isinstance(self.calibration, int) or isinstance(self.calibration, bool) or self.calibration < 1:
            raise ConfigError(f"calibration must be a positive number of inputs, got {self.calibration!r}")
        if self.ridge is not None and not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ConfigError(f"ridge must be a non-negative number or None (chosen on held-out data), "
                              f"got {self.ridge!r}")
        if not self.ridge_grid or any(not r > 0 for r in self.ridge_grid):
            raise ConfigError(f"ridge_grid must be positive numbers, got {self.ridge_grid!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if self.positions is not None and (not isinstance(self.positions, int) or self.positions < 1):
            raise ConfigError(f"positions must be a positive integer or None, got {self.positions!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def replace(self, **kw: Any) -> ReconstructOptions:
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ridge_grid"] = list(self.ridge_grid)
        return d


def _n_train(options: ReconstructOptions, n_total: int) -> int:
    """Calibration inputs used for fitting; the rest (``holdout``) chooses the ridge."""
    if options.ridge is not None or n_total < 2:
        return n_total
    return n_total - max(1, round(options.holdout * n_total))


def _fit(c: Consumer, train: list[Normal], val: list[Normal], options: ReconstructOptions,
         intercept: bool, kept_out: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """New weight (O, I'/groups, *k) and intercept (O,) of one consumer from its statistics, and a report.

    Every output row is refit (rows are independent); the ridge is chosen, and errors are reported, on the
    outputs the plan keeps (``kept_out``, bool over O; None: all)."""
    blocks = c.blocks()
    k = c.taps
    priors = [c.prior(b[0], b[2]) for b in blocks]
    kept = torch.ones(c.weight.shape[0], dtype=torch.bool) if kept_out is None else torch.from_numpy(kept_out)
    masks = [kept[b[2]] for b in blocks]

    def residual(stats: list[Normal], coefs: list[torch.Tensor]) -> float:
        return sum(s.outputs(m).residual(x[:, m]) for s, x, m in zip(stats, coefs, masks))

    choose = options.ridge is None and all(v.rows for v in val)
    if choose:
        scores = {r: residual(val, [solve(t, p, r, intercept) for t, p in zip(train, priors)])
                  for r in options.ridge_grid}
        ridge = min(scores, key=lambda r: (scores[r], -r))
    else:
        ridge = options.ridge if options.ridge is not None else options.ridge_grid[len(options.ridge_grid) // 2]
    full = [t.absorb(v) for t, v in zip(train, val)]
    sols = [solve(s, p, ridge, intercept) for s, p in zip(full, priors)]
    if not intercept:  # plain pruning keeps the original bias; so does a refit without intercept
        for sol, p in zip(sols, priors):
            sol[-1] = p[-1]
    energy = max(sum(s.outputs(m).total() for s, m in zip(full, masks)), 1e-300)
    before, after = residual(full, priors) / energy, residual(full, sols) / energy
    o, width = c.weight.shape[0], max(len(b[0]) for b in blocks)  # a block that keeps no input
    weight = torch.cat([sol[:-1].t() if len(b[0]) == width else torch.zeros(len(b[2]), width * k, dtype=sol.dtype)
                        for sol, b in zip(sols, blocks)]).reshape(o, width, *c.weight.shape[2:])
    weight = to_module_layout(c.module, weight)
    bias = torch.cat([sol[-1] for sol in sols])
    rows, unknowns = full[0].rows, max(len(b[0]) for b in blocks) * k + 1
    report = {"module": c.name, "rows": rows, "unknowns": unknowns, "underdetermined": rows < unknowns,
              "ridge": ridge, "ridge_chosen": choose, "rel_error_pruned": before, "rel_error": after,
              "intercept": intercept, "conv_groups": c.groups, "outputs_kept": int(kept.sum())}
    return weight, bias, report


def _downstream_weights(model: nn.Module, graph: ChannelGraph, name: str) -> torch.Tensor | None:
    """Per output of ``name``: how much an error there moves the next layers — the squared norm of the
    consumers' weight columns that read it (times (γ/σ)² of a BatchNorm in between); None when unknown."""
    out_m = graph.member(name, "out")
    if out_m is None:
        return None
    weights = np.zeros(len(out_m))
    for gid in np.unique(out_m.group[out_m.group >= 0]).tolist():
        g = graph.groups[gid]
        per_channel = np.zeros(g.size)
        for m in g.members:
            module = model.get_submodule(m.module)
            sel = np.nonzero(m.group == gid)[0]
            if m.role == "in" and supported(module) is None and conv_groups(module) == 1:
                w = weight_oi(module).double()
                cols = (w.transpose(0, 1).reshape(w.shape[1], -1) ** 2).sum(1).numpy()
                np.add.at(per_channel, m.channel[sel], cols[sel])
        for m in g.members:
            module = model.get_submodule(m.module)
            if m.role == "norm" and getattr(module, "running_var", None) is not None and module.weight is not None:
                sel = np.nonzero(m.group == gid)[0]
                s = (module.weight.detach().double() ** 2 / (module.running_var.double() + module.eps)).numpy()
                per_channel[m.channel[sel]] *= s[sel]
        here = out_m.group == gid
        weights[here] = per_channel[out_m.channel[here]]
    if not weights.any():
        return None
    return torch.from_numpy(weights / weights[weights > 0].mean()).clamp_min(1e-6)


def _kept_outputs(graph: ChannelGraph, plan: Plan, name: str) -> np.ndarray | None:
    """Bool over ``name``'s outputs: those the plan keeps (None when its outputs are in no group)."""
    member = graph.member(name, "out")
    return None if member is None else member_keep(member, keep_masks(graph, plan).masks)


# ----------------------------------------------------------------------------------------------
# the plan


def _layers_to_refit(model: nn.Module, graph: ChannelGraph, masks: list[np.ndarray], order: dict[str, int],
                     layers: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The layers to refit, in execution order, and reports for the consumers that cannot be.

    ``consumers``: every module that loses input channels. ``all``: also every other Linear/conv called
    after the first of them (their inputs drift: kept producers, later blocks, the classifier)."""
    todo, reports = [], []
    for m in graph.members:
        if m.role != "in" or member_keep(m, masks).all():
            continue
        if (why := supported(model.get_submodule(m.module))) is not None:
            reports.append({"module": m.module, "action": "pruned", "reason": why})
        else:
            todo.append(m.module)
    if layers == "all" and todo:
        first = min(order.get(name, 1 << 30) for name in todo)
        todo += [name for name, module in model.named_modules()
                 if name not in todo and order.get(name, -1) > first and supported(module) is None]
    return sorted(set(todo), key=lambda name: order.get(name, 1 << 30)), reports


def _consumer(model: nn.Module, graph: ChannelGraph, masks: list[np.ndarray], name: str) -> Consumer:
    module = model.get_submodule(name)
    member = graph.member(name, "in")
    if member is not None:
        keep = member_keep(member, masks)
    else:
        n_in = weight_oi(module).shape[1] * conv_groups(module)
        keep = np.ones(n_in, dtype=bool)
    return Consumer(name, module, keep, conv_groups(module))


def _channel_blocks(member: Any, gid: int, n_channels: int, taps: int) -> torch.Tensor | None:
    """(N, m·k): the weight-input columns of each of group ``gid``'s N channels in the consumer of ``member``
    (m inputs per channel — a head's D, a flattened map's positions —, k taps each); None when the
    channels own different numbers of inputs."""
    sel = np.nonzero(member.group == gid)[0]
    counts = np.bincount(member.channel[sel], minlength=n_channels)
    if len(sel) == 0 or (counts != counts[0]).any():
        return None
    idx = sel[np.lexsort((member.pos[sel], member.channel[sel]))].reshape(n_channels, counts[0])
    return torch.as_tensor((idx[:, :, None] * taps + np.arange(taps)).reshape(n_channels, -1), dtype=torch.long)


def _selectable(model: nn.Module, graph: ChannelGraph, gid: int) -> bool:
    """Group ``gid``'s survivors can be chosen from its consumers' statistics: every consumer is a refittable,
    ungrouped layer that reads this group alone, every channel owning the same number of its inputs."""
    g = graph.groups[gid]
    consumers = [m for m in g.members if m.role == "in"]
    for m in consumers:
        module = model.get_submodule(m.module)
        if supported(module) is not None or conv_groups(module) != 1 or (m.group != gid).any() \
                or _channel_blocks(m, gid, g.size, 1) is None:
            return False
    return bool(consumers)


def _greedy_group(model: nn.Module, graph: ChannelGraph, name: str, plan: Plan) -> int | None:
    """The planned group whose survivors the greedy selection picks when ``name`` is refit (None: none)."""
    member = graph.member(name, "in")
    if member is None or len(member) == 0:
        return None
    gids = np.unique(member.group)
    if len(gids) != 1 or gids[0] < 0:
        return None
    gp = plan.group(int(gids[0]))
    if gp is None or len(gp.keep) == graph.groups[gp.group_id].size:
        return None
    return gp.group_id if _selectable(model, graph, gp.group_id) else None


def _group_statistics(model: nn.Module, graph: ChannelGraph, gid: int, targets: Targets, compressed: nn.Module,
                      n_train: int, options: ReconstructOptions, skips: dict[str, Skip],
                      passes: Passes | None
                      ) -> list[tuple[Consumer, torch.Tensor, list[Normal], list[Normal]]]:
    """Per consumer of group ``gid``: (the consumer over all its inputs, its channel blocks, its train and
    held-out statistics with ``compressed`` as the network it reads from)."""
    g = graph.groups[gid]
    out = []
    for m in g.members:
        if m.role != "in":
            continue
        c = Consumer(m.module, model.get_submodule(m.module), np.ones(len(m), dtype=bool), 1)
        check_gram_size(c, options.max_gram_bytes)
        with eval_mode(model, compressed):
            train, val = statistics(targets, compressed, c, n_train, skips.get(m.module), passes)
        out.append((c, _channel_blocks(m, gid, g.size, c.taps), train, val))
    return out


def _select_greedy(model: nn.Module, graph: ChannelGraph, plan: Plan, gid: int, targets: Targets,
                   options: ReconstructOptions, intercept: bool, n_train: int, skips: dict[str, Skip],
                   passes: Passes | None
                   ) -> tuple[list[int], dict[str, tuple[Normal, Normal]]]:
    """Survivors of group ``gid`` by forward selection against its consumers' outputs (:mod:`.greedy`),
    from the network in which every earlier decision is applied and ``gid`` is whole.

    Returns the survivors and, per consumer, its (train, held-out) statistics over *all* the group's
    channels: pruning ``gid`` does not change the kept channels' values, so the refits reuse them."""
    g = graph.groups[gid]
    whole = Plan(groups=[gp for gp in plan.groups if gp.group_id != gid], refits=list(plan.refits))
    compressed = apply(model, graph, whole, verify=False)
    stats, cache = [], {}
    for c, blocks, (train,), (val,) in _group_statistics(model, graph, gid, targets, compressed, n_train, options,
                                                        skips, passes):
        cache[c.name] = (train, val)
        full = Normal(train.gram + val.gram, train.cross + val.cross, train.energy + val.energy,
                       train.rows + val.rows)
        if options.weighted and (w := _downstream_weights(model, graph, c.name)) is not None:
            full = full.weighted(w)
        kept = _kept_outputs(graph, plan, c.name)
        if kept is not None:  # only the outputs that survive matter
            full = full.outputs(torch.from_numpy(kept))
        stats.append((full.gram, full.cross, blocks))
    keep = select_channels(stats, len(plan.group(gid).keep), forced=sorted(g.blocked), intercept=intercept,
                           extra=options.backward)
    return keep, cache


def _writes_into_stream(graph: ChannelGraph, name: str) -> bool:
    """``name``'s outputs are channels that layers reading *different* inputs write too — a residual stream
    (every output and down projection of a transformer, every block's last conv of a ResNet stage) — so
    errors there share units. Parallel projections of one input (q/k/v, gate/up) are not a stream."""
    member = graph.member(name, "out")
    if member is None or not (member.group >= 0).any():
        return False
    gids = set(np.unique(member.group[member.group >= 0]).tolist())
    writers = {m.module for gid in gids for m in graph.groups[gid].members if m.role == "out"}

    def reads(module: str) -> tuple[int, ...] | None:
        m = graph.member(module, "in")
        return None if m is None else tuple(sorted(set(m.group.tolist())))

    return len({reads(w) for w in writers}) > 1


def _select_global(model: nn.Module, graph: ChannelGraph, plan: Plan, inputs: Any, options: ReconstructOptions,
                   passes: Passes | None) -> tuple[Plan, dict[str, Any]]:
    """The plan with the survivors of every selectable pruned group re-chosen together (:mod:`.allocate`) from
    the unpruned network's statistics, the MACs (or parameters) they remove kept; and a summary for the report."""
    pool_ids = [gp.group_id for gp in plan.groups
                if ((gp.ratio or 0) > 0 or len(gp.keep) < graph.groups[gp.group_id].size)
                and _selectable(model, graph, gp.group_id)]
    if not pool_ids:
        return plan, {}
    names = [m.module for gid in pool_ids for m in graph.groups[gid].members if m.role == "in"]
    targets = Targets(model, names, inputs, options.batch_size, options.positions, options.seed, {}, None,
                      options.max_cache_bytes)
    positions = None
    if options.budget == "macs":
        members = sorted({m.module for gid in pool_ids for m in graph.groups[gid].members})
        with eval_mode(model):
            positions = output_positions(model, members, inputs)
    follow = followers(model)
    prices = ChannelPrices(model, graph, pool_ids, positions)
    whole = {gid: torch.ones(graph.groups[gid].size, dtype=torch.bool) for gid in pool_ids}
    pools = {}
    for gid in pool_ids:
        g = graph.groups[gid]
        stats = []
        for c, blocks, (train,), _ in _group_statistics(model, graph, gid, targets, model, options.calibration,
                                                        options, {}, passes):
            if c.name in follow:  # errors in the units after the BatchNorm: (γ/σ)² per output
                bn = model.get_submodule(follow[c.name])
                scale = (bn.running_var.double() + bn.eps).reciprocal()
                train = train.weighted(scale * bn.weight.detach().double() ** 2 if bn.weight is not None else scale)
            kept = _kept_outputs(graph, plan, c.name)
            full = train if kept is None else train.outputs(torch.from_numpy(kept))
            if not _writes_into_stream(graph, c.name):  # a chain: its own units, as a fraction of its output
                full = full.weighted(torch.full_like(full.energy, 1.0 / max(full.total(), 1e-300)))
            stats.append((full.gram, full.cross, blocks))
        block = options.allocation_block or (1 if g.size < 1024 else g.size // 128)
        pools[gid] = Pool(stats, prices.of(gid, whole), forced=sorted(g.blocked), multiple=options.round_to or 1,
                          block=block)
    budget = prices.removed({gid: plan.group(gid).keep for gid in pool_ids},
                            {gid: graph.groups[gid].size for gid in pool_ids})
    keep = allocate(pools, budget, prices=prices)
    groups = [gp.replace(keep=keep[gp.group_id], criterion="global") if gp.group_id in keep else gp
              for gp in plan.groups]
    summary = {"groups": len(pools), "budget": options.budget, "budget_removed": budget,
               "kept": {str(gid): len(keep[gid]) for gid in pools},
               "planned": {str(gid): len(plan.group(gid).keep) for gid in pools}}
    return Plan(groups=groups, meta=dict(plan.meta), refits=list(plan.refits)), summary


def _passes(model: nn.Module, probe: Any, options: ReconstructOptions
            ) -> tuple[dict[str, Skip], Any, Passes | None]:
    """(residual skips, the fx trace, what resumes the compressed network's passes): on the trace when the
    model traces; else from its chains of blocks (transformers), with the skips found inside them
    (:mod:`.stream_skips`); else nothing (every pass from the input, no residual targets)."""
    with eval_mode(model):
        skips, fx_graph = find_skips(model, probe)
        if fx_graph is not None:
            passes = ResumablePasses(fx_graph, options.max_cache_bytes)
        else:
            chains = find_chains(model, probe)
            passes = BlockPasses(chains, options.max_cache_bytes) if chains else None
            if chains and options.residual:
                skips = find_stream_skips(model, chains, probe)
    return (skips if options.residual else {}), fx_graph, passes


def _restrict(stats: Normal, inputs: np.ndarray, k: int) -> Normal:
    """``stats`` of a consumer over all its inputs, reduced to the inputs ``inputs`` (bool; k columns each)."""
    cols = (np.nonzero(inputs)[0][:, None] * k + np.arange(k)[None, :]).reshape(-1)
    idx = torch.as_tensor(np.append(cols, stats.gram.shape[0] - 1), dtype=torch.long)
    return Normal(stats.gram[idx][:, idx], stats.cross[idx], stats.energy, stats.rows)


def _significant_gain(gains: dict[float, torch.Tensor]) -> tuple[float, bool]:
    """(ridge, whether it beats least squares): ``gains[r]`` are the per-input changes of the held-out KL
    (negative: better). The largest ridge within one standard error of the best mean (the one-standard-error
    rule), kept only when its mean gain is below zero by two standard errors."""
    stats = {r: (float(d.mean()), float(d.std()) / max(len(d), 1) ** 0.5 if len(d) > 1 else float("inf"))
             for r, d in gains.items()}
    best = min(stats, key=lambda r: stats[r][0])
    ridge = max(r for r, (m, _) in stats.items() if m <= stats[best][0] + stats[best][1])
    mean, se = stats[ridge]
    return ridge, mean + 2 * se < 0


def _held_out_softmax_ridge(x: torch.Tensor, u: torch.Tensor, z: torch.Tensor, owner: torch.Tensor,
                            held: torch.Tensor, prior: torch.Tensor, prior_t: torch.Tensor, rep: dict[str, Any],
                            options: ReconstructOptions, kw: dict[str, Any]
                            ) -> tuple[float, bool, torch.Tensor, dict[str, Any]]:
    """(ridge, significant, its Θ on the training rows, report entries): the least-squares refit and the softmax
    fit at every ridge of the grid, both fitted on the rows of the training inputs, compared by the held-out
    inputs' KL (a token model's rows averaged per input) — :func:`_significant_gain`."""
    fit, check, fixed = ~held, held, kw["fixed_bias"]

    def per_input_kl(theta: torch.Tensor) -> torch.Tensor:
        kl = row_kl(z[check], u[check] @ theta.t() + fixed)
        _, inv, counts = torch.unique(owner[check], return_inverse=True, return_counts=True)
        return torch.zeros(len(counts), dtype=kl.dtype).index_add_(0, inv, kl) / counts

    ls = Normal.zeros(x.shape[1], z.shape[1])
    ls.add(x[fit], z[fit] - fixed)
    ls_theta = solve(ls, prior, rep["ridge"], rep["intercept"]).t()
    ls_theta = ls_theta if rep["intercept"] else ls_theta[:, :-1]
    base = per_input_kl(ls_theta)
    gains, thetas, start = {}, {}, None
    for r in sorted(options.ridge_grid, reverse=True):  # each solve starts from the previous ridge's solution
        thetas[r] = start = softmax_refit(u[fit], z[fit], ls_theta, prior_t, r, start=start, **kw)[0]
        gains[r] = per_input_kl(start) - base
    ridge, significant = _significant_gain(gains)
    return ridge, significant, thetas[ridge], {"kl_ridge": ridge, "kl_held_out": float((base + gains[ridge]).mean()),
                                               "kl_held_out_least_squares": float(base.mean())}


def _refit_for_softmax(model: nn.Module, graph: ChannelGraph, plan: Plan, todo: list[str],
                       reports: list[dict[str, Any]], targets: Targets, passes: Passes | None,
                       options: ReconstructOptions) -> Plan:
    """``plan`` with the refit layer that produces the model's logits (if any) refit again, from its
    least-squares refit, for the softmax it feeds (:mod:`.softmax_fit`; with ``output_loss="auto"`` only when
    it makes one logit vector per input); its report gains the KL before and
    after. The ridge is chosen on the held-out calibration inputs by their KL at temperature 1
    (:func:`_significant_gain`), and the least-squares refit stays unless the softmax fit beats it there by two
    standard errors. Unchanged when no refit layer's output is the logits, or the layer loses outputs."""
    found = logits_layer(model, take(targets.inputs, slice(0, 1)), todo)
    if found is None or (options.output_loss == "auto" and found[1] > 1):  # auto: classifiers only
        return plan
    name = found[0]
    refit = next((r for r in plan.refits if r.module == name), None)
    rep = next((r for r in reports if r.get("module") == name and r.get("action") == "refit"), None)
    if refit is None or rep is None or refit.weight is None or refit.norm is not None \
            or rep["outputs_kept"] != refit.weight.shape[0]:
        return plan
    c = _consumer(model, graph, keep_masks(graph, plan).masks, name)
    (local_in, _, out_rows), = c.blocks()
    prior = c.prior(local_in, out_rows)  # (D+1, C), the original bias last
    limit = max_rows(*prior.t().shape)
    if limit < prior.shape[0]:  # fewer rows than inputs per class: too large to fit for the softmax here
        rep.update(output_loss="mse", softmax_skipped=f"{prior.shape[1]} classes × {prior.shape[0]} inputs "
                   f"allow {limit} rows under MAX_PRODUCT_MACS")
        return plan
    compressed = apply(model, graph, plan, verify=False)
    x, z, owner = logits_rows(targets, compressed, name, passes, options.max_cache_bytes, options.seed, limit)
    w0 = refit.weight.reshape(refit.weight.shape[0], -1).double()
    b0 = refit.bias if refit.bias is not None else refit.offset
    intercept = rep["intercept"]
    fixed = torch.zeros(z.shape[1], dtype=torch.float64) if intercept or b0 is None else b0.double()
    u = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if intercept else x
    theta0 = torch.cat([w0, b0.double()[:, None]], 1) if intercept else w0
    prior_t = prior.t() if intercept else prior[:-1].t()
    kw = {"fixed_bias": fixed, "temperature": options.temperature, "eps": options.kl_mix}
    held = owner >= _n_train(options, n_inputs(targets.inputs))
    ridge, chosen, start = rep["ridge"] if options.ridge is None else options.ridge, {}, None
    if options.ridge is None and held.any() and (~held).any():
        ridge, significant, start, chosen = _held_out_softmax_ridge(x, u, z, owner, held, prior, prior_t, rep,
                                                                    options, kw)
        if not significant:
            rep.update(output_loss="mse", **chosen)  # the softmax-weighted fit does not generalise better
            return plan
    theta, fitted = softmax_refit(u, z, theta0, prior_t, ridge, start=start, **kw)
    fitted = {**fitted, "kl_ridge": ridge, "kl_rows": int(u.shape[0]), **chosen}
    weight = theta[:, :w0.shape[1]].reshape(refit.weight.shape).to(refit.weight.dtype)
    new = replace(refit, weight=weight, provenance={**refit.provenance, **fitted})
    if intercept:
        new = replace(new, **{"bias" if refit.bias is not None else "offset": theta[:, -1].to(b0.dtype)})
    rep.update(fitted)
    return plan.with_refits([new])


def reconstruct_plan(model: nn.Module, graph: ChannelGraph, plan: Plan, data: Any,
                     options: ReconstructOptions | None = None, *, progress: bool = False
                     ) -> tuple[Plan, list[dict[str, Any]]]:
    """Refit every consumer that loses inputs under ``plan`` (see the module docstring).

    Args:
        model: the original model (only read).
        graph: its :class:`ChannelGraph`.
        plan: the survivors (with ``select="greedy"`` only their number, for the groups it applies to).
        data: calibration inputs: a tensor, a dict of tensors (token models) or a dataset; labels unused.
        options: :class:`ReconstructOptions`.

    Returns:
        ``(plan with Refit records, one report per refit layer)``.
    """
    options = options or ReconstructOptions()
    inputs = calibration_inputs(data, options.calibration, options.seed)
    n_total = options.calibration
    allocation: dict[str, Any] = {}
    skips, fx_graph, passes = _passes(model, take(inputs, slice(0, 1)), options)
    if options.select == "global":
        plan, allocation = _select_global(model, graph, plan, inputs, options, passes)
    with eval_mode(model):
        order = call_order(model, take(inputs, slice(0, 1)))
    todo, reports = _layers_to_refit(model, graph, keep_masks(graph, plan).masks, order, options.layers)
    follow = followers(model) if options.intercept else {}
    targets = Targets(model, todo, inputs, options.batch_size, options.positions, options.seed, skips, fx_graph,
                      options.max_cache_bytes)
    n_train, cached = _n_train(options, n_total), {}
    plan = Plan(groups=list(plan.groups), meta=dict(plan.meta), refits=list(plan.refits))
    selected: set[int] = set()
    bar = tqdm(total=len(todo), desc="reconstruct", leave=False, disable=not progress, file=sys.stderr)
    for name in todo:
        module = model.get_submodule(name)
        norm = follow.get(name) if module.bias is None else None
        intercept = options.intercept and (module.bias is not None or norm is not None
                                           or (options.add_bias and isinstance(module, nn.Linear)))
        gid = _greedy_group(model, graph, name, plan) if options.select in ("greedy", "global") else None
        if gid is not None and gid not in selected:
            keep, cached = _select_greedy(model, graph, plan, gid, targets, options, intercept, n_train, skips,
                                          passes)
            plan.groups = [gp.replace(keep=keep, criterion=options.select) if gp.group_id == gid else gp
                           for gp in plan.groups]
            selected.add(gid)
        c = _consumer(model, graph, keep_masks(graph, plan).masks, name)
        check_gram_size(c, options.max_gram_bytes)
        if name in cached:  # gathered by the greedy selection, over all the group's channels
            train, val = ([_restrict(s, c.keep, c.taps)] for s in cached.pop(name))
        else:
            compressed = apply(model, graph, plan, verify=False)
            with eval_mode(model, compressed):
                train, val = statistics(targets, compressed, c, n_train, skips.get(name), passes)
        weight, bias, rep = _fit(c, train, val, options, intercept, _kept_outputs(graph, plan, name))
        if module.bias is not None:
            refit = Refit(module=name, weight=weight, bias=bias)
        elif intercept:
            refit = Refit(module=name, weight=weight, offset=bias, norm=norm)
        else:
            refit = Refit(module=name, weight=weight)
        refit.provenance = {k: v for k, v in rep.items() if k != "module"}
        plan = plan.with_refits([refit])
        reports.append({**rep, "action": "refit", "norm": norm, "selected": "greedy" if gid is not None else None,
                        "residual_target": name in skips})
        bar.update(1)
    bar.close()
    if options.output_loss != "mse":
        plan = _refit_for_softmax(model, graph, plan, todo, reports, targets, passes, options)
    if options.bn_recalibrate:
        plan = plan.with_refits(batchnorm_refits(model, graph, plan, inputs, options.batch_size))
    plan.meta.update(method="reconstruct", reconstruct=options.to_dict())
    if allocation:
        plan.meta["allocation"] = allocation
    return plan, reports
