"""Checkpoint I/O without unpickling untrusted data.

* :func:`save_state` / :func:`load_state`: nested training state (optimizer, scheduler, RNG, ...)
  as ``<stem>.safetensors`` + ``<stem>.json``, written atomically.
* :func:`save_model` / :func:`load_model`: a model plus what is needed to rebuild it (a model
  outside the zoo reloads into a dense instance: ``load_model(path, model=MyModel())``); also
  reads legacy ``.pth``/``.pth.tar`` files with ``torch.load(weights_only=True)`` only.
* :func:`find_tied` / :func:`tie_parameters`: shared (tied) parameters, re-tied on load.
* :func:`import_state_dict`: official checkpoint key names → prunekit names.
"""
from .checkpoint import (
    apply_state_dict,
    find_tied,
    load_model,
    register_load_hook,
    save_model,
    tie_parameters,
)
from .legacy import import_state_dict, read_legacy
from .state import load_state, save_state

__all__ = [
    "apply_state_dict",
    "find_tied",
    "import_state_dict",
    "load_model",
    "load_state",
    "read_legacy",
    "register_load_hook",
    "save_model",
    "save_state",
    "tie_parameters",
]
