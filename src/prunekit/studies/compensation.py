"""Compensation side by side: ``prunekit reproduce compensation-resnet20-fmnist`` (and ``compensation-vgg16-fmnist``).

ResNet-20 (option-A shortcuts) trained on Fashion-MNIST with the ``polarization-fmnist`` recipe (5 epochs,
seed 0; or ``--checkpoint`` a trained one), every block's conv1 pruned (preset ``resnet``, l1-norm,
floor(c(1−r))) at ratios 0.3 / 0.5 / 0.7, **no fine-tuning** for prunekit's methods, 1,000 unlabeled
training images for the data-light ones:

* ``prune`` — the criterion's survivors, nothing compensated;
* ``merge`` — Neuron Merging (MostSim+BN, data-free);
* ``lstsq`` / ``lstsq-greedy`` — one channel-mixing matrix per group fitted on the calibration images;
* ``reconstruct-plain`` — every consumer's whole weight refit to its original output (ridge chosen on held-out
  calibration images, intercept into the following BN), the criterion's survivors; at ratio 0.5 one option
  at a time on top: ``+greedy`` (survivors chosen against that objective), ``+residual`` (skip-branch drift
  in the targets); ``reconstruct`` = the method's defaults (those two, and every later layer refit:
  kept producers, classifier); ``reconstruct+bn`` then re-estimates the BatchNorm statistics;
* ``torch-pruning`` — Torch-Pruning's magnitude pruning (L2) of the same layers to the same widths, then 0,
  1, 2 and 3 epochs of fine-tuning at ratio 0.5, each a schedule of its own (``polarization-fmnist-finetune``:
  cosine over k epochs stepped per epoch, all 60,000 labelled images): how many epochs of training
  compensation saves; and ``reconstruct`` + 1 epoch the same way (compensation as a starting point). Skipped with a note when
  ``torch-pruning`` is not installed.

``compensation-vgg16-fmnist`` runs the same rows on the quarter-width VGG-16 of ``bench/nm_convnets.py``
(``--checkpoint runs/nm-fmnist/vgg16``, trained by ``bench/nm_train_convnets.py``) in general mode: every
prunable group at the ratio, Torch-Pruning on every conv/linear but the classifier.

Plus a calibration-size sweep of ``reconstruct`` at ratio 0.5 (accuracy and wall time).

Study options (``--set KEY=VALUE``): ``ratios``, ``methods``, ``calibration``, ``sweep`` (list of sizes, ``[]``
to skip), ``finetune`` (Torch-Pruning's epochs, 0 to skip), ``finetune_reconstruct`` (reconstruct's; 1, or 0
when ``finetune`` is 0), ``finetune_ratios``, ``test_size``, ``repeats`` (at the fine-tune ratios, ``reconstruct``
without fine-tuning on calibration seeds 0 … n−1 and Torch-Pruning + 1 epoch with fine-tuning seeds
``--seed`` … ``--seed`` + n − 1; the report's ``repeats`` gives mean and standard deviation: one fine-tuning run
varies by ±0.2 pt here).
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import dataset_info, get_dataset, make_loader
from prunekit.errors import ConfigError
from prunekit.io import load_model
from prunekit.methods import PruneOptions, get_method
from prunekit.metrics import count_macs, count_params, evaluate
from prunekit.models import create
from prunekit.recipes import get_recipe
from prunekit.reproduce import StudyOptions, register_study
from prunekit.train import seed_everything, train

from .common import check_options, figure, fmt, out_dir, stderr_log

TITLE = "compensation-resnet20-fmnist"
#: label -> (method, criterion, method options); the ``+`` rows switch on one reconstruct option at a time
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "prune": ("merge", "l1-norm", {"model_type": "prune"}),  # the preset's survivors, nothing compensated
    "merge": ("merge", "l1-norm", {}),
    "lstsq": ("lstsq", "l1-norm", {}),
    "lstsq-greedy": ("lstsq", "greedy", {}),
    "reconstruct-plain": ("reconstruct", "l1-norm", {"select": "criterion", "residual": False, "layers": "consumers"}),
    "+greedy": ("reconstruct", "l1-norm", {"select": "greedy", "residual": False, "layers": "consumers"}),
    "+residual": ("reconstruct", "l1-norm", {"select": "greedy", "residual": True, "layers": "consumers"}),
    "reconstruct": ("reconstruct", "l1-norm", {}),  # the defaults: greedy + residual + every drifted layer
    "reconstruct+bn": ("reconstruct", "l1-norm", {"bn_recalibrate": True}),
    # the same MACs spent across the blocks where the refit loses least (compensate.allocate)
    "reconstruct-global": ("reconstruct", "l1-norm", {"select": "global"}),
}
#: the ablation rows run at ratio 0.5 only
ABLATION = ("+greedy", "+residual", "reconstruct+bn")
@dataclass(frozen=True)
class Setup:
    """One model of the study: its title, preset (None: every prunable group at the ratio), and whether the
    baseline can be trained here (else ``--checkpoint`` is required)."""

    title: str
    model: str
    preset: str | None
    trainable: bool
    checkpoint_hint: str = ""


SETUPS = {
    TITLE: Setup(TITLE, "resnet20", "resnet", True),
    "compensation-vgg16-fmnist": Setup("compensation-vgg16-fmnist", "vgg16", None, False,
                                       "train it with `.venv/bin/python bench/nm_train_convnets.py --models vgg16` "
                                       "and pass --checkpoint runs/nm-fmnist/vgg16"),
}

SETTABLE = ("ratios", "methods", "calibration", "sweep", "finetune", "finetune_reconstruct", "finetune_ratios",
            "test_size", "repeats")


def _baseline(options: StudyOptions, out: Path, setup: Setup) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model: ``--checkpoint``, or (ResNet-20) trained, resumable and cached, under ``OUT/baseline``."""
    if options.checkpoint:
        model, _ = load_model(options.checkpoint)
        return model.eval(), {"checkpoint": str(options.checkpoint)}
    info = dataset_info("fashion-mnist")
    seed_everything(options.seed)
    model = create("resnet20", num_classes=info.num_classes, in_channels=info.input_shape[0],
                   input_size=info.input_shape[1])
    train_set = get_dataset("fashion-mnist", "train", root=options.data_root, download=False)
    test_set = get_dataset("fashion-mnist", "test", root=options.data_root, download=False)
    recipe = get_recipe("polarization-fmnist")
    if options.epochs:
        recipe = recipe.replace(epochs=options.epochs)
    res = train(model, train_set, test_set, recipe, out_dir=out / "baseline", seed=options.seed, resume=True,
                device=options.device, progress=options.progress)
    return res.model.eval(), {"checkpoint": str(out / "baseline"), "recipe": "polarization-fmnist",
                              "epochs": recipe.epochs}


