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
    from .regularizers import _load_builtin_regularizers
    from .train import seed_everything, train

    _load_builtin_regularizers()  # method packages register their recipes (e.g. polarization-fmnist)
    recipe = get_recipe(args.recipe) if args.recipe else default_recipe_for(args.model)
    overrides = {k: v for k, v in {
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "weight_decay": args.weight_decay, "optimizer": args.optimizer, "momentum": args.momentum,
    }.items() if v is not None}
    overrides.update(_key_values(args.set, "--set"))
    optimizer_kwargs = _key_values(args.opt, "--opt")
    optimizer_kwargs.update({k: v for k, v in (("c", args.grda_c), ("mu", args.grda_mu)) if v is not None})
    if optimizer_kwargs:
        overrides["optimizer_kwargs"] = {**recipe.optimizer_kwargs, **optimizer_kwargs}
    recipe = recipe.replace(**overrides)

    seed_everything(args.seed)  # the initial weights are part of what --seed reproduces
    model = create(args.model, **_model_config_for(args.dataset, _key_values(args.model_config, "--model-config")))
    train_set = get_dataset(args.dataset, "train", root=args.data_root)
    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    callbacks = []
    if recipe.optimizer == "grda":  # gRDA's sparsity is its result: log it every epoch
        from .callbacks import SparsityLogger

        callbacks.append(SparsityLogger(verbose=not args.json))
    regularizers = _train_regularizers(args, model, callbacks)
    result = train(model, train_set, test_set, recipe, out_dir=Path(args.out), seed=args.seed,
                   resume=args.resume, device=_device(args.device), progress=not args.json,
                   metadata={"dataset": args.dataset}, callbacks=callbacks, regularizers=regularizers)
    report = {"model": args.model, "dataset": args.dataset, "recipe": recipe.name, "epochs": recipe.epochs,
              "seed": args.seed, "accuracy": result.accuracy,
              **_size_report(result.model, test_set[0][0].shape), "checkpoint": str(result.checkpoint_path)}
    if callbacks and result.history:
        report.update({k: result.history[-1][k] for k in ("sparsity", "weight_sparsity") if k in result.history[-1]})
    if regularizers:
        report["regularizer"] = regularizers[0].state_dict()
        if result.history and "macs_reduction" in result.history[-1]:
            report["macs_reduction_at_threshold"] = result.history[-1]["macs_reduction"]
    return report, lambda: _print_table(f"trained {args.model} on {args.dataset}", report)


def _train_regularizers(args: argparse.Namespace, model, callbacks: list) -> list:
    """``--regularizer polarization|slimming --reg-lambda L [--reg-t T] [--reg-bn-init 0.5]``."""
    if not args.regularizer or args.regularizer == "none":
        return []
    from .regularizers import create_regularizer

    if args.reg_lambda is None:
        raise PrunekitError(f"--regularizer {args.regularizer} needs --reg-lambda")
    kw = {"lam": args.reg_lambda, "preset": args.reg_preset, "bn_init": args.reg_bn_init}
    if args.regularizer == "polarization":
        kw.update({"t": 1.2 if args.reg_t is None else args.reg_t, "a": args.reg_a})
        from .polarization import FlopsMonitor  # logs the MACs reduction the threshold gives, every epoch

        callbacks.append(FlopsMonitor(verbose=not args.json))
    elif args.reg_t is not None:
        raise PrunekitError(f"--reg-t is a polarization option; regularizer '{args.regularizer}' has no t")
    return [create_regularizer(args.regularizer, model, **kw)]


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
    if args.ratio is None and getattr(method, "needs_ratio", True):
        raise PrunekitError(f"method '{args.method}' needs --ratio (fraction of each group's channels removed)")
    options = PruneOptions(ratio=PruneOptions.ratio if args.ratio is None else args.ratio, criterion=args.criterion,
                           scope=args.scope, rounding=args.rounding, ignored=tuple(args.ignore or ()),
                           overrides={k: float(v) for k, v in _key_values(args.override, "--override").items()},
                           include_bias=args.include_bias, seed=args.seed, threshold=args.threshold,
                           method_options={**{k: v for k, v in (("lam", args.lam), ("bn_scale", args.bn_scale),
                                                                ("preset", args.preset),
                                                                ("calibration", args.calibration)) if v is not None},
                                           **_key_values(args.method_option, "--method-option")},
                           calibration_data=lambda: get_dataset(args.dataset, "train", root=args.data_root,
                                                                augment=False))
    model_config = _model_config_for(args.dataset, _key_values(args.model_config, "--model-config")) \
        if args.model else None
    model, info = load_model(args.checkpoint, model_name=args.model, model_config=model_config)
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
    if args.evidence_samples:  # before any fine-tuning: what the pruning itself preserved
        report["preservation"] = _preservation(model, result.model, test_set, args.evidence_samples,
                                               args.batch_size, device)
    if args.finetune_epochs:
        ft = _finetune(args, result.model, (info.get("arch") or {}).get("name") or args.model, test_set, device)
        report.update({"accuracy_finetuned": round(ft.accuracy, 4), "finetune_epochs": ft.epochs,
                       "finetune_recipe": ft.extra.get("recipe")})
        result.model = ft.model.cpu()
    if args.out:
        report["checkpoint"] = str(save_model(Path(args.out), result.model, metadata={
            "pruned_from": str(args.checkpoint), **{k: report[k] for k in ("method", "criterion", "ratio", "scope",
                                                                         "dataset", "accuracy")}}))
    def render() -> None:
        _print_table(f"{args.method} {args.checkpoint} (ratio {args.ratio}, {args.criterion})",
                     {k: v for k, v in report.items() if k not in ("groups", "preservation")})
        if "preservation" in report:
            _print_preservation(report["preservation"])
        groups = report.get("groups")  # per-group report of merge/lstsq (plain prune: just a count)
        for g in groups if isinstance(groups, list) else []:
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in g.items()))

    return report, render


