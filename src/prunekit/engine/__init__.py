"""Channel-dependency pruning engine: model → ChannelGraph → Plan → surgery → smaller model.

>>> from prunekit.engine import prune
>>> small = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5, criterion="l1-norm")

Lower level: ``graph = ChannelGraph.build(model, x)``; ``plan = make_plan(model, graph, ratio=0.5)``
(or a Plan built by a method, e.g. with merge matrices); ``small = apply(model, graph, plan)``;
``small.prunekit_record`` replays onto a dense model with ``replay(dense, record)``.

Files, lowest first (each imports only those above it): ``errors``; ``channels`` (Chan, TensorInfo,
Member, HeadSplit, Group); ``context`` (TraceContext: channel ids, union-find, members, heads, protection);
``rule_base`` + ``norm_rules`` + ``rules`` (per-layer-type channel rules); ``ops`` + ``walker`` (functional
ops incl. matmul and attention, the fx-graph walker); ``record`` + ``capture`` (torch.fx / one recorded
run / torch.export); ``graph`` (ChannelGraph); ``criteria``, ``select``, ``plan``, ``masks``; ``adapters``
(functional parameters, head-count attributes, tied weights) and ``hf_config`` (Hugging Face configs);
``surgery`` (the only code that edits modules); ``api`` (``make_plan``, ``prune``).
"""
from .api import make_plan, prune
from .channels import Chan, Group, Member, TensorInfo
from .context import TraceContext
from .criteria import CRITERIA, ScoreContext, get_criterion, list_criteria, register_criterion
from .errors import PlanError, SurgeryError, UnsupportedLayerError, UntraceableModelError
from .graph import ChannelGraph
from .plan import GroupPlan, Plan, PruneRecord, Refit
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
    "LayerRule", "LinearRule", "Member", "PassRule", "Plan", "PlanError", "PruneRecord", "Refit", "ScoreContext",
    "SurgeryError", "TensorInfo", "TraceContext", "UnsupportedLayerError", "UntraceableModelError", "apply",
    "check_ratio", "find_rule", "get_criterion", "list_criteria", "load_hook", "make_plan", "mask", "n_keep",
    "prune", "record_of", "register_criterion", "register_layer", "replay", "select",
]


def _register_io_hook() -> None:
    """Let ``prunekit.io.load_model`` replay ``prune_record`` (rebuild dense → resize → load weights)."""
    from ..io import register_load_hook

    register_load_hook("prune_record", load_hook)


_register_io_hook()
