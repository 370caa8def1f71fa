"""Neuron Merging decomposition (Kim et al., NeurIPS 2020, Algorithms 1–3), vectorised.

Orientation (PyTorch, weights are out × in): a layer has N output neurons, ``keep`` (P indices) are the
survivors chosen by a pruning criterion. The decomposition returns ``M ∈ R^{N×P}`` (the paper's
``Z^T``): ``M[keep[p], p] = 1``; a pruned neuron ``n`` merged into kept column ``p*`` has
``M[n, p*] = scale_n`` (one entry per row); a pruned neuron that is not merged has a zero row. The
next layer absorbs it as ``W_next ×_in M`` (``W_new[:, p] = Σ_n M[n, p]·W_next[:, n]``), so several
pruned neurons merged into one kept neuron add up.

* **MostSim** (Alg. 2, layers without BatchNorm): vectors ``v_n = [w_n | b_n]``; the kept neuron with
  the largest cosine similarity is chosen, ``scale = ||v_n|| / ||v_p*||``. Exact when ``v_n`` is a
  positive multiple of ``v_p*`` (ReLU is positively homogeneous).
* **MostSim with BN** (Alg. 3, producer → BatchNorm → ReLU): ``score_m = λ·(1 − cos) + (1 − λ)·B̂_m``
  where ``B̂`` is the min-max normalised bias mismatch over the kept set; ``p* = argmin score``; the
  threshold is applied to the cosine of the chosen candidate. Two BN algebras:

  - ``bn_scale="exact"`` (default): with ``k = γ/σ`` (σ = sqrt(running_var + eps)) and a producer bias
    folded into the running mean, ``F_n = s·F_m`` gives ``BN_n = S·BN_m + B`` with
    ``S = s·k_n/k_m`` and ``B = β_n − S·β_m + k_n·(s·μ_m − μ_n)``. The scale is ``S`` and the mismatch
    ``|B|`` (the error the merge adds to neuron n's pre-activation). An exact positive duplicate
    (``B = 0``) is merged without changing the network output.
  - ``bn_scale="paper"``: the official code's formulas verbatim (``docs/neuron-merging.md``: running
    *variance* instead of σ, BN ratio inverted): ``S = s·(γ_m/γ_n)·(v_n/v_m)`` and
    ``B = |(γ_m/v_m)·(s·(μ_n − v_n·β_n/γ_n) − μ_m) + β_m| / S``. Use it to reproduce the paper's numbers.

A chosen candidate with a non-positive scale would break ``ReLU(S·z) = S·ReLU(z)``; it is never merged
silently: by default it is skipped (the neuron is pruned) and counted (``negative="allow"`` keeps it, as
the official code does, still counted). Non-finite scores (zero γ, zero-norm filters) are skipped too.

Everything is one batched tensor computation per layer (R pruned × P kept), in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

BN_SCALES = ("exact", "paper")
#: why a pruned neuron ended as it did (Decomposition.code indexes this)
REASONS = ("merged", "threshold", "sign", "invalid", "prune")
NEGATIVE = ("skip", "allow")


@dataclass(frozen=True)
class BNStats:
    """Per-channel BatchNorm (eval) parameters of the N neurons of one layer, float64 (N,) each.

    ``mean`` already includes a producer bias (``μ − b``), see :meth:`fold_bias`.
    """

    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float = 1e-5

    @classmethod
    def from_module(cls, bn: torch.nn.Module) -> BNStats:
        """Read a ``BatchNorm*d`` in eval semantics (running statistics; affine=False → γ=1, β=0)."""
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ConfigError(f"{type(bn).__name__} has no running statistics: Neuron Merging needs an eval-mode "
                              "BatchNorm (track_running_stats=True)")
        mean = bn.running_mean.detach().double().cpu()
        var = bn.running_var.detach().double().cpu()
        n = mean.shape[0]
        gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
        beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
        return cls(gamma, beta, mean, var, float(bn.eps))

    def fold_bias(self, bias: torch.Tensor | None) -> BNStats:
        """Statistics seen by the bias-free producer: ``BN(Wx + b) = BN'(Wx)`` with ``μ' = μ − b``."""
        if bias is None:
            return self
        return BNStats(self.gamma, self.beta, self.mean - bias.detach().double().cpu(), self.var, self.eps)

    def select(self, idx: torch.Tensor) -> BNStats:
        return BNStats(self.gamma[idx], self.beta[idx], self.mean[idx], self.var[idx], self.eps)


@dataclass
class Decomposition:
    """Result of Algorithm 1 for one layer.

    Attributes:
        keep: kept neurons (P,), in the order of M's columns.
        merge: M (N, P) float64.
        pruned: the pruned neurons (R,).
        target: for each pruned neuron the chosen kept column (R,) (the argmax/argmin candidate, also
            for skipped ones), -1 where no valid candidate existed.
        sim: cosine similarity to the chosen candidate (R,).
        scale: scale of the chosen candidate (R,).
        merged: bool (R,): written into M.
        code: per pruned neuron an index into :data:`REASONS` (``reason`` gives the names).
    """

    keep: torch.Tensor
    merge: torch.Tensor
    pruned: torch.Tensor
    target: torch.Tensor
    sim: torch.Tensor
    scale: torch.Tensor
    merged: torch.Tensor
    code: torch.Tensor

    @property
    def reason(self) -> list[str]:
        """Per pruned neuron ``"merged" | "threshold" | "sign" | "invalid" | "prune"``."""
        return [REASONS[i] for i in self.code.tolist()]

    def counts(self) -> dict[str, int]:
        """How many pruned neurons were merged / skipped by threshold / sign / invalid scores."""
        n = torch.bincount(self.code.long(), minlength=len(REASONS)).tolist()
        return dict(zip(REASONS, n))

    def stats(self) -> dict[str, float | int | None]:
        """Counts plus similarity statistics of the merged pairs (cosine min/median/max, scale range)."""
        c = self.counts()
        sims, scales = self.sim[self.merged], self.scale[self.merged]
        out: dict[str, float | int | None] = {
            "merged": c["merged"], "skipped_threshold": c["threshold"], "skipped_sign": c["sign"],
            "skipped_invalid": c["invalid"], "negative_merged": int((scales <= 0).sum()) if len(scales) else 0,
        }
        if len(sims):
            out.update(sim_min=float(sims.min()), sim_median=float(sims.median()), sim_max=float(sims.max()),
                       scale_min=float(scales.min()), scale_max=float(scales.max()))
        else:
            out.update(sim_min=None, sim_median=None, sim_max=None, scale_min=None, scale_max=None)
        return out


def _as_index(keep, n: int) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
    if keep.numel() == 0:
        raise ConfigError("keep must hold at least one neuron")
    if int(keep.min()) < 0 or int(keep.max()) >= n or len(set(keep.tolist())) != keep.numel():
        raise ConfigError(f"keep must be distinct indices in [0, {n})")
    return keep


def _pruned(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return torch.nonzero(mask).flatten()


def _norms(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64)


def _rows(vectors: torch.Tensor) -> torch.Tensor:
    """(N, F) view of the neuron vectors on the CPU, float32/float64 kept as they are."""
    v = vectors.detach().cpu().reshape(vectors.shape[0], -1)
    return v if v.dtype in (torch.float32, torch.float64) else v.double()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor | None = None,
                  nb: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (R, F) with every row of ``b`` (P, F); 0 for zero rows.

    Norms in float64; the dot products of long rows (conv filters) in float32 — the precision of the
    official code (sklearn's cosine on float32 weights) at a quarter of the cost."""
    na = _norms(a) if na is None else na
    nb = _norms(b) if nb is None else nb
    denom = na[:, None] * nb[None, :]
    dots = (a.float() @ b.float().t()).double() if a.shape[1] > 1024 else a.double() @ b.double().t()
    return torch.where(denom > 0, dots / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.zeros_like(dots))


