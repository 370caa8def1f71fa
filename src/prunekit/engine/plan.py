"""Plain-data values that cross the decide/apply boundary: :class:`Plan` and :class:`PruneRecord`.

A :class:`Plan` says, per channel group of a :class:`~prunekit.engine.graph.ChannelGraph`, which of
the group's N channels survive (``keep``, P ascending indices) and optionally a merge matrix
``M ∈ R^{N×P}`` (Neuron Merging, ``M = Z^T``): row ``n`` is an original channel, column ``p`` the kept
channel ``keep[p]``; surgery replaces every consumer's input weights by ``W ×_in M``, i.e.
``W_new[:, p] = Σ_n M[n, p] · W[:, n]``. Pure pruning is ``M[keep[p], p] = 1`` and zero rows elsewhere.

A plan may also carry :class:`Refit` records: per consumer module, new parameters over its kept
inputs (a whole-layer reconstruction) and/or a constant output offset, folded into the consumer's bias
or into the BatchNorm that reads its output (``running_mean −= offset``). Deciders (``prunekit.compensate``)
compute them; surgery writes them.

A :class:`PruneRecord` is what surgery did, per module and role (``out``/``in``/``norm``): the kept
indices. It is saved next to the weights and replayed onto a freshly built dense model
(:func:`~prunekit.engine.surgery.replay`) before the weights are loaded.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PlanError

PLAN_FORMAT = "prunekit.plan"
RECORD_FORMAT = "prunekit.prune_record"


def _merge_to_json(m: torch.Tensor | None) -> dict | None:
    """Sparse encoding of M: non-zero ``[row, col, value]`` triples (values as exact floats)."""
    if m is None:
        return None
    rows, cols = torch.nonzero(m, as_tuple=True)
    vals = m[rows, cols].tolist()
    return {"shape": list(m.shape), "dtype": str(m.dtype).removeprefix("torch."),
            "entries": [[int(r), int(c), float(v)] for r, c, v in zip(rows.tolist(), cols.tolist(), vals)]}


def _merge_from_json(d: dict | None) -> torch.Tensor | None:
    if d is None:
        return None
    dtype = getattr(torch, d.get("dtype", "float32"))
    m = torch.zeros(tuple(d["shape"]), dtype=dtype)
    for r, c, v in d["entries"]:
        m[int(r), int(c)] = v
    return m


@dataclass(eq=False, kw_only=True)
class GroupPlan:
    """The decision for one group (keyword-only fields).

    Attributes:
        group_id: id of the group in its :class:`~prunekit.engine.graph.ChannelGraph`.
        keep: kept group channels, sorted ascending (sorting also permutes ``merge``'s columns).
        members: ``[{"module": name, "role": "out"|"in"|"norm", "size": indices in the group}, ...]``
            (informational).
        merge: optional M of shape (N, len(keep)); column p belongs to ``keep[p]``.
        size: N, the group's channel count (checked against the graph).
        criterion, ratio: how ``keep`` was chosen; ``provenance``: anything else (scores, seed, ...).

    A constant offset in the consumers' inputs (an affine merge) is not a group field: its effect on each
    consumer's output is a :class:`Refit` ``offset`` of that consumer (one way to fold constants).
    """

    group_id: int
    keep: list[int]
    members: list[dict] = field(default_factory=list)
    merge: torch.Tensor | None = None
    size: int | None = None
    criterion: str | None = None
    ratio: float | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        keep = [int(k) for k in (self.keep.tolist() if isinstance(self.keep, torch.Tensor) else self.keep)]
        if len(set(keep)) != len(keep):
            raise PlanError(f"group {self.group_id}: keep has duplicate indices")
        order = sorted(range(len(keep)), key=keep.__getitem__)
        self.keep = [keep[i] for i in order]
        if self.merge is not None:
            m = torch.as_tensor(self.merge)
            if m.dim() != 2 or m.shape[1] != len(keep):
                raise PlanError(f"group {self.group_id}: merge must be N×{len(keep)} (one column per kept "
                                f"channel), got {tuple(m.shape)}")
            self.merge = m[:, order].contiguous() if order != list(range(len(keep))) else m

    @classmethod
    def from_group(cls, group: Any, keep: Any, *, criterion: str | None = None, ratio: float | None = None,
                   **provenance: Any) -> GroupPlan:
        """The plan of graph group ``group`` keeping ``keep``: size, members and ``provenance["name"]`` /
        ``["mergeable"]`` filled from the group; ``ratio`` defaults to the fraction removed."""
        n_keep = len(keep)
        return cls(group_id=group.id, keep=keep, size=group.size, criterion=criterion,
                   ratio=(1 - n_keep / group.size) if ratio is None else ratio,
                   members=[{"module": m.module, "role": m.role, "size": len(m.indices(group.id))}
                            for m in group.members],
                   provenance={"name": group.name, "mergeable": group.mergeable, **provenance})

    def replace(self, **changes: Any) -> GroupPlan:
        """A copy with ``changes`` applied (e.g. ``merge=M``, ``keep=[...]``, ``provenance={...}``)."""
        return dataclasses.replace(self, **changes)

    @property
    def pruned(self) -> int | None:
        return None if self.size is None else self.size - len(self.keep)

    def to_dict(self) -> dict:
        return {"group_id": self.group_id, "keep": list(self.keep), "members": self.members,
                "merge": _merge_to_json(self.merge), "size": self.size, "criterion": self.criterion,
                "ratio": self.ratio, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> GroupPlan:
        if d.get("shift") is not None:
            raise PlanError(f"group {d.get('group_id')}: 'shift' is no longer a group field (an input offset is "
                            "now a per-consumer Refit offset); recompute the plan")
        merge = d.get("merge")
        return cls(group_id=int(d["group_id"]), keep=list(d["keep"]), members=list(d.get("members", [])),
                   merge=merge if isinstance(merge, torch.Tensor) else _merge_from_json(merge), size=d.get("size"),
                   criterion=d.get("criterion"), ratio=d.get("ratio"), provenance=dict(d.get("provenance") or {}))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GroupPlan):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        ma, mb = a.pop("merge"), b.pop("merge")
        same_merge = (self.merge is None and other.merge is None) or (
            self.merge is not None and other.merge is not None and self.merge.shape == other.merge.shape
            and torch.equal(self.merge, other.merge.to(self.merge.dtype)))
        return a == b and same_merge and (ma is None) == (mb is None)


def _tensor_to_json(t: torch.Tensor | None) -> dict | None:
    if t is None:
        return None
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "values": [float(v) for v in t.detach().reshape(-1).tolist()]}


def _tensor_from_json(d: dict | None) -> torch.Tensor | None:
    if d is None:
        return None
    return torch.tensor(d["values"], dtype=getattr(torch, d.get("dtype", "float32"))).reshape(d["shape"])


_REFIT_TENSORS = ("weight", "bias", "offset", "running_mean", "running_var")


@dataclass(eq=False, kw_only=True)
class Refit:
    """New parameters for one consumer module, written by surgery after the plan's slicing and merges.

    Shapes are over the consumer's *original* outputs (O) and its inputs *after* the plan (I'); surgery
    keeps the rows of the outputs the plan keeps.

    Attributes:
        module: the consumer's qualified name.
        weight: (O, I', *kernel) replaces the weight (a whole-layer refit), or None.
        bias: (O,) replaces the bias (the module must have one), or None.
        offset: (O,) a constant added to the module's output — into its bias, or, when ``norm`` is set,
            folded into that BatchNorm: ``running_mean −= offset`` (exact in eval mode).
        norm: name of the BatchNorm that alone reads this module's output (for ``offset``).
        running_mean, running_var: (C,) new statistics of a BatchNorm ``module`` (re-estimation).
        provenance: how it was computed (errors, ridge, samples, ...).
    """

    module: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    norm: str | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _REFIT_TENSORS:
            v = getattr(self, name)
            if v is not None:
                v = torch.as_tensor(v).detach()
                if name != "weight":
                    v = v.reshape(-1)
                setattr(self, name, v)
        if all(getattr(self, n) is None for n in _REFIT_TENSORS):
            raise PlanError(f"refit of '{self.module}' sets nothing (give weight, bias, offset or statistics)")
        if self.norm is not None and self.offset is None:
            raise PlanError(f"refit of '{self.module}' names norm '{self.norm}' but has no offset to fold")

    def to_dict(self, tensors: bool = True) -> dict:
        d = {"module": self.module, "norm": self.norm, "provenance": self.provenance}
        for name in _REFIT_TENSORS:
            v = getattr(self, name)
            d[name] = _tensor_to_json(v) if tensors else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Refit:
        vals = {n: (d.get(n) if isinstance(d.get(n), torch.Tensor) or d.get(n) is None else _tensor_from_json(d[n]))
                for n in _REFIT_TENSORS}
        return cls(module=str(d["module"]), norm=d.get("norm"), provenance=dict(d.get("provenance") or {}), **vals)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Refit):
            return NotImplemented
        if (self.module, self.norm, self.provenance) != (other.module, other.norm, other.provenance):
            return False
        for name in _REFIT_TENSORS:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b.to(a.dtype))):
                return False
        return True


@dataclass
class Plan:
    """Per-group decisions; groups not listed keep every channel. ``refits``: per-consumer new parameters
    (:class:`Refit`), applied after the groups. ``meta``: global provenance."""

    groups: list[GroupPlan] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    refits: list[Refit] = field(default_factory=list)

    def group(self, group_id: int) -> GroupPlan | None:
        return next((g for g in self.groups if g.group_id == group_id), None)

    def refit(self, module: str) -> Refit | None:
        return next((r for r in self.refits if r.module == module), None)

    def with_refits(self, refits: list[Refit], **meta: Any) -> Plan:
        """A copy with ``refits`` added (a later refit of the same module replaces an earlier one)."""
        names = {r.module for r in refits}
        return Plan(groups=list(self.groups), meta={**self.meta, **meta},
                    refits=[r for r in self.refits if r.module not in names] + list(refits))

    def to_dict(self) -> dict:
        d = {"format": PLAN_FORMAT, "version": 1, "meta": self.meta, "groups": [g.to_dict() for g in self.groups]}
        if self.refits:
            d["refits"] = [r.to_dict() for r in self.refits]
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a prunekit plan (format={d.get('format')!r})")
        return cls(groups=[GroupPlan.from_dict(g) for g in d.get("groups", [])], meta=dict(d.get("meta") or {}),
                   refits=[Refit.from_dict(r) for r in d.get("refits") or []])

    def save(self, stem: Any) -> Any:
        """Write ``<stem>.json`` (plain data) + ``<stem>.safetensors`` (merge matrices, refit tensors), atomically (:func:`prunekit.io.save_state`). Returns the stem."""
        from ..io.state import save_state

        groups = [{**g.to_dict(), "merge": g.merge} for g in self.groups]
        doc = {"format": PLAN_FORMAT, "version": 1, "meta": self.meta, "groups": groups,
               "refits": [r.to_dict(tensors=False) for r in self.refits]}
        return save_state(stem, doc)

    @classmethod
    def load(cls, stem: Any) -> Plan:
        """Read what :meth:`save` wrote (no pickle; a corrupt or mismatched pair raises CheckpointError)."""
        from ..io.state import load_state

        doc = load_state(stem)
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"{stem}: not a saved prunekit plan")
        groups = [GroupPlan.from_dict(gd) for gd in doc.get("groups", [])]
        return cls(groups=groups, meta=dict(doc.get("meta") or {}),
                   refits=[Refit.from_dict(r) for r in doc.get("refits") or []])

    @classmethod
    def from_json(cls, text: str | dict) -> Plan:
        return cls.from_dict(json.loads(text) if isinstance(text, str) else text)

    def summary(self) -> str:
        lines = [f"Plan({len(self.groups)} groups, {self.meta})"]
        for g in self.groups:
            m = " +merge" if g.merge is not None else ""
            lines.append(f"  #{g.group_id}: keep {len(g.keep)}/{g.size}{m}")
        for r in self.refits:
            what = [n for n in _REFIT_TENSORS if getattr(r, n) is not None]
            lines.append(f"  refit {r.module}: {'+'.join(what)}" + (f" → {r.norm}" if r.norm else ""))
        return "\n".join(lines)


@dataclass
class PruneRecord:
    """What surgery applied: ``steps[i][module] = {"type": cls name, role: kept indices, ...}``, plus the
    final ``shapes[module][tensor] = shape`` of every touched module (checked after replay).

    Pruning a pruned model appends a step, so a record always replays from the dense architecture.
    """

    steps: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def then(self, step: dict[str, dict[str, Any]], shapes: dict[str, dict[str, list[int]]]) -> PruneRecord:
        return PruneRecord(steps=[*self.steps, step], shapes={**self.shapes, **shapes})

    def to_dict(self) -> dict:
        return {"format": RECORD_FORMAT, "version": 1, "steps": self.steps, "shapes": self.shapes}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> PruneRecord:
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise PlanError(f"not a prunekit prune record (format={d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("version") != 1:
            raise PlanError(f"unsupported prune record version {d.get('version')!r} (this prunekit reads 1)")
        return cls(steps=[dict(s) for s in d.get("steps", [])], shapes=dict(d.get("shapes") or {}))

    @classmethod
    def from_json(cls, text: str | dict) -> PruneRecord:
        return cls.from_dict(json.loads(text) if isinstance(text, str) else text)
