"""Algorithm 1 of the paper (§3.3): find (λ, t) whose pruned model hits a FLOPs-reduction target.

The official repository does not implement it (``docs/polarization.md``, "Algorithm 1"). Here:

    (λ_lo, λ_hi, t) ← (0, λ_max = 2e-4, t₀ = 1.2)
    coarse: bisect λ with t fixed until |F − F*| < 2δ
        λ ← (λ_lo + λ_hi)/2; F ← trial(λ, t)
        F − F* ≥ 2δ  ⇒ λ_hi ← λ        (pruning too much)
        F − F* ≤ −2δ ⇒ λ_lo ← λ        (too little; if no trial has ever pruned too much,
                                         λ_hi ← 2·λ_hi as well: bracket expansion, ours)
    fine: with λ fixed, t ← t ∓ 0.1 until |F − F*| < δ       (larger t ⇒ more pruning)

A *trial* trains a fresh model with (λ, t) for a short schedule and prunes it with the threshold rule;
``F`` is the MACs reduction of the pruned model. Safeguards the paper lacks (it notes the t loop can
cycle): ``max_trials`` bounds the total, and a t value already tried with the same λ stops the fine
phase (cycle). The result keeps every trial and the closest one.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .method import FlopsMonitor
from .pipeline import PipelineRun, PipelineSpec, make_regularizer, prune_polarized

__all__ = ["SearchResult", "Trial", "search_lambda_t", "training_trial"]


@dataclass
class Trial:
    """One (λ, t) trial. ``flops_reduction`` is F; ``extra`` carries the trial function's other numbers."""

    index: int
    phase: str
    lam: float
    t: float
    flops_reduction: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class SearchResult:
    """The chosen (λ, t), whether ``|F − F*| < δ`` was reached, why the search stopped, every trial."""

    lam: float
    t: float
    flops_reduction: float
    converged: bool
    reason: str
    target: float
    delta: float
    trials: list[Trial]

    def to_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "t": self.t, "flops_reduction": self.flops_reduction, "converged": self.converged,
                "reason": self.reason, "target": self.target, "delta": self.delta,
                "trials": [t.to_dict() for t in self.trials]}


TrialFn = Callable[[float, float], "float | dict[str, Any]"]


def search_lambda_t(trial: TrialFn, target: float, *, delta: float = 0.05, lam_max: float = 2e-4, t0: float = 1.2,
                    t_step: float = 0.1, max_trials: int = 8, expand: bool = True,
                    on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """Run Algorithm 1 with ``trial(λ, t) → F`` (or a dict with ``"flops_reduction"`` and anything else).

    Args:
        target: F* in (0, 1), e.g. 0.5 for a 50 % FLOPs reduction.
        delta: tolerance δ (paper: 0.05 = 5 points); the coarse phase stops at 2δ.
        lam_max: initial λ_hi (paper: 2e-4); t0: initial t (paper: 1.2); t_step: 0.1.
        max_trials: budget of trainings. expand: double λ_hi while no trial prunes too much.
        on_trial: called after every trial (progress reporting).
    """
    if not 0 < target < 1:
        raise ConfigError(f"flops target must be in (0, 1) (a FLOPs reduction), got {target!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if not lam_max > 0 or not t_step > 0:
        raise ConfigError(f"lam_max and t_step must be positive, got {lam_max!r}, {t_step!r}")
    if not isinstance(max_trials, int) or max_trials < 1:
        raise ConfigError(f"max_trials must be a positive integer, got {max_trials!r}")
    trials: list[Trial] = []

    def run(phase: str, lam: float, t: float) -> float:
        out = trial(lam, t)
        extra = dict(out) if isinstance(out, dict) else {}
        f = float(extra.pop("flops_reduction") if isinstance(out, dict) else out)
        tr = Trial(len(trials), phase, lam, round(t, 6), f, extra)
        trials.append(tr)
        if on_trial is not None:
            on_trial(tr)
        return f

    def done(reason: str, converged: bool) -> SearchResult:
        best = min(trials, key=lambda tr: abs(tr.flops_reduction - target))
        return SearchResult(best.lam, best.t, best.flops_reduction, converged, reason, target, delta, trials)

    lam_lo, lam_hi, t = 0.0, float(lam_max), float(t0)
    too_much_seen = False
    # coarse: bisection on λ
    while True:
        if len(trials) >= max_trials:
            return done("max_trials reached in the coarse phase", False)
        lam = (lam_lo + lam_hi) / 2
        f = run("coarse", lam, t)
        if abs(f - target) < delta:
            return done("|F − F*| < δ", True)
        if f - target >= 2 * delta:
            lam_hi, too_much_seen = lam, True
        elif f - target <= -2 * delta:
            lam_lo = lam
            if expand and not too_much_seen:
                lam_hi *= 2
        else:
            break
    # fine: step t with λ fixed
    seen = {round(t, 6)}
    while True:
        if len(trials) >= max_trials:
            return done("max_trials reached in the fine phase", False)
        t = t - t_step if f - target >= delta else t + t_step
        if round(t, 6) in seen:
            return done(f"t cycles at λ={lam:g} (t={t:g} already tried)", False)
        seen.add(round(t, 6))
        f = run("fine", lam, t)
        if abs(f - target) < delta:
            return done("|F − F*| < δ", True)


def training_trial(spec: PipelineSpec, options: Any = None, *, epochs: int | None, out_root: str | Path,
                   progress: bool = True) -> TrialFn:
    """A trial function for :func:`search_lambda_t` built on the public pipeline (:mod:`.pipeline`).

    Each trial trains ``spec.model`` from scratch with (λ, t) for ``epochs`` epochs of ``spec.sparse_recipe``
    (in ``out_root/lam…_t…``, reused when present), prunes it at ``spec``'s threshold and returns the MACs
    reduction plus the regularized and pruned accuracies.

    Args:
        spec: a :class:`~prunekit.polarization.PipelineSpec` (a study's spec works too); its ``lam`` and
            ``t`` are replaced by each trial's.
        options: where and how to run: any object with ``data_root``, ``device`` and ``seed`` attributes
            (e.g. :class:`prunekit.reproduce.StudyOptions`); None: the defaults.
    """
    popt = spec.options()
    run = PipelineRun(spec, out=out_root, data_root=getattr(options, "data_root", None),
                      device=getattr(options, "device", None), seed=getattr(options, "seed", 0),
                      progress=progress, name="search")
    recipe = run.recipe(spec.sparse_recipe, epochs)

    def trial(lam: float, t: float) -> dict[str, Any]:
        s = dataclasses.replace(spec, lam=lam, t=t)
        model = run.fresh_model()
        reg = make_regularizer("polarization", s, model, run.example)
        stage = f"lam{lam:.4g}_t{t:.3g}"
        res = run.fit(stage, model, recipe, regularizers=[reg],
                      callbacks=[FlopsMonitor(popt, run.example, verbose=progress)])
        pruned, details = prune_polarized(res.model, run.example, popt)
        red = 1 - run.sizes(pruned)["macs"] / run.sizes(res.model)["macs"]
        hist = [round(r.get("macs_reduction", math.nan), 4) for r in res.history]
        return {"flops_reduction": round(red, 4), "accuracy_regularized": res.accuracy,
                "accuracy_pruned": run.evaluate(pruned), "macs_reduction_per_epoch": hist,
                "channels_removed": details["channels_removed"], "out": str(run.out / stage),
                "seconds": run.seconds.get(stage)}

    return trial
