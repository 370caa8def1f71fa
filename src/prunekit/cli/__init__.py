"""`prunekit` command line: a thin shell over the Python API.

Every command prints a human-readable table, or with ``--json`` exactly one JSON object on stdout
carrying the same numbers (progress bars and notes go to stderr). Each module of this package
registers its sub-commands: ``info`` (models, datasets, data), ``training`` (train, eval, search),
``pruning`` (prune, compare, sparsify), ``studies`` (reproduce, analyze, report).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import PrunekitError
from . import info, pruning, studies, training
from .base import COMMANDS

__all__ = ["COMMANDS", "build_parser", "main"]

_MODULES = (info, training, pruning, studies)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        return p

    for module in _MODULES:
        module.add_parsers(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .. import distributed

    args = build_parser().parse_args(argv)
    try:
        report, render = COMMANDS[args.command](args)
        is_main = distributed.is_main()  # ask before cleanup: afterwards every rank looks like rank 0
    except PrunekitError as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    if is_main:
        if args.json:
            print(json.dumps(report, default=str))
        else:
            render()
    return 0
