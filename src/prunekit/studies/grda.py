"""gRDA (Chao et al., NeurIPS 2020) studies for ``prunekit reproduce grda-*``: sparsity/accuracy curves
against plain SGD and magnitude pruning.

* ``grda-lenet300-fmnist`` (CPU, recipe ``grda-lenet``, 30 epochs) and ``grda-resnet20-fmnist`` (CPU-sized,
  recipe ``grda-resnet20-fmnist`` on the first 6,000 training images; recipes in :mod:`prunekit.recipes`):
  a grid of gRDA runs over μ × c, each from the same initial weights as the plain-SGD baseline (the
  recipe with ``optimizer=sgd``: same lr, schedule, batch and epochs, no momentum, no weight decay).
* Magnitude pruning (MP): the SGD model pruned globally (all parameters, smallest |w|) to each gRDA
  run's sparsity, evaluated as is (``mp_accuracy``) and after a masked plain-SGD fine-tune of
  ``finetune_epochs`` at constant ``finetune_lr`` (``mp_ft_accuracy``).
* ``grda-resnet50-imagenet``, ``grda-vgg16-cifar10``, ``grda-wrn28-10-cifar100``: the paper's runs
  (``docs/grda.md``, "Recipes") for GPU users: SGD baseline + gRDA at the recipe's (c, μ), MP without
  fine-tune. They check the dataset before anything is built (no download attempt).

Sparsity is the fraction of exactly-zero values over *all* parameters (biases and BN included, as the
reference counts), in percent in the report. Every run trains in its own directory under ``--out``
(default ``runs/<study>``, resumed when killed); finished runs are summarised in ``OUT/results.json``
and reused on the next invocation (keys name the run, epochs, seed and subset).

Study options (``--set KEY=VALUE``): ``mus``, ``cs`` (lists; the grid is their product), ``pairs``
(extra ``[[c, mu], ...]``), ``subset`` / ``test_subset`` (first N images), ``finetune_epochs``,
``finetune_lr``, ``sgd`` (false: no baseline, no MP), ``mp`` (false: no MP), ``plot`` (false: no
``OUT/sparsity_accuracy.png``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data import ArrayDataset, dataset_info, get_dataset, make_loader
from prunekit.errors import ConfigError
from prunekit.io import load_model
from prunekit.metrics import evaluate, sparsity
from prunekit.models import create
from prunekit.optim.grda import SparsityLogger
from prunekit.recipes import TrainRecipe, get_recipe
from prunekit.regularizers import Regularizer
from prunekit.reproduce import StudyOptions, register_study
from prunekit.train import seed_everything, train

from .common import check_options, figure, out_dir, stderr_log

__all__ = ["LENET", "PAPER", "RESNET20", "GrdaRuns", "GrdaStudySpec", "KeepMask", "cached_training_minutes",
           "global_magnitude_prune", "head", "plot_study", "run_study", "study_table"]


@dataclass(frozen=True)
class GrdaStudySpec:
    """What a gRDA study trains: model, data, recipe, the (c, μ) grid and the comparisons."""

    model: str
    dataset: str
    recipe: str
    mus: tuple[float, ...] = ()
    cs: tuple[float, ...] = ()
    pairs: tuple[tuple[float, float], ...] = ()
    subset: int | None = None
    test_subset: int | None = None
    finetune_epochs: int = 3
    finetune_lr: float = 0.02
    sgd: bool = True
    mp: bool = True
    plot: bool = True
    model_config: dict = field(default_factory=dict)
    paper: dict = field(default_factory=dict)

    def settings(self) -> list[tuple[float, float]]:
        """The (c, μ) runs in report order (by μ, then c), defaulting to the recipe's own (c, μ)."""
        kw = get_recipe(self.recipe).optimizer_kwargs
        mus, cs = self.mus or (kw["mu"],), self.cs or (kw["c"],)
        grid = {(float(c), float(mu)) for mu in mus for c in cs} | {(float(c), float(mu)) for c, mu in self.pairs}
        return sorted(grid, key=lambda cm: (cm[1], cm[0]))


