"""Prune vs Neuron Merging vs least-squares compensation on real conv nets (Fashion-MNIST, CPU).

Uses the checkpoints of ``bench/nm_train_convnets.py`` (``runs/nm-fmnist/<model>/``; trained first if
missing). For every criterion (l1-norm, l2-norm, l2-GM) and ratio:

* ``prune``: the criterion's survivors, no compensation;
* ``merge``: Neuron Merging (MostSim+BN, exact BN algebra, t = 0.1, λ = 0.85);
* ``lstsq``: the same survivors, consumers refitted on 1,000 unlabeled training images;
* ``lstsq-greedy``: survivors picked greedily from the same 1,000 images (criterion-independent).

resnet20 (option-B shortcuts) uses the ResNet preset (every block's conv1, floor(c(1−r)); the residual
stream is never pruned); the quarter-width vgg16 uses the general mode (every group the engine marks
mergeable — 13 convs and classifier.0 — at the same ratio). No fine-tuning anywhere.

    .venv/bin/python bench/nm_convnets.py [--models resnet20 vgg16] [--test-size 10000]

Writes the ``nm-convnets`` section of BENCHMARKS.md, the table block in docs/neuron-merging.md, the plot
docs/img/nm-convnets-fmnist.png and runs/nm-fmnist/results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, markdown_table, write_section
from nm_train_convnets import RUNS, checkpoint_dir

from prunekit.data import get_dataset, make_loader
from prunekit.engine import ChannelGraph
from prunekit.io import load_model
from prunekit.merging import LstsqOptions, MergeOptions, compensate, merge
from prunekit.metrics import count_macs, count_params, evaluate

CRITERIA = ("l1-norm", "l2-norm", "l2-GM")
SETUPS = {  # model -> (merge options, ratios)
    "resnet20": ({"preset": "resnet56"}, (0.1, 0.2, 0.3, 0.5)),
    "vgg16": ({}, (0.1, 0.2, 0.3, 0.5)),
}
DOC = ROOT / "docs" / "neuron-merging.md"
PLOT = ROOT / "docs" / "img" / "nm-convnets-fmnist.png"


def replace_block(path: Path, block_id: str, body: str) -> None:
    """Rewrite the ``<!-- block_id -->`` … ``<!-- /block_id -->`` part of a markdown file."""
    start, end = f"<!-- {block_id} -->", f"<!-- /{block_id} -->"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{body.strip()}\n{end}{after}"
    else:
        text = f"{text.rstrip()}\n\n{start}\n{body.strip()}\n{end}\n"
    path.write_text(text)


def run_model(name: str, test, train, calibration: int) -> dict:
    model, _ = load_model(checkpoint_dir(name))
    model.eval()
    example = (1, 1, 28, 28)
    graph = ChannelGraph.build(model, example)
    base_opts, ratios = SETUPS[name]
    size = {"params": count_params(model), "macs": count_macs(model, input_shape=(1, 28, 28))}
    out = {"model": name, "baseline": evaluate(model, test)["accuracy"], **size, "rows": []}
    print(f"{name}: baseline {out['baseline']:.2f} %", flush=True)

    def row(method: str, criterion: str, ratio: float, result, seconds: float) -> dict:
        m = result.model
        r = {"model": name, "method": method, "criterion": criterion, "ratio": ratio,
             "accuracy": evaluate(m, test)["accuracy"], "params": count_params(m),
             "macs": count_macs(m, input_shape=(1, 28, 28)), "merged": result.report.get("merged"),
             "removed": result.report.get("channels_removed"), "seconds": round(seconds, 2)}
        print(r, flush=True)
        return r

    for ratio in ratios:
        for crit in CRITERIA:
            opts = MergeOptions(ratio=ratio, criterion=crit, **base_opts)
            for method, o in (("prune", opts.replace(model_type="prune")), ("merge", opts)):
                t0 = time.perf_counter()
                res = merge(model, example, o, graph=graph)
                out["rows"].append(row(method, crit, ratio, res, time.perf_counter() - t0))
            t0 = time.perf_counter()
            res = compensate(model, example, train, LstsqOptions(calibration=calibration), opts, graph=graph)
            out["rows"].append(row("lstsq", crit, ratio, res, time.perf_counter() - t0))
        t0 = time.perf_counter()
        res = compensate(model, example, train, LstsqOptions(calibration=calibration, select="greedy"),
                         MergeOptions(ratio=ratio, **base_opts), graph=graph)
        out["rows"].append(row("lstsq-greedy", "—", ratio, res, time.perf_counter() - t0))
    return out


def table(result: dict) -> str:
    rows = result["rows"]
    ratios = sorted({r["ratio"] for r in rows})
    lines = []
    for ratio in ratios:
        sub = [r for r in rows if r["ratio"] == ratio]
        params = sub[0]["params"]
        cells = [f"{ratio:.1f}", f"{params:,} (−{100 * (1 - params / result['params']):.1f} %)",
                 f"−{100 * (1 - sub[0]['macs'] / result['macs']):.1f} %"]
        for crit in CRITERIA:
            acc = {r["method"]: r["accuracy"] for r in sub if r["criterion"] == crit}
            best = max(acc.values())
            cells.append(" / ".join(f"**{acc[m]:.2f}**" if acc[m] == best else f"{acc[m]:.2f}"
                                    for m in ("prune", "merge", "lstsq")))
        cells.append(f"{next(r['accuracy'] for r in sub if r['method'] == 'lstsq-greedy'):.2f}")
        lines.append(cells)
    head = ["ratio", "params", "MACs", *(f"{c}: prune / merge / lstsq" for c in CRITERIA), "lstsq-greedy"]
    return (f"**{result['model']}** — baseline {result['baseline']:.2f} %, {result['params']:,} params, "
            f"{result['macs']:,} MACs\n\n" + markdown_table(head, lines))


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    styles = {"prune": ("tab:gray", "o"), "merge": ("tab:blue", "s"), "lstsq": ("tab:green", "^"),
              "lstsq-greedy": ("tab:red", "*")}
    dashes = {"l1-norm": "-", "l2-norm": "--", "l2-GM": ":", "—": "-"}
    for ax, res in zip(axes[0], results):
        for method, (color, marker) in styles.items():
            for crit in (CRITERIA if method != "lstsq-greedy" else ("—",)):
                pts = sorted((r["params"], r["accuracy"]) for r in res["rows"]
                             if r["method"] == method and r["criterion"] == crit)
                if pts:
                    label = method if method == "lstsq-greedy" else f"{method} ({crit})"
                    ax.plot(*zip(*pts), dashes[crit], color=color, marker=marker, label=label, alpha=0.85)
        ax.axhline(res["baseline"], color="black", lw=0.8, ls="-.", label="unpruned")
        ax.set_title(f"{res['model']} on Fashion-MNIST (no fine-tuning)")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=10000, help="first N test images (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    missing = [m for m in args.models if not (checkpoint_dir(m) / "model.safetensors").exists()]
    if missing:
        subprocess.run([sys.executable, str(ROOT / "bench" / "nm_train_convnets.py"), "--models", *missing], check=True)
    test_set = get_dataset("fashion-mnist", "test")
    if args.test_size < len(test_set):
        test_set.images, test_set.labels = test_set.images[:args.test_size], test_set.labels[:args.test_size]
    test = make_loader(test_set, 500, shuffle=False)
    train = get_dataset("fashion-mnist", "train", augment=False)
    start = time.perf_counter()
    results = [run_model(m, test, train, args.calibration) for m in args.models]
    minutes = (time.perf_counter() - start) / 60
    (RUNS / "results.json").write_text(json.dumps(results, indent=1))
    plot(results)
    summaries = []
    for m in args.models:
        s = checkpoint_dir(m) / "train_summary.json"
        if s.exists():
            d = json.loads(s.read_text())
            summaries.append(f"`{m}`: {d['epochs']} epochs, {d['accuracy']:.2f} %, {d['minutes']:.0f} min")
    intro = (
        "Models trained by `bench/nm_train_convnets.py` (CPU recipe `nm-fmnist-cpu`: SGD 0.9, lr 0.05 cosine, "
        "wd 5e-4, batch 128, no augmentation; resnet20 = `create(\"resnet20\", in_channels=1, input_size=28, "
        "shortcut=\"B\")`, vgg16 = quarter-width VGG-16 (16…128 channels, fc 128) — the full one costs ~12 min "
        "per epoch here; " + "; ".join(summaries) + "). "
        f"Test set: {len(test_set):,} Fashion-MNIST images; no fine-tuning. resnet20: ResNet preset (every "
        "block's conv1, floor rounding); vgg16: general mode (all 14 mergeable groups at the same ratio). "
        "Cells: prune / merge / lstsq accuracy (%) with that criterion's survivors (best in bold); "
        "lstsq-greedy picks its survivors from the calibration images. merge: exact BN algebra, t = 0.1, "
        f"λ = 0.85. lstsq: 1,000 unlabeled training images, relative ridge 0.01. Run time {minutes:.0f} min.")
    body = "\n\n".join([intro, *(table(r) for r in results),
                        "![accuracy vs parameters](docs/img/nm-convnets-fmnist.png)"])
    write_section("nm-convnets", "Neuron Merging vs pruning vs lstsq on conv nets (Fashion-MNIST, CPU)", body)
    replace_block(DOC, "nm-convnets", body.replace("(docs/img/", "(img/"))


if __name__ == "__main__":
    main()
