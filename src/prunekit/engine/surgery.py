"""Surgery: the only code that edits modules. It applies a :class:`Plan`; it never decides anything.

For every member of the graph (a module dimension, role ``out``/``in``/``norm``) the kept indices are
the member's indices whose group channel is kept (protected channels always are). Producers lose rows
(``weight[o]``, ``bias[o]``), norms lose their per-channel tensors, consumers lose input columns, and a
consumer reading a group with a merge matrix M (N × P) gets

    W_new[o, j', ...] = Σ_j E[j, j'] · W[o, j, ...],   E[j, j'] = M[ch(j), col(ch(j'))] · [pos(j) = pos(j')]

where ``ch(j)`` is the group channel of input index ``j`` and ``pos(j)`` its offset in the channel's
block (flatten → Linear: each channel owns H·W consecutive features, so E = M ⊗ I_{HW}).
After every group, the plan's :class:`~prunekit.engine.plan.Refit` records are written: a consumer's new
weight/bias (rows of the kept outputs), and a constant output offset added to its bias or folded into the
BatchNorm that reads its output (``running_mean −= offset``).
Module attributes (``out_channels``, ``in_features``, ``groups``, ``num_features``, ...) are updated, so
the result has the same classes, is physically smaller, and ``repr`` shows the new sizes.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..runtime import eval_mode
from .adapters import find_ties, head_attributes, retie, set_attributes, slice_parameter
from .capture import shape_tree as _shape_tree
from .channels import Member
from .errors import PlanError, SurgeryError
from .graph import ChannelGraph
from .hf_config import is_hf_model, set_config, sync_config
from .masks import keep_masks, member_keep
from .plan import Plan, PruneRecord
from .rules import find_rule


def _merge_matrix(m: Member, keep: np.ndarray, masks: list[np.ndarray], merges: dict[int, torch.Tensor],
                  plan: Plan) -> torch.Tensor:
    """Sparse E (len(m) × kept) for consumer member ``m`` (see module docstring)."""
    new_of_old = np.full(len(m), -1, dtype=np.int64)
    kept = np.nonzero(keep)[0]
    new_of_old[kept] = np.arange(len(kept))
    rows, cols, vals = [], [], []
    touched = np.isin(m.group, list(merges))
    ident = kept[~touched[kept]]
    rows.append(ident)
    cols.append(new_of_old[ident])
    vals.append(np.ones(len(ident)))
    for gid, M in merges.items():
        sel = np.nonzero(m.group == gid)[0]
        if len(sel) == 0:
            continue
        col_of_channel = {c: p for p, c in enumerate(plan.group(gid).keep)}
        Mn = M.detach().double().cpu().numpy()
        new_sel = sel[keep[sel]]
        for s in np.unique(m.pos[sel]).tolist():
            src = sel[m.pos[sel] == s]
            dst = new_sel[m.pos[new_sel] == s]
            p = np.array([col_of_channel[c] for c in m.channel[dst].tolist()], dtype=np.int64)
            block = Mn[np.ix_(m.channel[src], p)]
            r, c = np.nonzero(block)
            rows.append(src[r])
            cols.append(new_of_old[dst[c]])
            vals.append(block[r, c])
    idx = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(np.concatenate(vals)), (len(m), len(kept)),
                                   check_invariants=True).coalesce()


def _module_shapes(module: nn.Module) -> dict[str, list[int]]:
    out = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
    out.update({n: list(b.shape) for n, b in module.named_buffers(recurse=False) if b is not None})
    return out


def _check_size(module: nn.Module, rule: Any, m: Member) -> None:
    size = rule.size(module, m.role)
    if size is not None and size != len(m):
        raise PlanError(f"module '{m.module}' has {size} {m.role}-channels but the graph recorded {len(m)}: "
                        "the graph was built from another model (rebuild it from this one)")


def apply(model: nn.Module, graph: ChannelGraph, plan: Plan, *, verify: bool = True) -> nn.Module:
    """Apply ``plan`` to a deep copy of ``model`` (left untouched) and return the copy.

    The copy carries ``prunekit_record`` (a :class:`PruneRecord`, the model's previous record plus this
    step) for saving/replay. With ``verify`` the copy is run on the graph's example inputs and must
    give outputs of the same shapes, else :class:`SurgeryError`.
    """
    pm = keep_masks(graph, plan)
    masks, merges = pm.masks, pm.merges
    new = copy.deepcopy(model)
    ties = find_ties(new)
    step: dict[str, dict[str, Any]] = {}
    for m in graph.members:
        module = new.get_submodule(m.module)
        if m.role == "param":
            keep = member_keep(m, masks)
            if not keep.all():
                idx = torch.from_numpy(np.nonzero(keep)[0])
                slice_parameter(module, m.param, m.axis, idx)
                entry = step.setdefault(m.module, {"type": type(module).__name__})
                entry[f"param:{m.param}:{m.axis}"] = idx.tolist()
            continue
        rule = find_rule(type(module))
        if rule is None:  # pragma: no cover - members only exist for modules with rules
            continue
        _check_size(module, rule, m)
        keep = member_keep(m, masks)
        if not keep.any():
            raise PlanError(f"plan removes every {m.role}-channel of module '{m.module}' ({m.kind})")
        merging = m.role == "in" and bool(np.isin(m.group, list(merges)).any())
        if keep.all() and not merging:
            continue
        idx = torch.from_numpy(np.nonzero(keep)[0])
        if merging:
            rule.merge_in(module, _merge_matrix(m, keep, masks, merges, plan))
        else:
            rule.prune(module, m.role, idx)
        entry = step.setdefault(m.module, {"type": type(module).__name__})
        entry[m.role] = idx.tolist()
    for refit in plan.refits:
        _apply_refit(new, graph, masks, refit)
    for owner, attrs in head_attributes(new, graph, masks).items():
        step.setdefault(owner, {"type": type(new.get_submodule(owner)).__name__})["attrs"] = attrs
        set_attributes(new.get_submodule(owner), attrs)
    retie(new, ties)
    config = sync_config(new, graph, masks)
    if config:
        step.setdefault("", {"type": type(new).__name__})["config"] = config
    refit = {r.module for r in plan.refits}  # a refit may create a bias: its shapes are recorded too
    shapes = {name: _module_shapes(new.get_submodule(name)) for name in [*step, *sorted(refit - set(step))]}
    base = getattr(model, "prunekit_record", None)
    base = base if isinstance(base, PruneRecord) else PruneRecord()
    new.prunekit_record = base.then(step, shapes) if step or shapes else base
    if verify:
        _verify(new, graph)
    return new


def _out_rows(graph: ChannelGraph, masks: list[np.ndarray], module: str, n: int) -> torch.Tensor:
    """Indices of ``module``'s kept outputs (a norm: its kept channels; all ``n`` when in no group)."""
    member = graph.member(module, "out") or graph.member(module, "norm")
    keep = member_keep(member, masks) if member is not None else np.ones(n, dtype=bool)
    if len(keep) != n:
        raise PlanError(f"refit of '{module}' has {n} output rows, the graph records {len(keep)} outputs")
    return torch.from_numpy(np.nonzero(keep)[0])


