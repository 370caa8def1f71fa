"""Paper studies runnable in one command: ``prunekit reproduce NAME [--checkpoint C] [--epochs N] [--json]``.

A study is a function ``fn(options: StudyOptions) -> (report dict, markdown table str)``; the
report is what ``--json`` prints, the table what a human sees. This module is only the registry: the
studies themselves live in the :mod:`prunekit.studies` package (one module per paper), which the
library never imports; the registry names those modules as strings and imports them on the first
lookup, like every other registry (:class:`prunekit.registry.Registry`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .registry import Registry


@dataclass(frozen=True)
class StudyOptions:
    """What ``prunekit reproduce`` passes to a study (``extra``: the ``--set KEY=VALUE`` options)."""

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
#: one module per paper: Neuron Merging (``nm-*``), Polarization (``polarization-*``), gRDA (``grda-*``),
#: compensation side by side (``compensation-*``), and transformers on real data (``vit-fmnist``,
#: ``llama-shakespeare``)
STUDIES: Registry[Study] = Registry("study", builtins=(
    "prunekit.studies.merging", "prunekit.studies.polarization", "prunekit.studies.grda",
    "prunekit.studies.compensation", "prunekit.studies.transformers"))


def register_study(name: str) -> Callable[[Study], Study]:
    return lambda fn: STUDIES.register(name, fn)


def get_study(name: str) -> Study:
    return STUDIES.get(name)


def list_studies() -> list[str]:
    return STUDIES.names()
