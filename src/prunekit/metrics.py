"""What the papers report: parameter counts, MACs ("FLOPs"), sparsity, latency and accuracy.

MAC rule (what the papers call "FLOPs", see docs/polarization.md): multiply-accumulates per sample,
one multiply-add = 1 MAC — conv ``k_h·k_w·(C_in/groups)·C_out·H_out·W_out``, linear ``in·out`` per
position, matrix products and attention (``QKᵀ`` and ``AV``) likewise. Bias, BN, activations, pooling, softmax, additions and padding
are not counted. Measured with :class:`torch.utils.flop_counter.FlopCounterMode` (aten level), so
functional calls count as well as modules.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .runtime import as_inputs, call, eval_mode

__all__ = [
    "LatencyResult",
    "SparsityReport",
    "TensorSparsity",
    "accuracy",
    "count_macs",
    "count_params",
    "evaluate",
    "evaluate_lm",
    "layer_macs",
    "measure_latency",
    "perplexity",
    "sparsity",
    "token_nll",
]


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (BN affine included, buffers excluded; shared tensors once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# MACs
# --------------------------------------------------------------------------------------------


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _first_tensor(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    for v in values:
        if (t := _first_tensor(v)) is not None:
            return t
    return None


def _shape(t: Any) -> tuple[int, ...]:
    """A tensor's shape, or the shape itself (the counter passes shapes or tensors, by torch version)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)


def _raw_formula(fn):
    # Called with the op's own arguments (tensors); older counters may pass shapes instead — _shape
    # accepts both, and the keyword (out_val / out_shape) is ignored.
    fn._get_raw = True
    return fn


@_raw_formula
def _sdpa_flops(query, key, value, *args, **kwargs) -> int:
    """q (…, L, E) · kᵀ (…, E, S), then (…, L, S) · v (…, S, Ev); key/value heads broadcast (GQA)."""
    q, k, v = _shape(query), _shape(key), _shape(value)
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


