"""Running a model to *look* at it: eval mode, input normalisation, activation capture.

Every measurement in prunekit (graph capture, compensation statistics, dead-channel probes,
feature-map preservation) runs the model in eval mode without gradients and reads some modules'
inputs or outputs through hooks. These are the only helpers that do so:

- :func:`eval_mode` — eval mode + ``no_grad`` for a block; restores *every submodule's own* flag (a
  model with a frozen, eval-mode backbone and a training head comes back exactly as it was).
- :func:`as_inputs` — a tensor / tuple / kwargs dict / shape → ``(args, kwargs)`` for ``model(*args, **kwargs)``;
  tensors keep their dtype (token ids stay int64); :func:`without_kv_cache` adds ``use_cache=False`` for a
  decoder that would build a key/value cache.
- :func:`capture` — a context in which chosen modules' inputs (or outputs) are recorded, optionally
  stopping the forward pass as soon as all of them have been seen.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["Captured", "StopForward", "as_inputs", "call", "capture", "eval_mode", "seed_everything",
           "without_kv_cache"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module, no_grad: bool = True) -> Iterator[None]:
    """Eval mode (and ``torch.no_grad`` unless ``no_grad=False``) for the block.

    On exit every submodule gets back its own ``training`` flag — not ``model.train(was)``, which
    would overwrite mixed modes.
    """
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    grad = torch.is_grad_enabled()
    if no_grad:
        torch.set_grad_enabled(False)
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t
        torch.set_grad_enabled(grad)


def as_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Normalise example inputs to ``(args, kwargs)``.

    Accepts a tensor, a tuple/list of tensors (positional), a dict (keyword arguments, e.g.
    ``{"input_ids": ..., "attention_mask": ...}``) or a shape (tuple of ints such as ``(1, 3, 32, 32)``,
    filled with seeded N(0, 1) values). Tensors are passed through untouched (dtype and device kept).
    """
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


def without_kv_cache(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` with ``use_cache=False`` when ``model.forward`` takes ``use_cache`` and the caller did not set
    it (``transformers``' decoders, T5: they build and return a key/value cache object by default)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs and list(params).index("use_cache") >= len(args):
        return {**kwargs, "use_cache": False}
    return kwargs


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(*args, **kwargs)`` for inputs in any form :func:`as_inputs` accepts."""
    args, kwargs = as_inputs(inputs)
    return model(*args, **kwargs)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (caught by :func:`capture`)."""


@dataclass
class Captured:
    """What :func:`capture` recorded: ``values[name]`` (the first tensor seen, or all calls' tensors)."""

    values: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def missing(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n not in self.values]


@contextlib.contextmanager
def capture(model: nn.Module, names: Iterable[str], *, what: str = "input", stop: bool = False,
            every_call: bool = False, transform: Callable[[torch.Tensor], Any] | None = None
            ) -> Iterator[Captured]:
    """Record the first input (``what="input"``) or output (``"output"``) tensor of modules ``names``.

    Args:
        model: the root module; ``names`` are its submodule names.
        what: ``"input"`` (the first positional argument, before the module runs) or ``"output"``.
        stop: end the forward pass (by :class:`StopForward`, swallowed here) once every module has been
            seen — saves the rest of the network when only early layers are needed.
        every_call: keep a list of all calls' tensors instead of the first call's only.
        transform: applied to each recorded tensor (default: ``detach``).

    Yields a :class:`Captured`; run the model inside the block. Hooks are removed on exit.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    names = list(dict.fromkeys(names))
    box = Captured()
    keep = transform or (lambda t: t.detach())

    def record(name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            return
        if every_call:
            box.values.setdefault(name, []).append(keep(value))
        elif name not in box.values:
            box.values[name] = keep(value)
        if stop and all(n in box.values for n in names):
            raise StopForward

    def hook_for(name: str) -> Callable:
        if what == "input":
            return lambda _m, args: record(name, args[0] if args else None)
        return lambda _m, _args, out: record(name, out)

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(hook_for(name)) if what == "input"
                       else module.register_forward_hook(hook_for(name)))
    try:
        yield box
    except StopForward:
        box.stopped = True
    finally:
        for h in handles:
            h.remove()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), ``random`` and numpy's global generator from one integer."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
