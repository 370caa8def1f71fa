"""Pull the numbers each report section needs out of classified results (shared by tables and plots)."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .collect import Collection, Result
from .histogram import magnitude_histogram

__all__ = ["FactorPanel", "Point", "Series", "compensation_series", "factor_panels", "grda_rows",
           "method_order", "path_barrier", "preservation_rows", "size_points"]


@dataclass(frozen=True)
class Point:
    """One model in the accuracy-vs-size plots: ``group`` picks the marker, ``label`` names it."""

    group: str
    label: str
    accuracy: float
    params: int | None
    macs: int | None


@dataclass
class Series:
    """Accuracy (%) per ratio and method for one (source, model, criterion): the merge/prune/lstsq comparison."""

    title: str
    baseline: float | None = None
    by_method: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))

    @property
    def ratios(self) -> list[float]:
        return sorted({r for accs in self.by_method.values() for r in accs})


@dataclass(frozen=True)
class FactorPanel:
    """A histogram of |γ| for one run: ``edges`` (bins + 1) and ``counts`` (bins)."""

    title: str
    edges: list[float]
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fraction_below(self, x: float) -> float:
        """Fraction of factors in bins that lie entirely below ``x``."""
        n = sum(c for c, hi in zip(self.counts, self.edges[1:]) if hi <= x + 1e-12)
        return n / self.total if self.total else 0.0


# ----------------------------------------------------------------------------- sizes


def _run_point(r: Result) -> Point:
    d = r.data
    meta = d.get("metadata") if d.get("format") == "prunekit-model" else d
    group = "pruned checkpoints" if meta.get("pruned_from") or d.get("prune_record") else "trained runs"
    return Point(group, r.label, float(meta["accuracy"]), meta.get("params"), meta.get("macs"))


def _polarization_points(r: Result) -> list[Point]:
    d, name = r.data, r.data.get("study", r.label)
    pts = [Point("polarization study", f"{name}: baseline", d["accuracy_baseline"], d.get("params_baseline"),
                 d.get("macs_baseline"))] if "accuracy_baseline" in d else []
    final = d.get("accuracy_finetuned", d["accuracy_pruned"])
    pts.append(Point("polarization study", f"{name}: polarization", final, d.get("params"), d.get("macs")))
    for key, title in (("slimming", "network slimming"), ("l1", "l1-norm")):
        row = d.get(key)
        if isinstance(row, dict) and "accuracy_pruned" in row:
            acc = row.get("accuracy_finetuned", row["accuracy_pruned"])
            pts.append(Point("polarization study", f"{name}: {title}", acc, row.get("params"), row.get("macs")))
    return pts


def size_points(col: Collection) -> list[Point]:
    """Every model with an accuracy and a size: runs, pruned models (and their unpruned inputs), study models."""
    points: list[Point] = [_run_point(r) for r in col.of("run")]
    for r in col.of("prune"):
        d = r.data
        if "accuracy_before" in d:
            points.append(Point("before pruning", r.label, float(d["accuracy_before"]), d.get("params_before"),
                                d.get("macs_before")))
        points.append(Point(f"pruned: {d['method']}", r.label, float(d["accuracy"]), d.get("params"), d.get("macs")))
    for r in col.of("polarization-study"):
        points.extend(_polarization_points(r))
    return [p for p in points if p.params is not None or p.macs is not None]


# ----------------------------------------------------------------------------- merge vs prune vs lstsq

#: nm-study row keys → method names in the comparison
_NM_COLUMNS = {"prune": "prune", "merge": "merge", "lstsq": "lstsq", "lstsq_greedy": "lstsq-greedy",
               "paper_prune": "paper prune", "paper_merge": "paper merge"}


_NO_CRITERION = (None, "", "-", "—")


def _baseline_accuracy(table: dict) -> float | None:
    """The unpruned accuracy of a table: ``baseline`` when it is a number, else ``baseline_accuracy``."""
    for key in ("baseline", "baseline_accuracy"):
        v = table.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _method_label(row: dict) -> str:
    """The row's method, with ``+k ep`` when it was fine-tuned for k epochs."""
    k = row.get("finetune_epochs")
    return f"{row['method']} +{k} ep" if k else str(row["method"])


