"""What the paper studies share: ``--set`` option checks, the output folder, logging, headless figures."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError
from prunekit.reproduce import StudyOptions

__all__ = ["check_options", "figure", "fmt", "out_dir", "stderr_log"]


def check_options(extra: dict[str, Any], settable: Iterable[str]) -> None:
    """Refuse ``--set`` keys a study does not take, naming them and the ones it does."""
    settable = tuple(settable)
    bad = sorted(set(extra) - set(settable))
    if bad:
        raise ConfigError(f"unknown study option(s) {bad}; --set takes {', '.join(settable)}")


def out_dir(options: StudyOptions, title: str) -> Path:
    """``--out``, or ``runs/<study>`` by default."""
    return Path(options.out or Path("runs") / title)


def stderr_log(msg: str) -> None:
    """Progress lines go to stderr, so that ``--json`` keeps stdout to the one JSON object."""
    print(msg, file=sys.stderr, flush=True)


def fmt(v: Any) -> str:
    """A table cell: ``—`` for None, 2 decimals for floats."""
    if v is None:
        return "—"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def figure(*, figsize: tuple[float, float]):
    """A matplotlib Figure that needs no backend and no pyplot state (draws headless, never switches the
    user's backend); None when matplotlib (the ``plot`` extra) is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=figsize)
