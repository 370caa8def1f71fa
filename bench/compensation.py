"""Compensation without fine-tuning: the ResNet-20 study, a clean timing of reconstruct vs lstsq, LeNet.

1. ``prunekit reproduce compensation-resnet20-fmnist --json`` (the user's command; ``--reuse`` reads an
   existing ``OUT/report.json`` instead of running it) → table, plot ``docs/img/compensation-resnet20-fmnist.png``;
2. timing on the same checkpoint, ratio 0.5, 1,000 calibration images: ``lstsq``, ``reconstruct`` (defaults)
   and ``reconstruct`` with ``layers=consumers``, alternated ``--repeats`` times in one process on a quiet
   machine; medians and the ratio to lstsq (the study's own ``method_seconds`` are single runs);
3. the official Neuron Merging LeNet-300-100 checkpoint (``../shared/checkpoints``): prune / merge / lstsq /
   reconstruct (defaults) at ratios 0.5–0.8.

Writes the ``compensation`` section of BENCHMARKS.md. With ``--vgg``: only the ``compensation-vgg16``
section, from the report of ``prunekit reproduce compensation-vgg16-fmnist --checkpoint runs/nm-fmnist/vgg16/model
--set 'sweep=[]' --json > runs/compensation-vgg16-fmnist/report.json`` (the quarter-width VGG-16 of
``bench/nm_train_convnets.py``).

    .venv/bin/python bench/compensation.py --checkpoint runs/r20-fmnist-t1/model [--reuse] [--repeats 3] [--seeds 4]
    .venv/bin/python bench/compensation.py --vgg

The checkpoint is the issue's: ``OMP_NUM_THREADS=1 prunekit train --model resnet20 --dataset fashion-mnist --recipe
polarization-fmnist --seed 0 --device cpu --out runs/r20-fmnist-t1`` (93.21 %; its prune / merge / lstsq rows equal
the issue's table to the digit). A CPU run's result depends on the thread count: with two threads the same command
gives 92.91 % (``runs/r20-fmnist``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, write_section

from prunekit.studies.compensation import row_label

OUT = "runs/compensation-resnet20-fmnist"
LENET = ROOT.parent / "shared" / "checkpoints" / "neuron-merging-lenet300-fashionmnist.pth.tar"


def run_study(args) -> dict:
    report_path = ROOT / args.out / "report.json"
    if args.reuse and report_path.exists():
        return json.loads(report_path.read_text())
    cmd = [sys.executable, "-m", "prunekit", "reproduce", "compensation-resnet20-fmnist", "--json", "--out", args.out,
           "--set", f"repeats={args.seeds}"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report_path.write_text(json.dumps(report, indent=1))
    return report


def timing(checkpoint: str, repeats: int) -> dict[str, list[float]]:
    import torch

    from prunekit.data import get_dataset
    from prunekit.io import load_model
    from prunekit.methods import PruneOptions, get_method

    model, _ = load_model(checkpoint)
    model.eval()
    train = get_dataset("fashion-mnist", "train", augment=False)
    example = torch.zeros(1, 1, 28, 28)
    variants = {"lstsq": ("lstsq", {}), "reconstruct": ("reconstruct", {}),
                "reconstruct layers=consumers": ("reconstruct", {"layers": "consumers"})}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for label, (method, extra) in variants.items():
            opts = PruneOptions(ratio=0.5, calibration_data=train,
                                method_options={"preset": "resnet", "calibration": 1000, **extra})
            start = time.perf_counter()
            get_method(method)(model, example, opts)
            times[label].append(time.perf_counter() - start)
    return times


def lenet_rows() -> list[list]:
    import torch

    from prunekit.data import get_dataset, make_loader
    from prunekit.io import load_model
    from prunekit.methods import PruneOptions, get_method
    from prunekit.metrics import count_params, evaluate

    model, _ = load_model(str(LENET), model_name="lenet-300-100")
    model.eval()
    train = get_dataset("fashion-mnist", "train", augment=False)
    loader = make_loader(get_dataset("fashion-mnist", "test"), 1000, shuffle=False)
    example = torch.zeros(1, 1, 28, 28)
    rows = []
    for ratio in (0.5, 0.6, 0.7, 0.8):
        row = [ratio]
        for method, extra, scope in (("merge", {"model_type": "prune"}, "local"), ("merge", {}, "local"),
                                     ("lstsq", {}, "local"), ("reconstruct", {}, "local"),
                                     ("reconstruct", {}, "global")):
            opts = PruneOptions(ratio=ratio, scope=scope, calibration_data=train,
                                method_options={"preset": "lenet-300-100", **extra})
            small = get_method(method)(model, example, opts).model
            row.append(f"{evaluate(small, loader)['accuracy']:.2f}")
        row.append(f"{count_params(small):,}")
        rows.append(row)
    return rows


def study_rows(report: dict) -> list[list]:
    base = report["baseline_accuracy"]
    return [[row_label(r), r["ratio"], f"{100 * r['macs_reduction']:.1f} %", f"{r['accuracy']:.2f}",
             f"{r['accuracy'] - base:+.2f}", r.get("finetune_epochs", 0)] for r in report["rows"]]


HEADER = ["method", "ratio", "MACs removed", "accuracy", "Δ baseline", "fine-tune epochs"]


def write_vgg() -> None:
    report = json.loads((ROOT / "runs" / "compensation-vgg16-fmnist" / "report.json").read_text())
    body = [(f"Quarter-width VGG-16 (`bench/nm_train_convnets.py`, 5 epochs) on Fashion-MNIST, baseline "
            f"**{report['baseline_accuracy']:.2f} %**; general mode: every prunable group (13 convs + "
            "classifier.0) at the ratio, l1-norm; **no fine-tuning** except the Torch-Pruning rows "
            "(Torch-Pruning: every conv/linear but the classifier at the ratio); 1,000 unlabeled training "
            "images. Study command: `prunekit reproduce compensation-vgg16-fmnist --checkpoint "
            "runs/nm-fmnist/vgg16/model --set 'sweep=[]' --json`."), "",
            markdown_table(HEADER, study_rows(report))]
    write_section("compensation-vgg16", "Compensation without fine-tuning: quarter-width VGG-16 (CPU)",
                  "\n".join(body))
    print("\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vgg", action="store_true", help="only the VGG-16 section, from its study report")
    ap.add_argument("--checkpoint", default="runs/r20-fmnist-t1/model")
    ap.add_argument("--seeds", type=int, default=4, help="the study's repeats: seeds of reconstruct and of "
                    "Torch-Pruning + 1 epoch at ratio 0.5")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--reuse", action="store_true", help="read OUT/report.json instead of running the study")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.vgg:
        return write_vgg()
    report = run_study(args)
    if report.get("plot"):
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / report["plot"] if not Path(report["plot"]).is_absolute() else report["plot"],
                        ROOT / "docs" / "img" / "compensation-resnet20-fmnist.png")
    base = report["baseline_accuracy"]
    rows = study_rows(report)
    sweep = [[r["calibration"], f"{r['accuracy']:.2f}", f"{r['method_seconds']:.1f}"] for r in report["sweep"]]
    times = timing(args.checkpoint, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    trows = [[k, f"{med[k]:.1f}", f"{med[k] / med['lstsq']:.2f}×", ", ".join(f"{t:.1f}" for t in v)]
             for k, v in times.items()]
    body = [(f"ResNet-20 (option A) on Fashion-MNIST, baseline **{base:.2f} %** "
            f"({report['baseline'].get('checkpoint')}); every block's conv1 pruned (preset `resnet`, l1-norm), "
            "**no fine-tuning** except the Torch-Pruning rows; 1,000 unlabeled training images; test set of "
            "10,000. Command of the study: `prunekit reproduce compensation-resnet20-fmnist --checkpoint "
            f"{args.checkpoint} --set repeats={args.seeds} --json` (what the script runs). Plot: `docs/img/compensation-resnet20-fmnist.png`."),
            "", markdown_table(HEADER, rows),
            *(["", (f"Seeds at ratio 0.5 (`--set repeats={args.seeds}`): reconstruct on calibration subsets 0 … "
                    f"{args.seeds - 1}, Torch-Pruning + 1 epoch with fine-tuning seeds 0 … {args.seeds - 1}:"), "",
               markdown_table(["method", "fine-tune epochs", "runs", "mean", "sd", "accuracies"],
                              [[r["method"], r["finetune_epochs"], r["n"], f"{r['mean']:.2f}", f"{r['sd']:.2f}",
                                ", ".join(f"{a:.2f}" for a in r["accuracies"])] for r in report["repeats"]])]
              if report.get("repeats") else []),
            "", "Calibration-size sweep (`reconstruct`, ratio 0.5; seconds are single runs of the study):", "",
            markdown_table(["calibration images", "accuracy", "method s"], sweep),
            "", (f"Method time at ratio 0.5 and 1,000 images, {args.repeats} alternating repetitions in one process "
            "(median; deciding + compensating, no evaluation):"), "",
            markdown_table(["method", "median s", "vs lstsq", "runs"], trows)]
    if LENET.exists():
        body += ["", ("Official Neuron Merging LeNet-300-100 checkpoint (89.80 %), preset `lenet-300-100`, no "
                 "fine-tuning; lstsq / reconstruct on 1,000 unlabeled training images (defaults; the last two "
                 "columns: `--scope global`, the same MACs spent across the two layers where the refit loses least, "
                 "and its parameter count — the uniform plans keep 125,810 / 99,450 / 73,690 / 48,530):"), "",
                 markdown_table(["ratio", "prune", "merge", "lstsq", "reconstruct", "reconstruct --scope global",
                                 "params (global)"], lenet_rows())]
    write_section("compensation", "Compensation without fine-tuning: reconstruct vs lstsq vs merge vs "
                  "Torch-Pruning (CPU)", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
