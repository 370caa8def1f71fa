"""The layer-rule protocol and its lookup: :class:`LayerRule`, ``register_layer`` / ``find_rule``, and the
tensor helpers rules share (slice, zero, set a parameter). See :mod:`prunekit.engine.rules` for the
protocol and the built-in rules."""
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


