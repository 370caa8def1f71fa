"""Commands that run and collect studies: reproduce, analyze (directional diagnostics), report."""
from __future__ import annotations

import argparse
import sys

from .base import (
    AddParser,
    Report,
    command,
    data_args,
    device_for,
    key_values,
    model_config_for,
)


@command("reproduce")
def cmd_reproduce(args: argparse.Namespace) -> Report:
    from ..reproduce import StudyOptions, get_study, list_studies

    if args.name == "list":
        names = list_studies()
        return {"studies": names}, lambda: print("\n".join(names))
    options = StudyOptions(checkpoint=args.checkpoint, data_root=args.data_root, device=args.device,
                           epochs=args.epochs, finetune_epochs=args.finetune_epochs, out=args.out, seed=args.seed,
                           progress=not args.json, extra=key_values(args.set, "--set"))
    report, table = get_study(args.name)(options)
    return report, lambda: print(table)


@command("analyze")
def cmd_analyze(args: argparse.Namespace) -> Report:
    """``analyze direction``: gRDA's directional-pruning diagnostics for two solutions (see evidence.direction)."""
    from ..data import get_dataset, make_loader
    from ..evidence.direction import DirectionOptions, analyze_direction, norm_ratio_from_log
    from ..io import load_model

    model_config = model_config_for(args.dataset, key_values(args.model_config, "--model-config")) \
        if args.model else None
    models = {name: load_model(path, model_name=args.model, model_config=model_config)[0]
              for name, path in (("sgd", args.sgd), ("grda", args.grda))}
    options = DirectionOptions(points=args.points, top_k=args.top_k, samples=args.samples,
                               lanczos_iters=args.lanczos_iters, random_draws=args.random_draws,
                               bezier_epochs=args.bezier_epochs, bezier_lr=args.bezier_lr, seed=args.seed,
                               device=device_for(args.device))
    options.check()
    train_set = get_dataset(args.dataset, "train", root=args.data_root, augment=False)
    test_loader = make_loader(get_dataset(args.dataset, "test", root=args.data_root), 500, shuffle=False)
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = analyze_direction(models["sgd"], models["grda"], train_set, test_loader, options, log=log,
                               norm_ratio_logs={"sgd": norm_ratio_from_log(args.sgd),
                                                "grda": norm_ratio_from_log(args.grda)})
    report = {**result.to_dict(), "sgd": str(args.sgd), "grda": str(args.grda), "dataset": args.dataset}

    def render() -> None:
        path = report["path"]
        print(f"direction {args.sgd} (α=0) → {args.grda} (α=1) on {args.dataset}: ‖B−A‖ = {report['distance']:.4g}")
        for name in ("path", "bezier"):
            if report[name]:
                print(f"  {name:<6} α:          " + " ".join(f"{a:7.3f}" for a in report[name]["alpha"]))
                print(f"  {name:<6} train loss: " + " ".join(f"{v:7.4f}" for v in report[name]["train_loss"]))
                print(f"  {name:<6} test acc %: " + " ".join(f"{v:7.2f}" for v in report[name]["test_accuracy"]))
        print(f"  loss barrier on the line: {report['barrier']['path']:.4g} (train loss at ends "
              f"{path['train_loss'][0]:.4g} / {path['train_loss'][-1]:.4g})")
        print(f"  top-{report['top_k']} Hessian eigenvalues at A: " + ", ".join(f"{v:.4g}" for v in report["eigenvalues"]))
        print(f"  projection fraction of B−A on them: {report['projection_fraction']:.4g} (random direction "
              f"{report['random_projection_fraction']:.4g} ± {report['random_projection_fraction_sd']:.2g}; "
              f"√(k/d) = {report['expected_random_fraction']:.4g})")
        print(f"  ‖w‖₂/‖w‖₁ final: A {report['norm_ratio_final']['sgd']:.4g}, B {report['norm_ratio_final']['grda']:.4g}")

    return report, render


@command("report")
def cmd_report(args: argparse.Namespace) -> Report:
    """Collect result JSON files into one markdown page with tables and PNG plots."""
    import shlex

    from ..report.markdown import write_report

    argv = [*args.results, "--out", args.out] + (["--no-plots"] if args.no_plots else [])
    summary = write_report(args.results, args.out, command=shlex.join(["prunekit", "report", *argv]),
                           draw=not args.no_plots)
    report = {"out": str(summary.out), "results": summary.results, "sections": summary.sections,
              "plots": [str(p) for p in summary.plots],
              "skipped": [{"path": p, "reason": why} for p, why in summary.skipped]}

    def render() -> None:
        print(f"wrote {summary.out}: {summary.results} results, {len(summary.plots)} plots, "
              f"{len(summary.skipped)} skipped")
        for title in summary.sections:
            print(f"  ## {title}")

    return report, render


def add_parsers(add: AddParser) -> None:
    """Register this module's sub-commands (``add(name, help)`` returns the sub-parser)."""
    p = add("reproduce", "run a paper study in one command (`prunekit reproduce list` shows them)")
    p.add_argument("name")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for the study's models and results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="study-specific option")
    p = add("analyze", "diagnostics of trained models: `analyze direction` (gRDA vs SGD: paths, Hessian, norms)")
    p.add_argument("kind", choices=["direction"])
    p.add_argument("--sgd", required=True, help="checkpoint A (α = 0; the Hessian is taken here): run dir or file")
    p.add_argument("--grda", required=True, help="checkpoint B (α = 1): run dir or file")
    p.add_argument("--model", default=None, help="architecture; required for legacy .pt/.pth checkpoints")
    data_args(p)
    p.add_argument("--points", type=int, default=21, help="points on the path, α = 0 ... 1")
    p.add_argument("--top-k", type=int, default=10, help="Hessian eigenpairs (Lanczos)")
    p.add_argument("--samples", type=int, default=2000, help="fixed training subset for loss, Hessian, BN stats")
    p.add_argument("--lanczos-iters", type=int, default=None, help="Lanczos iterations (default max(2k, k+30))")
    p.add_argument("--random-draws", type=int, default=10, help="random directions for the reference fraction")
    p.add_argument("--bezier-epochs", type=int, default=0, help="train a quadratic Bézier path for E epochs (0: none)")
    p.add_argument("--bezier-lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)

    p = add("report", "collect result JSON (train/prune/reproduce/compare/analyze) into a markdown page with plots")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="JSON files or directories (searched for *.json)")
    p.add_argument("--out", required=True, help="markdown file, e.g. docs/results.md (plots go to docs/results/)")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
