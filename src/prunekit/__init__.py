"""prunekit: make trained PyTorch networks smaller and faster while keeping their accuracy."""
__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DatasetError, PrunekitError, UnknownNameError

__all__ = ["CheckpointError", "ConfigError", "DatasetError", "PrunekitError", "UnknownNameError", "__version__"]
