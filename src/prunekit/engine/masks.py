"""Keep masks: which channels of each group, and which indices of each member, a plan keeps.

The one place that validates a :class:`~prunekit.engine.plan.Plan` against its graph and turns it into
per-group boolean masks (surgery, masking, compensation and dead-channel removal all read them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import PlanError
from .plan import Plan


@dataclass
class PlanMasks:
    """``masks[g]``: bool (N_g,) per group of the graph (all True for groups the plan leaves whole);
    ``merges``: the plan's merge matrices (N×P) by group id."""

    masks: list[np.ndarray]
    merges: dict[int, torch.Tensor] = field(default_factory=dict)

    def member_keep(self, member) -> np.ndarray:
        return member_keep(member, self.masks)


def keep_masks(graph, plan: Plan) -> PlanMasks:
    """Validate ``plan`` against ``graph`` (group ids, sizes, protected channels, merge shapes and
    mergeability) and return its :class:`PlanMasks`. Raises :class:`PlanError` naming the group."""
    masks = [np.ones(g.size, dtype=bool) for g in graph.groups]
    merges: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    for gp in plan.groups:
        if not 0 <= gp.group_id < len(graph.groups):
            raise PlanError(f"plan names group {gp.group_id}, but the graph has {len(graph.groups)} groups")
        if gp.group_id in seen:
            raise PlanError(f"plan lists group {gp.group_id} twice")
        seen.add(gp.group_id)
        g = graph.groups[gp.group_id]
        if gp.size is not None and gp.size != g.size:
            raise PlanError(f"group {g.id} ('{g.name}') has {g.size} channels, the plan says {gp.size}")
        keep = np.asarray(gp.keep, dtype=np.int64)
        if len(keep) == 0:
            raise PlanError(f"group {g.id} ('{g.name}'): keep is empty (at least one channel must stay)")
        if keep.min() < 0 or keep.max() >= g.size:
            raise PlanError(f"group {g.id} ('{g.name}'): keep indices must be in [0, {g.size})")
        mask = np.zeros(g.size, dtype=bool)
        mask[keep] = True
        dropped = [c for c in g.blocked if not mask[c]]
        if dropped:
            raise PlanError(f"group {g.id} ('{g.name}'): plan removes protected channel {dropped[0]} "
                            f"({g.blocked[dropped[0]]})")
        masks[g.id] = mask
        if gp.merge is not None:
            if not g.mergeable:
                raise PlanError(f"group {g.id} ('{g.name}') is not mergeable: {g.merge_reason}")
            if tuple(gp.merge.shape) != (g.size, len(keep)):
                raise PlanError(f"group {g.id} ('{g.name}'): merge must be {g.size}×{len(keep)}, "
                                f"got {tuple(gp.merge.shape)}")
            merges[g.id] = gp.merge
    return PlanMasks(masks, merges)


def member_keep(member, masks: list[np.ndarray] | dict[int, np.ndarray]) -> np.ndarray:
    """Bool (len(member),): which of the member's indices survive (indices outside any group always do;
    with a dict of masks, groups missing from it keep everything)."""
    keep = np.ones(len(member), dtype=bool)
    inside = member.group >= 0
    for gid in np.unique(member.group[inside]).tolist():
        if isinstance(masks, dict) and gid not in masks:
            continue
        sel = member.group == gid
        keep[sel] = masks[gid][member.channel[sel]]
    return keep