def _check(threshold: float | None, negative: str) -> None:
    if threshold is not None and not -1.0 <= float(threshold) <= 1.0 and threshold != 0:
        raise ConfigError(f"threshold must be a cosine in [-1, 1] (0 or None: no threshold), got {threshold!r}")
    if negative not in NEGATIVE:
        raise ConfigError(f"negative must be one of {list(NEGATIVE)}, got {negative!r}")


def _split(vectors: torch.Tensor, keep) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Rows ``v`` (N, F), N, and the kept / pruned indices."""
    v = _rows(vectors)
    n = v.shape[0]
    keep = _as_index(keep, n)
    return v, n, keep, _pruned(keep, n)


def _nothing_pruned(n: int, keep: torch.Tensor, threshold, negative):
    """The decomposition when no neuron is pruned: M is the identity on the kept neurons."""
    empty = (torch.zeros(0, dtype=t) for t in (torch.long, torch.float64, torch.float64, torch.bool))
    return _finish(n, keep, keep.new_zeros(0), *empty, threshold, negative)


def _finish(n: int, keep: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor, sim: torch.Tensor,
            scale: torch.Tensor, valid: torch.Tensor, threshold: float | None, negative: str) -> Decomposition:
    """Algorithm 1 given each pruned neuron's chosen candidate: build M and the per-neuron reasons."""
    p = len(keep)
    m = torch.zeros(n, p, dtype=torch.float64)
    m[keep, torch.arange(p)] = 1.0
    below = torch.zeros_like(valid) if not threshold else sim < float(threshold)  # t = 0 / None: no threshold
    negative_scale = scale <= 0
    sign_ok = ~negative_scale if negative == "skip" else torch.ones_like(valid)
    merged = valid & ~below & sign_ok
    code = torch.where(~valid, 3, torch.where(below, 1, torch.where(~sign_ok, 2, 0))).to(torch.int8)
    if merged.any():
        m[pruned[merged], target[merged]] = scale[merged]
    return Decomposition(keep, m, pruned, target, sim, scale, merged, code)


