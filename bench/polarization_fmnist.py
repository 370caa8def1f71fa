"""Polarization vs network slimming vs l1-norm on Fashion-MNIST / ResNet-20, through the user's command.

Runs ``prunekit reproduce polarization-resnet20-fmnist --json`` (the same code path a user runs; stages
are reused from ``--out`` when they exist), copies the factor histogram to docs/, checks the targets, and
writes the ``polarization-fmnist`` section of BENCHMARKS.md.

    .venv/bin/python bench/polarization_fmnist.py [--epochs 5] [--finetune-epochs 2] [--threads 1]
        [--out runs/polarization-resnet20-fmnist] [--set lam=5e-4 --set t=1.0 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, write_section


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the run (1: a shared CPU)")
    ap.add_argument("--out", default="runs/polarization-resnet20-fmnist")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "prunekit", "reproduce", "polarization-resnet20-fmnist", "--json", "--out", args.out]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if args.finetune_epochs is not None:
        cmd += ["--finetune-epochs", str(args.finetune_epochs)]
    for s in args.set:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    user_cmd = " ".join(["OMP_NUM_THREADS=" + str(args.threads), ".venv/bin/prunekit", *cmd[3:]])
    print(user_cmd, file=sys.stderr)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    (ROOT / args.out / "report.json").write_text(json.dumps(r, indent=1))

    docs_png = ROOT / "docs" / "polarization_histogram.png"
    if r.get("histogram"):
        shutil.copyfile(ROOT / r["histogram"] if not Path(r["histogram"]).is_absolute() else r["histogram"], docs_png)

    def pct(v):
        return f"{100 * v:.1f} %"

    base = r["accuracy_baseline"]
    rows = [["baseline (no regularizer)", "0", "—", "—", f"{base:.2f}", "—"],
            ["polarization (valley)", pct(r["macs_reduction"]), f"{r['accuracy_regularized']:.2f}",
             f"{r['accuracy_pruned']:.2f}", f"{r['accuracy_finetuned']:.2f}", f"{r['accuracy_finetuned'] - base:+.2f}"]]
    if "slimming" in r:
        s = r["slimming"]
        rows.append([f"network slimming (λ={s['lam']:g}, global percentile)", pct(s["macs_reduction"]),
                     f"{s['accuracy_regularized']:.2f}", f"{s['accuracy_pruned']:.2f}",
                     f"{s['accuracy_finetuned']:.2f}", f"{s['accuracy_finetuned'] - base:+.2f}"])
    if "l1" in r:
        s = r["l1"]
        rows.append([f"l1-norm of the baseline (ratio {s['channel_ratio']:.2f} per group)", pct(s["macs_reduction"]),
                     "—", f"{s['accuracy_pruned']:.2f}", f"{s['accuracy_finetuned']:.2f}",
                     f"{s['accuracy_finetuned'] - base:+.2f}"])
    table = markdown_table(["method", "MACs ↓", "regularized", "pruned, no fine-tune", "fine-tuned", "Δ vs baseline"],
                           rows)
    drop = r["accuracy_regularized"] - r["accuracy_pruned"]
    checks = [
        ("MACs reduction at the valley ≥ 45 %", r["macs_reduction"] >= 0.45, pct(r["macs_reduction"])),
        ("pruning costs ≤ 0.3 points before fine-tuning", drop <= 0.3, f"{drop:+.2f} points"),
        ("fine-tuned within 0.5 points of the baseline", base - r["accuracy_finetuned"] <= 0.5,
         f"{r['accuracy_finetuned'] - base:+.2f} points"),
    ]
    check_lines = "\n".join(f"- {'PASS' if ok else 'MISS'}: {what} ({val})" for what, ok, val in checks)
    secs = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r.get("seconds", {}).items())
    body = f"""Model ResNet-20 (option A shortcuts, 0.27 M params, {r['macs_baseline']:,} MACs at 1×28×28), Fashion-MNIST
(full 60k/10k). CPU recipe `polarization-fmnist`: {r['epochs']} epochs SGD 0.9, lr 0.1 cosine, batch 128, wd 5e-4
(BN included); fine-tune `polarization-fmnist-finetune`: {r['finetune_epochs']} epochs, lr 0.01 cosine, for every
pruned model alike. Polarization λ={r['lam']:g}, t={r['t']:g}, BN γ initialised to 0.5, factors = preset
`{r['preset']}`; threshold `{r['threshold']}` (per-group histogram valley), coupled groups combined by
`{r['combine']}`. Slimming and l1-norm are pruned to the same MACs reduction as polarization.

Command (what the script runs): `{user_cmd}`

{table}

{check_lines}

MACs reduction the threshold would give after each polarization epoch: {r['macs_reduction_per_epoch']}.
Channels removed: {r['prune']['channels_removed']} of {r['prune']['channels_prunable']} prunable; groups that
fell back (no valley): {r['prune']['fallback_groups'] or 'none'}. Wall time per stage: {secs}.

![factor histograms](docs/polarization_histogram.png)
"""
    print(body)
    if not args.no_write:
        write_section("polarization-fmnist", "Polarization on Fashion-MNIST / ResNet-20 (CPU)", body)


if __name__ == "__main__":
    main()
