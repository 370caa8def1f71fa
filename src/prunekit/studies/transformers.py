"""Compensated pruning of transformers on real data: ``prunekit reproduce vit-fmnist`` and ``llama-shakespeare``.

A small ``transformers`` ViT trained on Fashion-MNIST and a small byte-level ``LlamaForCausalLM`` (grouped-
query attention, RoPE, SiLU-gated MLP) trained on the Shakespeare/Milton corpus (both by ``prunekit train``,
cached under ``OUT/baseline`` and reused), then **MLP neurons + attention heads** (kv groups for GQA) removed
at 20 / 35 / 50 % in every layer, no fine-tuning, by every method side by side:

* ``magnitude`` — Torch-Pruning-style group magnitude (|w| over all a structure's weights);
* ``wanda-sp`` — structured Wanda: |W|·‖X‖ over the output projection's columns of a structure;
* ``flap`` — fluctuation metric (input variance × ‖W_:,j‖²) + bias compensation from calibration means;
* ``torch-pruning`` — Torch-Pruning 1.6 itself where it runs (ViT; its graph of a Llama does not finish);
* ``merge`` / ``lstsq`` — prunekit's Neuron Merging / least-squares merging (heads and gated MLP neurons
  are not mergeable: these fall back to pruning, and the table shows it);
* ``reconstruct`` — prunekit's whole-layer reconstruction (every consumer refit from calibration inputs;
  survivors, heads included, chosen greedily against the refit).

Two **adaptive** rows spend the same parameters non-uniformly across layers and between heads and MLP
neurons: ``flap-adaptive`` (FLAP's own AL-AM global structure: ``removed`` of the heads' and MLP neurons'
parameters) and ``reconstruct-global`` (the uniform plan's MACs re-spent where the refit loses least per MAC,
:mod:`prunekit.compensate.allocate`).

Plus a row with the **hidden size** pruned too (``+hidden``), a calibration sweep (128 … 1,024 images or
sequences) of ``reconstruct`` at 50 %, and for the LM a short recovery fine-tune (``finetune_steps``, 200 by
default) after ``magnitude`` and ``reconstruct`` at 50 %: what compensation saves.

``removed`` is the fraction of MLP neurons and of heads removed; ``params_reduction`` / ``macs_reduction``
are measured on the pruned model. Study options (``--set KEY=VALUE``): ``removed``, ``methods``,
``calibration``, ``sweep``, ``finetune_steps``, ``test_size``, ``hidden``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data import get_dataset, make_loader
from prunekit.errors import ConfigError
from prunekit.io import load_model
from prunekit.methods import PruneOptions, get_method
from prunekit.metrics import count_macs, count_params
from prunekit.models import create
from prunekit.recipes import get_recipe
from prunekit.reproduce import StudyOptions, register_study
from prunekit.train import seed_everything, train

from .common import check_options, figure, fmt, out_dir, stderr_log

#: label → (method, criterion, method options)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "magnitude": ("magnitude", "magnitude", {}),
    "wanda-sp": ("wanda-sp", "l1-norm", {}),
    "flap": ("flap", "l1-norm", {}),
    "merge": ("merge", "l1-norm", {}),
    "lstsq": ("lstsq", "l1-norm", {}),
    "reconstruct": ("reconstruct", "l1-norm", {}),
    "flap-adaptive": ("flap", "l1-norm", {"structure": "AL-AM"}),
    "reconstruct-global": ("reconstruct", "l1-norm", {"select": "global"}),
}
#: rows whose method allocates ``removed`` itself (a global ratio over the heads' and MLP groups)
ADAPTIVE = ("flap-adaptive",)
SETTABLE = ("removed", "methods", "calibration", "sweep", "finetune_steps", "test_size", "hidden")


@dataclass(frozen=True)
class Setup:
    title: str
    model: str
    dataset: str
    recipe: str
    metric: str  # "accuracy" or "perplexity"
    heads: str  # a pattern naming each layer's head projection (selects the head groups)
    mlp: str  # a pattern naming each layer's MLP producer
    example: tuple[int, ...]
    calibration: int
    sweep: tuple[int, ...]


SETUPS = {
    "vit-fmnist": Setup("vit-fmnist", "vit-fmnist", "fashion-mnist", "vit-fmnist", "accuracy",
                        "*.attention.q_proj", "*.mlp.fc1", (1, 1, 28, 28), 512, (128, 256, 512, 1024)),
    "llama-shakespeare": Setup("llama-shakespeare", "llama-shakespeare", "shakespeare", "llama-shakespeare",
                               "perplexity", "*.self_attn.q_proj", "*.mlp.gate_proj", (1, 128), 256,
                               (128, 256, 512, 1024)),
}


def _example(setup: Setup) -> torch.Tensor:
    return torch.zeros(setup.example) if setup.metric == "accuracy" else torch.zeros(setup.example, dtype=torch.long)


def _baseline(setup: Setup, options: StudyOptions, out: Path, train_set, test_set) -> tuple[nn.Module, dict]:
    """``--checkpoint``, or trained by ``prunekit train``'s code path, resumable, cached in ``OUT/baseline``."""
    if options.checkpoint:
        model, _ = load_model(options.checkpoint)
        return model.eval(), {"checkpoint": str(options.checkpoint)}
    seed_everything(options.seed)
    model = create(setup.model)
    recipe = get_recipe(setup.recipe)
    if options.epochs:
        recipe = recipe.replace(epochs=options.epochs)
    res = train(model, train_set, test_set, recipe, out_dir=out / "baseline", seed=options.seed, resume=True,
                device=options.device, progress=options.progress)
    return res.model.eval(), {"checkpoint": str(out / "baseline"), "recipe": setup.recipe, "epochs": recipe.epochs}


