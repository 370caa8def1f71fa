"""gRDA on ResNet-20 / Fashion-MNIST, CPU-sized: sparsity vs accuracy against plain SGD and magnitude pruning.

Runs (or reuses from ``runs/grda-resnet20-fmnist/results.json``) the study ``prunekit reproduce
grda-resnet20-fmnist`` (recipe ``grda-resnet20-fmnist``: 10 epochs over the first 6,000 training images,
full 10,000-image test set), then writes ``docs/grda_resnet20.png`` and the ``grda-resnet20`` section of
BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grda_resnet20.py [--set mus=[0.51,0.6,0.7]] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_section

from prunekit.reproduce import StudyOptions
from prunekit.studies.grda import RESNET20, cached_training_minutes, plot_study, run_study

PLOT = ROOT / "docs" / "grda_resnet20.png"
TITLE = "grda-resnet20-fmnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="study option (JSON value)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / TITLE)
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and the plot alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = {}
    for pair in args.set:
        key, _, value = pair.partition("=")
        extra[key] = json.loads(value)
    start = time.perf_counter()
    report, table = run_study(RESNET20, StudyOptions(epochs=args.epochs, out=str(args.out), extra=extra),
                              title=TITLE)
    minutes = (time.perf_counter() - start) / 60
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(table)
    trained = cached_training_minutes(args.out)
    best = report["best_at_90"]
    body = "\n".join([
        (f"Recipe `grda-resnet20-fmnist` (CPU-sized, ours): ResNet-20 (option A, {report['params']:,} parameters), "
         f"{report['epochs']} epochs over the first {report['train_images']:,} Fashion-MNIST training images, test on "
         f"all {report['test_images']:,}; batch {report['batch_size']}, lr {report['lr']:g} with the paper's CIFAR "
         f"schedule (`{report['schedule']}`), no momentum, no weight decay; every parameter thresholded (BN and "
         f"biases included, as the reference), sparsity over all parameters. Plain SGD: the same recipe with "
         f"`optimizer=sgd`, same initial weights (seed {report['seed']}). The paper's c (≤ 0.005) assumes "
         f"100+ epochs; with {report['epochs'] * -(-report['train_images'] // report['batch_size'])} steps the "
         f"threshold c·γ^(μ+½)·k^μ needs c ∈ {{{', '.join(f'{c:g}' for c in sorted({r['c'] for r in report['rows']}))}}} "
         f"to reach the weights' scale."),
        "",
        (f"MP: the SGD model pruned globally by |w| to each gRDA run's sparsity, then a "
         f"{report['finetune_epochs']}-epoch masked plain-SGD fine-tune at lr {report['finetune_lr']:g}."),
        "",
        table.split("\n", 2)[2],
        "",
        (f"Best run with ≥ 90 % sparsity: μ = {best['mu']:g}, c = {best['c']:g}: {best['accuracy']:.2f} % at "
         f"{best['sparsity']:.2f} % sparsity ({best['accuracy'] - report['sgd_accuracy']:+.2f} vs SGD)."
         if best and report["sgd_accuracy"] is not None else "No run reached 90 % sparsity."),
        "",
        (f"One command: `OMP_NUM_THREADS=1 prunekit reproduce grda-resnet20-fmnist` (same runs, same cache layout). "
         f"Plot: `docs/grda_resnet20.png`. Training time of the SGD and gRDA runs: {trained:.1f} min "
         f"(one torch thread, shared machine); this invocation {minutes:.1f} min."),
    ])
    print(body)
    if not args.no_write:
        plot_study(report, PLOT)
        write_section("grda-resnet20", "gRDA on ResNet-20 / Fashion-MNIST (CPU-sized, sparsity vs accuracy)", body)


if __name__ == "__main__":
    main()
