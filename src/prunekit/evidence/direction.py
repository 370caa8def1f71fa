"""Directional-pruning diagnostics for a pair of solutions w_A (SGD) and w_B (gRDA) (docs/grda.md, "Directional pruning diagnostics").

The paper argues that gRDA prunes *directionally* (Definition 1.1): w_B − w_A lies in the flat directions
of the loss at w_A, so (1) the two minima are joined by a low-loss path, (2) w_B − w_A has almost no
component in the top-k Hessian eigenspace at w_A, and (3) only gRDA raises ‖w‖₂/‖w‖₁. This module measures
all three:

* ``path``: training loss (fixed subset of N training samples) and test accuracy along (1 − t) w_A + t w_B;
* ``bezier``: the same along a quadratic Bézier curve whose control point is trained (optional);
* ``eigenvalues``: top-k eigenvalues of the Hessian of that N-sample training loss at w_A (eval mode),
  by Lanczos on Hessian-vector products;
* ``projection_fraction``: ‖P_k (w_B − w_A)‖ / ‖w_B − w_A‖, against Gaussian directions of the same norm;
* ``norm_ratio``: ‖w‖₂/‖w‖₁ per epoch, from the two runs' ``log.jsonl`` (``NormRatioLogger``).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..optim.grda import norm_ratio
from .hessian import (
    Eigenpairs,
    HessianOperator,
    eigen_residuals,
    expected_random_fraction,
    flat_parameters,
    lanczos,
    projection_fraction,
    random_projection_fractions,
)
from .paths import PathEvaluator, bezier_point, has_batchnorm, linear_point, train_bezier

__all__ = ["DirectionOptions", "DirectionResult", "analyze_direction", "norm_ratio_from_log"]


@dataclass(frozen=True)
class DirectionOptions:
    """Knobs of :func:`analyze_direction` (CLI flags of ``prunekit analyze direction``)."""

    points: int = 21  # points on each path, t = 0, 1/(points−1), ..., 1
    top_k: int = 10  # Hessian eigenpairs
    samples: int = 2000  # fixed training subset for the loss, the Hessian and BN statistics
    lanczos_iters: int | None = None  # default: max(2k, k + 30)
    random_draws: int = 10  # random directions for the reference projection fraction
    bezier_epochs: int = 0  # 0: no Bézier curve
    bezier_lr: float = 0.05
    bezier_momentum: float = 0.9
    batch_size: int = 500  # of the fixed subset's batches (HVP memory) and of Bézier training (128 below)
    bezier_batch_size: int = 128
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        bad = [f"{k}={v}" for k, v in (("points", self.points), ("top_k", self.top_k), ("samples", self.samples),
                                       ("random_draws", self.random_draws), ("batch_size", self.batch_size),
                                       ("bezier_batch_size", self.bezier_batch_size)) if v < 1]
        if self.points < 2:
            bad.append(f"points={self.points} (a path needs both ends)")
        if self.bezier_epochs < 0:
            bad.append(f"bezier_epochs={self.bezier_epochs}")
        if self.lanczos_iters is not None and self.lanczos_iters < self.top_k:
            bad.append(f"lanczos_iters={self.lanczos_iters} < top_k={self.top_k}")
        if bad:
            raise ConfigError(f"invalid direction-analysis options: {', '.join(bad)}")


@dataclass
class DirectionResult:
    """Everything :func:`analyze_direction` measured; :meth:`to_dict` is the CLI's JSON report."""

    report: dict[str, Any]
    eigenpairs: Eigenpairs  # vectors (d, k) at w_A: kept out of the JSON

    def to_dict(self) -> dict[str, Any]:
        return self.report


