"""Exceptions of the channel-dependency engine. Each message names the module or group at fault."""
from __future__ import annotations

from ..errors import PrunekitError


class UnsupportedLayerError(PrunekitError):
    """A module that owns parameters has no channel rule (or is a kind the engine refuses, e.g.
    multi-head attention). Fix: ``prunekit.engine.register_layer(Type, rule)`` or ignore the module."""


class UntraceableModelError(PrunekitError):
    """Neither ``torch.fx.symbolic_trace`` nor ``torch.export`` could capture the model's forward."""


class PlanError(PrunekitError, ValueError):
    """A :class:`~prunekit.engine.plan.Plan` does not fit its graph (unknown group, wrong sizes,
    dropped protected channels, merge on a non-mergeable group, ...)."""


class SurgeryError(PrunekitError):
    """Surgery produced a model whose forward fails or changes output shapes, or a
    :class:`~prunekit.engine.plan.PruneRecord` does not replay onto a model."""