def prune_only(n: int, keep) -> Decomposition:
    """Model type ``prune``: the same ``keep``, M with zero rows for every pruned neuron."""
    keep = _as_index(keep, n)
    pruned = _pruned(keep, n)
    r = len(pruned)
    z = torch.zeros(r, dtype=torch.float64)
    m = torch.zeros(n, len(keep), dtype=torch.float64)
    m[keep, torch.arange(len(keep))] = 1.0
    return Decomposition(keep, m, pruned, torch.full((r,), -1, dtype=torch.long), z, z.clone(),
                         torch.zeros(r, dtype=torch.bool), torch.full((r,), REASONS.index("prune"), dtype=torch.int8))


def most_sim(vectors: torch.Tensor, keep, *, threshold: float | None = 0.45,
             negative: str = "skip") -> Decomposition:
    """Algorithms 1 + 2 (MostSim, no BatchNorm).

    Args:
        vectors: (N, F) one row per neuron: ``[w_n | b_n]`` for a Linear layer (the bias appended),
            the flattened filter (plus bias) for a conv.
        keep: the P kept neurons (M's column order).
        threshold: minimum cosine similarity to merge; ``0`` or ``None`` disables it (official semantics).
        negative: ``"skip"`` or ``"allow"`` a non-positive scale (only a zero-norm neuron can give one here).
    """
    _check(threshold, negative)
    v, n, keep, pruned = _split(vectors, keep)
    if len(pruned) == 0:
        return _nothing_pruned(n, keep, threshold, negative)
    norms = _norms(v)
    cos = cosine_matrix(v[pruned], v[keep], norms[pruned], norms[keep])  # (R, P)
    sim, target = cos.max(dim=1)
    kn = norms[keep][target]
    scale = torch.where(kn > 0, norms[pruned] / torch.where(kn > 0, kn, torch.ones_like(kn)), torch.zeros_like(kn))
    valid = (kn > 0) & torch.isfinite(scale)
    return _finish(n, keep, pruned, target, sim, scale, valid, threshold, negative)


