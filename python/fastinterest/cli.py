"""`fastinterest ...` command line (stdlib argparse).

Each subsystem owns its commands: a module listed in `_COMMAND_MODULES` exposes
`register(subparsers)`, which adds its sub-commands and sets `func` on each parser
(`func(args) -> int | None`). A module not written yet is skipped.
"""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = [
    "fastinterest.data.cli",        # generate, prepare
    "fastinterest.pretrain.cli",    # pretrain
    "fastinterest.train.cli",       # train, evaluate, demo
    "fastinterest.apps.cli",        # recommend, similar, target, explain, predict
    "fastinterest.serve.cli",       # serve
    "fastinterest.info",            # info
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinterest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that subsystem is not there yet
            raise
        register = getattr(mod, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
