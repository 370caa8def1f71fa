"""Re-estimated BatchNorm statistics of a pruned (and compensated) network, as plan refits.

After channels are removed, the inputs of later BatchNorms drift and their running statistics no
longer describe them. Re-estimation runs a throwaway copy of the pruned network over unlabeled
calibration inputs with every BatchNorm in training mode and a cumulative average (``momentum=None``),
the standard recalibration, then returns the resulting ``running_mean`` / ``running_var`` as
:class:`~prunekit.engine.Refit` records over the *original* channels (pruned channels hold 0 and are
dropped by surgery). Nothing here writes the model that is returned to the user.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine import ChannelGraph, Plan, Refit, apply
from ..engine.masks import keep_masks, member_keep
from ..runtime import call, eval_mode
from .calibration import batches


@torch.no_grad()
def batchnorm_refits(model: nn.Module, graph: ChannelGraph, plan: Plan, inputs: Any, batch_size: int = 100
                     ) -> list[Refit]:
    """One refit per BatchNorm of ``apply(model, graph, plan)``: its statistics re-estimated on ``inputs``."""
    pruned = copy.deepcopy(apply(model, graph, plan, verify=False))
    norms = {name: m for name, m in pruned.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    if not norms:
        return []
    with eval_mode(pruned):
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all batches
            m.train()
        for xb in batches(inputs, batch_size):
            call(pruned, xb)
    masks = keep_masks(graph, plan).masks
    refits = []
    for name, m in norms.items():
        member = graph.member(name, "norm")
        keep = member_keep(member, masks) if member is not None else np.ones(m.num_features, dtype=bool)
        idx = torch.from_numpy(np.nonzero(keep)[0])
        mean = torch.zeros(len(keep), dtype=torch.float64).index_copy_(0, idx, m.running_mean.double().cpu())
        var = torch.ones(len(keep), dtype=torch.float64).index_copy_(0, idx, m.running_var.double().cpu())
        refits.append(Refit(module=name, running_mean=mean, running_var=var,
                            provenance={"source": "batchnorm re-estimation"}))
    return refits
