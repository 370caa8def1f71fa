"""Commands that make and inspect smaller models: prune (any method, + fine-tune and feature preservation), compare, sparsify."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import PrunekitError
from .base import (
    AddParser,
    Report,
    command,
    data_args,
    device_for,
    key_values,
    model_config_for,
    print_table,
)


@command("prune")
def cmd_prune(args: argparse.Namespace) -> Report:
    import torch

    from ..data import get_dataset, make_loader
    from ..io import load_model, save_model
    from ..methods import PruneOptions, get_method
    from ..metrics import count_macs, count_params, evaluate, evaluate_lm, measure_latency
    from ..tasks import LogitsOf, dataset_task, forward_kwargs

    method = get_method(args.method)
    loading = [0.0]  # seconds spent reading calibration data: not part of the method's time

    def calibration():
        start = time.perf_counter()
        data = get_dataset(args.dataset, "train", root=args.data_root, augment=False)
        loading[0] += time.perf_counter() - start
        return data

    if args.ratio is None and getattr(method, "needs_ratio", True):
        raise PrunekitError(f"method '{args.method}' needs --ratio (fraction of each group's channels removed)")
    options = PruneOptions(ratio=PruneOptions.ratio if args.ratio is None else args.ratio, criterion=args.criterion,
                           scope=args.scope, rounding=args.rounding, round_to=args.round_to,
                           ignored=tuple(args.ignore or ()),
                           overrides={k: float(v) for k, v in key_values(args.override, "--override").items()},
                           include_bias=args.include_bias, seed=args.seed, threshold=args.threshold,
                           method_options={**{k: v for k, v in (("lam", args.lam), ("bn_scale", args.bn_scale),
                                                                ("preset", args.preset),
                                                                ("calibration", args.calibration)) if v is not None},
                                           **key_values(args.method_option, "--method-option")},
                           calibration_data=calibration)
    model_config = model_config_for(args.dataset, key_values(args.model_config, "--model-config")) \
        if args.model else None
    model, info = load_model(args.checkpoint, model_name=args.model, model_config=model_config)
    model.eval()
    device = device_for(args.device)
    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    loader = make_loader(test_set, args.batch_size, shuffle=False)
    sample = test_set[0][0]
    sample_shape = tuple(sample.shape)
    example = torch.zeros(1, *sample_shape, dtype=sample.dtype)  # token ids stay integers
    if sample.is_floating_point():
        latency_input = torch.randn(args.latency_batch, *sample_shape, generator=torch.Generator().manual_seed(0))
    else:
        latency_input = sample[None].repeat(args.latency_batch, *([1] * sample.dim()))
    causal_lm = dataset_task(test_set) == "causal-lm"

    def measure(m) -> dict[str, Any]:
        m = m.to(device)
        view = LogitsOf(m, **forward_kwargs(m))  # Hugging Face outputs → .logits; decoders without cache
        if causal_lm:
            res = evaluate_lm(view, loader, device=device)
            quality = {"perplexity": res["perplexity"], "accuracy": round(res["accuracy"], 4)}
        else:
            quality = {"accuracy": round(evaluate(view, loader, device=device)["accuracy"], 4)}
        lat = measure_latency(view, latency_input, runs=args.latency_runs, device=device).median_ms
        m = m.cpu()
        return {**quality, "latency_ms": lat, "params": count_params(m), "macs": count_macs(m, example)}

    before = measure(model)
    start = time.perf_counter()
    result = method(model.cpu(), example, options)
    method_seconds = time.perf_counter() - start - loading[0]
    after = measure(result.model)
    report = {"method": args.method, "criterion": args.criterion, "ratio": args.ratio, "scope": args.scope,
              "dataset": args.dataset, **after,
              **{f"{k}_before": v for k, v in before.items()},
              "params_reduction": 1 - after["params"] / before["params"],
              "macs_reduction": 1 - after["macs"] / before["macs"],
              "latency_batch": args.latency_batch, "method_seconds": round(method_seconds, 3), **result.details}
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
        print_table(f"{args.method} {args.checkpoint} (ratio {args.ratio}, {args.criterion})",
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
    from ..data import get_dataset
    from ..recipes import default_recipe_for, get_recipe
    from ..regularizers import _load_builtin_regularizers
    from ..train import train

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
    from ..evidence import feature_preservation

    if samples < 1:
        raise PrunekitError(f"the number of evidence samples must be >= 1 (0 disables it), got {samples}")
    return feature_preservation(original, other, dataset, max_samples=samples, batch_size=batch_size,
                                device=device)


def _print_preservation(p: dict[str, Any]) -> None:
    print_table(f"feature preservation on {p['samples']:,} inputs (reference vs compared model)",
                 {k: p[k] for k in ("output_relative_l2", "ware", "agreement", "kl", "layers_skipped")})
    for layer in p["layers"]:
        print(f"    {layer['name']:<32} relative L2 {layer['relative_l2']:.4g}")


def _load_any(path: str, args: argparse.Namespace):
    """A prunekit model directory (structure from its JSON) or a legacy ``.pth`` file (needs ``--model``)."""
    from ..io import load_model

    p = Path(path)
    if p.is_file() and p.suffix not in (".json", ".safetensors"):
        if not args.model:
            raise PrunekitError(f"{path} is a legacy checkpoint: pass --model ARCH (e.g. lenet-300-100)")
        cfg = model_config_for(args.dataset, key_values(args.model_config, "--model-config"))
        return load_model(p, model_name=args.model, model_config=cfg)[0]
    return load_model(p)[0]


@command("compare")
def cmd_compare(args: argparse.Namespace) -> Report:
    """Accuracy of two checkpoints and how well B preserves A's features and outputs on the same inputs."""
    from torch.utils.data import Subset

    from ..data import get_dataset, make_loader
    from ..metrics import evaluate

    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    samples = len(test_set) if args.samples is None else args.samples
    if samples < 1:
        raise PrunekitError(f"--samples must be >= 1, got {samples}")
    samples = min(samples, len(test_set))
    model_a, model_b = _load_any(args.a, args), _load_any(args.b, args)
    device = device_for(args.device)
    subset = test_set if samples == len(test_set) else Subset(test_set, range(samples))
    loader = make_loader(subset, args.batch_size, shuffle=False)
    accuracy = [round(evaluate(m, loader, device=device)["accuracy"], 4) for m in (model_a, model_b)]
    report = {"kind": "compare", "a": str(args.a), "b": str(args.b), "dataset": args.dataset,
              "accuracy_a": accuracy[0], "accuracy_b": accuracy[1],
              **_preservation(model_a, model_b, test_set, samples, args.batch_size, device)}

    def render() -> None:
        print_table(f"compare {args.a} (A, reference) with {args.b} (B) on {args.dataset}",
                     {"accuracy_a": accuracy[0], "accuracy_b": accuracy[1]})
        _print_preservation(report)

    return report, render