def _finetune(args: argparse.Namespace, model, arch: str | None, test_set, device: str):
    """Fine-tune a pruned model (any method) for ``--finetune-epochs`` with ``--finetune-recipe``, or the
    model family's default recipe at ``--finetune-lr`` with a cosine schedule."""
    from .data import get_dataset
    from .recipes import default_recipe_for, get_recipe
    from .regularizers import _load_builtin_regularizers
    from .train import train

    _load_builtin_regularizers()  # registers the method packages' recipes
    if args.finetune_recipe:
        recipe = get_recipe(args.finetune_recipe).replace(epochs=args.finetune_epochs)
    else:
        recipe = default_recipe_for(arch or "").replace(epochs=args.finetune_epochs, lr=args.finetune_lr,
                                                        schedule="cosine", milestones=(), name="finetune")
    train_set = get_dataset(args.dataset, "train", root=args.data_root)
    out = Path(args.out) / "finetune" if args.out else None
    return train(model, train_set, test_set, recipe, out_dir=out, seed=args.seed, device=device,
                 progress=not args.json, metadata={"dataset": args.dataset, "stage": "finetune"})


def _preservation(original, other, dataset, samples: int, batch_size: int, device: str) -> dict[str, Any]:
    """Feature-map preservation of ``other`` w.r.t. ``original`` on the first ``samples`` inputs."""
    from .evidence import feature_preservation

    if samples < 1:
        raise PrunekitError(f"the number of evidence samples must be >= 1 (0 disables it), got {samples}")
    return feature_preservation(original, other, dataset, max_samples=samples, batch_size=batch_size,
                                device=device)


def _print_preservation(p: dict[str, Any]) -> None:
    _print_table(f"feature preservation on {p['samples']:,} inputs (reference vs compared model)",
                 {k: p[k] for k in ("output_relative_l2", "ware", "agreement", "kl", "layers_skipped")})
    for layer in p["layers"]:
        print(f"    {layer['name']:<32} relative L2 {layer['relative_l2']:.4g}")


def _load_any(path: str, args: argparse.Namespace):
    """A prunekit model directory (structure from its JSON) or a legacy ``.pth`` file (needs ``--model``)."""
    from .io import load_model

    p = Path(path)
    if p.is_file() and p.suffix not in (".json", ".safetensors"):
        if not args.model:
            raise PrunekitError(f"{path} is a legacy checkpoint: pass --model ARCH (e.g. lenet-300-100)")
        cfg = _model_config_for(args.dataset, _key_values(args.model_config, "--model-config"))
        return load_model(p, model_name=args.model, model_config=cfg)[0]
    return load_model(p)[0]


