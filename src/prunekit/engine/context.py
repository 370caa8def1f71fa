"""TraceContext: the mutable state of one trace, and the only API layer rules call while tracing.

It mints channel ids (atoms), couples them with a union-find (residual adds, chunks, shared modules),
records the module dimensions that read or write them (members), and marks channels as protected
(``block``: never pruned, with a reason) or not mergeable (``taint``). It also derives output layouts
for the shape-only ops that rules and the op walker share (reshape/flatten, softmax). It knows nothing of
fx graphs or of how a model is captured; :mod:`prunekit.engine.graph` turns its final state into groups.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .channels import Chan, HeadSplit, Member, TensorInfo

__all__ = ["TraceContext"]


class TraceContext:
    """State of one trace; :class:`~prunekit.engine.rules.LayerRule` s call its methods."""

    def __init__(self, protect: set[str]):
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.tainted: dict[int, str] = {}
        self.members: dict[tuple[str, str], Member] = {}
        self.head_splits: list[HeadSplit] = []
        self.protect = protect

    # -- union-find
    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def roots(self) -> np.ndarray:
        """Root of every atom at once (pointer jumping on the parent array): ``roots()[a] == find(a)``."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        for d in (self.blocked, self.tainted):
            if rb in d:
                reason = d.pop(rb)
                d.setdefault(ra, reason)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple atoms ``a[i]`` and ``b[i]`` (same length)."""
        for x, y in zip(a.tolist(), b.tolist()):
            self._union(x, y)

    def new_atoms(self, n: int, source: str | None = None) -> np.ndarray:
        """``n`` new atoms; a ``source`` reason marks them protected (input, padding, unknown op)."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if source is not None:
            for a in range(start, start + n):
                self.blocked[a] = source
        return np.arange(start, start + n, dtype=np.int64)

    def _atoms(self, x: Any) -> Iterator[int]:
        if isinstance(x, TensorInfo):
            x = x.chan
        if isinstance(x, Chan):
            yield from x.atoms.tolist()
        elif isinstance(x, np.ndarray):
            yield from x.tolist()
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from self._atoms(v)
        elif isinstance(x, dict):
            for v in x.values():
                yield from self._atoms(v)

    def block(self, x: Any, reason: str) -> None:
        """Protect every channel carried by ``x`` (Chan, TensorInfo, atoms, or containers of them)."""
        for a in self._atoms(x):
            self.blocked.setdefault(self.find(a), reason)

    def taint(self, x: Any, reason: str) -> None:
        """Mark the channels of ``x`` as not mergeable (an op that is not positively homogeneous)."""
        for a in self._atoms(x):
            self.tainted.setdefault(self.find(a), reason)

    # -- members
    def channels(self, x: TensorInfo, dim: int, size: int, owner: str) -> Chan:
        """Layout of ``x`` at ``dim`` (``size`` channels); untracked or mismatching layouts give new
        protected atoms (and protect what ``x`` carried)."""
        dim = dim % max(len(x.shape), 1)
        c = x.chan
        if c is not None and c.dim == dim and len(c) == size:
            return c
        if c is not None:
            self.block(c, f"'{owner}' reads dim {dim} of a tensor whose channels are on dim {c.dim}")
            reason = f"'{owner}' reads a dim that is not a traced channel dim"
        else:
            reason = f"input of '{owner}' comes from an untraced op"
        return Chan(dim, self.new_atoms(size, reason), np.zeros(size, dtype=np.int64))

    def member(self, owner: str, role: str, kind: str, chan: Chan, fresh: bool = False,
               param: str | None = None) -> None:
        """Register dimension ``role`` of module ``owner`` (a second call of a shared module couples);
        role ``param``: ``owner``'s parameter ``param`` along ``chan.dim``."""
        key = (owner if param is None else f"{owner}.{param}", role)
        old = self.members.get(key)
        if old is not None:
            if len(old) == len(chan):
                self.unify(old.atoms, chan.atoms)
            else:
                self.block([old.atoms, chan.atoms], f"module '{owner}' is called on different channel layouts")
        else:
            self.members[key] = Member(owner, role, kind, chan.atoms.copy(), chan.pos.copy(), fresh, param=param,
                                       axis=chan.dim if param is not None else None)
        if role != "in" and owner in self.protect:
            self.block(chan, f"module '{owner}' is ignored")

    def parameter(self, owner: str, name: str, shape: Sequence[int]) -> Chan | None:
        """Layout of parameter ``owner.name`` read by a functional op (a CLS token, a position embedding,
        a layer scale): channels on its last dim longer than 1 (protected unless an op ties them to a
        group's channels, e.g. ``x + pos``); the parameter becomes a ``param`` member sliced with them."""
        axes = [d for d, n in enumerate(shape) if n > 1]
        if not axes:
            return None
        axis = axes[-1]
        chan = Chan(axis, self.new_atoms(shape[axis]), np.zeros(shape[axis], dtype=np.int64))
        self.member(owner, "param", "Parameter", chan, param=name)
        return chan

    def consume(self, owner: str, kind: str, chan: Chan) -> None:
        self.member(owner, "in", kind, chan)

    def produce(self, owner: str, kind: str, n: int, dim: int, ndim: int, tile: int = 1) -> Chan:
        """``n`` fresh output channels of producer ``owner`` (tiled ``tile`` times for grouped convs)."""
        old = self.members.get((owner, "out"))
        if old is not None and old.fresh:
            return Chan(dim % ndim, old.atoms, old.pos, raw=True)
        chan = Chan(dim % ndim, self.new_atoms(n), np.zeros(n, dtype=np.int64), raw=True)
        if tile > 1:
            chan = chan.tile(tile)
        self.member(owner, "out", kind, chan, fresh=True)
        return chan

    def passthrough(self, x: TensorInfo, ph: bool, reason: str) -> Chan | None:
        """Element-wise op: same channels; taints them when not positively homogeneous."""
        if x.chan is None:
            return None
        if not ph:
            self.taint(x.chan, reason)
        return x.chan.with_(raw=False)

    def reshape(self, x: TensorInfo, out_shape: Sequence[int], where: str, owner: str | None = None) -> Chan | None:
        """Layout after view/reshape/flatten/unflatten/squeeze/unsqueeze, derived from the shapes.

        Channel dim kept (possibly moved), merged with trailing dims (flatten: each channel owns a
        contiguous block of k elements, ``pos`` = offset in the block), split back from such a block, or
        split into (H, D) heads: the D consecutive channels of each head are tied into one channel
        (a :class:`HeadSplit` is recorded for ``owner``, the module doing it). Anything else (a split
        whose outer part is not leading) protects the channels.
        """
        c = x.chan
        if c is None or not isinstance(out_shape, (tuple, list, torch.Size)):
            return None
        ins, outs = list(x.shape), list(out_shape)
        C = ins[c.dim]
        if C == 1:
            return None
        outer, inner = math.prod(ins[:c.dim]), math.prod(ins[c.dim + 1:])
        acc = 1
        for d, size in enumerate(outs):
            if acc == outer and size != 1:
                rest = math.prod(outs[d + 1:])
                if size == C and rest == inner:
                    return c.with_(dim=d)
                if size > C and size % C == 0 and rest * (size // C) == inner:
                    return c.repeat(size // C).with_(dim=d)
                if size < C and C % size == 0 and rest == inner * (C // size):
                    k = C // size
                    A, P = c.atoms.reshape(size, k), c.pos.reshape(size, k)
                    if (A == A[:, :1]).all() and (P == (P[:, :1] // k) * k + np.arange(k)).all():
                        return c.with_(dim=d, atoms=A[:, 0].copy(), pos=P[:, 0] // k)
                    return self._split_heads(c, d, size, k, owner)
                break
            acc *= size
            if acc > outer:
                break
        self.block(c, f"{where} reshapes the channel dim ({tuple(ins)} → {tuple(outs)})")
        return None

    def _split_heads(self, c: Chan, dim: int, heads: int, head_dim: int, owner: str | None) -> Chan:
        """(H·D) channels → H heads of D: tie each head's D channels (and positions) into one."""
        A = c.atoms.reshape(heads, head_dim)
        for j in range(1, head_dim):
            self.unify(A[:, j], A[:, 0])
        atoms = A[:, 0].copy()
        self.head_splits.append(HeadSplit(owner, atoms, head_dim))
        return Chan(dim, atoms, np.zeros(heads, dtype=np.int64), raw=False)

    def softmax(self, x: TensorInfo, dim: Any, where: str) -> Chan | None:
        c = x.chan
        if c is None:
            return None
        if dim is None or not isinstance(dim, int) or dim % len(x.shape) == c.dim:
            self.block(c, f"{where} normalises over the channel dim")
            return None
        self.taint(c, f"{where} is not positively homogeneous")
        return c.with_(raw=False)