@command("sparsify")
def cmd_sparsify(args: argparse.Namespace) -> Report:
    """Export a model with exact zeros (gRDA): remove dead channels, store the rest sparse, time kernels."""
    import torch

    from ..errors import CheckpointError, ConfigError
    from ..io import load_model
    from ..sparse import export

    path = Path(args.checkpoint)
    if not (path.exists() or Path(f"{path}.json").exists()):
        raise CheckpointError(f"{path}: no such checkpoint (give a run directory holding model.safetensors + "
                              "model.json, either file of the pair, or a legacy .pt/.pth with --model)")
    extra = key_values(args.model_config, "--model-config")
    model_config = (model_config_for(args.dataset, extra) if args.dataset else extra) if args.model else None
    model, _info = load_model(path, model_name=args.model, model_config=model_config)
    loader = None
    if args.dataset:
        from ..data import dataset_info, get_dataset, make_loader

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
        print_table(f"sparsified {path} → {args.out}", {k: v for k, v in report.items() if not isinstance(v, dict)})
        for name, g in report["removed_channels"].items():
            print(f"  removed from {name}: {g['removed']}/{g['size']} channels "
                  f"({g['constant']} constant, {g['unused']} unused)")
        print(f"  {'batch':>6} {'original ms':>12} {'dense ms':>10} {'sparse ms':>10}  sparse layers")
        for b, dense in report["latency_dense_ms"].items():
            print(f"  {b:>6} {report['latency_original_ms'][b]:>12.4f} {dense:>10.4f} "
                  f"{report['latency_sparse_ms'][b]:>10.4f}  {', '.join(report['sparse_layers'][b]) or '-'}")

    return report, render


def add_parsers(add: AddParser) -> None:
    """Register this module's sub-commands (``add(name, help)`` returns the sub-parser)."""
    from ..methods import list_methods

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
    p.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="each group keeps a multiple of N channels (rounded up, hardware-friendly widths)")
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
                   help="lstsq/reconstruct: number of unlabeled training inputs (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--latency-batch", type=int, default=8, help="batch size of the latency measurement")
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--evidence-samples", type=int, default=1000,
                   help="first N test inputs for the feature-preservation report (0 disables)")
    p.add_argument("--out", default=None, help="directory for the pruned model (safetensors + JSON record)")

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