@torch.no_grad()
def _score(model: nn.Module, loader, metric: str) -> float:
    """Top-1 accuracy (%) or perplexity exp(mean token NLL) over ``loader``."""
    model.eval()
    total, hits, nll = 0, 0, 0.0
    for x, y in loader:
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        if metric == "accuracy":
            hits += int((logits.argmax(-1) == y).sum())
            total += len(y)
        else:
            nll += float(F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), reduction="sum"))
            total += y.numel()
    return 100.0 * hits / total if metric == "accuracy" else math.exp(nll / total)


def _calibration(setup: Setup, train_set, n: int, seed: int) -> torch.Tensor:
    """``n`` unlabeled training inputs (images, or token blocks), a seeded random subset."""
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return torch.stack([train_set[i][0] for i in idx])


def _as_list(value: Any, default: list) -> list:
    if value is None:
        return list(default)
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _Study:
    """One run: baseline, the rows, the sweep, the fine-tune rows."""

    def __init__(self, setup: Setup, options: StudyOptions):
        self.setup, self.options = setup, options
        extra = dict(options.extra)
        check_options(extra, SETTABLE)
        self.removed = [float(r) for r in _as_list(extra.get("removed"), [0.2, 0.35, 0.5])]
        self.methods = [str(m) for m in _as_list(extra.get("methods"), [*METHODS, "torch-pruning"])]
        unknown = sorted(set(self.methods) - set(METHODS) - {"torch-pruning"})
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; the study runs {[*METHODS, 'torch-pruning']}")
        self.n_cal = int(extra.get("calibration", setup.calibration))
        self.sweep = [int(n) for n in _as_list(extra.get("sweep"), list(setup.sweep))]
        self.finetune_steps = int(extra.get("finetune_steps", 200 if setup.metric == "perplexity" else 0))
        self.hidden = [str(m) for m in _as_list(extra.get("hidden"), ["magnitude", "reconstruct"])]
        self.out = out_dir(options, setup.title)
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_set = get_dataset(setup.dataset, "train", root=options.data_root, download=False)
        test_set = get_dataset(setup.dataset, "test", root=options.data_root, download=False)
        if extra.get("test_size"):
            test_set = torch.utils.data.Subset(test_set, range(min(int(extra["test_size"]), len(test_set))))
        self.test_set = test_set
        self.loader = make_loader(test_set, 250 if setup.metric == "accuracy" else 32, shuffle=False)
        self.example = _example(setup)

    def macs(self, model: nn.Module) -> int:
        return count_macs(model, self.example)

    def row(self, label: str, removed: float, model: nn.Module, seconds: float, **extra: Any) -> dict[str, Any]:
        params, macs = count_params(model), self.macs(model)
        value = _score(model, self.loader, self.setup.metric)
        row = {"method": label, "removed": removed, "params_reduction": round(1 - params / self.base["params"], 4),
               "macs_reduction": round(1 - macs / self.base["macs"], 4),
               self.setup.metric: round(value, 3 if self.setup.metric == "perplexity" else 2),
               "method_seconds": round(seconds, 2), **extra}
        stderr_log(f"{label} removed={removed}: {self.setup.metric} {value:.3f}, −{100 * row['macs_reduction']:.1f} % "
                   f"MACs, −{100 * row['params_reduction']:.1f} % params ({seconds:.1f} s)")
        return row

    def prune(self, label: str, removed: float, n_cal: int, hidden: bool = False) -> tuple[nn.Module, float]:
        method, criterion, mo = METHODS[label]
        adaptive = label in ADAPTIVE and not hidden
        overrides = {} if hidden or adaptive else {self.setup.heads: removed, self.setup.mlp: removed}
        calibration = _calibration(self.setup, self.train_set, n_cal, self.options.seed)
        opts = PruneOptions(ratio=removed if hidden or adaptive else 0.0, criterion=criterion, overrides=overrides,
                            calibration_data=calibration, method_options={"calibration": n_cal, **mo}
                            if method in ("lstsq", "reconstruct") else dict(mo))
        start = time.perf_counter()
        result = get_method(method)(self.model, self.example, opts)
        return result.model, time.perf_counter() - start

    def run(self) -> dict[str, Any]:
        self.model, baseline = _baseline(self.setup, self.options, self.out, self.train_set, self.test_set)
        self.base = {"params": count_params(self.model), "macs": self.macs(self.model)}
        dense = _score(self.model, self.loader, self.setup.metric)
        stderr_log(f"baseline {self.setup.metric} {dense:.3f}")
        rows, pruned = [], {}
        for removed in self.removed:
            for label in self.methods:
                if label == "torch-pruning":
                    rows += self.torch_pruning_rows(removed)
                    continue
                model, seconds = self.prune(label, removed, self.n_cal)
                pruned[(label, removed)] = model
                rows.append(self.row(label, removed, model, seconds, target="heads+mlp",
                                     calibration=self.n_cal if label not in ("magnitude", "merge") else 0))
            for label in self.hidden:
                model, seconds = self.prune(label, removed, self.n_cal, hidden=True)
                rows.append(self.row(f"{label}+hidden", removed, model, seconds, target="heads+mlp+hidden",
                                     calibration=self.n_cal if label != "magnitude" else 0))
        sweep = []
        for n in self.sweep:
            model, seconds = self.prune("reconstruct", 0.5, n)
            sweep.append(self.row("reconstruct", 0.5, model, seconds, calibration=n))
        for label in ("magnitude", "reconstruct"):
            if self.finetune_steps and (label, 0.5) in pruned:
                rows.append(self.finetune(label, pruned[(label, 0.5)]))
        key = "baseline_accuracy" if self.setup.metric == "accuracy" else "dense_perplexity"
        report = {"study": self.setup.title, "model": self.setup.model, "dataset": self.setup.dataset,
                  key: round(dense, 3), "baseline": {**baseline, **self.base}, "calibration": self.n_cal,
                  "rows": rows, "sweep": sweep}
        (self.out / "results.json").write_text(json.dumps(report, indent=1))
        plot = plot_study(report, self.out / f"{self.setup.title}.png")
        if plot is not None:
            report["plot"] = str(plot)
        return report

    def finetune(self, label: str, model: nn.Module) -> dict[str, Any]:
        """``finetune_steps`` steps of the baseline recipe (lr / 10, no warm-up) on the pruned model."""
        recipe = get_recipe(self.setup.recipe)
        recipe = recipe.replace(epochs=1, steps_per_epoch=self.finetune_steps, lr=recipe.lr / 10, warmup_steps=0)
        start = time.perf_counter()
        out = _fresh_unless_same_start(self.out / f"finetune-{label}", model)
        res = train(copy.deepcopy(model), self.train_set, self.test_set, recipe,
                    out_dir=out, seed=self.options.seed, resume=True,
                    device=self.options.device, progress=self.options.progress)
        return self.row(label, 0.5, res.model.eval(), time.perf_counter() - start, target="heads+mlp",
                        finetune_steps=self.finetune_steps)

    def torch_pruning_rows(self, removed: float) -> list[dict[str, Any]]:
        if self.setup.metric == "perplexity":
            stderr_log("torch-pruning: skipped for LlamaForCausalLM (Torch-Pruning 1.6.1 does not finish building "
                       "its dependency graph; see bench/transformers_engine.py)")
            return []
        try:
            small, seconds = _torch_pruning_vit(self.model, removed, self.example)
        except ImportError:
            stderr_log("torch-pruning is not installed (pip install torch-pruning): its rows are skipped")
            return []
        return [self.row("torch-pruning", removed, small, seconds, target="heads+mlp", calibration=0)]


