"""`prunekit` command line: a thin shell over the Python API.

Every command prints a human-readable table, or with ``--json`` exactly one JSON object on stdout
carrying the same numbers (progress bars and notes go to stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import PrunekitError

Report = tuple[dict[str, Any], Callable[[], None]]
#: name → function(args) returning (JSON report, function printing the human table)
COMMANDS: dict[str, Callable[[argparse.Namespace], Report]] = {}


def command(name: str):
    def add(fn):
        COMMANDS[name] = fn
        return fn

    return add


# --------------------------------------------------------------------------- helpers


def _parse_value(text: str) -> Any:
    """``"0.1"`` → 0.1, ``"[1,2]"`` → [1, 2], ``"true"`` → True, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrunekitError(f"{flag} expects KEY=VALUE, got '{pair}'")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_config_for(dataset: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Adapt a zoo model to a dataset's input (channels, size) and class count."""
    from .data import dataset_info

    info = dataset_info(dataset)
    cfg = {"num_classes": info.num_classes, "in_channels": info.input_shape[0], "input_size": info.input_shape[1]}
    cfg.update(extra)
    return cfg


def _size_report(model, input_shape) -> dict[str, int]:
    from .metrics import count_macs, count_params

    return {"params": count_params(model), "macs": count_macs(model, input_shape=tuple(input_shape))}


def _print_table(title: str, rows: dict[str, Any]) -> None:
    width = max(len(k) for k in rows) if rows else 0
    print(title)
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        print(f"  {key:<{width}}  {value}")


# --------------------------------------------------------------------------- commands


@command("models")
def cmd_models(args: argparse.Namespace) -> Report:
    from .metrics import count_params
    from .models import create, list_models

    rows = []
    for name in list_models():
        model = create(name)
        rows.append({"name": name, "params": count_params(model), "input_shape": list(model.input_shape)})
    def render():
        print(f"{'model':<16} {'params':>12}  input")
        for r in rows:
            print(f"{r['name']:<16} {r['params']:>12,}  {'×'.join(map(str, r['input_shape']))}")

    return {"models": rows}, render


@command("datasets")
def cmd_datasets(args: argparse.Namespace) -> Report:
    from .data import dataset_info, list_datasets

    rows = []
    for name in list_datasets():
        info = dataset_info(name)
        rows.append({"name": name, "num_classes": info.num_classes, "input_shape": list(info.input_shape)})
    def render():
        print(f"{'dataset':<16} {'classes':>8}  input")
        for r in rows:
            print(f"{r['name']:<16} {r['num_classes']:>8}  {'×'.join(map(str, r['input_shape']))}")

    return {"datasets": rows}, render


@command("data")
def cmd_data(args: argparse.Namespace) -> Report:
    from .data import fetch

    path = fetch(args.name, args.data_root, allow_apt=not args.no_apt, allow_download=not args.no_download,
                 progress=not args.json)
    return {"dataset": args.name, "root": str(path)}, lambda: print(f"{args.name}: {path}")


@command("train")
def cmd_train(args: argparse.Namespace) -> Report:
    from .data import get_dataset
    from .models import create
    from .recipes import default_recipe_for, get_recipe
    from .train import seed_everything, train

    recipe = get_recipe(args.recipe) if args.recipe else default_recipe_for(args.model)
    overrides = {k: v for k, v in {
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "weight_decay": args.weight_decay, "optimizer": args.optimizer, "momentum": args.momentum,
    }.items() if v is not None}
    overrides.update(_key_values(args.set, "--set"))
    optimizer_kwargs = _key_values(args.opt, "--opt")
    if optimizer_kwargs:
        overrides["optimizer_kwargs"] = {**recipe.optimizer_kwargs, **optimizer_kwargs}
    recipe = recipe.replace(**overrides)

    seed_everything(args.seed)  # the initial weights are part of what --seed reproduces
    model = create(args.model, **_model_config_for(args.dataset, _key_values(args.model_config, "--model-config")))
    train_set = get_dataset(args.dataset, "train", root=args.data_root)
    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    result = train(model, train_set, test_set, recipe, out_dir=Path(args.out), seed=args.seed,
                   resume=args.resume, device=_device(args.device), progress=not args.json,
                   metadata={"dataset": args.dataset})
    report = {"model": args.model, "dataset": args.dataset, "recipe": recipe.name, "epochs": recipe.epochs,
              "seed": args.seed, "accuracy": result.accuracy,
              **_size_report(result.model, test_set[0][0].shape), "checkpoint": str(result.checkpoint_path)}
    return report, lambda: _print_table(f"trained {args.model} on {args.dataset}", report)


@command("eval")
def cmd_eval(args: argparse.Namespace) -> Report:
    from .data import get_dataset, make_loader
    from .io import load_model
    from .metrics import evaluate

    model_config = _model_config_for(args.dataset, _key_values(args.model_config, "--model-config")) \
        if args.model else None
    model, _info = load_model(args.checkpoint, model_name=args.model, model_config=model_config)
    device = _device(args.device)
    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    loader = make_loader(test_set, args.batch_size, shuffle=False)
    metrics = evaluate(model.to(device), loader, device=device)
    report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset,
              "accuracy": round(metrics["accuracy"], 4), "top5": metrics.get("top5"), "loss": metrics["loss"],
              "samples": metrics["samples"], **_size_report(model.cpu(), test_set[0][0].shape)}
    return report, lambda: _print_table(f"evaluated {args.checkpoint} on {args.dataset} (test split)", report)


