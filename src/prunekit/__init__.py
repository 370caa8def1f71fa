"""prunekit: make trained PyTorch networks smaller and faster while keeping their accuracy.

>>> import prunekit
>>> small = prunekit.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5, criterion="l1-norm")
"""
__version__ = "0.1.0"

from . import io
from .engine import (
    ChannelGraph,
    GroupPlan,
    Plan,
    PruneRecord,
    UnsupportedLayerError,
    UntraceableModelError,
    apply,
    make_plan,
    prune,
    register_layer,
)
from .errors import CheckpointError, ConfigError, DatasetError, PrunekitError, UnknownNameError

__all__ = [
    "ChannelGraph",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "GroupPlan",
    "Plan",
    "PruneRecord",
    "PrunekitError",
    "UnknownNameError",
    "UnsupportedLayerError",
    "UntraceableModelError",
    "__version__",
    "apply",
    "io",
    "make_plan",
    "prune",
    "register_layer",
]
