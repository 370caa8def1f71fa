"""A tiny name → factory registry, shared by models, datasets, optimizers and recipes."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import unknown_name

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to factories; ``register`` is usable as a decorator.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("lenet-300-100")
        ... def lenet_300_100(**cfg): ...
        >>> MODELS.get("lenet-300-100")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str, obj: F | None = None, *, overwrite: bool = False):
        def add(o: F) -> F:
            if name in self._items and not overwrite:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
