"""Exceptions raised by prunekit. Each one names the thing that is wrong and how to fix it."""


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class UnknownNameError(PrunekitError, KeyError):
    """A registry lookup (model, dataset, optimizer, recipe, criterion) failed."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DatasetError(PrunekitError):
    """A dataset file is missing, truncated, corrupted or does not match its format."""


class CheckpointError(PrunekitError):
    """A checkpoint is unreadable, unsafe, or does not match the model it is loaded into."""


class ConfigError(PrunekitError, ValueError):
    """An option has an invalid value (negative epochs, ratio outside [0, 1), ...)."""


def unknown_name(kind: str, name: str, known) -> UnknownNameError:
    """Build an UnknownNameError that lists the known names and the closest match."""
    import difflib

    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UnknownNameError(f"unknown {kind} '{name}'.{hint} Known: {', '.join(known)}")
