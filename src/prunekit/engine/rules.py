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

import torch
from torch import nn

from .norm_rules import BatchNormRule, ChannelWiseRule, GroupNormRule, LayerNormRule, PReLURule
from .rule_base import (
    LAYER_RULES,
    LayerRule,
    _check,
    _set_param,
    _slice,
    _zero,
    find_rule,
    register_layer,
    register_layer_name,
    register_layer_suffix,
)

__all__ = [
    "LAYER_RULES", "BatchNormRule", "BlockRule", "ChannelWiseRule", "ConvRule", "ConvTransposeRule", "EmbeddingRule",
    "GroupNormRule", "LayerNormRule", "LayerRule", "LinearRule", "PReLURule", "PassRule", "RefuseRule",
    "ReshapeRule", "SoftmaxRule", "TransposedLinearRule", "WeightRule", "find_rule", "register_layer",
    "register_layer_name", "register_layer_suffix",
]


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
        if m.bias is None and isinstance(m, nn.Linear):  # bias-free Linear (Llama): a zero bias first; replay
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                  requires_grad=m.weight.requires_grad)  # recreates it from the record's shapes
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
