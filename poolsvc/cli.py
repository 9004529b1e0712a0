"""The ``poolsvc`` command line: a thin dispatcher to one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` which registers its
parser and sets ``func`` (a callable taking the parsed arguments and returning
an exit status).  Errors of poolsvc become a one-line message and exit status 2
(a TeeError's return code and origin by their GlobalPlatform names); bad option
values are argparse usage errors, also exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from ._backend import BACKEND
from .errors import PoolsvcError, TeeError
from .teecodes import annotate

#: Subcommand modules, in the order --help lists them.
COMMANDS = ["bench", "demo", "serve", "stat", "load", "tee"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolsvc",
        description="A fast userspace model of TEE shared memory: contiguous and "
                    "scattered allocation, page lists, a simulated secure world and a "
                    "pool service.",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__} ({BACKEND} core, Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"poolsvc.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"poolsvc.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PoolsvcError as exc:
        message = annotate(str(exc), exc.code, exc.origin) if isinstance(exc, TeeError) else str(exc)
        print(f"poolsvc {args.command}: {type(exc).__name__}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"poolsvc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