def compensation_series(col: Collection) -> list[Series]:
    """One series per (source, model, criterion) from the Neuron Merging studies, sweeps and prune results."""
    out: dict[str, Series] = {}

    def series(title: str, baseline: float | None = None) -> Series:
        s = out.setdefault(title, Series(title))
        s.baseline = s.baseline if baseline is None else baseline
        return s

    for r in col.of("nm-study"):
        d = r.data
        for row in d["rows"]:
            s = series(f"{d.get('study', r.label)} ({row.get('criterion', '?')})", d.get("baseline"))
            for key, method in _NM_COLUMNS.items():
                if row.get(key) is not None and row.get("ratio") is not None:
                    s.by_method[method][float(row["ratio"])] = float(row[key])
    for r in col.of("sweep"):
        tables = r.data if isinstance(r.data, list) else [r.data]
        for t in tables:
            baseline = _baseline_accuracy(t)
            any_criterion = []  # rows without a criterion (data-driven survivors) belong to every criterion
            for row in t["rows"]:
                if "seed" in row:  # another seed of a study's ``repeats`` (its ``repeats`` summary has them all)
                    continue
                model = row.get("model") or t.get("model") or t.get("study") or "model"
                if row.get("criterion") in _NO_CRITERION:
                    any_criterion.append((f"{r.label}: {model} (", row))
                    continue
                s = series(f"{r.label}: {model} ({row['criterion']})", baseline)
                s.by_method[_method_label(row)][float(row["ratio"])] = float(row["accuracy"])
            for prefix, row in any_criterion:
                targets = [s for title, s in out.items() if title.startswith(prefix)] or \
                    [series(prefix + "any criterion)", baseline)]
                for s in targets:
                    s.by_method[_method_label(row)][float(row["ratio"])] = float(row["accuracy"])
    for r in col.of("prune"):  # `prune --json` files of one base model (same dataset and size) share a series
        d = r.data
        if d.get("ratio") is None:
            continue
        base = f"{d.get('params_before', '?'):,}" if isinstance(d.get("params_before"), int) else "?"
        s = series(f"prune --json: {d.get('dataset', '?')}, {base} params ({d.get('criterion', '?')})",
                   d.get("accuracy_before"))
        s.by_method[str(d["method"])][float(d["ratio"])] = float(d["accuracy"])
    return [out[k] for k in sorted(out)]


#: column order of the comparison: the paper's methods, then the data-driven ones, then published numbers
_METHOD_ORDER = ("prune", "merge", "lstsq", "lstsq-greedy")


def method_order(methods) -> list[str]:
    """``prune, merge, lstsq, lstsq-greedy``, other methods by name, ``paper ...`` columns last."""
    def key(m: str):
        paper = m.startswith("paper ")
        base = m.removeprefix("paper ")
        return (paper, _METHOD_ORDER.index(base) if base in _METHOD_ORDER else len(_METHOD_ORDER), base)

    return sorted(methods, key=key)


# ----------------------------------------------------------------------------- polarization γ


def _raw_factors(r: Result) -> dict[str, list[float]]:
    """A study without ``factor_histogram``: its ``OUT/factors.json`` when it is still there."""
    out = r.data.get("out")
    if not out:
        return {}
    for base in (Path.cwd(), r.path.parent):
        f = base / out / "factors.json"
        if f.is_file():
            try:
                doc = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                return {}
            return {k: v for k, v in doc.items() if isinstance(v, list)}
    return {}


def factor_panels(col: Collection) -> list[FactorPanel]:
    """|γ| histograms from Polarization studies and ``factors.json`` files; identical panels appear once."""
    panels: list[FactorPanel] = []
    seen: set[tuple] = set()

    def add(title: str, hist: dict[str, Any]) -> None:
        key = (title.rsplit(": ", 1)[-1], tuple(hist["counts"]))
        if key not in seen:
            seen.add(key)
            panels.append(FactorPanel(title, list(hist["edges"]), list(hist["counts"])))

    for r in col.of("polarization-study") + col.of("factors"):  # the studies' names first
        if r.kind == "factors":
            source, hists = r.label, {k: magnitude_histogram(v) for k, v in r.data.items()}
        else:
            source = r.data.get("study", r.label)
            hists = r.data.get("factor_histogram") or {k: magnitude_histogram(v) for k, v in _raw_factors(r).items()}
        for name in hists:
            add(f"{source}: {name}", hists[name])
    return panels


# ----------------------------------------------------------------------------- gRDA, preservation


def grda_rows(r: Result) -> list[dict[str, Any]]:
    """The gRDA study's rows sorted by (c, μ), with ``sparsity_pct`` (percent of weights that are exactly 0).

    ``prunekit reproduce grda-*`` writes ``sparsity`` in percent (the study schema), so it is taken as is.
    """
    rows = sorted(r.data["rows"], key=lambda row: (row.get("c") or 0.0, row["mu"]))
    return [{**row, "sparsity_pct": float(row["sparsity"])} for row in rows]


def path_barrier(curve: dict[str, Any] | None) -> float | None:
    """max_α L(α) − max(L(0), L(1)) of a path's training loss (≤ 0: no barrier); None without a path."""
    loss = (curve or {}).get("train_loss") or []
    return max(loss) - max(loss[0], loss[-1]) if loss else None


_PRESERVATION = ("samples", "output_relative_l2", "ware", "agreement", "kl")


def preservation_rows(col: Collection) -> list[dict[str, Any]]:
    """``{"source", samples, output_relative_l2, ware, agreement, kl, layers, accuracy_a, accuracy_b}`` per
    pruned model with a ``preservation`` record and per ``compare`` result."""
    rows = []
    for r in col.of("prune", "compare"):
        d = r.data
        rec = d if r.kind == "compare" else d.get("preservation")
        if not isinstance(rec, dict):
            continue
        row = {"source": r.label, **{k: rec.get(k) for k in _PRESERVATION}, "layers": rec.get("layers") or []}
        if r.kind == "compare":
            row.update(accuracy_a=d.get("accuracy_a"), accuracy_b=d.get("accuracy_b"),
                       source=f"{r.label} ({d.get('a', 'A')} vs {d.get('b', 'B')})")
        else:
            row.update(accuracy_a=d.get("accuracy_before"), accuracy_b=d.get("accuracy"))
        rows.append(row)
    return rows
