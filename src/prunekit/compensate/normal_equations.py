"""A consumer's regression problem: its input as regression rows (conv patches, all taps), the streamed
normal equations ``[U|1]ᵀ[U|1]`` / ``[U|1]ᵀY`` against its original output, and their ridge solution.

Used by :mod:`.reconstruct` (the refits) and its survivor selection. Rows run over samples and output
positions (a conv: all, or a seeded sample of ``positions``); columns over the kept inputs × kernel taps,
ordered as the weight's ``(I, *kernel)``, with a constant column last. A transposed convolution is the
stride-1 convolution it equals on its zero-dilated, padded input, with the flipped kernel
(:func:`~.layers.weight_oi`): exact for any stride, padding, dilation and output padding (one group).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .calibration import batches
from .layers import is_linear, weight_oi
from .residual import Skip, output_scale
from .targets import Passes, Targets, compressed_values, output_rows

__all__ = ["Consumer", "Normal", "check_gram_size", "conv_groups", "patches", "solve", "statistics", "supported"]


def conv_groups(module: nn.Module) -> int:
    """Groups of a convolution (1 for anything else)."""
    return int(getattr(module, "groups", 1))


def supported(module: nn.Module) -> str | None:
    """None when ``module`` can be refit; else why not."""
    if is_linear(module):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if module.transposed and module.groups != 1:
            return f"grouped {type(module).__name__} is not refit"
        return None
    return (f"{type(module).__name__} is not refit (Linear, transformers' Conv1D, Conv1d/2d and "
            "ConvTranspose1d/2d are)")


def _one_d(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.ConvTranspose1d))


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, dilation, padding, stride) of a (transposed) Conv1d/2d as 2-d tuples (1-d: height 1)."""
    if _one_d(module):
        return ((1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride))
    if isinstance(module.padding, str):
        raise ConfigError(f"padding={module.padding!r} is not supported by the reconstruction (give explicit "
                          "padding)")
    return module.kernel_size, module.dilation, module.padding, module.stride


def _as_conv_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A transposed conv's input (B, I, H, W) as the input of the stride-1 convolution it equals: s − 1 zeros
    between neighbours (stride s), then d·(k − 1) − p zeros on each side (a crop where negative) and the
    output padding after. With :func:`~.layers.weight_oi`'s flipped kernel, conv(that) == conv_transpose(x)."""
    k, d, p, s = _conv_geometry(module)
    op = (0, *module.output_padding) if _one_d(module) else tuple(module.output_padding)
    b, i, h, w = x.shape
    if s != (1, 1):
        spread = x.new_zeros(b, i, (h - 1) * s[0] + 1, (w - 1) * s[1] + 1)
        spread[:, :, ::s[0], ::s[1]] = x
        x = spread
    edge = [d[j] * (k[j] - 1) - p[j] for j in (0, 1)]
    return F.pad(x, (edge[1], edge[1] + op[1], edge[0], edge[0] + op[0]))


def patches(module: nn.Module, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The consumer's input as regression rows: Linear (rows, I); conv (rows, I·k) patches, where rows run
    over samples and output positions (all, or the flat output indices ``positions``) and columns are
    ordered as the weight's ``(I, *kernel)``."""
    if is_linear(module):
        return x.reshape(-1, x.shape[-1])
    x = x.unsqueeze(2) if _one_d(module) else x
    k, d, p, s = _conv_geometry(module)
    if module.transposed:
        x, p, s = _as_conv_input(module, x), (0, 0), (1, 1)
    if positions is None:
        u = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, I·k, L)
        return u.transpose(1, 2).reshape(-1, u.shape[1])
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    w_out = (x.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    oy, ox = positions // w_out, positions % w_out
    iy = oy[:, None] * s[0] + torch.arange(k[0]) * d[0]  # (P, kh): rows read by each sampled output
    ix = ox[:, None] * s[1] + torch.arange(k[1]) * d[1]
    patches = xp[:, :, iy[:, :, None], ix[:, None, :]]  # (B, I, P, kh, kw)
    return patches.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1] * k[0] * k[1])