_SETTABLE = ("mus", "cs", "pairs", "subset", "test_subset", "finetune_epochs", "finetune_lr", "sgd", "mp", "plot")


def _apply_extra(spec: GrdaStudySpec, extra: dict[str, Any]) -> GrdaStudySpec:
    check_options(extra, _SETTABLE)
    over: dict[str, Any] = {}
    for key, value in extra.items():
        if key in ("mus", "cs"):
            items = value if isinstance(value, (list, tuple)) else [value]
            if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                raise ConfigError(f"--set {key}= must be a number or a list of numbers, got {value!r}")
            over[key] = tuple(float(v) for v in items)
        elif key == "pairs":
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
                raise ConfigError(f"--set pairs= must be a list of [c, mu] pairs, got {value!r}")
            over[key] = tuple((float(c), float(mu)) for c, mu in value)
        elif key in ("subset", "test_subset", "finetune_epochs"):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"--set {key}= must be a non-negative integer, got {value!r}")
            over[key] = value if key == "finetune_epochs" else (value or None)
        elif key in ("sgd", "mp", "plot"):
            if not isinstance(value, bool):
                raise ConfigError(f"--set {key}= must be true or false, got {value!r}")
            over[key] = value
        else:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"--set {key}= must be a positive number, got {value!r}")
            over[key] = float(value)
    return dataclasses.replace(spec, **over)


# ----------------------------------------------------------------------------------------------
# Magnitude pruning (the comparison)


class KeepMask(Regularizer):
    """Re-apply fixed 0/1 masks after every optimizer step, so pruned weights stay zero during fine-tuning."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    def after_step(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.masks:
                p.mul_(self.masks[name].to(p.device))


def global_magnitude_prune(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Zero the ``round(fraction · N)`` parameters with the smallest |w| over all N parameters, in place.

    Every parameter counts (biases, BN γ/β), like gRDA's sparsity. Values tied with the cut are pruned
    too. Returns ``{name: mask}`` (1 = kept), for :class:`KeepMask`.
    """
    if not 0 <= fraction <= 1:
        raise ConfigError(f"magnitude pruning fraction must be in [0, 1], got {fraction!r}")
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().abs().flatten() for p in params.values()])
    k = round(fraction * flat.numel())
    if k == 0:
        return {n: torch.ones_like(p) for n, p in params.items()}
    cut = flat.kthvalue(k).values
    masks = {}
    with torch.no_grad():
        for name, p in params.items():
            masks[name] = (p.abs() > cut).to(p.dtype)
            p.mul_(masks[name])
    return masks


# ----------------------------------------------------------------------------------------------
# Data and runs


