"""Refit the layer that produces a model's logits for the softmax it feeds, not for the logits themselves.

Plain reconstruction fits the logits' layer by least squares: every logit error counts alike. What the
model's user sees is ``softmax(logits)``; with ``z`` the original logits of one row, ``p = softmax(z/τ)``
and ``δ`` the error of the compressed network's logits, the KL divergence at temperature τ is, to second
order,

    KL(p ‖ softmax((z + δ)/τ)) ≈ δᵀ H δ / (2τ²),     H = diag(p) − p pᵀ,

the softmax's Fisher information: an error along the classes the model hesitates between counts, a shift of
every logit by the same amount (H·1 = 0) does not. :func:`softmax_refit` minimises over the layer's weights
Θ (C, D+1) (inputs u = [x | 1], or x with the bias fixed)

    Σ_rows (Θu − z)ᵀ (H + ε·I) (Θu − z) + λ ‖Θ − Θ_prior‖²,

ε·I a little plain squared error (it pins what H ignores: the shift, and confidently predicted rows whose H
is ≈ 0). The normal equations couple the classes (a (C·D)² system); they are solved matrix-free by
preconditioned conjugate gradients — one product costs two (rows × D × C) matrix products — with the
Kronecker preconditioner diag(s_c) ⊗ UᵀU, starting from the least-squares refit.

Measured on the official LeNet-300-100 checkpoint at ratio 0.7 / 0.8 (calibration seeds 0–4): +0.3 / +0.5
points on average (seed 0: 87.37 → 87.80, 85.45 → 85.95). Deeper networks lose little in their last layer:
on ResNet-20 and a ViT the held-out test of ``reconstruct`` mostly keeps least squares; a language model's
head gains nothing measurable at twice the time and is left to least squares by default
(``ReconstructOptions.output_loss="auto"``; ``docs/compensation.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..runtime import call, capture, eval_mode
from ..tasks import model_logits
from .calibration import batches, n_inputs
from .layers import is_linear
from .targets import Passes, Targets, compressed_values


def logits_layer(model: nn.Module, probe: Any, names: list[str]) -> tuple[str, int] | None:
    """(the Linear among ``names`` whose output *is* the model's logits — the same tensor, nothing applied after
    it —, its logit vectors per input: 1 for a classifier, the positions for a token model), on one probe pass
    of one input; None when there is none (e.g. a log-softmax or a reshape follows the layer)."""
    linear = [n for n in names if is_linear(model.get_submodule(n))]
    if not linear:
        return None
    with eval_mode(model), capture(model, linear, what="output") as seen:
        logits = model_logits(call(model, probe))
    if not isinstance(logits, torch.Tensor):
        return None
    for name in linear:
        y = seen.get(name)
        if isinstance(y, torch.Tensor) and y.shape == logits.shape and y.data_ptr() == logits.data_ptr():
            return name, y.numel() // (y.shape[0] * y.shape[-1])
    return None


@dataclass(frozen=True)
class SoftmaxFit:
    """Rows and constants of one softmax-weighted refit: inputs ``u`` (N, D[+1]), original logits ``z``
    (N, C), their probabilities ``p`` at the temperature, the squared-error mix ``eps``, a bias ``fixed``
    (C,) added to Θu that is not refit (zeros when it is)."""

    u: torch.Tensor
    z: torch.Tensor
    p: torch.Tensor
    eps: float
    fixed: torch.Tensor

    def weigh(self, r: torch.Tensor) -> torch.Tensor:
        """(H + ε·I) r for every row of r (N, C): H r = p ⊙ r − p (pᵀr)."""
        pr = self.p * r
        return pr - self.p * pr.sum(1, keepdim=True) + self.eps * r

    def kl(self, theta: torch.Tensor) -> float:
        """Mean KL(softmax(z) ‖ softmax(Θu)) over the rows, at temperature 1 (what the model outputs)."""
        return float(row_kl(self.z, self.u @ theta.t() + self.fixed).mean())


def row_kl(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(z) ‖ softmax(logits)) of every row (N,)."""
    logp, logq = torch.log_softmax(z.double(), 1), torch.log_softmax(logits.double(), 1)
    return (logp.exp() * (logp - logq)).sum(1)


