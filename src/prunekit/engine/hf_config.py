"""Hugging Face ``transformers`` models: keep ``model.config`` true to the pruned widths.

``save_pretrained`` → ``from_pretrained`` rebuilds a model from its config, so after a prune the config
must say the new sizes. When every layer keeps the same number of heads / MLP neurons / hidden channels,
:func:`sync_config` sets ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, the intermediate
size (``intermediate_size`` / ``n_inner`` / ``d_ff`` / ``hidden_dim`` / ``ffn_dim``) and ``hidden_size``
(``n_embd`` / ``d_model`` / ``dim`` through the config's ``attribute_map``), then checks the result: a
model built from the new config (on the meta device, no memory) must have exactly the pruned model's
parameter shapes. Otherwise (per-layer widths, or a config field this code does not know) the config is
left alone and the model's ``save_pretrained`` raises a :class:`~prunekit.errors.ConfigError` that points
to ``prunekit.io.save_model`` / ``load_model(path, model=dense)``, which reload any pruned model.

Nothing here imports ``transformers``: a model is treated as a Hugging Face model when its ``config`` has
``to_dict`` and the model has ``save_pretrained``.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .masks import member_keep

INTERMEDIATE_FIELDS = ("intermediate_size", "n_inner", "d_ff", "hidden_dim", "ffn_dim", "mlp_dim")


def is_hf_model(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "to_dict") and hasattr(model, "save_pretrained")


def _uniform(values: set[int], what: str, problems: list[str]) -> int | None:
    if len(values) > 1:
        problems.append(f"{what} differs between layers ({sorted(values)})")
        return None
    return next(iter(values), None)


def config_changes(model: nn.Module, graph: Any, masks: list[np.ndarray]) -> tuple[dict[str, int], list[str]]:
    """The config fields a uniform prune changes, and why not (per-layer widths) when it is not uniform."""
    cfg, problems, out = model.config, [], {}
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    new_q, new_kv, head_dims = set(), set(), set()
    for split in graph.head_splits:
        if split.kind != "heads":
            continue
        kept = int(member_keep(split, masks).sum())
        head_dims.add(split.head_dim)
        if split.heads == heads:
            new_q.add(kept)
        elif split.heads == kv_heads:
            new_kv.add(kept)
    q, kv = _uniform(new_q, "the number of attention heads", problems), _uniform(new_kv, "kv heads", problems)
    if q is not None and q != heads:
        out["num_attention_heads"] = q
        if kv_heads is not None and not new_kv:
            out["num_key_value_heads"] = q
        if len(head_dims) == 1:
            out["head_dim"] = head_dims.pop()
    if kv is not None and kv != kv_heads:
        out["num_key_value_heads"] = kv
    hidden = getattr(cfg, "hidden_size", None)
    new_hidden = {int(member_keep(m, masks).sum()) for m in graph.members
                  if m.role == "norm" and len(m) == hidden and "Norm" in m.kind}
    h = _uniform(new_hidden, "the hidden size", problems)
    if h is not None and h != hidden:
        out["hidden_size"] = h
    for field in INTERMEDIATE_FIELDS:
        old = getattr(cfg, field, None)
        if field == "n_inner" and old is None and hidden is not None and hasattr(cfg, "n_inner"):
            old = 4 * hidden
        if not isinstance(old, int) or old in (hidden, None):
            continue
        widths = {int(member_keep(m, masks).sum()) for m in graph.members
                  if m.role == "out" and m.fresh and len(m) == old}
        w = _uniform(widths, f"'{field}'", problems)
        if w is not None and w != old:
            out[field] = w
    return out, problems


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def sync_config(model: nn.Module, graph: Any, masks: list[np.ndarray]) -> dict[str, int]:
    """Update ``model.config`` after surgery (see the module docstring); returns the fields set ({} when
    nothing changed or the config cannot describe the model, which then refuses ``save_pretrained``)."""
    if not is_hf_model(model):
        return {}
    changes, problems = config_changes(model, graph, masks)
    if not changes and not problems:
        return {}
    if not problems:
        problem = _mismatch(model, changes)
        if problem:
            problems.append(problem)
    if problems:
        refuse_save_pretrained(model, "; ".join(problems))
        return {}
    set_config(model, changes)
    return changes


#: (model class, config with the changes, the pruned model's shapes) → why the config cannot describe it
_CHECKED: dict[tuple, str | None] = {}


def _mismatch(model: nn.Module, changes: dict[str, int]) -> str | None:
    """Why a model built from ``model.config`` + ``changes`` (on the meta device) differs from ``model``, or
    None. Memoised: a reconstruction applies the same plan once per refit layer."""
    mine = _shapes(model)
    try:
        config = {**model.config.to_dict(), **changes}
        key = (type(model), json.dumps(config, sort_keys=True, default=str), tuple(sorted(mine.items())))
    except TypeError:
        key = None
    if key is not None and key in _CHECKED:
        return _CHECKED[key]
    try:
        candidate = model.config.__class__.from_dict(config)
        with torch.device("meta"):
            skeleton = type(model)(candidate)
    except Exception as e:  # noqa: BLE001 - any failure means the config cannot describe the model
        problem = f"{type(model).__name__}(config) fails with the new sizes {changes}: {e}"
    else:
        built = _shapes(skeleton)
        diff = [n for n in sorted(set(mine) | set(built)) if mine.get(n) != built.get(n)]
        problem = (f"a model built from the updated config {changes} differs in '{diff[0]}' "
                   f"({built.get(diff[0], 'absent')} there, {mine.get(diff[0], 'absent')} here)") if diff else None
    if key is not None:
        _CHECKED[key] = problem
    return problem


def set_config(model: nn.Module, changes: dict[str, int]) -> None:
    for k, v in changes.items():
        setattr(model.config, k, v)


def refuse_save_pretrained(model: nn.Module, why: str) -> None:
    """Make ``model.save_pretrained`` raise a ConfigError that says why and what to use instead."""
    name = type(model).__name__

    def save_pretrained(*args: Any, **kwargs: Any) -> None:
        raise ConfigError(f"this pruned {name} cannot be described by its Hugging Face config ({why}), so "
                          "from_pretrained could not rebuild it: save it with prunekit.io.save_model(model, path) "
                          "and reload it with prunekit.io.load_model(path, model=<the dense model>)")

    model.save_pretrained = save_pretrained