def _apply_refit(model: nn.Module, graph: ChannelGraph, masks: list[np.ndarray], refit: Any) -> None:
    """Write one :class:`Refit` into the already sliced ``model`` (rows: the kept outputs)."""
    try:
        module = model.get_submodule(refit.module)
    except AttributeError:
        raise PlanError(f"refit names module '{refit.module}', which the model does not have") from None
    rule = find_rule(type(module))
    if rule is None:
        raise PlanError(f"refit of '{refit.module}' ({type(module).__name__}): no channel rule can write it")
    out_dim = getattr(rule, "OUT_DIM", 0)  # the weight's output dim in the module's own layout
    counts = [t.shape[out_dim if t is refit.weight else 0] for t in
              (refit.weight, refit.bias, refit.offset, refit.running_mean, refit.running_var) if t is not None]
    rows = _out_rows(graph, masks, refit.module, counts[0])
    if any(n != counts[0] for n in counts):
        raise PlanError(f"refit of '{refit.module}': its tensors disagree on the output count")
    pick = (lambda t, dim=0: None if t is None else t.index_select(dim, rows))
    try:
        if refit.weight is not None or refit.bias is not None:
            rule.set_weights(module, pick(refit.weight, out_dim), pick(refit.bias))
        if refit.offset is not None and refit.norm is not None:
            norm = model.get_submodule(refit.norm)
            find_rule(type(norm)).absorb_input_offset(norm, pick(refit.offset))
        elif refit.offset is not None:
            rule.add_output_offset(module, pick(refit.offset))
        if refit.running_mean is not None or refit.running_var is not None:
            rule.set_statistics(module, pick(refit.running_mean), pick(refit.running_var))
    except (NotImplementedError, SurgeryError) as e:
        raise PlanError(f"refit of '{refit.module}' cannot be written: {e}") from e


def _verify(model: nn.Module, graph: ChannelGraph) -> None:
    args, kwargs = graph.example_inputs
    try:
        with eval_mode(model):
            out = model(*args, **kwargs)
    except Exception as e:
        raise SurgeryError(f"the pruned {type(model).__name__} fails on the example inputs: "
                           f"{type(e).__name__}: {e}. A forward probably hard-codes a channel count "
                           "(e.g. view(-1, 512)); ignore the module involved") from e
    shapes = _shape_tree(out)
    if shapes != graph.output_shapes:
        raise SurgeryError(f"the pruned {type(model).__name__} changes output shapes: {graph.output_shapes} → "
                           f"{shapes}")


