"""Keep what surrounds the sliced tensors consistent: functional parameters, head counts, tied weights.

Layer rules slice the tensors of leaf modules. Three things live outside them and are fixed here (only
:mod:`prunekit.engine.surgery` calls these):

* **functional parameters** (``param`` members: a CLS token, a position embedding, a relative-position
  bias table) are sliced along their channel axis;
* **head counts**: an attention module whose forward splits H·D channels into (H, D) heads keeps Python
  attributes such as ``num_heads`` / ``num_key_value_heads`` / ``split_size`` (GPT-2 splits its fused
  qkv at ``split_size``); after a prune that keeps H' heads, every such attribute equal to H becomes H'
  and every width attribute equal to H·D becomes H'·D;
* **tied weights** (``lm_head.weight is wte.weight``): slicing gives each module a new parameter, so
  parameters that were one object before surgery are made one object again (their values must agree).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import SurgeryError
from .masks import member_keep

#: attributes that count attention heads (query heads, or key/value heads under grouped-query attention)
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_key_value_heads",
                    "num_kv_heads", "n_kv_heads", "heads")
#: attributes that hold heads × head_dim
HEAD_WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size", "qkv_dim", "attn_dim")


def slice_parameter(module: nn.Module, name: str, axis: int, idx: torch.Tensor) -> None:
    """``module.<name> = module.<name>.index_select(axis, idx)`` as a new parameter."""
    old = getattr(module, name)
    value = old.detach().index_select(axis, idx.to(old.device)).contiguous().clone()
    module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)


def head_attributes(model: nn.Module, graph: Any, masks: list[np.ndarray]) -> dict[str, dict[str, int]]:
    """``{owner module: {attribute: new value}}`` for the head splits of ``graph`` whose heads shrink."""
    counts: dict[str, dict[int, int]] = {}
    widths: dict[str, dict[int, int]] = {}
    for split in graph.head_splits:
        if split.owner is None:
            continue
        kept = int(member_keep(split, masks).sum())
        if kept == split.heads:
            continue
        if split.kind == "heads":
            counts.setdefault(split.owner, {})[split.heads] = kept
        widths.setdefault(split.owner, {})[split.heads * split.head_dim] = kept * split.head_dim
    out: dict[str, dict[str, int]] = {}
    for owner, width in widths.items():
        count = counts.get(owner, {})
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        attrs = {}
        for names, mapping in ((HEAD_COUNT_ATTRS, count), (HEAD_WIDTH_ATTRS, width)):
            for a in names:
                v = getattr(module, a, None)
                if isinstance(v, int) and not isinstance(v, bool) and v in mapping:
                    attrs[a] = mapping[v]
        if attrs:
            out[owner] = attrs
    return out


def set_attributes(module: nn.Module, attrs: dict[str, int]) -> None:
    for a, v in attrs.items():
        setattr(module, a, int(v))


Tie = tuple[list[str], nn.Parameter]


def find_ties(model: nn.Module) -> list[Tie]:
    """Groups of parameter names that are one ``nn.Parameter`` object (e.g. tied embeddings), with it."""
    by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), ([], p))[0].append(name)
    return [(names, p) for names, p in by_id.values() if len(names) > 1]


def retie(model: nn.Module, ties: list[Tie]) -> None:
    """Make the parameters of each tie group one object again. Those sliced since :func:`find_ties` must
    agree (tied weights are sliced by the same channels); members that were not sliced (a tied module
    the trace never called, e.g. T5's ``shared``) take the sliced parameter, and an ``nn.Embedding`` /
    ``nn.Linear`` owner its new sizes."""
    for names, original in ties:
        owners = [(n, *n.rpartition(".")[::2]) for n in names]
        params = {n: model.get_submodule(o)._parameters[a] for n, o, a in owners}
        sliced = [n for n in names if params[n] is not original]
        if not sliced:
            continue
        first = params[sliced[0]]
        for n in sliced[1:]:
            p = params[n]
            if p.shape != first.shape or not torch.equal(p.detach(), first.detach()):
                raise SurgeryError(f"tied parameters '{sliced[0]}' and '{n}' were pruned differently "
                                   f"({tuple(first.shape)} vs {tuple(p.shape)})")
        for n, owner, attr in owners:
            module = model.get_submodule(owner)
            module._parameters[attr] = first
            _sync_sizes(module)


def _sync_sizes(module: nn.Module) -> None:
    if isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
