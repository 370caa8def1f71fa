"""Pruning methods by name: what ``prunekit prune --method NAME`` runs.

A method maps ``(model, example_inputs, PruneOptions)`` to a :class:`MethodResult`: a new, smaller
model (the input is untouched) and a JSON-ready ``details`` dict for the report. Methods decide; the
engine (``prunekit.engine``) applies. Later methods (Neuron Merging's ``merge``, least-squares
compensation, Polarization) register here too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError
from .registry import Registry


@dataclass(frozen=True)
class PruneOptions:
    """Options shared by the channel-pruning methods (see :func:`prunekit.engine.prune`)."""

    ratio: float = 0.5
    criterion: str = "l1-norm"
    scope: str = "local"
    rounding: str = "round"
    #: each group keeps a multiple of this many channels (rounded up, at most the group); None: off
    round_to: int | None = None
    ignored: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    #: score rows as ``[w | b]``; None: the method's default (off for ``prune``, on for ``merge``/``lstsq``)
    include_bias: bool | None = None
    seed: int = 0
    #: method-specific threshold, parsed by the method (Neuron Merging: a float; Polarization: ``"auto"``,
    #: ``"global"``, ``"percent"`` or a float); None: the method's default.
    threshold: float | str | None = None
    #: further method-specific options (e.g. Polarization's ``combine``, ``fallback``).
    method_options: dict[str, Any] = field(default_factory=dict)
    #: unlabeled calibration inputs for data-light methods (``lstsq``): a dataset, a tensor, or a
    #: zero-argument callable returning one (so that only the methods that need it load it)
    calibration_data: Any = None

    def engine_kwargs(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "criterion": self.criterion, "scope": self.scope, "rounding": self.rounding,
                "ignored": list(self.ignored) or None, "overrides": self.overrides or None,
                "include_bias": bool(self.include_bias), "seed": self.seed, "round_to": self.round_to}


@dataclass
class MethodResult:
    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)


Method = Callable[[nn.Module, Any, PruneOptions], MethodResult]
#: built-in methods: ``prune`` (below), ``merge``/``lstsq`` (Neuron Merging), ``polarization``
METHODS: Registry[Method] = Registry("pruning method", builtins=("prunekit.merging.method", "prunekit.polarization",
                                                                   "prunekit.baselines"))


def register_method(name: str) -> Callable[[Method], Method]:
    return lambda fn: METHODS.register(name, fn)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def list_methods() -> list[str]:
    return METHODS.names()


@register_method("prune")
def structured_prune(model: nn.Module, example_inputs: Any, options: PruneOptions) -> MethodResult:
    """Plain structured pruning: keep the best channels of every group by ``options.criterion``."""
    from .engine import prune

    if "preset" in options.method_options:  # a selection option it would ignore (compensation options are moot)
        raise ConfigError("method 'prune' does not take a preset (it prunes every group by the criterion); for a "
                          "preset's layers without compensation use --method merge --method-option model_type=prune")
    pruned = prune(model, example_inputs, **options.engine_kwargs())
    plan = pruned.prunekit_plan
    removed = sum(g.size - len(g.keep) for g in plan.groups)
    return MethodResult(pruned, {"groups": len(plan.groups), "channels_removed": removed, "pruned": removed,
                                 "merged": 0})
