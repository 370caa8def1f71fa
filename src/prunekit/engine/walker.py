"""The op walker: interprets a captured fx graph over channel layouts instead of tensors.

Given the graph (from torch.fx or folded torch.export), the shape of every node's value and a
:class:`~prunekit.engine.context.TraceContext`, it visits the nodes in order and computes, per tensor,
which channel ids each index carries: leaf modules go to their layer rule
(:func:`~prunekit.engine.rules.find_rule`), functional ops to the handlers here (element-wise ops tie
their operands' channels, ``cat`` concatenates, ``chunk`` ties the pieces, reshapes follow
:meth:`TraceContext.reshape`, anything unknown protects what it touches). Model inputs get protected
channel ids and whatever feeds the outputs is protected.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .channels import Chan, HeadSplit, TensorInfo
from .context import TraceContext
from .errors import UnsupportedLayerError
from .ops import (
    BINARY,
    NONPH_UNARY,
    NONTENSOR,
    PERMUTE,
    PH_UNARY,
    POOL,
    REDUCE,
    REDUCE_PH,
    RESHAPE,
    SOFTMAX,
    UPSAMPLE,
    is_shape,
    node_arg,
    op_name,
)
from .rules import find_rule

__all__ = ["Walker"]

#: batched matrix products: batch dims carry channels, the contracted dim protects them
MATMUL = {"matmul", "bmm", "mm"}
SDPA = {"scaled_dot_product_attention"}


def _owner(node: fx.Node) -> str | None:
    """The module whose forward ran ``node`` (capture sets ``meta["module"]``; export's module stack)."""
    owner = node.meta.get("module")
    if owner is None:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            owner = list(stack.values())[-1][0]
    return owner


class Walker:
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
        if isinstance(a, fx.Node) and is_shape(self.shapes.get(a)):
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
                if is_shape(s) and len(s) >= 2:
                    self.vals[node] = Chan(1, self.ctx.new_atoms(s[1], f"model input '{node.target}'"),
                                           np.zeros(s[1], dtype=np.int64))
                else:
                    self.vals[node] = None
            elif node.op == "get_attr":
                self.vals[node] = self.get_attr(node)
            elif node.op == "call_module":
                self.vals[node] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.vals[node] = self.call_op(node)
            elif node.op == "output":
                self.ctx.block(self.val(node.args[0]), "feeds the model output")

    def get_attr(self, node: fx.Node) -> Chan | None:
        """A model parameter read by a functional op gets its own channels (see TraceContext.parameter)."""
        target, shape = str(node.target), self.shapes.get(node)
        if not is_shape(shape) or "." not in target and not hasattr(self.model, target):
            return None
        try:
            value = self.model.get_parameter(target)
        except (AttributeError, TypeError):
            return None
        owner, _, attr = target.rpartition(".")
        if not isinstance(value, nn.Parameter):
            return None
        return self.ctx.parameter(owner, attr, tuple(shape))

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
        name = op_name(node)
        out_shape = self.shapes.get(node)
        where = f"{name} at node '{node.name}'"
        ctx = self.ctx
        if name == "getitem":
            return self.getitem(node, where)
        if name == "setitem":
            return self.setitem(node, where)
        if name in NONTENSOR and not is_shape(out_shape):
            return None
        if out_shape is None:  # e.g. a dataclass built from tensors: its fields are protected
            self.block_all(node, f"consumed by {where}")
            return None
        x = self.info(node.args[0]) if node.args else None
        if name in ("max", "min") and len(node.args) > 1 and self.info(node.args[1]) is not None:
            name = "maximum"  # torch.max(a, b) is element-wise
        if name in PH_UNARY or name in NONPH_UNARY or name in BINARY:
            return self.elementwise(node, name, out_shape, where)
        if x is None or x.chan is None:
            if name in ("cat", "stack"):
                return self.cat(node, name, out_shape, where)
            self.block_all(node, f"consumed by {where}")
            return None
        c = x.chan
        if name in RESHAPE:
            return ctx.reshape(x, out_shape, where, owner=_owner(node))
        if name in MATMUL:
            return self.matmul(node, name, out_shape, where)
        if name in SDPA:
            return self.attention(node, out_shape, where)
        if name == "repeat_interleave":
            reps, dim = node_arg(node, 1, "repeats"), node_arg(node, 2, "dim")
            if not isinstance(reps, int) or dim is None:
                ctx.block(c, f"{where} repeats channels by a tensor or over a flattened input")
                return None
            return c.repeat(reps) if dim % len(x.shape) == c.dim else c
        if name == "roll":
            dims = node_arg(node, 2, "dims", None)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if not dims or c.dim in {d % len(x.shape) for d in dims}:
                ctx.block(c, f"{where} rolls the channel dim")
                return None
            return c
        if name in ("expand", "expand_as", "broadcast_to"):
            d = c.dim + len(out_shape) - len(x.shape)
            return c.with_(dim=d) if out_shape[d] == len(c) else None
        if name == "repeat":
            reps = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            d = c.dim + len(reps) - len(x.shape)
            r = reps[d]
            return c.with_(dim=d) if r == 1 else c.tile(int(r)).with_(dim=d) if isinstance(r, int) else None
        if name in PERMUTE:
            return self.permute(node, name, x, where)
        if name in REDUCE:
            return self.reduce(node, name, x, out_shape, where)
        if name in POOL or name in UPSAMPLE:
            k = int(name[-2]) if name[-2:-1].isdigit() else len(x.shape) - 2
            if c.dim >= len(x.shape) - k:
                ctx.block(c, f"{where} mixes the channel dim")
                return None
            out = c.with_(raw=False)
            return (out, None) if isinstance(out_shape, (tuple, list)) and not is_shape(out_shape) else out
        if name in SOFTMAX:
            return ctx.softmax(x, node_arg(node, 1, "dim"), where)
        if name == "normalize":
            return ctx.softmax(x, node_arg(node, 2, "dim", 1), where)
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
        if not is_shape(out_shape):
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
        ph = name in PH_UNARY
        if name in BINARY:
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
        if not is_shape(self.shapes.get(src)):
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
            elif isinstance(item, fx.Node) and is_shape(self.shapes.get(item)) and d_in != c.dim \
                    and sum(isinstance(i, fx.Node) for i in items) == 1:  # one integer index tensor
                d_in += 1
                d_out += len(self.shapes[item])
            else:
                self.ctx.block(c, f"{where} uses advanced indexing")
                return None
        if result is None:
            result = d_out + c.dim - d_in
        return c.with_(dim=result)

    def setitem(self, node: fx.Node, where: str) -> Chan | None:
        """``x[idx] = value``: ``x`` keeps its channels (not positively homogeneous); a traced value
        written into it protects both."""
        x, value = self.info(node.args[0]), self.info(node.args[2]) if len(node.args) > 2 else None
        if value is not None and value.chan is not None:
            self.ctx.block([value, x], f"{where} writes traced channels into a tensor")
            return None
        if x is None or x.chan is None:
            return None
        self.ctx.taint(x.chan, f"{where} overwrites part of the tensor")
        return x.chan

    def matmul(self, node: fx.Node, name: str, out_shape: Any, where: str) -> Chan | None:
        """``a @ b`` for a (…, n, k), b (…, k, m): channels on batch dims are tied across the operands
        (attention heads: q·kᵀ, p·v), a's on n and b's on m pass to the output, the contracted k
        protects them (a fixed weight would have to shrink)."""
        ctx = self.ctx
        a, b = self.info(node.args[0]), self.info(node.args[1]) if len(node.args) > 1 else None
        if a is None or b is None or not is_shape(out_shape) or len(a.shape) < 2 or len(b.shape) < 2:
            self.block_all(node, f"consumed by {where}")
            return None
        n = len(out_shape)
        placed: list[tuple[int, TensorInfo]] = []
        for t, contracted, kept in ((a, -1, -2), (b, -2, -1)):
            if t.chan is None:
                continue
            nd = len(t.shape)
            if t.chan.dim == nd + contracted:
                ctx.block(t, f"{where} contracts the channel dim")
            else:
                placed.append((n + kept if t.chan.dim == nd + kept else t.chan.dim + n - nd, t))
        if not placed:
            return None
        d, ref = placed[0]
        for d2, t in placed[1:]:
            if d2 == d and len(t.chan) == len(ref.chan):
                ctx.unify(ref.chan.atoms, t.chan.atoms)
            else:
                ctx.block([ref, t], f"{where} multiplies tensors whose channels are on different dims")
                return None
        if d < n - 2:  # a batch dim: the other operand must carry it too or broadcast it
            for t in (a, b):
                td = d - (n - len(t.shape))
                if t.chan is None and td >= 0 and t.shape[td] > 1:
                    ctx.block(ref, f"{where} combines channels with a fixed tensor of shape {tuple(t.shape)}")
                    return None
        ctx.taint(ref, f"{where} multiplies channels by other traced values")
        return Chan(d, ref.chan.atoms, ref.chan.pos, raw=False)

    def attention(self, node: fx.Node, out_shape: Any, where: str) -> Chan | None:
        """``scaled_dot_product_attention(q, k, v, attn_mask, ..., enable_gqa)``: heads (dim −3) of q, k
        and v are tied; with grouped-query attention (H_q = g·H_kv) kv head j is tied to query heads
        j·g … j·g+g−1, so a kv head and the query heads that share it are removed together."""
        ctx = self.ctx
        q, k, v = (self.info(node_arg(node, i, key)) for i, key in enumerate(("query", "key", "value")))
        mask = self.info(node_arg(node, 3, "attn_mask"))
        if q is None or k is None or v is None or not is_shape(out_shape):
            self.block_all(node, f"consumed by {where}")
            return None
        heads = q.shape[-3] if len(q.shape) >= 3 else 1
        ok = q.chan is not None and len(q.shape) >= 3 and q.chan.dim == len(q.shape) - 3
        for t in (k, v):
            ok = ok and len(t.shape) >= 3 and (t.chan is None and t.shape[-3] == 1 or t.chan is not None
                                                and t.chan.dim == len(t.shape) - 3 and heads % len(t.chan) == 0)
        if mask is not None and len(mask.shape) >= 3:
            ok = ok and (mask.chan is None and mask.shape[-3] == 1 or mask.chan is not None
                         and mask.chan.dim == len(mask.shape) - 3 and len(mask.chan) == heads)
        elif mask is not None and mask.chan is not None:
            ok = False
        if not ok:
            self.block_all(node, f"{where} does not read its inputs as (…, heads, tokens, head_dim)")
            return None
        for t in (k, v, mask):
            if t is not None and t.chan is not None:
                chan = t.chan if len(t.chan) == heads else t.chan.repeat(heads // len(t.chan))
                ctx.unify(q.chan.atoms, chan.atoms)
        ctx.taint(q.chan, f"{where} is not positively homogeneous")
        return Chan(len(out_shape) - 3, q.chan.atoms, q.chan.pos, raw=False)

    def slice(self, node: fx.Node, name: str, x: TensorInfo, where: str) -> Chan | None:
        c = x.chan
        dim = node_arg(node, 1, "dim", 0)
        dim = dim % len(x.shape) if isinstance(dim, int) else None
        if dim is not None and dim != c.dim:
            if name == "select":
                return c.with_(dim=c.dim - (1 if dim is not None and dim < c.dim else 0))
            return c
        if name == "slice":
            start, end, step = node_arg(node, 2, "start"), node_arg(node, 3, "end"), node_arg(node, 4, "step", 1)
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
                out = probe.transpose(node_arg(node, 1, "dim0"), node_arg(node, 2, "dim1"))
            else:
                out = probe.movedim(node_arg(node, 1, "source"), node_arg(node, 2, "destination"))
        except (TypeError, RuntimeError, IndexError):
            self.ctx.block(c, f"{where} permutes dims in a way the engine cannot follow")
            return None
        return c.with_(dim=list(out.shape).index(2))

    def reduce(self, node: fx.Node, name: str, x: TensorInfo, out_shape: Any, where: str) -> Any:
        c, nd = x.chan, len(x.shape)
        dim = node_arg(node, 2 if name == "norm" else 1, "dim", None)
        first = out_shape[0] if isinstance(out_shape, (tuple, list)) and not is_shape(out_shape) else out_shape
        keep = is_shape(first) and len(first) == nd
        if dim is None or dim == [] or not (isinstance(dim, int) or all(isinstance(d, int) for d in dim)):
            self.ctx.block(c, f"{where} reduces over the channel dim")
            return None
        dims = {d % nd for d in ([dim] if isinstance(dim, int) else dim)}
        if c.dim in dims:
            self.ctx.block(c, f"{where} reduces over the channel dim")
            return None
        new = c.dim if keep else c.dim - sum(1 for d in dims if d < c.dim)
        if name not in REDUCE_PH:
            self.ctx.taint(c, f"{where} is not positively homogeneous")
        out = c.with_(dim=new, raw=False)
        if isinstance(out_shape, (tuple, list)) and not is_shape(out_shape):
            return (out,) + (None,) * (len(out_shape) - 1)
        return out

    def pad(self, node: fx.Node, name: str, x: TensorInfo, where: str) -> Chan | None:
        c, nd = x.chan, len(x.shape)
        pad = list(node_arg(node, 1, "pad", []))
        if name == "constant_pad_nd":
            mode, value = "constant", node_arg(node, 2, "value", 0)
        else:
            mode, value = node_arg(node, 2, "mode", "constant"), node_arg(node, 3, "value", None)
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
        dim = node_arg(node, 1, "dim", node.kwargs.get("axis", 0))
        infos = [self.info(t) for t in tensors]
        infos = [i for i in infos if i is not None and (len(i.shape) > 1 or i.shape[0] > 0)]
        if not infos or not is_shape(out_shape):
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
        if not isinstance(out_shape, (list, tuple)) or not all(is_shape(s) for s in out_shape):
            self.ctx.block(c, f"consumed by {where}")
            return None
        default_dim = 0
        dim = node_arg(node, 2 if name != "unbind" else 1, "dim", default_dim) % len(x.shape)
        if dim != c.dim:
            if name == "unbind":
                new = c.dim - (1 if dim < c.dim else 0)
                return tuple(c.with_(dim=new) for _ in out_shape)
            return tuple(c for _ in out_shape)
        sizes = [s[dim] for s in out_shape]
        arg = node_arg(node, 1, "chunks" if "chunk" in name else "split_size", None)
        chunk_like = "chunk" in name or (name in ("split", "unsafe_split") and isinstance(arg, fx.Node))
        fixed = name in ("split", "unsafe_split") and isinstance(arg, int)
        if (chunk_like or fixed) and len(set(sizes)) == 1 and sum(sizes) == len(c):
            n = sizes[0]
            if fixed:  # split(size): the owner's attribute holding `size` follows (GPT-2's split_size)
                self.ctx.head_splits.append(HeadSplit(_owner(node), c.atoms[:n].copy(), 1, kind="split"))
            for i in range(1, len(sizes)):
                self.ctx.unify(c.atoms[i * n:(i + 1) * n], c.atoms[:n])
            return tuple(c.with_(atoms=c.atoms[i * n:(i + 1) * n], pos=c.pos[i * n:(i + 1) * n])
                         for i in range(len(sizes)))
        self.ctx.block(c, f"{where} splits the channel dim at fixed sizes {sizes} (use chunk() to let "
                          "the pieces shrink together)")
        return None