@command("compare")
def cmd_compare(args: argparse.Namespace) -> Report:
    """Accuracy of two checkpoints and how well B preserves A's features and outputs on the same inputs."""
    from torch.utils.data import Subset

    from .data import get_dataset, make_loader
    from .metrics import evaluate

    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    samples = len(test_set) if args.samples is None else args.samples
    if samples < 1:
        raise PrunekitError(f"--samples must be >= 1, got {samples}")
    samples = min(samples, len(test_set))
    model_a, model_b = _load_any(args.a, args), _load_any(args.b, args)
    device = _device(args.device)
    subset = test_set if samples == len(test_set) else Subset(test_set, range(samples))
    loader = make_loader(subset, args.batch_size, shuffle=False)
    accuracy = [round(evaluate(m, loader, device=device)["accuracy"], 4) for m in (model_a, model_b)]
    report = {"kind": "compare", "a": str(args.a), "b": str(args.b), "dataset": args.dataset,
              "accuracy_a": accuracy[0], "accuracy_b": accuracy[1],
              **_preservation(model_a, model_b, test_set, samples, args.batch_size, device)}

    def render() -> None:
        _print_table(f"compare {args.a} (A, reference) with {args.b} (B) on {args.dataset}",
                     {"accuracy_a": accuracy[0], "accuracy_b": accuracy[1]})
        _print_preservation(report)

    return report, render


@command("sparsify")
def cmd_sparsify(args: argparse.Namespace) -> Report:
    """Export a model with exact zeros (gRDA): remove dead channels, store the rest sparse, time kernels."""
    import torch

    from .errors import CheckpointError, ConfigError
    from .io import load_model
    from .sparse import export

    path = Path(args.checkpoint)
    if not (path.exists() or Path(f"{path}.json").exists()):
        raise CheckpointError(f"{path}: no such checkpoint (give a run directory holding model.safetensors + "
                              "model.json, either file of the pair, or a legacy .pt/.pth with --model)")
    extra = _key_values(args.model_config, "--model-config")
    model_config = (_model_config_for(args.dataset, extra) if args.dataset else extra) if args.model else None
    model, _info = load_model(path, model_name=args.model, model_config=model_config)
    loader = None
    if args.dataset:
        from .data import dataset_info, get_dataset, make_loader

        input_shape = tuple(dataset_info(args.dataset).input_shape)
        loader = make_loader(get_dataset(args.dataset, "test", root=args.data_root), args.batch_size, shuffle=False)
    elif getattr(model, "input_shape", None) is not None:
        input_shape = tuple(model.input_shape)
    else:
        raise ConfigError("the model records no input_shape: pass --dataset")
    torch.set_num_threads(args.threads)
    report = {"checkpoint": str(path), "threads": args.threads, **export(
        model.cpu(), Path(args.out), input_shape=input_shape, batch_sizes=args.latency_batch or (1, 32, 256),
        runs=args.latency_runs, loader=loader, metadata={"sparsified_from": str(path)}, seed=args.seed)}
    if report.get("note") and not args.json:
        print(f"prunekit sparsify: note: {report['note']}", file=sys.stderr)

    def render() -> None:
        _print_table(f"sparsified {path} → {args.out}", {k: v for k, v in report.items() if not isinstance(v, dict)})
        for name, g in report["removed_channels"].items():
            print(f"  removed from {name}: {g['removed']}/{g['size']} channels "
                  f"({g['constant']} constant, {g['unused']} unused)")
        print(f"  {'batch':>6} {'original ms':>12} {'dense ms':>10} {'sparse ms':>10}  sparse layers")
        for b, dense in report["latency_dense_ms"].items():
            print(f"  {b:>6} {report['latency_original_ms'][b]:>12.4f} {dense:>10.4f} "
                  f"{report['latency_sparse_ms'][b]:>10.4f}  {', '.join(report['sparse_layers'][b]) or '-'}")

    return report, render