def _torch_pruning(model: nn.Module, widths: dict[str, int] | float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's MetaPruner, L2 magnitude (a pruned copy): exactly the layers of ``widths`` to those
    widths, or, given a ratio, every conv/linear but the classifier at that ratio."""
    import copy

    import torch_pruning as tp

    m = copy.deepcopy(model)
    if not isinstance(widths, dict):
        layers = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=float(widths), ignored_layers=[layers[-1]])
        pruner.step()
        return m
    targets = {name: m.get_submodule(name) for name in widths}
    ignored = [mod for name, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))
               and name not in targets]
    ratios = {mod: 1.0 - widths[name] / mod.out_channels for name, mod in targets.items()}
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.0,
                                  pruning_ratio_dict=ratios, ignored_layers=ignored)
    pruner.step()
    return m


def _row(method: str, ratio: float, model: nn.Module, base: dict[str, int], accuracy: float, seconds: float,
         **extra: Any) -> dict[str, Any]:
    params, macs = count_params(model), count_macs(model, input_shape=(1, 28, 28))
    return {"method": method, "ratio": ratio, "removed": ratio, "params": params, "macs": macs,
            "params_reduction": round(1 - params / base["params"], 4),
            "macs_reduction": round(1 - macs / base["macs"], 4), "accuracy": round(accuracy, 2),
            "method_seconds": round(seconds, 2), **extra}


def _as_list(value: Any, default: list) -> list:
    if value is None:
        return list(default)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _study(setup: Setup, options: StudyOptions) -> tuple[dict[str, Any], str]:
    extra = dict(options.extra)
    check_options(extra, SETTABLE)
    ratios = [float(r) for r in _as_list(extra.get("ratios"), [0.3, 0.5, 0.7])]
    methods = [str(m) for m in _as_list(extra.get("methods"), list(METHODS) + ["torch-pruning"])]
    calibration = int(extra.get("calibration", 1000))
    sweep = [int(n) for n in _as_list(extra.get("sweep"), [64, 256, 1000, 4000])]
    finetune = int(extra.get("finetune", 3))
    finetune_ours = int(extra.get("finetune_reconstruct", min(finetune, 1)))  # none when Torch-Pruning gets none
    finetune_ratios = [float(r) for r in _as_list(extra.get("finetune_ratios"), [0.5])]
    repeats = int(extra.get("repeats", 1))
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    if not (options.checkpoint or setup.trainable):
        raise ConfigError(f"study '{setup.title}' needs --checkpoint (a trained {setup.model}): "
                          f"{setup.checkpoint_hint}")
    out = out_dir(options, setup.title)
    out.mkdir(parents=True, exist_ok=True)
    model, baseline = _baseline(options, out, setup)
    train_set = get_dataset("fashion-mnist", "train", root=options.data_root, augment=False, download=False)
    test_set = get_dataset("fashion-mnist", "test", root=options.data_root, download=False)
    if extra.get("test_size"):
        test_set = torch.utils.data.Subset(test_set, range(int(extra["test_size"])))
    loader = make_loader(test_set, 500, shuffle=False)
    example = torch.zeros(1, 1, 28, 28)
    base = {"params": count_params(model), "macs": count_macs(model, input_shape=(1, 28, 28))}
    base_acc = evaluate(model, loader)["accuracy"]
    stderr_log(f"baseline {base_acc:.2f} %")
    rows: list[dict[str, Any]] = []
    preset = {"preset": setup.preset} if setup.preset else {}

    def run(label: str, ratio: float, n_cal: int, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
        method, criterion, mo = METHODS[label]
        seeded = {"calibration_seed": seed} if seed else {}
        opts = PruneOptions(ratio=ratio, criterion=criterion, calibration_data=train_set,
                            method_options={**preset, "calibration": n_cal, **mo, **seeded})
        start = time.perf_counter()
        result = get_method(method)(model, example, opts)
        seconds = time.perf_counter() - start
        row = _row(label, ratio, result.model, base, evaluate(result.model, loader)["accuracy"], seconds,
                   calibration=n_cal if method in ("lstsq", "reconstruct") else 0, **({"seed": seed} if seed else {}))
        stderr_log(f"{label} r={ratio}: {row['accuracy']:.2f} % at −{100 * row['macs_reduction']:.1f} % MACs "
                   f"({seconds:.1f} s)")
        return result.model, row

    for ratio in ratios:
        for label in methods:
            if label != "torch-pruning" and (label not in ABLATION or ratio == 0.5):
                small, row = run(label, ratio, calibration)
                rows.append(row)
                if label == "reconstruct" and ratio in finetune_ratios:  # compensation as a starting point
                    rows += _finetune_rows(label, small, ratio, base, test_set, range(1, finetune_ours + 1),
                                           row["method_seconds"], options, out)
                    rows += [run(label, ratio, calibration, seed)[1] for seed in range(1, repeats)]
        if "torch-pruning" in methods:
            rows += _torch_pruning_rows(model, ratio, base, loader, test_set,
                                        finetune if ratio in finetune_ratios else 0, options, out, setup,
                                        repeats if ratio in finetune_ratios and finetune else 1)
    sweep_rows = []
    for n in sweep:
        _, row = run("reconstruct", 0.5, n)
        sweep_rows.append(row)
    report = {"study": setup.title, "model": setup.model, "dataset": "fashion-mnist", "baseline_accuracy": round(base_acc, 2),
              "baseline": {**baseline, **base}, "calibration": calibration, "rows": rows, "sweep": sweep_rows,
              "repeats": repeat_summary(rows),
              "finetune_recipe": "polarization-fmnist-finetune"}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plot = plot_study(report, out / f"{setup.title}.png")
    if plot is not None:
        report["plot"] = str(plot)
    return report, study_table(report)


for _title, _setup in SETUPS.items():
    register_study(_title)(lambda options, _setup=_setup: _study(_setup, options))


def _torch_pruning_rows(model, ratio, base, loader, test_set, finetune, options, out, setup, repeats=1) -> list[dict]:
    from prunekit.merging import get_preset

    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        stderr_log("torch-pruning is not installed (pip install torch-pruning): its rows are skipped")
        return []
    widths = get_preset(setup.preset).widths(model, ratio) if setup.preset else ratio
    start = time.perf_counter()
    small = _torch_pruning(model.eval(), widths, torch.zeros(1, 1, 28, 28))
    seconds = time.perf_counter() - start
    rows = [_row("torch-pruning", ratio, small, base, evaluate(small, loader)["accuracy"], seconds,
                 finetune_epochs=0)]
    rows += _finetune_rows("torch-pruning", small, ratio, base, test_set, range(1, finetune + 1), seconds, options,
                           out)
    for i in range(1, repeats):  # one epoch again with other fine-tuning seeds
        rows += _finetune_rows("torch-pruning", small, ratio, base, test_set, [1], seconds, options, out,
                               seed=options.seed + i)
    stderr_log(f"torch-pruning r={ratio} +0 ep: {rows[0]['accuracy']:.2f} %")
    return rows


def _finetune_rows(label, small, ratio, base, test_set, budgets, seconds, options, out, seed=None) -> list[dict]:
    """``small`` fine-tuned for k epochs, for each k in ``budgets``: each its own k-epoch schedule
    (``polarization-fmnist-finetune``, cosine stepped per epoch: lr · (1 + cos(π e / k)) / 2 in epoch e), all
    60,000 labelled images; cached (and resumed) in ``OUT/{label}-ft-r{ratio}-e{k}`` (``…-s{seed}`` for a
    ``seed`` other than ``--seed``)."""
    rows = []
    train_set = get_dataset("fashion-mnist", "train", root=options.data_root, download=False) if budgets else None
    other = seed is not None and seed != options.seed
    for epochs in budgets:
        recipe = get_recipe("polarization-fmnist-finetune").replace(epochs=epochs)
        res = train(copy.deepcopy(small), train_set, test_set, recipe, seed=seed if other else options.seed,
                    resume=True, out_dir=out / (f"{label}-ft-r{ratio}-e{epochs}" + (f"-s{seed}" if other else "")),
                    device=options.device, progress=options.progress)
        rows.append(_row(label, ratio, res.model, base, res.history[-1]["accuracy"], seconds, finetune_epochs=epochs,
                         **({"seed": seed} if other else {})))
        stderr_log(f"{label} r={ratio} +{epochs} ep: {rows[-1]['accuracy']:.2f} %")
    return rows


def row_label(row: dict[str, Any]) -> str:
    """A row's method, with its seed when it is one of ``repeats``."""
    return row["method"] + (f" (seed {row['seed']})" if "seed" in row else "")


def repeat_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of the rows that share (method, ratio, fine-tune epochs) — the seeds
    of ``repeats`` — where there are several."""
    runs: dict[tuple, list[float]] = {}
    for r in rows:
        runs.setdefault((r["method"], r["ratio"], r.get("finetune_epochs", 0)), []).append(r["accuracy"])
    return [{"method": m, "ratio": ratio, "finetune_epochs": ep, "n": len(v), "mean": round(statistics.mean(v), 3),
             "sd": round(statistics.stdev(v), 3), "accuracies": v}
            for (m, ratio, ep), v in runs.items() if len(v) > 1]


def study_table(report: dict[str, Any]) -> str:
    lines = [(f"{report['model']} / Fashion-MNIST, baseline {report['baseline_accuracy']:.2f} %, no fine-tuning unless "
             "stated; calibration: unlabeled training images"), "",
             "| method | ratio | MACs removed | params removed | accuracy | method s | fine-tune epochs |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {row_label(r)} | {r['ratio']} | {100 * r['macs_reduction']:.1f} % | "
                     f"{100 * r['params_reduction']:.1f} % | {fmt(r['accuracy'])} | {fmt(r['method_seconds'])} | "
                     f"{r.get('finetune_epochs', 0)} |")
    if report.get("sweep"):
        lines += ["", "Calibration sweep (reconstruct, ratio 0.5):", "",
                  "| calibration images | accuracy | method s |", "|---|---|---|"]
        lines += [f"| {r['calibration']} | {fmt(r['accuracy'])} | {fmt(r['method_seconds'])} |" for r in report["sweep"]]
    return "\n".join(lines)


def plot_study(report: dict[str, Any], path: Path) -> Path | None:
    """Accuracy vs MACs removed, one line per method (no fine-tuning), the fine-tuned rows (Torch-Pruning,
    reconstruct + k epochs) as points; the first seed of each (the others are in the report's ``repeats``)."""
    fig = figure(figsize=(6.5, 4.2))
    if fig is None:
        return None
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in report["rows"] if "seed" not in r]
    methods = dict.fromkeys(r["method"] for r in rows)
    for m in methods:
        pts = sorted((100 * r["macs_reduction"], r["accuracy"]) for r in rows
                     if r["method"] == m and not r.get("finetune_epochs"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    tuned = sorted({(r["method"], r["finetune_epochs"]) for r in rows if r.get("finetune_epochs")})
    for m, k in tuned:
        pts = sorted((100 * r["macs_reduction"], r["accuracy"]) for r in rows
                     if r["method"] == m and r.get("finetune_epochs") == k)
        ax.plot(*zip(*pts), linestyle="none", marker="x" if m == "torch-pruning" else "+", markersize=8,
                label=f"{m} + {k} ep. fine-tune")
    ax.axhline(report["baseline_accuracy"], color="gray", linewidth=0.8, label="baseline")
    ax.set_xlabel("MACs removed (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['model']} / Fashion-MNIST: compensation without fine-tuning")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
