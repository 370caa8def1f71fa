"""Compensated pruning of transformers on real data: the ``vit-fmnist`` and ``llama-shakespeare`` studies.

Runs ``prunekit reproduce NAME --json`` (or, with ``--reuse``, reads ``runs/NAME/results.json`` written by an
earlier run of the same command) and writes the study's BENCHMARKS.md section: the table, the must-reach
checks (the issue's targets), and the plot path.

    .venv/bin/python bench/transformers_studies.py llama-shakespeare [--reuse] [--set KEY=VALUE ...]
    .venv/bin/python bench/transformers_studies.py vit-fmnist [--reuse]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_section

TITLES = {
    "llama-shakespeare": "Transformers on real data: byte-level Llama (GQA) on Shakespeare, no fine-tuning (CPU)",
    "vit-fmnist": "Transformers on real data: ViT on Fashion-MNIST, no fine-tuning (CPU)",
}


def run_study(name: str, sets: list[str], reuse: bool) -> dict:
    path = ROOT / "runs" / name / "results.json"
    if reuse and path.exists():
        return json.loads(path.read_text())
    cmd = [str(ROOT / ".venv" / "bin" / "prunekit"), "reproduce", name, "--json"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout  # progress: stderr
    return json.loads(out)


RIVALS = ("magnitude", "wanda-sp", "flap", "flap-adaptive", "torch-pruning")
OURS = ("reconstruct", "reconstruct-global", "lstsq", "merge")


def checks(report: dict) -> list[str]:
    """The issue's must-reach lines, measured in this report."""
    rows = [r for r in report["rows"] if not r.get("finetune_steps") and r.get("target") == "heads+mlp"]
    lines = []
    if "dense_perplexity" in report:
        dense = report["dense_perplexity"]
        for removed, limit in ((0.2, 1.10), (0.5, 2.0)):
            at = {r["method"]: r["perplexity"] for r in rows if r["removed"] == removed}
            if not at:
                continue
            best = min(at, key=at.get)
            ok = at[best] <= limit * dense
            others = {m: v for m, v in at.items() if m in RIVALS or (m in OURS and m != best)}
            lines.append(f"- {int(100 * removed)} % removed: best `{best}` {at[best]:.3f} = "
                         f"{at[best] / dense:.3f}× dense (target ≤ {limit}×: {'met' if ok else 'missed'}); "
                         + ", ".join(f"{m} {v:.3f} ({v / dense:.2f}×)" for m, v in sorted(others.items())))
    else:
        base = report["baseline_accuracy"]
        far = [r for r in report["rows"] if not r.get("finetune_steps") and r["macs_reduction"] >= 0.40]
        ours = [r for r in far if r["method"].split("+")[0] in OURS]
        if ours:
            best = max(ours, key=lambda r: r["accuracy"])
            rivals = {}
            for r in far:
                name = r["method"].split("+")[0]
                if name in RIVALS:
                    rivals[name] = max(rivals.get(name, r), r, key=lambda q: q["accuracy"])
            gap = base - best["accuracy"]
            lines.append(f"- ≥ 40 % MACs removed: best prunekit row `{best['method']}` at {best['removed']} removed "
                         f"({100 * best['macs_reduction']:.1f} % MACs): {best['accuracy']:.2f} % vs baseline "
                         f"{base:.2f} % (gap {gap:.2f}, target ≤ 2.0: {'met' if gap <= 2.0 else 'missed'}); best of "
                         "the others at ≥ 40 % MACs: " + ", ".join(
                             f"{m} {r['accuracy']:.2f} (`{r['method']}` {r['removed']}, "
                             f"{100 * r['macs_reduction']:.1f} % MACs)" for m, r in sorted(rivals.items())))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=sorted(TITLES))
    ap.add_argument("--reuse", action="store_true", help="read runs/STUDY/results.json instead of running it")
    ap.add_argument("--set", action="append", default=[], help="study option KEY=VALUE (passed to reproduce)")
    args = ap.parse_args()
    report = run_study(args.study, args.set, args.reuse)
    sys.path.insert(0, str(ROOT / "src"))
    from prunekit.studies.transformers import study_table

    sets = "".join(f" --set {s}" for s in args.set)
    body = (f"The study's command: `prunekit reproduce {args.study} --json{sets}` (baseline trained by the study's "
            f"recipe and cached in `runs/{args.study}/baseline`).\n\n" + study_table(report)
            + "\n\nTargets of the issue, measured in this run:\n\n" + "\n".join(checks(report)))
    if report.get("plot"):
        body += f"\n\nPlot: `{report['plot']}`."
    write_section(f"transformers-{args.study}", TITLES[args.study], body)
    print("\n".join(checks(report)))


if __name__ == "__main__":
    main()
