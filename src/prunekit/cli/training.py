"""Commands that train and measure: train (incl. regularizers and gRDA), eval, the polarization search."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    size_report,
)


@command("train")
def cmd_train(args: argparse.Namespace) -> Report:
    from ..data import get_dataset
    from ..models import create
    from ..recipes import default_recipe_for, get_recipe
    from ..regularizers import _load_builtin_regularizers
    from ..train import seed_everything, train

    _load_builtin_regularizers()  # method packages register their recipes (e.g. polarization-fmnist)
    recipe = get_recipe(args.recipe) if args.recipe else default_recipe_for(args.model)
    overrides = {k: v for k, v in {
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "weight_decay": args.weight_decay, "optimizer": args.optimizer, "momentum": args.momentum,
    }.items() if v is not None}
    overrides.update(key_values(args.set, "--set"))
    optimizer_kwargs = key_values(args.opt, "--opt")
    optimizer_kwargs.update({k: v for k, v in (("c", args.grda_c), ("mu", args.grda_mu)) if v is not None})
    if optimizer_kwargs:
        overrides["optimizer_kwargs"] = {**recipe.optimizer_kwargs, **optimizer_kwargs}
    recipe = recipe.replace(**overrides)

    seed_everything(args.seed)  # the initial weights are part of what --seed reproduces
    model = create(args.model, **model_config_for(args.dataset, key_values(args.model_config, "--model-config")))
    train_set = get_dataset(args.dataset, "train", root=args.data_root)
    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    callbacks = []
    if recipe.optimizer == "grda":  # gRDA's sparsity is its result: log it every epoch
        from ..optim.grda import SparsityLogger

        callbacks.append(SparsityLogger(verbose=not args.json))
    regularizers = _train_regularizers(args, model, callbacks)
    result = train(model, train_set, test_set, recipe, out_dir=Path(args.out), seed=args.seed,
                   resume=args.resume, device=device_for(args.device), progress=not args.json,
                   metadata={"dataset": args.dataset}, callbacks=callbacks, regularizers=regularizers)
    report = {"model": args.model, "dataset": args.dataset, "recipe": recipe.name, "epochs": recipe.epochs,
              "seed": args.seed}
    if result.perplexity is not None:  # causal LM: perplexity and token loss; next-token accuracy after them
        report.update({"perplexity": result.perplexity, "loss": result.test_loss, "accuracy": result.accuracy,
                       "params": result.params, "macs": result.macs})
    else:
        report.update({"accuracy": result.accuracy, **size_report(result.model, test_set[0][0].shape)})
    report["checkpoint"] = str(result.checkpoint_path)
    if callbacks and result.history:
        report.update({k: result.history[-1][k] for k in ("sparsity", "weight_sparsity") if k in result.history[-1]})
    if regularizers:
        report["regularizer"] = regularizers[0].state_dict()
        if result.history and "macs_reduction" in result.history[-1]:
            report["macs_reduction_at_threshold"] = result.history[-1]["macs_reduction"]
    return report, lambda: print_table(f"trained {args.model} on {args.dataset}", report)


def _train_regularizers(args: argparse.Namespace, model, callbacks: list) -> list:
    """``--regularizer polarization|slimming --reg-lambda L [--reg-t T] [--reg-bn-init 0.5]``."""
    if not args.regularizer or args.regularizer == "none":
        return []
    from ..regularizers import create_regularizer

    if args.reg_lambda is None:
        raise PrunekitError(f"--regularizer {args.regularizer} needs --reg-lambda")
    kw = {"lam": args.reg_lambda, "preset": args.reg_preset, "bn_init": args.reg_bn_init}
    if args.regularizer == "polarization":
        kw.update({"t": 1.2 if args.reg_t is None else args.reg_t, "a": args.reg_a})
        from ..polarization import FlopsMonitor  # logs the MACs reduction the threshold gives, every epoch

        callbacks.append(FlopsMonitor(verbose=not args.json))
    elif args.reg_t is not None:
        raise PrunekitError(f"--reg-t is a polarization option; regularizer '{args.regularizer}' has no t")
    return [create_regularizer(args.regularizer, model, **kw)]


@command("eval")
def cmd_eval(args: argparse.Namespace) -> Report:
    from ..data import get_dataset, make_loader
    from ..io import load_model
    from ..metrics import count_macs, count_params, evaluate, evaluate_lm
    from ..train import LogitsOf, forward_kwargs

    model_config = model_config_for(args.dataset, key_values(args.model_config, "--model-config")) \
        if args.model else None
    model, _info = load_model(args.checkpoint, model_name=args.model, model_config=model_config)
    device = device_for(args.device)
    test_set = get_dataset(args.dataset, "test", root=args.data_root)
    loader = make_loader(test_set, args.batch_size, shuffle=False)
    view = LogitsOf(model.to(device), **forward_kwargs(model))  # HF outputs → .logits; use_cache=False
    title = f"evaluated {args.checkpoint} on {args.dataset} (test split)"
    if _is_causal_lm(test_set, view, device):
        metrics = evaluate_lm(view, loader, device=device)
        x = test_set[0][0]
        report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "perplexity": metrics["perplexity"],
                  "loss": metrics["loss"], "accuracy": round(metrics["accuracy"], 4), "tokens": metrics["tokens"],
                  "samples": metrics["samples"], "params": count_params(model),
                  "macs": count_macs(model.cpu(), x[None])}
        return report, lambda: print_table(title, report)
    metrics = evaluate(view, loader, device=device)
    report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset,
              "accuracy": round(metrics["accuracy"], 4), "top5": metrics.get("top5"), "loss": metrics["loss"],
              "samples": metrics["samples"], **size_report(model.cpu(), test_set[0][0].shape)}
    return report, lambda: print_table(title, report)


def _is_causal_lm(test_set, view, device) -> bool:
    """The dataset's declared task, else the shapes of the model's logits on its first sample."""
    import torch

    from ..runtime import eval_mode
    from ..train import dataset_task, infer_task

    task = dataset_task(test_set)
    if task is not None:
        return task == "causal-lm"
    x, y = test_set[0][0], torch.as_tensor(test_set[0][1])
    if x.is_floating_point():
        return False
    with eval_mode(view):
        return infer_task(view(x[None].to(device)), y[None]) == "causal-lm"


@command("search")
def cmd_search(args: argparse.Namespace) -> Report:
    """Algorithm 1 (Polarization): bisect λ, then step t, with short trainings, to a FLOPs target."""
    from ..polarization import PipelineSpec as StudySpec
    from ..polarization.search import search_lambda_t, training_trial
    from ..reproduce import StudyOptions

    if args.method != "polarization":
        raise PrunekitError(f"search supports --method polarization only, got '{args.method}'")
    recipe = args.recipe or "polarization-fmnist"
    spec = StudySpec(model=args.model, dataset=args.dataset, lam=args.lam_max, t=args.t0, baseline_recipe=recipe,
                     sparse_recipe=recipe, finetune_recipe=recipe, preset=args.reg_preset, bn_init=args.reg_bn_init,
                     model_config=key_values(args.model_config, "--model-config"),
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


def add_parsers(add: AddParser) -> None:
    """Register this module's sub-commands (``add(name, help)`` returns the sub-parser)."""
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
