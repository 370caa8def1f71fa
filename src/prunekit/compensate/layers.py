"""The layers a refit can rewrite, seen in one orientation.

A linear map is ``nn.Linear`` (weight (O, I)) or a transposed linear layer such as ``transformers``'
``Conv1D`` (GPT-2; weight (I, O), found through its engine rule). Compensation code reads and writes
weights as (O, I, *kernel) through :func:`weight_oi` / :func:`to_module_layout`. A transposed convolution
(weight (I, O, *k), one group) is seen as the stride-1 convolution it equals on its zero-dilated, padded
input (:func:`~prunekit.compensate.normal_equations.patches`): ``W_eq[o, i] = flip(W[i, o])`` over the kernel.
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine.rules import LinearRule, find_rule


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or another layer with a linear rule (acts on the last dim)."""
    return isinstance(module, nn.Linear) or isinstance(find_rule(type(module)), LinearRule)


def _transposed(module: nn.Module) -> bool:
    rule = find_rule(type(module))
    return isinstance(rule, LinearRule) and rule.OUT_DIM == 1


def is_transposed_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight as (O, I, *kernel), detached (a transposed conv's: its equivalent convolution's)."""
    w = module.weight.detach()
    if is_transposed_conv(module):
        return w.transpose(0, 1).flip(tuple(range(2, w.dim())))
    return w.t() if _transposed(module) else w


def to_module_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_oi` for a new weight of the module's kind."""
    if is_transposed_conv(module):
        return weight.flip(tuple(range(2, weight.dim()))).transpose(0, 1).contiguous()
    return weight.t().contiguous() if _transposed(module) else weight


def in_features(module: nn.Module) -> int:
    return weight_oi(module).shape[1]
