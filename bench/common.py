"""Shared helpers for benchmark scripts: machine facts, medians, and BENCHMARKS.md sections.

Each script owns one section of BENCHMARKS.md (delimited by HTML comments with its id) and rewrites
it on every run, so the file always holds the latest result next to the exact command that made it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    """One line: CPU model, cores, torch version, accelerator."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    accel = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}, {accel}")


def command_line() -> str:
    """The command that is running, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *map(shlex.quote, sys.argv[1:])])


def median(values) -> float:
    return float(statistics.median(values))


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(section_id: str, title: str, body: str) -> None:
    """Replace (or append) the section ``section_id`` of BENCHMARKS.md with ``body``."""
    start, end = f"<!-- bench:{section_id} -->", f"<!-- /bench:{section_id} -->"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"{start}\n## {title}\n\nCommand: `{command_line()}`  \nMachine: {machine()}  \n"
             f"Date: {stamp}\n\n{body.strip()}\n{end}")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nEvery number here comes from the command printed above it.\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)