def bn_scale_and_bias(s: torch.Tensor, bn_n: BNStats, bn_m: BNStats, bn_scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``S`` and bias mismatch ``B`` (both (R, P)) of merging pruned neurons (rows, ``bn_n`` (R,))
    into kept neurons (columns, ``bn_m`` (P,)) whose filters have norm ratio ``s`` (R, P). See the
    module docstring for the two algebras; values may be non-finite (zero γ), the caller masks them."""
    g1, b1, mu1, v1 = (t[:, None] for t in (bn_n.gamma, bn_n.beta, bn_n.mean, bn_n.var))
    g2, b2, mu2, v2 = (t[None, :] for t in (bn_m.gamma, bn_m.beta, bn_m.mean, bn_m.var))
    if bn_scale == "paper":
        scale = s * (g2 / g1) * (v1 / v2)
        bias = ((g2 / v2) * (s * (mu1 - v1 * b1 / g1) - mu2) + b2).abs() / scale
    elif bn_scale == "exact":
        k1 = g1 / torch.sqrt(v1 + bn_n.eps)
        k2 = g2 / torch.sqrt(v2 + bn_m.eps)
        scale = s * k1 / k2
        bias = (b1 - scale * b2 + k1 * (s * mu2 - mu1)).abs()
    else:
        raise ConfigError(f"bn_scale must be one of {list(BN_SCALES)}, got {bn_scale!r}")
    return scale, bias


def most_sim_bn(vectors: torch.Tensor, keep, bn: BNStats, *, lam: float = 0.85, threshold: float | None = 0.1,
                bn_scale: str = "exact", negative: str = "skip") -> Decomposition:
    """Algorithms 1 + 3 (MostSim with BatchNorm) for a producer followed by ``bn``.

    Args:
        vectors: (N, F) flattened filters (weights only: a producer bias belongs in ``bn.fold_bias``).
        keep: the P kept neurons (M's column order).
        bn: the BatchNorm statistics of the N neurons.
        lam: weight of the cosine distance against the normalised bias mismatch, in [0, 1].
        threshold: minimum cosine similarity of the chosen candidate; 0/None disables it.
        bn_scale: ``"exact"`` (default) or ``"paper"`` (the official formulas verbatim).
        negative: ``"skip"`` (default) or ``"allow"`` merges with a non-positive scale.
    """
    _check(threshold, negative)
    if bn_scale not in BN_SCALES:
        raise ConfigError(f"bn_scale must be one of {list(BN_SCALES)}, got {bn_scale!r}")
    if not 0.0 <= float(lam) <= 1.0:
        raise ConfigError(f"lam must be in [0, 1], got {lam!r}")
    v, n, keep, pruned = _split(vectors, keep)
    if bn.gamma.shape[0] != n:
        raise ConfigError(f"BatchNorm has {bn.gamma.shape[0]} channels, the layer {n} neurons")
    if len(pruned) == 0:
        return _nothing_pruned(n, keep, threshold, negative)
    norms = _norms(v)
    norms_p, norms_k = norms[pruned], norms[keep]
    cos = cosine_matrix(v[pruned], v[keep], norms_p, norms_k)  # (R, P)
    dist = 1.0 - cos
    s = norms_p[:, None] / norms_k[None, :]
    scale, bias = bn_scale_and_bias(s, bn.select(pruned), bn.select(keep), bn_scale)
    ok = torch.isfinite(scale) & torch.isfinite(bias) & (scale != 0)
    big = torch.finfo(torch.float64).max
    lo = torch.where(ok, bias, torch.full_like(bias, big)).min(dim=1, keepdim=True).values
    hi = torch.where(ok, bias, torch.full_like(bias, -big)).max(dim=1, keepdim=True).values
    rng = hi - lo
    norm_bias = torch.where(rng > 0, (bias - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                            torch.zeros_like(bias))  # all candidates equal (or one): no bias preference
    score = float(lam) * dist + (1.0 - float(lam)) * norm_bias
    score = torch.where(ok, score, torch.full_like(score, float("inf")))
    best, target = score.min(dim=1)
    valid = torch.isfinite(best)
    rows = torch.arange(len(pruned))
    sim = cos[rows, target]
    chosen = scale[rows, target]
    chosen = torch.where(valid, chosen, torch.zeros_like(chosen))
    return _finish(n, keep, pruned, target, sim, chosen, valid, threshold, negative)
