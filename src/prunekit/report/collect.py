"""Find result JSON files and tell what each one is from its keys.

Kinds (``Result.kind``):

* ``run`` — a trained or pruned model's ``model.json`` (``metadata.accuracy``), or the output of
  ``prunekit train --json`` / ``prunekit eval --json``;
* ``prune`` — ``prunekit prune --json`` (``method``, ``accuracy``, ``macs_reduction``, ...);
* ``nm-study`` / ``polarization-study`` / ``grda-study`` — ``prunekit reproduce NAME --json``;
* ``sweep`` — tables of prune results ``{"rows": [{"method", "ratio", "accuracy", ...}]}`` (one or a list);
* ``factors`` — ``{"run name": [scaling factors ...]}`` (the Polarization study's ``factors.json``);
* ``compare`` / ``direction`` — ``prunekit compare --json`` / ``prunekit analyze direction --json``.

Anything else is skipped with the reason; a file that is not valid JSON is an error naming it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PrunekitError

__all__ = ["Collection", "Result", "classify", "collect", "display_path"]


@dataclass(frozen=True)
class Result:
    """One recognised result file."""

    kind: str
    path: Path
    label: str
    data: Any


@dataclass
class Collection:
    """Recognised results (sorted by path) and skipped files with the reason."""

    results: list[Result] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def of(self, *kinds: str) -> list[Result]:
        return [r for r in self.results if r.kind in kinds]


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when below it (stable labels), else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.update(Path(os.path.abspath(f)) for f in p.rglob("*.json") if f.is_file())
        elif p.is_file():
            files.add(Path(os.path.abspath(p)))
        else:
            raise ConfigError(f"results input '{item}' does not exist (give JSON files or directories of them)")
    return sorted(files)


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PrunekitError(f"cannot read results file {display_path(path)}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrunekitError(f"results file {display_path(path)} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno}); regenerate it or leave it out") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _rows_with(rows: Any, keys: Iterable[str]) -> bool:
    """``rows`` is a non-empty list of objects that all have ``keys``."""
    keys = tuple(keys)
    return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and all(k in r for k in keys)
                                                         for r in rows)


def _missing(doc: dict, keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k not in doc]


_SWEEP_ROW = ("method", "ratio", "accuracy")
_DIRECTION_KEYS = ("path", "eigenvalues", "projection_fraction")
_COMPARE_KEYS = ("output_relative_l2", "agreement")


def classify(doc: Any) -> tuple[str | None, str]:
    """``(kind, "")`` for a recognised result, ``(None, reason)`` otherwise."""
    if isinstance(doc, list):
        if doc and all(isinstance(t, dict) and _rows_with(t.get("rows"), _SWEEP_ROW) for t in doc):
            return "sweep", ""
        return None, "a JSON list that is not a list of prune-result tables ({'rows': [{method, ratio, accuracy}]})"
    if not isinstance(doc, dict):
        return None, f"top-level JSON is a {type(doc).__name__}, not an object"
    fmt = doc.get("format")
    if fmt == "prunekit-model":
        if _is_number((doc.get("metadata") or {}).get("accuracy")):
            return "run", ""
        return None, "model checkpoint without metadata.accuracy"
    if fmt == "prunekit-state":
        return None, "training state (resume checkpoint), not a result"
    if isinstance(fmt, str):
        return None, f"a '{fmt[:40]}' file, not a result"
    kind = doc.get("kind")
    if kind in ("compare", "direction"):
        miss = _missing(doc, _COMPARE_KEYS if kind == "compare" else _DIRECTION_KEYS)
        return (kind, "") if not miss else (None, f"'{kind}' result without {miss}")
    rows = doc.get("rows")
    if _rows_with(rows, ("ratio", "prune", "merge")):
        return "nm-study", ""
    if "sgd_accuracy" in doc and _rows_with(rows, ("mu", "sparsity", "accuracy")):
        return "grda-study", ""
    if "accuracy_regularized" in doc and "accuracy_pruned" in doc:
        return "polarization-study", ""
    if _rows_with(rows, _SWEEP_ROW):
        return "sweep", ""
    if "method" in doc and _is_number(doc.get("accuracy")) and ("macs_reduction" in doc or "accuracy_before" in doc):
        return "prune", ""
    if _is_number(doc.get("accuracy")) and all(k in doc for k in ("dataset", "params", "macs")):
        return "run", ""  # train --json / eval --json
    if doc and all(isinstance(v, list) and v and all(_is_number(x) for x in v) for v in doc.values()):
        return "factors", ""
    keys = ", ".join(k if len(k) <= 24 else k[:23] + "…" for k in sorted(map(str, doc))[:6])
    keys += ", ..." if len(doc) > 6 else ""
    return None, f"no known result keys (has: {keys or 'nothing'})"


def _label(path: Path, doc: Any) -> str:
    """Model directories are named by their directory (``runs/x/model.json`` → ``runs/x``)."""
    if path.name == "model.json" and isinstance(doc, dict) and doc.get("format") == "prunekit-model":
        return display_path(path.parent)
    return display_path(path)


def collect(inputs: Sequence[str | os.PathLike]) -> Collection:
    """Load every ``*.json`` under ``inputs`` (files or directories, searched recursively) and classify it.

    Raises:
        ConfigError: an input does not exist, or none was given.
        PrunekitError: a file is not valid JSON (the message names it).
    """
    if not inputs:
        raise ConfigError("give at least one results file or directory")
    out = Collection()
    for path in _expand(inputs):
        doc = _load(path)
        kind, reason = classify(doc)
        if kind is None:
            out.skipped.append((display_path(path), reason))
        else:
            out.results.append(Result(kind, path, _label(path, doc), doc))
    return out