@command("search")
def cmd_search(args: argparse.Namespace) -> Report:
    """Algorithm 1 (Polarization): bisect λ, then step t, with short trainings, to a FLOPs target."""
    from .polarization.search import search_lambda_t, training_trial
    from .polarization.studies import StudySpec
    from .reproduce import StudyOptions

    if args.method != "polarization":
        raise PrunekitError(f"search supports --method polarization only, got '{args.method}'")
    recipe = args.recipe or "polarization-fmnist"
    spec = StudySpec(model=args.model, dataset=args.dataset, lam=args.lam_max, t=args.t0, baseline_recipe=recipe,
                     sparse_recipe=recipe, finetune_recipe=recipe, preset=args.reg_preset, bn_init=args.reg_bn_init,
                     model_config=_key_values(args.model_config, "--model-config"),
                     threshold=args.threshold or "auto", batch_size=args.batch_size)
    options = StudyOptions(data_root=args.data_root, device=args.device, seed=args.seed, progress=not args.json)

    def show(trial) -> None:
        if not args.json:
            print(f"trial {trial.index} ({trial.phase}): λ={trial.lam:.4g} t={trial.t:.3g} → FLOPs reduction "
                  f"{100 * trial.flops_reduction:.1f}% (regularized {trial.extra.get('accuracy_regularized')}%, "
                  f"pruned {trial.extra.get('accuracy_pruned')}%)", file=sys.stderr, flush=True)

    trial = training_trial(spec, options, epochs=args.epochs, out_root=Path(args.out), progress=not args.json)
    result = search_lambda_t(trial, args.flops_target, delta=args.delta, lam_max=args.lam_max, t0=args.t0,
                             t_step=args.t_step, max_trials=args.max_trials, on_trial=show)
    report = {"method": args.method, "model": args.model, "dataset": args.dataset, "recipe": recipe,
              "epochs_per_trial": args.epochs, **result.to_dict()}

    def render() -> None:
        print(f"Algorithm 1: target {100 * args.flops_target:.0f}% ± {100 * args.delta:.0f} points FLOPs reduction")
        print(f"{'#':>2} {'phase':<6} {'λ':>10} {'t':>5} {'FLOPs↓':>8} {'acc reg':>8} {'acc pruned':>10}")
        for t in result.trials:
            print(f"{t.index:>2} {t.phase:<6} {t.lam:>10.4g} {t.t:>5.2f} {100 * t.flops_reduction:>7.1f}% "
                  f"{t.extra.get('accuracy_regularized', float('nan')):>8.2f} "
                  f"{t.extra.get('accuracy_pruned', float('nan')):>10.2f}")
        state = "converged" if result.converged else "not converged"
        print(f"→ λ={result.lam:.4g}, t={result.t:.3g}: {100 * result.flops_reduction:.1f}% ({state}: {result.reason})")

    return report, render


@command("report")
def cmd_report(args: argparse.Namespace) -> Report:
    """Collect result JSON files into one markdown page with tables and PNG plots."""
    import shlex

    from .report.markdown import write_report

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