@_raw_formula
def _native_mha_flops(query, key, value, embed_dim, *args, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fused inference path: q/k/v and output projections + attention."""
    q, k, e = _shape(query), _shape(key), int(embed_dim)
    batch = math.prod(q[:-2])
    lq, lk = q[-2], k[-2]
    return 2 * batch * (2 * lq * e * e + 2 * lk * e * e + 2 * lq * lk * e)


@_raw_formula
def _mv_flops(*args, **kwargs) -> int:
    """``mv``/``addmv`` (matrix (n, m) · vector (m,)) and ``dot`` (m,)·(m,); leading bias operand skipped."""
    mats = [_shape(a) for a in args if isinstance(a, (torch.Tensor, tuple, list, torch.Size))]
    mat, vec = mats[-2], mats[-1]
    return 2 * math.prod(mat) if len(mat) == 2 else 2 * vec[0]


def _extra_formulas() -> dict:
    """Ops the counter does not know (as of torch 2.13) that still are multiply-adds of weights/activations:
    CPU SDPA, nn.MultiheadAttention's fast path, matrix-vector products."""
    aten = torch.ops.aten
    out = {}
    for name, fn in [("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
                     ("_native_multi_head_attention", _native_mha_flops),
                     ("mv", _mv_flops), ("addmv", _mv_flops), ("dot", _mv_flops)]:
        if hasattr(aten, name):
            out[getattr(aten, name)] = fn
    return out


def _exclusive(inclusive: dict[str, int], root: str) -> dict[str, int]:
    """Turn the counter's nested per-module totals into each module's own share, by module path.

    The counter names modules ``Root.a.b`` and counts an op in every enclosing module, and in
    ``Global``, which here is the root's forward (nothing else runs under the counter). A module's own
    share is its total less the totals of its nearest counted descendants; the shares add up to the
    total. Ops of modules outside the root's tree (called but not registered) stay with their caller.
    """
    named = {"": inclusive.get("Global", 0)}
    for key, v in inclusive.items():
        if key.startswith(root + "."):
            named[key[len(root) + 1:]] = v
    own = dict(named)
    for name, v in named.items():
        if name == "":
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):  # the nearest counted ancestor ("" = root)
            anc = ".".join(parts[:i])
            if anc in named:
                own[anc] -= v
                break
    return {k: v for k, v in own.items() if v}


def layer_macs(
    model: nn.Module, inputs: Any = None, *, input_shape: Sequence[int] | None = None
) -> dict[str, int]:
    """Per-sample MACs of each module's own operations, by module name (summed over repeated calls).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` at the aten level, so convolutions
    (incl. grouped/transposed), linear layers, functional ``F.conv*``/``F.linear``, ``matmul``/``@``,
    ``bmm``/``baddbmm``/``einsum`` and attention (``F.scaled_dot_product_attention``,
    ``nn.MultiheadAttention``) all count, wherever they are called. One multiply-add = 1 MAC (the
    counter's FLOPs / 2); bias adds, norms, activations, pooling, softmax and additions are not counted.
    An op belongs to the innermost module whose ``forward`` ran it (``""``: the root's own forward);
    modules with no MACs are left out.

    ``inputs``: a tensor, an args tuple or a kwargs dict (see :func:`prunekit.runtime.as_inputs`) whose
    first tensor's dim 0 is the batch; totals are divided by it. Default: ``torch.zeros(1, *input_shape)``
    with ``input_shape`` defaulting to ``model.input_shape`` (C, H, W). The model runs in eval mode under
    no_grad and every submodule's mode is restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if inputs is None:
        shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
        if shape is None:
            raise ConfigError("count_macs needs inputs or input_shape (the model has no input_shape)")
        device, dtype = _model_device_dtype(model)
        inputs = torch.zeros((1, *shape), device=device, dtype=dtype)
    args, kwargs = as_inputs(inputs)
    first = _first_tensor((args, kwargs))
    batch = first.shape[0] if first is not None and first.dim() > 0 else 1

    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with eval_mode(model), counter:
        model(*args, **kwargs)
    inclusive = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return {k: v // 2 // batch for k, v in _exclusive(inclusive, type(model).__name__).items()}


def count_macs(model: nn.Module, inputs: Any = None, *, input_shape: Sequence[int] | None = None) -> int:
    """Per-sample multiply-accumulates of the whole forward pass (the sum of :func:`layer_macs`)."""
    return sum(layer_macs(model, inputs, input_shape=input_shape).values())


# --------------------------------------------------------------------------------------------
# Sparsity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    numel: int
    zeros: int
    fraction: float  # zeros / numel


@dataclass
class SparsityReport:
    """Exact zeros in the selected tensors (``tensors``, ``numel``, ``zeros``, ``fraction``) and,
    for reference, over *every* parameter (``all_*``: gRDA's reported number, BN and biases in)."""

    tensors: list[TensorSparsity] = field(default_factory=list)
    numel: int = 0
    zeros: int = 0
    all_numel: int = 0
    all_zeros: int = 0

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def all_fraction(self) -> float:
        return self.all_zeros / self.all_numel if self.all_numel else 0.0

    def as_dict(self) -> dict:
        return {
            "numel": self.numel,
            "zeros": self.zeros,
            "fraction": self.fraction,
            "all_numel": self.all_numel,
            "all_zeros": self.all_zeros,
            "all_fraction": self.all_fraction,
            "tensors": [t.__dict__ for t in self.tensors],
        }


def sparsity(
    model: nn.Module,
    *,
    kinds: Iterable[str] | None = ("weight",),
    modules: tuple[type[nn.Module], ...] | None = (nn.Conv1d, nn.Conv2d, nn.Linear),
) -> SparsityReport:
    """Fraction of exactly-zero entries.

    Selection: parameters whose local name is in ``kinds`` ("weight", "bias", ...) owned by an
    instance of ``modules``; ``None`` for either means "any". The default (conv + linear weights)
    is the layer-wise sparsity; ``kinds=None, modules=None`` counts every parameter, which is what
    the gRDA reference reports (BN γ/β and biases included, buffers never; ResNet-50 denominator
    25,557,032). The report always carries the all-parameter totals too (``all_fraction``).
    """
    kinds = None if kinds is None else set(kinds)
    report = SparsityReport()
    seen: set[int] = set()
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            z = int((p.detach() == 0).sum())
            report.all_numel += p.numel()
            report.all_zeros += z
            if (kinds is None or pname in kinds) and (modules is None or isinstance(m, modules)):
                name = f"{mname}.{pname}" if mname else pname
                report.tensors.append(TensorSparsity(name, p.numel(), z, z / p.numel() if p.numel() else 0.0))
                report.numel += p.numel()
                report.zeros += z
    return report


# --------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    pos = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def measure_latency(
    model: nn.Module, inputs: Any, *, warmup: int = 5, runs: int = 30, device: str | torch.device | None = None
) -> LatencyResult:
    """Wall-clock time of one forward pass on ``inputs`` (ms), in eval mode under inference_mode.

    Each run is timed separately with ``time.perf_counter``, with ``torch.cuda.synchronize``
    before and after on CUDA. ``device`` (default: the model's) moves model and inputs there; the
    model's device and train/eval modes are restored afterwards.
    """
    if runs < 1 or warmup < 0:
        raise ConfigError(f"measure_latency needs runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    orig_device, _ = _model_device_dtype(model)
    dev = torch.device(device) if device is not None else orig_device
    if dev != orig_device:
        model.to(dev)
    inputs = _to(inputs, dev)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    times: list[float] = []
    try:
        with eval_mode(model, no_grad=False), torch.inference_mode():
            for _ in range(warmup):
                call(model, inputs)
            sync()
            for _ in range(runs):
                sync()
                t0 = time.perf_counter()
                call(model, inputs)
                sync()
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        if dev != orig_device:
            model.to(orig_device)
    s = sorted(times)
    return LatencyResult(
        median_ms=statistics.median(s),
        mean_ms=statistics.fmean(s),
        p10_ms=_percentile(s, 0.10),
        p90_ms=_percentile(s, 0.90),
        runs=runs,
    )


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def _hits(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int]) -> torch.Tensor:
    """Per-k count of samples whose target is among the top-k logits (tensor on the logits' device).

    logits (N, C); targets (N,) class indices or (N, C) one-hot / soft labels (argmax is used).
    """
    if targets.dim() == 2:
        targets = targets.argmax(dim=1)
    pred = logits.topk(max(topk), dim=1).indices  # (N, kmax)
    hit = pred.eq(targets.view(-1, 1))
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in topk])


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracies in percent for a batch. logits (N, C); targets (N,) indices or (N, C)."""
    n = logits.shape[0]
    return [100.0 * c / n if n else 0.0 for c in _hits(logits, targets, topk).tolist()]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    topk: Sequence[int] = (1, 5),
    criterion=None,
) -> dict:
    """Accuracy and mean loss of ``model`` over ``loader`` (batches ``(x, y, ...)``).

    Returns ``{"accuracy": top-1 %, "top5": % (when 5 in topk and C >= 5), "top{k}": ...,
    "loss": mean per-sample loss, "samples": N}``. ``criterion`` defaults to cross-entropy; a
    criterion with ``reduction="mean"`` (torch's default) is scaled by the batch size. ``device``
    defaults to the model's device; the model is moved there if needed and moved back after. With
    torch.distributed initialised the sums are all-reduced, so every rank returns global numbers.
    """
    orig_device, _ = _model_device_dtype(model)
    dev = torch.device(device) if device is not None else orig_device
    if dev != orig_device:
        model.to(dev)
    ks = sorted({1, *topk})
    # Sums stay on the device (no per-batch sync): [correct@k for k in ks..., loss_sum, count].
    sums = torch.zeros(len(ks) + 2, dtype=torch.float64, device=dev)
    num_classes = 0
    reduction = getattr(criterion, "reduction", "mean") if criterion is not None else "sum"
    try:
        with eval_mode(model):
            for batch in loader:
                x, y = _to(batch[0], dev), _to(batch[1], dev)
                out = call(model, x)
                n, num_classes = out.shape[0], out.shape[1]
                valid = [i for i, k in enumerate(ks) if k <= num_classes]
                sums[valid] += _hits(out, y, [ks[i] for i in valid]).to(torch.float64)
                if criterion is None:
                    loss = F.cross_entropy(out, y, reduction="sum")
                else:
                    loss = criterion(out, y)
                    if loss.dim() > 0:  # reduction="none"
                        loss = loss.sum()
                    elif reduction == "mean":
                        loss = loss * n
                sums[-2] += loss.detach().to(torch.float64)
                sums[-1] += n
    finally:
        if dev != orig_device:
            model.to(orig_device)

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        comm_dev = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else dev
        sums = sums.to(comm_dev)
        nc = torch.tensor([num_classes], dtype=torch.float64, device=comm_dev)
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(nc, op=torch.distributed.ReduceOp.MAX)
        num_classes = int(nc.item())
    vals = sums.tolist()
    correct, loss_sum, count = vals[: len(ks)], vals[-2], round(vals[-1])
    if count == 0:
        raise ConfigError("evaluate: the loader yielded no samples")
    result = {"accuracy": 100.0 * correct[0] / count}
    for k, c in zip(ks, correct):
        if 1 < k <= num_classes:
            result[f"top{k}"] = 100.0 * c / count
    result["loss"] = loss_sum / count
    result["samples"] = count
    return result


# --------------------------------------------------------------------------------------------
# Language models: token NLL and perplexity
# --------------------------------------------------------------------------------------------

#: target id that token losses and metrics skip (Hugging Face's convention for padding / unlabelled tokens)
IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token NLL, number of scored tokens and number of correct top-1 predictions.

    logits (B, T, V) (``.logits`` of a model output is taken); targets (B, T) token ids, ``ignore_index``
    skipped. Returns three float64 scalars on the logits' device.
    """
    logits = getattr(logits, "logits", logits)
    flat, y = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    keep = y != ignore_index
    nll = F.cross_entropy(flat.float(), y, ignore_index=ignore_index, reduction="sum")
    correct = ((flat.argmax(dim=-1) == y) & keep).sum()
    return nll.double(), keep.sum().double(), correct.double()


def perplexity(mean_nll: float) -> float:
    """``exp(mean token NLL)`` (nats); ``inf`` where it overflows."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def _xy(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a ``(x, y, ...)`` batch or a dict batch holding ``labels``."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return batch[0], batch[1]


def evaluate_lm(model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
                ignore_index: int = IGNORE_INDEX) -> dict:
    """Perplexity of a causal LM over ``loader``: batches ``(ids (B, T), targets (B, T))`` with the targets
    the inputs shifted by one (or dicts of model kwargs holding ``labels``, already aligned the same way).

    Returns ``{"loss": mean token NLL (nats), "perplexity": exp(loss), "accuracy": next-token top-1 %,
    "tokens": scored tokens, "samples": sequences}``; the model may return logits (B, T, V) or an object
    with ``.logits``. Sums are float64 and, under torch.distributed, all-reduced over ranks.
    """
    orig_device, _ = _model_device_dtype(model)
    dev = torch.device(device) if device is not None else orig_device
    if dev != orig_device:
        model.to(dev)
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # nll, tokens, correct, sequences
    try:
        with eval_mode(model):
            for batch in loader:
                x, y = _xy(batch)
                x, y = _to(x, dev), _to(y, dev)
                sums[:3] += torch.stack(token_nll(call(model, x), y, ignore_index))
                sums[3] += y.shape[0]
    finally:
        if dev != orig_device:
            model.to(orig_device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        comm = sums.to("cpu") if torch.distributed.get_backend() == "gloo" else sums
        torch.distributed.all_reduce(comm)
        sums = comm
    nll, tokens, correct, seqs = sums.tolist()
    if tokens == 0:
        raise ConfigError("evaluate_lm: the loader yielded no scored tokens")
    loss = nll / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "accuracy": 100.0 * correct / tokens,
            "tokens": round(tokens), "samples": round(seqs)}
