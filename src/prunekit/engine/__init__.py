"""Channel-dependency pruning engine: model → ChannelGraph → Plan → surgery → smaller model.

>>> from prunekit.engine import prune
>>> small = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5, criterion="l1-norm")

Lower level: ``graph = ChannelGraph.build(model, x)``; ``plan = make_plan(model, graph, ratio=0.5)``
(or a Plan built by a method, e.g. with merge matrices); ``small = apply(model, graph, plan)``;
``small.prunekit_record`` replays onto a dense model with ``replay(dense, record)``.
"""
from .api import make_plan, prune
from .criteria import CRITERIA, ScoreContext, get_criterion, list_criteria, register_criterion
from .errors import PlanError, SurgeryError, UnsupportedLayerError, UntraceableModelError
from .graph import Chan, ChannelGraph, Group, Member, TensorInfo, TraceContext
from .plan import GroupPlan, Plan, PruneRecord
from .rules import (
    BatchNormRule,
    ChannelWiseRule,
    ConvRule,
    LayerRule,
    LinearRule,
    PassRule,
    find_rule,
    register_layer,
)
from .select import check_ratio, n_keep, select
from .surgery import apply, load_hook, mask, record_of, replay

__all__ = [
    "CRITERIA", "BatchNormRule", "Chan", "ChannelGraph", "ChannelWiseRule", "ConvRule", "Group", "GroupPlan",
    "LayerRule", "LinearRule", "Member", "PassRule", "Plan", "PlanError", "PruneRecord", "ScoreContext",
    "SurgeryError", "TensorInfo", "TraceContext", "UnsupportedLayerError", "UntraceableModelError", "apply",
    "check_ratio", "find_rule", "get_criterion", "list_criteria", "load_hook", "make_plan", "mask", "n_keep",
    "prune", "record_of", "register_criterion", "register_layer", "replay", "select",
]


def _register_io_hook() -> None:
    """Let ``prunekit.io.load_model`` replay ``prune_record`` (rebuild dense → resize → load weights)."""
    try:
        from ..io import register_load_hook
    except ImportError:  # pragma: no cover - io not installed in this checkout yet
        return
    register_load_hook("prune_record", load_hook)


_register_io_hook()
