"""Hessian-vector products of the training loss, Lanczos top-k eigenpairs, projection fractions.

The loss is a function of the flat parameter vector w ∈ R^d (every parameter of the model, in
``model.parameters()`` order; buffers such as BN running statistics stay fixed):

    L(w) = (1/N) Σ_{(x, y) in batches} CE(f(x; w), y)          N = total number of samples

evaluated in eval mode (BN uses its running statistics, dropout is off), so L is a deterministic
function of w and its Hessian H = ∇²L(w) is symmetric. No dense Hessian is ever formed: H·v comes
from double backpropagation, ``∇_w (∇_w L(w) · v)``, one batch at a time (memory of one batch).

:func:`lanczos` runs the symmetric Lanczos iteration with full reorthogonalisation on any symmetric
operator and returns its largest (algebraic) eigenvalues with their Ritz vectors;
:func:`projection_fraction` is the paper's ‖P_k d‖ / ‖d‖ (docs/grda.md, "Directional pruning diagnostics").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError
from ..runtime import eval_mode

__all__ = [
    "Eigenpairs",
    "HessianOperator",
    "eigen_residuals",
    "expected_random_fraction",
    "flat_parameters",
    "lanczos",
    "loss_of_flat",
    "parameter_views",
    "projection_fraction",
    "random_projection_fractions",
    "set_flat_parameters",
    "top_hessian_eigenpairs",
]

Batch = tuple[torch.Tensor, torch.Tensor]


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one detached vector (d,), in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def set_flat_parameters(model: nn.Module, w: torch.Tensor) -> None:
    """Copy the flat vector ``w`` (d,) into ``model``'s parameters (inverse of :func:`flat_parameters`)."""
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    if w.dim() != 1 or w.numel() != d:
        raise ConfigError(f"flat parameter vector must have shape ({d},), got {tuple(w.shape)}")
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w.to(params[0]), params)


def parameter_views(model: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter name: view of ``w``} shaped like the model's parameters."""
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = w[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def loss_of_flat(model: nn.Module, batches: Sequence[Batch]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w ↦ L(w)``: mean cross-entropy over all samples of ``batches`` at parameters ``w`` (d,).

    Uses ``torch.func.functional_call`` (the model's own parameters are untouched); the caller puts the
    model in the mode wanted (eval for the Hessian). Differentiable twice, so it also serves
    ``torch.autograd.functional.hessian`` in tests.
    """
    total = sum(int(y.shape[0]) for _, y in batches)
    if total == 0:
        raise ConfigError("the loss needs at least one sample")

    def loss(w: torch.Tensor) -> torch.Tensor:
        params = parameter_views(model, w)
        return sum(F.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")
                   for x, y in batches) / total

    return loss


class HessianOperator:
    """v ↦ H v for the training loss at the model's current parameters (see the module docstring).

    Args:
        model: evaluated in eval mode; its parameters define the point w.
        batches: the fixed data ``[(x (B, ...), y (B,)), ...]`` defining L.
    Attributes: ``dim`` (d), ``point`` (w, detached), ``calls`` (number of products so far).
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch]):
        if not batches:
            raise ConfigError("HessianOperator needs at least one batch")
        self.model = model
        self.batches = list(batches)
        self.point = flat_parameters(model)
        self.dim = self.point.numel()
        self.total = sum(int(y.shape[0]) for _, y in self.batches)
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.dim,):
            raise ConfigError(f"HessianOperator expects a vector of shape ({self.dim},), got {tuple(v.shape)}")
        v = v.to(self.point)
        out = torch.zeros_like(self.point)
        with eval_mode(self.model, no_grad=False):  # double backprop needs the graph
            for x, y in self.batches:
                w = self.point.clone().requires_grad_(True)
                logits = functional_call(self.model, parameter_views(self.model, w), (x,))
                loss = F.cross_entropy(logits, y, reduction="sum") / self.total
                (g,) = torch.autograd.grad(loss, w, create_graph=True)
                (hv,) = torch.autograd.grad(g @ v, w)
                out += hv
        self.calls += 1
        return out