@command("prune")
def cmd_prune(args: argparse.Namespace) -> Report:
    import torch

    from .data import get_dataset, make_loader
    from .io import load_model, save_model
    from .methods import PruneOptions, get_method
    from .metrics import evaluate, measure_latency

    method = get_method(args.method)
    options = PruneOptions(ratio=args.ratio, criterion=args.criterion, scope=args.scope, rounding=args.rounding,
                           ignored=tuple(args.ignore or ()),
                           overrides={k: float(v) for k, v in _key_values(args.override, "--override").items()},
                           include_bias=args.include_bias, seed=args.seed)
    model_config = _model_config_for(args.dataset, _key_values(args.model_config, "--model-config")) \
        if args.model else None
    model, _ = load_model(args.checkpoint, model_name=args.model, model_config=model_config)
    model.eval()
    device = _device(args.device)
    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    loader = make_loader(test_set, args.batch_size, shuffle=False)
    sample_shape = tuple(test_set[0][0].shape)
    example = torch.zeros(1, *sample_shape)
    latency_input = torch.randn(args.latency_batch, *sample_shape, generator=torch.Generator().manual_seed(0))

    def measure(m) -> dict[str, Any]:
        m = m.to(device)
        acc = evaluate(m, loader, device=device)["accuracy"]
        lat = measure_latency(m, latency_input, runs=args.latency_runs, device=device).median_ms
        return {"accuracy": round(acc, 4), "latency_ms": lat, **_size_report(m.cpu(), sample_shape)}

    before = measure(model)
    result = method(model.cpu(), example, options)
    after = measure(result.model)
    report = {"method": args.method, "criterion": args.criterion, "ratio": args.ratio, "scope": args.scope,
              "dataset": args.dataset, **after,
              **{f"{k}_before": v for k, v in before.items()},
              "params_reduction": 1 - after["params"] / before["params"],
              "macs_reduction": 1 - after["macs"] / before["macs"],
              "latency_batch": args.latency_batch, **result.details}
    if args.out:
        report["checkpoint"] = str(save_model(Path(args.out), result.model, metadata={
            "pruned_from": str(args.checkpoint), **{k: report[k] for k in ("method", "criterion", "ratio", "scope",
                                                                         "dataset", "accuracy")}}))
    return report, lambda: _print_table(f"{args.method} {args.checkpoint} (ratio {args.ratio}, {args.criterion})",
                                        report)


@command("reproduce")
def cmd_reproduce(args: argparse.Namespace) -> Report:
    from .reproduce import StudyOptions, get_study, list_studies

    if args.name == "list":
        names = list_studies()
        return {"studies": names}, lambda: print("\n".join(names))
    options = StudyOptions(checkpoint=args.checkpoint, data_root=args.data_root, device=args.device,
                           epochs=args.epochs, finetune_epochs=args.finetune_epochs, out=args.out, seed=args.seed,
                           progress=not args.json, extra=_key_values(args.set, "--set"))
    report, table = get_study(args.name)(options)
    return report, lambda: print(table)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        return p

    add("models", "list the model zoo")
    add("datasets", "list the datasets")

    p = add("data", "obtain a dataset: local cache, Debian package, or official download")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("name")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-apt", action="store_true", help="never try apt-get")
    p.add_argument("--no-download", action="store_true", help="never download")

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", required=True)
        p.add_argument("--data-root", default=None, help="dataset directory (default: $PRUNEKIT_DATA, cache, system)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--model-config", action="append", metavar="KEY=VALUE",
                       help="model constructor option, e.g. shortcut=B or widths=[300,100]")

    p = add("train", "train a zoo model with a named recipe (DDP under torchrun)")
    p.add_argument("--model", required=True)
    data_args(p)
    p.add_argument("--recipe", default=None, help="lenet, cifar, fast ... (default: by model)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, help="global batch size (split across DDP ranks)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--optimizer")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="extra optimizer option")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe field")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, model.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last if present")

    p = add("eval", "evaluate a checkpoint (ours or a legacy .pth) on a test set")
    p.add_argument("--model", default=None, help="architecture; required for legacy .pth checkpoints")
    p.add_argument("--checkpoint", required=True)
    data_args(p)
    p.add_argument("--batch-size", type=int, default=256)

    from .methods import list_methods

    p = add("prune", "prune a checkpoint physically (method, criterion, ratio) and measure the result")
    p.add_argument("--model", default=None, help="architecture; required for legacy .pth checkpoints")
    p.add_argument("--checkpoint", required=True)
    data_args(p)
    p.add_argument("--method", default="prune", choices=list_methods())
    p.add_argument("--criterion", default="l1-norm", help="l1-norm, l2-norm, l2-GM, bn-scale, random")
    p.add_argument("--ratio", type=float, required=True, help="fraction of each group's channels removed, [0, 1)")
    p.add_argument("--scope", default="local", choices=["local", "global"])
    p.add_argument("--rounding", default="round", choices=["round", "floor"])
    p.add_argument("--ignore", action="append", metavar="MODULE", help="protect a module (name or pattern)")
    p.add_argument("--override", action="append", metavar="MODULE=RATIO", help="per-module ratio")
    p.add_argument("--include-bias", action="store_true", help="score rows as [w | b] (Neuron Merging, FC)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--latency-batch", type=int, default=8, help="batch size of the latency measurement")
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--out", default=None, help="directory for the pruned model (safetensors + JSON record)")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import distributed

    args = build_parser().parse_args(argv)
    try:
        report, render = COMMANDS[args.command](args)
        is_main = distributed.is_main()  # ask before cleanup: afterwards every rank looks like rank 0
    except PrunekitError as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    if is_main:
        if args.json:
            print(json.dumps(report, default=str))
        else:
            render()
    return 0


if __name__ == "__main__":  # `python -m prunekit.cli` (used by torchrun)
    sys.exit(main())
