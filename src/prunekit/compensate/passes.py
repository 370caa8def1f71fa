"""Forward passes over a torch.fx trace that stop early and resume where an earlier pass stopped.

The reconstruction refits layers one after another, in execution order; before each refit it reads the
layer's input in the *compressed* network, which differs from the previous step's network only in the
layers just refit or re-selected. Running every pass from the network's input costs O(L²) layer
evaluations for L refit layers. :class:`ResumablePasses` keeps, per calibration batch, the values that
were still live when a pass stopped (a *cut* of the graph: the nodes computed so far that later nodes
read) together with a digest of every module and attribute those values depend on. A later pass, on a
network whose upstream modules hash the same, starts from the most advanced such cut: O(L) in total.

Cuts are bounded by ``max_bytes`` (oldest dropped first); values are cloned when a pass resumes, so an
in-place op of the model (``relu_``, ``+=``) cannot alter a saved cut.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from ..runtime import as_inputs

if TYPE_CHECKING:
    from .residual import Skip

__all__ = ["Cut", "CutStore", "ResumablePasses", "digest", "nbytes", "placeholders", "run_until"]


def digest(obj: Any, recurse: bool = True) -> bytes:
    """blake2b of a module's parameters and buffers (names, dtypes, shapes, bytes; with ``recurse=False`` its
    own only, not its submodules'), of a tensor, or of any other attribute's ``repr``."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(obj, torch.Tensor):
        items = [("", obj)]
    elif isinstance(obj, nn.Module):
        items = [*obj.named_parameters(recurse=recurse), *obj.named_buffers(recurse=recurse)]
    else:
        h.update(repr(obj).encode())
        return h.digest()
    for name, t in items:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def placeholders(graph: fx.Graph, inputs: Any) -> list[Any]:
    """Positional values of the graph's placeholders for ``inputs`` (tensor, tuple or dict of tensors)."""
    args, kwargs = as_inputs(inputs)
    holders = [n for n in graph.nodes if n.op == "placeholder"][len(args):]
    return [*args, *(kwargs[p.target] if p.target in kwargs else (p.args[0] if p.args else None)
                     for p in holders)]


def run_until(interpreter: fx.Interpreter, nodes: list[fx.Node], start: int, env: dict[fx.Node, Any],
              wanted: set[fx.Node], args: Iterable[Any] = ()) -> int:
    """Run ``nodes[start:]`` in ``interpreter`` on ``env`` until every node of ``wanted`` has a value in it;
    values past their last use are dropped (``wanted`` kept). Returns the index of the last node run
    (``start − 1`` when nothing had to run)."""
    interpreter.env = env
    interpreter.args_iter = iter(args)
    missing = {n for n in wanted if n not in env}
    last = start - 1
    for i in range(start, len(nodes)):
        if not missing:
            break
        node = nodes[i]
        env[node] = interpreter.run_node(node)
        missing.discard(node)
        for dead in interpreter.user_to_last_uses.get(node, ()):
            if dead not in wanted:
                env.pop(dead, None)
        last = i
    if missing:
        raise RuntimeError(f"fx nodes {sorted(n.name for n in missing)} were not reached")
    return last


@dataclass
class Cut:
    """What a pass had computed when it stopped at ``stop`` (per batch: ``envs[b]``), and the digests of
    everything it depends on."""

    stop: int
    digests: dict[str, bytes]
    envs: dict[int, Any] = field(default_factory=dict)
    nbytes: int = 0


def nbytes(values: Any) -> int:
    """Bytes of the tensors in ``values`` (a tensor, or a dict / tuple / list of them, nested)."""
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, dict):
        values = list(values.values())
    return sum(nbytes(v) for v in values) if isinstance(values, (list, tuple)) else 0


