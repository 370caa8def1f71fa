"""Optimizer and learning-rate-schedule registries.

Optimizers are created by name with validated keyword arguments::

    opt = create_optimizer("sgd", model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

A factory is any callable ``f(params, **kwargs) -> torch.optim.Optimizer`` (an Optimizer subclass
works as is). Its signature is the contract: keyword arguments it does not name are rejected with a
:class:`~prunekit.errors.ConfigError` before anything is built.

Schedules are per-epoch multiplicative factors of the base learning rate, in closed form
(``lr_e = base_lr * factor(e)`` for the 0-based epoch ``e``), so a resumed run computes exactly the
same learning rates as an uninterrupted one (no accumulated ``lr *= gamma`` rounding).
"""
from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError
from ..registry import Registry

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochLR",
    "create_optimizer",
    "create_schedule",
    "list_optimizers",
    "list_schedules",
    "optimizer_arguments",
    "register_optimizer",
    "register_schedule",
]

#: built-ins: sgd, adam, adamw (below) and grda (:mod:`prunekit.optim.grda`)
OPTIMIZERS: Registry = Registry("optimizer", builtins=("prunekit.optim.grda",))
#: built-ins: step, multistep, cosine, constant (below), linear-hold (gRDA) and Polarization's schedules
SCHEDULES: Registry = Registry("schedule", builtins=("prunekit.optim.grda", "prunekit.polarization.recipes"))


def register_optimizer(name: str, factory: Callable | None = None, *, overwrite: bool = False):
    """Register ``factory(params, **kwargs) -> Optimizer`` under ``name``; usable as a decorator."""
    return OPTIMIZERS.register(name, factory, overwrite=overwrite)


def list_optimizers() -> list[str]:
    return OPTIMIZERS.names()


def optimizer_arguments(name: str) -> tuple[set[str], bool]:
    """Keyword arguments the optimizer ``name`` accepts (besides ``params``), and whether it takes ``**kw``."""
    sig = inspect.signature(OPTIMIZERS.get(name))
    names, var_kw = set(), False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not (i == 0 and p.name == "params"):
            names.add(p.name)
    names.discard("params")
    return names, var_kw


def create_optimizer(name: str, params: Iterable, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``params`` (tensors or param-group dicts).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the known ones).
        ConfigError: a keyword is not accepted by that optimizer, or a value is invalid.
    """
    factory = OPTIMIZERS.get(name)
    accepted, var_kw = optimizer_arguments(name)
    unknown = sorted(set(kwargs) - accepted)
    if unknown and not var_kw:
        bad = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
        raise ConfigError(f"optimizer '{name}' does not accept {bad}; it accepts: {', '.join(sorted(accepted))}")
    lr = kwargs.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"optimizer '{name}': lr must be a positive number, got {lr!r}")
    try:
        return factory(params, **kwargs)
    except ValueError as e:  # torch validates ranges with ValueError; re-raise with the optimizer's name
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"optimizer '{name}': {e}") from e


@register_optimizer("sgd")
def _sgd(params, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
         dampening: float = 0.0) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (L2 weight decay added to the gradient, PyTorch's momentum convention)."""
    if nesterov and momentum <= 0:
        raise ConfigError(f"optimizer 'sgd': nesterov=True needs momentum > 0, got momentum={momentum}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                           dampening=dampening)


@register_optimizer("adam")
def _adam(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (weight decay is L2 added to the gradient, not decoupled)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@register_optimizer("adamw")
def _adamw(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------------
# Per-epoch learning-rate schedules
# --------------------------------------------------------------------------------------------------

def register_schedule(name: str, factory: Callable | None = None, *, overwrite: bool = False):
    """Register ``factory(*, epochs, step_size, milestones, gamma) -> (epoch -> factor)``."""
    return SCHEDULES.register(name, factory, overwrite=overwrite)


def list_schedules() -> list[str]:
    return SCHEDULES.names()


@dataclass
class _Step:
    step_size: int
    gamma: float

    def __call__(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)


@dataclass
class _MultiStep:
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, epoch: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)


@dataclass
class _Cosine:
    epochs: int

    def __call__(self, epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))


@dataclass
class _Constant:
    def __call__(self, epoch: int) -> float:
        return 1.0


@register_schedule("step")
def _step_schedule(*, epochs, step_size, milestones, gamma):
    """``gamma ** (epoch // step_size)``: LeNet recipe, ×0.1 every 15 epochs."""
    return _Step(step_size, gamma)


@register_schedule("multistep")
def _multistep_schedule(*, epochs, step_size, milestones, gamma):
    """``gamma ** #{m in milestones : m <= epoch}``: CIFAR recipe, ×0.1 at epochs 100 and 150."""
    return _MultiStep(tuple(milestones), gamma)


@register_schedule("cosine")
def _cosine_schedule(*, epochs, step_size, milestones, gamma):
    """``(1 + cos(pi * epoch / epochs)) / 2``: cosine annealing to 0 over the run (no restarts)."""
    return _Cosine(epochs)


@register_schedule("constant")
def _constant_schedule(*, epochs, step_size, milestones, gamma):
    """Factor 1 at every epoch."""
    return _Constant()


class EpochLR(LambdaLR):
    """``LambdaLR`` stepped once per epoch whose factor comes from the recipe, not the checkpoint.

    ``state_dict`` keeps only the counters and base learning rates (JSON scalars); the factor is rebuilt
    from the recipe on resume, which the Trainer checks against the checkpoint's recipe.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float], name: str):
        self.name = name
        super().__init__(optimizer, factor)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state


def create_schedule(name: str, optimizer: torch.optim.Optimizer, *, epochs: int, step_size: int = 1,
                    milestones: Iterable[int] = (), gamma: float = 0.1) -> EpochLR:
    """Build the per-epoch schedule ``name``; call ``.step()`` once at the end of every epoch.

    Each param group's lr at 0-based epoch ``e`` is ``initial_lr * factor(e)``.
    """
    factor = SCHEDULES.get(name)(epochs=epochs, step_size=step_size, milestones=tuple(milestones), gamma=gamma)
    return EpochLR(optimizer, factor, name)


# registers "grda" and "linear-hold"; imported last because it needs the registries above
from .grda import GRDA

__all__ += ["GRDA"]
