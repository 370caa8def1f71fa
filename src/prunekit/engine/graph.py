"""ChannelGraph: which tensor dimensions of a model must shrink together, and which may be merged.

Model
-----
Every channel index of every traced tensor carries an **atom**. A producer (Conv with groups=1,
Linear, Embedding) creates N fresh atoms for its N output channels; channel-wise ops (BN, ReLU,
pooling, depthwise conv, ...) pass atoms through; ``cat`` concatenates atom lists, ``flatten`` repeats
each atom over its H·W block (``pos`` numbers the block's elements), ``chunk`` and residual
``add/sub/mul`` **unify** atoms position by position (union-find). After tracing:

* a **channel** (class) is a union-find class of atoms: it is kept or removed as a whole;
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

Capture uses ``torch.fx.symbolic_trace`` (modules with a rule, torch.nn layers and parameter-owning
custom leaves are leaves). When fx fails (data-dependent Python, ``int(x.shape[1])``, ...) it falls back
to ``torch.export`` and folds the aten nodes of each leaf module call back into one ``call_module``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import linecache
import logging
import math
import operator
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..errors import ConfigError
from .errors import UnsupportedLayerError, UntraceableModelError
from .rules import find_rule

ROLES = ("out", "in", "norm")


# ----------------------------------------------------------------------------------------------
# channel layout of one tensor


@dataclass(frozen=True, eq=False)
class Chan:
    """Channel layout of a tensor: ``atoms[i]`` / ``pos[i]`` for channel index ``i`` of dim ``dim``.

    ``pos`` distinguishes the elements of a channel's block after flatten (or a depthwise multiplier),
    ``raw`` is True right after a producer (only BatchNorm since): where a merge may still pass a BN.
    """

    dim: int
    atoms: np.ndarray
    pos: np.ndarray
    raw: bool = False

    def __len__(self) -> int:
        return len(self.atoms)

    def with_(self, **kw: Any) -> Chan:
        return dataclasses.replace(self, **kw)

    def repeat(self, k: int) -> Chan:
        """Each channel ``i`` becomes ``k`` consecutive channels ``i·k + s`` (pos ``pos·k + s``)."""
        return self.with_(atoms=np.repeat(self.atoms, k),
                          pos=(np.repeat(self.pos, k) * k + np.tile(np.arange(k), len(self))))

    def tile(self, g: int) -> Chan:
        """The channel list repeated ``g`` times (block ``b`` gets pos ``b·(max pos + 1) + pos``)."""
        span = int(self.pos.max()) + 1 if len(self) else 1
        return self.with_(atoms=np.tile(self.atoms, g),
                          pos=np.tile(self.pos, g) + np.repeat(np.arange(g), len(self)) * span)


@dataclass(frozen=True)
class TensorInfo:
    """What a rule sees of one input tensor: its shape and channel layout (None: not tracked)."""

    shape: tuple
    chan: Chan | None


@dataclass
class Member:
    """One module dimension in the graph. ``group[i]``/``channel[i]``: group id and group channel of
    index ``i`` (-1 for protected source channels that belong to no group)."""

    module: str
    role: str
    kind: str
    atoms: np.ndarray
    pos: np.ndarray
    fresh: bool = False
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    channel: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.atoms)

    def indices(self, group_id: int) -> np.ndarray:
        """Indices of this member that belong to ``group_id``."""
        return np.nonzero(self.group == group_id)[0]

    def __repr__(self) -> str:
        return f"Member({self.module!r}, {self.role!r}, {self.kind}, {len(self)} channels)"


@dataclass
class Group:
    """A set of channels that shrink together. ``size`` = N channels, numbered by the first producer.

    Attributes:
        blocked: protected channel → reason (always kept).
        mergeable: whether a merge matrix M (N × P) may be absorbed by the consumers.
        merge_reason: why not, when ``mergeable`` is False.
    """

    id: int
    name: str
    size: int
    members: list[Member]
    blocked: dict[int, str]
    mergeable: bool = False
    merge_reason: str | None = None

    def _names(self, role: str, fresh: bool | None = None) -> list[str]:
        return [m.module for m in self.members if m.role == role and (fresh is None or m.fresh == fresh)]

    @property
    def producers(self) -> list[str]:
        """Modules whose output rows create these channels (scored by the criteria)."""
        return self._names("out", fresh=True)

    @property
    def consumers(self) -> list[str]:
        return self._names("in")

    @property
    def norms(self) -> list[str]:
        return self._names("norm")

    @property
    def prunable(self) -> list[int]:
        return [c for c in range(self.size) if c not in self.blocked]

    @property
    def protected(self) -> bool:
        return not self.prunable

    def __repr__(self) -> str:
        state = "protected" if self.protected else f"{len(self.prunable)}/{self.size} prunable"
        return (f"Group(#{self.id} {self.name!r}, {state}, mergeable={self.mergeable}, "
                f"members={[f'{m.module}:{m.role}' for m in self.members]})")

    def summary(self) -> dict:
        return {"id": self.id, "name": self.name, "size": self.size, "prunable": len(self.prunable),
                "members": [f"{m.module}:{m.role}" for m in self.members], "mergeable": self.mergeable,
                "merge_reason": self.merge_reason,
                "protected_reason": next(iter(self.blocked.values()), None) if self.protected else None}


# ----------------------------------------------------------------------------------------------
# trace context: union-find over atoms + member registry (the API rules call)


class TraceContext:
    """State of one trace; :class:`~prunekit.engine.rules.LayerRule` s call its methods."""

    def __init__(self, protect: set[str]):
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.tainted: dict[int, str] = {}
        self.members: dict[tuple[str, str], Member] = {}
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

    def member(self, owner: str, role: str, kind: str, chan: Chan, fresh: bool = False) -> None:
        """Register dimension ``role`` of module ``owner`` (a second call of a shared module couples)."""
        key = (owner, role)
        old = self.members.get(key)
        if old is not None:
            if len(old) == len(chan):
                self.unify(old.atoms, chan.atoms)
            else:
                self.block([old.atoms, chan.atoms], f"module '{owner}' is called on different channel layouts")
        else:
            self.members[key] = Member(owner, role, kind, chan.atoms.copy(), chan.pos.copy(), fresh)
        if role != "in" and owner in self.protect:
            self.block(chan, f"module '{owner}' is ignored")

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

    def reshape(self, x: TensorInfo, out_shape: Sequence[int], where: str) -> Chan | None:
        """Layout after view/reshape/flatten/unflatten/squeeze/unsqueeze, derived from the shapes.

        Channel dim kept (possibly moved), merged with trailing dims (flatten: each channel owns a
        contiguous block of k elements, ``pos`` = offset in the block), or split back from such a block.
        Anything else (e.g. channel shuffle's (g, C/g) split) protects the channels.
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
                break
            acc *= size
            if acc > outer:
                break
        self.block(c, f"{where} reshapes the channel dim ({tuple(ins)} → {tuple(outs)})")
        return None

    def softmax(self, x: TensorInfo, dim: Any, where: str) -> Chan | None:
        c = x.chan
        if c is None:
            return None
        if dim is None or not isinstance(dim, int) or dim % len(x.shape) == c.dim:
            self.block(c, f"{where} normalises over the channel dim")
            return None
        self.taint(c, f"{where} is not positively homogeneous")
        return c.with_(raw=False)


# ----------------------------------------------------------------------------------------------
# functional ops (torch functions, Tensor methods, aten ops of torch.export graphs)


_PH_UNARY = {
    "relu", "leaky_relu", "contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16",
    "type", "type_as", "cpu", "cuda", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "identity", "alias", "lift_fresh_copy", "_to_copy", "positive",
    "requires_grad", "abs",
}
_NONPH_UNARY = {
    "sigmoid", "tanh", "silu", "gelu", "hardswish", "hardsigmoid", "relu6", "hardtanh", "elu", "selu",
    "celu", "softplus", "mish", "softsign", "tanhshrink", "logsigmoid", "log_sigmoid", "exp", "log",
    "sqrt", "rsqrt", "square", "pow", "sin", "cos", "erf", "clamp", "clamp_min", "clamp_max", "clip",
    "sign", "floor", "ceil", "round", "reciprocal", "log1p", "expm1", "neg", "threshold", "hardshrink",
    "softshrink", "rrelu", "nan_to_num", "prelu_scalar", "silu_", "masked_fill",
}
_BINARY = {"add", "sub", "rsub", "mul", "div", "truediv", "true_divide", "maximum", "minimum", "fmax",
           "fmin", "where", "addcmul", "addcdiv", "lerp", "iadd", "isub", "imul", "itruediv", "radd",
           "rmul", "floordiv"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
            "_unsafe_view", "ravel"}
_PERMUTE = {"permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "numpy_T", "mT"}
_REDUCE_PH = {"mean", "sum", "amax", "amin", "max", "min", "nanmean", "nansum"}
_REDUCE = _REDUCE_PH | {"std", "var", "norm", "logsumexp", "prod", "median", "var_mean", "std_mean"}
_POOL = {f"{p}{k}d" for k in (1, 2, 3) for p in (
    "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool", "_adaptive_avg_pool",
    "fractional_max_pool")} | {f"max_pool{k}d_with_indices" for k in (1, 2, 3)}
_UPSAMPLE = {"interpolate", "upsample", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
             "upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d", "upsample_bicubic2d",
             "_upsample_nearest_exact2d"}
_SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax", "softmin"}
_NONTENSOR = {"size", "dim", "numel", "getattr", "sym_size", "sym_numel", "sym_stride", "stride",
              "_assert", "_assert_async", "_assert_tensor_metadata", "_assert_scalar", "is_contiguous",
              "item", "tolist", "eq", "ne", "lt", "le", "gt", "ge", "floordiv", "mod", "_set_grad_enabled"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        name = t
    elif isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
    elif isinstance(t, torch._ops.OpOverloadPacket):
        name = t.__name__
    else:
        name = getattr(t, "__name__", str(t))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return {"concat": "cat", "concatenate": "cat", "absolute": "abs", "multiply": "mul", "subtract": "sub",
            "divide": "div", "narrow_copy": "narrow"}.get(name, name)


def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _is_shape(s: Any) -> bool:
    return isinstance(s, torch.Size)


class _Walker:
    """Interprets an fx graph (from fx or export) over channel layouts."""

    def __init__(self, model: nn.Module, graph: fx.Graph, shapes: dict, ctx: TraceContext,
                 opaque: set[str], mode: str):
        self.model, self.graph, self.shapes, self.ctx = model, graph, shapes, ctx
        self.opaque, self.mode = opaque, mode
        self.vals: dict[fx.Node, Any] = {}

    # -- helpers
    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.vals.get(a)
        if isinstance(a, (list, tuple)):
            return [self.val(x) for x in a]
        if isinstance(a, dict):
            return {k: self.val(x) for k, x in a.items()}
        return None

    def info(self, a: Any) -> TensorInfo | None:
        if isinstance(a, fx.Node) and _is_shape(self.shapes.get(a)):
            v = self.vals.get(a)
            return TensorInfo(tuple(self.shapes[a]), v if isinstance(v, Chan) else None)
        return None

    def tensor_args(self, node: fx.Node) -> list[TensorInfo]:
        out: list[TensorInfo] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                i = self.info(a)
                if i is not None:
                    out.append(i)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return out

    def block_all(self, node: fx.Node, reason: str) -> None:
        for a in node.all_input_nodes:
            self.ctx.block(self.vals.get(a), reason)

    # -- main loop
    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op == "placeholder":
                s = self.shapes.get(node)
                if _is_shape(s) and len(s) >= 2:
                    self.vals[node] = Chan(1, self.ctx.new_atoms(s[1], f"model input '{node.target}'"),
                                           np.zeros(s[1], dtype=np.int64))
                else:
                    self.vals[node] = None
            elif node.op == "get_attr":
                self.vals[node] = None
            elif node.op == "call_module":
                self.vals[node] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.vals[node] = self.call_op(node)
            elif node.op == "output":
                self.ctx.block(self.val(node.args[0]), "feeds the model output")

    def call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        module = self.model.get_submodule(name)
        ins = self.tensor_args(node)
        if name in self.opaque:
            for x in ins:
                self.ctx.block(x, f"consumed by opaque module '{name}' ({type(module).__name__})")
            return None
        rule = find_rule(type(module))
        if rule is None:
            if any(True for _ in module.parameters()):
                raise UnsupportedLayerError(
                    f"module '{name}' ({type(module).__name__}) has no channel rule; register one with "
                    f"prunekit.register_layer(...) or ignore it (ignored=['{name}'])")
            for x in ins:
                self.ctx.block(x, f"consumed by '{name}' ({type(module).__name__}), which has no channel rule")
            return None
        if not ins:
            return None
        return rule.trace(self.ctx, name, module, ins, self.shapes.get(node))

    def call_op(self, node: fx.Node) -> Any:
        name = _op_name(node)
        out_shape = self.shapes.get(node)
        where = f"{name} at node '{node.name}'"
        ctx = self.ctx
        if name == "getitem":
            return self.getitem(node, where)
        if name in _NONTENSOR and not _is_shape(out_shape):
            return None
        if out_shape is None:  # e.g. a dataclass built from tensors: its fields are protected
            self.block_all(node, f"consumed by {where}")
            return None
        x = self.info(node.args[0]) if node.args else None
        if name in ("max", "min") and len(node.args) > 1 and self.info(node.args[1]) is not None:
            name = "maximum"  # torch.max(a, b) is element-wise
        if name in _PH_UNARY or name in _NONPH_UNARY or name in _BINARY:
            return self.elementwise(node, name, out_shape, where)
        if x is None or x.chan is None:
            if name in ("cat", "stack"):
                return self.cat(node, name, out_shape, where)
            self.block_all(node, f"consumed by {where}")
            return None
        c = x.chan
        if name in _RESHAPE:
            return ctx.reshape(x, out_shape, where)
        if name in ("expand", "expand_as", "broadcast_to"):
            d = c.dim + len(out_shape) - len(x.shape)
            return c.with_(dim=d) if out_shape[d] == len(c) else None
        if name == "repeat":
            reps = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            d = c.dim + len(reps) - len(x.shape)
            r = reps[d]
            return c.with_(dim=d) if r == 1 else c.tile(int(r)).with_(dim=d) if isinstance(r, int) else None
        if name in _PERMUTE:
            return self.permute(node, name, x, where)
        if name in _REDUCE:
            return self.reduce(node, name, x, out_shape, where)
        if name in _POOL or name in _UPSAMPLE:
            k = int(name[-2]) if name[-2:-1].isdigit() else len(x.shape) - 2
            if c.dim >= len(x.shape) - k:
                ctx.block(c, f"{where} mixes the channel dim")
                return None
            out = c.with_(raw=False)
            return (out, None) if isinstance(out_shape, (tuple, list)) and not _is_shape(out_shape) else out
        if name in _SOFTMAX:
            return ctx.softmax(x, _arg(node, 1, "dim"), where)
        if name == "normalize":
            return ctx.softmax(x, _arg(node, 2, "dim", 1), where)
        if name in ("pad", "constant_pad_nd"):
            return self.pad(node, name, x, where)
        if name in ("cat", "stack"):
            return self.cat(node, name, out_shape, where)
        if name in ("chunk", "split", "split_with_sizes", "unsafe_split", "unsafe_chunk", "tensor_split",
                    "unbind"):
            return self.split(node, name, x, out_shape, where)
        if name in ("slice", "narrow", "select"):
            return self.slice(node, name, x, where)
        self.block_all(node, f"consumed by {where}, which has no channel rule")
        return None

    # -- op handlers
    def elementwise(self, node: fx.Node, name: str, out_shape: Any, where: str) -> Chan | None:
        ctx = self.ctx
        if not _is_shape(out_shape):
            self.block_all(node, f"consumed by {where}")
            return None
        n = len(out_shape)
        tensors = [i for i in self.tensor_args(node)]
        chans = [t for t in tensors if t.chan is not None and len(t.chan) > 1]
        if not chans:
            return None
        positions = {t.chan.dim + n - len(t.shape) for t in chans}
        if len(positions) > 1:
            for t in chans:
                ctx.block(t, f"{where} combines tensors whose channels are on different dims")
            return None
        p = positions.pop()
        ref = next((t.chan for t in chans if len(t.chan) == out_shape[p]), None)
        if ref is None:
            return None
        for t in tensors:
            aligned = p - (n - len(t.shape))
            size = t.shape[aligned] if aligned >= 0 else 1
            if t.chan is not None and len(t.chan) == out_shape[p]:
                ctx.unify(ref.atoms, t.chan.atoms)
            elif size > 1:
                ctx.block(ref, f"{where} combines channels with a fixed tensor of shape {tuple(t.shape)}")
        ph = name in _PH_UNARY
        if name in _BINARY:
            scalars = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, (int, float))]
            if name in ("add", "sub", "iadd", "isub", "radd", "rsub"):
                ph = all(s == 0 for s in scalars) if name != "rsub" else False
                if name in ("add", "iadd", "radd") and "alpha" in node.kwargs:
                    ph = ph and node.kwargs["alpha"] > 0
            elif name in ("mul", "imul", "rmul", "div", "truediv", "true_divide", "itruediv"):
                ph = len(tensors) == 1 and all(s > 0 for s in scalars)
            elif name in ("maximum", "minimum", "fmax", "fmin"):
                ph = False
        if not ph:
            ctx.taint(ref, f"{where} is not positively homogeneous")
        return Chan(p, ref.atoms, ref.pos, raw=False)

    def getitem(self, node: fx.Node, where: str) -> Any:
        src, idx = node.args[0], node.args[1]
        v = self.val(src)
        if not _is_shape(self.shapes.get(src)):
            if isinstance(v, (list, tuple)) and isinstance(idx, int) and -len(v) <= idx < len(v):
                return v[idx]
            if isinstance(v, (list, tuple)) and isinstance(idx, slice):
                return v[idx]
            return None
        x = self.info(src)
        if x is None or x.chan is None:
            return None
        c, nd = x.chan, len(x.shape)
        items = idx if isinstance(idx, tuple) else (idx,)
        specified = sum(1 for i in items if i is not None and i is not Ellipsis)
        d_in = d_out = 0
        result = None
        for item in items:
            if item is None:
                d_out += 1
            elif item is Ellipsis:
                skip = nd - specified
                if d_in <= c.dim < d_in + skip:
                    result = d_out + c.dim - d_in
                d_in += skip
                d_out += skip
            elif isinstance(item, slice):
                if d_in == c.dim:
                    full = (item.start in (None, 0) and item.step in (None, 1)
                            and (item.stop is None or isinstance(item.stop, int) and item.stop >= len(c)))
                    if not full:
                        self.ctx.block(c, f"{where} takes a fixed slice of the channel dim")
                        return None
                    result = d_out
                d_in += 1
                d_out += 1
            elif isinstance(item, int):
                if d_in == c.dim:
                    self.ctx.block(c, f"{where} selects a single channel")
                    return None
                d_in += 1
            else:
                self.ctx.block(c, f"{where} uses advanced indexing")
                return None
        if result is None:
            result = d_out + c.dim - d_in
        return c.with_(dim=result)

    def slice(self, node: fx.Node, name: str, x: TensorInfo, where: str) -> Chan | None:
        c = x.chan
        dim = _arg(node, 1, "dim", 0)
        dim = dim % len(x.shape) if isinstance(dim, int) else None
        if dim is not None and dim != c.dim:
            if name == "select":
                return c.with_(dim=c.dim - (1 if dim is not None and dim < c.dim else 0))
            return c
        if name == "slice":
            start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
            if start in (None, 0) and step in (None, 1) and (end is None or isinstance(end, int) and end >= len(c)):
                return c
        self.ctx.block(c, f"{where} takes a fixed part of the channel dim")
        return None

    def permute(self, node: fx.Node, name: str, x: TensorInfo, where: str) -> Chan | None:
        c, nd = x.chan, len(x.shape)
        probe = torch.zeros([2 if i == c.dim else 1 for i in range(nd)])
        try:
            if name == "permute":
                dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
                    else node.args[1:]
                out = probe.permute(*dims)
            elif name in ("t", "numpy_T", "mT"):
                out = probe.transpose(-2, -1) if name == "mT" else probe.t() if nd <= 2 else probe.permute(
                    *reversed(range(nd)))
            elif name in ("transpose", "swapaxes", "swapdims"):
                out = probe.transpose(_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
            else:
                out = probe.movedim(_arg(node, 1, "source"), _arg(node, 2, "destination"))
        except (TypeError, RuntimeError, IndexError):
            self.ctx.block(c, f"{where} permutes dims in a way the engine cannot follow")
            return None
        return c.with_(dim=list(out.shape).index(2))

    def reduce(self, node: fx.Node, name: str, x: TensorInfo, out_shape: Any, where: str) -> Any:
        c, nd = x.chan, len(x.shape)
        dim = _arg(node, 2 if name == "norm" else 1, "dim", None)
        first = out_shape[0] if isinstance(out_shape, (tuple, list)) and not _is_shape(out_shape) else out_shape
        keep = _is_shape(first) and len(first) == nd
        if dim is None or dim == [] or not (isinstance(dim, int) or all(isinstance(d, int) for d in dim)):
            self.ctx.block(c, f"{where} reduces over the channel dim")
            return None
        dims = {d % nd for d in ([dim] if isinstance(dim, int) else dim)}
        if c.dim in dims:
            self.ctx.block(c, f"{where} reduces over the channel dim")
            return None
        new = c.dim if keep else c.dim - sum(1 for d in dims if d < c.dim)
        if name not in _REDUCE_PH:
            self.ctx.taint(c, f"{where} is not positively homogeneous")
        out = c.with_(dim=new, raw=False)
        if isinstance(out_shape, (tuple, list)) and not _is_shape(out_shape):
            return (out,) + (None,) * (len(out_shape) - 1)
        return out

    def pad(self, node: fx.Node, name: str, x: TensorInfo, where: str) -> Chan | None:
        c, nd = x.chan, len(x.shape)
        pad = list(_arg(node, 1, "pad", []))
        if name == "constant_pad_nd":
            mode, value = "constant", _arg(node, 2, "value", 0)
        else:
            mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
        value = 0 if value is None else value
        k = nd - 1 - c.dim
        before, after = (pad[2 * k], pad[2 * k + 1]) if len(pad) >= 2 * k + 2 else (0, 0)
        if before == 0 and after == 0:
            if mode == "constant" and value != 0:
                self.ctx.taint(c, f"{where} pads with {value}")
            return c.with_(raw=False)
        if mode != "constant" or not isinstance(before, int) or not isinstance(after, int) or before < 0 \
                or after < 0:
            self.ctx.block(c, f"{where} pads or crops the channel dim ({mode})")
            return None
        reason = f"constant channels padded by {where} (e.g. a zero-padding shortcut)"
        atoms = np.concatenate([self.ctx.new_atoms(before, reason), c.atoms, self.ctx.new_atoms(after, reason)])
        pos = np.concatenate([np.zeros(before, np.int64), c.pos, np.zeros(after, np.int64)])
        return Chan(c.dim, atoms, pos, raw=False)

    def cat(self, node: fx.Node, name: str, out_shape: Any, where: str) -> Chan | None:
        ctx = self.ctx
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", [])
        dim = _arg(node, 1, "dim", node.kwargs.get("axis", 0))
        infos = [self.info(t) for t in tensors]
        infos = [i for i in infos if i is not None and (len(i.shape) > 1 or i.shape[0] > 0)]
        if not infos or not _is_shape(out_shape):
            return None
        nd = len(out_shape)
        chans = [i.chan for i in infos if i.chan is not None]
        if not chans:
            return None
        if name == "cat":
            dim = dim % nd
            if all(i.chan is None or i.chan.dim == dim for i in infos):  # concatenating channels
                parts_a, parts_p = [], []
                for i in infos:
                    if i.chan is None:
                        parts_a.append(ctx.new_atoms(i.shape[dim], f"concatenated by {where} from an untraced op"))
                        parts_p.append(np.zeros(i.shape[dim], np.int64))
                    else:
                        parts_a.append(i.chan.atoms)
                        parts_p.append(i.chan.pos)
                return Chan(dim, np.concatenate(parts_a), np.concatenate(parts_p), raw=False)
            cdim = chans[0].dim
        else:
            cdim = chans[0].dim
            dim = dim % nd
        ok = all(i.chan is not None and i.chan.dim == cdim and len(i.chan) == len(chans[0]) for i in infos)
        if not ok:
            for i in infos:
                ctx.block(i, f"{where} joins tensors with different channel layouts")
            return None
        for i in infos[1:]:
            ctx.unify(chans[0].atoms, i.chan.atoms)
        new = cdim + (1 if name == "stack" and dim <= cdim else 0)
        return chans[0].with_(dim=new, raw=False)

    def split(self, node: fx.Node, name: str, x: TensorInfo, out_shape: Any, where: str) -> Any:
        c = x.chan
        if not isinstance(out_shape, (list, tuple)) or not all(_is_shape(s) for s in out_shape):
            self.ctx.block(c, f"consumed by {where}")
            return None
        default_dim = 0
        dim = _arg(node, 2 if name != "unbind" else 1, "dim", default_dim) % len(x.shape)
        if dim != c.dim:
            if name == "unbind":
                new = c.dim - (1 if dim < c.dim else 0)
                return tuple(c.with_(dim=new) for _ in out_shape)
            return tuple(c for _ in out_shape)
        sizes = [s[dim] for s in out_shape]
        arg = _arg(node, 1, "chunks" if "chunk" in name else "split_size", None)
        chunk_like = "chunk" in name or (name in ("split", "unsafe_split") and isinstance(arg, fx.Node))
        if chunk_like and len(set(sizes)) == 1 and sum(sizes) == len(c):
            n = sizes[0]
            for i in range(1, len(sizes)):
                self.ctx.unify(c.atoms[i * n:(i + 1) * n], c.atoms[:n])
            return tuple(c.with_(atoms=c.atoms[i * n:(i + 1) * n], pos=c.pos[i * n:(i + 1) * n])
                         for i in range(len(sizes)))
        self.ctx.block(c, f"{where} splits the channel dim at fixed sizes {sizes} (use chunk() to let "
                          "the pieces shrink together)")
        return None


# ----------------------------------------------------------------------------------------------
# capture: torch.fx, then torch.export


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_leaf(m, qualname, self.leaves)


def _is_leaf(m: nn.Module, qualname: str, leaves: set[str]) -> bool:
    if qualname in leaves or find_rule(type(m)) is not None:
        return True
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if m.__module__.startswith(("torch.nn", "torch.ao.nn")):
        return True
    return next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None


def _has_rule(m: nn.Module) -> bool:
    rule = find_rule(type(m))
    return rule is not None and not getattr(rule, "refuses", False)


def _shape_tree(v: Any) -> Any:
    """Tensors → their shapes, containers and dataclasses → the same structure, anything else → None."""
    if isinstance(v, torch.Tensor):
        return v.shape
    if isinstance(v, torch.Size):
        return None
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return (type(v).__name__, tuple((f.name, _shape_tree(getattr(v, f.name))) for f in dataclasses.fields(v)))
    if isinstance(v, (list, tuple)):
        return type(v)(_shape_tree(x) for x in v) if not hasattr(v, "_fields") else tuple(
            _shape_tree(x) for x in v)
    if isinstance(v, dict):
        return {k: _shape_tree(x) for k, x in v.items()}
    return None


class _EvalMode:
    """Eval mode and no_grad for the duration of a capture; restores every module's flag."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        for m, t in self.flags:
            m.training = t
        torch.set_grad_enabled(self.grad)


def _trace_fx(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str]) -> tuple[fx.Graph, dict, Any]:
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    shapes: dict[fx.Node, Any] = {}

    class Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            shapes[n] = _shape_tree(out)
            return out

    out = Prop(gm).run(*_bind_inputs(graph, args, kwargs))
    return graph, shapes, _shape_tree(out)


def _bind_inputs(graph: fx.Graph, args: tuple, kwargs: dict) -> list:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out, rest = list(args), dict(kwargs)
    for n in placeholders[len(args):]:
        name = str(n.target).lstrip("*")
        if name in rest:
            out.append(rest.pop(name))
        elif n.args:
            out.append(n.args[0])
        else:
            out.append(None)
    return out


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str]) -> tuple[fx.Graph, dict, Any]:
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:  # export prints the partial graph to stderr on failure; we report our own message
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(model, args, kwargs)
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    consts = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") and spec.target is not None:
            consts[spec.arg.name] = spec.target
    src = ep.graph
    cluster: dict[fx.Node, tuple[str, str]] = {}
    for node in src.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _t) in (node.meta.get("nn_module_stack") or {}).items():
            if not path:
                continue
            try:
                m = model.get_submodule(path)
            except AttributeError:
                break
            if _is_leaf(m, path, leaves):
                cluster[node] = (key, path)
                break
    members: dict[str, list[fx.Node]] = {}
    for node, (key, _p) in cluster.items():
        members.setdefault(key, []).append(node)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    shapes: dict[fx.Node, Any] = {}

    def mapped(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    for node in src.nodes:
        if node.op == "placeholder":
            new = g.get_attr(consts[node.name]) if node.name in consts else g.placeholder(node.name)
        elif node.op == "call_function" and node in cluster:
            key, path = cluster[node]
            nodes = members[key]
            if node is not nodes[-1]:
                continue
            inside = set(nodes)
            ins: list[fx.Node] = []
            for n in nodes:
                for a in n.all_input_nodes:
                    if a not in inside and a not in ins and not (a.op == "placeholder" and a.name in consts):
                        ins.append(a)
            outs = [n for n in nodes if any(u not in inside for u in n.users)]
            call = g.call_module(path, tuple(env[a] for a in ins))
            if len(outs) == 1:
                env[outs[0]] = call
                shapes[call] = _shape_tree(outs[0].meta.get("val"))
            else:
                shapes[call] = tuple(_shape_tree(o.meta.get("val")) for o in outs)
                for i, o in enumerate(outs):
                    env[o] = g.call_function(operator.getitem, (call, i))
                    shapes[env[o]] = _shape_tree(o.meta.get("val"))
            continue
        elif node.op == "call_function":
            new = g.call_function(node.target, mapped(node.args), mapped(node.kwargs))
        elif node.op == "output":
            g.output(mapped(node.args[0]))
            continue
        else:
            continue
        env[node] = new
        shapes[new] = _shape_tree(node.meta.get("val"))
    g.lint()
    return g, shapes, _shape_tree(model(*args, **kwargs))


def _failure_site(exc: BaseException, model: nn.Module) -> tuple[str | None, str]:
    """(module name, 'Type line N: code') of the innermost model forward frame in ``exc``'s traceback."""
    names = {id(m): n for n, m in model.named_modules()}
    site: tuple[str | None, str] = (None, "")
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code_obj = frame.f_code
        if code_obj.co_filename.startswith(torch_dir) or not code_obj.co_argcount:
            continue
        self_obj = frame.f_locals.get(code_obj.co_varnames[0])
        if isinstance(self_obj, nn.Module) and id(self_obj) in names:
            code = linecache.getline(frame.f_code.co_filename, lineno).strip()
            site = (names[id(self_obj)], f"{type(self_obj).__name__}.{frame.f_code.co_name} line {lineno}: `{code}`")
    return site


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _capture(model: nn.Module, args: tuple, kwargs: dict, leaves: set[str], ignored: set[str],
             capture: str = "auto") -> tuple[fx.Graph, dict, Any, str, set[str]]:
    leaves = set(leaves)
    fx_error: BaseException = RuntimeError("fx skipped (capture='export')")
    for _ in range(8 if capture != "export" else 0):  # an ignored module whose body fx cannot trace becomes an opaque leaf
        try:
            g, s, o = _trace_fx(model, args, kwargs, leaves)
            return g, s, o, "fx", leaves
        except UnsupportedLayerError:
            raise
        except Exception as e:  # noqa: BLE001 - any fx failure falls through to export
            fx_error = e
            where, code = _failure_site(e, model)
            owner = next((n for n in sorted(ignored, key=len) if where is not None and n not in leaves
                          and (where == n or where.startswith(n + "."))), None)
            if owner is None:
                break
            leaves.add(owner)
    if capture == "fx":
        where, code = _failure_site(fx_error, model)
        at = f"module '{where}' ({code})" if where else f"{type(model).__name__}.forward"
        raise UntraceableModelError(f"cannot trace {type(model).__name__} with torch.fx: failed in {at}: "
                                    f"{_first_line(fx_error)}. Fix: capture='auto' (falls back to "
                                    f"torch.export) or leaf_modules=['{where or '...'}']") from fx_error
    try:
        g, s, o = _trace_export(model, args, kwargs, leaves)
        return g, s, o, "export", leaves
    except Exception as e:  # noqa: BLE001
        export_error = e
    where, code = _failure_site(fx_error, model)
    if where is None:
        where, code = _failure_site(export_error, model)
    at = f"module '{where}' ({code})" if where else f"{type(model).__name__}.forward"
    hint = (f"mark it as a leaf or exclude it: ChannelGraph.build(..., leaf_modules=['{where}']) or "
            f"prune(..., ignored=['{where}']) (its channels are then protected)" if where
            else "move the data-dependent code into a submodule and pass it as a leaf/ignored module")
    raise UntraceableModelError(
        f"cannot trace {type(model).__name__}: torch.fx failed in {at}: {_first_line(fx_error)}; "
        f"torch.export also failed: {_first_line(export_error)}. Fix: {hint}") from fx_error


# ----------------------------------------------------------------------------------------------
# the graph


def as_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Normalise example inputs: a tensor, a tuple/list of tensors, a dict of kwargs, or a shape
    (tuple of ints, e.g. ``(1, 3, 32, 32)``, filled with seeded N(0, 1) values)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list, torch.Size)) and example_inputs:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in example_inputs):
            g = torch.Generator().manual_seed(0)
            return (torch.randn(tuple(example_inputs), generator=g),), {}
        return tuple(example_inputs), {}
    raise ConfigError(f"example_inputs must be a tensor, a tuple of tensors, a kwargs dict or a shape; "
                      f"got {type(example_inputs).__name__}")


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
            import difflib

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
        mode: ``"fx"`` or ``"export"`` (how the model was captured).
        ignored: names of modules whose channels are protected.
        example_inputs: ``(args, kwargs)`` used to trace; surgery re-runs them to verify.
        output_shapes: shapes of the model outputs for those inputs.
    """

    def __init__(self, groups: list[Group], members: list[Member], mode: str, ignored: list[str],
                 example_inputs: tuple[tuple, dict], output_shapes: Any, module_kinds: dict[str, str]):
        self.groups, self.members, self.mode, self.ignored = groups, members, mode, ignored
        self.example_inputs, self.output_shapes, self.module_kinds = example_inputs, output_shapes, module_kinds

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
            capture: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or ``"export"``.
        """
        if capture not in ("auto", "fx", "export"):
            raise ConfigError(f"capture must be 'auto', 'fx' or 'export', got {capture!r}")
        args, kwargs = as_inputs(example_inputs)
        names = resolve_modules(model, ignored, "ignored")
        leaves = set(resolve_modules(model, leaf_modules, "leaf_modules"))
        protect: set[str] = set()
        for n in names:
            m = model.get_submodule(n)
            if _has_rule(m):
                protect.add(n)
                continue
            inner = [f"{n}.{c}" for c, sub in m.named_modules() if c and _has_rule(sub)]
            if inner and not _is_leaf(m, n, set()):
                protect.update(inner)
            else:
                leaves.add(n)
        with _EvalMode(model):
            graph, shapes, out_shapes, mode, leaves = _capture(model, args, kwargs, leaves, set(names), capture)
            ctx = TraceContext(protect)
            opaque = {str(n.target) for n in graph.nodes if n.op == "call_module" and str(n.target) in leaves}
            walker = _Walker(model, graph, shapes, ctx, opaque, mode)
            walker.run()
        kinds = {n: type(m).__name__ for n, m in model.named_modules()}
        return cls._finalize(ctx, mode, names, (args, kwargs), out_shapes, kinds, model)

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
        for m in members:
            pairs = [channel_of_root.get(x, (-1, -1)) for x in roots[id(m)].tolist()]
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
        return cls(groups, members, mode, ignored, inputs, out_shapes, kinds)

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
            mem = ", ".join(f"{m.module}:{m.role}" for m in g.members)
            rows.append(f"  #{g.id} {g.name}: {state}, {merge}{why}\n      {mem}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (f"ChannelGraph(mode={self.mode!r}, groups={len(self.groups)}, "
                f"prunable={len(self.prunable_groups)})")


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