def head(dataset, n: int | None):
    """The first ``n`` samples of an in-memory dataset (the whole dataset when ``n`` is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    if not isinstance(dataset, ArrayDataset):
        raise ConfigError(f"subset needs an in-memory dataset, got {type(dataset).__name__}")
    return ArrayDataset(dataset.images[:n], dataset.labels[:n], mean=dataset.mean, std=dataset.std,
                        normalize=dataset.normalize, augment=dataset.augment, seed=dataset.seed,
                        num_classes=dataset.num_classes, name=dataset.name, split=dataset.split,
                        classes=dataset.classes, info=dataset.info)


def _slug(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in key)


def _round(v: float, digits: int = 2) -> float:
    return round(float(v), digits)


class GrdaRuns:
    """Trains, caches and reuses the runs of one study directory.

    ``OUT/results.json`` maps a run key (``"sgd|epochs=30|seed=0"``, ``"grda c=0.005 mu=0.55|epochs=30|seed=0"``,
    ``"mp s=0.914632 ft=3x0.02|epochs=30|seed=0"``; ``|subset=N`` appended when set) to its summary;
    each training run lives in ``OUT/<slugified key>/`` (Trainer checkpoints, resumable).
    """

    def __init__(self, spec: GrdaStudySpec, out: str | Path, *, data_root: str | None = None,
                 device: str | None = None, progress: bool = False, log=print):
        self.spec, self.out = spec, Path(out)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress, self.log = progress, log
        info = dataset_info(spec.dataset)
        self.model_config = {"num_classes": info.num_classes, "in_channels": info.input_shape[0],
                             "input_size": info.input_shape[1], **spec.model_config}
        # download=False: a missing dataset fails here, with the places searched and how to get it
        self.train_set = head(get_dataset(spec.dataset, "train", root=data_root, download=False), spec.subset)
        self.test_set = head(get_dataset(spec.dataset, "test", root=data_root, download=False), spec.test_subset)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache_path = self.out / "results.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}

    def key(self, label: str, epochs: int, seed: int) -> str:
        key = f"{label}|epochs={epochs}|seed={seed}"
        if self.spec.subset:
            key += f"|subset={self.spec.subset}"
        if self.spec.test_subset:
            key += f"|test_subset={self.spec.test_subset}"
        return key

    def _save(self, key: str, summary: dict[str, Any]) -> dict[str, Any]:
        if self.cache_path.exists():  # keep what another process sharing OUT saved meanwhile
            self.cache = {**json.loads(self.cache_path.read_text()), **self.cache}
        self.cache[key] = summary
        tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.cache, indent=1))
        tmp.replace(self.cache_path)
        return summary

    def fresh_model(self, seed: int) -> nn.Module:
        seed_everything(seed)  # the same initial weights for SGD and every gRDA run of this seed
        return create(self.spec.model, **self.model_config)

    def train(self, label: str, recipe: TrainRecipe, seed: int) -> dict[str, Any]:
        """Train (or reuse) one run from the seed's initial weights; returns its summary."""
        key = self.key(label, recipe.epochs, seed)
        if key in self.cache:
            return self.cache[key]
        start = time.perf_counter()
        res = train(self.fresh_model(seed), self.train_set, self.test_set, recipe, out_dir=self.out / _slug(key),
                    seed=seed, resume=True, device=self.device, progress=self.progress,
                    callbacks=[SparsityLogger(per_layer=False, verbose=self.progress)],
                    metadata={"dataset": self.spec.dataset, "run": key})
        final = res.history[-1]
        summary = {"accuracy": final["accuracy"], "sparsity": final["sparsity"],
                   "weight_sparsity": final["weight_sparsity"],
                   "layers": {t.name: t.fraction for t in sparsity(res.model, kinds=None, modules=None).tensors},
                   "curve": [[h["epoch"] + 1, h["accuracy"], h["sparsity"]] for h in res.history],
                   "minutes": (time.perf_counter() - start) / 60}
        self.log(f"{key}: {summary['accuracy']:.2f} % test, {100 * summary['sparsity']:.2f} % sparse "
                 f"({summary['minutes']:.1f} min)")
        return self._save(key, summary)

    def sgd(self, recipe: TrainRecipe, seed: int) -> dict[str, Any]:
        return self.train("sgd", recipe.replace(optimizer="sgd", optimizer_kwargs={}), seed)

    def grda(self, recipe: TrainRecipe, c: float, mu: float, seed: int) -> dict[str, Any]:
        return self.train(f"grda c={c} mu={mu}", recipe.replace(optimizer_kwargs={"c": c, "mu": mu}), seed)

    def sgd_model(self, recipe: TrainRecipe, seed: int) -> nn.Module:
        self.sgd(recipe, seed)
        model, _ = load_model(self.out / _slug(self.key("sgd", recipe.epochs, seed)) / "model.safetensors")
        return model

    def magnitude(self, recipe: TrainRecipe, seed: int, fraction: float) -> dict[str, Any]:
        """The SGD model of ``seed`` pruned to ``fraction``: accuracy as is and after the masked fine-tune."""
        ft, lr = self.spec.finetune_epochs, self.spec.finetune_lr
        key = self.key(f"mp s={fraction:.6f} ft={ft}x{lr:g}", recipe.epochs, seed)
        if key in self.cache:
            return self.cache[key]
        model = self.sgd_model(recipe, seed)
        masks = global_magnitude_prune(model, fraction)
        loader = make_loader(self.test_set, recipe.test_batch_size, shuffle=False)
        summary = {"sparsity": fraction, "accuracy": evaluate(model, loader, device=self.device)["accuracy"],
                   "finetuned": None}
        if ft:
            ft_recipe = TrainRecipe(epochs=ft, batch_size=recipe.batch_size, test_batch_size=recipe.test_batch_size,
                                    optimizer="sgd", lr=lr, schedule="constant", name="mp-finetune")
            seed_everything(seed)
            summary["finetuned"] = train(model, self.train_set, self.test_set, ft_recipe, seed=seed,
                                         device=self.device, progress=self.progress,
                                         regularizers=[KeepMask(masks)]).accuracy
        self.log(f"{key}: pruned {summary['accuracy']:.2f} %, fine-tuned {summary['finetuned']}")
        return self._save(key, summary)


