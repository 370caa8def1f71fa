"""Loss and accuracy along paths between two solutions w_A (t = 0) and w_B (t = 1) in parameter space.

* Straight line:        φ(t) = (1 − t) w_A + t w_B
* Quadratic Bézier:     φ_θ(t) = (1 − t)² w_A + 2t(1 − t) θ + t² w_B      (Garipov et al. 2018)

  with fixed endpoints and only the control point θ trained, by SGD on E_{t∼U(0,1)} L(φ_θ(t)), one
  t per minibatch (∂L/∂θ = 2t(1 − t) ∇L(φ_θ(t))). θ starts at the midpoint (w_A + w_B)/2, where the
  curve *is* the straight line, so zero training reproduces the linear path.

Both endpoints are exact: φ(0) = w_A and φ(1) = w_B bit for bit.

BatchNorm: the running statistics of a model at an interpolated point are meaningless, so at every
point of a path, endpoints included, they are **recomputed** on a few fixed training batches
(``torch.optim.swa_utils.update_bn``: reset, cumulative average, train-mode forward passes), as
mode-connectivity work does (Garipov et al.; the gRDA reference's curve code). Models without BN are
evaluated as they are, so there the path's ends equal the endpoint models' numbers exactly.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError
from ..metrics import evaluate
from ..runtime import eval_mode
from .hessian import parameter_views, set_flat_parameters

__all__ = ["PathEvaluator", "PathResult", "bezier_point", "has_batchnorm", "linear_point", "train_bezier"]

Batch = tuple[torch.Tensor, torch.Tensor]


def linear_point(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 − t) a + t b; exactly a at t = 0 and exactly b at t = 1."""
    return (1.0 - t) * a + t * b


def bezier_point(a: torch.Tensor, theta: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 − t)² a + 2t(1 − t) θ + t² b; exactly a at t = 0 and exactly b at t = 1."""
    return (1.0 - t) ** 2 * a + (2.0 * t * (1.0 - t)) * theta + t * t * b


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass
class PathResult:
    """Numbers at each point t of a path (lists of equal length). ``train_*`` on the fixed training subset."""

    alpha: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def barrier(self) -> float:
        """max_t L(φ(t)) − max(L(φ(0)), L(φ(1))): the loss barrier along the path (≤ 0: none)."""
        return max(self.train_loss) - max(self.train_loss[0], self.train_loss[-1])


class PathEvaluator:
    """Evaluate a working ``model`` at flat parameter vectors: training loss/accuracy on ``train_batches``
    (a fixed subset) and test loss/accuracy on ``test_loader``; with BN, running statistics are first
    recomputed on ``train_batches`` (see the module docstring). The model's parameters are overwritten.
    """

    def __init__(self, model: nn.Module, train_batches: Sequence[Batch], test_loader: Iterable):
        if not train_batches:
            raise ConfigError("PathEvaluator needs at least one training batch")
        self.model = model
        self.train_batches = list(train_batches)
        self.test_loader = test_loader
        self.recompute_bn = has_batchnorm(model)

    def __call__(self, w: torch.Tensor) -> dict[str, float]:
        set_flat_parameters(self.model, w)
        if self.recompute_bn:
            torch.optim.swa_utils.update_bn(self.train_batches, self.model)
        train = evaluate(self.model, self.train_batches, topk=(1,))
        test = evaluate(self.model, self.test_loader, topk=(1,))
        return {"train_loss": train["loss"], "train_accuracy": train["accuracy"],
                "test_loss": test["loss"], "test_accuracy": test["accuracy"]}

    def path(self, point, ts: Sequence[float]) -> PathResult:
        """:class:`PathResult` of ``point(t)`` (a flat vector) at every ``t`` in ``ts``."""
        out = PathResult()
        for t in ts:
            m = self(point(t))
            out.alpha.append(float(t))
            for key in ("train_loss", "test_accuracy", "train_accuracy", "test_loss"):
                getattr(out, key).append(m[key])
        return out


def train_bezier(model: nn.Module, a: torch.Tensor, b: torch.Tensor, loader: Iterable, *, epochs: int,
                 lr: float = 0.05, momentum: float = 0.9, seed: int = 0) -> torch.Tensor:
    """Train the control point θ (d,) of the Bézier curve from ``a`` to ``b`` (module docstring).

    ``loader`` yields training batches ``(x, y)`` (call ``set_epoch`` if it has one); ``model`` is the
    architecture (its parameter values are not used; in train mode BN uses batch statistics). SGD with
    heavy-ball ``momentum``, constant ``lr``, one t ∼ U(0, 1) per step drawn from ``seed``. Returns θ.
    """
    if a.shape != b.shape:
        raise ConfigError(f"Bézier endpoints differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if epochs < 0:
        raise ConfigError(f"Bézier epochs must be >= 0, got {epochs}")
    theta = 0.5 * (a + b)
    velocity = torch.zeros_like(theta)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # eval_mode restores every submodule's own flag on exit; inside, the curve is trained in train mode.
    with eval_mode(model, no_grad=False):
        model.train()
        for epoch in range(epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for x, y in loader:
                t = float(torch.rand((), generator=gen))
                w = bezier_point(a, theta, b, t).requires_grad_(True)
                loss = F.cross_entropy(functional_call(model, parameter_views(model, w), (x.to(a.device),)),
                                       y.to(a.device))
                (g,) = torch.autograd.grad(loss, w)
                with torch.no_grad():
                    velocity.mul_(momentum).add_(g, alpha=2.0 * t * (1.0 - t))
                    theta.sub_(velocity, alpha=lr)
    return theta
