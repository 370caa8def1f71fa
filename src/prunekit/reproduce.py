"""Paper studies runnable in one command: ``prunekit reproduce NAME [--checkpoint C] [--epochs N] [--json]``.

A study is a function ``fn(options: StudyOptions) -> (report dict, markdown table str)``; the
report is what ``--json`` prints, the table what a human sees. Method modules register their
studies here (Neuron Merging's LeNet table, Polarization and gRDA Fashion-MNIST studies, and the
GPU-sized paper recipes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .registry import Registry


@dataclass(frozen=True)
class StudyOptions:
    checkpoint: str | None = None
    data_root: str | None = None
    device: str | None = None
    epochs: int | None = None
    finetune_epochs: int | None = None
    out: str | None = None
    seed: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


Study = Callable[[StudyOptions], tuple[dict[str, Any], str]]
STUDIES: Registry[Study] = Registry("study")


def register_study(name: str) -> Callable[[Study], Study]:
    return lambda fn: STUDIES.register(name, fn)


def get_study(name: str) -> Study:
    _load_builtin_studies()
    return STUDIES.get(name)


def list_studies() -> list[str]:
    _load_builtin_studies()
    return STUDIES.names()


def _load_builtin_studies() -> None:
    """Import the method modules that register studies (optional ones may be absent)."""
    import importlib

    for module in ("prunekit.merging.studies", "prunekit.polarization.studies", "prunekit.grda_studies"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