def cached_training_minutes(out: str | Path) -> float:
    """Total training time recorded in ``OUT/results.json`` (SGD and gRDA runs; MP fine-tunes are not timed)."""
    path = Path(out) / "results.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    return sum(v.get("minutes", 0.0) for v in cache.values())


# ----------------------------------------------------------------------------------------------
# The study


def run_study(spec: GrdaStudySpec, options: StudyOptions, *, title: str) -> tuple[dict[str, Any], str]:
    """SGD baseline, the gRDA grid and the MP comparison on ``options.seed``; returns (report, markdown)."""
    if options.checkpoint:
        raise ConfigError("gRDA studies train from scratch (SGD and gRDA from the same initial weights); "
                          "--checkpoint is not used")
    spec = _apply_extra(spec, dict(options.extra))
    if options.finetune_epochs is not None:
        spec = dataclasses.replace(spec, finetune_epochs=options.finetune_epochs)
    recipe = get_recipe(spec.recipe)
    if options.epochs is not None:
        recipe = recipe.replace(epochs=options.epochs)
    out = out_dir(options, title)
    runs = GrdaRuns(spec, out, data_root=options.data_root, device=options.device, progress=options.progress,
                    log=stderr_log if options.progress else (lambda _msg: None))
    seed = options.seed
    start = time.perf_counter()
    sgd = runs.sgd(recipe, seed) if spec.sgd else None
    rows = []
    for c, mu in spec.settings():
        g = runs.grda(recipe, c, mu, seed)
        row = {"mu": mu, "c": c, "accuracy": g["accuracy"], "sparsity": _round(100 * g["sparsity"], 4),
               "weight_sparsity": _round(100 * g["weight_sparsity"], 4),
               "layer_sparsity": {k: _round(100 * v, 3) for k, v in g["layers"].items()},
               "curve": g["curve"], "mp_accuracy": None, "mp_ft_accuracy": None}
        if sgd is not None:
            row["gap_to_sgd"] = _round(g["accuracy"] - sgd["accuracy"], 4)
            if spec.mp:
                m = runs.magnitude(recipe, seed, g["sparsity"])
                row["mp_accuracy"], row["mp_ft_accuracy"] = m["accuracy"], m["finetuned"]
        rows.append(row)
    eligible = [r for r in rows if r["sparsity"] >= 90]
    best = max(eligible, key=lambda r: r["accuracy"]) if eligible else None
    report: dict[str, Any] = {
        "study": title, "model": spec.model, "dataset": spec.dataset, "recipe": recipe.name,
        "epochs": recipe.epochs, "lr": recipe.lr, "schedule": recipe.schedule, "batch_size": recipe.batch_size,
        "seed": seed, "subset": spec.subset, "test_subset": spec.test_subset, "device": runs.device,
        "train_images": len(runs.train_set), "test_images": len(runs.test_set),
        "sgd_accuracy": sgd["accuracy"] if sgd else None,
        "finetune_epochs": spec.finetune_epochs if spec.mp and sgd else None,
        "finetune_lr": spec.finetune_lr if spec.mp and sgd else None,
        "params": sum(p.numel() for p in runs.fresh_model(seed).parameters()),
        "rows": rows,
        "best_at_90": {"mu": best["mu"], "c": best["c"], "accuracy": best["accuracy"],
                       "sparsity": best["sparsity"]} if best else None,
        "out": str(out), "minutes": round((time.perf_counter() - start) / 60, 2)}
    if spec.paper:
        report["paper"] = spec.paper
    png = plot_study(report, out / "sparsity_accuracy.png") if spec.plot else None
    report["plot"] = str(png) if png else None
    return report, study_table(report)


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.2f}"