@dataclass
class Eigenpairs:
    """Largest eigenvalues (k,), descending, with orthonormal Ritz vectors as columns (d, k).

    ``residuals[i]`` = ‖A q_i − λ_i q_i‖ (from the Lanczos recurrence: |β_m s_{m,i}|), a convergence check.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, k: int, *, iterations: int | None = None,
            seed: int = 0, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Eigenpairs:
    """Top-``k`` (largest algebraic) eigenpairs of the symmetric operator ``matvec`` on R^dim.

    Lanczos with full reorthogonalisation (classical Gram–Schmidt, twice): q_1 random unit vector,
    ``r = A q_j − β_{j-1} q_{j-1}``, ``α_j = q_j·r``, r ⟂ {q_1..q_j}, ``β_j = ‖r‖``, q_{j+1} = r/β_j.
    The Ritz pairs of the tridiagonal T_m (m = ``iterations``, default min(dim, max(2k, k + 30)))
    approximate the extreme eigenpairs; with m = dim they are exact up to rounding. An exhausted Krylov
    space (β ≈ 0) is continued with a fresh random vector orthogonal to the basis. The basis Q (m × dim)
    is held in ``dtype``; ``matvec`` receives vectors in that dtype and may return any float dtype.
    """
    if not 1 <= k <= dim:
        raise ConfigError(f"lanczos needs 1 <= k <= dim, got k={k}, dim={dim}")
    m = min(dim, iterations if iterations is not None else max(2 * k, k + 30))
    if m < k:
        raise ConfigError(f"lanczos needs iterations >= k, got iterations={m}, k={k}")
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def random_unit(basis: torch.Tensor) -> torch.Tensor:
        q = torch.randn(dim, generator=gen, dtype=dtype).to(device)
        for _ in range(2):
            q -= basis.T @ (basis @ q)
        return q / q.norm()

    Q = torch.zeros(m, dim, dtype=dtype, device=device)
    alpha = torch.zeros(m, dtype=dtype, device=device)
    beta = torch.zeros(m, dtype=dtype, device=device)
    Q[0] = random_unit(Q[:0])
    scale = 0.0
    for j in range(m):
        r = matvec(Q[j]).to(dtype)
        alpha[j] = Q[j] @ r
        basis = Q[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan–Parlett)
            r -= basis.T @ (basis @ r)
        beta[j] = r.norm()
        scale = max(scale, float(alpha[j].abs()), float(beta[j]))
        if j + 1 == m:
            break
        if beta[j] <= 1e-10 * max(scale, 1e-30):  # invariant subspace found: restart orthogonally
            beta[j] = 0.0
            Q[j + 1] = random_unit(basis)
        else:
            Q[j + 1] = r / beta[j]
    T = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    evals, S = torch.linalg.eigh(T)  # ascending
    top = torch.arange(m - 1, m - 1 - k, -1, device=S.device)
    vectors = Q.T @ S[:, top]
    residuals = (beta[m - 1] * S[m - 1, top]).abs()
    return Eigenpairs(values=evals[top], vectors=vectors, residuals=residuals, iterations=m)


def top_hessian_eigenpairs(model: nn.Module, batches: Sequence[Batch], k: int, *, iterations: int | None = None,
                           seed: int = 0) -> Eigenpairs:
    """Top-``k`` eigenpairs of the training-loss Hessian at ``model``'s parameters (Lanczos on HVPs)."""
    op = HessianOperator(model, batches)
    return lanczos(op, op.dim, k, iterations=iterations, seed=seed, device=op.point.device)


def eigen_residuals(matvec: Callable[[torch.Tensor], torch.Tensor], pairs: Eigenpairs) -> torch.Tensor:
    """True residuals ‖A q_i − λ_i q_i‖ (k,) of Ritz pairs, from k more products (the recurrence's
    estimate in ``pairs.residuals`` ignores rounding in ``matvec``, e.g. float32 HVPs)."""
    q = pairs.vectors
    return torch.stack([(matvec(q[:, i]).to(q) - pairs.values[i] * q[:, i]).norm() for i in range(q.shape[1])])


def projection_fraction(direction: torch.Tensor, basis: torch.Tensor) -> float:
    """‖Q Qᵀ d‖ / ‖d‖ = ‖Qᵀ d‖ / ‖d‖ for ``basis`` Q (dim, k) with orthonormal columns and d (dim,).

    1 when d lies in span(Q), 0 when d ⟂ span(Q); a uniformly random direction gives ≈ √(k/dim).
    """
    if direction.dim() != 1 or basis.dim() != 2 or basis.shape[0] != direction.shape[0]:
        raise ConfigError(f"projection_fraction needs d (dim,) and Q (dim, k), got {tuple(direction.shape)} "
                          f"and {tuple(basis.shape)}")
    d = direction.to(basis)
    norm = d.norm()
    if norm == 0:
        raise ConfigError("projection_fraction of a zero direction is undefined (the two solutions coincide)")
    return float((basis.T @ d).norm() / norm)


def random_projection_fractions(basis: torch.Tensor, norm: float, draws: int, *, seed: int = 0) -> list[float]:
    """:func:`projection_fraction` of ``draws`` Gaussian directions rescaled to ``norm`` (isotropic, so the
    fraction does not depend on the norm; kept for the like-for-like comparison). Expected ≈ √(k/dim)."""
    if draws < 1:
        raise ConfigError(f"random draws must be >= 1, got {draws}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(draws):
        r = torch.randn(basis.shape[0], generator=gen, dtype=basis.dtype).to(basis.device)
        out.append(projection_fraction(r * (norm / r.norm()), basis))
    return out


def expected_random_fraction(k: int, dim: int) -> float:
    """E‖P_k r‖/‖r‖ ≈ √(k/dim) for an isotropic random r (the reference level for the projection fraction)."""
    return math.sqrt(k / dim)
