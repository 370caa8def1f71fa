"""Plain-data values that cross the decide/apply boundary: :class:`Plan` and :class:`PruneRecord`.

A :class:`Plan` says, per channel group of a :class:`~prunekit.engine.graph.ChannelGraph`, which of
the group's N channels survive (``keep``, P ascending indices) and optionally a merge matrix
``M ∈ R^{N×P}`` (Neuron Merging, ``M = Z^T``): row ``n`` is an original channel, column ``p`` the kept
channel ``keep[p]``; surgery replaces every consumer's input weights by ``W ×_in M``, i.e.
``W_new[:, p] = Σ_n M[n, p] · W[:, n]``. Pure pruning is ``M[keep[p], p] = 1`` and zero rows elsewhere.

A :class:`PruneRecord` is what surgery did, per module and role (``out``/``in``/``norm``): the kept
indices. It is saved next to the weights and replayed onto a freshly built dense model
(:func:`~prunekit.engine.surgery.replay`) before the weights are loaded.
"""
from __future__ import annotations

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
        shift: optional (N,) offsets: the consumers' input of channel n is approximated by
            ``(M x_kept)_n + shift_n`` (an affine merge, e.g. least-squares compensation with an
            intercept); surgery folds ``W · shift`` into every consumer's bias.
    """

    group_id: int
    keep: list[int]
    members: list[dict] = field(default_factory=list)
    merge: torch.Tensor | None = None
    size: int | None = None
    criterion: str | None = None
    ratio: float | None = None
    provenance: dict = field(default_factory=dict)
    shift: torch.Tensor | None = None

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
        if self.shift is not None:
            self.shift = torch.as_tensor(self.shift).reshape(-1)
            if self.size is not None and self.shift.numel() != self.size:
                raise PlanError(f"group {self.group_id}: shift must have one value per channel ({self.size}), "
                                f"got {self.shift.numel()}")

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

    @property
    def pruned(self) -> int | None:
        return None if self.size is None else self.size - len(self.keep)

    def to_dict(self) -> dict:
        return {"group_id": self.group_id, "keep": list(self.keep), "members": self.members,
                "merge": _merge_to_json(self.merge), "size": self.size, "criterion": self.criterion,
                "ratio": self.ratio, "provenance": self.provenance,
                **({"shift": [float(v) for v in self.shift.tolist()]} if self.shift is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> GroupPlan:
        shift = d.get("shift")
        return cls(group_id=int(d["group_id"]), keep=list(d["keep"]), members=list(d.get("members", [])),
                   merge=_merge_from_json(d.get("merge")), size=d.get("size"), criterion=d.get("criterion"),
                   ratio=d.get("ratio"), provenance=dict(d.get("provenance") or {}),
                   shift=None if shift is None else torch.tensor(shift, dtype=torch.float64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GroupPlan):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        ma, mb = a.pop("merge"), b.pop("merge")
        sa, sb = a.pop("shift", None), b.pop("shift", None)
        if (sa is None) != (sb is None) or (sa is not None and not torch.equal(
                self.shift.double(), other.shift.double())):
            return False
        same_merge = (self.merge is None and other.merge is None) or (
            self.merge is not None and other.merge is not None and self.merge.shape == other.merge.shape
            and torch.equal(self.merge, other.merge.to(self.merge.dtype)))
        return a == b and same_merge and (ma is None) == (mb is None)


@dataclass
class Plan:
    """Per-group decisions; groups not listed keep every channel. ``meta``: global provenance."""

    groups: list[GroupPlan] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def group(self, group_id: int) -> GroupPlan | None:
        return next((g for g in self.groups if g.group_id == group_id), None)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": 1, "meta": self.meta,
                "groups": [g.to_dict() for g in self.groups]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a prunekit plan (format={d.get('format')!r})")
        return cls(groups=[GroupPlan.from_dict(g) for g in d.get("groups", [])], meta=dict(d.get("meta") or {}))

    @classmethod
    def from_json(cls, text: str | dict) -> Plan:
        return cls.from_dict(json.loads(text) if isinstance(text, str) else text)

    def summary(self) -> str:
        lines = [f"Plan({len(self.groups)} groups, {self.meta})"]
        for g in self.groups:
            m = " +merge" if g.merge is not None else ""
            lines.append(f"  #{g.group_id}: keep {len(g.keep)}/{g.size}{m}")
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
