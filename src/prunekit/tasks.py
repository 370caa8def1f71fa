"""What the trainer sees of a task: model outputs → logits, batches → ``(x, y)``, classification vs causal LM.

Shared by :mod:`prunekit.train` and the CLI. A model may return a tensor or anything with ``.logits`` (a
Hugging Face ``ModelOutput``); a batch may be ``(x, y, ...)`` or a dict (``input_ids``, ``labels``, ...). The
task comes from the dataset (``task="causal-lm"``) or, failing that, from the shapes: logits (B, T, V)
against targets (B, T) are a causal LM (token cross-entropy, perplexity), anything else classification.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

TASKS = ("classification", "causal-lm")
_TASK_ALIASES = {"classification": "classification", "causal-lm": "causal-lm", "causal_lm": "causal-lm",
                 "lm": "causal-lm", "language-modeling": "causal-lm"}


def model_logits(out: Any) -> torch.Tensor:
    """The logits of a model output: ``out.logits`` (HF ``ModelOutput``), ``out["logits"]``, or ``out`` itself."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    return out if logits is None else logits


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(x, y)`` of a batch: ``(x, y, ...)`` tuples / lists, or a dict whose ``labels`` are ``y`` (rest: x)."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ConfigError(f"a dict batch needs 'labels' (the targets); it has {sorted(batch)}")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return batch[0], batch[1]


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _first_rows(x: Any) -> Any:
    """A batch of one: ``x[:1]`` of a tensor, of every tensor of a dict."""
    if isinstance(x, dict):
        return {k: v[:1].detach().clone() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x[:1].detach().clone()


def forward_kwargs(module: nn.Module) -> dict[str, Any]:
    """Keyword arguments every training / evaluation forward gets: ``use_cache=False`` where ``forward``
    takes ``use_cache`` (HF decoders would otherwise build a key/value cache)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def dataset_task(dataset: Any) -> str | None:
    """The task a dataset declares (``dataset.task`` or ``dataset.info.task``), normalised to :data:`TASKS`;
    ``None`` when it declares none (or one the trainer does not know: the shapes decide)."""
    for obj in (dataset, getattr(dataset, "info", None)):
        task = getattr(obj, "task", None)
        if isinstance(task, str):
            return _TASK_ALIASES.get(task.lower())
    return None


def infer_task(logits: torch.Tensor, targets: torch.Tensor) -> str:
    """``causal-lm`` for logits (B, T, V) with integer targets (B, T), else ``classification``."""
    lm = (logits.dim() == 3 and targets.dim() == 2 and tuple(logits.shape[:2]) == tuple(targets.shape)
          and not targets.is_floating_point())
    return "causal-lm" if lm else "classification"


class LogitsOf(nn.Module):
    """``model`` seen as a plain logits function: ``forward(*args, **kw)`` returns :func:`model_logits` of
    ``model(*args, **call_kwargs, **kw)`` (for :func:`prunekit.metrics.evaluate` on HF models)."""

    def __init__(self, model: nn.Module, **call_kwargs: Any):
        super().__init__()
        self.model = model
        self.call_kwargs = call_kwargs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return model_logits(self.model(*args, **self.call_kwargs, **kwargs))


class _Pairs:
    """A loader whose batches are re-shaped to ``(x, y)`` by :func:`split_batch`."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __iter__(self):
        return (split_batch(b) for b in self.loader)
