"""Neuron Merging on the official LeNet-300-100 checkpoint (Fashion-MNIST): the paper table for the three
criteria, least-squares compensation on 1,000 unlabeled training images (5 calibration seeds), and the
cost of merging the paper's CIFAR architectures (random weights, CPU).

    .venv/bin/python bench/nm_lenet.py [--seeds 5]

Writes the ``nm-lenet`` section of BENCHMARKS.md (needs ../shared/checkpoints and Fashion-MNIST).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT, markdown_table, write_section

from prunekit.data import get_dataset, make_loader
from prunekit.io import load_model
from prunekit.merging import LstsqOptions, MergeOptions, compensate
from prunekit.metrics import evaluate
from prunekit.studies.merging import LENET_CHECKPOINT, lenet_markdown, lenet_table

OFFICIAL = ROOT.parent / "shared" / "checkpoints" / LENET_CHECKPOINT


def merge_timing() -> list[list]:
    """Seconds to merge (select + decompose + surgery) the paper's CIFAR nets, best of 3."""
    from prunekit.engine import ChannelGraph, apply
    from prunekit.merging import merge_plan, select
    from prunekit.models import create

    rows = []
    for name, cfg, preset, ratio in [("vgg16", {}, "vgg16-cifar10", 0.0), ("resnet56", {"shortcut": "B"}, "resnet56", 0.4),
                                     ("wrn-40-4", {}, "wrn-40-4", 0.4)]:
        model = create(name, **cfg).eval()
        t0 = time.perf_counter()
        graph = ChannelGraph.build(model, (1, 3, 32, 32))
        t_graph = time.perf_counter() - t0
        opts = MergeOptions(ratio=ratio, preset=preset, bn_scale="paper")
        best = [float("inf")] * 3
        for _ in range(3):
            t = [time.perf_counter()]
            plan = select(model, graph, opts)
            t.append(time.perf_counter())
            plan, _ = merge_plan(model, graph, plan, opts)
            t.append(time.perf_counter())
            apply(model, graph, plan)
            t.append(time.perf_counter())
            best = [min(b, t[i + 1] - t[i]) for i, b in enumerate(best)]
        rows.append([name, preset, t_graph, best[0], best[1], best[2], sum(best)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="calibration subsets for the lstsq spread")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not OFFICIAL.exists():
        raise SystemExit(f"{OFFICIAL} not found")
    model, _ = load_model(OFFICIAL, model_name="lenet-300-100")
    model.eval()
    test = make_loader(get_dataset("fashion-mnist", "test"), 2000, shuffle=False)
    train = get_dataset("fashion-mnist", "train", augment=False)
    baseline = evaluate(model, test)["accuracy"]
    start = time.perf_counter()
    rows = lenet_table(model, test, train, criteria=("l1-norm", "l2-norm", "l2-GM"), calibration=1000,
                       log=lambda r: print(r, flush=True))
    table_s = time.perf_counter() - start

    spread = []
    for ratio in (0.5, 0.6, 0.7, 0.8):
        opts = MergeOptions(ratio=ratio, preset="lenet-300-100")
        line = [f"{ratio:.1f}"]
        for select in ("criterion", "greedy"):
            accs = [evaluate(compensate(model, (1, 1, 28, 28), train,
                                        LstsqOptions(calibration=1000, select=select, seed=s), opts).model,
                             test)["accuracy"] for s in range(args.seeds)]
            line += [f"{statistics.mean(accs):.2f}", f"{min(accs):.2f}–{max(accs):.2f}"]
        spread.append(line)
        print(line, flush=True)

    timing = merge_timing()
    body = [
        (f"Official checkpoint `{LENET_CHECKPOINT}` (baseline **{baseline:.2f} %**), Fashion-MNIST test set, no "
         "fine-tuning. Preset `lenet-300-100`: both hidden layers, round(N(1−r)) survivors, MostSim on [w | b], "
         "t = 0.45. `lstsq`: ridge refit (relative ridge 0.01, intercept) on 1,000 unlabeled training images "
         "(calibration seed 0), with the criterion's survivors or with greedy data-driven survivors (the latter do "
         "not depend on the criterion). The l1-norm prune/merge cells are the published table; l2-norm and l2-GM "
         "were not retrievable from the paper."),
        "",
        lenet_markdown(rows),
        "",
        f"Whole table (36 pruned/merged models, 24 lstsq fits): {table_s:.0f} s.",
        "",
        (f"lstsq over {args.seeds} calibration subsets (seeds 0–{args.seeds - 1}, 1,000 images each, l1-norm "
         "survivors vs greedy survivors):"),
        "",
        markdown_table(["ratio", "criterion: mean", "criterion: range", "greedy: mean", "greedy: range"], spread),
        "",
        ("Cost of a merge on the paper's CIFAR nets (random weights, one CPU thread, seconds; best of 3; "
         "`bn_scale=\"paper\"`):"),
        "",
        markdown_table(["model", "preset", "graph (once)", "select", "decompose", "surgery", "merge total"],
                       [[r[0], r[1], *(round(v, 3) for v in r[2:])] for r in timing]),
    ]
    write_section("nm-lenet", "Neuron Merging: LeNet-300-100 on Fashion-MNIST (official checkpoint)", "\n".join(body))


if __name__ == "__main__":
    main()