def study_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (μ, c) with sparsity, accuracy, gap to SGD, MP and MP + fine-tune."""
    sgd = report["sgd_accuracy"]
    ft = report.get("finetune_epochs")
    lines = [(f"{report['study']}: {report['model']} on {report['dataset']} ({report['train_images']:,} training "
              f"images), recipe `{report['recipe']}` ({report['epochs']} epochs, lr {report['lr']:g}, "
              f"{report['schedule']}), seed {report['seed']}; plain SGD (same recipe): {_fmt(sgd)} %"), "",
             f"| μ | c | sparsity % | gRDA acc % | vs SGD | MP acc % | MP + FT{f' ({ft} ep)' if ft else ''} acc % |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        gap = "—" if sgd is None else f"{r['accuracy'] - sgd:+.2f}"
        lines.append(f"| {r['mu']:g} | {r['c']:g} | {r['sparsity']:.2f} | {r['accuracy']:.2f} | {gap} | "
                     f"{_fmt(r['mp_accuracy'])} | {_fmt(r['mp_ft_accuracy'])} |")
    if report.get("paper"):
        lines += ["", "Paper: " + ", ".join(f"{k} {v}" for k, v in report["paper"].items())]
    return "\n".join(lines)


def plot_study(report: dict[str, Any], path: Path, *, sgd_sd: float | None = None) -> Path | None:
    """Left: accuracy vs sparsity (gRDA per μ/c, SGD line, MP and MP + FT); right: sparsity per epoch.

    ``sgd_sd`` draws a ±band around the SGD accuracy (several seeds). None when matplotlib is missing.
    Drawn on a backend-free Figure: works headless and leaves the user's pyplot backend alone.
    """
    fig = figure(figsize=(12, 6.2))
    if fig is None:
        return None
    import matplotlib

    rows, sgd = report["rows"], report["sgd_accuracy"]
    ax, ax2 = fig.subplots(1, 2)
    if sgd is not None:
        label = f"plain SGD {sgd:.2f}" + (f" ± {sgd_sd:.2f}" if sgd_sd else "")
        if sgd_sd:
            ax.axhspan(sgd - sgd_sd, sgd + sgd_sd, color="0.85")
        ax.axhline(sgd, color="0.4", lw=1, label=label)
    mp = sorted((r["sparsity"], r["mp_accuracy"], r["mp_ft_accuracy"]) for r in rows if r["mp_accuracy"] is not None)
    if mp:
        ax.plot([s for s, _, _ in mp], [a for _, a, _ in mp], "x--", color="tab:red", label="SGD + global MP")
        if mp[0][2] is not None:
            ax.plot([s for s, _, _ in mp], [f for _, _, f in mp], "s-", color="tab:orange", ms=4,
                    label=f"SGD + global MP + {report['finetune_epochs']}-epoch fine-tune")
    mus = sorted({r["mu"] for r in rows})
    cs = sorted({r["c"] for r in rows})
    cmap = matplotlib.colormaps["viridis"]
    for r in rows:
        color = cmap(mus.index(r["mu"]) / max(1, len(mus) - 1))
        marker = "o^Dvsp*h"[cs.index(r["c"]) % 8]
        ax.scatter(r["sparsity"], r["accuracy"], color=color, marker=marker, s=45, zorder=3,
                   label=f"gRDA μ={r['mu']:g} c={r['c']:g}")
        ax2.plot([e for e, _, _ in r["curve"]], [100 * s for _, _, s in r["curve"]], color=color,
                 ls=("-", "--", ":", "-.")[cs.index(r["c"]) % 4], label=f"μ={r['mu']:g} c={r['c']:g}")
    ax.set_xlabel("sparsity (% of all parameters exactly zero)")
    ax.set_ylabel("test accuracy (%)")
    if sgd is not None:  # zoom on gRDA and SGD; collapsed MP points leave the axis downwards
        ax.set_ylim(max(ax.get_ylim()[0], sgd - 12), sgd + 1.5)
    ax.set_title(f"{report['model']} / {report['dataset']}, {report['epochs']} epochs")
    ax.legend(fontsize=6.5, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(alpha=0.3)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("sparsity (%)")
    ax2.set_title("gRDA sparsity during training")
    ax2.legend(fontsize=6.5, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


# ----------------------------------------------------------------------------------------------
# Registered studies

# pairs: the best ≥ 90 %-sparse setting found by bench/grda_lenet.py (BENCHMARKS.md, section grda-lenet)
LENET = GrdaStudySpec(model="lenet-300-100", dataset="fashion-mnist", recipe="grda-lenet",
                      mus=(0.4, 0.51, 0.55, 0.6, 0.7), cs=(0.002, 0.005), pairs=((0.004, 0.58),))
RESNET20 = GrdaStudySpec(model="resnet20", dataset="fashion-mnist", recipe="grda-resnet20-fmnist",
                         mus=(0.51, 0.6, 0.7), cs=(0.03,), pairs=((0.04, 0.7), (0.06, 0.7)), subset=6000,
                         finetune_epochs=1, finetune_lr=0.02)
PAPER = {
    "grda-resnet50-imagenet": GrdaStudySpec(
        model="resnet50", dataset="imagenet", recipe="grda-resnet50-imagenet", finetune_epochs=0,
        paper={"sparsity": 91.59, "accuracy": 73.24, "sgd_accuracy": 68.71, "note": "c=0.005, mu=0.55, 1 seed"}),
    "grda-vgg16-cifar10": GrdaStudySpec(
        model="vgg16", dataset="cifar10", recipe="grda-vgg16-cifar10", finetune_epochs=0,
        paper={"sparsity": 90.5, "accuracy": 90.9, "note": "c=0.0005, mu=0.6; the paper's VGG-16 has no BN and "
               "dropout 0.5 in the classifier, the zoo's vgg16 is the BN CIFAR variant"}),
    "grda-wrn28-10-cifar100": GrdaStudySpec(
        model="wrn-28-10", dataset="cifar100", recipe="grda-wrn28x10-cifar100", finetune_epochs=0,
        paper={"sparsity": 90.2, "accuracy": 77.0, "sgd_accuracy": 76.5, "note": "c=0.001, mu=0.55"}),
}


def _make_study(name: str, spec: GrdaStudySpec, doc: str):
    def study(options: StudyOptions) -> tuple[dict[str, Any], str]:
        return run_study(spec, options, title=name)

    study.__name__ = name.replace("-", "_")
    study.__doc__ = doc
    return study


for _name, _spec, _doc in [
    ("grda-lenet300-fmnist", LENET, "gRDA vs SGD vs magnitude pruning, LeNet-300-100 / Fashion-MNIST (CPU)."),
    ("grda-resnet20-fmnist", RESNET20, "gRDA vs SGD vs magnitude pruning, ResNet-20 / Fashion-MNIST (CPU-sized)."),
    *[(n, s, f"gRDA paper run '{n}' (GPU-sized; --epochs shortens it).") for n, s in PAPER.items()],
]:
    register_study(_name)(_make_study(_name, _spec, _doc))
