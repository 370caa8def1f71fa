"""ChannelGraph: which tensor dimensions of a model must shrink together, and which may be merged.

This file assembles the engine's pieces into the graph methods read: :meth:`ChannelGraph.build`
resolves ``ignored``/``leaf_modules`` (:func:`resolve_modules`), captures the model
(:mod:`~prunekit.engine.capture`), walks it over channel ids (:mod:`~prunekit.engine.walker`,
:mod:`~prunekit.engine.context`), then turns the union-find classes into numbered :class:`Group` s with
their members, protected channels and mergeability; it also answers lookups (group by id/name/module,
member) and prints a table.

* a **channel** is a union-find class of atoms: it is kept or removed as a whole;
* a **group** is a connected set of channels linked by producers (one producer's out channels, plus
  every producer unified with them by residual connections); its channels are numbered in the order of
  its first producer's output rows;
* a **member** is one module dimension (role ``out`` / ``in`` / ``norm``) with, per index, its group,
  group channel and ``pos``. Surgery slices every member by the kept channels.

Channels are **protected** (never pruned) when they touch something whose shape is fixed: the model
inputs and outputs (so the classifier head keeps its classes), constant channel padding (CIFAR ResNet
option A), fixed channel slices/splits, unknown ops, ignored modules. A group is **mergeable** when it
has a single producer and only positively homogeneous channel-wise ops (ReLU, LeakyReLU, BN right after
the producer, max/avg pooling, dropout, flatten, identity) lie between the producer and consumers that
can absorb ``W ×_in M`` (Conv with groups=1, Linear); the reason is recorded otherwise.
"""
from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..runtime import as_inputs, eval_mode, without_kv_cache
from .adapters import find_ties
from .capture import capture_graph, has_rule, is_leaf
from .channels import ROLES, Chan, Group, HeadSplit, Member, TensorInfo
from .context import TraceContext
from .rules import find_rule
from .walker import Walker

# Chan, TensorInfo and TraceContext are re-exported for code written against the one-file engine.
__all__ = ["Chan", "ChannelGraph", "Group", "Member", "TensorInfo", "TraceContext", "resolve_modules"]


