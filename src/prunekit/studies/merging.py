"""Neuron Merging (Kim et al., NeurIPS 2020) studies for ``prunekit reproduce nm-*``.

* ``nm-lenet300-fmnist`` — the paper's LeNet-300-100 / Fashion-MNIST table from the official checkpoint:
  ratios 0.5–0.8 × prune / merge (l1-norm by default; ``--set criteria=all`` adds l2-norm and l2-GM),
  next to the published numbers, plus least-squares compensation on 1,000 unlabeled training images
  (with the criterion's survivors and with greedy data-driven survivors).
* ``nm-vgg16-cifar10``, ``nm-vgg16-cifar100``, ``nm-resnet56-cifar10``, ``nm-wrn40-4-cifar10`` — the
  official CIFAR pipelines (presets) on a given checkpoint (official ``.pth.tar`` or ours): original /
  prune / merge per criterion (ResNet/WRN at ``--set ratios=[...]``), ``bn_scale="paper"`` by default
  (``--set bn_scale=exact`` for the exact algebra).

Study options (``--set KEY=VALUE``): ``criteria`` (list or ``all``), ``ratios``, ``calibration``
(lstsq inputs, 0 disables lstsq), ``bn_scale``, ``threshold``, ``lam``, ``batch_size``, and for the CIFAR
studies ``negative`` (``skip`` by default; ``allow`` merges negative-scale pairs as the official code
does, which makes the logits identical to the official algorithm's).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from prunekit import ChannelGraph
from prunekit.data import get_dataset, make_loader
from prunekit.errors import ConfigError
from prunekit.io import load_model
from prunekit.merging import LstsqOptions, MergeOptions, compensate, merge
from prunekit.metrics import count_params, evaluate
from prunekit.reproduce import StudyOptions, register_study

from .common import fmt

__all__ = ["CIFAR_STUDIES", "CRITERIA", "LENET_CHECKPOINT", "LENET_PAPER", "VGG_C10_PAPER",
           "default_lenet_checkpoint", "fmt", "lenet_markdown", "lenet_table", "nm_lenet300_fmnist",
           "preset_markdown", "preset_table"]

CRITERIA = ("l1-norm", "l2-norm", "l2-GM")
LENET_CHECKPOINT = "neuron-merging-lenet300-fashionmnist.pth.tar"
#: the official README's l1-norm table (docs/neuron-merging.md, "Results"): ratio -> (prune, merge)
LENET_PAPER = {0.5: (88.40, 88.69), 0.6: (85.17, 86.92), 0.7: (71.26, 82.75), 0.8: (66.76, 80.02)}
#: VGG-16 CIFAR-10, the paper's table (docs/neuron-merging.md): criterion -> (prune, merge); baseline 93.70
VGG_C10_PAPER = {"l1-norm": (88.70, 93.16), "l2-norm": (89.14, 93.16), "l2-GM": (87.85, 93.10)}


def default_lenet_checkpoint() -> Path | None:
    """``../shared/checkpoints/<official LeNet>`` next to the repository or the working directory."""
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *here.parents]:
        p = base.parent / "shared" / "checkpoints" / LENET_CHECKPOINT
        if p.is_file():
            return p
    return None


def _criteria(value: Any) -> list[str]:
    if value in (None, ""):
        return ["l1-norm"]
    if value == "all":
        return list(CRITERIA)
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    bad = [c for c in items if c not in CRITERIA]
    if bad:
        raise ConfigError(f"criteria must be a list of {list(CRITERIA)} or 'all', got {value!r}")
    return list(items)


def _ratios(value: Any, default: list[float]) -> list[float]:
    if value in (None, ""):
        return default
    items = value if isinstance(value, (list, tuple)) else [value]
    return [float(r) for r in items]


def _accuracy(model: torch.nn.Module, loader, device: str | None) -> float:
    return round(float(evaluate(model, loader, device=device)["accuracy"]), 2)


def _params(model: torch.nn.Module) -> int:
    return int(count_params(model))


def _prune_merge_row(model, example, graph, opts: MergeOptions, ratio, base_params: int, test_loader,
                     device) -> dict[str, Any]:
    """One table row: the same plan applied as plain pruning and as merging, both evaluated."""
    t0 = time.perf_counter()
    merged = merge(model, example, opts, graph=graph)
    seconds = time.perf_counter() - t0
    pruned = merge(model, example, opts.replace(model_type="prune"), graph=graph)
    return {"criterion": opts.criterion, "ratio": ratio, "params": _params(merged.model),
            "params_reduction": round(100 * (1 - _params(merged.model) / base_params), 2),
            "prune": _accuracy(pruned.model, test_loader, device),
            "merge": _accuracy(merged.model, test_loader, device), "merged": merged.report["merged"],
            "removed": merged.report["channels_removed"], "skipped_sign": merged.report["skipped_sign"],
            "merge_seconds": round(seconds, 3)}


# ----------------------------------------------------------------------------------------------
# LeNet-300-100 on Fashion-MNIST


def lenet_table(model: torch.nn.Module, test_loader, train_set=None, *, criteria=("l1-norm",),
                ratios=(0.5, 0.6, 0.7, 0.8), calibration: int = 1000, device: str | None = None,
                bn_scale: str = "exact", threshold: float | None = None, log=None) -> list[dict[str, Any]]:
    """Rows ``{criterion, ratio, params, prune, merge, merged, lstsq, lstsq_greedy}`` for the official
    pipeline (preset ``lenet-300-100``); lstsq columns only when ``train_set`` and ``calibration``."""
    model = model.eval()
    example = (1, *getattr(model, "input_shape", (1, 28, 28)))
    graph = ChannelGraph.build(model, example)
    base_params = _params(model)
    rows = []
    for crit in criteria:
        for r in ratios:
            opts = MergeOptions(ratio=r, criterion=crit, preset="lenet-300-100", bn_scale=bn_scale,
                                threshold=threshold)
            row = _prune_merge_row(model, example, graph, opts, r, base_params, test_loader, device)
            if train_set is not None and calibration:
                for key, select in (("lstsq", "criterion"), ("lstsq_greedy", "greedy")):
                    res = compensate(model, example, train_set, LstsqOptions(calibration=calibration, select=select),
                                     opts, graph=graph)
                    row[key] = _accuracy(res.model, test_loader, device)
            if crit == "l1-norm" and r in LENET_PAPER:
                row["paper_prune"], row["paper_merge"] = LENET_PAPER[r]
            rows.append(row)
            if log:
                log(row)
    return rows


def lenet_markdown(rows: list[dict[str, Any]], baseline: float | None = None) -> str:
    lstsq = any("lstsq" in r for r in rows)
    head = ["criterion", "ratio", "params (−%)", "prune", "merge", "merged/removed"]
    head += ["lstsq (criterion survivors)", "lstsq (greedy survivors)"] if lstsq else []
    head += ["paper prune", "paper merge"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["criterion"], f"{r['ratio']:.1f}", f"{r['params']:,} (−{r['params_reduction']:.2f} %)",
                 fmt(r["prune"]), f"**{fmt(r['merge'])}**", f"{r['merged']}/{r['removed']}"]
        cells += [fmt(r.get("lstsq")), fmt(r.get("lstsq_greedy"))] if lstsq else []
        cells += [fmt(r.get("paper_prune")), fmt(r.get("paper_merge"))]
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        lines.append(f"\nUnpruned baseline: {baseline:.2f} %.")
    return "\n".join(lines)


def nm_lenet300_fmnist(options: StudyOptions) -> tuple[dict[str, Any], str]:
    """The LeNet-300-100 / Fashion-MNIST table of the paper, from the official checkpoint."""
    path = Path(options.checkpoint) if options.checkpoint else default_lenet_checkpoint()
    if path is None or not path.is_file():
        raise ConfigError(f"nm-lenet300-fmnist needs the official checkpoint ({LENET_CHECKPOINT}): pass "
                          "--checkpoint PATH (it is in the Neuron Merging repository's saved_models/)")
    extra = dict(options.extra)
    model, _ = load_model(path, model_name="lenet-300-100")
    test_loader = make_loader(get_dataset("fashion-mnist", "test", root=options.data_root),
                              int(extra.get("batch_size", 1000)), shuffle=False)
    calibration = int(extra.get("calibration", 1000))
    train_set = get_dataset("fashion-mnist", "train", root=options.data_root, augment=False) if calibration else None
    start = time.perf_counter()
    baseline = _accuracy(model, test_loader, options.device)
    rows = lenet_table(model, test_loader, train_set, criteria=_criteria(extra.get("criteria")),
                       ratios=_ratios(extra.get("ratios"), [0.5, 0.6, 0.7, 0.8]), calibration=calibration,
                       device=options.device, bn_scale=str(extra.get("bn_scale", "exact")),
                       threshold=extra.get("threshold"))
    report = {"study": "nm-lenet300-fmnist", "checkpoint": str(path), "baseline": baseline, "rows": rows,
              "calibration": calibration, "seconds": round(time.perf_counter() - start, 1)}
    return report, "nm-lenet300-fmnist (LeNet-300-100, Fashion-MNIST, no fine-tuning)\n\n" + \
        lenet_markdown(rows, baseline)


# ----------------------------------------------------------------------------------------------
# CIFAR presets (official checkpoints)


CIFAR_STUDIES = {
    # name: (model, model config, dataset, preset, default ratios (None: fixed widths))
    "nm-vgg16-cifar10": ("vgg16", {"num_classes": 10}, "cifar10", "vgg16-cifar10", None),
    "nm-vgg16-cifar100": ("vgg16", {"num_classes": 100}, "cifar100", "vgg16-cifar100", None),
    "nm-resnet56-cifar10": ("resnet56", {"shortcut": "B"}, "cifar10", "resnet56", [0.2, 0.4, 0.6]),
    "nm-wrn40-4-cifar10": ("wrn-40-4", {}, "cifar10", "wrn-40-4", [0.2, 0.4, 0.6]),
}


def preset_table(model: torch.nn.Module, test_loader, *, preset: str, criteria=CRITERIA, ratios=(None,),
                 device: str | None = None, bn_scale: str = "paper", threshold: float | None = None,
                 lam: float | None = None, negative: str = "skip", train_set=None, calibration: int = 0,
                 log=None) -> list[dict[str, Any]]:
    """Rows ``{criterion, ratio, params, prune, merge, merged, skipped_sign[, lstsq]}`` for an official preset."""
    model = model.eval()
    example = (1, *getattr(model, "input_shape", (3, 32, 32)))
    graph = ChannelGraph.build(model, example)
    base = _params(model)
    rows = []
    for crit in criteria:
        for r in ratios:
            opts = MergeOptions(ratio=0.0 if r is None else r, criterion=crit, preset=preset, bn_scale=bn_scale,
                                threshold=threshold, lam=lam, negative=negative)
            row = _prune_merge_row(model, example, graph, opts, r, base, test_loader, device)
            if train_set is not None and calibration:
                res = compensate(model, example, train_set, LstsqOptions(calibration=calibration), opts, graph=graph)
                row["lstsq"] = _accuracy(res.model, test_loader, device)
            if preset == "vgg16-cifar10" and crit in VGG_C10_PAPER:
                row["paper_prune"], row["paper_merge"] = VGG_C10_PAPER[crit]
            rows.append(row)
            if log:
                log(row)
    return rows


def preset_markdown(rows: list[dict[str, Any]], baseline: float) -> str:
    lstsq = any("lstsq" in r for r in rows)
    paper = any("paper_merge" in r for r in rows)
    head = ["criterion", "ratio", "params (−%)", "prune", "merge", "merged/removed", "skipped (sign)"]
    head += ["lstsq"] if lstsq else []
    head += ["paper prune", "paper merge"] if paper else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["criterion"], "fixed" if r["ratio"] is None else f"{r['ratio']:.1f}",
                 f"{r['params']:,} (−{r['params_reduction']:.2f} %)", fmt(r["prune"]), f"**{fmt(r['merge'])}**",
                 f"{r['merged']}/{r['removed']}", str(r["skipped_sign"])]
        cells += [fmt(r.get("lstsq"))] if lstsq else []
        cells += [fmt(r.get("paper_prune")), fmt(r.get("paper_merge"))] if paper else []
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nUnpruned baseline: {baseline:.2f} %.")
    return "\n".join(lines)


def _cifar_study(name: str):
    model_name, cfg, dataset, preset, default_ratios = CIFAR_STUDIES[name]

    def study(options: StudyOptions) -> tuple[dict[str, Any], str]:
        if not options.checkpoint:
            raise ConfigError(f"{name} needs --checkpoint (the official {model_name} checkpoint, .pth.tar, or a "
                              f"prunekit model directory)")
        extra = dict(options.extra)
        model, _ = load_model(options.checkpoint, model_name=model_name, model_config=dict(cfg))
        test_loader = make_loader(get_dataset(dataset, "test", root=options.data_root),
                                  int(extra.get("batch_size", 256)), shuffle=False)
        calibration = int(extra.get("calibration", 0))
        train_set = get_dataset(dataset, "train", root=options.data_root, augment=False) if calibration else None
        ratios = [None] if default_ratios is None else _ratios(extra.get("ratios"), default_ratios)
        start = time.perf_counter()
        baseline = _accuracy(model, test_loader, options.device)
        rows = preset_table(model, test_loader, preset=preset, criteria=_criteria(extra.get("criteria", "all")),
                            ratios=ratios, device=options.device, bn_scale=str(extra.get("bn_scale", "paper")),
                            threshold=extra.get("threshold"), lam=extra.get("lam"),
                            negative=str(extra.get("negative", "skip")), train_set=train_set,
                            calibration=calibration)
        report = {"study": name, "checkpoint": str(options.checkpoint), "preset": preset, "baseline": baseline,
                  "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
        return report, f"{name} (preset {preset}, no fine-tuning)\n\n" + preset_markdown(rows, baseline)

    study.__doc__ = f"Neuron Merging preset '{preset}' on {dataset} from a given checkpoint."
    return study


register_study("nm-lenet300-fmnist")(nm_lenet300_fmnist)
for _name in CIFAR_STUDIES:
    register_study(_name)(_cifar_study(_name))
