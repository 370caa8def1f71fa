"""Per-layer-type channel rules: how a leaf module couples channels, and how to cut it.

A rule answers two questions for one module type:

* **trace** — given the channel layout of the module's inputs (a :class:`~prunekit.engine.graph.Chan`
  per tensor: which *atom* every channel index carries), register the module's channel dimensions as
  group *members* and return the layout of its output. Three member roles exist:

  ``"out"``  producer rows (``Conv.weight[o]``, ``Linear.weight[o]``): pruning removes rows;
  ``"in"``   consumer columns (``Conv.weight[:, i]``, ``Linear.weight[:, i]``): pruning removes columns,
             merging replaces ``W`` by ``W ×_in E``;
  ``"norm"`` per-channel parameters/buffers (BatchNorm γ, β, running stats; GroupNorm; LayerNorm).

* **prune** — slice the module's tensors along one role's dimension and update its attributes
  (``out_channels``, ``in_features``, ``num_features``, ``groups``, ...). This is only ever called by
  :mod:`prunekit.engine.surgery`.

Rules are registered per type with :func:`register_layer`; lookup walks the MRO, so a subclass of
``nn.Conv2d`` uses the conv rule unless it registers its own. For a custom layer that scales each
channel, ``register_layer(MyScale, ChannelWiseRule(params=("scale",)))`` is enough.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .channels import TensorInfo
    from .context import TraceContext

LAYER_RULES: Registry = Registry("layer rule")
_BY_TYPE: dict[type, LayerRule] = {}


def register_layer(module_type: type, rule: LayerRule, *, overwrite: bool = False) -> LayerRule:
    """Register ``rule`` for ``module_type`` (and its subclasses without a rule of their own)."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_layer expects an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"register_layer expects a LayerRule instance, got {rule!r}")
    key = f"{module_type.__module__}.{module_type.__qualname__}"
    LAYER_RULES.register(key, rule, overwrite=overwrite)
    _BY_TYPE[module_type] = rule
    return rule


_BY_NAME: dict[str, LayerRule] = {}
_BY_SUFFIX: list[tuple[str, tuple[str, ...], LayerRule]] = []


def register_layer_name(qualified_name: str, rule: LayerRule) -> LayerRule:
    """Register ``rule`` for the class ``"package.module.ClassName"`` without importing it (rules for
    optional libraries such as ``transformers.pytorch_utils.Conv1D``)."""
    LAYER_RULES.register(qualified_name, rule, overwrite=True)
    _BY_NAME[qualified_name] = rule
    return rule


def register_layer_suffix(suffix: str, rule: LayerRule, *, exclude: tuple[str, ...] = ()) -> LayerRule:
    """Register ``rule`` for every class whose name ends with ``suffix`` (and contains none of
    ``exclude``), e.g. the ~200 ``*RMSNorm`` copies in ``transformers``; exact registrations win."""
    _BY_SUFFIX.append((suffix, exclude, rule))
    return rule


def find_rule(module_type: type) -> LayerRule | None:
    """The rule registered for ``module_type`` or its nearest registered base class (by type, then by
    qualified class name, then by class-name suffix)."""
    for t in module_type.__mro__:
        rule = _BY_TYPE.get(t) or _BY_NAME.get(f"{t.__module__}.{t.__qualname__}")
        if rule is not None:
            return rule
    name = module_type.__name__
    for suffix, exclude, rule in _BY_SUFFIX:
        if name.endswith(suffix) and not any(e in name for e in exclude):
            return rule
    return None


# ----------------------------------------------------------------------------------------------
# helpers shared by rules


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    module._parameters[name] = nn.Parameter(value.contiguous().clone(), requires_grad=old.requires_grad)


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    module._buffers[name] = value.contiguous().clone()


