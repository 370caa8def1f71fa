"""Channel-wise layer rules: norms (BatchNorm, GroupNorm, LayerNorm incl. channels-first and RMSNorm) and
PReLU — layers whose parameters are indexed by channel along their dim 0."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .rule_base import LayerRule, _check, _set_buffer, _slice, _zero


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


