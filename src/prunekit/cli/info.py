"""Commands that describe what prunekit has: the model zoo, the datasets, fetching data."""
from __future__ import annotations

import argparse
from typing import Any

from .base import (
    AddParser,
    Report,
    command,
)


@command("models")
def cmd_models(args: argparse.Namespace) -> Report:
    from ..metrics import count_params
    from ..models import create, list_models
    from ..models.hf import TransformersMissingError

    rows = []
    for name in list_models():
        try:
            model = create(name)
        except TransformersMissingError:  # optional: listed once `pip install prunekit[transformers]`
            continue
        shape = getattr(model, "input_shape", None)  # token models (llama-shakespeare) have none
        rows.append({"name": name, "params": count_params(model), "input_shape": list(shape) if shape else []})
    return _listing("models", rows, "params", "params", "{:>12,}")


@command("datasets")
def cmd_datasets(args: argparse.Namespace) -> Report:
    from ..data import dataset_info, list_datasets

    rows = []
    for name in list_datasets():
        info = dataset_info(name)
        rows.append({"name": name, "num_classes": info.num_classes, "input_shape": list(info.input_shape)})
    return _listing("datasets", rows, "num_classes", "classes", "{:>8}")


def _listing(key: str, rows: list[dict[str, Any]], column: str, header: str, fmt: str) -> Report:
    """``{key: rows}`` and a table of name, ``column`` (titled ``header``, formatted with ``fmt``), input shape."""
    def render() -> None:
        print(f"{key.removesuffix('s'):<18} {header:>{len(fmt.format(0))}}  input")
        for r in rows:
            print(f"{r['name']:<18} {fmt.format(r[column])}  {'×'.join(map(str, r['input_shape'])) or 'tokens'}")

    return {key: rows}, render


@command("data")
def cmd_data(args: argparse.Namespace) -> Report:
    from pathlib import Path

    from ..data import fetch

    if args.data_root is not None:  # asked for by name on this command: create it (other commands never do)
        Path(args.data_root).expanduser().mkdir(parents=True, exist_ok=True)
    path = fetch(args.name, args.data_root, allow_apt=args.apt, allow_download=not args.no_download,
                 progress=not args.json)
    return {"dataset": args.name, "root": str(path)}, lambda: print(f"{args.name}: {path}")


def add_parsers(add: AddParser) -> None:
    """Register this module's sub-commands (``add(name, help)`` returns the sub-parser)."""
    add("models", "list the model zoo")
    add("datasets", "list the datasets")

    p = add("data", "obtain a dataset: already present, official download (MD5-verified), or with --apt "
                    "the Debian package")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("name")
    p.add_argument("--data-root", default=None,
                   help="put the dataset in DIR/<name> (created if needed) instead of the user cache")
    p.add_argument("--apt", action="store_true",
                   help="as root, install the Debian package (e.g. dataset-fashion-mnist) with apt-get first")
    p.add_argument("--no-apt", action="store_true", help=argparse.SUPPRESS)  # the old opt-out; apt is opt-in now
    p.add_argument("--no-download", action="store_true", help="never download")