@command("analyze")
def cmd_analyze(args: argparse.Namespace) -> Report:
    """``analyze direction``: gRDA's directional-pruning diagnostics for two solutions (see evidence.direction)."""
    from .data import get_dataset, make_loader
    from .evidence.direction import DirectionOptions, analyze_direction, norm_ratio_from_log
    from .io import load_model

    model_config = _model_config_for(args.dataset, _key_values(args.model_config, "--model-config")) \
        if args.model else None
    models = {name: load_model(path, model_name=args.model, model_config=model_config)[0]
              for name, path in (("sgd", args.sgd), ("grda", args.grda))}
    options = DirectionOptions(points=args.points, top_k=args.top_k, samples=args.samples,
                               lanczos_iters=args.lanczos_iters, random_draws=args.random_draws,
                               bezier_epochs=args.bezier_epochs, bezier_lr=args.bezier_lr, seed=args.seed,
                               device=_device(args.device))
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
    p.add_argument("--grda-c", type=float, help="gRDA's c (same as --opt c=...)")
    p.add_argument("--grda-mu", type=float, help="gRDA's mu (same as --opt mu=...)")
    p.add_argument("--regularizer", default=None, help="polarization, slimming (scaling-factor regularizers)")
    p.add_argument("--reg-lambda", type=float, help="regularizer strength λ")
    p.add_argument("--reg-t", type=float, help="polarization's t (default 1.2)")
    p.add_argument("--reg-a", type=float, default=1.0, help="polarization's clamp bound a (default 1)")
    p.add_argument("--reg-bn-init", type=float, default=None, help="initialise BN γ to this (paper: 0.5)")
    p.add_argument("--reg-preset", default="engine",
                   help="which factors: engine (default, any model), resnet-cifar, vgg16, resnet50, all-bn")
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
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of each group's channels removed, [0, 1) (not needed by polarization)")
    p.add_argument("--threshold", type=str, default=None,
                   help="method threshold, parsed by the method (polarization: auto, global, percent or a number; "
                        "merge: min cosine to merge, 0 = none, default 0.45 FC / 0.1 conv+BN or the preset's)")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="method-specific option, e.g. combine=mean (polarization)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune the pruned model for N epochs")
    p.add_argument("--finetune-recipe", default=None, help="recipe of the fine-tune (default: model family's)")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tune lr without --finetune-recipe")
    p.add_argument("--scope", default="local", choices=["local", "global"])
    p.add_argument("--rounding", default="round", choices=["round", "floor"])
    p.add_argument("--ignore", action="append", metavar="MODULE", help="protect a module (name or pattern)")
    p.add_argument("--override", action="append", metavar="MODULE=RATIO", help="per-module ratio")
    p.add_argument("--include-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="score rows as [w | b] (Neuron Merging, FC; default: on for merge/lstsq, off for prune)")
    p.add_argument("--lam", type=float, default=None, help="merge: lambda of MostSim+BN (default 0.85 or the preset's)")
    p.add_argument("--bn-scale", default=None, choices=["exact", "paper"],
                   help="merge: BN algebra, exact (default) or the official code's formulas")
    p.add_argument("--preset", default=None,
                   help="merge/lstsq: official pipeline (lenet-300-100, vgg16-cifar10, vgg16-cifar100, resnet56, "
                        "wrn-40-4)")
    p.add_argument("--calibration", type=int, default=None,
                   help="lstsq: number of unlabeled training inputs (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--latency-batch", type=int, default=8, help="batch size of the latency measurement")
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--evidence-samples", type=int, default=1000,
                   help="first N test inputs for the feature-preservation report (0 disables)")
    p.add_argument("--out", default=None, help="directory for the pruned model (safetensors + JSON record)")

    p = add("search", "Polarization Algorithm 1: find (λ, t) for a FLOPs-reduction target with short trainings")
    p.add_argument("--method", default="polarization", choices=["polarization"])
    p.add_argument("--model", required=True)
    data_args(p)
    p.add_argument("--flops-target", type=float, required=True, help="FLOPs reduction F*, e.g. 0.5")
    p.add_argument("--delta", type=float, default=0.05, help="tolerance δ (paper 0.05); the λ phase stops at 2δ")
    p.add_argument("--lam-max", type=float, default=2e-4, help="initial upper bracket of λ (paper 2e-4)")
    p.add_argument("--t0", type=float, default=1.2, help="initial t (paper 1.2)")
    p.add_argument("--t-step", type=float, default=0.1)
    p.add_argument("--max-trials", type=int, default=8, help="at most this many trainings")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the recipe's)")
    p.add_argument("--recipe", default=None, help="sparsity-training recipe (default polarization-fmnist)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threshold", default=None, help="auto (per-layer valley), global or a number")
    p.add_argument("--reg-preset", default="engine")
    p.add_argument("--reg-bn-init", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the trials' runs (reused when present)")

    p = add("report", "collect result JSON (train/prune/reproduce/compare/analyze) into a markdown page with plots")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="JSON files or directories (searched for *.json)")
    p.add_argument("--out", required=True, help="markdown file, e.g. docs/results.md (plots go to docs/results/)")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")

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

    p = add("compare", "accuracy of two checkpoints and how well B preserves A's features (rel. L2, WARE, "
                       "agreement, KL)")
    p.add_argument("a", help="reference checkpoint (e.g. the original model)")
    p.add_argument("b", help="compared checkpoint (e.g. its pruned or merged version)")
    p.add_argument("--model", default=None, help="architecture of legacy .pth checkpoints")
    data_args(p)
    p.add_argument("--samples", type=int, default=None, help="first N test inputs (default: all)")
    p.add_argument("--batch-size", type=int, default=256)

    p = add("sparsify", "export a model with exact zeros (gRDA): drop dead channels, sparse file, sparse kernels")
    p.add_argument("--checkpoint", required=True, help="run directory or model.safetensors/.json (legacy: --model)")
    p.add_argument("--out", required=True, help="directory for model.{safetensors,json} and sparse.{safetensors,json}")
    p.add_argument("--model", default=None, help="architecture; required for legacy .pt/.pth checkpoints")
    p.add_argument("--model-config", action="append", metavar="KEY=VALUE", help="model constructor option")
    p.add_argument("--dataset", default=None, help="also report test accuracy before/after (and the input shape)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--latency-batch", type=int, action="append", help="batch size to time (repeatable; "
                   "default 1, 32, 256)")
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random probe inputs")

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