@dataclass
class Normal:
    """Normal equations of one conv group / linear layer: ``gram = [U|1]ᵀ[U|1]``, ``cross = [U|1]ᵀY``,
    ``energy[o] = ‖Y[:, o]‖²``, ``rows``. The constant column is last (present even without intercept)."""

    gram: torch.Tensor
    cross: torch.Tensor
    energy: torch.Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, d: int, o: int) -> Normal:
        return cls(torch.zeros(d + 1, d + 1, dtype=torch.float64), torch.zeros(d + 1, o, dtype=torch.float64),
                   torch.zeros(o, dtype=torch.float64))

    def add(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate one batch of rows. Large batches (over 2²⁰ entries) are multiplied in float32 and
        accumulated in float64 (about 1e-6 relative per batch, far below the ridge); small ones in float64."""
        dtype = torch.float32 if u.numel() > 1 << 20 else torch.float64
        u = torch.cat([u.to(dtype), torch.ones(u.shape[0], 1, dtype=dtype, device=u.device)], 1)
        y = y.to(dtype)
        self.gram += (u.t() @ u).cpu().double()
        self.cross += (u.t() @ y).cpu().double()
        self.energy += (y.double() * y.double()).sum(0).cpu()
        self.rows += u.shape[0]

    def absorb(self, other: Normal) -> Normal:
        """Add ``other``'s statistics to these (in place); returns self."""
        self.gram += other.gram
        self.cross += other.cross
        self.energy += other.energy
        self.rows += other.rows
        return self

    def outputs(self, keep: torch.Tensor) -> Normal:
        """The same statistics for the outputs ``keep`` (bool over O) only."""
        return Normal(self.gram, self.cross[:, keep], self.energy[keep], self.rows)

    def weighted(self, w: torch.Tensor) -> Normal:
        """Outputs weighted by ``w`` (O,): errors count ``w_o``-fold (targets scaled by √w_o)."""
        r = w.sqrt().to(self.cross)
        return Normal(self.gram, self.cross * r[None, :], self.energy * w.to(self.energy), self.rows)

    def total(self) -> float:
        return float(self.energy.sum())

    def residual(self, coef: torch.Tensor) -> float:
        """‖Y − [U|1] coef‖² from the statistics alone."""
        return self.total() - 2 * float(torch.sum(coef * self.cross)) + float(torch.sum(coef * (self.gram @ coef)))


def solve(stats: Normal, prior: torch.Tensor, r: float, intercept: bool) -> torch.Tensor:
    """Ridge solution (D+1, O) shrunk towards ``prior`` (D+1, O); without intercept the constant row is 0."""
    d = stats.gram.shape[0] - 1
    lam = r * float(torch.trace(stats.gram[:d, :d])) / max(d, 1)
    lam = lam if lam > 0 else r
    idx = torch.arange(d + 1) if intercept else torch.arange(d)
    pen = torch.full((len(idx),), lam, dtype=torch.float64)
    if intercept:
        pen[-1] = 0.0
    a = stats.gram[idx][:, idx] + torch.diag(pen)
    rhs = stats.cross[idx] + pen[:, None] * prior[idx]
    try:
        sol = torch.linalg.solve(a, rhs)
    except RuntimeError:  # singular (ridge 0 and rank-deficient inputs)
        sol = torch.linalg.lstsq(a, rhs).solution
    out = torch.zeros_like(prior)
    out[idx] = sol
    return out


# ----------------------------------------------------------------------------------------------
# one consumer


@dataclass
class Consumer:
    name: str
    module: nn.Module  # in the original model
    keep: np.ndarray  # bool over its original inputs
    groups: int

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per conv group: (its kept inputs as indices into the weight's input dim, the same inputs in the
        pruned model's input, its output rows)."""
        n_in = len(self.keep)
        n_out = self.weight.shape[0]
        gi, go = n_in // self.groups, n_out // self.groups
        new_index = np.cumsum(self.keep) - 1
        out = []
        for g in range(self.groups):
            local = np.nonzero(self.keep[g * gi:(g + 1) * gi])[0]
            out.append((torch.from_numpy(local), torch.from_numpy(new_index[local + g * gi]),
                        torch.arange(g * go, (g + 1) * go)))
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The original weight as (O, I, *kernel)."""
        return weight_oi(self.module)

    @property
    def taps(self) -> int:
        """k: kernel positions per input channel (1 for Linear)."""
        return int(np.prod(self.weight.shape[2:], dtype=np.int64))

    def prior(self, local_in: torch.Tensor, out_rows: torch.Tensor) -> torch.Tensor:
        """(D+1, O_g): the original weight on one block's kept inputs, with the original bias last."""
        w = self.weight.double()[out_rows][:, local_in]
        b = self.module.bias
        bias = b.detach().double()[out_rows] if b is not None else torch.zeros(len(out_rows), dtype=torch.float64)
        return torch.cat([w.reshape(len(out_rows), -1), bias[:, None]], 1).t()


def _check_finite(t: torch.Tensor, name: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"the calibration {what} of '{name}' contain NaN or Inf (check the inputs and the "
                          "model's weights)")


def statistics(targets: Targets, compressed: nn.Module, c: Consumer, n_train: int, skip: Skip | None = None,
                passes: Passes | None = None) -> tuple[list[Normal], list[Normal]]:
    """(train, held-out) normal equations per conv group of consumer ``c``: its input in ``compressed`` against
    its original output (:class:`~prunekit.compensate.targets.Targets`), plus, with a ``skip``, the skip
    branch's drift mapped into its output space (:mod:`.residual`)."""
    blocks = c.blocks()
    sizes = [len(b[0]) * c.taps for b in blocks]
    train = [Normal.zeros(d, len(b[2])) for d, b in zip(sizes, blocks)]
    val = [Normal.zeros(d, len(b[2])) for d, b in zip(sizes, blocks)]
    scale = output_scale(skip, targets.model) if skip is not None else None
    dim = -1 if is_linear(c.module) else 1
    seen = 0
    for b, xb in enumerate(batches(targets.inputs, targets.batch_size)):
        y, s_o = targets.batch(c.name, b, xb)
        x, s_c = compressed_values(compressed, c.name, skip, passes, b, xb)
        pos = targets.positions[c.name]
        if s_o is not None and s_c is not None:
            s_c = output_rows(c.module, s_c, pos)
            if s_c.shape == s_o.shape:  # else the residual stream itself is pruned: no correspondence
                y = y + (s_o - s_c) * (1.0 if scale is None else scale.to(y)[None, :])
        _check_finite(x, c.name, "inputs")
        _check_finite(y, c.name, "outputs")
        n = x.shape[0]
        per_sample = y.shape[0] // n
        cut = min(max(n_train - seen, 0), n)  # samples of this batch that belong to the training part
        for stats_list, lo, hi in ((train, 0, cut), (val, cut, n)):
            if hi <= lo:
                continue
            for stats, (_, in_new, out_rows) in zip(stats_list, blocks):
                xs = x[lo:hi].index_select(dim, in_new.to(x.device))
                ys = y[lo * per_sample:hi * per_sample].index_select(1, out_rows)
                u = patches(c.module, xs, pos) if xs.shape[dim] else ys.new_zeros(ys.shape[0], 0)
                stats.add(u, ys)
        seen += n
    return train, val


def check_gram_size(c: Consumer, max_bytes: int) -> None:
    """Refuse a consumer whose two Gram matrices (float64) would exceed ``max_bytes``, naming it and the size."""
    k = c.taps
    d_max = max(len(b[0]) * k for b in c.blocks()) + 1
    need = 2 * d_max * d_max * 8 * c.groups
    if need > max_bytes:
        raise ConfigError(f"reconstructing '{c.name}' needs Gram matrices of {need / 2**30:.2f} GiB "
                          f"({c.groups} × ({d_max})²), over max_gram_bytes={max_bytes}; prune "
                          "this layer without refit (ignore it) or raise the limit")