def _slice(module: nn.Module, names: Sequence[str], dim: int, idx: torch.Tensor) -> None:
    """Index ``module.<name>`` along ``dim`` for every present parameter or buffer in ``names``."""
    for name in names:
        t = getattr(module, name, None)
        if t is None:
            continue
        sliced = t.detach().index_select(dim, idx.to(t.device))
        if name in module._parameters:
            _set_param(module, name, sliced)
        else:
            _set_buffer(module, name, sliced)


def _zero(module: nn.Module, names: Sequence[str], dim: int, idx: torch.Tensor) -> None:
    """Set ``module.<name>`` to 0 at ``idx`` along ``dim`` (in place, no autograd)."""
    with torch.no_grad():
        for name in names:
            t = getattr(module, name, None)
            if t is not None:
                t.index_fill_(dim, idx.to(t.device), 0)


def _check(cond: bool, module: nn.Module, msg: str) -> None:
    if not cond:
        from .errors import SurgeryError

        raise SurgeryError(f"{type(module).__name__}: {msg}")


class LayerRule:
    """Base class of channel rules; see the module docstring for the protocol.

    Subclasses implement :meth:`trace` and, when the module has channel-sized tensors,
    :meth:`prune`. Producers implement :meth:`rows` (criteria read them), consumers that can absorb a
    merge matrix implement :meth:`merge_in` and return True from :meth:`can_merge_in`.
    """

    #: the module maps 0 ↦ 0 and commutes with a positive per-channel scale (ReLU, max-pool, ...)
    positively_homogeneous: bool = False

    def trace(self, ctx: TraceContext, name: str, module: nn.Module, inputs: list[TensorInfo],
              out_shape: Any) -> Any:
        raise NotImplementedError

    def prune(self, module: nn.Module, role: str, idx: torch.Tensor) -> None:
        """Keep only indices ``idx`` (LongTensor, ascending) of the ``role`` dimension."""
        raise NotImplementedError(f"{type(self).__name__} cannot prune role '{role}'")

    def size(self, module: nn.Module, role: str) -> int | None:
        """Current length of the ``role`` dimension (None: unknown); guards against stale graphs."""
        return None

    def zero(self, module: nn.Module, role: str, idx: torch.Tensor) -> None:
        """Masking instead of pruning: make channels ``idx`` of ``role`` output exactly 0."""
        raise NotImplementedError(f"{type(self).__name__} cannot mask role '{role}'")

    def can_merge_in(self, module: nn.Module) -> bool:
        return False

    def merge_in(self, module: nn.Module, E: torch.Tensor) -> None:
        """Replace the input-channel dim: ``W_new[:, j'] = Σ_j E[j, j'] · W[:, j]``.

        ``E`` (in_old × in_new) may be a sparse COO tensor."""
        raise NotImplementedError(f"{type(self).__name__} cannot absorb a merge matrix")

    def set_weights(self, module: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        """Replace the weight and/or bias by tensors of the same shapes (a reconstruction refit)."""
        raise NotImplementedError(f"{type(self).__name__} has no weights to refit")

    def add_output_offset(self, module: nn.Module, v: torch.Tensor) -> None:
        """Add the constant ``v`` (out_channels,) to every output: ``b += v``."""
        raise NotImplementedError(f"{type(self).__name__} cannot absorb an output offset")

    def absorb_input_offset(self, module: nn.Module, v: torch.Tensor) -> None:
        """Make ``module(x)`` equal what it gave for ``x + v`` (v per channel), e.g. BN: ``μ −= v``."""
        raise NotImplementedError(f"{type(self).__name__} cannot absorb an input offset")

    def set_statistics(self, module: nn.Module, mean: torch.Tensor | None, var: torch.Tensor | None) -> None:
        """Replace a norm's running statistics (re-estimated on calibration data)."""
        raise NotImplementedError(f"{type(self).__name__} has no running statistics")

    def rows(self, module: nn.Module, include_bias: bool = False) -> torch.Tensor:
        """Producer rows, shape (out_channels, F): what l1/l2/GM criteria measure."""
        raise NotImplementedError(f"{type(self).__name__} has no producer rows")

    def scale(self, module: nn.Module) -> torch.Tensor | None:
        """Per-channel scale (|γ| for bn-scale) or None when the module has none."""
        return None

    def param_dims(self, module: nn.Module, role: str) -> dict[str, int]:
        """``{parameter name: dim}`` that pruning ``role`` slices (tied parameters couple channels)."""
        return {}


# ----------------------------------------------------------------------------------------------
# producers / consumers


class WeightRule(LayerRule):
    """Layers with one ``weight`` whose output units lie on dim ``OUT_DIM`` and input units on ``IN_DIM``,
    plus an optional per-output ``bias``; their sizes live in the attributes ``OUT_ATTR`` / ``IN_ATTR``."""

    OUT_DIM, IN_DIM = 0, 1
    OUT_ATTR, IN_ATTR = "out_channels", "in_channels"

    def prune(self, m, role, idx):
        if role == "out":
            _slice(m, ("weight",), self.OUT_DIM, idx)
            _slice(m, ("bias",), 0, idx)
            setattr(m, self.OUT_ATTR, len(idx))
        elif role == "in":
            _slice(m, ("weight",), self.IN_DIM, idx)
            setattr(m, self.IN_ATTR, len(idx))
        else:
            super().prune(m, role, idx)

    def size(self, m, role):
        return {"out": getattr(m, self.OUT_ATTR), "in": getattr(m, self.IN_ATTR)}.get(role)

    def param_dims(self, m, role):
        return {"out": {"weight": self.OUT_DIM, "bias": 0}, "in": {"weight": self.IN_DIM}}.get(role, {})

    def zero(self, m, role, idx):
        if role == "out":
            _zero(m, ("weight",), self.OUT_DIM, idx)
            _zero(m, ("bias",), 0, idx)

    def set_weights(self, m, weight, bias):
        for name, value in (("weight", weight), ("bias", bias)):
            if value is None:
                continue
            old = getattr(m, name, None)
            _check(old is not None, m, f"a refit gives a {name} but the module has none")
            _check(tuple(value.shape) == tuple(old.shape), m,
                   f"refit {name} has shape {tuple(value.shape)}, the module's is {tuple(old.shape)}")
            _set_param(m, name, value.to(old))

    def add_output_offset(self, m, v):
        _check(m.bias is not None, m, "an output offset needs a bias (or a BatchNorm right after the layer)")
        _check(v.numel() == m.bias.numel(), m, f"output offset has {v.numel()} values, the bias {m.bias.numel()}")
        _set_param(m, "bias", m.bias.detach() + v.reshape(-1).to(m.bias))

    def rows(self, m, include_bias=False):
        """One row per output unit: (O, I·k), or (O, I·k + 1) with the bias appended."""
        w = m.weight.detach().movedim(self.OUT_DIM, 0).flatten(1)
        if include_bias and m.bias is not None:
            w = torch.cat([w, m.bias.detach()[:, None]], 1)
        return w


class ConvRule(WeightRule):
    """``nn.Conv1d/2d/3d``: weight (O, I/g, *k), input channel dim 1.

    * ``groups == 1``: input channels are consumed (role "in"), O fresh output channels are produced.
    * depthwise (``I/g == 1``, O = k·g): output channel ``o`` is computed from input channel ``o // k``;
      the layer is channel-wise: pruning input channel ``i`` removes outputs ``i·k … i·k+k−1`` and sets
      ``groups = in_channels``.
    * grouped (``I/g > 1``): offset ``t`` of every input block is coupled across blocks (and likewise
      every output offset), so each group keeps the same channels and ``groups`` stays ``g``.
    """

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        c_in, g = module.in_channels, module.groups
        chan = ctx.channels(x, 1, c_in, name)
        kind = type(module).__name__
        ig, og = c_in // g, module.out_channels // g
        if g == 1:
            ctx.consume(name, kind, chan)
            return ctx.produce(name, kind, module.out_channels, dim=1, ndim=len(out_shape))
        if ig == 1:  # depthwise (channel multiplier og)
            ctx.consume(name, kind, chan)
            out = chan.repeat(og) if og > 1 else chan
            ctx.member(name, "out", kind, out)
            ctx.taint(chan, f"depthwise {kind} '{name}' sits between producer and consumer")
            return out.with_(raw=False)
        for b in range(1, g):  # grouped: couple offsets across blocks
            ctx.unify(chan.atoms[b * ig:(b + 1) * ig], chan.atoms[:ig])
        ctx.consume(name, kind, chan)
        out = ctx.produce(name, kind, og, dim=1, ndim=len(out_shape), tile=g)
        ctx.taint(out, f"grouped {kind} '{name}' (groups={g}) produces these channels")
        return out

    def prune(self, m, role, idx):
        n = len(idx)
        if role == "out":
            _check(n % m.groups == 0 or m.in_channels // m.groups == 1, m, "output keep not divisible by groups")
            super().prune(m, role, idx)
        elif role == "in":
            g, ig = m.groups, m.in_channels // m.groups
            if g == 1:
                _slice(m, ("weight",), 1, idx)
            elif ig == 1:
                m.groups = n
            else:
                offsets = idx[idx < ig]
                _check(len(offsets) * g == n and bool((idx.view(g, -1) % ig == offsets).all()), m,
                       "grouped conv input keep is not the same in every group")
                _slice(m, ("weight",), 1, offsets)
            m.in_channels = n
        else:
            super().prune(m, role, idx)

    def can_merge_in(self, m):
        return m.groups == 1

    def merge_in(self, m, E):
        _check(m.groups == 1, m, "merge into a grouped conv")
        E = (E.to_dense() if E.is_sparse else E).to(m.weight)
        w = torch.einsum("oi...,ij->oj...", m.weight.detach(), E)
        _set_param(m, "weight", w)
        m.in_channels = E.shape[1]


class ConvTransposeRule(WeightRule):
    """``nn.ConvTranspose1d/2d/3d`` with ``groups == 1``: weight (I, O, *k). Grouped transposed convs
    are not pruned (their channels are protected)."""

    OUT_DIM, IN_DIM = 1, 0

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        kind = type(module).__name__
        chan = ctx.channels(x, 1, module.in_channels, name)
        if module.groups != 1:
            ctx.block(chan, f"grouped {kind} '{name}' is not pruned")
            out = ctx.produce(name, kind, module.out_channels, dim=1, ndim=len(out_shape))
            ctx.block(out, f"grouped {kind} '{name}' is not pruned")
            return out
        ctx.consume(name, kind, chan)
        return ctx.produce(name, kind, module.out_channels, dim=1, ndim=len(out_shape))

    def can_merge_in(self, m):
        return m.groups == 1

    def merge_in(self, m, E):
        E = (E.to_dense() if E.is_sparse else E).to(m.weight)
        _set_param(m, "weight", torch.einsum("i...,ij->j...", m.weight.detach(), E))
        m.in_channels = E.shape[1]


class LinearRule(WeightRule):
    """``nn.Linear``: weight (O, I) acting on the last dim."""

    OUT_ATTR, IN_ATTR = "out_features", "in_features"

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        kind = type(module).__name__
        chan = ctx.channels(x, len(x.shape) - 1, getattr(module, self.IN_ATTR), name)
        ctx.consume(name, kind, chan)
        return ctx.produce(name, kind, getattr(module, self.OUT_ATTR), dim=len(out_shape) - 1,
                           ndim=len(out_shape))

    def can_merge_in(self, m):
        return True

    def merge_in(self, m, E):
        w = m.weight.detach().movedim(self.OUT_DIM, 0)  # (O, I)
        if E.is_sparse:  # flatten → Linear: E = M ⊗ I_HW can be large, keep it sparse
            new = torch.sparse.mm(E.t().to(device=w.device, dtype=w.dtype).coalesce(), w.t()).t()
        else:
            new = w @ E.to(w)
        _set_param(m, "weight", new.movedim(0, self.OUT_DIM))
        setattr(m, self.IN_ATTR, E.shape[1])


class TransposedLinearRule(LinearRule):
    """``transformers``' ``Conv1D`` (GPT-2, GPT): a linear layer with weight (I, O) and sizes ``nx``/``nf``."""

    OUT_DIM, IN_DIM = 1, 0
    OUT_ATTR, IN_ATTR = "nf", "nx"


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: produces ``embedding_dim`` channels on the last dim (weight columns)."""

    def trace(self, ctx, name, module, inputs, out_shape):
        for x in inputs:
            ctx.block(x, f"indices of embedding '{name}'")
        return ctx.produce(name, type(module).__name__, module.embedding_dim, dim=len(out_shape) - 1,
                           ndim=len(out_shape))

    def prune(self, m, role, idx):
        if role != "out":
            super().prune(m, role, idx)
        _slice(m, ("weight",), 1, idx)
        m.embedding_dim = len(idx)

    def size(self, m, role):
        return m.embedding_dim if role == "out" else None

    def param_dims(self, m, role):
        return {"weight": 1} if role == "out" else {}

    def zero(self, m, role, idx):
        _zero(m, ("weight",), 1, idx)

    def rows(self, m, include_bias=False):
        return m.weight.detach().t()


# ----------------------------------------------------------------------------------------------
# channel-wise layers


class ChannelWiseRule(LayerRule):
    """A layer whose listed parameters/buffers are indexed by channel along their dim 0.

    Args:
        params: parameter names sliced on prune (missing ones, e.g. ``bias=None``, are skipped).
        buffers: buffer names sliced on prune.
        attr: integer attribute holding the channel count (``num_features``), updated on prune.
        dim: the input's channel dim (1 for N×C×…, -1 for channels-last).
        positively_homogeneous: True when ``f(s·x) = s·f(x)`` per channel for ``s > 0``.
        scale_param: parameter whose absolute value is the channel's scale (bn-scale criterion).
    """

    keeps_raw = False  # True: a BatchNorm right after it still counts as "right after the producer"

    def __init__(self, params: Sequence[str] = ("weight", "bias"), buffers: Sequence[str] = (),
                 attr: str | None = None, dim: int = 1, positively_homogeneous: bool = False,
                 scale_param: str | None = None):
        self.params, self.buffers, self.attr, self.dim = tuple(params), tuple(buffers), attr, dim
        self.positively_homogeneous = positively_homogeneous
        self.scale_param = scale_param

    def _n(self, module, x) -> int:
        return int(getattr(module, self.attr)) if self.attr else x.shape[self.dim]

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        dim = self.dim % len(x.shape)
        chan = ctx.channels(x, dim, self._n(module, x), name)
        ctx.member(name, "norm", type(module).__name__, chan)
        self.check_mergeable(ctx, name, module, chan)
        return chan.with_(raw=chan.raw and self.keeps_raw)

    def check_mergeable(self, ctx, name, module, chan) -> None:
        if not self.positively_homogeneous:
            ctx.taint(chan, f"{type(module).__name__} '{name}' is not positively homogeneous")

    def prune(self, m, role, idx):
        _slice(m, self.params + self.buffers, 0, idx)
        if self.attr:
            setattr(m, self.attr, len(idx))

    def size(self, m, role):
        if self.attr:
            return int(getattr(m, self.attr))
        p = getattr(m, self.params[0], None) if self.params else None
        return None if p is None else p.shape[0]

    def zero(self, m, role, idx):
        _zero(m, self.params + tuple(b for b in self.buffers if b == "running_mean"), 0, idx)

    def param_dims(self, m, role):
        return {p: 0 for p in self.params}

    def scale(self, m):
        p = getattr(m, self.scale_param, None) if self.scale_param else None
        return None if p is None else p.detach().abs()


class BatchNormRule(ChannelWiseRule):
    """``nn.BatchNorm*``, ``nn.InstanceNorm*``, ``nn.SyncBatchNorm``: γ, β, running stats on dim 1.

    Mergeable only directly after the producer (conv → BN → ReLU, Neuron Merging Alg. 3): a BN after
    a nonlinearity breaks ``BN_n(a_n) = S·BN_p(a_p)``.
    """

    def __init__(self):
        super().__init__(params=("weight", "bias"), buffers=("running_mean", "running_var"),
                         attr="num_features", dim=1, scale_param="weight")

    keeps_raw = True

    def absorb_input_offset(self, m, v):
        """Eval-mode BN(x + v) = γ (x − (μ − v)) / σ + β: fold ``v`` into the running mean."""
        _check(m.running_mean is not None, m, "an input offset needs running statistics (track_running_stats)")
        _check(v.numel() == m.running_mean.numel(), m,
               f"input offset has {v.numel()} values, the norm {m.running_mean.numel()} channels")
        _set_buffer(m, "running_mean", m.running_mean - v.reshape(-1).to(m.running_mean))

    def set_statistics(self, m, mean, var):
        _check(m.running_mean is not None, m, "re-estimated statistics need track_running_stats")
        for name, value in (("running_mean", mean), ("running_var", var)):
            if value is not None:
                old = getattr(m, name)
                _check(value.numel() == old.numel(), m, f"{name} has {value.numel()} values, the norm {old.numel()}")
                _set_buffer(m, name, value.reshape(-1).to(old))

    def check_mergeable(self, ctx, name, module, chan):
        if not chan.raw:
            ctx.taint(chan, f"{type(module).__name__} '{name}' follows a nonlinearity")


class GroupNormRule(ChannelWiseRule):
    """``nn.GroupNorm(G, C)``: statistics are shared by the C/G channels of a group, so whole groups are
    pruned together (the channels of a group are coupled); ``num_groups`` shrinks. With G = 1 the
    statistics span every channel and the channels are protected."""

    def __init__(self):
        super().__init__(params=("weight", "bias"), attr="num_channels", dim=1, scale_param="weight")

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        chan = ctx.channels(x, 1, module.num_channels, name)
        g, per = module.num_groups, module.num_channels // module.num_groups
        if g == 1:
            ctx.block(chan, f"GroupNorm '{name}' has 1 group (statistics over all channels)")
        for b in range(g):
            ctx.unify(chan.atoms[b * per + 1:(b + 1) * per], chan.atoms[b * per:b * per + 1].repeat(per - 1))
        ctx.member(name, "norm", type(module).__name__, chan)
        ctx.taint(chan, f"GroupNorm '{name}' is not positively homogeneous")
        return chan.with_(raw=False)

    def prune(self, m, role, idx):
        per = m.num_channels // m.num_groups
        _check(len(idx) % per == 0, m, f"keep of {len(idx)} channels is not whole groups of {per}")
        super().prune(m, role, idx)
        m.num_groups = len(idx) // per


class LayerNormRule(ChannelWiseRule):
    """``nn.LayerNorm(C)`` over the channel (last) dim: γ/β sliced, ``normalized_shape = (C',)``.

    Removing a channel changes the statistics of the others (pruning, not masking). A LayerNorm over
    more dims than the channel dim is refused (its channels are protected). One over trailing
    non-channel dims only (e.g. over W of N×C×H×W) passes channels through. A *channels-first* subclass
    (``data_format == "channels_first"``, ConvNeXt; or a subclass fed N×C×H×W whose last dim is not C)
    normalises dim 1.
    """

    def __init__(self, params: Sequence[str] = ("weight", "bias")):
        super().__init__(params=params, dim=-1, scale_param="weight")

    @staticmethod
    def _shape(module, x) -> tuple[int, ...]:
        shape = getattr(module, "normalized_shape", None)
        if shape is None:
            w = getattr(module, "weight", None)
            shape = (w.shape[0],) if w is not None and w.dim() == 1 else (x.shape[-1],)
        return tuple(shape)

    @staticmethod
    def _channels_first(module, x, size: int) -> bool:
        fmt = getattr(module, "data_format", None)
        if fmt is not None:
            return fmt == "channels_first"
        return (type(module) is not nn.LayerNorm and len(x.shape) > 2 and x.shape[-1] != size
                and x.shape[1] == size)

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        shape = self._shape(module, x)
        nd, k, kind = len(x.shape), len(shape), type(module).__name__
        c = x.chan
        dim = 1 if k == 1 and self._channels_first(module, x, shape[0]) else nd - 1
        if c is not None and dim == nd - 1 and c.dim < nd - k:  # normalises non-channel dims only
            ctx.taint(c, f"{kind} '{name}' is not positively homogeneous")
            return c.with_(raw=False)
        if k != 1:
            ctx.block(x, f"{kind} '{name}' normalises over {shape}, channels and other dims together")
            return None
        chan = ctx.channels(x, dim, shape[0], name)
        ctx.member(name, "norm", kind, chan)
        ctx.taint(chan, f"{kind} '{name}' is not positively homogeneous")
        return chan.with_(raw=False)

    def size(self, m, role):
        w = getattr(m, "weight", None)
        return None if w is None else w.shape[0]

    def prune(self, m, role, idx):
        super().prune(m, role, idx)
        if hasattr(m, "normalized_shape"):
            m.normalized_shape = (len(idx),)


class PReLURule(ChannelWiseRule):
    """``nn.PReLU``: one slope (positively homogeneous, passes through) or one per channel (dim 1)."""

    def __init__(self):
        super().__init__(params=("weight",), attr="num_parameters", dim=1)

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        if module.num_parameters == 1:
            return ctx.passthrough(x, ph=True, reason="")
        return super().trace(ctx, name, module, inputs, out_shape).with_(raw=False)


# ----------------------------------------------------------------------------------------------
# parameter-free layers


class PassRule(LayerRule):
    """Element-wise or per-channel spatial op (activation, dropout, pooling, upsampling, spatial pad).

    Args:
        ph: positively homogeneous (ReLU, LeakyReLU, max/avg pooling, dropout in eval, identity).
        spatial: number of trailing dims the op mixes (pooling: 1/2/3); the channel dim must not be
            among them, else the channels are protected.
    """

    def __init__(self, ph: bool, spatial: int = 0):
        self.positively_homogeneous, self.spatial = ph, spatial

    def trace(self, ctx, name, module, inputs, out_shape):
        x = inputs[0]
        if self.spatial and x.chan is not None and x.chan.dim >= len(x.shape) - self.spatial:
            ctx.block(x, f"{type(module).__name__} '{name}' mixes the channel dim")
            return None
        ph = self.positively_homogeneous and not _nonzero_pad(module)
        return ctx.passthrough(x, ph=ph, reason=f"{type(module).__name__} '{name}' is not positively homogeneous")


def _nonzero_pad(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.padding._ConstantPadNd) and module.value != 0


class ReshapeRule(LayerRule):
    """``nn.Flatten`` / ``nn.Unflatten``: channel layout follows the shapes (flatten → Linear gives each
    channel a block of H·W features)."""

    positively_homogeneous = True

    def trace(self, ctx, name, module, inputs, out_shape):
        return ctx.reshape(inputs[0], out_shape, where=f"{type(module).__name__} '{name}'")


class SoftmaxRule(LayerRule):
    """``nn.Softmax/LogSoftmax/Softmin``: normalising over the channel dim couples all channels."""

    def trace(self, ctx, name, module, inputs, out_shape):
        return ctx.softmax(inputs[0], module.dim, where=f"{type(module).__name__} '{name}'")


class BlockRule(LayerRule):
    """A parameter-free layer that permutes or mixes channels: inputs and outputs are protected."""

    def __init__(self, reason: str):
        self.reason = reason

    def trace(self, ctx, name, module, inputs, out_shape):
        for x in inputs:
            ctx.block(x, f"{type(module).__name__} '{name}' {self.reason}")


class RefuseRule(LayerRule):
    """A layer the engine refuses to trace through unless the user ignores it (it is then opaque)."""

    refuses = True

    def __init__(self, reason: str):
        self.reason = reason

    def trace(self, ctx, name, module, inputs, out_shape):
        from .errors import UnsupportedLayerError

        raise UnsupportedLayerError(
            f"module '{name}' ({type(module).__name__}) {self.reason}; ignore it "
            f"(ignored=['{name}']) to keep its channels, or register a rule with prunekit.register_layer(...)")


def _register_builtins() -> None:
    conv = ConvRule()
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register_layer(t, conv)
    for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_layer(t, ConvTransposeRule())
    register_layer(nn.Linear, LinearRule())
    register_layer(nn.Embedding, EmbeddingRule())
    bn = BatchNormRule()
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        register_layer(t, bn)
    register_layer(nn.GroupNorm, GroupNormRule())
    register_layer(nn.LayerNorm, LayerNormRule())
    rms = LayerNormRule(params=("weight",))  # RMSNorm: y = x / rms(x) · γ over the last dim
    if hasattr(nn, "RMSNorm"):
        register_layer(nn.RMSNorm, rms)
    register_layer_suffix("RMSNorm", rms, exclude=("Gated",))  # transformers' Llama/Mistral/Qwen2/... norms
    register_layer_suffix("T5LayerNorm", rms)  # T5, mT5, LongT5: RMS norm under another name
    register_layer_name("transformers.pytorch_utils.Conv1D", TransposedLinearRule())
    register_layer(nn.PReLU, PReLURule())
    ph = PassRule(ph=True)
    for t in (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
              nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Upsample, nn.UpsamplingNearest2d,
              nn.UpsamplingBilinear2d):
        register_layer(t, ph)
    nonph = PassRule(ph=False)
    for t in (nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
              nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
              nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU):
        register_layer(t, nonph)
    for k, ts in ((1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)),
                  (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)),
                  (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d))):
        for t in ts:
            register_layer(t, PassRule(ph=True, spatial=k))
    for k, ts in ((1, (nn.ZeroPad1d, nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d)),
                  (2, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)),
                  (3, (nn.ZeroPad3d, nn.ConstantPad3d, nn.ReflectionPad3d, nn.ReplicationPad3d))):
        for t in ts:
            ph_pad = t.__name__.startswith(("Zero", "Constant"))
            register_layer(t, PassRule(ph=ph_pad, spatial=k))
    reshape = ReshapeRule()
    register_layer(nn.Flatten, reshape)
    register_layer(nn.Unflatten, reshape)
    sm = SoftmaxRule()
    for t in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
        register_layer(t, sm)
    register_layer(nn.ChannelShuffle, BlockRule("permutes channels"))
    register_layer(nn.PixelShuffle, BlockRule("moves channels into space"))
    register_layer(nn.PixelUnshuffle, BlockRule("moves space into channels"))
    register_layer(nn.MultiheadAttention, RefuseRule(
        "ties its head width to its input width (embed_dim), so neither its heads nor the hidden size it "
        "reads can shrink inside it (attention written with nn.Linear + F.scaled_dot_product_attention "
        "prunes by heads)"))


_register_builtins()
