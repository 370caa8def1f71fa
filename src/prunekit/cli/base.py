"""Shared pieces of the command line: the command registry, argument helpers, table printing."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..errors import PrunekitError

Report = tuple[dict[str, Any], Callable[[], None]]
#: ``add(name, help)`` returns a sub-parser that already has ``--json``
AddParser = Callable[[str, str], argparse.ArgumentParser]
#: name → function(args) returning (JSON report, function printing the human table)
COMMANDS: dict[str, Callable[[argparse.Namespace], Report]] = {}


def command(name: str):
    """Register ``fn(args) -> (report, render)`` as the sub-command ``name``."""
    def add(fn):
        COMMANDS[name] = fn
        return fn

    return add



def parse_value(text: str) -> Any:
    """``"0.1"`` → 0.1, ``"[1,2]"`` → [1, 2], ``"true"`` → True, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_values(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrunekitError(f"{flag} expects KEY=VALUE, got '{pair}'")
        out[key.replace("-", "_")] = parse_value(value)
    return out


def device_for(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_config_for(dataset: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Adapt a zoo model to a dataset's input (channels, size) and class count. Token datasets (a causal-LM
    task, or inputs that are not (C, H, W)) set only ``vocab_size`` (when the dataset declares one)."""
    from ..data import dataset_info

    info = dataset_info(dataset)
    if _is_token_dataset(info):
        vocab = getattr(info, "vocab_size", None)
        return {**({"vocab_size": vocab} if vocab else {}), **extra}
    cfg = {"num_classes": info.num_classes, "in_channels": info.input_shape[0], "input_size": info.input_shape[1]}
    cfg.update(extra)
    return cfg


def _is_token_dataset(info: Any) -> bool:
    from ..train import dataset_task

    return dataset_task(info) == "causal-lm" or len(tuple(getattr(info, "input_shape", ()) or ())) != 3


def size_report(model, input_shape) -> dict[str, int]:
    from ..metrics import count_macs, count_params

    return {"params": count_params(model), "macs": count_macs(model, input_shape=tuple(input_shape))}


def print_table(title: str, rows: dict[str, Any]) -> None:
    width = max(len(k) for k in rows) if rows else 0
    print(title)
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        print(f"  {key:<{width}}  {value}")


class _DataRootCheck(argparse.Action):
    """Store the value, then, once both --dataset and --data-root are known, check that the explicit root
    holds the dataset: a missing or incomplete --data-root is an error naming it and the missing files
    (exit 2), never a silent switch to another copy or a download into a mistyped path.
    ``prunekit data fetch NAME --data-root DIR`` is the command that fills a folder."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        name, root = getattr(namespace, "dataset", None), getattr(namespace, "data_root", None)
        if name is None or root is None:
            return
        from ..data.roots import LAYOUTS, resolve_root
        from ..errors import DatasetError

        if name not in LAYOUTS:  # synthetic, or an unknown name the command reports itself
            return
        try:
            resolve_root(name, root)
        except DatasetError as e:
            raise argparse.ArgumentError(None, str(e)) from None


def data_args(p: argparse.ArgumentParser) -> None:
    """--dataset, --data-root, --device, --model-config: the options of every command that reads data."""
    p.add_argument("--dataset", required=True, action=_DataRootCheck)
    p.add_argument("--data-root", default=None, action=_DataRootCheck,
                   help="the folder holding the dataset, used as given (an error if it lacks files); "
                        "default: search $PRUNEKIT_DATA, the user cache, /usr/share/datasets")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--model-config", action="append", metavar="KEY=VALUE",
                   help="model constructor option, e.g. shortcut=B or widths=[300,100]")
