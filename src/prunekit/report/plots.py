"""PNG figures of the report (matplotlib, object API only: no pyplot state, no GUI backend).

Every function takes the numbers from :mod:`prunekit.report.extract`, writes one PNG to ``path`` and
returns it. Output is byte-stable for the same input (no timestamps or version strings in the PNG).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import PrunekitError
from .collect import Result
from .extract import FactorPanel, Point, Series, method_order

__all__ = ["accuracy_vs_size", "compensation", "eigen_spectrum", "factor_histograms", "grda", "loss_path",
           "require_matplotlib"]

_MARKERS = "osD^v<>Ph*X"


def require_matplotlib() -> None:
    """Raise a clear error when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PrunekitError("the report's plots need matplotlib: pip install 'prunekit[plot]' "
                            "(or pass --no-plots for tables only)") from None


def _figure(panels: int, *, width: float = 4.6, height: float = 3.4, cols: int = 3):
    from matplotlib.figure import Figure

    cols = min(cols, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def accuracy_vs_size(points: Sequence[Point], path: Path) -> Path:
    """Two panels: test accuracy (%) vs parameters and vs MACs (log x), one marker per group."""
    fig, (ax_p, ax_m) = _figure(2, width=5.4, height=4.0, cols=2)
    groups = sorted({p.group for p in points})
    for i, group in enumerate(groups):
        for ax, attr in ((ax_p, "params"), (ax_m, "macs")):
            pts = [p for p in points if p.group == group and getattr(p, attr)]
            if pts:
                ax.scatter([getattr(p, attr) for p in pts], [p.accuracy for p in pts], label=group,
                           marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", alpha=0.8)
    for ax, name in ((ax_p, "parameters"), (ax_m, "MACs")):
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=8, loc="best")
    return _save(fig, path)


def compensation(series: Sequence[Series], path: Path) -> Path:
    """One panel per series: accuracy vs pruning ratio, a line per method (prune / merge / lstsq ...)."""
    fig, axes = _figure(len(series))
    for ax, s in zip(axes, series):
        for i, method in enumerate(method_order(s.by_method)):
            accs = s.by_method[method]
            xs = sorted(accs)
            style = ":" if method.startswith("paper") else "-"
            ax.plot(xs, [accs[x] for x in xs], style, marker=_MARKERS[i % len(_MARKERS)], label=method,
                    color=f"C{i % 10}")
        if s.baseline is not None:
            ax.axhline(s.baseline, color="gray", lw=0.8, ls="--", label="unpruned")
        ax.set_title(s.title, fontsize=8)
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def factor_histograms(panels: Sequence[FactorPanel], path: Path) -> Path:
    """One panel per run: |γ| histogram, log count."""
    fig, axes = _figure(len(panels), height=3.0)
    for ax, p in zip(axes, panels):
        floor = 0.5  # log axis: empty bins sit on the floor instead of at log(0)
        ax.stairs([c or floor for c in p.counts], p.edges, baseline=floor, fill=True, color="#3572b0")
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_title(p.title, fontsize=8)
        ax.set_xlabel("|γ|")
        ax.set_ylabel("channels (log)")
    return _save(fig, path)


def grda(rows: Sequence[dict[str, Any]], sgd_accuracy: float | None, title: str, path: Path) -> Path:
    """Sparsity vs μ (a line per c) and accuracy vs sparsity (gRDA, magnitude pruning, SGD line)."""
    fig, (ax_s, ax_a) = _figure(2, width=5.0, height=3.8, cols=2)
    cs = sorted({row.get("c") for row in rows}, key=lambda c: (c is None, c or 0.0))
    for i, c in enumerate(cs):
        sel = sorted((row for row in rows if row.get("c") == c), key=lambda row: row["mu"])
        label = f"gRDA c={c:g}" if c is not None else "gRDA"
        ax_s.plot([row["mu"] for row in sel], [row["sparsity_pct"] for row in sel], "-o", label=label,
                  color=f"C{i}")
        ax_a.scatter([row["sparsity_pct"] for row in sel], [row["accuracy"] for row in sel], label=label,
                     color=f"C{i}", marker="o")
    for key, label, marker in (("mp_accuracy", "magnitude pruning", "x"), ("mp_ft_accuracy", "MP + fine-tune", "+")):
        sel = [row for row in rows if row.get(key) is not None]
        if sel:
            ax_a.scatter([row["sparsity_pct"] for row in sel], [row[key] for row in sel], label=label,
                         marker=marker, color="k" if marker == "x" else "gray")
    if sgd_accuracy is not None:
        ax_a.axhline(sgd_accuracy, color="C3", ls="--", lw=1, label=f"SGD {sgd_accuracy:.2f}")
    ax_s.set(xlabel="μ", ylabel="sparsity (% weights = 0)")
    ax_a.set(xlabel="sparsity (% weights = 0)", ylabel="test accuracy (%)")
    for ax in (ax_s, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def loss_path(results: Sequence[Result], path: Path) -> Path:
    """Per direction result: training loss (left) and test accuracy (right axis) along the path α ∈ [0, 1]."""
    fig, axes = _figure(len(results), width=5.0, cols=2)
    for ax, r in zip(axes, results):
        acc_ax = ax.twinx()
        for key, style in (("path", "-"), ("bezier", "--")):
            curve = r.data.get(key)
            if not curve:
                continue
            name = "line" if key == "path" else "Bézier"
            ax.plot(curve["alpha"], curve["train_loss"], style, color="C0", label=f"train loss ({name})")
            if curve.get("test_accuracy"):
                acc_ax.plot(curve["alpha"], curve["test_accuracy"], style, color="C1", label=f"test acc ({name})")
        ends = [Path(str(r.data[k])).name for k in ("sgd", "grda") if r.data.get(k)]
        a, b = ends if len(ends) == 2 else ("A", "B")
        ax.set(xlabel=f"α (0 = {a}, 1 = {b})", ylabel="training loss")
        acc_ax.set_ylabel("test accuracy (%)")
        ax.set_title(r.label, fontsize=8)
        handles = ax.get_legend_handles_labels()
        more = acc_ax.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="lower center")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def eigen_spectrum(results: Sequence[Result], path: Path) -> Path:
    """Eigenvalues (descending, symlog) of every direction result; ‖·‖ ratios when present."""
    ratios = [r for r in results if r.data.get("norm_ratio")]
    fig, axes = _figure(1 + bool(ratios), width=5.0, cols=2)
    for i, r in enumerate(results):
        ev = sorted(r.data["eigenvalues"], reverse=True)
        axes[0].plot(range(1, len(ev) + 1), ev, "-o", ms=3, label=r.label, color=f"C{i % 10}")
    if all(v > 0 for r in results for v in r.data["eigenvalues"]):
        axes[0].set_yscale("log")
    else:
        axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].set(xlabel="index", ylabel="Hessian eigenvalue", title="eigen-spectrum")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    if ratios:
        for i, r in enumerate(ratios):
            for j, (name, values) in enumerate(sorted(r.data["norm_ratio"].items())):
                axes[1].plot(range(1, len(values) + 1), values, "-", color=f"C{(i + j) % 10}",
                             label=f"{name} ({r.label})" if len(ratios) > 1 else name)
        axes[1].set(xlabel="epoch", ylabel="norm ratio", title="norm ratio per epoch")
        axes[1].legend(fontsize=7)
        axes[1].grid(alpha=0.3)
    return _save(fig, path)