def _fresh_unless_same_start(out: Path, model: nn.Module) -> Path:
    """``out``, emptied unless its run started from these very weights (``start.sha256``): a cached fine-tune
    is resumed only for the same pruned model, never for one an earlier version of a method produced."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    stamp = out / "start.sha256"
    if out.exists() and (not stamp.exists() or stamp.read_text().strip() != digest.hexdigest()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest.hexdigest() + "\n")
    return out


def _torch_pruning_vit(model: nn.Module, removed: float, example: torch.Tensor) -> tuple[nn.Module, float]:
    """Torch-Pruning 1.6's documented recipe for Hugging Face ViTs: MetaPruner, group L1 magnitude, heads
    (``prune_num_heads``) and MLP neurons (``fc1``) at ``removed``, hidden size kept."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    start = time.perf_counter()
    num_heads, ignored = {}, [m.classifier]
    for name, mod in m.named_modules():
        if name.endswith("attention") and hasattr(mod, "q_proj"):
            heads = m.config.num_attention_heads
            for proj in (mod.q_proj, mod.k_proj, mod.v_proj):
                num_heads[proj] = heads
        if name.endswith(("o_proj", "mlp.fc2")) or "embeddings" in name:
            ignored.append(mod)
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=removed, ignored_layers=ignored, num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=removed)
    pruner.step()
    for mod in m.modules():
        if hasattr(mod, "q_proj") and mod.q_proj in pruner.num_heads:
            mod.num_attention_heads = pruner.num_heads[mod.q_proj]
    return m, time.perf_counter() - start


