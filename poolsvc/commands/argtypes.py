"""Argument types for the subcommands' numeric options: each checks its range.

argparse calls them on the option's text; a bad value raises
``argparse.ArgumentTypeError``, which argparse turns into a usage line, the
reason (``argument --trials: must be a positive integer, got '0'``) and exit
status 2.  Sizes are read by :func:`poolsvc.config.parse_size`, so every
option and config file accepts the same spellings (``4096``, ``16MiB``,
``0x1000``).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from ..config import parse_size
from ..errors import ConfigError


def _integer(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _real(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _real(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def size(text: str) -> int:
    """A size in bytes > 0 (``4096``, ``16MiB``, ``0x1000``)."""
    try:
        value = parse_size(text, "size")
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size (examples: 4096, 16MiB, 0x1000)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a size > 0, got {text!r}")
    return value


def size_list(text: str) -> list[int]:
    """Comma-separated sizes, each > 0; at least one."""
    sizes = [size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 4KiB,1MiB, got {text!r}")
    return sizes


def choice_of(*values: int) -> Callable[[str], int]:
    """An integer that must be one of ``values`` (listed in the error)."""
    def check(text: str) -> int:
        value = _integer(text)
        if value not in values:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(str(v) for v in values)}, got {text!r}")
        return value

    check.__name__ = "choice"
    return check