def _fixed_batches(dataset, samples: int, batch_size: int, seed: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` of a seeded permutation of ``dataset``, as batches ``(x, y)`` on ``device``."""
    n = min(samples, len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    out = []
    for chunk in idx.split(batch_size):
        if hasattr(dataset, "get_batch"):
            x, y = dataset.get_batch(chunk)
        else:
            items = [dataset[int(i)] for i in chunk]
            x = torch.stack([it[0] for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        out.append((x.to(device), y.to(device)))
    return out


def _check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    sa = [(n, tuple(p.shape)) for n, p in a.named_parameters()]
    sb = [(n, tuple(p.shape)) for n, p in b.named_parameters()]
    if sa != sb:
        diff = next(((x, y) for x, y in zip(sa, sb) if x != y), (sa[len(sb):][:1], sb[len(sa):][:1]))
        raise ConfigError(f"the two models have different parameters (first difference: {diff[0]} vs {diff[1]}); "
                          "the direction analysis needs two solutions of the same architecture")


def analyze_direction(sgd: nn.Module, grda: nn.Module, train_set, test_loader, options: DirectionOptions = DirectionOptions(),
                      *, norm_ratio_logs: dict[str, Any] | None = None,
                      log: Callable[[str], None] | None = None) -> DirectionResult:
    """Measure the diagnostics of the module docstring for w_A = ``sgd`` and w_B = ``grda``.

    ``train_set``: unaugmented training split (the fixed subset and Bézier training come from it);
    ``test_loader``: test batches. ``norm_ratio_logs``: what :func:`norm_ratio_from_log` read for each run
    (``{"sgd": (per-epoch list, initial), "grda": ...}``) or None. Inputs are not modified.
    """
    options.check()
    say = log or (lambda _line: None)
    dev = torch.device(options.device)
    _check_same_architecture(sgd, grda)
    sgd, grda = copy.deepcopy(sgd).to(dev).eval(), copy.deepcopy(grda).to(dev).eval()
    a, b = flat_parameters(sgd), flat_parameters(grda)
    diff = b - a
    distance = float(diff.double().norm())
    batches = _fixed_batches(train_set, options.samples, options.batch_size, options.seed, dev)
    samples = sum(int(y.shape[0]) for _, y in batches)
    ts = [i / (options.points - 1) for i in range(options.points)]

    evaluator = PathEvaluator(copy.deepcopy(sgd), batches, test_loader)
    say(f"linear path: {options.points} points, {samples} training samples")
    path = evaluator.path(lambda t: linear_point(a, b, t), ts)
    bezier = None
    if options.bezier_epochs:
        from ..data import make_loader

        say(f"Bézier curve: training the control point for {options.bezier_epochs} epoch(s)")
        loader = make_loader(train_set, options.bezier_batch_size, shuffle=True, seed=options.seed)
        theta = train_bezier(copy.deepcopy(sgd), a, b, loader, epochs=options.bezier_epochs, lr=options.bezier_lr,
                             momentum=options.bezier_momentum, seed=options.seed)
        bezier = evaluator.path(lambda t: bezier_point(a, theta, b, t), ts)

    say(f"Hessian: top-{options.top_k} eigenpairs at the SGD solution (Lanczos, {a.numel():,} parameters)")
    op = HessianOperator(sgd, batches)
    pairs = lanczos(op, op.dim, options.top_k, iterations=options.lanczos_iters, seed=options.seed, device=dev)
    residuals = eigen_residuals(op, pairs)
    fraction = projection_fraction(diff, pairs.vectors)
    randoms = random_projection_fractions(pairs.vectors, distance, options.random_draws, seed=options.seed + 1)

    ratios = None  # only when both runs logged it: {"sgd": [...], "grda": [...]}
    if norm_ratio_logs and all(v[0] for v in norm_ratio_logs.values()):
        ratios = {k: v[0] for k, v in norm_ratio_logs.items()}
    report = {
        "kind": "direction",
        "path": path.to_dict(),
        "bezier": bezier.to_dict() if bezier is not None else None,
        "eigenvalues": pairs.values.tolist(),
        "projection_fraction": fraction,
        "random_projection_fraction": statistics.fmean(randoms),
        "norm_ratio": ratios,
        "distance": distance,
        # extras (same numbers' context)
        "random_projection_fraction_sd": statistics.stdev(randoms) if len(randoms) > 1 else 0.0,
        "random_projection_fractions": randoms,
        "expected_random_fraction": expected_random_fraction(options.top_k, a.numel()),
        "eigenvalue_residuals": residuals.tolist(),  # ‖H q_i − λ_i q_i‖, measured with k more HVPs
        "hessian_vector_products": op.calls,
        "lanczos_iterations": pairs.iterations,
        "norm_ratio_initial": ({k: v[1] for k, v in norm_ratio_logs.items()} if ratios else None),
        "norm_ratio_final": {"sgd": norm_ratio(sgd), "grda": norm_ratio(grda)},
        "barrier": {"path": path.barrier, "bezier": bezier.barrier if bezier is not None else None},
        "parameters": a.numel(),
        "samples": samples,
        "top_k": options.top_k,
        "bezier_epochs": options.bezier_epochs,
        "batchnorm": "recomputed on the training subset at every path point" if has_batchnorm(sgd) else None,
        "relative_distance": distance / max(float(a.double().norm()), math.ulp(1.0)),
    }
    return DirectionResult(report=report, eigenpairs=pairs)


def norm_ratio_from_log(checkpoint: str | Path) -> tuple[list[float] | None, float | None]:
    """``(per-epoch norm_ratio list, initial ratio)`` from the ``log.jsonl`` of the run holding ``checkpoint``
    (a run directory, or a file in one); ``(None, None)`` when there is no log or it has no ``norm_ratio``."""
    p = Path(checkpoint)
    log_path = (p if p.is_dir() else p.parent) / "log.jsonl"
    if not log_path.is_file():
        return None, None
    values, initial = [], None
    for i, line in enumerate(log_path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{log_path}: line {i + 1} is not JSON ({e})") from e
        if "norm_ratio" in record:
            values.append(float(record["norm_ratio"]))
        if "norm_ratio_initial" in record:
            initial = float(record["norm_ratio_initial"])
    return (values or None), initial