class CutStore:
    """Saved cuts of the networks passed to :meth:`bind` one after another, at most ``max_bytes`` of them
    (the oldest dropped first), and the digests of the bound network's modules (``digest_of``)."""

    def __init__(self, max_bytes: int, fetch: Callable[[nn.Module, str], bytes]):
        self.max_bytes, self.fetch = max_bytes, fetch
        self.cuts: list[Cut] = []
        self.model: nn.Module | None = None
        self._digests: dict[str, bytes] = {}
        self._recording: Cut | None = None

    def bind(self, model: nn.Module) -> bool:
        """Make ``model`` the current network; True when it was not already."""
        if model is self.model:
            return False
        self.model, self._digests, self._recording = model, {}, None
        return True

    def digest_of(self, name: str) -> bytes:
        if name not in self._digests:
            self._digests[name] = self.fetch(self.model, name)
        return self._digests[name]

    def best(self, b: int, fits: Callable[[Cut], bool]) -> Cut | None:
        """The most advanced cut that has batch ``b``, passes ``fits`` and whose digests match the network.
        Cuts whose digests do not match are dropped: the networks only move on (refits, re-selections), so
        a module that changed does not change back."""
        for cut in sorted(self.cuts, key=lambda c: -c.stop):
            if b not in cut.envs or not fits(cut):
                continue
            if all(self.digest_of(n) == d for n, d in cut.digests.items()):
                return cut
            self.cuts.remove(cut)
            if cut is self._recording:
                self._recording = None
        return None

    def save(self, stop: int, deps: Iterable[str], b: int, values: Any, size: Any = None) -> None:
        """Keep ``values`` as batch ``b`` of the current network's cut at ``stop`` (depending on ``deps``);
        what counts against ``max_bytes``: the tensors in ``size`` (default: in ``values``)."""
        if self.max_bytes <= 0:
            return
        rec = self._recording
        if rec is None or rec.stop != stop:
            digests = {name: self.digest_of(name) for name in sorted(deps)}
            rec = next((c for c in self.cuts if c.stop == stop and c.digests == digests), None)
            if rec is None:
                rec = Cut(stop, digests)
                self.cuts.append(rec)
            self._recording = rec
        if b in rec.envs:
            return
        rec.envs[b] = values
        rec.nbytes += nbytes(values if size is None else size)
        while sum(c.nbytes for c in self.cuts) > self.max_bytes and self.cuts:
            if self.cuts.pop(0) is rec:
                self._recording = None


class ResumablePasses:
    """Values of fx nodes of a sequence of networks that share ``graph`` (module docstring).

    Args:
        graph: a torch.fx trace with the networks' module names.
        max_bytes: the saved cuts' values stay below this (bytes); 0 turns resuming off.
    """

    def __init__(self, graph: fx.Graph, max_bytes: int):
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.first_call: dict[str, fx.Node] = {}  # module name -> its first call_module node
        for n in self.nodes:
            if n.op == "call_module":
                self.first_call.setdefault(str(n.target), n)
        self.upstream: dict[fx.Node, frozenset[str]] = {}
        for n in self.nodes:  # the modules and attributes every node's value depends on
            own = {str(n.target)} if n.op in ("call_module", "get_attr") else set()
            self.upstream[n] = frozenset(own.union(*(self.upstream[a] for a in n._input_nodes)))
        self.store = CutStore(max_bytes, lambda model, name: digest(self._interpreter.fetch_attr(name)))
        self._interpreter: fx.Interpreter | None = None
        self.nodes_run = 0  # evaluated nodes, all passes together (for tests and profiling)

    def inputs(self, model: nn.Module, name: str, skip: Skip | None, b: int, xb: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Module ``name``'s input in ``model`` on batch ``b`` and the value of its skip branch; None when the
        trace does not show the input as a node."""
        node = self.first_call.get(name)
        source = node.args[0] if node is not None and node.args else None
        if not isinstance(source, fx.Node):
            return None
        wanted = {source.name} | ({skip.partner} if skip is not None else set())
        values = self.values(model, wanted, b, xb)
        return values[source.name], (values[skip.partner] if skip is not None else None)

    def values(self, model: nn.Module, names: set[str], b: int, inputs: Any) -> dict[str, torch.Tensor]:
        """Values of the fx nodes ``names`` in ``model`` on calibration batch ``b`` (always the same ``inputs``
        for the same ``b``), resumed from the most advanced usable cut."""
        if self.store.bind(model):
            self._interpreter = fx.Interpreter(model, graph=self.graph)
        wanted = {self.by_name[n] for n in names}
        cut = self.store.best(b, lambda c: all(w in c.envs[b] or self.index[w] > c.stop for w in wanted))
        env = {} if cut is None else {n: v.clone() if isinstance(v, torch.Tensor) else v
                                      for n, v in cut.envs[b].items()}
        start = 0 if cut is None else cut.stop + 1
        with torch.no_grad():
            stop = run_until(self._interpreter, self.nodes, start, env, wanted,
                             placeholders(self.graph, inputs) if cut is None else ())
        self.nodes_run += stop - start + 1
        out = {w.name: env[w].detach() if isinstance(env[w], torch.Tensor) else env[w] for w in wanted}
        if stop >= start:
            self.store.save(stop, frozenset().union(*(self.upstream[n] for n in env)), b, dict(env))
        return out
