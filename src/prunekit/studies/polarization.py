"""Polarization (Zhuang et al., NeurIPS 2020) studies: baseline → polarized training → prune at the valley →
fine-tune, one command.

``prunekit reproduce polarization-resnet20-fmnist [--epochs N] [--finetune-epochs M] [--out DIR] [--json]``
runs the CPU-sized Fashion-MNIST study; the paper-sized GPU studies (``polarization-resnet56-cifar10``
...; the rows of the paper's Tables 1-2 with its recipes from :mod:`prunekit.polarization.recipes`) run
the same :func:`run_study`. Every step is public library API (:mod:`prunekit.polarization.pipeline`).

Stages, each a Trainer run in its own directory under ``--out`` (default ``runs/<study>``), resumed
when it exists (a finished stage is reused, a killed one continues; a stage trained with another
recipe or seed is refused, so use a fresh ``--out`` after changing ``--epochs``):

1. ``baseline``: the unregularized model (skipped with ``--checkpoint``).
2. ``polarization``: from scratch with BN γ = ``bn_init`` and λ·R(γ), clamp [0, 1]; the
   :class:`~prunekit.polarization.FlopsMonitor` logs the MACs reduction the threshold would give
   after every epoch.
3. prune at the per-layer histogram valley (``threshold``), physically through the engine; then
   ``polarization-ft``: fine-tune with the fine-tune recipe.
4. (``slimming_lam``) ``slimming``: network slimming λ‖γ‖₁ from scratch, pruned by its global
   percentile at the **same MACs reduction**, then ``slimming-ft``.
5. (``compare_l1``) ``l1-ft``: l1-norm pruning of the baseline (uniform ratio per group) at the same
   MACs reduction, fine-tuned equally.

Study options through ``--set KEY=VALUE``: ``lam``, ``t``, ``slimming_lam``, ``threshold``,
``combine``, ``preset``, ``bn_init``, ``compare_l1``, ``batch_size``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit import ChannelGraph, apply, make_plan
from prunekit.io import load_model, save_model
from prunekit.polarization import (
    FlopsMonitor,
    PipelineRun,
    PipelineSpec,
    PolarizationOptions,
    add_gates,
    make_regularizer,
    param_groups_for,
    polarization_plan,
    prune_polarized,
    ratio_for_macs,
)
from prunekit.report.histogram import magnitude_histogram
from prunekit.reproduce import StudyOptions, register_study

from .common import check_options, figure, out_dir

__all__ = ["FMNIST", "PAPER_STUDIES", "StudySpec", "paper_studies", "plot_histograms", "run_study"]


@dataclass(frozen=True)
class StudySpec(PipelineSpec):
    """A :class:`~prunekit.polarization.PipelineSpec` plus what a study compares and reports.

    Attributes:
        compare_l1: also prune the baseline by l1-norm at the same MACs reduction and fine-tune it.
        paper: the published numbers, copied into the report.
    """

    compare_l1: bool = False
    paper: dict = field(default_factory=dict)


_SETTABLE = ("lam", "t", "slimming_lam", "threshold", "combine", "preset", "bn_init", "compare_l1", "batch_size")


def _apply_extra(spec: StudySpec, extra: dict[str, Any]) -> StudySpec:
    check_options(extra, _SETTABLE)
    return dataclasses.replace(spec, **extra)


def plot_histograms(factors: dict[str, list[float]], path: Path, title: str = "") -> Path | None:
    """One histogram panel (100 bins on [0, 1], log count) per run; None when matplotlib is missing."""
    import numpy as np

    names = list(factors)
    fig = figure(figsize=(4.2 * len(names), 3.2))
    if fig is None:
        return None
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        v = np.asarray(factors[name], dtype=float)
        hi = max(1.0, float(np.nanmax(np.abs(v))) if len(v) else 1.0)
        ax.hist(np.abs(v), bins=100, range=(0, hi), color="#3572b0")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("|γ|")
    axes[0][0].set_ylabel("channels (log)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_study(spec: StudySpec, options: StudyOptions, *, title: str) -> tuple[dict[str, Any], str]:
    """Run (or resume) every stage of ``spec``; returns the JSON report and a markdown table."""
    spec = _apply_extra(spec, dict(options.extra))
    run = PipelineRun(spec, out=out_dir(options, title), data_root=options.data_root, device=options.device,
                      seed=options.seed, progress=options.progress, name=title)
    epochs, ft_epochs = options.epochs, options.finetune_epochs
    popt = spec.options()
    sparse_recipe = run.recipe(spec.sparse_recipe, epochs)
    ft_recipe = run.recipe(spec.finetune_recipe, ft_epochs)
    report: dict[str, Any] = {"study": title, "model": spec.model, "dataset": spec.dataset, "device": run.device,
                              "seed": run.seed, "epochs": sparse_recipe.epochs, "finetune_epochs": ft_recipe.epochs,
                              "lam": spec.lam, "t": spec.t, "preset": spec.preset, "threshold": str(spec.threshold),
                              "combine": spec.combine, "out": str(run.out)}

    # 1. baseline
    if options.checkpoint:
        baseline, _ = load_model(options.checkpoint)
        baseline = baseline.to(run.device).eval()
        report["baseline_checkpoint"] = str(options.checkpoint)
    else:
        baseline = run.fit("baseline", run.fresh_model(), run.recipe(spec.baseline_recipe, epochs)).model
    report["accuracy_baseline"] = run.evaluate(baseline)
    base_size = run.sizes(baseline)

    # 2. polarized training
    model = run.fresh_model()
    if spec.gates:
        add_gates(model)
    reg = make_regularizer("polarization", spec, model, run.example)
    res = run.fit("polarization", model, sparse_recipe, regularizers=[reg],
                  callbacks=[FlopsMonitor(popt, run.example, verbose=options.progress)],
                  param_groups=param_groups_for(spec, model, sparse_recipe.weight_decay))
    polarized = res.model
    report["accuracy_regularized"] = run.evaluate(polarized)
    report["macs_reduction_per_epoch"] = [round(r.get("macs_reduction", float("nan")), 4) for r in res.history]
    factors = {"baseline (no regularizer)": reg.factors.gather(baseline.cpu()).detach().abs().tolist()
               if not spec.gates and not options.checkpoint else None,
               f"polarization (λ={spec.lam:g}, t={spec.t:g})": reg.values(polarized.cpu()).tolist()}

    # 3. prune at the valley, fine-tune
    pruned, details = prune_polarized(polarized, run.example, popt)
    size = run.sizes(pruned)
    ref_size = run.sizes(polarized)
    report["accuracy_pruned"] = run.evaluate(pruned)
    if popt.compensate:  # what the official code's plain removal gives (no β fold)
        report["accuracy_pruned_uncompensated"] = run.evaluate(prune_polarized(polarized, run.example, popt,
                                                                                compensate=False)[0])
    report["macs_reduction"] = round(1 - size["macs"] / ref_size["macs"], 4)
    report["params_reduction"] = round(1 - size["params"] / ref_size["params"], 4)
    report.update({"macs_baseline": base_size["macs"], "params_baseline": base_size["params"],
                   "macs": size["macs"], "params": size["params"]})
    report["prune"] = {k: details[k] for k in ("channels_removed", "channels_prunable", "fallback_groups",
                                               "min_keep_groups", "thresholds", "compensation")}
    save_model(run.out / "polarization-pruned", pruned, metadata={"study": title, "accuracy": report["accuracy_pruned"]})
    ft = run.fit("polarization-ft", pruned, ft_recipe)
    report["accuracy_finetuned"] = ft.accuracy
    target = report["macs_reduction"]

    # 4. network slimming at the same MACs reduction
    if spec.slimming_lam is not None:
        ns_model = run.fresh_model()
        ns_reg = make_regularizer("slimming", spec, ns_model, run.example)
        ns = run.fit("slimming", ns_model, sparse_recipe, regularizers=[ns_reg]).model.cpu().eval()
        factors[f"network slimming (λ={spec.slimming_lam:g})"] = ns_reg.values(ns).tolist()
        graph = ChannelGraph.build(ns, run.example)

        def ns_at(r: float) -> nn.Module:
            plan, _ = polarization_plan(ns, graph, PolarizationOptions(threshold="percent", ratio=r,
                                                                       combine=spec.combine))
            return apply(ns, graph, plan, verify=False)

        ratio, _, red = ratio_for_macs(ns_at, ns, run.example, target)
        ns_pruned, _ = prune_polarized(ns, run.example, PolarizationOptions(threshold="percent", ratio=ratio,
                                                                            combine=spec.combine),
                                       compensate=popt.compensate)
        valley_plan, _ = polarization_plan(ns, graph, popt)
        valley_red = 1 - run.sizes(apply(ns, graph, valley_plan))["macs"] / run.sizes(ns)["macs"]
        row = {"accuracy_regularized": run.evaluate(ns), "accuracy_pruned": run.evaluate(ns_pruned),
               "macs_reduction": round(red, 4), "channel_ratio": round(ratio, 4),
               "valley_macs_reduction": round(valley_red, 4), **run.sizes(ns_pruned)}
        row["accuracy_finetuned"] = run.fit("slimming-ft", ns_pruned, ft_recipe).accuracy
        report["slimming"] = {"lam": spec.slimming_lam, **row}

    # 5. l1-norm pruning of the baseline at the same MACs reduction
    if spec.compare_l1:
        base = baseline.cpu().eval()
        graph = ChannelGraph.build(base, run.example)

        def l1_at(r: float) -> nn.Module:
            return apply(base, graph, make_plan(base, graph, ratio=r, criterion="l1-norm"), verify=False)

        ratio, l1_pruned, red = ratio_for_macs(l1_at, base, run.example, target)
        row = {"accuracy_pruned": run.evaluate(l1_pruned), "macs_reduction": round(red, 4),
               "channel_ratio": round(ratio, 4), **run.sizes(l1_pruned)}
        row["accuracy_finetuned"] = run.fit("l1-ft", l1_pruned, ft_recipe).accuracy
        report["l1"] = row

    # histogram of the factors
    factors = {k: v for k, v in factors.items() if v is not None}
    (run.out / "factors.json").write_text(json.dumps(factors))
    png = plot_histograms(factors, run.out / "histogram.png", f"{title}: scaling factors after training")
    report["histogram"] = str(png) if png else None
    # compact γ histograms for `prunekit report`
    report["factor_histogram"] = {name: magnitude_histogram(v) for name, v in factors.items()}
    report["seconds"] = run.seconds
    if spec.paper:
        report["paper"] = spec.paper
    return report, _table(report)


def _table(r: dict[str, Any]) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f} %"

    def acc(v):
        return "—" if v is None else f"{v:.2f}"

    head = (f"{r['study']}: {r['model']} on {r['dataset']} ({r['epochs']} epochs, fine-tune "
            f"{r['finetune_epochs']}; λ={r['lam']:g}, t={r['t']:g}, threshold {r['threshold']})")
    pol = (f"| polarization | {pct(r['macs_reduction'])} | {acc(r['accuracy_regularized'])} | "
           f"{acc(r['accuracy_pruned'])} | {acc(r['accuracy_finetuned'])} |")
    lines = [head, "", "| method | MACs ↓ | regularized | pruned (no FT) | fine-tuned |", "|---|---|---|---|---|",
             f"| baseline | 0 | {acc(r['accuracy_baseline'])} | — | — |", pol]
    if "slimming" in r:
        s = r["slimming"]
        lines.append(f"| network slimming | {pct(s['macs_reduction'])} | {acc(s['accuracy_regularized'])} | "
                     f"{acc(s['accuracy_pruned'])} | {acc(s['accuracy_finetuned'])} |")
    if "l1" in r:
        s = r["l1"]
        lines.append(f"| l1-norm (baseline) | {pct(s['macs_reduction'])} | — | {acc(s['accuracy_pruned'])} | "
                     f"{acc(s['accuracy_finetuned'])} |")
    return "\n".join(lines)


# λ, t for 5 CPU epochs (the paper's 5e-5 assumes 200 epochs of pushes): λ = 5e-4 reached ~40 % MACs
# reduction at the valley with t = 1.0 or 1.1 (docs/polarization.md), so the study uses λ = 1e-3, t = 1.2.
FMNIST = StudySpec(model="resnet20", dataset="fashion-mnist", lam=1e-3, t=1.2, baseline_recipe="polarization-fmnist",
                   sparse_recipe="polarization-fmnist", finetune_recipe="polarization-fmnist-finetune",
                   preset="engine", bn_init=0.5, slimming_lam=5e-4, compare_l1=True)


@register_study("polarization-resnet20-fmnist")
def resnet20_fmnist(options: StudyOptions) -> tuple[dict[str, Any], str]:
    """CPU study: ResNet-20 (option A) on Fashion-MNIST, polarization vs slimming vs l1-norm."""
    return run_study(FMNIST, options, title="polarization-resnet20-fmnist")


# ----------------------------------------------------------------------------------------------
# GPU studies: the paper's Tables 1-2 rows, same pipeline as the Fashion-MNIST study


def paper_studies() -> dict[str, StudySpec]:
    """``{study name: spec}`` of the paper-sized studies (recipes from :mod:`prunekit.polarization.recipes`)."""
    cifar = {"baseline_recipe": "cifar", "sparse_recipe": "polarization-cifar", "bn_init": 0.5}
    resnet56 = StudySpec(model="resnet56", dataset="cifar10", lam=5e-5, t=1.4, preset="resnet-cifar",
                         finetune_recipe="polarization-cifar-finetune-resnet",
                         paper={"accuracy": 93.83, "macs_reduction": 0.47, "baseline": 93.80}, **cifar)
    vgg16 = StudySpec(model="vgg16", dataset="cifar10", lam=3e-5, t=1.5, preset="vgg16",
                      finetune_recipe="polarization-cifar-finetune-vgg",
                      paper={"accuracy": 93.92, "macs_reduction": 0.54, "baseline": 93.88}, **cifar)

    def on_cifar100(spec: StudySpec, accuracy: float, macs_reduction: float, baseline: float) -> StudySpec:
        return dataclasses.replace(spec, dataset="cifar100", paper={
            "accuracy": accuracy, "macs_reduction": macs_reduction, "baseline": baseline,
            "note": "CIFAR-100 (λ, t) are not documented; the CIFAR-10 values are used"})

    return {
        "polarization-resnet56-cifar10": resnet56,
        "polarization-resnet56-cifar100": on_cifar100(resnet56, 72.46, 0.25, 72.49),
        "polarization-vgg16-cifar10": vgg16,
        "polarization-vgg16-cifar100": on_cifar100(vgg16, 74.25, 0.43, 73.83),
        "polarization-resnet50-imagenet": StudySpec(
            model="resnet50", dataset="imagenet", lam=8e-5, t=1.2, preset="resnet50", bn_init=0.5,
            baseline_recipe="imagenet", sparse_recipe="polarization-imagenet-resnet50",
            finetune_recipe="polarization-imagenet-resnet50-finetune",
            paper={"accuracy": 75.63, "macs_reduction": 0.54, "baseline": 76.15}),
        "polarization-mobilenetv2-imagenet": StudySpec(
            model="mobilenetv2", dataset="imagenet", lam=2.5e-5, t=1.0, preset="mobilenetv2-gates", bn_init=1.0,
            gates=True, bn_weight_decay=False, baseline_recipe="imagenet",
            sparse_recipe="polarization-imagenet-mobilenetv2",
            finetune_recipe="polarization-imagenet-mobilenetv2-finetune",
            paper={"accuracy": 71.8, "macs_reduction": 0.28, "baseline": 72.0}),
    }


PAPER_STUDIES = ("polarization-resnet56-cifar10", "polarization-resnet56-cifar100", "polarization-vgg16-cifar10",
                 "polarization-vgg16-cifar100", "polarization-resnet50-imagenet", "polarization-mobilenetv2-imagenet")


def _make_study(name: str):
    def study(options: StudyOptions):
        return run_study(paper_studies()[name], options, title=name)

    study.__name__ = name.replace("-", "_")
    study.__doc__ = f"Polarization paper study '{name}' (GPU-sized; --epochs/--finetune-epochs shorten it)."
    return study


for _study in PAPER_STUDIES:
    register_study(_study)(_make_study(_study))
