"""The regularizer hook of the Trainer: a loss term before backward, a projection after each step.

A regularizer (e.g. Polarization, ``docs/polarization.md``) needs two things from a training loop:

- ``penalty(model)``: a scalar tensor added to the (batch-mean) task loss before ``backward``, so its
  gradient flows through the same optimizer as the rest (momentum, weight decay, gradient averaging
  under DDP). ``None`` means "no term this step".
- ``after_step(model)``: an in-place projection run after every optimizer step, under ``no_grad``
  (e.g. clamping scaling factors to ``[0, a]``). Optimizer state such as momentum is not touched.

The Trainer always passes the *underlying* module (never the DDP wrapper). Every rank computes the
same penalty on identical weights and applies the same projection, so replicas stay identical.

State that must survive a resume (counters, schedules of λ, ...) goes through ``state_dict`` /
``load_state_dict``; values must be tensors or JSON scalars so the checkpoint stays pickle-free.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import Registry


class Regularizer:
    """Base class: every hook is optional and a no-op by default. Subclass and override what you need."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """Scalar tensor added to the loss before ``backward`` (differentiable w.r.t. the parameters)."""
        return None

    def after_step(self, model: nn.Module) -> None:
        """In-place projection after every optimizer step; called under ``torch.no_grad()``."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the epoch's first batch; ``epoch`` is 0-based (the value passed to ``set_epoch``)."""

    def state_dict(self) -> dict[str, Any]:
        """Resumable state: tensors and JSON scalars only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class NoRegularizer(Regularizer):
    """The explicit "nothing": adds no term and projects nothing (useful as a CLI default)."""


# --------------------------------------------------------------------------- registry
# ``create_regularizer("polarization", model, lam=1e-4, t=1.2)``: factories take the model (to select
# the factors they act on) and keyword options. ``polarization`` and ``slimming`` come from
# :mod:`prunekit.polarization`, imported on the first lookup.

REGULARIZERS: Registry = Registry("regularizer", builtins=("prunekit.polarization",))
REGULARIZERS.register("none", lambda model, **kw: NoRegularizer())


def create_regularizer(name: str, model: nn.Module, **kw: Any) -> Regularizer:
    """Build the registered regularizer ``name`` for ``model`` (e.g. ``"polarization"``, ``"slimming"``)."""
    return REGULARIZERS.get(name)(model, **kw)


def list_regularizers() -> list[str]:
    return REGULARIZERS.names()


def _load_builtin_regularizers() -> None:
    """Deprecated no-op kept for old callers: every registry now loads its built-in entries itself."""
    REGULARIZERS.load()
