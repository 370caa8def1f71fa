"""The Polarization regularizer (Zhuang et al., NeurIPS 2020) and network slimming, as Trainer hooks.

Polarization adds ``λ·R(γ)`` to the batch-mean task loss, with

    R(γ) = Σ_i t·|γ_i| − |γ_i − γ̄|,      γ̄ = (1/n) Σ_j γ_j        (paper Eq. 1–2)

summed (not averaged) over the n regularized scaling factors of the **whole network** (one global
mean, gradient flowing through it), and clamps every factor to ``[0, a]`` after each optimizer step
(paper §3.2). Autograd of ``|x|`` uses sign(0) = 0, so the subgradient applied to factor k is

    ∂R/∂γ_k = t·s(γ_k) − s(γ_k − γ̄) + (1/n)·Σ_i s(γ_i − γ̄)         (s = sign; docs/polarization.md)

Network slimming (Liu et al. 2017) is ``λ·Σ|γ_i|`` on the same factors, without a clamp.

**Which factors.** A :class:`FactorSet` lists ``(module, parameter, entries)``. The default preset
``"engine"`` works for any traceable model: the scale (BN γ, or a :class:`GatedBatchNorm2d` gate) of
every norm layer that belongs to a prunable channel group of the :class:`~prunekit.engine.ChannelGraph`,
restricted to the group's prunable channels (e.g. in a CIFAR ResNet with option-A shortcuts, the
zero-padded residual channels are protected and not regularized). The paper's own choices are presets:
``resnet-cifar`` (bn1 + bn2 of every BasicBlock, ResNet-56), ``vgg16`` (all 14 BN layers incl. the FC
BatchNorm1d), ``resnet50`` (bn1 + bn2 of every Bottleneck; bn3 and downsample BN not regularized),
``mobilenetv2-gates`` (the gates after the expansion and projection BN, see :func:`add_gates`), and
``all-bn``. See :data:`PRESETS`.

**DDP.** The Trainer passes the underlying module; every rank computes the same penalty on identical
weights, whose gradient is identical on every rank and survives DDP's gradient averaging unchanged,
and every rank applies the same clamp, so replicas stay bit-identical.
"""
from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError
from ..regularizers import REGULARIZERS, Regularizer

__all__ = [
    "PRESETS", "FactorRef", "FactorSet", "GatedBatchNorm2d", "NetworkSlimming", "PolarizationRegularizer",
    "Preset", "add_gates", "fold_gates", "init_bn_weights", "polarization_penalty", "select_factors",
]


# ----------------------------------------------------------------------------------------------
# gates (MobileNetV2 preset): a BN followed by a learnable per-channel multiplier


class GatedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` followed by a per-channel gate: ``y = BN(x) · gate`` (the paper's MobileNetV2
    "gate" mode, paper App. C: the official code implements it as a bias-free depthwise 1×1 conv after BN).

    The gate is the scaling factor the regularizer sees; it gets no weight decay in the paper (use
    :func:`gate_param_groups`). :func:`fold_gates` folds it into γ and β exactly (as the official code
    does when it prunes) so that a trained gated model becomes a plain zoo model again.
    """

    def __init__(self, num_features: int, gate_init: float = 1.0, **kw: Any):
        super().__init__(num_features, **kw)
        self.gate = nn.Parameter(torch.full((num_features,), float(gate_init)))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, gate_init: float = 1.0) -> GatedBatchNorm2d:
        new = cls(bn.num_features, gate_init, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        new.load_state_dict(bn.state_dict(), strict=False)
        return new.to(bn.weight.device if bn.weight is not None else "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gate.view(1, -1, 1, 1)


def _register_gate_rule() -> None:
    from ..engine.rules import BatchNormRule, register_layer

    class _GatedBNRule(BatchNormRule):
        def __init__(self):
            super().__init__()
            self.params = ("weight", "bias", "gate")
            self.scale_param = "gate"

    register_layer(GatedBatchNorm2d, _GatedBNRule(), overwrite=True)


_register_gate_rule()


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_gates(model: nn.Module, modules: Iterable[str] | str = "mobilenetv2", gate_init: float = 1.0) -> list[str]:
    """Replace the named ``BatchNorm2d`` modules of ``model`` **in place** by :class:`GatedBatchNorm2d`
    (same statistics and affine parameters, gates at ``gate_init``). This builds the architecture that
    is trained; it is not pruning. ``modules``: names / fnmatch patterns, or ``"mobilenetv2"`` (the BN
    after every expansion conv and after every projection conv, as in the official MobileNetV2 run).
    Returns the gated names."""
    names = _mobilenetv2_gate_sites(model) if modules == "mobilenetv2" else _match(model, modules, _BatchNorm)
    for n in names:
        bn = model.get_submodule(n)
        if isinstance(bn, GatedBatchNorm2d):
            continue
        if not isinstance(bn, nn.BatchNorm2d):
            raise ConfigError(f"add_gates: module '{n}' is {type(bn).__name__}, not BatchNorm2d")
        _set_submodule(model, n, GatedBatchNorm2d.from_bn(bn, gate_init))
    return names


@torch.no_grad()
def fold_gates(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`GatedBatchNorm2d` replaced by a plain ``BatchNorm2d`` with
    ``γ ← γ·g`` and ``β ← β·g`` (exact: the gate multiplies the whole BN output)."""
    new = copy.deepcopy(model)
    for name, m in list(new.named_modules()):
        if isinstance(m, GatedBatchNorm2d):
            bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=True,
                                track_running_stats=m.track_running_stats).to(m.gate.device)
            sd = {k: v for k, v in m.state_dict().items() if k != "gate"}
            if not m.affine:
                sd["weight"], sd["bias"] = torch.ones_like(m.gate), torch.zeros_like(m.gate)
            bn.load_state_dict(sd)
            bn.weight.mul_(m.gate)
            bn.bias.mul_(m.gate)
            bn.train(m.training)
            _set_submodule(new, name, bn)
    return new


def gate_param_groups(model: nn.Module, weight_decay: float, *, bn_weight_decay: bool = True) -> list[dict]:
    """Optimizer param groups: gates never get weight decay; BN γ/β only with ``bn_weight_decay``."""
    gates, bn, rest = [], [], []
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(m, GatedBatchNorm2d) and pname == "gate":
                gates.append(p)
            elif isinstance(m, _BatchNorm):
                bn.append(p)
            else:
                rest.append(p)
    groups = [{"params": rest, "weight_decay": weight_decay},
              {"params": bn, "weight_decay": weight_decay if bn_weight_decay else 0.0},
              {"params": gates, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------------------------
# which factors


@dataclass(frozen=True)
class FactorRef:
    """Entries ``index`` (None: all) of parameter ``param`` of module ``module``."""

    module: str
    param: str = "weight"
    index: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {"module": self.module, "param": self.param,
                "index": None if self.index is None else list(self.index)}


@dataclass
class FactorSet:
    """The scaling factors a regularizer acts on (see the module docstring)."""

    refs: list[FactorRef]
    preset: str = "custom"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.refs:
            raise ConfigError(f"factor preset '{self.preset}' selects no scaling factor in this model "
                              "(no BatchNorm/gate in a prunable channel group?); pick another preset")

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def modules(self) -> list[str]:
        return [r.module for r in self.refs]

    def resolve(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(parameter, index tensor on its device or None)`` per ref."""
        out = []
        for r in self.refs:
            try:
                p = getattr(model.get_submodule(r.module), r.param)
            except AttributeError:
                raise ConfigError(f"scaling factor '{r.module}.{r.param}' is not in this "
                                  f"{type(model).__name__}: the factor set was built for another model") from None
            if not isinstance(p, torch.Tensor):
                raise ConfigError(f"scaling factor '{r.module}.{r.param}' is {p!r}, not a tensor (affine=False?)")
            idx = None
            if r.index is not None:
                key = (r, p.device)
                idx = self._cache.get(key)
                if idx is None:
                    idx = self._cache[key] = torch.tensor(r.index, dtype=torch.long, device=p.device)
            out.append((p, idx))
        return out

    def gather(self, model: nn.Module) -> torch.Tensor:
        """All factors concatenated into one differentiable vector (n,), in ref order."""
        parts = [p if idx is None else p.index_select(0, idx) for p, idx in self.resolve(model)]
        return torch.cat([x.reshape(-1) for x in parts])

    def numel(self, model: nn.Module) -> int:
        return sum(p.numel() if idx is None else idx.numel() for p, idx in self.resolve(model))

    @torch.no_grad()
    def clamp_(self, model: nn.Module, lo: float, hi: float) -> None:
        for p, idx in self.resolve(model):
            if idx is None:
                p.clamp_(lo, hi)
            else:
                p.index_copy_(0, idx, p.index_select(0, idx).clamp(lo, hi))

    def to_dict(self) -> dict:
        return {"preset": self.preset, "refs": [r.to_dict() for r in self.refs]}


def _match(model: nn.Module, patterns: Iterable[str] | str, types: type | tuple[type, ...]) -> list[str]:
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return [n for n, m in model.named_modules()
            if n and isinstance(m, types) and any(n == p or fnmatch.fnmatchcase(n, p) for p in pats)]


def _example(model: nn.Module, example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ConfigError(f"factor preset 'engine' traces the model: pass example_inputs (the "
                          f"{type(model).__name__} has no input_shape attribute)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((1, *shape), device=device)


def _engine_refs(model: nn.Module, example_inputs: Any = None, ignored: Any = None) -> list[FactorRef]:
    """Scale of every norm member of a prunable group, on the group's prunable channels."""
    from ..engine import ChannelGraph
    from ..engine.rules import find_rule

    graph = ChannelGraph.build(model, _example(model, example_inputs), ignored=ignored)
    picked: dict[str, set[int]] = {}
    param_of: dict[str, str] = {}
    for g in graph.prunable_groups:
        prunable = np.zeros(g.size, dtype=bool)
        prunable[g.prunable] = True
        for m in g.members:
            if m.role != "norm":
                continue
            module = model.get_submodule(m.module)
            rule = find_rule(type(module))
            pname = getattr(rule, "scale_param", None)
            if not pname or getattr(module, pname, None) is None:
                continue
            idx = m.indices(g.id)
            idx = idx[prunable[m.channel[idx]]]
            if len(idx):
                picked.setdefault(m.module, set()).update(int(i) for i in idx)
                param_of[m.module] = pname
    refs = []
    order = [n for n, _ in model.named_modules()]
    for name in sorted(picked, key=order.index):
        idx = sorted(picked[name])
        n = getattr(model.get_submodule(name), param_of[name]).shape[0]
        refs.append(FactorRef(name, param_of[name], None if len(idx) == n else tuple(idx)))
    return refs


def _bn_refs(patterns: Sequence[str]) -> Callable[..., list[FactorRef]]:
    def refs(model: nn.Module, example_inputs: Any = None, ignored: Any = None) -> list[FactorRef]:
        return [FactorRef(n) for n in _match(model, patterns, _BatchNorm) if model.get_submodule(n).affine]

    return refs


def _mobilenetv2_gate_sites(model: nn.Module) -> list[str]:
    """The BN after each expansion 1×1 conv and after each projection 1×1 conv (zoo MobileNetV2)."""
    sites = []
    for name, m in model.named_modules():
        if type(m).__name__ != "InvertedResidual":
            continue
        seq = m.conv
        if len(seq) == 4:  # expansion ConvBNReLU6, depthwise ConvBNReLU6, projection conv, BN
            sites.append(f"{name}.conv.0.1")
        sites.append(f"{name}.conv.{len(seq) - 1}")
    if not sites:
        raise ConfigError(f"preset 'mobilenetv2-gates' needs the zoo MobileNetV2 (InvertedResidual blocks); "
                          f"{type(model).__name__} has none")
    return sites


def _gate_refs(model: nn.Module, example_inputs: Any = None, ignored: Any = None) -> list[FactorRef]:
    names = [n for n, m in model.named_modules() if isinstance(m, GatedBatchNorm2d)]
    if not names:
        raise ConfigError("preset 'mobilenetv2-gates' regularizes gates, and the model has none: call "
                          "prunekit.polarization.add_gates(model) before training")
    return [FactorRef(n, "gate") for n in names]


@dataclass(frozen=True)
class Preset:
    """A named choice of factors plus the paper's initial value for them (None: leave as built)."""

    select: Callable[..., list[FactorRef]]
    bn_init: float | None
    doc: str


PRESETS: dict[str, Preset] = {
    "engine": Preset(_engine_refs, None, "BN/gate scale of every prunable channel group of the engine (any model)"),
    "all-bn": Preset(_bn_refs(["*"]), None, "every affine BatchNorm weight"),
    "resnet-cifar": Preset(_bn_refs(["layer*.*.bn1", "layer*.*.bn2"]), 0.5,
                           "CIFAR ResNet-56: bn1 and bn2 of every BasicBlock (stem BN not regularized)"),
    "vgg16": Preset(_bn_refs(["*"]), 0.5, "VGG-16: all 13 conv BN + the BatchNorm1d after the hidden FC"),
    "resnet50": Preset(_bn_refs(["layer*.*.bn1", "layer*.*.bn2"]), 0.5,
                       "ResNet-50: bn1 and bn2 of every Bottleneck (not bn3, downsample or stem BN)"),
    "mobilenetv2-gates": Preset(_gate_refs, 1.0, "MobileNetV2: gates after the expansion and projection BN "
                                "(add_gates first; BN and gates initialised to 1)"),
}


def select_factors(model: nn.Module, preset: str = "engine", *, example_inputs: Any = None,
                   ignored: Any = None) -> FactorSet:
    """The :class:`FactorSet` of ``preset`` (a name of :data:`PRESETS`) for ``model``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown factor preset '{preset}'; known: {', '.join(PRESETS)}")
    return FactorSet(PRESETS[preset].select(model, example_inputs, ignored), preset=preset)


@torch.no_grad()
def init_bn_weights(model: nn.Module, value: float = 0.5, *, factors: FactorSet | None = None) -> int:
    """Set every affine BatchNorm weight of ``model`` (γ; β is untouched) to ``value``, as the paper does
    for its BN-mode models ("γ = 0.5 as in Liu et al. 2017", paper §3.2), or with ``factors`` only those
    factors (e.g. gates). Returns the number of entries set."""
    n = 0
    if factors is not None:
        for p, idx in factors.resolve(model):
            if idx is None:
                p.fill_(value)
                n += p.numel()
            else:
                p.index_fill_(0, idx, value)
                n += idx.numel()
        return n
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.affine:
            m.weight.fill_(value)
            n += m.weight.numel()
    return n


# ----------------------------------------------------------------------------------------------
# the regularizers


def polarization_penalty(gamma: torch.Tensor, t: float) -> torch.Tensor:
    """``R(γ) = t·Σ|γ_i| − Σ|γ_i − γ̄|`` over a flat vector, γ̄ its mean (gradient flows through it)."""
    g = gamma.float()
    return t * g.abs().sum() - (g - g.mean()).abs().sum()


def _check_num(name: str, v: Any, *, lo: float | None = None, positive: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    if ok and lo is not None:
        ok = v >= lo
    if ok and positive:
        ok = v > 0
    if not ok:
        need = "a positive number" if positive else (f"a number >= {lo}" if lo is not None else "a finite number")
        raise ConfigError(f"{name} must be {need}, got {v!r}")
    return float(v)


class _FactorRegularizer(Regularizer):
    name = "factor"

    def __init__(self, lam: float, *, factors: FactorSet | None = None, preset: str = "engine",
                 example_inputs: Any = None, ignored: Any = None):
        self.lam = _check_num("lam (λ)", lam, lo=0.0)
        self.factors = factors
        self.preset = factors.preset if factors is not None else preset
        if factors is None and preset not in PRESETS:
            raise ConfigError(f"unknown factor preset '{preset}'; known: {', '.join(PRESETS)}")
        self._example, self._ignored = example_inputs, ignored

    def bind(self, model: nn.Module) -> FactorSet:
        """Select the factors of ``model`` now (otherwise done lazily on the first step)."""
        if self.factors is None:
            self.factors = select_factors(model, self.preset, example_inputs=self._example, ignored=self._ignored)
        return self.factors

    def values(self, model: nn.Module) -> torch.Tensor:
        """The current factors (detached, flat, float32, CPU)."""
        return self.bind(model).gather(model).detach().float().cpu()

    def _hparams(self) -> dict[str, Any]:
        return {"name": self.name, "lam": self.lam, "preset": self.preset}

    def state_dict(self) -> dict[str, Any]:
        return self._hparams()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ours = self._hparams()
        diff = [f"{k}: checkpoint {state.get(k)!r} vs now {v!r}" for k, v in ours.items()
                if k in state and state[k] != v]
        if diff:
            raise ConfigError(f"the checkpoint was trained with a different {self.name} regularizer "
                              f"({'; '.join(diff)}); use a fresh run directory")


class PolarizationRegularizer(_FactorRegularizer):
    """``λ·R(γ)`` added to the loss, ``γ ← clamp(γ, 0, a)`` after every step (module docstring).

    Args:
        lam: λ ≥ 0 (README values: 5e-5 ResNet-56, 3e-5 VGG-16, 8e-5 ResNet-50, 2.5e-5 MobileNetV2).
        t: weight of the L1 term (larger ⇒ more pruning; README: 1.4, 1.5, 1.2, 1.0).
        a: upper clamp bound (paper: 1).
        factors: an explicit :class:`FactorSet`; else ``preset`` is selected on the first step.
        preset: a name of :data:`PRESETS` (default ``"engine"``).
        clamp: ``"factors"`` (the regularized entries), ``"all-bn"`` (also every other BN weight and
            gate, as the official code does) or ``None``.
        example_inputs, ignored: for the ``engine`` preset's trace (default zeros of ``model.input_shape``).
    """

    name = "polarization"

    def __init__(self, lam: float, t: float, a: float = 1.0, *, factors: FactorSet | None = None,
                 preset: str = "engine", clamp: str | None = "factors", example_inputs: Any = None,
                 ignored: Any = None):
        super().__init__(lam, factors=factors, preset=preset, example_inputs=example_inputs, ignored=ignored)
        self.t = _check_num("t", t)
        self.a = _check_num("a", a, positive=True)
        if clamp not in ("factors", "all-bn", None):
            raise ConfigError(f"clamp must be 'factors', 'all-bn' or None, got {clamp!r}")
        self.clamp = clamp

    def _hparams(self) -> dict[str, Any]:
        return {**super()._hparams(), "t": self.t, "a": self.a}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0:
            return None
        return self.lam * polarization_penalty(self.bind(model).gather(model), self.t)

    def after_step(self, model: nn.Module) -> None:
        if self.clamp is None:
            return
        self.bind(model).clamp_(model, 0.0, self.a)
        if self.clamp == "all-bn":
            for m in model.modules():
                if isinstance(m, _BatchNorm) and m.affine:
                    m.weight.clamp_(0.0, self.a)
                if isinstance(m, GatedBatchNorm2d):
                    m.gate.clamp_(0.0, self.a)

    def __repr__(self) -> str:
        return f"PolarizationRegularizer(lam={self.lam:g}, t={self.t:g}, a={self.a:g}, preset={self.preset!r})"


class NetworkSlimming(_FactorRegularizer):
    """Network slimming (Liu et al. 2017): ``λ·Σ|γ_i|`` on the same factors, no clamp (the baseline).

    Args:
        lam: λ ≥ 0 (the NS paper uses 1e-4 on CIFAR).
        factors, preset, example_inputs, ignored: as :class:`PolarizationRegularizer`.
    """

    name = "slimming"

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0:
            return None
        return self.lam * self.bind(model).gather(model).float().abs().sum()

    def __repr__(self) -> str:
        return f"NetworkSlimming(lam={self.lam:g}, preset={self.preset!r})"


@REGULARIZERS.register("polarization")
def _create_polarization(model: nn.Module, *, lam: float, t: float = 1.2, a: float = 1.0, preset: str = "engine",
                         clamp: str | None = "factors", example_inputs: Any = None, ignored: Any = None,
                         bn_init: float | None = None) -> PolarizationRegularizer:
    reg = PolarizationRegularizer(lam, t, a, preset=preset, clamp=clamp, example_inputs=example_inputs,
                                  ignored=ignored)
    reg.bind(model)
    if bn_init is not None:
        _init_for(model, reg, bn_init)
    return reg


@REGULARIZERS.register("slimming")
def _create_slimming(model: nn.Module, *, lam: float, preset: str = "engine", example_inputs: Any = None,
                     ignored: Any = None, bn_init: float | None = None, **unused: Any) -> NetworkSlimming:
    extra = {k: v for k, v in unused.items() if v is not None}
    if extra:
        raise ConfigError(f"regularizer 'slimming' does not take {sorted(extra)}")
    reg = NetworkSlimming(lam, preset=preset, example_inputs=example_inputs, ignored=ignored)
    reg.bind(model)
    if bn_init is not None:
        _init_for(model, reg, bn_init)
    return reg


def _init_for(model: nn.Module, reg: _FactorRegularizer, value: float) -> None:
    """BN mode: every BN γ (the paper's init); gate presets: the gates."""
    factors = reg.bind(model)
    if any(r.param != "weight" for r in factors.refs):
        init_bn_weights(model, value, factors=factors)
    else:
        init_bn_weights(model, value)
