"""Write the results page: ``OUT.md`` with tables, and its PNG plots in ``OUT/`` (linked relatively).

Only sections with data appear. Output depends only on the inputs (sorted) and the date on the one
"generated" line, so regenerating from the same files gives the same page.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from . import extract, plots
from .collect import Collection, Result, collect

__all__ = ["PLOT_PATTERNS", "ReportSummary", "render", "write_report"]

#: the PNG names the report writes; stale ones from an earlier run are removed
PLOT_PATTERNS = ("accuracy-vs-size.png", "compensation.png", "gamma-histograms.png", "grda-*.png",
                 "loss-path.png", "eigen-spectrum.png")


@dataclass
class ReportSummary:
    out: Path
    sections: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    results: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    markdown: str = ""


# ----------------------------------------------------------------------------- formatting


def _cell(v: Any, spec: str = "") -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return str(v)
    if spec == "%":  # a fraction shown in percent
        return f"{100 * v:.1f} %"
    if spec:
        return format(v, spec)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _reduction(after: Any, before: Any) -> str:
    """``"125,810 (−52.8 %)"`` when both sizes are known."""
    if not isinstance(after, int):
        return _cell(after)
    if isinstance(before, int) and before:
        return f"{after:,} (−{100 * (1 - after / before):.1f} %)"
    return f"{after:,}"


# ----------------------------------------------------------------------------- sections


class _Page:
    """Accumulates markdown lines and writes plots (when enabled) into ``plot_dir``."""

    def __init__(self, out: Path, draw: bool):
        self.lines: list[str] = []
        self.out, self.draw = out, draw
        self.plot_dir = out.parent / out.stem
        self.summary = ReportSummary(out)

    def section(self, title: str) -> None:
        self.summary.sections.append(title)
        self.lines += [f"## {title}", ""]

    def plot(self, name: str, fn: Callable[..., Path], *args: Any, alt: str) -> None:
        if not self.draw:
            return
        path = fn(*args, self.plot_dir / name)
        self.summary.plots.append(path)
        self.lines += [f"![{alt}]({self.out.stem}/{name})", ""]


def _recipe_name(meta: dict) -> Any:
    recipe = meta.get("recipe")
    return recipe.get("name") if isinstance(recipe, dict) else recipe


def _result_table(page: _Page, title: str, header: list[str], results: list[Result],
                  row: Callable[[Result], list[str]]) -> None:
    """A section with one table row per result file (none when there is no result)."""
    if results:
        page.section(title)
        page.lines += _table(header, [row(r) for r in results])


def _run_row(r: Result) -> list[str]:
    d = r.data
    meta = d["metadata"] if d.get("format") == "prunekit-model" else d
    model = (d.get("arch") or {}).get("name") if d.get("format") == "prunekit-model" else d.get("model")
    recipe = _recipe_name(meta)
    if meta.get("pruned_from"):
        recipe = f"pruned: {meta.get('method', '?')} {_cell(meta.get('ratio'))} of {meta['pruned_from']}"
    elif meta.get("stage"):
        recipe = f"{_cell(recipe)} (stage {meta['stage']})"
    return [f"`{r.label}`", _cell(model), _cell(meta.get("dataset")), _cell(recipe), _cell(meta.get("epochs")),
            _cell(float(meta["accuracy"])), _cell(meta.get("params")), _cell(meta.get("macs"))]


def _prune_row(r: Result) -> list[str]:
    d = r.data
    return [f"`{r.label}`", _cell(d["method"]), _cell(d.get("criterion")), _cell(d.get("ratio")),
            _cell(d.get("dataset")), f"{_cell(d.get('accuracy_before'))} → {_cell(d['accuracy'])}",
            _cell(d.get("accuracy_finetuned")), _reduction(d.get("params"), d.get("params_before")),
            _reduction(d.get("macs"), d.get("macs_before")),
            f"{_cell(d.get('latency_ms_before'), '.3f')} → {_cell(d.get('latency_ms'), '.3f')}"]


def _sizes(page: _Page, points: list[extract.Point]) -> None:
    if not points or not page.draw:
        return
    page.section("Accuracy vs size")
    page.lines += [(f"{len(points)} models: trained runs, pruned models (and the models they were pruned from), "
                   "and the final models of the Polarization studies (fine-tuned when they were)."), ""]
    page.plot("accuracy-vs-size.png", plots.accuracy_vs_size, points, alt="test accuracy vs parameters and vs MACs")


def _compensation(page: _Page, series: list[extract.Series]) -> None:
    if not series:
        return
    page.section("Merge vs prune vs lstsq")
    page.lines += [("Test accuracy (%) without fine-tuning at each pruning ratio (fraction of each layer's "
                   "channels removed): plain pruning, Neuron Merging (data-free compensation) and least-squares "
                   "compensation on unlabeled training inputs."), ""]
    for s in series:
        methods = extract.method_order(s.by_method)
        rows = [[_cell(ratio), *(_cell(s.by_method[m].get(ratio)) for m in methods)] for ratio in s.ratios]
        base = f" — unpruned {_cell(s.baseline)} %" if s.baseline is not None else ""
        page.lines += [f"**{s.title}**{base}", ""] + _table(["ratio", *methods], rows)
    page.plot("compensation.png", plots.compensation, series, alt="accuracy vs pruning ratio per method")


def _polarization(page: _Page, studies: list[Result], panels: list[extract.FactorPanel]) -> None:
    if not studies and not panels:
        return
    page.section("Polarization: scaling factors")
    for r in studies:
        d = r.data
        page.lines += [(f"**{d.get('study', r.label)}** (`{r.label}`): {d.get('model', '?')} on {d.get('dataset', '?')}, "
                       f"{d.get('epochs', '?')} epochs + {d.get('finetune_epochs', '?')} fine-tune, λ={d.get('lam')}, "
                       f"t={d.get('t')}, threshold {d.get('threshold', '?')}"), ""]
        rows = [["baseline", "0", _cell(d.get("params_baseline")), _cell(d.get("accuracy_baseline")), "—", "—"],
                ["polarization", _cell(d.get("macs_reduction"), "%"), _reduction(d.get("params"), d.get("params_baseline")),
                 _cell(d.get("accuracy_regularized")), _cell(d.get("accuracy_pruned")),
                 _cell(d.get("accuracy_finetuned"))]]
        for key, name in (("slimming", "network slimming"), ("l1", "l1-norm (of the baseline)")):
            s = d.get(key)
            if isinstance(s, dict):
                rows.append([name, _cell(s.get("macs_reduction"), "%"),
                             _reduction(s.get("params"), d.get("params_baseline")),
                             _cell(s.get("accuracy_regularized")), _cell(s.get("accuracy_pruned")),
                             _cell(s.get("accuracy_finetuned"))])
        page.lines += _table(["method", "MACs ↓", "params", "regularized (%)", "pruned, no FT (%)",
                              "fine-tuned (%)"], rows)
    if panels:
        rows = [[p.title, _cell(p.total), _cell(p.fraction_below(0.05), "%"), _cell(p.edges[-1], ".3g")] for p in panels]
        page.lines += [("Histograms of the scaling factors \\|γ\\| (100 bins): the factors near zero are the "
                       "channels the threshold removes."), ""]
        page.lines += _table(["run", "factors", "\\|γ\\| < 0.05", "max bin edge"], rows)
        page.plot("gamma-histograms.png", plots.factor_histograms, panels, alt="histograms of |γ| per run")


def _grda(page: _Page, studies: list[Result]) -> None:
    if not studies:
        return
    page.section("gRDA: sparsity vs μ")
    for i, r in enumerate(studies, 1):
        d = r.data
        rows = extract.grda_rows(r)
        page.lines += [(f"**{d.get('study', r.label)}** (`{r.label}`): {d.get('epochs', '?')} epochs, recipe "
                       f"{_cell(_recipe_name(d))}; SGD accuracy {_cell(d.get('sgd_accuracy'))} %."), ""]
        page.lines += _table(["μ", "c", "accuracy (%)", "sparsity", "magnitude pruning (%)", "MP + fine-tune (%)"],
                             [[_cell(row["mu"], "g"), _cell(row.get("c"), "g"), _cell(row["accuracy"]),
                               f"{row['sparsity_pct']:.1f} %", _cell(row.get("mp_accuracy")),
                               _cell(row.get("mp_ft_accuracy"))] for row in rows])
        page.plot(f"grda-{i}.png", plots.grda, rows, d.get("sgd_accuracy"), d.get("study", r.label),
                  alt="sparsity vs mu and accuracy vs sparsity")


def _direction(page: _Page, results: list[Result]) -> None:
    if not results:
        return
    page.section("Directional analysis")
    rows = []
    for r in results:
        d = r.data
        ev = d.get("eigenvalues") or []
        rows.append([f"`{r.label}`", _cell(d.get("distance"), ".4g"), _cell(d.get("projection_fraction"), ".4f"),
                     _cell(d.get("random_projection_fraction"), ".4f"), _cell(extract.path_barrier(d.get("path")), ".4f"),
                     _cell(extract.path_barrier(d.get("bezier")), ".4f"), _cell(len(ev)),
                     _cell(max(ev), ".4g") if ev else "—"])
    page.lines += [("Projection fraction: share of the direction between the models that lies in the span of the "
                   "top Hessian eigenvectors, against the same for a random direction. Loss barrier: highest "
                   "training loss along the path minus the higher of its two ends (≤ 0: none)."), ""]
    page.lines += _table(["result", "distance", "projection fraction", "random direction", "loss barrier (line)",
                          "loss barrier (Bézier)", "eigenvalues", "largest"], rows)
    page.plot("loss-path.png", plots.loss_path, results, alt="training loss along the path between the models")
    page.plot("eigen-spectrum.png", plots.eigen_spectrum, results, alt="Hessian eigen-spectrum")


def _preservation(page: _Page, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    page.section("Output preservation")
    page.lines += [("How closely the second model reproduces the first one's outputs on the same inputs: relative L2 "
                   "of the logits, WARE, top-1 agreement and KL divergence."), ""]
    page.lines += _table(["comparison", "samples", "accuracy (%) A → B", "output rel. L2", "WARE", "agreement",
                          "KL"], [[f"`{r['source']}`", _cell(r["samples"]),
                                   f"{_cell(r['accuracy_a'])} → {_cell(r['accuracy_b'])}",
                                   _cell(r["output_relative_l2"], ".4g"), _cell(r["ware"], ".4g"),
                                   _cell(r["agreement"], ".4g"), _cell(r["kl"], ".4g")] for r in rows])
    layers = [[f"`{r['source']}`", _cell(layer.get("name")), _cell(layer.get("relative_l2"), ".4g")]
              for r in rows for layer in r["layers"] if isinstance(layer, dict)]
    if layers:
        page.lines += ["Per layer (relative L2 of the layer's output):", ""]
        page.lines += _table(["comparison", "layer", "relative L2"], layers)


def _skipped(page: _Page, skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    page.section("Skipped inputs")
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(f"`{path}`")
    page.lines += [f"- skipped: unrecognised ({reason}): {', '.join(paths)}" for reason, paths in by_reason.items()]
    page.lines.append("")


# ----------------------------------------------------------------------------- page


def render(col: Collection, out: Path, *, command: str, draw: bool = True, today: _dt.date | None = None
           ) -> ReportSummary:
    """Build the page for ``col``; writes the PNGs (when ``draw``) and returns the markdown in the summary."""
    if draw:
        plots.require_matplotlib()
    page = _Page(out, draw)
    today = today or _dt.date.today()
    page.lines += ["# Results", "",
                   (f"Collected by `prunekit report` from {len(col.results)} result files"
                   f"{f' ({len(col.skipped)} skipped)' if col.skipped else ''}. Regenerate with:"), "",
                   "```sh", command, "```", "",
                   f"Generated {today.isoformat()} with prunekit {__version__}.", ""]
    _result_table(page, "Runs", ["run", "model", "dataset", "recipe", "epochs", "accuracy (%)", "params", "MACs"],
                  col.of("run"), _run_row)
    _sizes(page, extract.size_points(col))
    _result_table(page, "Pruned models", ["file", "method", "criterion", "ratio", "dataset",
                                          "accuracy (%) before → after", "fine-tuned (%)", "params", "MACs",
                                          "latency ms before → after"], col.of("prune"), _prune_row)
    _compensation(page, extract.compensation_series(col))
    _polarization(page, col.of("polarization-study"), extract.factor_panels(col))
    _grda(page, col.of("grda-study"))
    _direction(page, col.of("direction"))
    _preservation(page, extract.preservation_rows(col))
    _skipped(page, col.skipped)
    page.summary.results, page.summary.skipped = len(col.results), list(col.skipped)
    page.summary.markdown = "\n".join(page.lines).rstrip() + "\n"
    return page.summary


def _remove_stale_plots(plot_dir: Path, keep: list[Path]) -> None:
    if not plot_dir.is_dir():
        return
    keep_names = {p.name for p in keep}
    for pattern in PLOT_PATTERNS:
        for f in plot_dir.glob(pattern):
            if f.name not in keep_names:
                f.unlink()


def write_report(inputs: Sequence[str], out: str | Path, *, command: str, draw: bool = True) -> ReportSummary:
    """Collect ``inputs`` (files or directories of ``*.json``) and write ``out`` (markdown) + ``out``'s PNGs."""
    out = Path(out)
    col = collect(inputs)
    summary = render(col, out, command=command, draw=draw)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summary.markdown, encoding="utf-8")
    _remove_stale_plots(out.parent / out.stem, summary.plots)
    return summary