def resolve_modules(model: nn.Module, specs: Iterable[Any] | None, what: str = "ignored") -> list[str]:
    """Module names matched by ``specs``: exact names, fnmatch patterns (``"layer1.*.conv1"``), module
    instances or module types. An entry that matches nothing is a :class:`ConfigError`."""
    if specs is None:
        return []
    if isinstance(specs, (str, nn.Module, type)):
        specs = [specs]
    named = [(n, m) for n, m in model.named_modules() if n]
    out: list[str] = []
    for spec in specs:
        if isinstance(spec, str):
            hits = [n for n, _ in named if n == spec] or [n for n, _ in named if fnmatch.fnmatchcase(n, spec)]
        elif isinstance(spec, nn.Module):
            hits = [n for n, m in named if m is spec]
        elif isinstance(spec, type):
            hits = [n for n, m in named if isinstance(m, spec)]
        else:
            raise ConfigError(f"{what} entries must be names, patterns, modules or types; got {spec!r}")
        if not hits:
            close = difflib.get_close_matches(str(spec), [n for n, _ in named], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{what} entry {spec!r} matches no module of {type(model).__name__}.{hint}")
        out += [h for h in hits if h not in out]
    return out


class ChannelGraph:
    """Coupled channel groups of a model; see the module docstring.

    Attributes:
        groups: list of :class:`Group`, ids ``0..len-1`` in trace order.
        members: every traced module dimension (:class:`Member`).
        mode: ``"fx"``, ``"record"`` or ``"export"`` (how the model was captured).
        head_splits: the (H·D) → (H, D) reshapes of attention heads (:class:`HeadSplit`).
        ignored: names of modules whose channels are protected.
        example_inputs: ``(args, kwargs)`` used to trace; surgery re-runs them to verify.
        output_shapes: shapes of the model outputs for those inputs.
    """

    def __init__(self, groups: list[Group], members: list[Member], mode: str, ignored: list[str],
                 example_inputs: tuple[tuple, dict], output_shapes: Any, module_kinds: dict[str, str],
                 head_splits: list[HeadSplit] | None = None):
        self.groups, self.members, self.mode, self.ignored = groups, members, mode, ignored
        self.example_inputs, self.output_shapes, self.module_kinds = example_inputs, output_shapes, module_kinds
        self.head_splits = head_splits or []
        self.unreached: list[str] = []  # modules with parameters the example inputs never reach

    # -- construction
    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any, *, ignored: Iterable[Any] | None = None,
              leaf_modules: Iterable[Any] | None = None, capture: str = "auto") -> ChannelGraph:
        """Trace ``model`` on ``example_inputs`` and group its channels. The model is not modified
        (it runs once in eval mode under no_grad; train/eval flags are restored).

        Args:
            ignored: modules whose produced channels are protected; a container protects every layer
                inside; a module without a rule (custom layer) becomes an opaque leaf (its inputs and
                outputs are protected too).
            leaf_modules: modules not traced into (opaque: inputs and outputs protected), e.g. a block
                with data-dependent control flow.
            capture: ``"auto"`` (torch.fx, then a recorded real run, then torch.export), ``"fx"``,
                ``"record"`` or ``"export"``.
        """
        if capture not in ("auto", "fx", "record", "export"):
            raise ConfigError(f"capture must be 'auto', 'fx', 'record' or 'export', got {capture!r}")
        args, kwargs = as_inputs(example_inputs)
        kwargs = without_kv_cache(model, args, kwargs)  # the trace (and surgery's check) build no cache
        names = resolve_modules(model, ignored, "ignored")
        leaves = set(resolve_modules(model, leaf_modules, "leaf_modules"))
        protect: set[str] = set()
        for n in names:
            m = model.get_submodule(n)
            if has_rule(m):
                protect.add(n)
                continue
            inner = [f"{n}.{c}" for c, sub in m.named_modules() if c and has_rule(sub)]
            if inner and not is_leaf(m, n, set()):
                protect.update(inner)
            else:
                leaves.add(n)
        with eval_mode(model):
            graph, shapes, out_shapes, mode, leaves = capture_graph(model, args, kwargs, leaves, set(names),
                                                                    capture)
            ctx = TraceContext(protect)
            opaque = {str(n.target) for n in graph.nodes if n.op == "call_module" and str(n.target) in leaves}
            walker = Walker(model, graph, shapes, ctx, opaque, mode)
            walker.run()
            _couple_tied_parameters(ctx, model)
        kinds = {n: type(m).__name__ for n, m in model.named_modules()}
        out = cls._finalize(ctx, mode, names, (args, kwargs), out_shapes, kinds, model)
        out.unreached = _unreached(model, graph)
        if out.unreached:
            shown = ", ".join(out.unreached[:5]) + (" ..." if len(out.unreached) > 5 else "")
            warnings.warn(f"the example inputs never reach {len(out.unreached)} module(s) with parameters of "
                          f"{type(model).__name__} ({shown}): their channels are not traced, so an input that "
                          "takes another branch (another shape, a flag) may fail on the pruned model; trace with "
                          "inputs that reach them, or ignore them", UserWarning, stacklevel=2)
        return out

    @classmethod
    def _finalize(cls, ctx: TraceContext, mode: str, ignored: list[str], inputs: tuple, out_shapes: Any,
                  kinds: dict[str, str], model: nn.Module) -> ChannelGraph:
        members = list(ctx.members.values())
        root = ctx.roots()
        roots = {id(m): root[np.asarray(m.atoms, dtype=np.int64)] for m in members}
        blocked = {int(root[a]): r for a, r in ctx.blocked.items()}
        tainted = {int(root[a]): r for a, r in ctx.tainted.items()}
        # connect channels through producers
        comp: dict[int, int] = {}

        def cfind(a: int) -> int:
            while comp.get(a, a) != a:
                comp[a] = comp.get(comp[a], comp[a])
                a = comp[a]
            return a

        producers = [m for m in members if m.role == "out" and m.fresh]
        for m in producers:
            r = roots[id(m)]
            base = cfind(int(r[0])) if len(r) else None
            for x in r.tolist()[1:]:
                rx = cfind(x)
                if rx != base:
                    comp[rx] = base
        group_of_comp: dict[int, int] = {}
        channel_of_root: dict[int, tuple[int, int]] = {}
        sizes: list[int] = []
        names: list[str] = []
        for m in producers:
            for x in roots[id(m)].tolist():
                if x in channel_of_root:
                    continue
                c = cfind(x)
                if c not in group_of_comp:
                    group_of_comp[c] = len(sizes)
                    sizes.append(0)
                    names.append(m.module)
                gid = group_of_comp[c]
                channel_of_root[x] = (gid, sizes[gid])
                sizes[gid] += 1
        for m in [*members, *ctx.head_splits]:
            pairs = [channel_of_root.get(int(x), (-1, -1)) for x in root[np.asarray(m.atoms, dtype=np.int64)].tolist()]
            m.group = np.array([p[0] for p in pairs], dtype=np.int64)
            m.channel = np.array([p[1] for p in pairs], dtype=np.int64)
        gblocked: list[dict[int, str]] = [{} for _ in sizes]
        gtaint: list[list[str]] = [[] for _ in sizes]
        for x, (gid, ch) in channel_of_root.items():
            if x in blocked:
                gblocked[gid][ch] = blocked[x]
            if x in tainted:
                gtaint[gid].append(tainted[x])
        by_group: list[list[Member]] = [[] for _ in sizes]
        for m in members:
            for gid in np.unique(m.group).tolist():
                if gid >= 0:
                    by_group[gid].append(m)
        groups: list[Group] = []
        for gid, (size, name) in enumerate(zip(sizes, names)):
            group = Group(gid, name, size, by_group[gid], dict(sorted(gblocked[gid].items())))
            group.merge_reason = _merge_reason(group, gtaint[gid], model)
            group.mergeable = group.merge_reason is None
            groups.append(group)
        return cls(groups, members, mode, ignored, inputs, out_shapes, kinds, ctx.head_splits)

    # -- queries
    def group(self, key: int | str) -> Group:
        """Group by id, by name, or by any member module name (producer preferred)."""
        if isinstance(key, int):
            if 0 <= key < len(self.groups):
                return self.groups[key]
            raise KeyError(f"no group {key} (graph has {len(self.groups)})")
        for g in self.groups:
            if g.name == key:
                return g
        for role in ROLES:
            for g in self.groups:
                if any(m.module == key and m.role == role for m in g.members):
                    return g
        raise KeyError(f"no group has module '{key}'")

    def member(self, module: str, role: str) -> Member | None:
        return next((m for m in self.members if m.module == module and m.role == role), None)

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if not g.protected]

    def describe(self) -> str:
        """A human table: one line per group."""
        rows = [(f"ChannelGraph ({self.mode}): {len(self.groups)} groups, "
                 f"{len(self.prunable_groups)} prunable")]
        for g in self.groups:
            state = "protected" if g.protected else f"{len(g.prunable)}/{g.size} prunable"
            merge = "mergeable" if g.mergeable else f"prune-only ({g.merge_reason})"
            why = f" [{next(iter(g.blocked.values()))}]" if g.blocked else ""
            mem = ", ".join(m.label for m in g.members)
            rows.append(f"  #{g.id} {g.name}: {state}, {merge}{why}\n      {mem}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (f"ChannelGraph(mode={self.mode!r}, groups={len(self.groups)}, "
                f"prunable={len(self.prunable_groups)})")


def _couple_tied_parameters(ctx: TraceContext, model: nn.Module) -> None:
    """A parameter shared by several modules (tied input/output embeddings, an encoder and a decoder
    sharing one embedding) is sliced once for all: per dim of the parameter, the channels every traced
    module sharing it slices are coupled; a dim only some of them slice (W and Wᵀ, a tied output layer's
    vocabulary) is protected."""
    ties = [names for names, _ in find_ties(model)]
    tie_of = {n: i for i, names in enumerate(ties) for n in names}
    found: list[list[tuple[int, Member]]] = [[] for _ in ties]
    for m in ctx.members.values():
        module = model.get_submodule(m.module)
        rule = find_rule(type(module)) if m.role != "param" else None
        for pname, dim in (rule.param_dims(module, m.role) if rule else {}).items():
            i = tie_of.get(f"{m.module}.{pname}")
            if i is not None:
                found[i].append((dim, m))
    for names, uses in zip(ties, found):
        owners = {m.module for _, m in uses}  # traced modules that own the tied parameter
        for dim in sorted({d for d, _ in uses}):
            on_dim = [m for d, m in uses if d == dim]
            if {m.module for m in on_dim} != owners or len({len(m) for m in on_dim}) > 1:
                ctx.block([m.atoms for m in on_dim], f"tied parameter '{names[0]}' is sliced on dim {dim} by "
                                                     "some of the modules sharing it only")
                continue
            for m in on_dim[1:]:
                ctx.unify(on_dim[0].atoms, m.atoms)


def _unreached(model: nn.Module, graph: Any) -> list[str]:
    """Modules owning parameters that the captured graph neither calls, nor reads a parameter of, nor
    holds inside a called module (parameters tied to reached ones count as reached)."""
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    read = {str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    reached_params = {id(p) for name in called for p in model.get_submodule(name).parameters()}
    reached_params |= {id(p) for name in read for p in model.get_submodule(name).parameters(recurse=False)}
    out = []
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not name or not own or name in called or name in read:
            continue
        if any(name.startswith(c + ".") for c in called):
            continue
        if all(id(p) in reached_params for p in own):
            continue
        out.append(name)
    return out


def _merge_reason(group: Group, taints: list[str], model: nn.Module) -> str | None:
    """None when a merge matrix may be absorbed by the group's consumers; else why not."""
    prods = [m for m in group.members if m.role == "out" and m.fresh]
    if len(prods) != 1:
        names = ", ".join(sorted({m.module for m in prods}))
        return f"{len(prods)} producers coupled (residual/concat): {names}"
    if group.blocked:
        return f"protected channels: {next(iter(group.blocked.values()))}"
    if taints:
        return taints[0]
    for m in group.members:
        if m.role != "in":
            continue
        module = model.get_submodule(m.module)
        rule = find_rule(type(module))
        if rule is None or not rule.can_merge_in(module):
            return f"consumer '{m.module}' ({m.kind}) cannot absorb a merge matrix"
        sel = m.group == group.id
        keys = set(zip(m.channel[sel].tolist(), m.pos[sel].tolist()))
        if len(keys) != int(sel.sum()):
            return f"consumer '{m.module}' reads a channel twice"
    return None
