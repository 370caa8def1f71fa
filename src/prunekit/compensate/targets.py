"""What the reconstruction fits to, gathered with as few forward passes as possible.

* :class:`Targets` — the original network's output of every layer to refit (and, for residual-aware
  targets, the skip-branch value added to it), as regression rows at the sampled output positions, for
  every calibration batch: **one** pass of the original network for all layers (an fx interpreter when the
  model traces, hooks otherwise). When the rows would exceed ``max_bytes`` they are recomputed per layer
  instead (one original pass per layer), so memory stays bounded.
* :func:`compressed_values` — a layer's input (and skip value) in the compressed network, in a pass that
  resumes where an earlier pass on the same upstream layers stopped, and stops right after the layer.

Rows are ordered (sample, position) as :func:`prunekit.compensate.reconstruct` builds its patches.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..runtime import call, capture, eval_mode
from .block_passes import BlockPasses
from .calibration import batches, module_inputs, n_inputs
from .layers import is_linear
from .passes import ResumablePasses
from .residual import Skip, module_nodes, node_values
from .stream_skips import StreamSkip, skip_value


def sample_positions(module: nn.Module, y: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor | None:
    """At most ``limit`` of a conv's output positions (a seeded subset, the same for every batch)."""
    n = int(np.prod(y.shape[2:])) if not is_linear(module) else 0
    if limit is None or n <= limit:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def output_rows(module: nn.Module, y: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's output (or a tensor shaped like it) as rows (rows, channels): Linear keeps the last dim
    (tokens become rows); a conv's positions (all, or the flat indices ``positions``) become rows."""
    if is_linear(module):
        return y.reshape(-1, y.shape[-1])
    y = y.reshape(y.shape[0], y.shape[1], -1)
    y = y if positions is None else y[:, :, positions]
    return y.transpose(1, 2).reshape(-1, y.shape[1])


class Targets:
    """Original outputs (+ skip values) of ``names`` per calibration batch (see the module docstring)."""

    def __init__(self, model: nn.Module, names: list[str], inputs: Any, batch_size: int, positions: int | None,
                 seed: int, skips: dict[str, Skip], fx_graph: fx.Graph | None, max_bytes: int):
        self.model, self.names, self.inputs, self.batch_size = model, list(names), inputs, batch_size
        self.limit, self.seed, self.skips, self.fx_graph = positions, seed, skips, fx_graph
        self.positions: dict[str, torch.Tensor | None] = {}
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.skip_rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.names if n in skips}
        self.cached = self._gather(max_bytes)

    def _record(self, model: nn.Module, names: list[str], xb: Any) -> tuple[dict, dict]:
        """(outputs of ``names``, skip values of those with a skip) on batch ``xb``."""
        stream = [n for n in names if isinstance(self.skips.get(n), StreamSkip)]
        if stream or self.fx_graph is None or not any(n in self.skips for n in names):
            hooks = {n: skip_value(model, self.skips[n]) for n in stream}
            try:
                with capture(model, names, what="output") as seen:
                    call(model, xb)
            finally:
                for handle, _ in hooks.values():
                    handle.remove()
            return dict(seen.values), {n: box["s"] for n, (_, box) in hooks.items() if "s" in box}
        nodes = module_nodes(self.fx_graph)
        wanted = {nodes[n].name for n in names if n in nodes} | {self.skips[n].partner for n in names
                                                                 if n in self.skips}
        values = node_values(model, self.fx_graph, wanted, xb)
        outs = {n: values[nodes[n].name] for n in names if n in nodes and nodes[n].name in values}
        skips = {n: values[self.skips[n].partner] for n in names if n in self.skips}
        return outs, skips

    def _add(self, name: str, y: torch.Tensor, s: torch.Tensor | None) -> None:
        module = self.model.get_submodule(name)
        if name not in self.positions:
            self.positions[name] = sample_positions(module, y, self.limit, self.seed + zlib.crc32(name.encode()))
        pos = self.positions[name]
        self.rows[name].append(output_rows(module, y, pos).float())
        if s is not None:
            self.skip_rows[name].append(output_rows(module, s, pos).float())

    def _gather(self, max_bytes: int) -> bool:
        n_total = n_inputs(self.inputs)
        with eval_mode(self.model):
            for b, xb in enumerate(batches(self.inputs, self.batch_size)):
                outs, skips = self._record(self.model, self.names, xb)
                for name in self.names:
                    if name in outs:
                        self._add(name, outs[name], skips.get(name))
                if b == 0:  # the first batch's rows, scaled to all inputs (the last batch may be short)
                    per_batch = sum(t[-1].numel() * 4 for d in (self.rows, self.skip_rows) for t in d.values() if t)
                    if per_batch * n_total / n_inputs(xb) > max_bytes:
                        self.rows = {n: [] for n in self.names}
                        self.skip_rows = {n: [] for n in self.names if n in self.skips}
                        return False
        return True

    def batch(self, name: str, b: int, xb: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Original output rows of layer ``name`` on batch ``b`` (``xb``), and its skip-value rows."""
        if not self.cached:
            with eval_mode(self.model):
                outs, skips = self._record(self.model, [name], xb)
            module = self.model.get_submodule(name)
            if name not in self.positions:
                self.positions[name] = sample_positions(module, outs[name], self.limit,
                                                        self.seed + zlib.crc32(name.encode()))
            pos = self.positions[name]
            s = skips.get(name)
            return output_rows(module, outs[name], pos).float(), None if s is None else output_rows(module, s, pos)
        return self.rows[name][b], (self.skip_rows[name][b] if name in self.skip_rows else None)


def compressed_values(compressed: nn.Module, name: str, skip: Skip | None, passes: Passes | None,
                      b: int, xb: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer ``name``'s input in ``compressed`` on calibration batch ``b`` (``xb``), and the value of its skip
    branch: resumed where an earlier pass stopped (``passes``: :mod:`.passes`, :mod:`.block_passes`), else by
    hooks (one pass from the input, stopped right after the layer)."""
    got = passes.inputs(compressed, name, skip, b, xb) if passes is not None else None
    return got if got is not None else (module_inputs(compressed, [name], xb)[name], None)


#: what resumes the compressed network's passes: on a torch.fx trace, or from a chain of blocks
Passes = ResumablePasses | BlockPasses

Correction = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