for _title, _setup in SETUPS.items():
    register_study(_title)(lambda options, _setup=_setup: _run(_setup, options))


def _run(setup: Setup, options: StudyOptions) -> tuple[dict[str, Any], str]:
    report = _Study(setup, options).run()
    return report, study_table(report)


def study_table(report: dict[str, Any]) -> str:
    metric = "accuracy" if "baseline_accuracy" in report else "perplexity"
    dense = report.get("baseline_accuracy", report.get("dense_perplexity"))
    lines = [(f"{report['model']} / {report['dataset']}: dense {metric} {fmt(float(dense))}; no fine-tuning unless "
             "stated; calibration: unlabeled training inputs"), "",
             f"| method | removed | MACs removed | params removed | {metric} | method s | calibration |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = r["method"] + (f" + {r['finetune_steps']} steps" if r.get("finetune_steps") else "")
        lines.append(f"| {name} | {r['removed']} | {100 * r['macs_reduction']:.1f} % | "
                     f"{100 * r['params_reduction']:.1f} % | {fmt(r[metric])} | {fmt(r['method_seconds'])} | "
                     f"{r.get('calibration', 0)} |")
    if report.get("sweep"):
        lines += ["", "Calibration sweep (reconstruct, 50 % removed):", "",
                  f"| calibration | {metric} | method s |", "|---|---|---|"]
        lines += [f"| {r['calibration']} | {fmt(r[metric])} | {fmt(r['method_seconds'])} |" for r in report["sweep"]]
    return "\n".join(lines)


def plot_study(report: dict[str, Any], path: Path) -> Path | None:
    """Accuracy or perplexity vs MACs removed, one line per method (no fine-tuning)."""
    fig = figure(figsize=(6.5, 4.2))
    if fig is None:
        return None
    metric = "accuracy" if "baseline_accuracy" in report else "perplexity"
    ax = fig.add_subplot(1, 1, 1)
    methods = sorted({r["method"] for r in report["rows"] if not r.get("finetune_steps")})
    for m in methods:
        pts = sorted((r["macs_reduction"], r[metric]) for r in report["rows"]
                     if r["method"] == m and not r.get("finetune_steps"))
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    dense = report.get("baseline_accuracy", report.get("dense_perplexity"))
    ax.axhline(dense, color="gray", linestyle="--", label="dense")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel("MACs removed (%)")
    ax.set_ylabel(metric)
    ax.set_title(f"{report['model']} on {report['dataset']}, no fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
