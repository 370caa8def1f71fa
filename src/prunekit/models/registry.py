"""Model registry, ``create`` / ``arch_of``, and the cfg validators every model module uses.

A registered factory is a function with keyword-only parameters (their defaults are the model's
defaults). ``register_model`` wraps it so that calling it (directly or through :func:`create`)

* rejects unknown cfg keys with a :class:`ConfigError` naming the key,
* builds the model, and
* attaches ``model.prunekit_arch = {"name": ..., "config": {...}}`` holding every parameter of the
  factory with its resolved value, converted to JSON types (tuples become lists).

A factory returns either the model, or ``(model, resolved)`` where ``resolved`` maps cfg keys whose
defaults are computed (e.g. ``internal_widths=None`` → the explicit per-block list) to their values.
"""
from __future__ import annotations

import copy
import difflib
import functools
import inspect
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import Registry

#: the zoo's families register on import of :mod:`prunekit.models` (its ``__init__`` imports every family)
MODELS: Registry = Registry("model", builtins=("prunekit.models",))


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., nn.Module]]:
    """Decorator: register a model factory under ``name`` (see the module docstring)."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., nn.Module]:
        params = inspect.signature(factory).parameters
        bad = [p for p in params.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        if bad:
            raise TypeError(f"model factory '{name}' must take keyword-only parameters, not {bad[0].name!r}")
        defaults = {k: p.default for k, p in params.items()}

        @functools.wraps(factory)
        def build(**cfg: Any) -> nn.Module:
            for key, value in cfg.items():
                if key not in defaults:
                    close = difflib.get_close_matches(key, list(defaults), n=1)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    raise ConfigError(
                        f"model '{name}' has no cfg key '{key}' (value {value!r}).{hint} "
                        f"Known keys: {', '.join(defaults)}"
                    )
            out = factory(**cfg)
            model, resolved = out if isinstance(out, tuple) else (out, {})
            config = {k: _jsonable(resolved.get(k, cfg.get(k, d))) for k, d in defaults.items()}
            try:
                json.dumps(config)
            except (TypeError, ValueError) as e:  # pragma: no cover - a factory bug, not a user error
                raise ConfigError(f"model '{name}' config is not JSON-serialisable: {e}") from None
            model.prunekit_arch = {"name": name, "config": config}
            return model

        MODELS.register(name, build)
        return build

    return decorate


def create(name: str, **cfg: Any) -> nn.Module:
    """Build the registered model ``name`` with cfg overrides; sets ``model.prunekit_arch``."""
    return MODELS.get(name)(**cfg)


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return MODELS.names()


def arch_of(model: nn.Module) -> dict:
    """``{"name", "config"}`` of a model built by :func:`create`; ``create(a["name"], **a["config"])``
    rebuilds the same architecture. Returns a deep copy (safe to edit)."""
    arch = getattr(model, "prunekit_arch", None)
    if not isinstance(arch, dict) or "name" not in arch or "config" not in arch:
        raise ConfigError(
            f"{type(model).__name__} has no prunekit_arch; build it with prunekit.models.create(name, **cfg)"
        )
    return copy.deepcopy(arch)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------
# cfg validators: each returns the normalised value or raises ConfigError naming key and value.


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value: Any, minimum: int = 1) -> int:
    """An int ≥ ``minimum`` (bools rejected)."""
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"model cfg '{key}' must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(key: str, value: Any, low: float = -math.inf, high: float = math.inf,
                high_inclusive: bool = True) -> float:
    """A finite real number in [low, high] (or [low, high) when ``high_inclusive`` is False)."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and low <= value and (value <= high if high_inclusive else value < high))
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(f"model cfg '{key}' must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigError(f"model cfg '{key}' must be one of {list(choices)}, got {value!r}")
    return value


def check_widths(key: str, value: Any, length: int, default: Sequence[int] | None = None) -> list[int]:
    """A list of ``length`` positive ints; ``None`` → ``default`` (when given)."""
    if value is None and default is not None:
        value = default
    if not isinstance(value, (list, tuple)) or len(value) != length:
        n = len(value) if isinstance(value, (list, tuple)) else "not a list"
        raise ConfigError(f"model cfg '{key}' must be a list of {length} positive ints, got {value!r} ({n})")
    for v in value:
        if not _is_int(v) or v < 1:
            raise ConfigError(f"model cfg '{key}' must hold positive ints, got {v!r} in {list(value)!r}")
    return [int(v) for v in value]


def check_common(num_classes: Any, in_channels: Any, input_size: Any, min_size: int = 1) -> tuple[int, int, int]:
    """Validate the three cfg keys every model has."""
    return (check_int("num_classes", num_classes), check_int("in_channels", in_channels),
            check_int("input_size", input_size, min_size))
