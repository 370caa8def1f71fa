"""The engine's data types: the channel layout of a traced tensor and the groups it leads to.

This file only defines values, no tracing logic. Every channel index of every traced tensor carries an
**atom** (an integer id); :class:`Chan` is the atom list of one tensor dimension, :class:`TensorInfo` what
a layer rule sees of one input. After tracing, atoms coupled by union-find form **channels** (kept or
removed as a whole), channels linked by producers form a :class:`Group`, and every module dimension that
reads or writes them is a :class:`Member` (role ``out`` / ``in`` / ``norm``) that surgery slices by the
group's kept channels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ROLES", "Chan", "Group", "HeadSplit", "Member", "TensorInfo"]

#: member roles: producer rows, consumer columns, per-channel (norm) parameters, and a module's own
#: parameter used functionally (``x + self.pos_embed``: sliced along ``Member.axis``)
ROLES = ("out", "in", "norm", "param")


@dataclass(frozen=True, eq=False)
class Chan:
    """Channel layout of a tensor: ``atoms[i]`` / ``pos[i]`` for channel index ``i`` of dim ``dim``.

    ``pos`` distinguishes the elements of a channel's block after flatten (or a depthwise multiplier),
    ``raw`` is True right after a producer (only BatchNorm since): where a merge may still pass a BN.
    """

    dim: int
    atoms: np.ndarray
    pos: np.ndarray
    raw: bool = False

    def __len__(self) -> int:
        return len(self.atoms)

    def with_(self, **kw: Any) -> Chan:
        return dataclasses.replace(self, **kw)

    def repeat(self, k: int) -> Chan:
        """Each channel ``i`` becomes ``k`` consecutive channels ``i·k + s`` (pos ``pos·k + s``)."""
        return self.with_(atoms=np.repeat(self.atoms, k),
                          pos=(np.repeat(self.pos, k) * k + np.tile(np.arange(k), len(self))))

    def tile(self, g: int) -> Chan:
        """The channel list repeated ``g`` times (block ``b`` gets pos ``b·(max pos + 1) + pos``)."""
        span = int(self.pos.max()) + 1 if len(self) else 1
        return self.with_(atoms=np.tile(self.atoms, g),
                          pos=np.tile(self.pos, g) + np.repeat(np.arange(g), len(self)) * span)


@dataclass(frozen=True)
class TensorInfo:
    """What a rule sees of one input tensor: its shape and channel layout (None: not tracked)."""

    shape: tuple
    chan: Chan | None


@dataclass
class Member:
    """One module dimension in the graph. ``group[i]``/``channel[i]``: group id and group channel of
    index ``i`` (-1 for protected source channels that belong to no group).

    Role ``param``: parameter ``param`` of module ``module`` (e.g. a CLS token or position embedding,
    used by functional ops rather than by a layer rule), indexed by channel along ``axis``."""

    module: str
    role: str
    kind: str
    atoms: np.ndarray
    pos: np.ndarray
    fresh: bool = False
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    channel: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    param: str | None = None
    axis: int | None = None

    @property
    def label(self) -> str:
        """``module:role`` (``module.param:param`` for parameter members)."""
        return f"{self.module}.{self.param}:param" if self.role == "param" else f"{self.module}:{self.role}"

    def __len__(self) -> int:
        return len(self.atoms)

    def indices(self, group_id: int) -> np.ndarray:
        """Indices of this member that belong to ``group_id``."""
        return np.nonzero(self.group == group_id)[0]

    def __repr__(self) -> str:
        return f"Member({self.label!r}, {self.kind}, {len(self)} channels)"


@dataclass
class HeadSplit:
    """A reshape that split a channel dim of H·D channels into (H, D): attention heads.

    The D channels of a head become one channel (kept or removed whole); ``atoms`` (H,) are the heads'.
    ``owner`` is the module whose forward reshaped (its head-count attributes follow a prune). After the
    graph is built, ``group[h]`` / ``channel[h]`` locate head ``h`` (-1: protected, in no group).
    ``kind="split"``: not heads but equal pieces of a ``split(size)`` (head_dim 1): only the owner's
    width attributes equal to ``size`` follow.
    """

    owner: str | None
    atoms: np.ndarray
    head_dim: int
    kind: str = "heads"
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    channel: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def heads(self) -> int:
        return len(self.atoms)

    def __len__(self) -> int:
        return len(self.atoms)


@dataclass
class Group:
    """A set of channels that shrink together. ``size`` = N channels, numbered by the first producer.

    Attributes:
        blocked: protected channel → reason (always kept).
        mergeable: whether a merge matrix M (N × P) may be absorbed by the consumers.
        merge_reason: why not, when ``mergeable`` is False.
    """

    id: int
    name: str
    size: int
    members: list[Member]
    blocked: dict[int, str]
    mergeable: bool = False
    merge_reason: str | None = None

    def _names(self, role: str, fresh: bool | None = None) -> list[str]:
        return [m.module for m in self.members if m.role == role and (fresh is None or m.fresh == fresh)]

    @property
    def producers(self) -> list[str]:
        """Modules whose output rows create these channels (scored by the criteria)."""
        return self._names("out", fresh=True)

    @property
    def consumers(self) -> list[str]:
        return self._names("in")

    @property
    def norms(self) -> list[str]:
        return self._names("norm")

    @property
    def prunable(self) -> list[int]:
        return [c for c in range(self.size) if c not in self.blocked]

    @property
    def protected(self) -> bool:
        return not self.prunable

    def __repr__(self) -> str:
        state = "protected" if self.protected else f"{len(self.prunable)}/{self.size} prunable"
        return (f"Group(#{self.id} {self.name!r}, {state}, mergeable={self.mergeable}, "
                f"members={[m.label for m in self.members]})")

    def summary(self) -> dict:
        return {"id": self.id, "name": self.name, "size": self.size, "prunable": len(self.prunable),
                "members": [m.label for m in self.members], "mergeable": self.mergeable,
                "merge_reason": self.merge_reason,
                "protected_reason": next(iter(self.blocked.values()), None) if self.protected else None}
