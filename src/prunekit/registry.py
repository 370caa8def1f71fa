"""A tiny name → factory registry with one lazy loader for its built-in entries.

Every registry of the library (models, datasets, criteria, optimizers, schedules, recipes, regularizers,
pruning methods, merge presets, studies) is a :class:`Registry`. Entries defined in other modules are
named by those modules' dotted names (``builtins``); they are imported on the first lookup, so any
``get_*`` / ``list_*`` works in a fresh interpreter without importing the right package first.
"""
from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from .errors import unknown_name

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to factories; ``register`` is usable as a decorator.

    Args:
        kind: what an entry is, for error messages (``"model"`` → ``unknown model 'x'; known: ...``).
        builtins: dotted module names that register entries here when imported (e.g.
            ``("prunekit.merging.method", "prunekit.polarization")``). They are imported once, in order,
            by :meth:`load`: the first time a name is missing from :meth:`get` / ``in``, and before the
            first :meth:`names` / iteration. A module that is not installed (its
            ``ModuleNotFoundError`` names the module itself or one of its parent packages) is skipped;
            every other import error propagates, and the next lookup tries again.

    A builtin module may itself look up the registry while it is being imported (``if name not in
    REG: REG.register(...)``): the nested lookup sees what is registered so far and does not recurse.

    Example:
        >>> MODELS = Registry("model", builtins=("mypkg.models",))
        >>> @MODELS.register("lenet-300-100")
        ... def lenet_300_100(**cfg): ...
        >>> MODELS.get("lenet-300-100")
    """

    def __init__(self, kind: str, builtins: Iterable[str] = ()):
        self.kind = kind
        self.builtins: tuple[str, ...] = tuple(builtins)
        self._items: dict[str, F] = {}
        self._loaded = not self.builtins
        self._loading = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Import the ``builtins`` modules (once; a no-op while they are being imported)."""
        if self._loaded:
            return
        with self._lock:  # re-entrant: the importing thread passes, another thread waits for the result
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                for module in self.builtins:
                    _import_optional(module)
                self._loaded = True
            finally:
                self._loading = False

    # ------------------------------------------------------------------ entries

    def register(self, name: str, obj: F | None = None, *, overwrite: bool = False):
        """Add ``obj`` under ``name`` (or return a decorator that does). Never triggers :meth:`load`."""
        def add(o: F) -> F:
            if name in self._items and not overwrite:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> F:
        """The entry ``name``; raises :class:`~prunekit.errors.UnknownNameError` listing the known names."""
        if name not in self._items:
            self.load()
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        """Every registered name (built-ins included), sorted."""
        self.load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else f"builtins not loaded: {', '.join(self.builtins)}"
        return f"Registry({self.kind!r}, {len(self._items)} entries, {state})"


def _import_optional(module: str) -> None:
    """Import ``module``; tolerate only its own absence (or a parent package's), not a failing import inside it."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