def softmax_refit(u: torch.Tensor, z: torch.Tensor, theta0: torch.Tensor, prior: torch.Tensor, ridge: float, *,
                  fixed_bias: torch.Tensor | None = None, temperature: float = 2.0, eps: float = 0.01,
                  max_iter: int = 200, tol: float = 1e-6, start: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Θ (C, D) minimising the softmax-weighted error above, by preconditioned conjugate gradients from Θ₀
    (or from ``start``, e.g. the solution at a neighbouring ridge).

    Args:
        u: (N, D) the layer's inputs in the compressed network (append a ones column for an intercept).
        z: (N, C) the original logits.
        theta0: (C, D) the starting point (the least-squares refit).
        prior: (C, D) what the ridge shrinks towards (the original weights on the kept inputs).
        ridge: relative ridge r, as the least-squares refit's: λ = r · (mean weight) · trace(UᵀU)/D per
            unknown, except for an intercept column (the last, when its column of u is constant 1).
        fixed_bias: (C,) a bias the layer keeps (not refit): the logits are Θu + fixed_bias.
        temperature: τ of p = softmax(z/τ) (τ > 1 spreads the weight over more classes, as distillation does).
        eps: the plain squared error mixed in (relative to H, whose entries are at most 1/4).
        max_iter, tol: stop after this many iterations or at a residual of ``tol`` relative to the right-hand
            side (1e-6: far below what the held-out choice can tell apart).

    Returns:
        (Θ, report) with the mean KL at temperature 1 before (Θ₀) and after, and the iterations.
    """
    u, z = u.double(), z.double()
    fixed = torch.zeros(z.shape[1], dtype=torch.float64) if fixed_bias is None else fixed_bias.double()
    fit = SoftmaxFit(u, z, torch.softmax(z / temperature, 1), eps, fixed)
    scale = fit.p * (1 - fit.p) + eps  # (N, C): the diagonal of H + ε·I per row
    s = scale.mean(0)  # (C,) per class
    gram = u.t() @ u
    d = u.shape[1]
    lam = torch.full((d,), ridge * float(s.mean()) * float(torch.trace(gram)) / max(d, 1), dtype=torch.float64)
    if d and bool((u[:, -1] == 1).all()):
        lam[-1] = 0.0  # the intercept is not shrunk (as the least-squares refit)
    prior = prior.double()

    def apply_a(theta: torch.Tensor) -> torch.Tensor:
        return fit.weigh(u @ theta.t()).t() @ u + theta * lam

    pre = torch.linalg.cholesky(gram * float(s.mean()) + torch.diag(lam) +
                                1e-12 * float(torch.trace(gram)) / max(d, 1) * torch.eye(d, dtype=torch.float64))

    def precondition(r: torch.Tensor) -> torch.Tensor:  # (diag(s_c) ⊗ G)⁻¹, G = UᵀU·s̄ + Λ
        return torch.cholesky_solve(r.t(), pre).t() * (float(s.mean()) / s)[:, None]

    rhs = fit.weigh(z - fixed).t() @ u + prior * lam
    theta = (theta0 if start is None else start).double().clone()
    r = rhs - apply_a(theta)
    y = precondition(r)
    direction = y.clone()
    rho = float((r * y).sum())
    norm_rhs = float(rhs.norm()) or 1.0
    it = 0
    while it < max_iter and float(r.norm()) > tol * norm_rhs:
        a_dir = apply_a(direction)
        alpha = rho / float((direction * a_dir).sum())
        theta += alpha * direction
        r -= alpha * a_dir
        y = precondition(r)
        rho, rho_old = float((r * y).sum()), rho
        direction = y + (rho / rho_old) * direction
        it += 1
    report = {"output_loss": "kl", "temperature": temperature, "kl_mix": eps, "cg_iterations": it,
              "kl_least_squares": fit.kl(theta0.double()), "kl": fit.kl(theta),
              "cg_residual": float(r.norm()) / norm_rhs}
    return theta, report


#: rows × classes × inputs of one product of the conjugate gradients at most (≈ 1 s on one CPU core in float64):
#: more rows are subsampled, and a layer that cannot have as many rows as inputs per class (a language model's
#: 32,000-token head over 4,096 inputs) is left to least squares
MAX_PRODUCT_MACS = 1 << 30


def max_rows(classes: int, inputs: int) -> int:
    """The most rows a softmax fit of ``classes`` × ``inputs`` unknowns uses (:data:`MAX_PRODUCT_MACS`)."""
    return MAX_PRODUCT_MACS // max(1, classes * inputs)


def logits_rows(targets: Targets, compressed: nn.Module, name: str, passes: Passes | None, max_bytes: int,
                seed: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u (N, D), z (N, C), sample (N,)): layer ``name``'s inputs in ``compressed``, its original outputs, a
    row per sample (or token), float64, and the calibration input each row comes from. When the rows would
    exceed ``max_bytes`` or number more than ``limit``, a seeded random fraction of every batch's rows is kept
    (the same for each batch)."""
    us, zs, owners, keep, seen = [], [], [], None, 0
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(targets.model, compressed):
        for b, xb in enumerate(batches(targets.inputs, targets.batch_size)):
            z, _ = targets.batch(name, b, xb)
            x, _ = compressed_values(compressed, name, None, passes, b, xb)
            x = x.reshape(-1, x.shape[-1])
            n = n_inputs(xb)
            owner = seen + torch.arange(x.shape[0]) // (x.shape[0] // n)
            seen += n
            if keep is None:
                rows = z.shape[0] * n_inputs(targets.inputs) / n  # all batches' rows
                keep = min(1.0, max_bytes / (8 * (x.shape[1] + z.shape[1] + 1) * rows),
                           (limit or rows) / rows)
            if keep < 1.0:
                idx = torch.randperm(x.shape[0], generator=gen)[:max(1, round(keep * x.shape[0]))].sort().values
                x, z, owner = x[idx], z[idx], owner[idx]
            us.append(x.double())
            zs.append(z.double())
            owners.append(owner)
    return torch.cat(us), torch.cat(zs), torch.cat(owners)
