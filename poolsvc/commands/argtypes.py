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
from typing import Any

from ..config import parse_size
from ..errors import ConfigError


def _integer(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checked(parse: Callable[[str], Any], accept: Callable[[Any], bool], rule: str,
             name: str) -> Callable[[str], Any]:
    """A type function: ``parse`` the text, then refuse it unless ``accept(value)``."""
    def check(text: str) -> Any:
        value = parse(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    check.__name__ = name  # argparse names the type in some of its messages
    return check


#: An integer >= 1.
positive_int: Callable[[str], int] = _checked(_integer, lambda v: v >= 1, "a positive integer", "positive_int")
#: An integer >= 0.
nonnegative_int: Callable[[str], int] = _checked(_integer, lambda v: v >= 0, "an integer >= 0", "nonnegative_int")
#: A finite number > 0.
positive_float: Callable[[str], float] = _checked(_real, lambda v: v > 0, "a number > 0", "positive_float")
#: A finite number >= 0.
nonnegative_float: Callable[[str], float] = _checked(_real, lambda v: v >= 0, "a number >= 0",
                                                     "nonnegative_float")


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
    return _checked(_integer, lambda v: v in values, f"one of {', '.join(str(v) for v in values)}", "choice")