def mask(model: nn.Module, graph: ChannelGraph, plan: Plan) -> nn.Module:
    """Soft pruning: a deep copy of ``model`` with the plan's removed channels zeroed at their producers
    and norms (rows and bias of every ``out`` member, γ/β/running mean of every ``norm`` member).

    For networks whose ops map 0 to 0 (ReLU, SiLU, GELU, Tanh, pooling, add, BN in eval with β = 0 ...)
    its outputs equal those of ``apply(model, graph, plan)`` without merges.
    """
    masks = keep_masks(graph, plan).masks
    new = copy.deepcopy(model)
    for m in graph.members:
        if m.role == "in":
            continue
        drop = ~member_keep(m, masks)
        if drop.any():
            module = new.get_submodule(m.module)
            idx = torch.from_numpy(np.nonzero(drop)[0])
            if m.role == "param":
                with torch.no_grad():
                    getattr(module, m.param).index_fill_(m.axis, idx, 0)
            else:
                find_rule(type(module)).zero(module, m.role, idx)
    return new


def record_of(model: nn.Module) -> PruneRecord | None:
    """The :class:`PruneRecord` carried by a model returned by :func:`apply` (None if never pruned)."""
    rec = getattr(model, "prunekit_record", None)
    return rec if isinstance(rec, PruneRecord) else None


def replay(model: nn.Module, record: PruneRecord | dict | str) -> nn.Module:
    """Resize a freshly built dense ``model`` in place as ``record`` says (no weights needed: tensors are
    sliced, then normally overwritten by a state dict). Returns ``model`` carrying the record.

    Raises :class:`~prunekit.errors.CheckpointError` naming the module when the record does not fit.
    """
    if not isinstance(record, PruneRecord):
        try:
            record = PruneRecord.from_json(record)
        except (PlanError, ValueError, TypeError) as e:
            raise CheckpointError(f"prune_record is unreadable: {e}") from e
    ties = find_ties(model)
    for i, step in enumerate(record.steps):
        for name, entry in step.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"prune_record step {i}: {type(model).__name__} has no module '{name}'") from None
            if type(module).__name__ != entry.get("type"):
                raise CheckpointError(f"prune_record step {i}: module '{name}' is {type(module).__name__}, "
                                      f"the record says {entry.get('type')}")
            _replay_parameters(module, name, entry, i)
            set_attributes(module, entry.get("attrs") or {})
            if entry.get("config") and is_hf_model(module):
                set_config(module, entry["config"])
            if not any(role in entry for role in ("out", "in", "norm")):
                continue
            rule = find_rule(type(module))
            if rule is None:
                raise CheckpointError(f"prune_record step {i}: module '{name}' ({type(module).__name__}) has "
                                      "no channel rule (register the layer before loading)")
            for role in ("out", "in", "norm"):
                if role not in entry:
                    continue
                idx = torch.as_tensor(entry[role], dtype=torch.long)
                size = rule.size(module, role)
                if len(idx) and (idx.min() < 0 or (size is not None and idx.max() >= size)):
                    raise CheckpointError(f"prune_record step {i}: indices for '{name}' ({role}) exceed its "
                                          f"{size} channels")
                rule.prune(module, role, idx)
    retie(model, ties)
    _replay_created_biases(model, record)
    for name, shapes in record.shapes.items():
        have = _module_shapes(model.get_submodule(name))
        for t, shape in shapes.items():
            if have.get(t) != list(shape):
                raise CheckpointError(f"prune_record: after replay '{name}.{t}' has shape {have.get(t)}, "
                                      f"the record says {shape}")
    model.prunekit_record = record
    return model


def _replay_created_biases(model: nn.Module, record: PruneRecord) -> None:
    """A refit offset on a bias-free ``nn.Linear`` created its bias (``WeightRule.add_output_offset``): where
    the record's shapes list a ``bias`` the dense Linear lacks, create a zero one so the saved weights load."""
    for name, shapes in record.shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # reported by the shape check
        if "bias" in shapes and isinstance(module, nn.Linear) and module.bias is None:
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(shapes["bias"], dtype=w.dtype, device=w.device),
                                       requires_grad=w.requires_grad)


def _replay_parameters(module: nn.Module, name: str, entry: dict, step: int) -> None:
    """Replay the ``param:<attr>:<axis>`` entries of a record step (functionally used parameters)."""
    for key, idx in entry.items():
        if not key.startswith("param:"):
            continue
        _, attr, axis = key.split(":")
        p = getattr(module, attr, None)
        if not isinstance(p, torch.Tensor) or p.dim() <= int(axis) or (idx and max(idx) >= p.shape[int(axis)]):
            raise CheckpointError(f"prune_record step {step}: parameter '{name}.{attr}' does not fit the record")
        slice_parameter(module, attr, int(axis), torch.as_tensor(idx, dtype=torch.long))


def load_hook(model: nn.Module, value: Any) -> nn.Module:
    """``prunekit.io`` load hook for the ``"prune_record"`` key: replay the record on the dense model."""
    return replay(model, value)
