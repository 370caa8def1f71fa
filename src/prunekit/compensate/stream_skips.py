"""Residual-aware targets for models that do not trace: the skip branch of a writer into a residual stream,
found numerically inside a chain of blocks (:mod:`.block_passes`).

In a transformer block ``h' = h + o_proj(·)`` (and ``h'' = h' + down_proj(·)``; post-norm layers:
``LayerNorm(h + dense(·))``), the writer's output ``y`` is added to a value ``s`` computed before it. On one
probe batch every module of the chain's blocks is watched (first input, output); for a writer W the first
value ``t`` seen after W's call that equals ``s + y`` for a value ``s`` seen before it (same shape, to float
tolerance, ``s`` not ``y`` itself and ``y`` not ≈ 0) names the skip: ``s`` is the first input (``in``) or the
output (``out``) of a module — for Llama's o_proj the block's input, for its down_proj the post-attention
norm's input. :mod:`.residual` uses it like a skip found on an fx trace: target ``Y_o + (s_o − s_c)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..runtime import as_inputs, without_kv_cache
from .layers import is_linear

if TYPE_CHECKING:
    from .block_passes import Chain

__all__ = ["StreamSkip", "find_stream_skips", "skip_value"]


@dataclass(frozen=True)
class StreamSkip:
    """``consumer``'s output is added to the first input (``kind="in"``) or the output (``"out"``) of
    ``module``; no norm in between."""

    consumer: str
    kind: str
    module: str
    norm: None = None


def _tensor(value: Any) -> torch.Tensor | None:
    value = value[0] if isinstance(value, (tuple, list)) and value else value
    return value if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-7))


def find_stream_skips(model: nn.Module, chains: list[Chain], probe: Any) -> dict[str, StreamSkip]:
    """``{writer: StreamSkip}`` for the Linear layers inside ``chains`` whose output is added to an earlier value
    (module docstring); ``{}`` when the probe pass fails."""
    prefixes = tuple(f"{c.name}.{i}" for c in chains for i in range(c.size))
    watched = {n: m for n, m in model.named_modules() if n.startswith(prefixes) and
               (n in prefixes or n.startswith(tuple(p + "." for p in prefixes)))}
    seen: list[tuple[str, str, torch.Tensor]] = []  # (kind, module, value) in call order

    def pre(name: str):
        def hook(_m, args):
            if args and (t := _tensor(args[0])) is not None:
                seen.append(("in", name, t.detach()))
        return hook

    def post(name: str):
        def hook(_m, _args, out):
            if (t := _tensor(out)) is not None:
                seen.append(("out", name, t.detach()))
        return hook

    handles = [h for n, m in watched.items() for h in (m.register_forward_pre_hook(pre(n)),
                                                          m.register_forward_hook(post(n)))]
    try:
        args, kwargs = as_inputs(probe)
        with torch.no_grad():
            model(*args, **without_kv_cache(model, args, kwargs))
    except Exception:  # noqa: BLE001 - no skips: plain targets
        return {}
    finally:
        for h in handles:
            h.remove()
    out: dict[str, StreamSkip] = {}
    for i, (kind, name, y) in enumerate(seen):
        if kind != "out" or not is_linear(watched[name]) or float(y.abs().max()) < 1e-6:
            continue
        block = max((p for p in prefixes if name.startswith(p + ".")), key=len)
        inside = [(k, n, v) for k, n, v in seen if n == block or n.startswith(block + ".")]
        at = next(j for j, e in enumerate(inside) if e[2] is y)
        before = [(k, n, v) for k, n, v in inside[:at] if not (n == name and k == "in")]
        for _, _, t in inside[at + 1:]:  # the block's own output last
            if t.shape != y.shape:
                continue
            rest = t - y
            match = next(((k, n) for k, n, s in reversed(before) if _close(rest, s) and not _close(s, t)), None)
            if match is not None:
                out[name] = StreamSkip(name, *match)
                break
    return out


def skip_value(model: nn.Module, skip: StreamSkip):
    """A hook registration for ``skip``'s value in ``model``: returns ``(handle, box)``; after a forward pass
    ``box["s"]`` holds the value (the first call's)."""
    box: dict[str, torch.Tensor] = {}
    module = model.get_submodule(skip.module)

    def keep(value: Any) -> None:
        if "s" not in box and (t := _tensor(value)) is not None:
            box["s"] = t.detach()

    if skip.kind == "in":
        handle = module.register_forward_pre_hook(lambda _m, args: keep(args[0] if args else None))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: keep(out))
    return handle, box
