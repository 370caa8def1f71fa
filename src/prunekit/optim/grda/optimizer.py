"""gRDA: generalized regularized dual averaging (Chao, Wang, Xing & Cheng, NeurIPS 2020).

SGD on an fp32 *accumulator* started at the initial weights, followed by elementwise soft-thresholding
with a scalar threshold that grows with the number of steps (``docs/grda.md``, "The update rule").
Registered as the optimizer ``grda`` (``create_optimizer("grda", params, lr=0.1, c=0.005, mu=0.55)``),
importable as ``prunekit.optim.GRDA``.

Also registers the per-epoch schedule ``linear-hold`` used by the paper's CIFAR runs (constant for the
first half, linear down to ``gamma`` at 90 % of the epochs, then held).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from .. import register_optimizer, register_schedule

__all__ = ["GRDA", "soft_threshold", "threshold_increment"]

# ``softshrink(input, lambd, out=...)`` writes S_λ(v) straight into ``p``: one fused elementwise kernel, no
# temporary. It is torch's private binding, so it is looked up once and used only where it exists; the
# public ``F.softshrink`` (same kernel, plus one temporary and a copy) is the fallback.
_FUSED_SOFTSHRINK = getattr(getattr(torch._C, "_nn", None), "softshrink", None)


def soft_threshold(v: Tensor, tau: float | Tensor, *, out: Tensor | None = None) -> Tensor:
    """``S_τ(v) = sign(v) · max(|v| − τ, 0)`` elementwise; ``|v| = τ`` gives 0.

    Args:
        v: any floating tensor.
        tau: a number ≥ 0 (softshrink: the fused kernel into ``out`` where torch has it, else the public
            ``F.softshrink``), or a tensor ≥ 0 broadcastable to ``v`` (per-element thresholds; computed
            as ``sign(v) * clamp(|v| − τ, min=0)``).
        out: written with the result (cast to its dtype) and returned, when given.
    """
    if isinstance(tau, Tensor):
        r = torch.sign(v) * (v.abs() - tau).clamp_min(0)
    elif out is not None and _FUSED_SOFTSHRINK is not None and out.dtype == v.dtype:
        return _FUSED_SOFTSHRINK(v, tau, out=out)
    else:
        r = F.softshrink(v, tau)
    if out is None:
        return r
    return out.copy_(r)


def threshold_increment(k: int, mu: float) -> float:
    """``k**mu - (k-1)**mu`` for the ``k``-th step (k ≥ 1), without cancellation for large ``k``.

    Written as ``-k**mu * expm1(mu * log1p(-1/k))``; equals 1 at ``k = 1``.
    """
    if k <= 1:
        return 1.0
    return -(k ** mu) * math.expm1(mu * math.log1p(-1.0 / k))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_hyperparameters(lr: Any, c: Any, mu: Any) -> None:
    if not _is_real(lr) or lr <= 0:
        raise ConfigError(f"gRDA: lr={lr!r} must be a positive finite number")
    if not _is_real(c) or c < 0:
        raise ConfigError(f"gRDA: c={c!r} must be a finite number >= 0 (c = 0 is plain SGD)")
    if not _is_real(mu) or not 0 < mu <= 1:
        raise ConfigError(f"gRDA: mu={mu!r} must be in (0, 1] (the paper uses 0.4 ... 0.85; theory wants "
                          f"0.5 < mu < 1)")


class GRDA(torch.optim.Optimizer):
    r"""gRDA (generalized regularized dual averaging): directional pruning by an ℓ1 dual-averaging step.

    Every parameter tensor ``p`` (shape ``S``) keeps an fp32 accumulator ``v`` (shape ``S``), a step
    count ``k`` and a scalar threshold ``τ``. One :meth:`step` on the tensor, with the group's current
    learning rate :math:`\gamma`, does

    .. math::
        \begin{aligned}
            &\textbf{if } k = 0:\ v \leftarrow p \ \text{(in fp32)},\quad \tau \leftarrow 0 \\
            &k \leftarrow k + 1 \\
            &v \leftarrow v - \gamma\, \nabla f(p)                                   \\
            &\tau \leftarrow \tau + c\, \gamma^{\mu + 1/2} \big(k^{\mu} - (k-1)^{\mu}\big) \\
            &p \leftarrow S_\tau(v) = \operatorname{sign}(v) \max(|v| - \tau, 0)
        \end{aligned}

    With a constant :math:`\gamma` the threshold is :math:`\tau_k = c\,\gamma^{1/2}(k\gamma)^{\mu}`, i.e.
    :math:`p_k = S_{\tau_k}(p_0 - \gamma \sum_{i<k} \nabla f(p_i))`; with a schedule each increment uses
    that step's :math:`\gamma` (a ×0.1 decay shrinks the increments ×10^{μ+½}, which freezes the
    sparsity). ``c = 0`` is exactly ``torch.optim.SGD(lr)`` (no momentum, no weight decay). The zeros
    are exact; a zero comes back when ``|v|`` outgrows ``τ``. There is no momentum and no weight decay,
    and any external in-place change of ``p`` is overwritten at the next step (``p`` is recomputed
    from ``v``). Every parameter given is thresholded (the reference includes BN and biases); pass
    only the tensors to sparsify, or a group with ``c=0`` for the rest.

    ``k`` counts the steps in which the tensor had a gradient (``grad is None`` skips the tensor and
    its counter). ``k`` and ``τ`` are Python int / float64; ``v`` is fp32 whatever ``p``'s dtype
    (bf16/fp16 parameters receive ``S_τ(v)`` rounded), also after :meth:`load_state_dict`, so a
    resumed run continues bit-identically and pruned weights do not regrow.

    Args:
        params: tensors or param-group dicts (groups may set their own ``lr``, ``c``, ``mu``).
        lr: learning rate :math:`\gamma > 0` (the one that works for SGD *without* momentum).
        c: initial sparse control, ≥ 0 (paper: 5e-4 ... 1e-2; larger → more sparsity, mostly early).
        mu: sparsity control in (0, 1] (paper: 0.4 ... 0.85, recommended 0.501 / 0.51 / 0.55;
            larger → more sparsity; the threshold outgrows gradient noise only for mu > 0.5).
        foreach: ``True``/``None`` (default): multi-tensor path (one ``_foreach_add_`` per device and
            dtype, then one fused softshrink kernel per tensor written straight into ``p``: read
            ``g``, read/write ``v``, write ``p``, no temporaries for fp32 parameters; where torch lacks
            that private binding, the public ``F.softshrink`` plus a copy: same values). ``False``: the
            reference path, the formula above op by op. Both give bit-identical results on CPU.

    Raises:
        ConfigError (a ValueError): lr ≤ 0, c < 0 or mu outside (0, 1], naming the value.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, c: float = 0.005, mu: float = 0.51,
                 foreach: bool | None = None):
        _check_hyperparameters(lr, c, mu)
        super().__init__(params, {"lr": lr, "c": c, "mu": mu, "foreach": foreach})
        self._scratch: dict[torch.device, Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's ``lr``/``c``/``mu`` (its own or the defaults), then add it."""
        get = lambda k: param_group.get(k, self.defaults.get(k))
        _check_hyperparameters(get("lr"), get("c"), get("mu"))
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})
        for group in self.param_groups:
            group.setdefault("foreach", None)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """One gRDA update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, c, mu = group["lr"], group["c"], group["mu"]
            scale = c * lr ** (mu + 0.5)
            increments: dict[int, float] = {}
            params, grads, accs, taus = [], [], [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("gRDA does not support sparse gradients")
                if p.is_complex():
                    raise RuntimeError("gRDA does not support complex parameters")
                state = self.state[p]
                if not state:  # v₀ = w₀: the weights at the first step, in fp32
                    state["step"] = 0
                    state["threshold"] = 0.0
                    state["accumulator"] = p.detach().to(torch.float32, copy=True)
                k = state["step"] + 1
                inc = increments.get(k)
                if inc is None:
                    inc = increments[k] = scale * threshold_increment(k, mu)
                state["step"] = k
                state["threshold"] += inc
                params.append(p)
                grads.append(g)
                accs.append(state["accumulator"])
                taus.append(state["threshold"])
            if not params:
                continue
            if group["foreach"] is False:
                self._reference_update(params, grads, accs, taus, lr)
            else:
                self._foreach_update(params, grads, accs, taus, lr)
        return loss

    @staticmethod
    def _reference_update(params: list[Tensor], grads: list[Tensor], accs: list[Tensor], taus: list[float],
                          lr: float) -> None:
        """The update rule op by op, one tensor at a time (the readable reference)."""
        for p, g, v, tau in zip(params, grads, accs, taus):
            v.add_(g, alpha=-lr)
            p.copy_(v.sign() * (v.abs() - tau).clamp_min(0))

    def _foreach_update(self, params: list[Tensor], grads: list[Tensor], accs: list[Tensor], taus: list[float],
                        lr: float) -> None:
        """``v -= lr·g`` batched per (device, grad dtype); then ``p = softshrink(v, τ)`` per tensor.

        fp32 parameters: softshrink writes ``p`` directly (memory traffic: read ``g``, read/write ``v``,
        write ``p``). Other dtypes go through one reused fp32 scratch buffer per device.
        """
        buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for g, v in zip(grads, accs):
            a, b = buckets.setdefault((v.device, g.dtype), ([], []))
            a.append(v)
            b.append(g)
        for a, b in buckets.values():
            torch._foreach_add_(a, b, alpha=-lr)
        for p, v, tau in zip(params, accs, taus):
            if p.dtype == torch.float32:
                soft_threshold(v, tau, out=p)
            else:
                p.copy_(soft_threshold(v, tau, out=self._scratch_like(v)))

    def _scratch_like(self, v: Tensor) -> Tensor:
        buf = self._scratch.get(v.device)
        if buf is None or buf.numel() < v.numel():
            buf = self._scratch[v.device] = torch.empty(v.numel(), dtype=torch.float32, device=v.device)
        return buf[: v.numel()].view(v.shape)

    # ------------------------------------------------------------------ state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like :meth:`torch.optim.Optimizer.load_state_dict`, but accumulators stay fp32 (torch would
        cast them to the parameter dtype) and are copied, never aliased with ``state_dict``."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        accs = {pid: s["accumulator"] for pid, s in state_dict["state"].items()
                if isinstance(s, dict) and "accumulator" in s}
        super().load_state_dict(state_dict)
        by_id = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for pid, acc in accs.items():
            p = by_id[pid]
            if not isinstance(acc, Tensor) or tuple(acc.shape) != tuple(p.shape):
                shape = tuple(acc.shape) if isinstance(acc, Tensor) else type(acc).__name__
                raise ValueError(f"gRDA state for parameter {pid}: accumulator {shape} does not match the "
                                 f"parameter's shape {tuple(p.shape)}")
            state = self.state[p]
            state["accumulator"] = acc.detach().to(device=p.device, dtype=torch.float32, copy=True)
            state["step"] = int(state["step"])
            state["threshold"] = float(state["threshold"])
        self._scratch = {}

    def thresholds(self) -> list[float]:
        """Current τ of every parameter that has state, in parameter order."""
        return [self.state[p]["threshold"] for g in self.param_groups for p in g["params"] if p in self.state]


register_optimizer("grda", GRDA)


class _LinearHold:
    """Per-epoch factor of the ``linear-hold`` schedule (picklable: stored on the LambdaLR)."""

    def __init__(self, epochs: int, gamma: float):
        self.epochs, self.gamma = epochs, gamma

    def __call__(self, epoch: int) -> float:
        t = epoch / self.epochs
        if t <= 0.5:
            return 1.0
        if t <= 0.9:
            return 1.0 - (t - 0.5) / 0.4 * (1.0 - self.gamma)
        return self.gamma


@register_schedule("linear-hold")
def _linear_hold_schedule(*, epochs, step_size, milestones, gamma):
    """Factor 1 while ``e/epochs ≤ 0.5``, linear to ``gamma`` at ``e/epochs = 0.9``, then ``gamma``
    (the CIFAR schedule of the gRDA paper, after Garipov et al.; gamma = 0.01 there)."""
    return _LinearHold(epochs, gamma)
